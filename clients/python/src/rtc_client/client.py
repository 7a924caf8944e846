"""The asyncio WebSocket client: reconnects, resumes, and delivers each seq once, in order.

The same rules as the JavaScript client (docs/clients.md):
- reconnect with full-jitter exponential backoff (0.5 s base, 20 s cap); after a
  `migrating` status, after its `reconnect_after` and to its `new_endpoint`; never after
  1008, 1009 or an application close code (4000-4999), and after 4001 only with `get_token`;
- resume by session with the client's own positions (`positions=1`, then a `resume` frame);
  a server that does not take positions gets a `join` with `since` per room instead, and
  whatever it sends for a room before the reply to that join is not used;
- per room, a frame whose seq is not above the last delivered is dropped; a hole the
  server did not announce is asked for again (`join since`); an announced one is a `gap`;
- publishes wait in a bounded queue while disconnected and are sent again with the same
  `id` on the same session until acked, so the server sequences each once.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import json
import logging
import random as _random
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol
from urllib.parse import urlencode

import aiohttp

from rtc_client.policy import (
    BACKOFF_BASE,
    BACKOFF_CAP,
    backoff_delay,
    close_action,
    handshake_close_code,
    token_expiry,
)

__all__ = ["Client", "Room", "RtcError"]

log = logging.getLogger("rtc_client")

Frame = dict[str, Any]
Handler = Callable[[Any], Any]
_RETRY_CODES = frozenset({"unavailable", "rate_limited", "internal"})
_RETRY_DELAY = 0.5
_END = object()  # ends a room's async iteration


class RtcError(Exception):
    """A refused publish or request; `code` is the server's error code (or queue_full, closed)."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message


class WebSocketLike(Protocol):
    """What the client needs of a connection (aiohttp's ClientWebSocketResponse has it)."""

    @property
    def close_code(self) -> int | None: ...

    async def receive(self) -> aiohttp.WSMessage: ...

    async def send_str(self, data: str) -> None: ...

    async def close(self, *, code: int = 1000, message: bytes = b"") -> bool: ...


Connector = Callable[[str], Awaitable[WebSocketLike]]


class _Events:
    def __init__(self) -> None:
        self._handlers: dict[str, list[Handler]] = {}
        self._running: set[asyncio.Future[Any]] = set()  # coroutine handlers, kept referenced

    def on(self, event: str, handler: Handler) -> Callable[[], None]:
        """Call `handler(value)` on `event` (a coroutine function is run as a task)."""
        self._handlers.setdefault(event, []).append(handler)
        return lambda: self._handlers[event].remove(handler)

    def _emit(self, event: str, value: Any) -> None:
        for handler in list(self._handlers.get(event, ())):
            try:
                result = handler(value)
                if inspect.isawaitable(result):
                    task = asyncio.ensure_future(result)
                    self._running.add(task)
                    task.add_done_callback(self._running.discard)
            except Exception:
                log.exception("%s handler failed", event)


