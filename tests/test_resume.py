"""Resume without silent loss: the client's positions, honest checkpoints, replays that finish.

Each test is one way a client used to lose messages silently (docs/protocol.md, "Resuming a
session"): it vanishes with frames in flight, its replay is cut short, or the replay is larger
than the send queue. Each resumes with `?session=SID&positions=1` and a `resume` frame, and
must see every later seq exactly once, in order. A raw client (`tests/rawws.py`) reads at its
own pace and vanishes with a TCP reset, as a phone losing its network does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from tests.client import Client
from tests.rawstream import RawSocket
from tests.rtcproc import Host, RedisServer, hosts, token, until

FILLER = "x"
RCVBUF = 256 * 1024  # the clients' receive buffers: what is in flight to them stays small


@pytest.fixture(scope="module")
def host(redis: RedisServer) -> Iterator[Host]:
    # The publisher floods: its rate limit is not what these tests are about.
    with hosts(("resume", redis.url), args=("--rate", "100000", "--rate-burst", "100000")) as (started,):
        yield started


@pytest.fixture
async def opened() -> AsyncIterator[list[RawSocket]]:
    """Every raw socket a test opens, dropped at its end whatever happened."""
    sockets: list[RawSocket] = []
    yield sockets
    for sock in sockets:
        sock.abandon()
    await asyncio.gather(*(sock.closed() for sock in sockets))


async def publish(host: Host, room: str, count: int, size: int) -> int:
    """Publish `count` messages of about `size` bytes; returns the last seq once all are acked."""
    publisher = await Client.connect(host.ws, "publisher")
    try:
        await publisher.join(room)
        for start in range(0, count, 16):  # in batches: its own copies must keep up too
            for n in range(start, min(start + 16, count)):
                await publisher.send(type="publish", room=room, data={"n": n, "pad": FILLER * size}, id=n)
            acks = await publisher.wait_frames("ack", min(start + 16, count), timeout=30)
        return max(a["seq"] for a in acks)
    finally:
        await publisher.close()


async def connect(
    opened: list[RawSocket], host: Host, user: str, **query: str
) -> tuple[RawSocket, dict[str, Any]]:
    sock = await RawSocket.open(host.host, host.port, rcvbuf=RCVBUF, token=token(user), **query)
    opened.append(sock)
    return sock, await sock.expect("welcome")


async def read_room(sock: RawSocket, room: str, upto: int, timeout: float = 60) -> list[int]:
    """Seqs of `room`'s messages as they arrive (in arrival order), until `upto` has arrived."""
    seqs: list[int] = []
    async with asyncio.timeout(timeout):
        while not seqs or seqs[-1] < upto:
            frame = await sock.recv()
            assert frame is not None, f"closed {sock.close_code} after seq {seqs[-1:]} of {upto}"
            assert frame["type"] != "gap", frame
            if frame["type"] == "message" and frame["room"] == room:
                seqs.append(frame["seq"])
    return seqs


async def resume_with_positions(
    opened: list[RawSocket],
    host: Host,
    user: str,
    sid: str,
    positions: dict[str, int],
    epochs: dict[str, str],
) -> tuple[RawSocket, dict[str, Any]]:
    """Reconnect with the session and the client's positions: `welcome`, then `resume`."""
    sock, welcome = await connect(opened, host, user, session=sid, positions="1")
    assert welcome["resumed"] is True and welcome["session"] == sid, welcome
    assert set(positions) <= set(welcome["rooms"]), welcome
    await sock.send(type="resume", rooms=positions, epochs=epochs)
    return sock, welcome


async def joined(sock: RawSocket, room: str) -> dict[str, Any]:
    """The `joined` of `room` (the inbox's may come first)."""
    async with asyncio.timeout(10):
        while True:
            frame = await sock.recv()
            assert frame is not None and frame["type"] in ("joined", "message"), frame
            if frame["type"] == "joined" and frame["room"] == room:
                return frame


async def checkpoint(redis: RedisServer, sid: str, room: str) -> int:
    """The server's checkpoint for `room` in session `sid` (0 when none is written)."""
    value = await asyncio.to_thread(redis.cli, "HGET", f"rtc:{{s:{sid}}}", f"r:{room}")
    return int(value.strip().split(":")[0] or 0)


async def replaying(
    opened: list[RawSocket], host: Host, user: str, room: str, count: int, size: int
) -> tuple[RawSocket, str, dict[str, Any], int]:
    """`count` messages of `size` bytes published, then `user` joins `room` since 0: its
    socket (the replay not read yet), session, `joined` and the last seq."""
    last = await publish(host, room, count, size)
    sock, welcome = await connect(opened, host, user)
    await sock.send(type="join", room=room, since=0)
    answer = await joined(sock, room)
    assert answer["recovered"] is True and answer["seq"] == last
    return sock, welcome["session"], answer, last


async def checkpointed(redis: RedisServer, sid: str, room: str, seq: int) -> bool:
    return await checkpoint(redis, sid, room) >= seq


async def test_abrupt_drop_with_frames_in_flight_resumes_from_client_positions(
    opened: list[RawSocket], host: Host, redis: RedisServer
) -> None:
    """Read up to seq 50 of 600, vanish (RST) with the rest in socket buffers: 51..600 come back."""
    room = "inflight"
    sock, welcome = await connect(opened, host, "reader")
    sid = welcome["session"]
    await sock.send(type="join", room=room)
    epoch = (await joined(sock, room))["epoch"]
    last = await publish(host, room, 600, 200)
    assert await read_room(sock, room, 50) == list(range(1, 51))
    # Let the server's periodic checkpoint see its buffer empty (everything handed to the
    # kernel): the moment a server-side checkpoint claims frames the client never read.
    await until(lambda: checkpointed(redis, sid, room, last), 10, f"the checkpoint to claim seq {last}")
    sock.reset()

    back, _ = await resume_with_positions(opened, host, "reader", sid, {room: 50}, {room: epoch})
    answer = await joined(back, room)
    assert answer["recovered"] is True and answer["seq"] == last, answer
    assert await read_room(back, room, last) == list(range(51, last + 1))
    await publish(host, room, 1, 10)
    assert await read_room(back, room, last + 1) == [last + 1]  # live, and nothing twice
    await back.close()


