"""The Python client's reconnect rules and state machine, without a server.

A fake connector hands out scripted sockets; `sleep` and `random` are injected, so the
reconnect schedule is read off exactly, with no time passing.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import aiohttp
import pytest
from rtc_client import Client, RtcError, backoff_delay, close_action
from rtc_client.policy import handshake_close_code, token_expiry


class FakeSocket:
    def __init__(self, url: str) -> None:
        self.url = url
        self.sent: list[dict[str, Any]] = []
        self.incoming: asyncio.Queue[aiohttp.WSMessage] = asyncio.Queue()
        self.close_code: int | None = None
        self.idle = asyncio.Event()  # the reader asks for a frame and none is waiting
        self.sent_one = asyncio.Event()

    def deliver(self, **frame: Any) -> None:
        self._put(aiohttp.WSMessage(aiohttp.WSMsgType.TEXT, json.dumps(frame), None))

    def drop(self, code: int, reason: str = "") -> None:
        self._put(aiohttp.WSMessage(aiohttp.WSMsgType.CLOSE, code, reason))

    def _put(self, message: aiohttp.WSMessage) -> None:
        self.idle.clear()
        self.incoming.put_nowait(message)

    async def receive(self) -> aiohttp.WSMessage:
        if self.incoming.empty():
            self.idle.set()
        return await self.incoming.get()

    async def send_str(self, data: str) -> None:
        self.sent.append(json.loads(data))
        self.sent_one.set()

    async def close(self, *, code: int = 1000, message: bytes = b"") -> bool:
        if self.close_code is None:
            self.close_code = code
            self._put(aiohttp.WSMessage(aiohttp.WSMsgType.CLOSED, None, None))
        return True

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [f for f in self.sent if f["type"] == kind]

    async def handled(self) -> None:
        """Until the client has handled every frame delivered so far: its reader handles
        one to the end (and sends what it answers) before it asks for the next."""
        await asyncio.wait_for(self.idle.wait(), 2)

    async def frame(self, kind: str, count: int = 1) -> dict[str, Any]:
        """The `count`th frame of `kind` the client sent, once it is sent."""
        while len(self.of(kind)) < count:
            self.sent_one.clear()
            await asyncio.wait_for(self.sent_one.wait(), 2)
        return self.of(kind)[count - 1]


class Harness:
    """Sockets made so far, sleeps asked for; `sleep` waits until the test lets it go."""

    def __init__(self) -> None:
        self.sockets: list[FakeSocket] = []
        self.made = asyncio.Event()
        self.sleeps: list[float] = []
        self.wake = asyncio.Event()
        self.slept = asyncio.Event()

    async def connect(self, url: str) -> FakeSocket:
        socket = FakeSocket(url)
        self.sockets.append(socket)
        self.made.set()
        return socket

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.slept.set()
        await self.wake.wait()
        self.wake.clear()

    async def first_socket(self) -> FakeSocket:
        while not self.sockets:
            self.made.clear()
            await asyncio.wait_for(self.made.wait(), 2)
        return self.sockets[0]

    async def next_socket(self) -> FakeSocket:
        count = len(self.sockets)
        self.wake.set()
        while len(self.sockets) == count:
            self.made.clear()
            await asyncio.wait_for(self.made.wait(), 2)
        return self.sockets[-1]

    async def next_sleep(self) -> float:
        count = len(self.sleeps)
        while len(self.sleeps) == count:
            self.slept.clear()
            await asyncio.wait_for(self.slept.wait(), 2)
        return self.sleeps[-1]

    def client(self, **options: Any) -> Client:
        options.setdefault("token", "t0")
        return Client(
            "ws://rtc.test/ws", connect=self.connect, sleep=self.sleep, random=lambda: 0.5, **options
        )


def welcome(socket: FakeSocket, **extra: Any) -> None:
    socket.deliver(
        **{"type": "welcome", "session": "S1", "user": "ann", "node": "n", "resumed": False, **extra}
    )


async def joined_room(harness: Harness, client: Client, socket: FakeSocket, name: str, seq: int) -> Any:
    joining = asyncio.ensure_future(client.join(name))
    join = await socket.frame("join", len(socket.of("join")) + 1)
    socket.deliver(type="joined", room=name, seq=seq, epoch="E", recovered=True, id=join["id"])
    return await asyncio.wait_for(joining, 2)


def test_policy_functions() -> None:
    assert backoff_delay(0, lambda: 0.999) == pytest.approx(0.4995)
    assert backoff_delay(3, lambda: 0.5) == 2.0
    assert backoff_delay(10, lambda: 1.0) == 20.0  # the cap
    assert backoff_delay(99, lambda: 1.0) == 20.0
    assert [close_action(c, False) for c in (1001, 1006, 1013, 1008, 1009, 4001, 4003)] == [
        "reconnect",
        "reconnect",
        "reconnect",
        "stop",
        "stop",
        "stop",
        "stop",
    ]
    assert close_action(4001, True) == "refresh"
    assert [handshake_close_code(s) for s in (401, 403, 503, 429)] == [4001, 1008, 1013, 1013]
    claims = base64.urlsafe_b64encode(json.dumps({"exp": 1234}).encode()).decode().rstrip("=")
    assert token_expiry(f"h.{claims}.s") == 1234.0
    assert token_expiry("junk") is None


async def test_reconnect_schedule_is_full_jitter_and_resets_after_welcome() -> None:
    harness = Harness()
    client = harness.client()
    connecting = asyncio.ensure_future(client.connect())
    socket = await harness.first_socket()
    for attempt in range(8):
        socket.drop(1006)
        assert await harness.next_sleep() == backoff_delay(attempt, lambda: 0.5)
        socket = await harness.next_socket()
    assert harness.sleeps[-1] == 10.0  # half of the 20 s cap
    welcome(socket)
    await asyncio.wait_for(connecting, 2)
    socket.drop(1006)
    assert await harness.next_sleep() == 0.25  # attempts start over after a welcome
    await client.close()


async def test_migrating_honours_reconnect_after_and_new_endpoint() -> None:
    harness = Harness()
    client = harness.client()
    connecting = asyncio.ensure_future(client.connect())
    socket = await harness.first_socket()
    welcome(socket)
    await connecting
    socket.deliver(
        type="status",
        status="migrating",
        details={"new_endpoint": "ws://other.test/ws", "reconnect_after": 1234, "session": "S1"},
    )
    socket.drop(1001, "draining")
    assert await harness.next_sleep() == 1.234
    moved = await harness.next_socket()
    assert moved.url.startswith("ws://other.test/ws?")
    assert "session=S1" in moved.url and "positions=1" in moved.url
    await client.close()


@pytest.mark.parametrize("code", [1008, 4001, 4003])
async def test_no_reconnect_after_final_close_codes(code: int) -> None:
    harness = Harness()
    client = harness.client()
    closed: list[int] = []
    stopped = asyncio.Event()
    client.on("closed", lambda event: (closed.append(event["code"]), stopped.set()))
    connecting = asyncio.ensure_future(client.connect())
    welcome(await harness.first_socket())
    await connecting
    harness.sockets[0].drop(code)
    await asyncio.wait_for(stopped.wait(), 2)
    assert (client.state, closed, harness.sleeps, len(harness.sockets)) == ("closed", [code], [], 1)
    await client.close()


async def test_4001_with_get_token_reconnects_with_a_new_token() -> None:
    harness = Harness()
    minted = iter(f"tok{i}" for i in range(1, 10))

    async def get_token() -> str:
        return next(minted)

    client = harness.client(token=None, get_token=get_token)
    connecting = asyncio.ensure_future(client.connect())
    welcome(await harness.first_socket())
    await connecting
    harness.sockets[0].drop(4001, "token expired")
    await harness.next_sleep()
    again = await harness.next_socket()
    assert "token=tok2" in again.url
    await client.close()


async def test_a_refused_upgrade_401_with_a_fixed_token_stops() -> None:
    async def refuse(url: str) -> Any:
        raise aiohttp.WSServerHandshakeError(None, (), status=401)  # type: ignore[arg-type]

    client = Client("ws://rtc.test/ws", token="t0", connect=refuse)
    with pytest.raises(RtcError):
        await asyncio.wait_for(client.connect(), 2)
    assert client.state == "closed"
    await client.close()


async def test_queue_resend_with_same_ids_and_exactly_once_order() -> None:
    harness = Harness()
    client = harness.client()
    connecting = asyncio.ensure_future(client.connect())
    first = await harness.first_socket()
    welcome(first)
    await connecting
    room = await joined_room(harness, client, first, "news", 4)
    got: list[int] = []
    room.on("message", lambda m: got.append(m["seq"]))
    first.drop(1006)
    await harness.next_sleep()
    publishes = [asyncio.ensure_future(room.publish({"n": i})) for i in range(2)]
    # A publish queues in its task's first step, before it awaits anything; both tasks
    # were scheduled before this one yields, so both steps run in this one loop turn.
    await asyncio.sleep(0)
    assert client.queued == 2
    second = await harness.next_socket()
    welcome(second, resumed=True)  # an older server: no `rooms`, so a `join since` follows
    await second.handled()
    rejoin = second.of("join")[-1]
    assert (rejoin["since"], rejoin["epoch"]) == (4, "E")
    assert second.of("publish") == []  # held until joined
    second.deliver(
        type="message", room="news", seq=7, **{"from": "x"}, data=0, ts=0
    )  # before our reply: unused
    second.deliver(type="joined", room="news", seq=6, epoch="E", recovered=True, id=rejoin["id"])
    for seq in (5, 6, 6, 7):
        second.deliver(type="message", room="news", seq=seq, **{"from": "x"}, data=seq, ts=0)
    await second.handled()
    ids = [f["id"] for f in second.of("publish")]
    assert len(ids) == 2
    second.drop(1006)  # unacked: sent again with the same ids
    await harness.next_sleep()
    third = await harness.next_socket()
    welcome(third, resumed=True)
    await third.handled()
    rejoin = third.of("join")[-1]
    assert rejoin["since"] == 7
    third.deliver(type="joined", room="news", seq=7, epoch="E", recovered=True, id=rejoin["id"])
    await third.handled()
    assert [f["id"] for f in third.of("publish")] == ids
    for seq, request_id in zip((8, 9), ids, strict=True):
        third.deliver(type="ack", room="news", seq=seq, id=request_id)
    assert await asyncio.wait_for(asyncio.gather(*publishes), 2) == [8, 9]
    for seq in (8, 9, 10):
        third.deliver(type="message", room="news", seq=seq, **{"from": "x"}, data=0, ts=0)
    third.deliver(type="gap", room="news", **{"from": 11, "to": 12})
    third.deliver(type="message", room="news", seq=13, **{"from": "x"}, data=0, ts=0)
    await third.handled()
    assert got == [5, 6, 7, 8, 9, 10, 13]
    await client.close()


async def test_resume_with_positions_sends_the_clients_own_seqs() -> None:
    harness = Harness()
    client = harness.client()
    connecting = asyncio.ensure_future(client.connect())
    first = await harness.first_socket()
    welcome(first)
    await connecting
    await joined_room(harness, client, first, "a", 7)
    first.deliver(type="direct", **{"from": "bob"}, seq=3, data=1, ts=0)
    await first.handled()
    first.drop(1006)
    await harness.next_sleep()
    second = await harness.next_socket()
    welcome(second, resumed=True, rooms=["a", "@ann", "old"])
    await second.handled()
    [resume] = second.of("resume")
    assert resume["rooms"] == {"@ann": 3, "a": 7}
    assert resume["epochs"] == {"a": "E"}
    assert [f["room"] for f in second.of("leave")] == ["old"]
    await client.close()


async def test_the_queue_is_bounded() -> None:
    harness = Harness()
    client = harness.client(max_queue=1)
    connecting = asyncio.ensure_future(client.connect())
    welcome(await harness.first_socket())
    await connecting
    room = await joined_room(harness, client, harness.sockets[0], "q", 0)
    pending = asyncio.ensure_future(room.publish(1))
    await harness.sockets[0].frame("publish")
    with pytest.raises(RtcError) as refused:
        await room.publish(2)
    assert refused.value.code == "queue_full"
    await client.close()
    with pytest.raises(RtcError):
        await pending
