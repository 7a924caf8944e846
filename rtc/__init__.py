"""rtc: a multi-process real-time WebSocket server that routes through Redis."""

__all__ = ["__version__"]
__version__ = "0.1.0"
