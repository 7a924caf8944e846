"""Structured logs of a real host: one JSON object per line, and never a token.

A host runs with ``--log-format json`` (its Redis is external, so its log file holds
rtc's output alone) at ``--log-level info``, and a second one at ``debug``, where aiohttp's
access log is on. Each gets the same traffic: connections authenticated by a token in the
query string and by an ``Authorization`` header, room traffic, bad frames, a refresh with
a bad token, refused upgrades (wrong signature in the query and in the header, expired,
garbage), and admin pages opened with an admin token in the query. Once the host has
stopped, its whole log is read.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt
import pytest

from tests.client import Client
from tests.rtcproc import Host, start_host, start_redis, token

LEVELS = ("info", "debug")
WORKERS = 2
LOG_LEVELS = {"debug", "info", "warning", "error", "critical"}


@dataclass(frozen=True)
class Tokens:
    """Every secret the traffic puts on the wire, each unique to its host's run."""

    query: str
    header: str
    admin: str
    bad_query: str
    bad_header: str
    expired: str
    garbage: str
    bad_refresh: str

    def all(self) -> dict[str, str]:
        return dict(vars(self))


def make_tokens(tag: str) -> Tokens:
    wrong = f"not-the-secret-{tag}-0123456789abcdef"
    now = int(time.time())
    return Tokens(
        query=token(f"q-{tag}"),
        header=token(f"h-{tag}"),
        admin=token(f"admin-{tag}", admin=True),
        bad_query=jwt.encode({"sub": f"mallory-{tag}", "exp": now + 600}, wrong, "HS256"),
        bad_header=jwt.encode({"sub": f"eve-{tag}", "exp": now + 600}, wrong, "HS256"),
        expired=token(f"late-{tag}", ttl=-3600),
        garbage=f"garbage-token-{tag}-{'x' * 24}",
        bad_refresh=jwt.encode({"sub": f"q-{tag}", "exp": now + 600}, wrong + "r", "HS256"),
    )


def secret_parts(value: str) -> list[str]:
    """The token, and each of its JWT segments long enough to be recognisable."""
    return [value, *(part for part in value.split(".") if len(part) >= 16)]


async def refused(http: aiohttp.ClientSession, url: str, **kwargs: Any) -> int:
    with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
        await http.ws_connect(url, **kwargs)
    return exc.value.status


async def traffic(host: Host, tokens: Tokens) -> None:
    room = "log-room"
    by_query = await Client.connect(host.ws, "q", token=tokens.query)
    session = by_query.welcome["session"]
    try:
        await by_query.join(room)
        await by_query.request("publish", "ack", room=room, data="hello")
        await by_query.send_raw("{not json")
        assert (await by_query.expect("error"))["code"] == "bad_request"
        await by_query.send(type="frobnicate")
        assert (await by_query.expect("error"))["code"] == "unknown_type"
        await by_query.send(type="publish", room="never-joined", data=1)
        assert (await by_query.expect("error"))["code"] == "not_joined"
        await by_query.send(type="refresh", token=tokens.bad_refresh)
        assert (await by_query.expect("error"))["code"] == "forbidden"
        await by_query.request("ping", "pong")

        async with aiohttp.ClientSession() as http:
            by_header = await http.ws_connect(host.ws, headers={"Authorization": f"Bearer {tokens.header}"})
            welcome = await by_header.receive_json(timeout=5)
            assert welcome["type"] == "welcome", welcome
            await by_header.close()

            assert await refused(http, host.ws, params={"token": tokens.bad_query}) == 401
            assert (
                await refused(http, host.ws, headers={"Authorization": f"Bearer {tokens.bad_header}"}) == 401
            )
            assert await refused(http, host.ws, params={"token": tokens.expired}) == 401
            assert await refused(http, host.ws, params={"token": tokens.garbage}) == 401

            for path in ("/admin/ring", "/dashboard/data", "/admin/drain"):
                async with http.get(
                    host.http + path,
                    params={"token": tokens.admin},
                    headers={"X-Forwarded-For": "203.0.113.9"},
                ) as resp:
                    assert resp.status == 200, (path, resp.status)
            async with http.get(
                host.http + "/admin/ring",
                headers={"Authorization": f"Bearer {tokens.admin}", "X-Forwarded-For": "203.0.113.9"},
            ) as resp:
                assert resp.status == 200
    finally:
        await by_query.close()
    # Resume the session, then leave for good: the host stops right after.
    again = await Client.connect(host.ws, "q", token=tokens.query, session=session)
    assert again.welcome["resumed"] is True
    # (A close before the resume's `joined` races the server's replay into a reset socket:
    # tests/test_abrupt_disconnect.py covers that.)
    await again.expect("joined", room=room)
    await again.close()


