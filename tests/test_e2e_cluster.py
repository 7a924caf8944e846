"""Two real hosts, two workers each, one real Redis: routing across workers and hosts."""

from __future__ import annotations

import asyncio
import itertools
import json
import re

import pytest

from tests.client import Client
from tests.rtcproc import Host, hosts, metrics_written, start_redis, until, wait_for

pytestmark = pytest.mark.timeout(120)

MEMBERS = 40
PUBLISHERS = 4
PER_PUBLISHER = 25
FAST = ("--rate", "1000", "--rate-burst", "1000")  # the test sends faster than a person


def worker_connections(host: Host) -> dict[str, int]:
    _, text = host.get("/metrics", {"Accept": "text/plain"})
    found = re.findall(rb'^rtc_connections\{worker="(\d+)"\} (\S+)$', text, re.M)
    return {w.decode(): int(float(v)) for w, v in found}


async def connect_spread(cluster: list[Host], count: int, prefix: str) -> list[Client]:
    """Connect until every worker of every host has members (the kernel spreads by hash)."""
    clients = [await Client.connect(cluster[i % 2].ws, f"{prefix}{i}") for i in range(count)]
    for host in cluster:
        per_worker = worker_connections(host)
        assert len(per_worker) == 2 and all(per_worker.values()), per_worker
    return clients


