"""Logging as ops read it: text or one JSON object per line, never a token."""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable
from urllib.parse import unquote_plus

import orjson

from rtc.config import Settings

__all__ = ["Repeats", "describe", "redact", "setup_logging"]

# A query parameter anywhere in a line: its key is compared once percent-decoded, as the
# server decodes it (`?%74oken=` is `?token=` to aiohttp, so it must be to the log too).
_PARAM = re.compile(r"(?P<key>[^\s?&;=\"']+)=(?P<value>[^&;\s\"']*)")
_BEARER = re.compile(r"(Bearer\s+)[A-Za-z0-9._~+/=-]+", re.IGNORECASE)
_EXTRA_FIELDS = ("conn", "user", "room")


def describe(exc: BaseException) -> str:
    """An exception as a log line's reason: its type and its text, never an empty string.

    `str()` of a timeout is empty and redis-py's `repr()` drops the message; ops need both.
    """
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Repeats:
    """The failures of one periodic task, logged as an outage rather than once per attempt.

    A Redis that is down or full fails every heartbeat and checkpoint each second, on every
    worker: one line per failure buries whatever else the log says. Logged instead: the
    first failure, a failure with another reason, a reminder every `remind` seconds while
    it lasts, and the recovery with the number of failures it took.
    """

    __slots__ = ("_clock", "_failures", "_log", "_reason", "_remind", "_reminded", "_since", "_what")

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        remind: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._what = what
        self._remind = remind
        self._clock = clock
        self._failures = 0
        self._reason = ""
        self._since = self._reminded = 0.0

    def failed(self, exc: BaseException) -> None:
        reason = describe(exc)
        now = self._clock()
        self._failures += 1
        if self._failures == 1:
            self._since = now
        if reason != self._reason:
            self._log.warning("%s failed: %s", self._what, reason)
            self._reason, self._reminded = reason, now
        elif now - self._reminded >= self._remind:
            self._log.warning(
                "%s still failing: %d failures in %.0f s: %s",
                self._what,
                self._failures,
                now - self._since,
                reason,
            )
            self._reminded = now

    def succeeded(self) -> None:
        if self._failures:
            self._log.warning(
                "%s recovered after %d failures in %.1f s",
                self._what,
                self._failures,
                self._clock() - self._since,
            )
            self._failures, self._reason = 0, ""


def _param(match: re.Match[str]) -> str:
    if "token" in unquote_plus(match["key"]).lower() and match["value"]:
        return match["key"] + "=***"
    return match[0]


def redact(text: str) -> str:
    """Replace token values in URLs (however the key is encoded) and Bearer headers by `***`."""
    return _BEARER.sub(r"\1***", _PARAM.sub(_param, text))


class _JsonFormatter(logging.Formatter):
    def __init__(self, node: str, worker: str) -> None:
        super().__init__()
        self._node = node
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "event": redact(record.getMessage()),
            "logger": record.name,
            "node": self._node,
            "worker": self._worker,
        }
        for name in _EXTRA_FIELDS:
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(entry).decode()


class _TextFormatter(logging.Formatter):
    def __init__(self, node: str, worker: str) -> None:
        super().__init__(f"%(asctime)s %(levelname)s [{node}/{worker}] %(name)s: %(message)s")
        self.converter = time.gmtime

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def setup_logging(settings: Settings, worker: str) -> None:
    """Configure the root logger of this process (supervisor: worker `-`)."""
    handler = logging.StreamHandler(sys.stderr)
    formatter_class = _JsonFormatter if settings.log_format == "json" else _TextFormatter
    handler.setFormatter(formatter_class(settings.node_id, worker))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    logging.captureWarnings(True)  # library warnings become log lines (JSON too), not raw stderr
    logging.getLogger("aiohttp.access").setLevel(
        logging.INFO if settings.log_level == "debug" else logging.WARNING
    )
