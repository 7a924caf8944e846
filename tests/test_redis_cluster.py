"""rtc on a real Redis Cluster: the cluster broker, then two hosts sharing a 3-master cluster."""

from __future__ import annotations

import asyncio
import itertools
import signal
from collections.abc import AsyncIterator, Iterator

import orjson
import pytest
from redis.cluster import RedisCluster as SyncCluster

from rtc import keys
from rtc.broker import ClusterBroker, SlotTaken
from tests.client import Client
from tests.rediscluster import RedisCluster, redis_cluster
from tests.rtcproc import hosts, settle_ring
from tests.test_broker import Recorder, item
from tests.test_config import config_error, settings

pytestmark = pytest.mark.timeout(60)

FAST = ("--rate", "1000", "--rate-burst", "1000")


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    with redis_cluster(masters=3) as started:
        yield started


@pytest.fixture(scope="module")
def inspector(cluster: RedisCluster) -> Iterator[SyncCluster]:
    """A plain redis-py cluster client, to see where keys live and what is stored."""
    client = SyncCluster(host="127.0.0.1", port=cluster.nodes[0].port)
    yield client
    client.close()


def spread(inspector: SyncCluster, prefix: str, per_node: int = 1) -> list[str]:
    """Room names whose keys (and channel) live on every master, `per_node` rooms each."""
    found: dict[str, list[str]] = {n.name: [] for n in inspector.get_primaries()}
    for n in itertools.count():
        room = f"{prefix}{n}"
        node = inspector.get_node_from_key(keys.room_meta(room))
        assert node is not None
        if len(found[node.name]) < per_node:
            found[node.name].append(room)
        if all(len(rooms) == per_node for rooms in found.values()):
            return [room for rooms in found.values() for room in rooms]
    raise AssertionError("unreachable")


async def start_broker(cluster: RedisCluster, name: str) -> tuple[ClusterBroker, Recorder]:
    recorder = Recorder()
    broker = ClusterBroker([f"redis://127.0.0.1:{cluster.nodes[0].port}"], recorder, name)
    await broker.start()
    return broker, recorder


@pytest.fixture
async def pair(cluster: RedisCluster) -> AsyncIterator[list[tuple[ClusterBroker, Recorder]]]:
    """Two brokers, as two workers (on two hosts) would have."""
    started = [await start_broker(cluster, str(i)) for i in range(2)]
    yield started
    for broker, _ in started:
        await broker.close()


async def received(recorder: Recorder, count: int) -> dict[bytes, list[bytes]]:
    """The next `count` channel messages, by channel."""
    by_channel: dict[bytes, list[bytes]] = {}
    for _ in range(count):
        channel, payload = await asyncio.wait_for(recorder.messages.get(), 5)
        by_channel.setdefault(channel, []).append(payload)
    return by_channel


# -- settings ----------------------------------------------------------------------------------


def test_cluster_seeds_are_redis_urls_and_exclude_a_single_server() -> None:
    chosen = settings("--redis-cluster", "redis://10.0.0.1:7000, redis://:secret@10.0.0.2")
    assert chosen.redis_cluster == ("redis://10.0.0.1:7000", "redis://:secret@10.0.0.2")
    assert not chosen.embedded_redis and not chosen.demo
    for bad in ("rediss://h:7000", "redis://h:port", "redis://h:7000/2", "redis://:7000"):
        assert config_error("--redis-cluster", bad).startswith("--redis-cluster"), bad
    both = config_error("--redis-cluster", "redis://h:7000", "--redis-url", "redis://h:6379")
    assert both.startswith("--redis-cluster")


# -- broker ----------------------------------------------------------------------------------


async def test_rooms_on_every_node_are_sequenced_gap_free_by_two_brokers(
    pair: list[tuple[ClusterBroker, Recorder]], inspector: SyncCluster
) -> None:
    rooms = spread(inspector, "seq-")
    (a, _), (b, _) = pair
    results = await asyncio.gather(
        *(
            broker.sequence(room, [item(room, f"{i}-{n}") for n in range(4)], 1000, 60)
            for room in rooms
            for i in range(10)
            for broker in (a, b)
        )
    )
    for index, room in enumerate(rooms):
        mine = results[index * 20 : (index + 1) * 20]
        assert sorted(s for r in mine for s in r.seqs) == list(range(1, 81)), room
        assert len({r.epoch for r in mine}) == 1
        history = await b.history(room, 0, 80)
        assert [seq for seq, _ in history] == list(range(1, 81))
        assert orjson.loads(history[-1][1])["seq"] == 80
        assert (await a.open_room(room, 60))[0] == 80


