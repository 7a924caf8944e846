"""Session checkpoints against a real host: honest, and never stuck behind a busy socket."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from rtc import keys
from rtc.broker import RedisBroker
from rtc.routing.checkpoint import Checkpoint
from rtc.routing.sessions import CHECKPOINT_SLICES, Sessions
from tests.client import Client
from tests.rawstream import RawSocket
from tests.rtcproc import Host, RedisServer, start_host, token

pytestmark = pytest.mark.timeout(120)

FRAME = 30_000  # bytes of data per message
COUNT = 800  # 24 MB: far more than the kernel's buffers on the way hold
RECEIVE_BUFFER = 64 * 1024  # the slow client's SO_RCVBUF (no autotuning)
# What may sit between the server's user-space buffer and the test: the server's send
# buffer (tcp_wmem max 4 MiB), the client's receive buffer (doubled by the kernel) and
# aiohttp's read-ahead. Frames beyond this many unread are surely still in user space.
SLACK = (4 * 1024 * 1024 + 2 * RECEIVE_BUFFER + 1024 * 1024) // FRAME + 1


@pytest.fixture
def busy_host(redis_server: RedisServer) -> Iterator[tuple[RedisServer, Host]]:
    host = start_host(
        "busy",
        redis_server.url,
        workers=1,
        args=("--send-queue-bytes", str(64 << 20), "--rate", "1000", "--rate-burst", "1000"),
    )
    yield redis_server, host
    host.stop()


def checkpoint(redis: RedisServer, session: str, room: str) -> int:
    value = redis.cli("HGET", keys.session(session), f"r:{room}").strip()
    return int(value.partition(":")[0]) if value else -1


async def next_frame(sock: RawSocket) -> dict[str, Any]:
    frame = await sock.recv()
    assert frame is not None, f"closed {sock.close_code}"
    return frame


async def test_a_busy_socket_is_checkpointed_up_to_what_left_its_buffer(
    busy_host: tuple[RedisServer, Host],
) -> None:
    redis, host = busy_host
    room = "busy-room"
    # The test paces its reading: nothing is read ahead behind its back.
    slow = await RawSocket.open(host.host, host.port, rcvbuf=RECEIVE_BUFFER, token=token("slow"))
    try:
        session = (await slow.expect("welcome"))["session"]
        await slow.send(type="join", room=room)
        assert (await slow.expect("joined"))["seq"] == 0

        publisher = await Client.connect(host.ws, "publisher")
        try:
            await publisher.join(room)
            data = "x" * FRAME
            for _ in range(COUNT):  # the slow client reads nothing meanwhile
                await publisher.send(type="publish", room=room, data=data)
            # Its own copies, not its acks: a batch this large may outlast the 2 s ack deadline.
            await publisher.wait_messages(room, COUNT, timeout=60)
        finally:
            await publisher.close()

        read = 0
        while_busy: list[int] = []
        while read < COUNT:
            for _ in range(5):  # about 100 frames (3 MB) a second
                frame = await asyncio.wait_for(next_frame(slow), 10)
                if frame["type"] == "message":
                    read = frame["seq"]
                if read == COUNT:
                    break
            seen = checkpoint(redis, session, room)
            assert seen <= read + SLACK, f"checkpoint {seen} claims frames still in user space ({read} read)"
            if read + SLACK < COUNT:  # the server's buffer is surely not empty yet
                while_busy.append(seen)
            await asyncio.sleep(0.05)  # the slow reader under test, not a wait
    finally:
        slow.abandon()
    # Seconds of reading with a buffer that never emptied: the checkpoint must have moved.
    assert max(while_busy) > while_busy[0], (
        f"the checkpoint stayed at {while_busy[0]} while the buffer was busy"
    )


async def test_a_join_whose_session_write_fails_still_gets_its_replay(redis_server: RedisServer) -> None:
    """`joined` promises the replay that follows it: a failed session write after it (Redis
    refused it) is reported, but must not turn the member live at the cursor without it."""
    host = start_host("sessfail", redis_server.url, workers=1)
    writer = reader = None
    try:
        writer = await Client.connect(host.ws, "writer")
        await writer.join("sessfail-room")
        for n in range(5):
            await writer.request("publish", "ack", room="sessfail-room", data=n)
        reader = await Client.connect(host.ws, "reader")
        session = keys.session(reader.welcome["session"])
        redis_server.cli("DEL", session)
        redis_server.cli("SET", session, "not a hash")  # every session write now fails (WRONGTYPE)
        joined = await reader.join("sessfail-room", since=0)
        assert joined["seq"] == 5 and joined["recovered"] is True
        await reader.expect("error")  # the failed session write is reported
        replayed = await reader.wait_messages("sessfail-room", 5)
        assert [m["seq"] for m in replayed] == [1, 2, 3, 4, 5]
        await writer.request("publish", "ack", room="sessfail-room", data=5)
        assert [m["seq"] for m in await reader.wait_messages("sessfail-room", 6)][5:] == [6]
    finally:
        for client in (writer, reader):
            if client is not None:
                await client.close()
        host.stop()


async def test_a_failed_repeated_join_closes_for_a_resume(redis_server: RedisServer) -> None:
    """A repeated `join` takes the member off live delivery until its replay: when history
    cannot be read, going live again at the cursor would skip what came meanwhile."""
    host = start_host("rejoinfail", redis_server.url, workers=1)
    reader = None
    try:
        reader = await Client.connect(host.ws, "reader")
        await reader.join("rejoinfail-room")
        await reader.request("publish", "ack", room="rejoinfail-room", data=0)
        history = keys.room_history("rejoinfail-room")
        redis_server.cli("DEL", history)
        redis_server.cli("SET", history, "not a stream")  # history reads now fail (WRONGTYPE)
        await reader.send(type="join", room="rejoinfail-room", since=0)
        await asyncio.wait_for(reader.closed.wait(), 10)
        assert reader.close_code == 1013
    finally:
        if reader is not None:
            await reader.close()
        host.stop()


@dataclass(eq=False)
class _Idle:
    """A connection's parts that a checkpoint reads: a socket with nothing buffered."""

    session: str
    user: str = "u"
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    transport: Any = field(default_factory=lambda: _Drained())