async def test_room_messages_reach_every_member_once_in_one_order(cluster: list[Host]) -> None:
    clients = await connect_spread(cluster, MEMBERS, "member")
    try:
        for client in clients:
            joined = await client.join("lobby")
            assert joined["recovered"] is True
        publishers = clients[:PUBLISHERS]

        async def publish(client: Client, index: int) -> None:
            for n in range(PER_PUBLISHER):
                await client.send(type="publish", room="lobby", data={"p": index, "n": n}, id=f"{index}-{n}")

        await asyncio.gather(*(publish(c, i) for i, c in enumerate(publishers)))
        total = PUBLISHERS * PER_PUBLISHER
        base = None
        for client in clients:
            try:
                await client.wait_messages("lobby", total, timeout=20)
            except TimeoutError:
                raise AssertionError(
                    [(f["type"], f.get("seq"), f.get("code")) for f in client.seen if f["type"] != "presence"]
                ) from None
            seqs = [m["seq"] for m in client.messages("lobby")]
            base = seqs[0] if base is None else base
            assert seqs == list(range(base, base + total)), "gap, duplicate or reorder"
        orders = {tuple((m["data"]["p"], m["data"]["n"]) for m in c.messages("lobby")) for c in clients}
        assert len(orders) == 1, "members saw different orders"
        (order,) = orders
        for index in range(PUBLISHERS):  # one connection's publishes keep their order
            assert [n for p, n in order if p == index] == list(range(PER_PUBLISHER))
        acks = [a for c in publishers for a in await c.wait_frames("ack", PER_PUBLISHER)]
        assert len(acks) == total and {a["seq"] for a in acks} == set(range(base, base + total))

        # every worker delivered; forwarding happened between slots (as soon as the
        # workers' batched metrics are written: the event awaited)
        def routed() -> bool:
            texts = [host.get("/metrics", {"Accept": "text/plain"})[1] for host in cluster]
            delivered = all(
                re.search(rb'^rtc_fanout_received_total\{worker="%s"\} [1-9]' % worker, text, re.M)
                for text in texts
                for worker in (b"0", b"1")
            )
            forwarded = sum(
                float(v)
                for text in texts
                for v in re.findall(rb"^rtc_forwarded_total\{[^}]*\} (\S+)$", text, re.M)
            )
            return delivered and forwarded > 0

        await until(routed, 5, "every worker's fan-out counted and a publish forwarded to another slot")

        members = await clients[0].request("members", "members", room="lobby")
        assert members["count"] == MEMBERS
        assert members["users"] == sorted(c.user for c in clients)

        statuses = [json.loads(h.get("/metrics")[1]) for h in cluster]
        assert sum(s["active_connections"] for s in statuses) == MEMBERS
        assert all(s["active_connections"] == MEMBERS // 2 for s in statuses)
    finally:
        await asyncio.gather(*(c.close() for c in clients))


async def test_direct_message_crosses_hosts(cluster: list[Host]) -> None:
    alice = await Client.connect(cluster[0].ws, "alice")
    bob_a = await Client.connect(cluster[1].ws, "bob")
    bob_b = await Client.connect(cluster[0].ws, "bob")
    try:
        ack = await alice.request("direct", "ack", to="bob", data="hi bob", id=7)
        assert ack["to"] == "bob" and ack["id"] == 7
        for bob in (bob_a, bob_b):
            frame = await bob.expect("direct")
            assert frame == {
                "type": "direct",
                "from": "alice",
                "seq": ack["seq"],
                "data": "hi bob",
                "ts": frame["ts"],
            }
        assert not [f for f in alice.seen if f["type"] == "direct"]
    finally:
        for c in (alice, bob_a, bob_b):
            await c.close()


async def test_idle_worker_receives_no_room_traffic(cluster: list[Host]) -> None:
    """A worker with no member of a room gets none of its messages (subscription per worker)."""
    a = await Client.connect(cluster[0].ws, "solo")
    try:
        await a.join("solo-room")
        await metrics_written()  # what the earlier tests counted is in `before`
        before = {h.node_id: h.get("/metrics", {"Accept": "text/plain"})[1] for h in cluster}
        beta_total = sum(
            float(v) for v in re.findall(rb"^rtc_fanout_received_total\{[^}]*\} (\S+)$", before["beta"], re.M)
        )
        for n in range(5):
            await a.request("publish", "ack", room="solo-room", data=n)
        await a.wait_messages("solo-room", 5)
        await metrics_written()
        after = cluster[1].get("/metrics", {"Accept": "text/plain"})[1]
        beta_after = sum(
            float(v) for v in re.findall(rb"^rtc_fanout_received_total\{[^}]*\} (\S+)$", after, re.M)
        )
        assert beta_after == beta_total
    finally:
        await a.close()


def test_metrics_port_shows_seed_names(cluster: list[Host]) -> None:
    for host in cluster:
        status, text = host.get("/metrics", port=host.metrics_port)
        assert status == 200
        for name in (
            b"active_connections",
            b"total_connections",
            b"messages_sent_total",
            b"messages_received_total",
            b"errors_total",
            b"rate_limit_denied_total",
        ):
            assert re.search(rb"^" + name + rb" \S+$", text, re.M), name


def test_ring_is_the_same_on_every_host(cluster: list[Host]) -> None:
    views = [json.loads(h.get("/admin/ring?key=lobby")[1]) for h in cluster]
    assert views[0] == views[1]
    assert views[0]["slots"] == ["alpha:0", "alpha:1", "beta:0", "beta:1"]
    assert views[0]["owner"] in views[0]["slots"]


def test_seq_continues_when_the_ring_changes() -> None:
    """A host joins mid-stream: ownership moves for some rooms, no seq restarts or repeats."""
    redis = start_redis()
    try:
        with hosts(("one", redis.url), args=FAST) as (first,):
            asyncio.run(_publish_across_ring_change(first, redis.url))
    finally:
        redis.stop()


def _owner(host: Host, key: str) -> str:
    return str(json.loads(host.get(f"/admin/ring?key={key}")[1])["owner"])


def _slots(host: Host) -> list[str]:
    return list(json.loads(host.get("/admin/ring")[1])["slots"])


async def _settled_owners(cluster: list[Host], rooms: list[str], slots: int) -> dict[str, str]:
    """The owners once every worker answers alike (ring views converge within a heartbeat)."""

    def settled() -> dict[str, str] | None:
        views = [{r: _owner(h, r) for r in rooms} for h in cluster for _ in range(4)]
        same = all(v == views[0] for v in views) and len(_slots(cluster[0])) == slots
        return views[0] if same else None

    return await asyncio.to_thread(wait_for, settled, 10, "ring views to agree")


async def _publish_across_ring_change(first: Host, redis_url: str) -> None:
    rooms = [f"room{i}" for i in range(12)]
    client = await Client.connect(first.ws, "writer")
    try:
        for room in rooms:
            await client.join(room)
        counter = itertools.count()

        async def burst() -> None:
            for room in rooms:
                await client.send(type="publish", room=room, data=next(counter))

        owners_before = await _settled_owners([first], rooms, 2)
        await burst()
        with hosts(("two", redis_url), args=FAST) as (second,):
            owners_during = await _settled_owners([first, second], rooms, 4)
            moved = [r for r in rooms if owners_before[r] != owners_during[r]]
            assert moved and all(owners_during[r].startswith("two:") for r in moved)
            await burst()
        await burst()
        for room in rooms:
            try:
                await client.wait_messages(room, 3, timeout=15)
            except TimeoutError:
                raise AssertionError(
                    [f for f in client.seen if f["type"] not in ("presence",)][-40:]
                ) from None
        for room in rooms:
            assert [m["seq"] for m in client.messages(room)] == [1, 2, 3]
    finally:
        await client.close()
