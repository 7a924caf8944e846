"""SPEC 4: publishes from one connection to one room are sequenced in the order sent,
also while the ring changes under them (a host joins, then leaves). Real hosts, real Redis."""

from __future__ import annotations

import asyncio
import itertools
import shutil

import pytest

from tests.client import Client
from tests.rtcproc import hosts, start_host, start_redis

pytestmark = pytest.mark.timeout(120)

ROOMS = [f"order{i}" for i in range(8)]
BURST = 5  # publishes per room back to back: several are in flight when an owner changes
TICK = 0.05  # 800 publishes a second
ARGS = ("--rate", "5000", "--rate-burst", "5000")


async def test_one_connections_publishes_keep_their_order_across_ring_changes() -> None:
    redis = start_redis()
    try:
        with hosts(("one", redis.url), args=ARGS) as (first,):
            writer = await Client.connect(first.ws, "writer")
            try:
                for room in ROOMS:
                    await writer.join(room)
                sent = await _publish_while(writer, _ring_changes(redis.url))
                async with asyncio.timeout(30):  # every publish answered: ack or unavailable
                    while _count(writer, "ack") + _count(writer, "error") < sent:
                        await writer.frames.get()
                await asyncio.sleep(0.5)  # the last messages' fan-out
            finally:
                await writer.close()
    finally:
        redis.stop()

    out_of_order = {}
    for room in ROOMS:
        values = [m["data"] for m in sorted(writer.messages(room), key=lambda m: m["seq"])]
        if values != sorted(values):
            out_of_order[room] = [(a, b) for a, b in itertools.pairwise(values) if a > b][:3]
    acked = _count(writer, "ack")
    print(f"\n{sent} published while hosts joined and left, {acked} acked, {sent - acked} unavailable")
    assert not out_of_order, f"sequenced out of send order: {out_of_order}"
    assert acked > sent // 2


def _count(client: Client, kind: str) -> int:
    return sum(1 for f in client.seen if f["type"] == kind)


async def _ring_changes(redis_url: str) -> None:
    """Twice, a second host joins the ring, stays a moment, and shuts down."""
    for name in ("two", "three"):
        await asyncio.sleep(1.0)
        second = await asyncio.to_thread(start_host, name, redis_url, args=ARGS)
        try:
            await asyncio.sleep(2.0)
        finally:
            await asyncio.to_thread(second.stop)
            shutil.rmtree(second.runtime_dir, ignore_errors=True)
    await asyncio.sleep(1.5)


async def _publish_while(client: Client, changes: object) -> int:
    """Publish to every room each tick until the ring changes are over; returns the count."""
    task = asyncio.ensure_future(changes)  # type: ignore[arg-type]
    counter = itertools.count(1)
    sent = 0
    while not task.done():
        for room in ROOMS:
            for value in itertools.islice(counter, BURST):
                await client.send(type="publish", room=room, data=value)
            sent += BURST
        await asyncio.sleep(TICK)
    await task
    return sent