class _Drained:
    def get_write_buffer_size(self) -> int:
        return 0


async def test_a_seconds_checkpoints_go_out_in_even_slices_each_connection_once(
    fresh_redis: RedisServer,
) -> None:
    """10,000 sessions written at once stalled the loop: each tick writes one slice."""
    broker = RedisBroker(fresh_redis.url, _NoChannels(), "0")
    await broker.start()
    try:
        sessions = Sessions(broker, lambda room: "e1", ttl=60)
        conns = [_Idle(f"s{i}") for i in range(25)]
        for conn in conns:
            conn.checkpoint.start("room", 7)
            sessions.track(conn)  # type: ignore[arg-type]
        gone = conns.pop()
        sessions.untrack(gone)  # type: ignore[arg-type]
        written: list[int] = []
        for index in range(CHECKPOINT_SLICES):
            before = len(fresh_redis.cli("KEYS", "*").split())
            await sessions.save_slice(index)
            written.append(len(fresh_redis.cli("KEYS", "*").split()) - before)
        assert sorted(set(written)) == [2, 3] and sum(written) == len(conns)
        for conn in conns:
            assert fresh_redis.cli("HGET", keys.session(conn.session), "r:room").strip() == "7:e1"
        assert fresh_redis.cli("EXISTS", keys.session(gone.session)).strip() == "0"
    finally:
        await broker.close()


async def test_a_rejoin_where_the_session_stands_writes_nothing_then_or_at_the_next_checkpoint(
    fresh_redis: RedisServer,
) -> None:
    """A resume storm rewrote every rejoined room's checkpoint, unchanged, twice: at the
    join and at the next periodic checkpoint. A room rejoined elsewhere is written once."""
    broker = RedisBroker(fresh_redis.url, _NoChannels(), "0")
    await broker.start()
    try:
        sessions = Sessions(broker, lambda room: "e1", ttl=60)
        await broker.save_sessions({"s1": {"user": "u", "r:room": "7:e1", "r:other": "3:e1"}}, 60)
        conn = _Idle("fresh")
        sessions.track(conn)  # type: ignore[arg-type]
        rejoin = await sessions.open(conn, "s1")  # type: ignore[arg-type]
        assert conn.session == "s1" and rejoin is not None and ("room", 7, "e1") in rejoin
        before = fresh_redis.calls()["hset"]
        await sessions.joined(conn, "room", 7, "e1")  # type: ignore[arg-type]
        await sessions.joined(conn, "other", 5, "e1")  # type: ignore[arg-type]
        sessions.rejoined(conn)  # type: ignore[arg-type]
        for index in range(CHECKPOINT_SLICES):
            await sessions.save_slice(index)
        assert fresh_redis.calls()["hset"] - before == 1
        saved = fresh_redis.cli("HGETALL", keys.session("s1")).split()
        assert dict(zip(saved[::2], saved[1::2], strict=True)) == {
            "user": "u",
            "r:room": "7:e1",
            "r:other": "5:e1",
        }
    finally:
        await broker.close()


async def test_a_checkpoint_written_before_the_rejoin_is_not_taken_for_the_session_read(
    fresh_redis: RedisServer,
) -> None:
    """The inbox is checkpointed from the moment the connection attaches: once that wrote
    it, the rejoin must write where it starts, though the session read said the same."""
    broker = RedisBroker(fresh_redis.url, _NoChannels(), "0")
    await broker.start()
    try:
        sessions = Sessions(broker, lambda room: "e1", ttl=60)
        await broker.save_sessions({"s1": {"user": "u", "r:@u": "4:e1"}}, 60)
        conn = _Idle("fresh")
        sessions.track(conn)  # type: ignore[arg-type]
        await sessions.open(conn, "s1")  # type: ignore[arg-type]
        conn.checkpoint.start("@u", 9)  # attached at the inbox's live position
        for index in range(CHECKPOINT_SLICES):
            await sessions.save_slice(index)  # a periodic checkpoint writes 9
        assert fresh_redis.cli("HGET", keys.session("s1"), "r:@u").strip() == "9:e1"
        await sessions.joined(conn, "@u", 4, "e1")  # type: ignore[arg-type]
        assert fresh_redis.cli("HGET", keys.session("s1"), "r:@u").strip() == "4:e1"
    finally:
        await broker.close()


class _NoChannels:
    def on_channel_message(self, channel: bytes, payload: bytes) -> None:
        raise AssertionError("no subscription was made")

    def on_resubscribed(self, channel: bytes) -> None:
        raise AssertionError("no subscription was made")
