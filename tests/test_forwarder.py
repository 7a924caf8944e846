"""The forwarder's lanes, step by step, over a real Redis: the test plays the other owner.

Worker "t:0" routes one connection's publishes to a room. The test holds the first one
(forwarded to "t:1") unanswered, moves the room's ownership to "t:0" itself, and checks
that the second publish waits for the first one's answer instead of overtaking it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import orjson
import pytest

from rtc import keys
from rtc.broker import RedisBroker
from rtc.broker.base import Unsequenced
from rtc.hashring import Ring
from rtc.protocol import message_halves
from rtc.routing.channels import Channels, Listener
from rtc.routing.forwarder import Forwarder
from rtc.routing.outbox import Outbox
from rtc.routing.records import Answer, Forward, decode_slots, encode_answer
from rtc.routing.ring import RingMember
from rtc.routing.sequencer import Reply, Sequencer
from rtc.routing.tasks import Tasks
from tests.rtcproc import RedisServer

pytestmark = pytest.mark.timeout(30)

HERE, THERE = "t:0", "t:1"
BOTH = Ring([HERE, THERE])
ROOM = next(f"lane{i}" for i in range(1000) if BOTH.owner(f"lane{i}") == THERE)


@dataclass
class World:
    forwarder: Forwarder
    membership: RingMember
    there: RedisBroker  # the test, as the other owner
    forwards: asyncio.Queue[bytes]
    tasks: Tasks  # this worker's flushes (sequencing, forwarding)


@pytest.fixture
async def world(fresh_redis: RedisServer) -> AsyncIterator[World]:
    tasks = Tasks()
    channels, theirs = Channels(), Channels()
    here = RedisBroker(fresh_redis.url, channels, "0")
    there = RedisBroker(fresh_redis.url, theirs, "1")
    await here.start()
    await there.start()
    membership = RingMember(here, here, HERE, "i")
    sequencer = Sequencer(here, tasks, 100, 60, 2.0)
    forwarder = Forwarder(membership, sequencer, Outbox(here, tasks, 2.0), "0")
    channels.listen(membership.inbox, Listener(forwarder.on_slot_message))
    await here.subscribe(membership.inbox)
    forwards: asyncio.Queue[bytes] = asyncio.Queue()
    theirs.listen(keys.slot_inbox(THERE), Listener(forwards.put_nowait))
    await there.subscribe(keys.slot_inbox(THERE))
    yield World(forwarder, membership, there, forwards, tasks)
    tasks.cancel()
    await here.close()
    await there.close()


def item(text: str, room: str = ROOM) -> Unsequenced:
    head, tail = message_halves(room, "u", orjson.dumps(text), 1000)
    return Unsequenced(head, tail, 1000, None)


def seq_into(future: asyncio.Future[int | None]) -> Reply:
    """A reply that resolves `future` with the seq (the epoch is the sequencer's business)."""
    return lambda stamp: future.set_result(None if stamp is None else stamp.seq)


async def received(world: World, count: int) -> list[Forward]:
    """The next `count` forwards the other owner's inbox got (a turn's travel as one message)."""
    forwards: list[Forward] = []
    while len(forwards) < count:
        for record in decode_slots(await asyncio.wait_for(world.forwards.get(), 5)):
            assert isinstance(record, Forward)
            forwards.append(record)
    return forwards


async def answer(world: World, forward: Forward) -> int:
    """Sequence a forward as its owner would, and answer the origin."""
    done = await world.there.sequence(
        forward.key, [Unsequenced(forward.head, forward.tail, forward.ts, None)], 100, 60
    )
    await world.there.publish_many(
        [(keys.slot_inbox(forward.origin), encode_answer(Answer(forward.rid, done.seqs[0])))]
    )
    return done.seqs[0]


async def test_a_publish_whose_owner_changed_waits_for_the_one_ahead(world: World) -> None:
    replies: dict[str, asyncio.Future[int | None]] = {}
    loop = asyncio.get_running_loop()

    def route(text: str) -> None:
        replies[text] = loop.create_future()
        world.forwarder.route(1, ROOM, item(text), seq_into(replies[text]))

    world.membership.ring = BOTH
    route("first")
    (first,) = await received(world, 1)
    assert first.key == ROOM

    world.membership.ring = Ring([HERE])  # the owner is now this worker
    route("second")
    route("third")
    # Had either been sent on, a flush (sequencing here) would have answered it: once every
    # flush is over, neither may be answered.
    await world.tasks.settle(5)
    assert not replies["second"].done() and not replies["third"].done()

    assert await answer(world, first) == 1
    assert await asyncio.wait_for(replies["first"], 5) == 1
    assert await asyncio.wait_for(replies["second"], 5) == 2
    assert await asyncio.wait_for(replies["third"], 5) == 3


async def test_publishes_to_one_owner_are_pipelined_and_other_lanes_do_not_wait(world: World) -> None:
    loop = asyncio.get_running_loop()
    world.membership.ring = BOTH
    ahead = [loop.create_future() for _ in range(3)]
    for n, future in enumerate(ahead):
        world.forwarder.route(1, ROOM, item(f"a{n}"), seq_into(future))
    forwards = await received(world, len(ahead))  # all sent, none waiting for another

    world.membership.ring = Ring([HERE])
    other = loop.create_future()
    world.forwarder.route(2, ROOM, item("other connection"), seq_into(other))
    assert await asyncio.wait_for(other, 5) == 1  # another lane: sequenced here at once

    for forward in forwards:
        await answer(world, forward)
    assert [await asyncio.wait_for(f, 5) for f in ahead] == [2, 3, 4]


async def test_a_loop_turns_forwards_from_several_connections_travel_as_one_message(world: World) -> None:
    """Each connection's frame is handled in its own task; those of one loop turn share one
    PUBLISH: the outbox's flush starts after the turn, with the turn's forwards queued."""
    world.membership.ring = BOTH
    loop = asyncio.get_running_loop()
    replies = [loop.create_future() for _ in range(5)]

    async def frame(connection: int) -> None:
        world.forwarder.route(connection, ROOM, item(f"c{connection}"), seq_into(replies[connection]))

    await asyncio.gather(*(frame(n) for n in range(5)))  # five tasks, stepped in one turn
    message = await asyncio.wait_for(world.forwards.get(), 5)
    texts = [orjson.loads(f.head + b"0" + f.tail)["data"] for f in decode_slots(message)]
    assert sorted(texts) == [f"c{n}" for n in range(5)]
    assert world.forwards.empty()


async def test_a_forward_nobody_receives_is_sequenced_here_in_lane_order(
    world: World, fresh_redis: RedisServer
) -> None:
    loop = asyncio.get_running_loop()
    world.membership.ring = Ring([HERE, "t:9"])  # t:9 owns the room and does not listen
    room = next(f"gone{i}" for i in range(1000) if world.membership.ring.owner(f"gone{i}") == "t:9")
    replies = [loop.create_future() for _ in range(3)]
    for n, future in enumerate(replies):
        world.forwarder.route(1, room, item(f"g{n}", room), seq_into(future))
    assert [await asyncio.wait_for(f, 5) for f in replies] == [1, 2, 3]
    history = fresh_redis.cli("XRANGE", keys.room_history(room), "-", "+")
    assert history.index('"g0"') < history.index('"g1"') < history.index('"g2"')
