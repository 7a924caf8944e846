"""Presence across worker deaths and shutdowns: every join is matched by a leave.

Real hosts and a real Redis: a member on one host watches a user on another host whose
worker is SIGKILLed or whose host shuts down. And the sweeps that announce leaves: one
per room and slice, however many users left together.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
import psutil
import pytest

from rtc import keys
from rtc.broker import RedisBroker
from rtc.node import MAINTAIN_EVERY, REFRESH_EVERY
from rtc.routing.channels import Channels, Listener
from rtc.routing.presence import MEMBERSHIP_TTL, PRESENCE_LEAVE_DELAY, SWEEP_SLICE, Presence
from rtc.routing.records import decode_records
from rtc.routing.tasks import Tasks
from tests.client import Client
from tests.rtcproc import Host, RedisServer, start_host, start_redis, until

pytestmark = pytest.mark.timeout(90)

# A crashed worker's membership expires within MEMBERSHIP_TTL; a live worker with members in
# the room notices at its next refresh (every 5 s) and announces the leave.
CRASH_LEAVE_WITHIN = MEMBERSHIP_TTL + 5 + 5
SHUTDOWN_LEAVE_WITHIN = PRESENCE_LEAVE_DELAY + 5 + 5
# Membership Redis lost is put back by each worker's next refresh (slack for a loaded machine).
RESTATED_WITHIN = MAINTAIN_EVERY * REFRESH_EVERY + 5


@pytest.fixture
def two_hosts() -> Iterator[tuple[RedisServer, Host, Host]]:
    """A host that stays (one worker) and one that goes away (one worker), one Redis."""
    redis = start_redis()
    stay = gone = None
    try:
        stay = start_host("stay", redis.url, workers=1)
        gone = start_host("gone", redis.url, workers=1)
        yield redis, stay, gone
    finally:
        for host in (gone, stay):
            if host is not None:
                host.stop()
        redis.stop()


@contextlib.asynccontextmanager
async def watched(stay: Host, gone: Host, room: str) -> AsyncIterator[tuple[Client, Client]]:
    """Alice (on the staying host) sees Bob (on the other) join `room`; both closed after."""
    alice = await Client.connect(stay.ws, "alice")
    bob: Client | None = None
    try:
        await alice.join(room)
        bob = await Client.connect(gone.ws, "bob")
        await bob.join(room)
        await alice.expect("presence", user="bob", event="join")
        yield alice, bob
    finally:
        await alice.close()
        if bob is not None:
            await bob.close()


async def test_a_killed_workers_users_leave_and_may_join_again(
    two_hosts: tuple[RedisServer, Host, Host],
) -> None:
    _, stay, gone = two_hosts
    async with watched(stay, gone, "crash-presence") as (alice, bob):
        (victim,) = gone.worker_pids()
        psutil.Process(victim).kill()
        await bob.closed.wait()
        await alice.expect("presence", CRASH_LEAVE_WITHIN, user="bob", event="leave")
        assert "bob" not in (await alice.request("members", "members", room="crash-presence"))["users"]

        again = await Client.connect(stay.ws, "bob")
        try:
            await again.join("crash-presence")
            await alice.expect("presence", user="bob", event="join")
        finally:
            await again.close()


async def test_users_of_a_host_that_shut_down_leave(two_hosts: tuple[RedisServer, Host, Host]) -> None:
    _, stay, gone = two_hosts
    async with watched(stay, gone, "shutdown-presence") as (alice, _):
        await asyncio.to_thread(gone.stop)  # drains: bob is migrated and does not come back
        await alice.expect("presence", SHUTDOWN_LEAVE_WITHIN, user="bob", event="leave")


async def test_presence_keys_expire_with_membership(two_hosts: tuple[RedisServer, Host, Host]) -> None:
    redis, stay, gone = two_hosts
    async with watched(stay, gone, "ttl-presence"):
        for key in (keys.presence("ttl-presence"), keys.member_slots("ttl-presence")):
            assert 0 < int(redis.cli("TTL", key)) <= MEMBERSHIP_TTL, key


async def members_of(client: Client, room: str, request_id: str) -> dict[str, Any]:
    """The `members` reply, or the error (`unavailable` while Redis is away)."""
    await client.send(type="members", room=room, id=request_id)
    while True:
        frame = await client.next(timeout=10)
        if frame.get("id") == request_id and frame["type"] in ("members", "error"):
            return frame


async def test_membership_comes_back_after_redis_restarts_without_persistence(
    two_hosts: tuple[RedisServer, Host, Host],
) -> None:
    """Redis loses every membership key: the next refresh puts it back, no rejoin needed."""
    redis, stay, gone = two_hosts
    async with watched(stay, gone, "restart-presence") as (alice, bob):
        assert (await members_of(alice, "restart-presence", "before"))["users"] == ["alice", "bob"]
        redis.process.kill()
        redis.process.wait()
        # Same port, nothing saved: Redis comes back empty. The fixture stops this one.
        redis.process = (await asyncio.to_thread(start_redis, port=redis.port, directory=redis.dir)).process
        replies: list[dict[str, Any]] = []

        async def restated() -> bool:
            replies.append(await members_of(alice, "restart-presence", f"after-{len(replies)}"))
            return replies[-1].get("users") == ["alice", "bob"]

        await until(restated, RESTATED_WITHIN, lambda: f"the membership back (last: {replies[-1:]})", 0.25)
        assert replies[-1]["count"] == 2
        # Presence came back too: Bob's leave is still announced.
        await bob.close()
        await alice.expect("presence", SHUTDOWN_LEAVE_WITHIN, user="bob", event="leave")


async def test_a_burst_of_joins_reaches_a_member_complete_in_order_and_before_later_messages(
    two_hosts: tuple[RedisServer, Host, Host],
) -> None:
    """A busy room's events are paced (rtc.routing.pacing); none is lost, none overtakes."""
    _, stay, _ = two_hosts
    room = "burst-presence"
    alice = await Client.connect(stay.ws, "alice")
    joiners: list[Client] = []
    try:
        await alice.join(room)
        for i in range(12):
            joiner = await Client.connect(stay.ws, f"j{i}")
            joiners.append(joiner)
            await joiner.join(room)
        published = await joiners[-1].request("publish", "ack", room=room, data="after the joins")
        frames = await alice.wait_frames("message", 1, room=room)
        assert frames[0]["seq"] == published["seq"]
        events = [f["user"] for f in alice.seen if f.get("type") == "presence" and f.get("event") == "join"]
        assert events == [f"j{i}" for i in range(12)]
        message_at = next(i for i, f in enumerate(alice.seen) if f.get("type") == "message")
        last_join_at = max(i for i, f in enumerate(alice.seen) if f.get("type") == "presence")
        assert last_join_at < message_at  # the events waiting went out before the message
    finally:
        for client in (alice, *joiners):
            await client.close()


