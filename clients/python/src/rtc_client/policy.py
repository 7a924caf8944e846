"""Reconnect policy as pure functions: the same rules as the JavaScript client.

Kept apart from the client so they are tested by feeding values, and so there is one
place that decides whether a close allows a reconnect (as in centrifuge-js).
"""

from __future__ import annotations

import base64
import json
import random as _random
from collections.abc import Callable
from typing import Literal

__all__ = [
    "BACKOFF_BASE",
    "BACKOFF_CAP",
    "backoff_delay",
    "close_action",
    "handshake_close_code",
    "token_expiry",
]

BACKOFF_BASE = 0.5  # seconds
BACKOFF_CAP = 20.0

Action = Literal["reconnect", "refresh", "stop"]


def backoff_delay(
    attempt: int,
    random: Callable[[], float] = _random.random,
    base: float = BACKOFF_BASE,
    cap: float = BACKOFF_CAP,
) -> float:
    """Full jitter: a random delay in [0, min(cap, base * 2**attempt)) seconds."""
    return random() * min(cap, base * 2.0 ** min(attempt, 30))


def close_action(code: int, can_refresh: bool) -> Action:
    """What a close code allows: reconnect, reconnect with a new token, or stop."""
    if code == 4001:  # token expired
        return "refresh" if can_refresh else "stop"
    if code in (1008, 1009):  # policy (abuse); a frame over the limit would be sent again
        return "stop"
    if 4000 <= code <= 4999:  # the application disconnected this user (/api/disconnect)
        return "stop"
    return "reconnect"  # 1001 drain, 1006 dropped, 1011, 1012, 1013 slow consumer, ...


def handshake_close_code(status: int) -> int:
    """A refused upgrade as the close code that means the same thing."""
    if status == 401:
        return 4001  # bad or expired token: only a new token helps
    if status == 403:
        return 1008  # origin not allowed: retrying cannot help
    return 1013  # 503 draining or full, 429 too many: try again later


def token_expiry(token: str) -> float | None:
    """The `exp` claim of a JWT (seconds since the epoch), read without verifying it."""
    try:
        part = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
        exp = claims.get("exp")
        return float(exp) if isinstance(exp, int | float) else None
    except (IndexError, ValueError, AttributeError):
        return None
