"""rtc's Python client: a resuming WebSocket `Client` and the server API clients."""

from rtc_client.api import ApiError, AsyncServerAPI, ServerAPI

__all__ = ["ApiError", "AsyncServerAPI", "ServerAPI"]