class CountedSweeps(RedisBroker):
    """The real broker, its presence sweeps counted."""

    sweeps = 0

    async def sweep(self, room: str, leave: tuple[bytes, bytes], presence_max: int) -> list[str]:
        self.sweeps += 1
        return await super().sweep(room, leave, presence_max)


async def test_leaves_of_users_gone_together_share_one_sweep_of_their_room(fresh_redis: RedisServer) -> None:
    """Fifty users drop at once (a host failover): each leave is announced once, 5 s later,
    by one sweep of the room per slice instead of one per user, in the middle of the
    reconnect storm that follows."""
    channels = Channels()
    events: asyncio.Queue[bytes] = asyncio.Queue()
    channels.listen(keys.room_channel("lobby"), Listener(events.put_nowait))
    broker = CountedSweeps(fresh_redis.url, channels, "0")
    await broker.start()
    tasks = Tasks()
    presence = Presence(broker, tasks, "t:0", 100, "0")

    async def announced(count: int, within: float) -> list[str]:
        """The users of the next `count` presence events in the room."""
        users: list[str] = []
        while len(users) < count:
            payload = await asyncio.wait_for(events.get(), within)
            users += [orjson.loads(record.frame)["user"] for record in decode_records(payload)]
        return users

    try:
        await broker.subscribe(keys.room_channel("lobby"))
        users = [f"u{i}" for i in range(50)]
        for user in users:
            await presence.join("lobby", user)
        assert sorted(await announced(len(users), 5)) == sorted(users)  # the joins

        loop = asyncio.get_running_loop()
        gone = loop.time()
        await asyncio.gather(*(presence.leave("lobby", user) for user in users))
        first = await announced(1, PRESENCE_LEAVE_DELAY + SWEEP_SLICE + 5)
        assert loop.time() - gone >= PRESENCE_LEAVE_DELAY  # never early
        left = first + await announced(len(users) - len(first), 5)
        assert sorted(left) == sorted(users)
        assert broker.sweeps <= 2  # the leaves may straddle two slices
    finally:
        tasks.cancel()
        await broker.close()