@dataclass
class Run:
    level: str
    host: Host
    tokens: Tokens
    text: str

    def lines(self) -> list[str]:
        return [line for line in self.text.splitlines() if line.strip()]

    def entries(self) -> list[dict[str, Any]]:
        found = []
        for line in self.lines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                found.append(entry)
        return found


@pytest.fixture(scope="module")
def runs() -> Iterator[dict[str, Run]]:
    redis = start_redis()
    try:
        done: dict[str, Run] = {}
        for level in LEVELS:
            host = start_host(
                f"log-{level}",
                redis.url,
                workers=WORKERS,
                args=("--log-format", "json", "--log-level", level),
            )
            try:
                tokens = make_tokens(level)
                asyncio.run(traffic(host, tokens))
                assert host.stop() == 0, host.log()
                done[level] = Run(level, host, tokens, host.log())
            finally:
                host.stop()
                host.log_path.unlink(missing_ok=True)
        yield done
    finally:
        redis.stop()


@pytest.mark.parametrize("level", LEVELS)
def test_every_line_is_one_json_object(runs: dict[str, Run], level: str) -> None:
    """Nothing else reaches the log: no plain-text line, no stray warning, no traceback."""
    run = runs[level]
    bad = [line for line in run.lines() if not _is_object(line)]
    assert not bad, "not JSON:\n" + "\n".join(bad)


def _is_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


@pytest.mark.parametrize("level", LEVELS)
def test_json_lines_carry_level_event_node_worker(runs: dict[str, Run], level: str) -> None:
    run = runs[level]
    entries = run.entries()
    assert len(entries) >= 5, run.text
    for entry in entries:
        assert entry.get("level") in LOG_LEVELS, entry
        assert isinstance(entry.get("event"), str) and entry["event"], entry
        assert entry.get("node") == run.host.node_id, entry
        assert entry.get("worker") in {"-", *map(str, range(WORKERS))}, entry
        assert isinstance(entry.get("logger"), str), entry
        if "conn" in entry:  # a connection id, where the log call names the connection
            assert isinstance(entry["conn"], str | int) and not isinstance(entry["conn"], bool), entry
    ours = [e for e in entries if e["logger"].split(".")[0] == "rtc"]
    # The supervisor ("-") and every worker speak, each under its own name.
    assert {e["worker"] for e in ours} == {"-", *map(str, range(WORKERS))}, ours
    assert any(e["logger"] == "rtc.supervisor" for e in ours)
    refusals = [e for e in ours if e["event"].startswith("handshake refused")]
    assert len(refusals) == 4, refusals  # one per refused upgrade, with the reason
    if level == "info":
        assert not [e for e in entries if e["level"] == "debug"], "debug lines at info"


@pytest.mark.parametrize("level", LEVELS)
def test_ordinary_traffic_logs_no_error(runs: dict[str, Run], level: str) -> None:
    """Bad frames, refused upgrades and clients that leave right after a resume are the
    clients' business: none of it is an error of the server."""
    errors = [e for e in runs[level].entries() if e["level"] in {"error", "critical"}]
    assert not errors, errors


@pytest.mark.parametrize("level", LEVELS)
def test_no_token_in_the_log(runs: dict[str, Run], level: str) -> None:
    run = runs[level]
    for name, value in run.tokens.all().items():
        for part in secret_parts(value):
            assert part not in run.text, f"the {name} token ({part[:12]}...) is in the log"


def test_access_log_redacts_tokens(runs: dict[str, Run]) -> None:
    """aiohttp's access log (on at debug) shows ``token=***`` wherever a token was."""
    access = {
        level: [e["event"] for e in run.entries() if e["logger"] == "aiohttp.access"]
        for level, run in runs.items()
    }
    for events in access.values():
        for event in events:
            for fragment in event.split("token=")[1:]:
                assert fragment.startswith("***"), event
    debug = access["debug"]
    for path in ("/ws", "/admin/ring", "/dashboard/data", "/admin/drain"):
        assert any(f'"GET {path}?token=***' in e for e in debug), (path, debug)
