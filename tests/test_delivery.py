"""Local delivery against a real host: holes in pub/sub are filled from history, and a
history read that fails for a while is retried, not announced as a loss."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
import pytest

from rtc import keys
from tests.client import Client
from tests.rtcproc import Host, RedisServer, until

pytestmark = pytest.mark.timeout(60)

ROOM = "fill-room"


def sequence_silently(redis: RedisServer, room: str) -> int:
    """Sequence a message into history without publishing it: pub/sub 'lost' it."""
    seq = int(redis.cli("HINCRBY", keys.room_meta(room), "seq", "1"))
    frame = orjson.dumps({"type": "message", "room": room, "seq": seq, "from": "ghost", "data": seq, "ts": 0})
    redis.cli("XADD", keys.room_history(room), f"{seq}-1", "f", frame.decode())
    return seq


@pytest.fixture
async def room(host_and_redis: tuple[RedisServer, Host]) -> AsyncIterator[tuple[Client, Client, int]]:
    """alice and a publisher in ROOM, and a seq pub/sub 'lost' (in history, never published)."""
    redis, host = host_and_redis
    alice = await Client.connect(host.ws, "alice")
    publisher = await Client.connect(host.ws, "publisher")
    try:
        await alice.join(ROOM)
        await publisher.join(ROOM)
        yield alice, publisher, sequence_silently(redis, ROOM)
    finally:
        await alice.close()
        await publisher.close()


async def test_a_history_read_that_fails_for_a_while_is_retried_not_a_gap(
    host_and_redis: tuple[RedisServer, Host], room: tuple[Client, Client, int]
) -> None:
    redis, host = host_and_redis
    alice, publisher, lost = room
    failure = f"history read for {ROOM} failed"
    failed_before = host.log().count(failure)
    redis.cli("ACL", "SETUSER", "default", "-xrange")  # history reads fail from here
    try:
        await publisher.send(type="publish", room=ROOM, data="after")
        await publisher.expect("ack", room=ROOM, seq=lost + 1)
        await until(
            lambda: host.log().count(failure) >= failed_before + 2,
            10,
            "the fill to fail twice (its log lines)",
        )
        assert not [f for f in alice.seen if f["type"] in ("message", "gap")], alice.seen
    finally:
        redis.cli("ACL", "SETUSER", "default", "+xrange")
    messages = await alice.wait_messages(ROOM, 2, timeout=10)
    assert [m["seq"] for m in messages] == [lost, lost + 1]
    assert messages[0]["from"] == "ghost"
    assert not [f for f in alice.seen if f["type"] == "gap"]


async def test_seqs_history_no_longer_holds_are_announced_as_a_gap(
    host_and_redis: tuple[RedisServer, Host], room: tuple[Client, Client, int]
) -> None:
    redis, _ = host_and_redis
    alice, publisher, lost = room
    redis.cli("XTRIM", keys.room_history(ROOM), "MAXLEN", "0")  # and history dropped it
    await publisher.send(type="publish", room=ROOM, data="after")
    gap = await alice.expect("gap", room=ROOM)
    assert (gap["from"], gap["to"]) == (lost, lost)
    message = await alice.expect("message", room=ROOM)
    assert message["seq"] == lost + 1