async def test_sequenced_frames_fan_out_over_sharded_channels(
    pair: list[tuple[ClusterBroker, Recorder]], inspector: SyncCluster
) -> None:
    rooms = spread(inspector, "fan-")
    (a, _), (b, recorder) = pair
    for room in rooms:
        await b.subscribe(keys.room_channel(room))
    for room in rooms:
        assert (await a.sequence(room, [item(room, "x"), item(room, "y")], 1000, 60)).seqs == [1, 2]
    by_channel = await received(recorder, len(rooms))
    for room in rooms:
        (payload,) = by_channel[keys.room_channel(room).encode()]
        assert [record.split(b" ", 2)[0] for record in payload.split(b"\n")] == [b"1", b"2"]
    # a publish nobody listens to counts 0; a sharded channel with a listener counts it
    inbox, control = keys.slot_inbox("b:0"), keys.host_control("b")
    await b.subscribe(inbox)
    await b.subscribe(control)
    assert await a.publish_many(
        [(inbox, b"f1"), (keys.slot_inbox("gone:0"), b"lost"), (control, b"drain"), (inbox, b"f2")]
    ) == [1, 0, 1, 1]
    assert await received(recorder, 3) == {inbox.encode(): [b"f1", b"f2"], control.encode(): [b"drain"]}
    await b.unsubscribe(inbox)
    assert await a.publish_many([(inbox, b"late")]) == [0]
    # channels on every node and many slots end together (one SUNSUBSCRIBE per slot)
    channels = [keys.room_channel(room) for room in rooms]
    await b.unsubscribe(*channels)
    assert await a.publish_many([(channel, b"late") for channel in channels]) == [0] * len(channels)


async def test_a_storm_of_first_subscriptions_is_confirmed_on_every_node(
    cluster: RedisCluster, inspector: SyncCluster
) -> None:
    """Hundreds of channels subscribed at once, before any node's pub/sub connection exists
    (a connect storm right after start): every one is confirmed and receives."""
    broker, recorder = await start_broker(cluster, "storm")
    publisher, _ = await start_broker(cluster, "publisher")
    try:
        rooms = [f"storm-{n}" for n in range(300)]
        channels = [keys.room_channel(room) for room in rooms]
        await asyncio.wait_for(asyncio.gather(*(broker.subscribe(c) for c in channels)), 10)
        assert await publisher.publish_many([(c, b"hi") for c in channels]) == [1] * len(channels)
        by_channel = await received(recorder, len(channels))
        assert by_channel == {c.encode(): [b"hi"] for c in channels}
        assert len({inspector.get_node_from_key(c).name for c in channels}) == 3  # every node
    finally:
        await broker.close()
        await publisher.close()


async def test_dedup_history_bound_and_epoch(
    pair: list[tuple[ClusterBroker, Recorder]], inspector: SyncCluster
) -> None:
    (a, _), (b, _) = pair
    room = spread(inspector, "dedup-")[-1]
    first = await a.sequence(room, [item(room, "x", dedup="s:1")], 3, 60)
    again = await b.sequence(
        room,
        [item(room, "x", dedup="s:1"), item(room, "y", dedup="s:2"), item(room, "z"), item(room, "w")],
        3,
        60,
    )
    assert first.seqs == [1] and again.seqs == [1, 2, 3, 4] and first.epoch == again.epoch
    assert [seq for seq, _ in await a.history(room, 0, 4)] == [2, 3, 4]
    inspector.delete(keys.room_meta(room))  # the room's node lost its data
    assert (await b.open_room(room, 60))[1] != first.epoch


