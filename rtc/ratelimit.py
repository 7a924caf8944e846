"""A token bucket per connection, and the abuse window that turns into close 1008."""

from __future__ import annotations

from collections import deque

__all__ = ["AbuseWindow", "TokenBucket"]


class TokenBucket:
    """`rate` tokens per second up to `burst`; the caller passes the time in."""

    __slots__ = ("_burst", "_rate", "_stamp", "_tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._stamp = now

    def take(self, now: float) -> bool:
        """Spend one token if there is one."""
        elapsed = now - self._stamp
        if elapsed > 0:
            self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
            self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class AbuseWindow:
    """True once more than `limit` denials fall within `window` seconds (SPEC: 100 in 10 s)."""

    __slots__ = ("_denials", "_limit", "_window")

    def __init__(self, limit: int = 100, window: float = 10.0) -> None:
        self._limit = limit
        self._window = window
        self._denials: deque[float] = deque()

    def deny(self, now: float) -> bool:
        """Record a denial; True when the connection should be closed for abuse."""
        self._denials.append(now)
        while self._denials and self._denials[0] <= now - self._window:
            self._denials.popleft()
        return len(self._denials) > self._limit
