"""rtc's Python client: a resuming WebSocket `Client` and the server API clients."""

from rtc_client.api import ApiError, AsyncServerAPI, ServerAPI
from rtc_client.client import Client, Room, RtcError
from rtc_client.policy import backoff_delay, close_action

__all__ = [
    "ApiError",
    "AsyncServerAPI",
    "Client",
    "Room",
    "RtcError",
    "ServerAPI",
    "backoff_delay",
    "close_action",
]
