"""A protocol-aware WebSocket test client on aiohttp."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

from tests.rtcproc import token as make_token
from tests.rtcproc import until


class Client:
    """One connection; frames are queued by a reader task so tests await what they expect."""

    def __init__(
        self, ws: aiohttp.ClientWebSocketResponse, session: aiohttp.ClientSession, user: str
    ) -> None:
        self.ws = ws
        self.session = session
        self.user = user
        self.frames: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.seen: list[dict[str, Any]] = []
        self.closed = asyncio.Event()
        self.close_code: int | None = None
        self.welcome: dict[str, Any] = {}
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def connect(
        cls,
        url: str,
        user: str,
        *,
        token: str | None = None,
        session: str | None = None,
        headers: dict[str, str] | None = None,
        **claims: Any,
    ) -> Client:
        http = aiohttp.ClientSession()
        params = {"token": token or make_token(user, **claims)}
        if session:
            params["session"] = session
        try:
            ws = await http.ws_connect(url, params=params, headers=headers, autoping=True, max_msg_size=0)
        except BaseException:
            await http.close()
            raise
        client = cls(ws, http, user)
        client.welcome = await client.expect("welcome")
        return client

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                frame = orjson.loads(msg.data)
                self.seen.append(frame)
                await self.frames.put(frame)
        self.close_code = self.ws.close_code
        self.closed.set()

    async def send(self, **frame: Any) -> None:
        await self.ws.send_str(orjson.dumps(frame).decode())

    async def send_raw(self, text: str) -> None:
        await self.ws.send_str(text)

    async def next(self, timeout: float = 5.0) -> dict[str, Any]:
        return await asyncio.wait_for(self.frames.get(), timeout)

    async def expect(self, kind: str, timeout: float = 5.0, **match: Any) -> dict[str, Any]:
        """The next frame of `kind` (matching fields); other frames are skipped but kept in `seen`."""
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.frames.get()
                if frame.get("type") == kind and all(frame.get(k) == v for k, v in match.items()):
                    return frame

    async def request(self, kind: str, reply: str, timeout: float = 5.0, **fields: Any) -> dict[str, Any]:
        await self.send(type=kind, **fields)
        return await self.expect(reply, timeout)

    async def join(self, room: str, **fields: Any) -> dict[str, Any]:
        return await self.request("join", "joined", room=room, **fields)

    async def wait_frames(
        self, kind: str, count: int, timeout: float = 10.0, **match: Any
    ) -> list[dict[str, Any]]:
        """Until `count` frames of `kind` (matching fields) have arrived, counting those seen."""

        def found() -> list[dict[str, Any]]:
            return [
                f for f in self.seen if f.get("type") == kind and all(f.get(k) == v for k, v in match.items())
            ]

        async with asyncio.timeout(timeout):
            while len(found()) < count:
                await self.frames.get()
        return found()

    async def wait_messages(self, room: str, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Until `count` messages of `room` have arrived (counting those already seen)."""
        return await self.wait_frames("message", count, timeout, room=room)

    async def frames_until(self, stop: asyncio.Event) -> AsyncIterator[dict[str, Any]]:
        """Frames as they arrive, until the socket closes (what came before the close is
        still yielded) or `stop` is set."""
        stopping = asyncio.ensure_future(stop.wait())
        closed = asyncio.ensure_future(self.closed.wait())
        try:
            while True:
                getter = asyncio.ensure_future(self.frames.get())
                done, _ = await asyncio.wait({getter, closed, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done and getter.cancel():
                    break
                yield getter.result()  # done, or done just as it was cancelled
            if self.closed.is_set():
                while not self.frames.empty():
                    yield self.frames.get_nowait()
        finally:
            stopping.cancel()
            closed.cancel()

    def messages(self, room: str) -> list[dict[str, Any]]:
        return [f for f in self.seen if f.get("type") == "message" and f.get("room") == room]

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self.session.close()


class ResumingClient:
    """A member that follows the protocol's recovery rules, as a real client library would.

    On `migrating` or any close it reconnects (to the next URL, or `new_endpoint`) with its
    session; it de-duplicates by seq and records every seq it delivered per room, and every
    `gap` the server reported.
    """

    def __init__(self, urls: list[str], user: str, rooms: list[str]) -> None:
        self.urls = urls
        self.user = user
        self.rooms = rooms
        self.seqs: dict[str, list[int]] = {room: [] for room in rooms}
        self.gaps: list[dict[str, Any]] = []
        self.joins: list[dict[str, Any]] = []  # every `joined`, resumed ones too
        self.errors: list[dict[str, Any]] = []  # a failed rejoin shows here, not as a gap
        self.close_codes: list[int | None] = []
        self.migrations = 0
        self.reconnects = 0
        self.session: str | None = None
        self.welcomes: list[dict[str, Any]] = []
        self._url_index = 0
        self._stop = asyncio.Event()
        self._joined = asyncio.Event()
        self._joined_rooms: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._joined.wait(), 10)

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.wait_for(self._task, 15)

    def delivered(self, room: str) -> set[int]:
        return set(self.seqs[room])

    def last(self, room: str) -> int:
        """The highest seq of `room` delivered so far (0 before the first)."""
        return self.seqs[room][-1] if self.seqs[room] else 0

    async def _run(self) -> None:
        while not self._stop.is_set():
            url = self.urls[self._url_index % len(self.urls)]
            try:
                client = await Client.connect(url, self.user, session=self.session)
            except (aiohttp.ClientError, OSError, TimeoutError):
                await asyncio.sleep(0.05)  # the host refused: try again, as a client library would
                self._url_index += 1
                continue
            self.welcomes.append(client.welcome)
            if self.session is not None:
                self.reconnects += 1
            self.session = client.welcome["session"]
            if not client.welcome["resumed"]:
                for room in self.rooms:
                    last = self.last(room)
                    await client.send(type="join", room=room, **({"since": last} if last else {}))
            await self._consume(client)
            await client.close()

    async def _consume(self, client: Client) -> None:
        async for frame in client.frames_until(self._stop):
            if self._on_frame(frame) and not client.closed.is_set():
                self._url_index += 1  # migrating: the next URL (a close moves on by itself)
        if client.closed.is_set():
            self.close_codes.append(client.close_code)
            self._url_index += 1

    def _on_frame(self, frame: dict[str, Any]) -> bool:
        kind = frame["type"]
        if kind == "joined" and frame["room"] in self.seqs:
            self.joins.append(frame)
            self._joined_rooms.add(frame["room"])
            if self._joined_rooms == set(self.rooms):
                self._joined.set()
        elif kind == "message" and frame["room"] in self.seqs:
            seen = self.seqs[frame["room"]]
            if not seen or frame["seq"] > seen[-1]:
                seen.append(frame["seq"])
        elif kind == "gap":
            self.gaps.append(frame)
        elif kind == "error":
            self.errors.append(frame)
        elif kind == "status" and frame.get("status") == "migrating":
            self.migrations += 1
            return True
        return False


class ResilientPublisher:
    """Publishes `1, 2, 3, ...` to a room at a steady pace, as a careful client library would.

    It reconnects with its session when its socket is migrated or dropped, and re-sends every
    publish not acked yet with the same `id` (the server de-duplicates per session and id),
    so each value is sequenced exactly once. `acked` maps value -> seq.
    """

    def __init__(self, urls: list[str], room: str, interval: float = 0.01, user: str = "publisher") -> None:
        self.urls, self.room, self.interval, self.user = urls, room, interval, user
        self.acked: dict[int, int] = {}
        self.errors: list[dict[str, Any]] = []
        self.reconnects = 0
        self._pending: dict[int, float] = {}
        self._next = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._session: str | None = None
        self._url_index = 0

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self, timeout: float = 15.0) -> int:
        """Stop publishing, wait until everything sent is acked; returns the last seq."""
        self._stop.set()
        assert self._task is not None
        await asyncio.wait_for(self._task, timeout)
        assert not self._pending, f"never acked: {sorted(self._pending)[:10]}"
        return self.last_seq

    @property
    def last_seq(self) -> int:
        """The highest seq acked so far (0 before the first ack)."""
        return max(self.acked.values(), default=0)

    async def _run(self) -> None:
        while True:
            url = self.urls[self._url_index % len(self.urls)]
            try:
                client = await Client.connect(url, self.user, session=self._session)
            except (aiohttp.ClientError, OSError, TimeoutError):
                self._url_index += 1
                await asyncio.sleep(0.05)  # the host refused: try again, as a client library would
                continue
            if self._session is not None:
                self.reconnects += 1
            self._session = client.welcome["session"]
            try:
                if not client.welcome["resumed"]:
                    await client.send(type="join", room=self.room)
                await client.expect("joined", room=self.room)
                for value in sorted(self._pending):  # re-send what was never acked
                    await client.send(type="publish", room=self.room, data=value, id=value)
                if await self._publish(client):
                    return
            except (aiohttp.ClientError, ConnectionError, TimeoutError):
                pass
            finally:
                await client.close()
            self._url_index += 1

    async def _publish(self, client: Client) -> bool:
        """Publish until stopped (True) or the socket goes away (False)."""
        while not client.closed.is_set():
            while not client.frames.empty():
                self._on_frame(client.frames.get_nowait())
            if self._stop.is_set():
                if not self._pending:
                    return True
            else:
                self._next += 1
                self._pending[self._next] = time.monotonic()
                await client.send(type="publish", room=self.room, data=self._next, id=self._next)
            for value, sent in list(self._pending.items()):
                if time.monotonic() - sent > 3.0:  # `unavailable` or lost: retry, same id
                    self._pending[value] = time.monotonic()
                    await client.send(type="publish", room=self.room, data=value, id=value)
            await asyncio.sleep(self.interval)  # the publishing pace, not a wait
        while not client.frames.empty():
            self._on_frame(client.frames.get_nowait())
        return False

    def _on_frame(self, frame: dict[str, Any]) -> None:
        if frame["type"] == "ack" and frame.get("room") == self.room:
            value = frame["id"]
            self._pending.pop(value, None)
            previous = self.acked.setdefault(value, frame["seq"])
            assert previous == frame["seq"], f"value {value} sequenced twice"
        elif frame["type"] == "error":
            self.errors.append(frame)


