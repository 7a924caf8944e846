"""What replays cost under attack: 64 sockets replay a full room of 64 KiB messages.

A `join` with `since:0` asks for the whole history (1000 messages of about 64 KiB: 64 MB).
Replays are read and sent in pages that wait for the socket to take them, so each joiner
costs at most its send queue plus the page being read in the worker (as Redis's reply, then
as frames), and a page in Redis, however large the room and whether or not it reads. The
attackers here do not read at all; a few honest clients among them read their replay to
the end. The figures are printed; the bounds hold.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import psutil
import pytest

from tests.client import Client
from tests.rawstream import RawSocket
from tests.rtcproc import Host, RedisServer, hosts, token

ROOM = "heavy"
MESSAGES = 1000  # the default --history-size: a full room
DATA = 65_000  # about 64 KiB per message, under the 64 KiB frame limit with its envelope
SOCKETS = 64
READERS = 4  # of the SOCKETS, these read their whole replay
MIB = 1 << 20
SEND_QUEUE = 1 * MIB  # the default --send-queue-bytes
PAGE = SEND_QUEUE // 2  # a replay page holds at most half the send queue
SLACK = 48 * MIB  # allocator and interpreter noise, and the 64 connections' own state
# Per joiner: its send queue, and the page being read (Redis's reply, then its frames).
WORKER_BOUND = SOCKETS * (SEND_QUEUE + 2 * PAGE) + SLACK
REDIS_BOUND = SOCKETS * PAGE + SLACK


@pytest.fixture(scope="module")
def host(redis: RedisServer) -> Iterator[Host]:
    # One worker: every replay lands in the process that is measured.
    with hosts(("replay", redis.url), workers=1, args=("--rate", "100000", "--rate-burst", "100000")) as (
        started,
    ):
        yield started


def used_memory(redis: RedisServer) -> int:
    info = redis.cli("INFO", "memory")
    return int(next(line for line in info.splitlines() if line.startswith("used_memory:")).split(":")[1])


def worker_rss(host: Host) -> int:
    (pid,) = host.worker_pids()
    return int(psutil.Process(pid).memory_info().rss)


async def fill(host: Host) -> None:
    """A full room, published in batches the publisher's own copies can keep up with."""
    publisher = await Client.connect(host.ws, "filler")
    try:
        await publisher.join(ROOM)
        pad = "x" * DATA
        for start in range(0, MESSAGES, 8):
            for n in range(start, min(start + 8, MESSAGES)):
                await publisher.send(type="publish", room=ROOM, data=pad, id=n)
            await publisher.wait_messages(ROOM, min(start + 8, MESSAGES), timeout=30)
    finally:
        await publisher.close()


async def replay_to_the_end(sock: RawSocket) -> int:
    last = 0
    while last < MESSAGES:
        frame = await sock.recv()
        assert frame is not None, f"closed {sock.close_code} at seq {last}"
        if frame["type"] == "message":
            assert frame["seq"] == last + 1
            last = frame["seq"]
    return last


@pytest.mark.timeout(300)
async def test_64_sockets_replaying_a_full_room_stay_within_bounds(host: Host, redis: RedisServer) -> None:
    await fill(host)
    base_rss, base_redis = worker_rss(host), await asyncio.to_thread(used_memory, redis)
    peaks = {"rss": base_rss, "redis": base_redis}
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            peaks["rss"] = max(peaks["rss"], worker_rss(host))
            peaks["redis"] = max(peaks["redis"], await asyncio.to_thread(used_memory, redis))
            await asyncio.sleep(0.05)  # the sampling interval, not a wait

    sampler = asyncio.create_task(sample())
    sockets: list[RawSocket] = []
    started = time.monotonic()
    try:
        for n in range(SOCKETS):
            sock = await RawSocket.open(host.host, host.port, token=token(f"attacker{n}"))
            sockets.append(sock)
            await sock.expect("welcome")
            await sock.send(type="join", room=ROOM, since=0)
        readers = [asyncio.create_task(replay_to_the_end(s)) for s in sockets[:READERS]]
        assert await asyncio.wait_for(asyncio.gather(*readers), 240) == [MESSAGES] * READERS
        # An observation window, not a wait: the claim is that the stalled ones do not grow,
        # and no event marks "still not grown"; the sampler watches them one more second.
        await asyncio.sleep(1.0)
        seconds = time.monotonic() - started
    finally:
        stop.set()
        await sampler
        for sock in sockets:
            sock.abandon()
    rss_growth, redis_growth = peaks["rss"] - base_rss, peaks["redis"] - base_redis
    print(
        f"\nreplay of {MESSAGES} x {DATA // 1000} KB to {SOCKETS} sockets ({READERS} reading to the end "
        f"in {seconds:.1f} s, the rest stalled): worker RSS {base_rss / MIB:.0f} -> peak "
        f"{peaks['rss'] / MIB:.0f} MiB (+{rss_growth / MIB:.0f}, bound +{WORKER_BOUND / MIB:.0f}); "
        f"Redis used_memory {base_redis / MIB:.0f} -> peak {peaks['redis'] / MIB:.0f} MiB "
        f"(+{redis_growth / MIB:.0f}, bound +{REDIS_BOUND / MIB:.0f})"
    )
    assert rss_growth <= WORKER_BOUND
    assert redis_growth <= REDIS_BOUND