class Room(_Events):
    """A joined room: `publish`, `members`, `leave`; `async for msg in room` yields messages.

    Messages wait for `async for` until a `message` handler is added; from then on they go
    to the handlers only (nothing piles up for a loop that never runs).
    """

    def __init__(self, client: Client, name: str) -> None:
        super().__init__()
        self.client = client
        self.name = name
        self.seq: int | None = None  # last seq delivered to the application
        self.epoch: str | None = None
        self.joined_on = 0  # connection number of the last `joined` seen
        self.repairing: str | None = None  # id of our `join since` in flight
        self.gap_ok = False  # after `recovered: false` the next jump is a known gap
        self.left = False
        self._waiters: list[asyncio.Future[Room]] = []
        self._inbox: asyncio.Queue[Any] = asyncio.Queue()
        self._buffering = True

    def on(self, event: str, handler: Handler) -> Callable[[], None]:
        if event in ("message", "direct"):
            self._stop_buffering()
        return super().on(event, handler)

    def _stop_buffering(self) -> None:
        self._buffering = False
        while not self._inbox.empty():
            self._inbox.get_nowait()

    def _deliver(self, frame: Frame) -> None:
        if self._buffering:
            self._inbox.put_nowait(frame)
        self._emit(frame["type"], frame)

    async def publish(self, data: Any) -> int:
        """The seq, once acked; queued and retried with the same id across reconnects."""
        return await self.client._publish(self, data)

    async def members(self) -> Frame:
        """`{"users": [...], "count": N}` for the whole cluster."""
        reply = await self.client._request({"type": "members", "room": self.name})
        return {"users": reply["users"], "count": reply["count"]}

    async def leave(self) -> None:
        was_connected = self.client.state == "connected"
        self.client._forget(self)
        if was_connected:
            await self.client._request({"type": "leave", "room": self.name})

    def __aiter__(self) -> AsyncIterator[Frame]:
        return self

    async def __anext__(self) -> Frame:
        item = await self._inbox.get()
        if item is _END:
            self._inbox.put_nowait(_END)
            raise StopAsyncIteration
        frame: Frame = item
        return frame

    def _end(self) -> None:
        self._inbox.put_nowait(_END)


class _Pending:
    __slots__ = ("frame", "future", "room", "sent_on")

    def __init__(self, room: Room, frame: Frame, future: asyncio.Future[int]) -> None:
        self.room = room
        self.frame = frame
        self.future = future
        self.sent_on = 0