async def test_members_and_presence_across_slots(
    pair: list[tuple[ClusterBroker, Recorder]], inspector: SyncCluster
) -> None:
    (a, _), (b, recorder) = pair
    for room in spread(inspector, "mem-"):
        channel = keys.room_channel(room).encode()
        await b.subscribe(channel.decode())
        assert await a.join(room, "h1:0", "carol", b'{"p":"carol"}', 100, 15) == 1
        await b.join(room, "h2:1", "carol", b'{"p":"again"}', 100, 15)
        await b.join(room, "h2:1", "dave", b'{"p":"dave"}', 100, 15)
        events = await received(recorder, 2)
        assert events == {channel: [b'0 0 {"p":"carol"}', b'0 0 {"p":"dave"}']}
        assert await a.members(room, 1000) == (2, ["carol", "dave"])
        assert await b.leave(room, "h2:1", "carol", 0, 15) is True
        assert await a.sweep(room, (b"<", b">"), 100) == []  # still on h1:0
        assert await a.refresh_members("h1:0", {room: {"carol": 1}}, 7) == 0  # nothing lost
        assert 0 < inspector.ttl(keys.members(room, "h1:0")) <= 7  # type: ignore[operator]
        assert 0 < inspector.ttl(keys.presence(room)) <= 7  # type: ignore[operator]
        inspector.delete(keys.members(room, "h1:0"))  # h1:0 died: its key expired
        assert await b.sweep(room, (b"<", b">"), 100) == ["carol"]
        assert await received(recorder, 1) == {channel: [b'0 0 <"carol">']}
        assert await a.members(room, 1000) == (1, ["dave"])


async def test_ring_sessions_and_host_fields_span_nodes(
    pair: list[tuple[ClusterBroker, Recorder]], inspector: SyncCluster
) -> None:
    (a, _), (b, _) = pair
    # `rtc:ring` and `rtc:ring:owners` have no common tag: the heartbeat spans two nodes
    assert inspector.keyslot(keys.RING) != inspector.keyslot(keys.RING_OWNERS)
    await asyncio.gather(a.heartbeat("c1:0", "one", 3000), b.heartbeat("c2:0", "two", 3000))
    assert await a.live_slots() == ["c1:0", "c2:0"]
    with pytest.raises(SlotTaken):  # another host instance claims a live slot
        await b.heartbeat("c1:0", "two", 3000)
    for slot in ("c1:0", "c2:0"):
        await b.leave_ring(slot)
    assert await a.live_slots() == []
    sessions = {f"sid{n}": {"user": f"u{n}", "r:lobby": f"{n}:e"} for n in range(12)}
    await a.save_sessions(sessions, 60)
    assert await b.load_session("sid7") == {"user": "u7", "r:lobby": "7:e"}
    await b.drop_session_rooms("sid7", ["lobby"])
    assert await a.load_session("sid7") == {"user": "u7"}
    drain = keys.drain("c1", "one")
    await a.set_fields(drain, {"w:0": "done"}, 60)
    assert await b.get_fields(drain) == {"w:0": "done"}
    await b.delete(drain)
    assert await a.get_fields(drain) == {}
    assert await a.ping() is True


async def test_killed_pubsub_connections_are_reestablished_on_every_node(
    pair: list[tuple[ClusterBroker, Recorder]], cluster: RedisCluster, inspector: SyncCluster
) -> None:
    (a, _), (b, recorder) = pair
    channels = [keys.room_channel(room) for room in spread(inspector, "kill-")]
    for channel in channels:
        await b.subscribe(channel)
    for node in cluster.nodes:
        node.cli("CLIENT", "KILL", "TYPE", "pubsub")
    await resubscribed(recorder, *channels)
    assert sorted(recorder.resubscribed) == sorted(c.encode() for c in channels)
    assert await a.publish_many([(c, b"after") for c in channels]) == [1] * len(channels)
    assert await received(recorder, len(channels)) == {c.encode(): [b"after"] for c in channels}


async def resubscribed(recorder: Recorder, *channels: str) -> None:
    """Until the handler heard that each of `channels` was subscribed again."""
    async with asyncio.timeout(20):
        while not {c.encode() for c in channels} <= set(recorder.resubscribed):
            recorder.came_back.clear()
            await recorder.came_back.wait()


@pytest.fixture
def replicated() -> Iterator[RedisCluster]:
    with redis_cluster(masters=3, replicas=1) as started:
        yield started


