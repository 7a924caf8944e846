"""The Redis broker against a real redis-server: scripts, history, membership, pub/sub."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest

from rtc import keys
from rtc.broker import RedisBroker
from rtc.broker.base import Unsequenced
from rtc.protocol import message_halves
from tests.rtcproc import RedisServer

pytestmark = pytest.mark.timeout(30)


class Recorder:
    """A BrokerHandler that keeps what pub/sub delivered."""

    def __init__(self) -> None:
        self.messages: asyncio.Queue[tuple[bytes, bytes]] = asyncio.Queue()
        self.resubscribed: list[bytes] = []
        self.came_back = asyncio.Event()

    def on_channel_message(self, channel: bytes, payload: bytes) -> None:
        self.messages.put_nowait((channel, payload))

    def on_resubscribed(self, channel: bytes) -> None:
        self.resubscribed.append(channel)
        self.came_back.set()


@pytest.fixture
async def broker(fresh_redis: RedisServer) -> AsyncIterator[tuple[RedisBroker, Recorder]]:
    recorder = Recorder()
    broker = RedisBroker(fresh_redis.url, recorder, "0")
    await broker.start()
    yield broker, recorder
    await broker.close()


def item(room: str, text: str, dedup: str | None = None) -> Unsequenced:
    head, tail = message_halves(room, "u", orjson.dumps(text), 1000)
    return Unsequenced(head, tail, 1000, dedup)


async def test_two_brokers_sequencing_one_room_never_share_a_seq(fresh_redis: RedisServer) -> None:
    """Both believe they own the room (a stale ring): Redis still hands out 1..N once each."""
    brokers = [RedisBroker(fresh_redis.url, Recorder(), str(i)) for i in range(2)]
    for b in brokers:
        await b.start()
    try:
        results = await asyncio.gather(
            *(
                b.sequence("contested", [item("contested", f"{i}-{n}") for n in range(5)], 1000, 60)
                for i in range(20)
                for b in brokers
            )
        )
        seqs = sorted(s for r in results for s in r.seqs)
        assert seqs == list(range(1, 201))
        assert len({r.epoch for r in results}) == 1
    finally:
        for b in brokers:
            await b.close()


async def test_sequence_publishes_spliced_frames_and_keeps_history(
    broker: tuple[RedisBroker, Recorder],
) -> None:
    b, recorder = broker
    await b.subscribe(keys.room_channel("r"))
    result = await b.sequence("r", [item("r", "a"), item("r", "b")], 1000, 60)
    assert result.seqs == [1, 2]
    channel, payload = await asyncio.wait_for(recorder.messages.get(), 5)
    assert channel == keys.room_channel("r").encode()
    records = payload.split(b"\n")
    assert [r.split(b" ", 2)[0] for r in records] == [b"1", b"2"]
    frame = orjson.loads(records[1].split(b" ", 2)[2])
    assert frame == {"type": "message", "room": "r", "seq": 2, "from": "u", "data": "b", "ts": 1000}
    history = await b.history("r", 0, 2)
    assert [seq for seq, _ in history] == [1, 2]
    assert orjson.loads(history[0][1])["data"] == "a"
    assert await b.history("r", 1, 2) == history[1:]


async def test_retry_with_the_same_dedup_key_is_sequenced_once(broker: tuple[RedisBroker, Recorder]) -> None:
    b, _ = broker
    first = await b.sequence("d", [item("d", "x", dedup="sess:1")], 1000, 60)
    again = await b.sequence("d", [item("d", "x", dedup="sess:1"), item("d", "y", dedup="sess:2")], 1000, 60)
    assert first.seqs == [1] and again.seqs == [1, 2]
    assert [seq for seq, _ in await b.history("d", 0, 10)] == [1, 2]


async def test_history_is_bounded_by_size(broker: tuple[RedisBroker, Recorder]) -> None:
    b, _ = broker
    for n in range(12):
        await b.sequence("small", [item("small", str(n))], 5, 60)
    assert [seq for seq, _ in await b.history("small", 0, 12)] == [8, 9, 10, 11, 12]


async def test_history_reads_a_page_at_a_time(broker: tuple[RedisBroker, Recorder]) -> None:
    b, _ = broker
    for n in range(7):
        await b.sequence("paged", [item("paged", str(n))], 100, 60)
    assert [seq for seq, _ in await b.history("paged", 0, 7, limit=3)] == [1, 2, 3]
    assert [seq for seq, _ in await b.history("paged", 3, 7, limit=3)] == [4, 5, 6]
    assert [seq for seq, _ in await b.history("paged", 6, 7, limit=3)] == [7]


async def test_epoch_changes_when_redis_loses_the_room(
    broker: tuple[RedisBroker, Recorder], fresh_redis: RedisServer
) -> None:
    b, _ = broker
    seq, epoch = await b.open_room("e", 60)
    assert seq == 0
    await b.sequence("e", [item("e", "1")], 1000, 60)
    assert (await b.open_room("e", 60)) == (1, epoch)
    fresh_redis.cli("FLUSHALL")
    seq2, epoch2 = await b.open_room("e", 60)
    assert seq2 == 0 and epoch2 != epoch
    assert (await b.sequence("e", [item("e", "again")], 1000, 60)).seqs == [1]


async def test_members_presence_and_dead_slots(
    broker: tuple[RedisBroker, Recorder], fresh_redis: RedisServer
) -> None:
    b, recorder = broker
    await b.subscribe(keys.room_channel("m"))
    assert await b.join("m", "h:0", "alice", b'{"p":"alice"}', 100, 15) == 1
    await b.join("m", "h:1", "alice", b'{"p":"alice again"}', 100, 15)
    await b.join("m", "h:1", "bob", b'{"p":"bob"}', 100, 15)
    announced = [(await asyncio.wait_for(recorder.messages.get(), 5))[1] for _ in range(2)]
    assert announced == [b'0 0 {"p":"alice"}', b'0 0 {"p":"bob"}']  # alice announced once
    assert await b.members("m", 1000) == (2, ["alice", "bob"])
    assert await b.members("m", 1) == (2, ["alice"])
    assert await b.leave("m", "h:0", "alice", 0, 15) is True
    assert await b.sweep("m", (b"<", b">"), 100) == []  # still on h:1
    await b.join("m", "h:0", "carol", b'{"p":"carol"}', 100, 15)
    assert await b.leave("m", "h:0", "carol", 60_000, 15) is True
    fresh_redis.cli("DEL", keys.members("m", "h:1"))  # h:1 died: its key expired
    assert sorted(await b.sweep("m", (b"<", b">"), 100)) == ["alice", "bob"]  # carol: not due
    announced = {(await asyncio.wait_for(recorder.messages.get(), 5))[1] for _ in range(3)}
    assert announced == {b'0 0 {"p":"carol"}', b'0 0 <"alice">', b'0 0 <"bob">'}
    assert await b.members("m", 1000) == (0, [])
    assert fresh_redis.cli("SMEMBERS", keys.member_slots("m")).split() == []  # dead slots pruned
    assert fresh_redis.cli("HKEYS", keys.presence("m")).split() == ["carol"]


async def test_refresh_puts_back_the_membership_redis_lost(
    broker: tuple[RedisBroker, Recorder], fresh_redis: RedisServer
) -> None:
    """A refresh renews the keys, restores a lost slot's users silently, and keeps live counts."""
    b, recorder = broker
    await b.subscribe(keys.room_channel("r"))
    await b.join("r", "h:0", "alice", b"alice", 100, 15)
    await b.join("r", "h:0", "alice", b"alice", 100, 15)
    await b.join("r", "h:1", "bob", b"bob", 100, 15)
    announced = [(await asyncio.wait_for(recorder.messages.get(), 5))[1] for _ in range(2)]
    assert announced == [b"0 0 alice", b"0 0 bob"]
    assert await b.refresh_members("h:0", {"r": {"alice": 2}}, 9) == 0  # nothing lost
    assert 0 < int(fresh_redis.cli("TTL", keys.members("r", "h:0"))) <= 9
    fresh_redis.cli("FLUSHALL")  # a restart without persistence
    assert await b.members("r", 1000) == (0, [])
    restated = await asyncio.gather(
        b.refresh_members("h:0", {"r": {"alice": 2}}, 15),
        b.refresh_members("h:1", {"r": {"bob": 1}}, 15),
    )
    assert restated == [1, 1]
    assert await b.members("r", 1000) == (2, ["alice", "bob"])
    assert fresh_redis.cli("HGET", keys.members("r", "h:0"), "alice").strip() == "2"
    assert sorted(fresh_redis.cli("HKEYS", keys.presence("r")).split()) == ["alice", "bob"]
    for key in (keys.members("r", "h:0"), keys.member_slots("r"), keys.presence("r")):
        assert 0 < int(fresh_redis.cli("TTL", key)) <= 15, key
    await b.join("r", "h:0", "carol", b"carol", 100, 15)
    # The restored users were not announced again: carol's join is the next event.
    assert (await asyncio.wait_for(recorder.messages.get(), 5))[1] == b"0 0 carol"
    # A full Redis refuses new data, but a refresh with nothing lost still renews the TTLs.
    fresh_redis.cli("CONFIG", "SET", "maxmemory", "1")
    try:
        assert await b.refresh_members("h:0", {"r": {"alice": 2, "carol": 1}}, 12) == 0
        assert 10 <= int(fresh_redis.cli("TTL", keys.members("r", "h:0"))) <= 12
    finally:
        fresh_redis.cli("CONFIG", "SET", "maxmemory", "0")