FLOW = 20  # messages every member must receive to show that traffic flows (before, after a change)


async def all_reached(members: list[ResumingClient], room: str, seq: int, timeout: float = 20.0) -> None:
    """Until every member has delivered `room` up to `seq`: traffic has flowed to all of them.

    After a drain, a roll or a kill this is the event that says everyone is back; waiting
    for `publisher.last_seq + n` says that n more messages reached every member.
    """

    def behind() -> str:
        lagging = {m.user: m.last(room) for m in members if m.last(room) < seq}
        return f"every member of {room} at seq {seq} (behind, at their last seq: {lagging})"

    await until(lambda: all(m.last(room) >= seq for m in members), timeout, behind)


async def start_traffic(members: list[ResumingClient], publisher: ResilientPublisher) -> None:
    """Members joined and the publisher's messages reaching all of them: ready for a disruption."""
    await asyncio.gather(*(m.start() for m in members))
    await publisher.start()
    await all_reached(members, publisher.room, FLOW)


async def stop_traffic(members: list[ResumingClient], publisher: ResilientPublisher) -> int:
    """Once traffic reaches every member again (after the disruption), stop the publisher,
    then each member once it has the last seq; returns that seq."""
    await all_reached(members, publisher.room, publisher.last_seq + FLOW)
    last = await publisher.stop()
    await all_reached(members, publisher.room, last)
    for member in members:
        await member.stop()
    return last


def assert_complete(members: list[ResumingClient], room: str, last: int) -> None:
    """Every member delivered every seq up to `last`, and no gap was reported."""
    for member in members:
        missing = set(range(1, last + 1)) - member.delivered(room)
        assert not missing, (
            f"{member.user} missed {sorted(missing)[:10]} (gaps: {member.gaps}; joined: {member.joins}; "
            f"errors: {member.errors}; closes: {member.close_codes})"
        )
        assert not member.gaps, f"{member.user} got gaps {member.gaps}"
    resumed = sum(m.reconnects for m in members)
    print(f"\n{room}: {last} published, 0 lost, for {len(members)} members ({resumed} resumes)")