async def test_failovers_move_subscriptions_to_the_new_primary(replicated: RedisCluster) -> None:
    """A replica takes over (asked to, then because its primary died): the channels the old
    primary served are subscribed on the new one, the handler hears of it, delivery goes on."""
    inspector = SyncCluster(host="127.0.0.1", port=replicated.nodes[0].port)
    broker, recorder = await start_broker(replicated, "fo")
    try:
        rooms = spread(inspector, "fo-")
        for room in rooms:
            await broker.subscribe(keys.room_channel(room))
        for room, take_over in zip(rooms, (_manual_failover, _kill_primary), strict=False):
            take_over(replicated, inspector, room)
            await resubscribed(recorder, keys.room_channel(room))
            result = await broker.sequence(room, [item(room, "after failover")], 1000, 60)
            payload = (await received(recorder, 1))[keys.room_channel(room).encode()][0]
            assert payload.startswith(b"%d " % result.seqs[0])
        assert sorted(recorder.resubscribed) == sorted(keys.room_channel(r).encode() for r in rooms[:2])
    finally:
        await broker.close()
        inspector.close()


def _primary(cluster: RedisCluster, inspector: SyncCluster, room: str) -> int:
    node = inspector.get_node_from_key(keys.room_meta(room))
    assert node is not None
    return int(node.port)


def _manual_failover(cluster: RedisCluster, inspector: SyncCluster, room: str) -> None:
    cluster.replica_of(_primary(cluster, inspector, room)).cli("CLUSTER", "FAILOVER")


def _kill_primary(cluster: RedisCluster, inspector: SyncCluster, room: str) -> None:
    cluster.node(_primary(cluster, inspector, room)).process.send_signal(signal.SIGKILL)


# -- two hosts ---------------------------------------------------------------------------------


async def test_two_hosts_on_a_cluster_deliver_every_message_once_in_order(
    cluster: RedisCluster, inspector: SyncCluster
) -> None:
    rooms = spread(inspector, "hall-", per_node=2)
    seeds = ",".join(f"redis://127.0.0.1:{n.port}" for n in cluster.nodes[:2])
    with hosts(("east", None), ("west", None), args=("--redis-cluster", seeds, *FAST)) as started:
        settle_ring(started)
        clients = [await Client.connect(started[i % 2].ws, f"user{i}") for i in range(8)]
        try:
            for client in clients:
                for room in rooms:
                    assert (await client.join(room))["seq"] == 0
            per_client = 5
            for n in range(per_client):
                await asyncio.gather(
                    *(c.send(type="publish", room=room, data=[c.user, n]) for c in clients for room in rooms)
                )
            total = per_client * len(clients)
            for client in clients:
                for room in rooms:
                    messages = await client.wait_messages(room, total, timeout=15)
                    assert [m["seq"] for m in messages] == list(range(1, total + 1)), (client.user, room)
                    for user in {c.user for c in clients}:
                        assert [m["data"][1] for m in messages if m["data"][0] == user] == list(
                            range(per_client)
                        )
            # One more message per room is the barrier: a duplicate of an earlier seq would be
            # delivered before it (a room's frames go out in seq order).
            for room in rooms:
                await clients[0].request("publish", "ack", room=room, data=["barrier", 0])
            for client in clients:
                for room in rooms:
                    await client.wait_messages(room, total + 1, timeout=15)
            assert all(len(c.messages(room)) == total + 1 for c in clients for room in rooms), "duplicates"
            assert {int(inspector.hget(keys.room_meta(room), "seq")) for room in rooms} == {total + 1}  # type: ignore[arg-type]

            await clients[0].send(type="direct", to="user1", data="east to west", id="d1")
            ack = await clients[0].expect("ack", id="d1")
            direct = await clients[1].expect("direct")
            assert (direct["from"], direct["seq"], direct["data"]) == ("user0", ack["seq"], "east to west")

            for room in rooms:
                listing = await clients[-1].request("members", "members", room=room)
                assert listing["users"] == sorted(c.user for c in clients) and listing["count"] == len(
                    clients
                )
            for host in started:
                assert host.get("/health")[0] == 200
        finally:
            await asyncio.gather(*(c.close() for c in clients))
