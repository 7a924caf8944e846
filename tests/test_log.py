"""rtc.log: tokens never reach a log line; JSON logs are one object per line."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from rtc.config import Settings
from rtc.log import Repeats, describe, redact, setup_logging

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl-_x"


@pytest.mark.parametrize(
    "text,expected",
    [
        (f"GET /ws?token={JWT} HTTP/1.1", "GET /ws?token=*** HTTP/1.1"),
        (f"GET /ws?session=s1&token={JWT}&x=1", "GET /ws?session=s1&token=***&x=1"),
        (f"/ws?TOKEN={JWT}", "/ws?TOKEN=***"),
        (f"/cb?access_token={JWT}", "/cb?access_token=***"),
        (f'url="/ws?token={JWT}"', 'url="/ws?token=***"'),
        (f"Authorization: Bearer {JWT}", "Authorization: Bearer ***"),
        (f"authorization: bearer  {JWT} rest", "authorization: bearer  *** rest"),
        ("nothing to hide", "nothing to hide"),
        ("token= alone", "token= alone"),
        (f"/ws?%74oken={JWT}", "/ws?%74oken=***"),
        (f"/ws?session=s&%54%4F%4B%45%4E={JWT}", "/ws?session=s&%54%4F%4B%45%4E=***"),
        (f"/ws?t%6Fken={JWT}&x=1", "/ws?t%6Fken=***&x=1"),
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected
    assert "c2lnbmF0dXJl" not in redact(text)


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """setup_logging rewires the root logger; put pytest's back afterwards."""
    root = logging.getLogger()
    access = logging.getLogger("aiohttp.access")
    saved = (root.handlers[:], root.level, access.level)
    yield root
    root.handlers[:], root.level = saved[0], saved[1]
    access.setLevel(saved[2])


def capture(root: logging.Logger) -> io.StringIO:
    (handler,) = root.handlers
    assert isinstance(handler, logging.StreamHandler)
    stream = io.StringIO()
    handler.setStream(stream)
    return stream


def test_json_lines(root_logger: logging.Logger) -> None:
    setup_logging(Settings(node_id="n1", log_format="json", log_level="debug"), worker="3")
    stream = capture(root_logger)
    log = logging.getLogger("rtc.test")
    log.info("client %s connected via /ws?token=%s", "1.2.3.4", JWT, extra={"conn": "c1", "user": "alice"})
    log.debug("multi\nline\nevent")
    try:
        raise ValueError(f"bad header Bearer {JWT}")
    except ValueError:
        log.exception("failed")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    entries = [json.loads(line) for line in lines]
    first, second, third = entries
    assert first["level"] == "info"
    assert first["event"] == "client 1.2.3.4 connected via /ws?token=***"
    assert (first["node"], first["worker"], first["logger"]) == ("n1", "3", "rtc.test")
    assert (first["conn"], first["user"]) == ("c1", "alice")
    assert isinstance(first["ts"], float)
    assert second["level"] == "debug" and second["event"] == "multi\nline\nevent"
    assert third["level"] == "error"
    assert "ValueError" in third["exc"] and "Bearer ***" in third["exc"]
    assert JWT not in stream.getvalue()


def test_text_lines_are_redacted(root_logger: logging.Logger) -> None:
    setup_logging(Settings(node_id="n1"), worker="-")
    stream = capture(root_logger)
    logging.getLogger("rtc.test").warning("GET /ws?token=%s", JWT)
    logging.getLogger("rtc.test").debug("hidden at info")
    (line,) = stream.getvalue().splitlines()
    assert "WARNING [n1/-] rtc.test: GET /ws?token=***" in line
    assert JWT not in line


def test_levels(root_logger: logging.Logger) -> None:
    setup_logging(Settings(node_id="n1", log_level="warning"), worker="0")
    assert root_logger.level == logging.WARNING
    assert logging.getLogger("aiohttp.access").level == logging.WARNING
    setup_logging(Settings(node_id="n1", log_level="debug"), worker="0")
    assert root_logger.level == logging.DEBUG
    assert logging.getLogger("aiohttp.access").level == logging.INFO
    assert len(root_logger.handlers) == 1  # set up twice, still one handler


def test_describe_names_the_cause_even_when_the_exception_has_no_text() -> None:
    """A failed Redis call is logged with a reason ops can act on, never an empty one."""
    assert describe(TimeoutError()) == "TimeoutError"
    assert describe(RedisConnectionError("Error 111 connecting")) == "ConnectionError: Error 111 connecting"


def test_repeated_failures_are_logged_once_then_reminded_then_recovered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An outage fails a periodic task each second: its log stays a handful of lines."""
    now = [0.0]
    failures = Repeats(logging.getLogger("rtc.test"), "ring heartbeat", remind=60, clock=lambda: now[0])
    full = RedisConnectionError("OOM command not allowed")
    with caplog.at_level(logging.INFO, "rtc.test"):
        for _ in range(90):  # 90 s of failures, one a second
            failures.failed(full)
            now[0] += 1
        failures.failed(TimeoutError())  # another reason is news
        failures.succeeded()
        failures.succeeded()  # nothing to recover from
        failures.failed(full)  # a new outage starts a new count
    assert [r.getMessage() for r in caplog.records] == [
        "ring heartbeat failed: ConnectionError: OOM command not allowed",
        "ring heartbeat still failing: 61 failures in 60 s: ConnectionError: OOM command not allowed",
        "ring heartbeat failed: TimeoutError",
        "ring heartbeat recovered after 91 failures in 90.0 s",
        "ring heartbeat failed: ConnectionError: OOM command not allowed",
    ]