async def test_commands_issued_together_run_in_issue_order_and_nothing_more(
    broker: tuple[RedisBroker, Recorder], fresh_redis: RedisServer
) -> None:
    """A connect storm's small commands are pipelined, and a leave issued after a join (not
    awaited in between) still runs after it: the counts come out as issued."""
    b, _ = broker
    await b.leave("warm", "h:0", "carol", 0, 15)  # a fresh Redis refuses the first EVALSHA: scripts load
    before = fresh_redis.calls()
    results = await asyncio.gather(
        b.join("o", "h:0", "carol", b"j", 0, 15),
        b.leave("o", "h:0", "carol", 0, 15),
        b.join("o", "h:0", "carol", b"j", 0, 15),
        b.save_sessions({"s1": {"user": "carol"}, "s2": {"user": "dan"}}, 60),
        b.load_session("s1"),
    )
    assert results[:3] == [1, True, 1]
    assert results[4] == {"user": "carol"}
    assert fresh_redis.cli("HGET", keys.members("o", "h:0"), "carol").strip() == "1"
    # Exactly the commands asked for (a script's own commands count too, so not those).
    after = fresh_redis.calls()
    assert {c: after[c] - before.get(c, 0) for c in ("evalsha", "hset", "hgetall")} == {
        "evalsha": 3,
        "hset": 2,
        "hgetall": 1,
    }


