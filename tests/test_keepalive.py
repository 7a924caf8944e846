"""Silent peers: one keep-alive sweep per worker pings them and cuts those that stay silent.

The sweep runs every half `--ws-heartbeat`; a socket silent for a whole half interval is
pinged, and cut when no frame (a pong or anything else) came half an interval later.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.rawws import OP_PING, OP_PONG, OP_TEXT, RawWS
from tests.rtcproc import Host, RedisServer, hosts, start_redis, token

pytestmark = pytest.mark.timeout(60)

HEARTBEAT = 1.0  # sweeps every 0.5 s: a pong has that long even on a busy machine


@pytest.fixture(scope="module")
def host(redis_server: RedisServer) -> Iterator[Host]:
    with hosts(("keepalive", redis_server.url), workers=1, args=("--ws-heartbeat", str(HEARTBEAT))) as (
        started,
    ):
        yield started


def _welcomed(host: Host, user: str, **params: str) -> tuple[RawWS, dict[str, object]]:
    ws = RawWS.open(host, token=token(user), params=params, timeout=10)
    return ws, ws.frames_until("welcome")[-1]


def _answer_pings(ws: RawWS, pings: int) -> None:
    """Answer the next `pings` keep-alive pings (each must come: a cut socket fails here)."""
    for _ in range(pings):
        opcode, payload = ws.recv_frame()
        assert opcode == OP_PING
        ws.send_frame(OP_PONG, payload)


def _answer_pings_then_still_served(ws: RawWS, pings: int, probe: str) -> None:
    """Answer the next `pings` keep-alive pings, then show the socket is still served."""
    _answer_pings(ws, pings)
    ws.send_json(type="ping", id=probe)
    assert ws.frames_until("pong")[-1] == {"type": "pong", "id": probe}


def test_a_silent_peer_is_pinged_then_cut_without_a_close_frame(host: Host) -> None:
    ws, _ = _welcomed(host, "silent")
    try:
        assert ws.recv_frame()[0] == OP_PING
        outcome, frames = ws.close_outcome(timeout=10)
        assert outcome in ("eof", "reset"), outcome  # a dead peer reads nothing: no close frame
        assert frames == []
    finally:
        ws.close()


def test_a_peer_that_answers_the_pings_stays_connected(host: Host) -> None:
    ws, _ = _welcomed(host, "answering")
    try:
        _answer_pings_then_still_served(ws, 4, "still-here")  # two whole intervals
    finally:
        ws.close()


def test_a_peer_that_keeps_sending_is_never_pinged(host: Host) -> None:
    ws, _ = _welcomed(host, "chatty")
    try:
        end = time.monotonic() + 3 * HEARTBEAT
        sent = 0
        while time.monotonic() < end:
            ws.send_json(type="ping", id=sent)
            opcode, _ = ws.recv_frame()
            assert opcode == OP_TEXT, opcode  # its pong, never a keep-alive ping
            sent += 1
            time.sleep(HEARTBEAT / 4)  # the client's own pace: a frame every quarter interval
        assert sent >= 8
    finally:
        ws.close()


def test_a_clients_ping_gets_a_pong_with_its_payload(host: Host) -> None:
    ws, _ = _welcomed(host, "asking")
    try:
        ws.send_frame(OP_PING, b"are you there")
        assert ws.recv_frame() == (OP_PONG, b"are you there")
    finally:
        ws.close()


def test_a_ping_before_the_resume_positions_is_answered_and_the_positions_still_count(host: Host) -> None:
    ws, welcome = _welcomed(host, "resumer")
    ws.send_json(type="join", room="kept", id=1)
    assert ws.frames_until("joined")[-1]["room"] == "kept"
    ws.close()
    back, again = _welcomed(host, "resumer", session=str(welcome["session"]), positions="1")
    try:
        assert again["resumed"] is True and "kept" in again["rooms"], again  # type: ignore[operator]
        back.send_frame(OP_PING, b"first")
        back.send_json(type="resume", rooms={"kept": 0})
        assert back.recv_frame() == (OP_PONG, b"first")
        joined = {}
        while "kept" not in joined:
            frames = back.frames_until("joined")
            assert all(frame["type"] != "error" for frame in frames), frames
            joined[frames[-1]["room"]] = frames[-1]
        assert joined["kept"]["seq"] == 0
    finally:
        back.close()


def test_a_pong_while_the_server_waits_for_the_resume_positions_counts(host: Host) -> None:
    """The keep-alive's pings can reach a resuming client before it sent its positions: its
    pongs, and the positions, are frames heard like any other (it is not cut meanwhile,
    nor after)."""
    ws, welcome = _welcomed(host, "slow-resumer")
    ws.close()
    back, _ = _welcomed(host, "slow-resumer", session=str(welcome["session"]), positions="1")
    try:
        _answer_pings(back, 2)  # silent but for its pongs: positions not sent for an interval
        back.send_json(type="resume", rooms={})
        back.frames_until("joined")  # its inbox
        _answer_pings_then_still_served(back, 2, "kept")  # a whole interval more
    finally:
        back.close()


def test_a_client_whose_command_waits_on_a_stalled_redis_is_not_cut() -> None:
    """Its frames are not read while its join waits: the silence is the server's, not the
    client's, and is not counted (the stall lasts over twice the time to a cut)."""
    redis = start_redis()
    try:
        with hosts(("patient", redis.url), workers=1, args=("--ws-heartbeat", str(HEARTBEAT))) as (host,):
            ws, _ = _welcomed(host, "patient")
            try:
                redis.cli("CLIENT", "PAUSE", str(int(HEARTBEAT * 2500)), "WRITE")  # the join's script waits
                ws.send_json(type="join", room="stalled", id="j")
                assert ws.frames_until("joined")[-1]["room"] == "stalled"
            finally:
                ws.close()
    finally:
        redis.stop()
