"""The load generator's reading of rtc frames: what it counts, times and checks."""

from __future__ import annotations

import orjson

from bench.loadgen.protocols import Kind, RtcProtocol


def _decode(frame: dict[str, object], user: str = "u1") -> tuple[Kind, str, int]:
    decoded = RtcProtocol().decode(orjson.dumps(frame).decode(), user)
    return decoded.kind, decoded.key, decoded.seq


def test_presence_events_are_counted_apart_from_other_frames() -> None:
    for event in ("join", "leave"):
        frame = {"type": "presence", "room": "r", "user": "u2", "event": event}
        assert _decode(frame)[0] is Kind.EVENT
    assert _decode({"type": "members", "room": "r", "users": [], "count": 0})[0] is Kind.OTHER


def test_room_and_direct_deliveries_carry_their_stream_and_seq() -> None:
    message = {"type": "message", "room": "r", "seq": 7, "ts": 1.0, "data": {"t": 0.5}}
    assert _decode(message) == (Kind.DELIVERY, "r", 7)
    direct = {"type": "direct", "from": "u2", "seq": 3, "ts": 1.0, "data": {}}
    assert _decode(direct, user="u1") == (Kind.DELIVERY, "@u1", 3)


def test_a_welcome_says_whether_the_session_was_resumed() -> None:
    fresh = {"type": "welcome", "session": "s1", "user": "u1", "node": "a", "resumed": False}
    assert _decode(fresh) == (Kind.READY, "s1", 0)
    assert _decode(fresh | {"resumed": True}) == (Kind.READY, "s1", 1)