async def test_a_burst_of_channel_messages_arrives_complete_and_in_order(
    broker: tuple[RedisBroker, Recorder],
) -> None:
    """Messages that arrive in one socket read are taken from the parser's buffer at once."""
    b, recorder = broker
    channels = [keys.room_channel(f"burst-{n}") for n in range(50)]
    await asyncio.gather(*(b.subscribe(c) for c in channels))
    sent = [(channels[n % 50], b"%d" % n) for n in range(3000)]
    assert await b.publish_many(sent) == [1] * 3000
    got = [await asyncio.wait_for(recorder.messages.get(), 5) for _ in range(3000)]
    assert got == [(c.encode(), payload) for c, payload in sent]


async def test_a_killed_command_connection_is_reconnected_and_the_batch_sent_again(
    broker: tuple[RedisBroker, Recorder], fresh_redis: RedisServer
) -> None:
    b, _ = broker
    await b.save_sessions({"s1": {"user": "carol"}}, 60)
    assert (
        int(fresh_redis.cli("CLIENT", "KILL", "TYPE", "normal")) >= 1
    )  # both lanes' connections (not pub/sub)
    assert await b.load_session("s1") == {"user": "carol"}
    assert await b.publish_many([(keys.room_channel("nobody"), b"x")]) == [0]


