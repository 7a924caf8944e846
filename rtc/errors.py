"""The closed vocabularies of failure: protocol error codes, close codes, exceptions."""

from __future__ import annotations

import enum

__all__ = [
    "AuthError",
    "CloseCode",
    "ConfigError",
    "ErrorCode",
    "ExitStatus",
    "ProtocolError",
]


class ErrorCode(enum.StrEnum):
    """Codes of the `error` frame (SPEC section 4)."""

    BAD_REQUEST = "bad_request"
    UNKNOWN_TYPE = "unknown_type"
    FORBIDDEN = "forbidden"
    NOT_JOINED = "not_joined"
    RATE_LIMITED = "rate_limited"
    TOO_LARGE = "too_large"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class CloseCode(enum.IntEnum):
    """WebSocket close codes rtc sends. 1xxx are RFC 6455; 4xxx are rtc's own."""

    GOING_AWAY = 1001  # drain or shutdown: reconnect with the session
    POLICY = 1008  # sustained abuse (rate flood)
    TOO_BIG = 1009  # incoming frame over --max-message-bytes
    TRY_AGAIN = 1013  # slow consumer: send queue over --send-queue-bytes
    TOKEN_EXPIRED = 4001  # token expired without a refresh
    DISCONNECTED = 4003  # closed by the server API (`/api/disconnect`): SDKs do not reconnect


class ExitStatus(enum.IntEnum):
    """Exit statuses of `rtc` (docs/operations.md): systemd and scripts branch on them."""

    OK = 0
    FAILURE = 1  # `rtc drain`/`status` could not reach the host, or the drain did not finish
    CONFIG = 2  # a bad setting: one line on stderr
    BOOT_FAILED = 3  # a worker could not start on the first boot
    STOP_OVERRAN = 4  # workers did not stop within --shutdown-timeout and were killed


class ProtocolError(Exception):
    """A client frame that cannot be served; becomes an `error` frame, never a close."""

    def __init__(self, code: ErrorCode, message: str, request_id: str | int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id  # the frame's `id` when it had a valid one: echoed


class AuthError(Exception):
    """A token that does not open the door (401 before the upgrade)."""


class ConfigError(Exception):
    """A bad setting: one line on stderr and exit status 2."""
