"""SPEC 4: publishes from one connection to one room are sequenced in the order sent,
also while the ring changes under them (hosts join, then leave). Real hosts, real Redis."""

from __future__ import annotations

import asyncio
import itertools
import shutil
from collections import defaultdict

import pytest

from tests.client import Client
from tests.rtcproc import Host, hosts, settle_ring, start_host, start_redis, until

pytestmark = pytest.mark.timeout(150)

WRITERS = 4
ROOMS = [f"order{i}" for i in range(8)]
BURST = 2  # publishes per writer and room back to back: some are in flight when an owner changes
TICK = 0.05  # 1280 publishes a second in all
ARGS = ("--rate", "5000", "--rate-burst", "5000")
FLOWED = 200  # acks that show publishes flow on a ring (before, while and after a change)


async def test_one_connections_publishes_keep_their_order_across_ring_changes() -> None:
    redis = start_redis()
    try:
        # One worker: it owns every room alone, and takes back those the other host had.
        with hosts(("one", redis.url), args=ARGS, workers=1) as (first,):
            writers = [await Client.connect(first.ws, f"writer{i}") for i in range(WRITERS)]
            try:
                for writer in writers:
                    for room in ROOMS:
                        await writer.join(room)
                sent = await _publish_while(writers, _ring_changes(first, writers, redis.url))
                async with asyncio.timeout(30):  # every publish answered: ack or unavailable
                    for writer in writers:
                        while _count(writer, "ack") + _count(writer, "error") < sent // WRITERS:
                            await writer.frames.get()
                await writers[0].wait_messages(ROOMS[-1], sent // WRITERS // len(ROOMS), timeout=10)
            finally:
                for writer in writers:
                    await writer.close()
    finally:
        redis.stop()

    out_of_order = {}
    for room in ROOMS:
        by_sender: dict[str, list[int]] = defaultdict(list)
        for message in sorted(writers[0].messages(room), key=lambda m: m["seq"]):
            by_sender[message["from"]].append(message["data"])
        for sender, values in by_sender.items():
            if values != sorted(values):
                out_of_order[(room, sender)] = [(a, b) for a, b in itertools.pairwise(values) if a > b][:3]
    acked = sum(_count(w, "ack") for w in writers)
    print(f"\n{sent} published while hosts joined and left, {acked} acked, {sent - acked} unavailable")
    assert not out_of_order, f"sequenced out of send order: {out_of_order}"
    assert acked > sent // 2


def _count(client: Client, kind: str) -> int:
    return sum(1 for f in client.seen if f["type"] == kind)


async def _ring_changes(first: Host, writers: list[Client], redis_url: str) -> None:
    """Three times, a second host joins the ring, publishes are acked with it there, and it
    shuts down; before each change and after the last, publishes are acked on the ring as is."""
    for name in ("two", "three", "four"):
        await _acked_more(writers, FLOWED)
        second = await asyncio.to_thread(start_host, name, redis_url, args=ARGS)
        try:
            await asyncio.to_thread(settle_ring, [first, second])
            await _acked_more(writers, FLOWED)
        finally:
            await asyncio.to_thread(second.stop)
            shutil.rmtree(second.runtime_dir, ignore_errors=True)
    await asyncio.to_thread(settle_ring, [first], 15)
    await _acked_more(writers, FLOWED)


async def _acked_more(writers: list[Client], more: int) -> None:
    """Until `more` further publishes have been acked (sequenced), counting all writers."""
    start = sum(_count(w, "ack") for w in writers)
    await until(
        lambda: sum(_count(w, "ack") for w in writers) >= start + more,
        30,
        lambda: f"{more} more acks (got {sum(_count(w, 'ack') for w in writers) - start})",
    )


async def _publish_while(writers: list[Client], changes: object) -> int:
    """Every writer publishes to every room each tick until the ring changes are over."""
    task = asyncio.ensure_future(changes)  # type: ignore[arg-type]
    counter = itertools.count(1)
    sent = 0
    while not task.done():
        for room in ROOMS:
            for writer in writers:
                for value in itertools.islice(counter, BURST):
                    await writer.send(type="publish", room=room, data=value)
                sent += BURST
        await asyncio.sleep(TICK)  # the publishing pace, not a wait
    await task
    return sent