class Client(_Events):
    """One WebSocket at a time to `url` (ws://host:port/ws), kept up until `close()`.

    Events (`client.on(name, handler)`): connected, resumed, disconnected, closed, direct,
    error. Rooms have message, presence, gap, joined.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        get_token: Callable[[], Awaitable[str]] | None = None,
        max_queue: int = 1000,
        max_message_bytes: int = 65536,
        heartbeat: float = 20.0,
        backoff_base: float = BACKOFF_BASE,
        backoff_cap: float = BACKOFF_CAP,
        random: Callable[[], float] = _random.random,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.time,
        connect: Connector | None = None,
    ) -> None:
        super().__init__()
        if not token and get_token is None:
            raise TypeError("Client needs token= or get_token=")
        self.url = url
        self.state = "disconnected"  # connecting, connected, closed
        self.session: str | None = None
        self.user: str | None = None
        self.node: str | None = None  # the host serving the current connection
        self.rooms: dict[str, Room] = {}
        self.attempt = 0
        self.positions = True  # the server takes `positions=1` (cleared when it does not)
        self._token = token
        self._get_token = get_token
        self._max_queue = max_queue
        self._max_bytes = max_message_bytes
        self._heartbeat = heartbeat
        self._base = backoff_base
        self._cap = backoff_cap
        self._random = random
        self._sleep = sleep
        self._clock = clock
        self._connector = connect
        self._http: aiohttp.ClientSession | None = None
        self._ws: WebSocketLike | None = None
        self._conn = 0
        self._endpoint = url
        self._migrating: dict[str, Any] | None = None
        self._queue: list[_Pending] = []
        self._pending: dict[str, tuple[Frame, asyncio.Future[Frame]]] = {}
        self._ids = itertools.count(1)
        self._prefix = secrets.token_hex(4)
        self._task: asyncio.Task[None] | None = None
        self._first: asyncio.Future[None] | None = None
        self._side_tasks: set[asyncio.Task[Any]] = set()
        self._direct_handlers = False

    # -- public -------------------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect; returns after the first `welcome`, raises RtcError if the client stops first."""
        if self._task is None:
            self._first = asyncio.get_running_loop().create_future()
            self._task = asyncio.create_task(self._run())
        assert self._first is not None
        await asyncio.shield(self._first)

    async def join(self, name: str) -> Room:
        """Join a room; returns its handle once the server said `joined`."""
        if self.state == "closed":
            raise RtcError("closed", "client closed")
        room = self.rooms.get(name)
        if room is None:
            room = self.rooms[name] = Room(self, name)
        if room.joined_on == self._conn and self.state == "connected":
            return room
        waiter: asyncio.Future[Room] = asyncio.get_running_loop().create_future()
        room._waiters.append(waiter)
        if self.state == "connected" and len(room._waiters) == 1:
            await self._send_join(room)
        return await waiter

    async def direct(self, user: str, data: Any) -> int:
        """Send to every connection of `user`; the seq in that user's inbox."""
        reply = await self._request({"type": "direct", "to": user, "data": data})
        seq: int = reply["seq"]
        return seq

    def on(self, event: str, handler: Handler) -> Callable[[], None]:
        if event == "direct":  # direct messages go to handlers, not to `async for client.inbox`
            self._direct_handlers = True
            inbox = self.rooms.get(f"@{self.user}")
            if inbox is not None:
                inbox._stop_buffering()
        return super().on(event, handler)

    @property
    def inbox(self) -> Room:
        """This user's inbox: `async for msg in client.inbox` yields `direct` frames."""
        return self._inbox_room()

    @property
    def queued(self) -> int:
        """Publishes not acked yet."""
        return len(self._queue)

    async def reconnect(self) -> None:
        """Drop the socket and reconnect now, resuming the session."""
        if self._ws is not None:
            await self._ws.close(code=1000, message=b"reconnect")

    async def close(self) -> None:
        """Close for good: no reconnect; unacked publishes fail with RtcError('closed')."""
        self._stop(1000, "closed by the application")
        task, self._task = self._task, None
        ws, self._ws = self._ws, None
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for side in list(self._side_tasks):
            side.cancel()
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    # -- the connection loop --------------------------------------------------------------------

    async def _run(self) -> None:
        while self.state != "closed":
            code, reason, was_connected = await self._one_connection()
            if self.state == "closed":
                return
            self.state = "disconnected"
            action = close_action(code, self._get_token is not None)
            if was_connected:
                self._emit(
                    "disconnected", {"code": code, "reason": reason, "will_reconnect": action != "stop"}
                )
            if action == "stop":
                self._stop(code, reason)
                return
            if self._migrating is not None and code == 1001:
                delay = float(self._migrating.get("reconnect_after") or 0) / 1000
                self._endpoint = self._migrating.get("new_endpoint") or self._endpoint
            else:
                delay = backoff_delay(self.attempt, self._random, self._base, self._cap)
            self._migrating = None
            self.attempt += 1
            await self._sleep(delay)

    async def _one_connection(self) -> tuple[int, str, bool]:
        self.state = "connecting"
        try:
            token = await self._get_token() if self._get_token is not None else self._token
        except Exception as exc:
            self._emit("error", exc)
            return 1006, "get_token failed", False
        assert token
        self._token = token
        params = {"token": token}
        if self.session:
            params["session"] = self.session
            if self.positions:
                params["positions"] = "1"
        url = self._endpoint + ("&" if "?" in self._endpoint else "?") + urlencode(params)
        try:
            ws = await self._open(url)
        except aiohttp.WSServerHandshakeError as exc:
            return handshake_close_code(exc.status), f"upgrade refused: {exc.status}", False
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return 1006, f"cannot connect: {exc}", False
        self._conn += 1
        self._ws = ws
        code, reason = 1006, "connection lost"
        refresher: asyncio.Task[None] | None = None
        try:
            while True:
                msg = await ws.receive()
                if msg.type is aiohttp.WSMsgType.TEXT:
                    frame = json.loads(msg.data)
                    if frame.get("type") == "welcome" and self._get_token is not None:
                        refresher = self._spawn(self._refresh_before_expiry(self._conn))
                    await self._on_frame(frame)
                elif msg.type is aiohttp.WSMsgType.CLOSE:
                    code, reason = int(msg.data), str(msg.extra or "")
                    break
                elif msg.type in (
                    aiohttp.WSMsgType.CLOSED,
                    aiohttp.WSMsgType.CLOSING,
                    aiohttp.WSMsgType.ERROR,
                ):
                    code = ws.close_code or 1006
                    break
        finally:
            if refresher is not None:
                refresher.cancel()
            if self._ws is ws:
                self._ws = None
            with contextlib.suppress(Exception):
                await ws.close()
        was_connected = self.state == "connected"
        for _, future in self._pending.values():
            if not future.done():
                future.set_exception(RtcError("disconnected", "connection lost"))
        self._pending.clear()  # joins are sent again after the next welcome
        for item in self._queue:
            item.sent_on = 0
        return code, reason, was_connected

    async def _open(self, url: str) -> WebSocketLike:
        if self._connector is not None:
            return await self._connector(url)
        if self._http is None:
            self._http = aiohttp.ClientSession()
        return await self._http.ws_connect(url, heartbeat=self._heartbeat, max_msg_size=0)

    def _stop(self, code: int, reason: str) -> None:
        if self.state == "closed":
            return
        self.state = "closed"
        self._conn += 1
        error = RtcError("closed", f"{reason} ({code})")
        for item in self._queue:
            if not item.future.done():
                item.future.set_exception(error)
        self._queue.clear()
        for _, future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._pending.clear()
        for room in self.rooms.values():
            for waiter in room._waiters:
                if not waiter.done():
                    waiter.set_exception(error)
            room._end()
        if self._first is not None and not self._first.done():
            self._first.set_exception(error)
        self._emit("closed", {"code": code, "reason": reason})

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)
        return task

    async def _send(self, frame: Frame) -> None:
        """Write a frame; on a connection already going, drop it: the reader sees the close,
        and what awaits an answer is resent (publishes) or failed (requests) from there."""
        if self._ws is None:
            return
        try:
            await self._ws.send_str(json.dumps(frame))
        except ConnectionResetError:  # aiohttp's ClientConnectionResetError: closing transport
            log.debug("frame not sent: the connection is closing")

    def _id(self, kind: str) -> str:
        return f"{kind}:{self._prefix}:{next(self._ids)}"

    async def _request(self, frame: Frame) -> Frame:
        if self.state != "connected":
            raise RtcError("disconnected", "not connected")
        request_id = self._id("r")
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = (frame, future)
        await self._send({**frame, "id": request_id})
        return await future

    # -- frames -----------------------------------------------------------------------------

    async def _on_frame(self, frame: Frame) -> None:
        kind = frame.get("type")
        if kind == "welcome":
            await self._on_welcome(frame)
        elif kind == "joined":
            await self._on_joined(frame)
        elif kind == "message":
            await self._on_sequenced(self.rooms.get(frame.get("room", "")), frame)
        elif kind == "direct":
            await self._on_sequenced(self._inbox_room(), frame)
        elif kind == "ack":
            self._on_ack(frame)
        elif kind == "gap":
            self._on_gap(frame)
        elif kind == "presence":
            room = self.rooms.get(frame.get("room", ""))
            if room is not None:
                room._emit("presence", frame)
        elif kind == "status":
            if frame.get("status") == "migrating":
                self._migrating = frame.get("details") or {}
        elif kind == "error":
            await self._on_error(frame)
        else:
            self._resolve(frame)

    def _inbox_room(self) -> Room:
        name = f"@{self.user}"
        room = self.rooms.get(name)
        if room is None:
            room = self.rooms[name] = Room(self, name)
            if self._direct_handlers:
                room._stop_buffering()
        return room

    async def _on_welcome(self, frame: Frame) -> None:
        resumed = bool(frame.get("resumed")) and frame.get("session") == self.session
        self.session = frame["session"]
        self.user = frame["user"]
        self.node = frame.get("node")
        self.state = "connected"
        self.attempt = 0
        inbox = self._inbox_room()
        inbox.joined_on = self._conn
        rooms = [r for r in self.rooms.values() if r is not inbox]
        if resumed and isinstance(frame.get("rooms"), list):
            # The server waits for our positions and replays each room from them.
            known = set(frame["rooms"])
            positions = {
                r.name: r.seq
                for r in (inbox, *rooms)
                if r.seq is not None and (r.name in known or r is inbox)
            }
            epochs = {r.name: r.epoch for r in (inbox, *rooms) if r.name in positions and r.epoch}
            await self._send({"type": "resume", "rooms": positions, "epochs": epochs})
            for room in rooms:
                if room.name not in known:
                    await self._send_join(room)
            for name in known - set(self.rooms):
                await self._send({"type": "leave", "room": name})
        else:
            if resumed:
                self.positions = False  # an older server: it ignored positions=1
            if inbox.seq is not None:
                await self._send_join(inbox)
            for room in rooms:
                await self._send_join(room)
        if resumed:
            self._emit("resumed", frame)
        self._emit("connected", frame)
        if self._first is not None and not self._first.done():
            self._first.set_result(None)
        await self._flush_queue()

    async def _send_join(self, room: Room) -> None:
        request_id = self._id("j")
        frame: Frame = {"type": "join", "room": room.name, "id": request_id}
        if room.seq is not None:
            frame["since"] = room.seq
            if room.epoch:
                frame["epoch"] = room.epoch
            room.repairing = request_id
        self._pending[request_id] = (frame, asyncio.get_running_loop().create_future())
        await self._send(frame)

    async def _on_joined(self, frame: Frame) -> None:
        room = self.rooms.get(frame["room"])
        if "id" in frame:
            self._pending.pop(frame["id"], None)
        if room is None or room.left:
            return
        if room.repairing is not None and frame.get("id") != room.repairing:
            return  # superseded by our own `join since`
        room.repairing = None
        room.joined_on = self._conn
        if room.seq is None:
            room.seq = frame["seq"]
        elif room.epoch and frame["epoch"] != room.epoch:
            # History was lost (Redis restarted): seqs start over in the new epoch.
            room._emit("gap", {"room": room.name, "from": room.seq + 1, "to": None, "epoch": frame["epoch"]})
            room.seq = 0
            room.gap_ok = True
        elif frame.get("recovered") is False:
            room.gap_ok = True  # what history lost shows as a jump: announce it, do not repair
        room.epoch = frame["epoch"]
        room._emit("joined", frame)
        for waiter in room._waiters:
            if not waiter.done():
                waiter.set_result(room)
        room._waiters.clear()
        await self._flush_queue()

    async def _on_sequenced(self, room: Room | None, frame: Frame) -> None:
        if room is None or room.left:
            return
        seq: int = frame["seq"]
        if room.seq is None:
            room.seq = seq - 1  # the inbox: its first direct message sets the position
        if room.repairing is not None or seq <= room.seq:
            return  # replayed again, or superseded by our own replay
        if seq > room.seq + 1:
            if not room.gap_ok and self.state == "connected":
                await self._send_join(room)  # a hole nobody announced: replay from our position
                return
            room._emit("gap", {"room": room.name, "from": room.seq + 1, "to": seq - 1})
        room.gap_ok = False
        room.seq = seq
        room._deliver(frame)
        if frame["type"] == "direct":
            self._emit("direct", frame)

    def _on_gap(self, frame: Frame) -> None:
        room = self.rooms.get(frame["room"])
        if room is None or room.seq is None or frame["to"] <= room.seq:
            return
        room._emit("gap", {"room": room.name, "from": max(frame["from"], room.seq + 1), "to": frame["to"]})
        room.seq = frame["to"]

    def _on_ack(self, frame: Frame) -> None:
        for item in self._queue:
            if item.frame["id"] == frame.get("id"):
                self._queue.remove(item)
                if not item.future.done():
                    item.future.set_result(frame["seq"])
                return
        self._resolve(frame)

    def _resolve(self, frame: Frame) -> None:
        pending = self._pending.pop(frame["id"], None) if "id" in frame else None
        if pending is not None and not pending[1].done():
            pending[1].set_result(frame)

    async def _on_error(self, frame: Frame) -> None:
        error = RtcError(frame.get("code", "internal"), frame.get("message", ""))
        request_id = frame.get("id")
        for item in self._queue:
            if item.frame["id"] == request_id:
                if error.code in _RETRY_CODES or (error.code == "not_joined" and not item.room.left):
                    item.sent_on = 0  # sent again shortly, with the same id
                    self._spawn(self._retry_later(self._conn))
                else:
                    self._queue.remove(item)
                    if not item.future.done():
                        item.future.set_exception(error)
                return
        pending = self._pending.pop(request_id, None) if request_id is not None else None
        if pending is None:
            self._emit("error", error)
            return
        sent, future = pending
        room = self.rooms.get(sent.get("room", "")) if sent["type"] == "join" else None
        if room is None:
            if not future.done():
                future.set_exception(error)
        elif error.code in _RETRY_CODES:
            self._spawn(self._join_later(room, self._conn))  # Redis or the owner was busy
        else:
            for waiter in room._waiters:
                if not waiter.done():
                    waiter.set_exception(error)
            room._waiters.clear()
            self._forget(room)
            room._emit("error", error)
            self._emit("error", error)

    async def _retry_later(self, conn: int) -> None:
        await self._sleep(_RETRY_DELAY)
        if conn == self._conn:
            await self._flush_queue()

    async def _join_later(self, room: Room, conn: int) -> None:
        await self._sleep(_RETRY_DELAY)
        if conn == self._conn and self.state == "connected" and not room.left:
            await self._send_join(room)

    # -- publishing ------------------------------------------------------------------------------

    async def _publish(self, room: Room, data: Any) -> int:
        if room.left or self.state == "closed":
            raise RtcError("closed", "room left or client closed")
        if len(self._queue) >= self._max_queue:
            raise RtcError("queue_full", "too many unacked publishes")
        frame = {"type": "publish", "room": room.name, "data": data, "id": self._id("p")}
        if len(json.dumps(frame).encode()) > self._max_bytes:
            raise RtcError("too_large", "message too large")
        item = _Pending(room, frame, asyncio.get_running_loop().create_future())
        self._queue.append(item)
        await self._flush_queue()
        return await item.future

    async def _flush_queue(self) -> None:
        if self.state != "connected":
            return
        conn = self._conn
        for item in list(self._queue):
            if item.sent_on != conn and item.room.joined_on == conn and item.room.repairing is None:
                item.sent_on = conn
                await self._send(item.frame)
            if conn != self._conn:
                return

    def _forget(self, room: Room) -> None:
        self.rooms.pop(room.name, None)
        room.left = True
        for item in [i for i in self._queue if i.room is room]:
            self._queue.remove(item)
            if not item.future.done():
                item.future.set_exception(RtcError("not_joined", "room left"))
        room._end()

    # -- authorization ----------------------------------------------------------------------------

    async def _refresh_before_expiry(self, conn: int) -> None:
        """Fetch a new token before this one expires and hand it over (`refresh`)."""
        assert self._get_token is not None
        while conn == self._conn:
            exp = token_expiry(self._token or "")
            if exp is None:
                return
            lifetime = exp - self._clock()
            await self._sleep(max(1.0, lifetime - min(60.0, lifetime / 5)))
            try:
                token = await self._get_token()
            except Exception as exc:
                self._emit("error", exc)
                continue
            if conn != self._conn or self.state != "connected":
                return
            self._token = token
            await self._send({"type": "refresh", "token": token, "id": self._id("t")})