async def test_replay_cut_short_resumes_from_client_positions(
    opened: list[RawSocket], host: Host, redis: RedisServer
) -> None:
    """A `join since:0` replay (20 MB: more than the kernel's buffers hold) dropped after 100
    of 1000: the checkpoint did not pass its unwritten part, and the resume with positions
    replays 101..1000 once."""
    room = "cutshort"
    sock, sid, answer, last = await replaying(opened, host, "cutter", room, 1000, 20_000)
    assert await read_room(sock, room, 100) == list(range(1, 101))
    # A periodic checkpoint claims what the client read while the replay is unfinished...
    await until(lambda: checkpointed(redis, sid, room, 100), 10, "a checkpoint of the 100 seqs read")
    assert await checkpoint(redis, sid, room) < last, "the checkpoint passed the unwritten replay"
    sock.reset()

    back, _ = await resume_with_positions(opened, host, "cutter", sid, {room: 100}, {room: answer["epoch"]})
    again = await joined(back, room)
    assert again["recovered"] is True and again["seq"] == last, again
    assert await read_room(back, room, last) == list(range(101, last + 1))
    await back.close()


async def test_replay_larger_than_the_send_queue_finishes_for_a_reader(
    opened: list[RawSocket], host: Host
) -> None:
    """90 x 60 KB (5 MB) replayed to a client with a 1 MiB send queue: paced, never closed 1013."""
    room = "oversized"
    sock, sid, answer, last = await replaying(opened, host, "big", room, 100, 60_000)
    assert await read_room(sock, room, last) == list(range(1, last + 1))
    await sock.close()
    assert sock.close_code == 1000

    back, _ = await resume_with_positions(opened, host, "big", sid, {room: 10}, {room: answer["epoch"]})
    assert (await joined(back, room))["recovered"] is True
    assert await read_room(back, room, last) == list(range(11, last + 1))
    await back.close()
    assert back.close_code == 1000


async def test_resume_without_positions_is_the_servers_checkpoint(
    opened: list[RawSocket], host: Host, redis: RedisServer
) -> None:
    """`?session=` alone: replay at once from the server's checkpoint, which counts only what
    left its buffer; after an orderly close nothing is missing, after a reset what was in
    flight may be (docs/protocol.md)."""
    room = "nopositions"
    sock, welcome = await connect(opened, host, "plain")
    sid = welcome["session"]
    await sock.send(type="join", room=room)
    await joined(sock, room)
    first = await publish(host, room, 20, 100)
    assert await read_room(sock, room, first) == list(range(1, first + 1))
    await sock.close()

    last = await publish(host, room, 30, 100)
    back, again = await connect(opened, host, "plain", session=sid)
    assert again["resumed"] is True and again["session"] == sid
    answer = await joined(back, room)  # no `resume` frame needed, none sent
    assert answer["recovered"] is True
    assert await read_room(back, room, last) == list(range(first + 1, last + 1))

    # A large replay (15 MB: more than the kernel's buffers hold), cut by a reset while the
    # server still paces it. The checkpoint counted what left the server's buffer (some of
    # it never reached this client: the documented skip), never the rest of the replay; the
    # next resume without positions replays exactly from there, in order, to the end.
    await back.close()
    big = await publish(host, room, 250, 60_000)
    cut, _ = await connect(opened, host, "plain", session=sid)
    await joined(cut, room)
    seen = await read_room(cut, room, last + 5)
    assert seen == list(range(last + 1, last + 6))
    # Two periodic checkpoints while the replay is unfinished: one claims what the one
    # before saw leave the buffer.
    await until(lambda: checkpointed(redis, sid, room, last + 5), 10, f"a checkpoint of seq {last + 5}")
    connected = host.active_connections()
    cut.reset()
    # Once the reset is noticed, no checkpoint of that connection follows.
    await until(lambda: host.active_connections() < connected, 10, "the host to notice the reset")
    saved = await checkpoint(redis, sid, room)
    assert last + 5 <= saved < big, "the checkpoint passed the unwritten part of the replay"
    final, _ = await connect(opened, host, "plain", session=sid)
    assert (await joined(final, room))["recovered"] is True
    assert await read_room(final, room, big) == list(range(saved + 1, big + 1))
    await final.close()


async def test_positions_promised_but_not_sent_fall_back_after_the_wait(
    opened: list[RawSocket], host: Host
) -> None:
    """`positions=1` and no `resume` frame: after the documented wait, the server's checkpoint."""
    room = "noframe"
    sock, welcome = await connect(opened, host, "waiter")
    await sock.send(type="join", room=room)
    await joined(sock, room)
    await sock.close()
    last = await publish(host, room, 5, 10)
    back, again = await connect(opened, host, "waiter", session=welcome["session"], positions="1")
    assert again["resumed"] is True and room in again["rooms"]
    started = time.monotonic()
    answer = await joined(back, room)
    assert time.monotonic() - started >= 4.5  # it waited for positions first
    assert answer["recovered"] is True
    assert await read_room(back, room, last) == list(range(1, last + 1))
    await back.close()