async def test_unsubscriptions_are_one_command_and_keep_their_order_with_subscriptions(
    broker: tuple[RedisBroker, Recorder], fresh_redis: RedisServer
) -> None:
    """The idle sweep after a mass disconnect ends thousands of subscriptions at once; one
    of them subscribed again in the same turn stays subscribed (and hears a publish)."""
    b, recorder = broker
    channels = [keys.room_channel(f"idle-{n}") for n in range(300)]
    await asyncio.gather(*map(b.subscribe, channels))
    before = fresh_redis.calls()
    await asyncio.gather(b.unsubscribe(*channels), b.subscribe(channels[7]))
    assert fresh_redis.calls()["unsubscribe"] - before.get("unsubscribe", 0) == 1
    assert fresh_redis.cli("PUBSUB", "CHANNELS", "*idle-*").split() == [channels[7]]
    assert await b.publish_many([(channels[7], b"still here")]) == [1]
    assert await asyncio.wait_for(recorder.messages.get(), 5) == (channels[7].encode(), b"still here")


async def test_ring_heartbeats_and_duplicate_slot(broker: tuple[RedisBroker, Recorder]) -> None:
    from rtc.broker import SlotTaken

    b, _ = broker
    assert await b.heartbeat("n:0", "instance-a", 3000) == ["n:0"]
    assert await b.heartbeat("n:1", "instance-a", 3000) == ["n:0", "n:1"]
    with pytest.raises(SlotTaken):
        await b.heartbeat("n:0", "instance-b", 3000)
    await b.leave_ring("n:0")
    assert await b.live_slots() == ["n:1"]


async def test_killed_pubsub_connection_is_reestablished_and_reported(
    broker: tuple[RedisBroker, Recorder], fresh_redis: RedisServer
) -> None:
    b, recorder = broker
    channel = keys.room_channel("k")
    await b.subscribe(channel)
    fresh_redis.cli("CLIENT", "KILL", "TYPE", "pubsub")
    await asyncio.wait_for(recorder.came_back.wait(), 10)
    assert recorder.resubscribed == [channel.encode()]
    assert await b.publish_many([(channel, b"after")]) == [1]
    assert (await asyncio.wait_for(recorder.messages.get(), 5))[1] == b"after"


async def test_many_rooms_sequence_in_one_script_call_even_after_a_script_flush(
    broker: tuple[RedisBroker, Recorder], fresh_redis: RedisServer
) -> None:
    b, _ = broker
    batches = {f"room{i}": [item(f"room{i}", "a"), item(f"room{i}", "b")] for i in range(5)}
    first = await b.sequence_many(batches, 1000, 60)
    assert {room: r.seqs for room, r in first.items() if not isinstance(r, Exception)} == {
        room: [1, 2] for room in batches
    }
    fresh_redis.cli("SCRIPT", "FLUSH")  # as after a Redis restart: the scripts are gone
    again = await b.sequence_many(batches, 1000, 60)
    assert {room: r.seqs for room, r in again.items() if not isinstance(r, Exception)} == {
        room: [3, 4] for room in batches
    }
    # On one server, one script call sequences every room of the turn (and the dedup keys
    # of each room stay with it: a retried id gets its earlier seq back).
    before = fresh_redis.calls()
    retried = {room: [item(room, "c", dedup="x"), item(room, "d")] for room in batches}
    third = await b.sequence_many(retried, 1000, 60)
    assert fresh_redis.calls()["evalsha"] - before["evalsha"] == 1
    assert {room: r.seqs for room, r in third.items() if not isinstance(r, Exception)} == {
        room: [5, 6] for room in batches
    }
    fourth = await b.sequence_many({"room0": [item("room0", "c", dedup="x")]}, 1000, 60)
    assert not isinstance(fourth["room0"], Exception) and fourth["room0"].seqs == [5]
