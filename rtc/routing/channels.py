"""Who listens on which pub/sub channel: the broker's one handler, as a routing table.

The broker is built before the pieces that listen (it is handed to them), so it pushes
into this table and each piece registers the channels it cares about.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["Channels", "Listener"]


class Listener:
    """Callbacks for one channel: a message, and the subscription coming back after a loss."""

    __slots__ = ("on_message", "on_resubscribed")

    def __init__(
        self, on_message: Callable[[bytes], None], on_resubscribed: Callable[[], None] = lambda: None
    ) -> None:
        self.on_message = on_message
        self.on_resubscribed = on_resubscribed


class Channels:
    """A `BrokerHandler` that dispatches by channel; unknown channels are ignored."""

    def __init__(self) -> None:
        self._listeners: dict[bytes, Listener] = {}

    def listen(self, channel: str, listener: Listener) -> None:
        self._listeners[channel.encode()] = listener

    def forget(self, channel: str) -> None:
        self._listeners.pop(channel.encode(), None)

    def on_channel_message(self, channel: bytes, payload: bytes) -> None:
        listener = self._listeners.get(channel)
        if listener is not None:
            listener.on_message(payload)

    def on_resubscribed(self, channel: bytes) -> None:
        listener = self._listeners.get(channel)
        if listener is not None:
            listener.on_resubscribed()
