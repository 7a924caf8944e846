"""The `/ws` endpoint: the upgrade's checks, the session, and each frame to its command.

The handler is thin: it checks the request, opens or resumes the session, then reads
frames and hands each command to the `Node`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import WSMessage, WSMsgType, web

from rtc import metrics
from rtc.appstate import STATE, WorkerState, client_address, principal_of
from rtc.auth import LEEWAY_SECONDS, Principal
from rtc.broker import LOST
from rtc.connection import Connection
from rtc.errors import AuthError, CloseCode, ErrorCode, ProtocolError
from rtc.log import describe
from rtc.protocol import (
    Direct,
    Join,
    Leave,
    Members,
    Ping,
    Publish,
    Refresh,
    Resume,
    encode,
    parse,
    request_id_of,
)
from rtc.ratelimit import AbuseWindow, TokenBucket
from rtc.routing.sessions import Rejoin

__all__ = ["POSITIONS_WAIT", "websocket"]

log = logging.getLogger("rtc.websocket")

_WELCOMED = "rtc.welcomed"
POSITIONS_WAIT = 5.0  # SPEC 4: how long a `positions=1` resume waits for the `resume` frame
_RECEIVED = metrics.BatchedCounter(metrics.MESSAGES_RECEIVED)  # per frame: written in batches


def _reject(status: int, reason: str, text: str) -> web.HTTPException:
    """A refused upgrade: counted by reason, answered with a JSON body that names it."""
    metrics.HANDSHAKE_REJECTED.labels(reason).inc()
    metrics.ERRORS.inc()
    body = orjson.dumps({"error": reason, "message": text}).decode()
    return _STATUS[status](text=body, content_type="application/json")


_STATUS: dict[int, type[web.HTTPException]] = {
    401: web.HTTPUnauthorized,
    403: web.HTTPForbidden,
    429: web.HTTPTooManyRequests,
    503: web.HTTPServiceUnavailable,
}


async def websocket(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    settings = state.settings
    if state.draining:
        raise _reject(503, "draining", "host is draining: reconnect elsewhere")
    if state.full():
        raise _reject(503, "full", "host is full")
    origin = request.headers.get("Origin")
    if settings.allowed_origins and origin not in settings.allowed_origins:
        raise _reject(403, "origin", "origin not allowed")
    address = client_address(request, settings)
    # Before the token: every attempt spends one, so neither a reconnect storm nor a token
    # guesser gets past the rate, and a refused upgrade costs no signature check.
    if settings.connect_rate and not state.host_connections.connect_rate.take(
        address, settings.connect_rate, settings.connect_burst, time.monotonic()
    ):
        raise _reject(429, "connect_rate", "too many upgrades from this address: slow down")
    try:
        principal = principal_of(request, state.verifier)
    except AuthError as exc:
        log.info("handshake refused: %s", exc)
        raise _reject(401, "auth", "missing, invalid or expired token") from None
    if (
        settings.max_connections_per_ip
        and state.host_connections.from_address(address) >= settings.max_connections_per_ip
    ):
        raise _reject(429, "per_ip", "too many connections from this address")

    state.opening += 1
    slot = _UpgradeSlot(state.upgrades)
    try:
        await slot.take()
        if state.draining:  # it began while this upgrade waited for its turn
            raise _reject(503, "draining", "host is draining: reconnect elsewhere")
        return await _upgrade(request, state, principal, address, slot)
    finally:
        slot.release()
        if not request.get(_WELCOMED):
            state.opening -= 1


@dataclass(slots=True)
class _UpgradeSlot:
    """One of the worker's UPGRADES_IN_FLIGHT, held from before the 101 to `welcome`."""

    gate: asyncio.Semaphore
    held: bool = False

    async def take(self) -> None:
        await self.gate.acquire()
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.gate.release()


async def _upgrade(
    request: web.Request, state: WorkerState, principal: Principal, address: str, slot: _UpgradeSlot
) -> web.WebSocketResponse:
    settings = state.settings
    ws = web.WebSocketResponse(
        max_msg_size=settings.max_message_bytes + 1,  # aiohttp refuses sizes >= its limit
        compress=False,
        autoclose=False,
        autoping=False,  # pings are answered below; silent peers are found by `rtc.keepalive`
    )
    await ws.prepare(request)
    assert request.transport is not None
    state.host_connections.add_address(state.slot_index, address, 1)
    conn = Connection(
        ws,
        request.transport,
        principal,
        secrets.token_urlsafe(16),
        address,
        TokenBucket(settings.rate, settings.rate_burst, time.monotonic()),
        settings.send_queue_bytes,
        state.worker,
    )
    metrics.ACTIVE_CONNECTIONS.inc()
    metrics.TOTAL_CONNECTIONS.inc()
    connections = metrics.CONNECTIONS.labels(state.worker)
    connections.inc()
    state.open_count += 1
    state.host_connections.set(state.slot_index, state.open_count)
    expiry = _ExpiryTimer(conn)
    try:
        positions = request.query.get("positions") == "1"
        try:
            resumed = await _open_session(state, conn, request.query.get("session"), positions)
        except (ProtocolError, *LOST) as exc:  # Redis down or full: no session can be kept
            log.warning("connection refused: Redis: %s", exc, extra={"conn": conn.id})
            await ws.close(code=CloseCode.TRY_AGAIN, message=b"unavailable: try again later")
            return ws
        request[_WELCOMED] = conn.welcomed = True  # from here on a drain migrates it
        state.opening -= 1
        slot.release()  # the next upgrade may go on while this connection lives
        if resumed is not None and not await _rejoin(state, conn, resumed, positions):
            return ws
        await _serve(state, conn)
    finally:
        expiry.cancel()
        state.host_connections.add_address(state.slot_index, address, -1)
        metrics.ACTIVE_CONNECTIONS.dec()
        connections.dec()
        state.open_count -= 1
        state.host_connections.set(state.slot_index, state.open_count)
        await state.node.detach(conn)
    return ws


async def _open_session(
    state: WorkerState, conn: Connection, sid: str | None, positions: bool
) -> list[Rejoin] | None:
    """Restore a session when asked, attach, and greet. Returns the rooms to rejoin, the
    inbox first (always among them: it is replayed before its live frames flow)."""
    node = state.node
    # Concurrent calls share a Redis round trip (the broker pipelines them); the inbox
    # membership starts after, once it is known whether the inbox is to be replayed.
    rejoin, _ = await asyncio.gather(node.sessions.open(conn, sid), node.open_inbox(conn))
    await node.attach(conn, held=rejoin is not None)
    welcome: dict[str, Any] = {"resumed": rejoin is not None}
    if positions and rejoin is not None:
        welcome["rooms"] = sorted(room for room, _, _ in rejoin)
    # The inbox is open, so `attach` did not wait: nothing of it can go out before `welcome`.
    conn.send(encode("welcome", session=conn.session, user=conn.user, node=state.settings.node_id, **welcome))
    return rejoin


async def _rejoin(
    state: WorkerState,
    conn: Connection,
    rooms: list[Rejoin],
    positions: bool,
) -> bool:
    """Rejoin a resumed session's rooms, from the client's positions when it sends them.

    Returns False when the connection ended meanwhile.
    """
    given: Resume | None = None
    first: WSMessage | None = None
    if positions:
        given, first = await _await_positions(conn)
    for room, since, epoch in rooms:
        if given is not None and room in given.rooms:
            since, epoch = given.rooms[room], given.epochs.get(room, epoch)
        elif since is None:  # not in the session (the inbox only): from where `attach` began
            since = conn.checkpoint.delivered.get(room)
        await _run(state, conn, Join(room, since, epoch))
    state.node.sessions.rejoined(conn)
    return first is None or await _dispatch(state, conn, first)


async def _await_positions(conn: Connection) -> tuple[Resume | None, WSMessage | None]:
    """The first frame after a resumed `welcome`, for up to POSITIONS_WAIT seconds: the
    client's positions, or (anything else) the message to handle once the rooms rejoined.
    Pings and pongs before it are answered and passed over: they take no frame's turn."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + POSITIONS_WAIT
    try:
        msg = await conn.ws.receive(timeout=POSITIONS_WAIT)
        while msg.type in _CONTROL:
            conn.quiet = 0  # heard: a pong to the keep-alive's ping keeps it while it waits
            await _control(conn, msg)
            msg = await conn.ws.receive(timeout=max(0.001, deadline - loop.time()))  # 0: none
    except TimeoutError:
        return None, None
    conn.quiet = 0
    if msg.type is WSMsgType.TEXT:
        try:
            command = parse(msg.data)
        except ProtocolError:
            return None, msg
        if isinstance(command, Resume):
            _RECEIVED.inc()
            _admit(conn)  # it spends a token like any frame (the first one never runs out)
            return command, None
    return None, msg


class _ExpiryTimer:
    """Closes 4001 when the token expires without a refresh: a timer, not a task."""

    __slots__ = ("_conn", "_handle")

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._handle = asyncio.get_running_loop().call_later(self._remaining(), self._check)

    def _remaining(self) -> float:
        # The same leeway as verification: a token accepted within it is not cut at once.
        return max(0.0, self._conn.principal.exp + LEEWAY_SECONDS - time.time())

    def _check(self) -> None:
        remaining = self._remaining()
        if remaining > 0:  # refreshed meanwhile
            self._handle = asyncio.get_running_loop().call_later(remaining, self._check)
        else:
            self._conn.close_soon(CloseCode.TOKEN_EXPIRED, "token expired")

    def cancel(self) -> None:
        self._handle.cancel()


async def _serve(state: WorkerState, conn: Connection) -> None:
    while await _dispatch(state, conn, await conn.ws.receive()):
        pass


async def _dispatch(state: WorkerState, conn: Connection, msg: WSMessage) -> bool:
    """Act on one incoming message; False once the connection is over."""
    conn.quiet = 0
    if msg.type is WSMsgType.TEXT:
        await _handle(state, conn, msg.data)
    elif msg.type in _CONTROL:
        await _control(conn, msg)
    elif msg.type is WSMsgType.BINARY:
        _RECEIVED.inc()
        if _admit(conn):
            conn.send_error(ErrorCode.BAD_REQUEST, "binary frames are not supported")
    elif msg.type is WSMsgType.CLOSE:
        # Orderly close: checkpoint first, so the client may resume elsewhere at once.
        conn.closing = True
        await _final_checkpoint(state, [conn])
        await conn.ws.close()
        return False
    elif msg.type is WSMsgType.ERROR:  # a bad frame: aiohttp has sent 1009 or 1002
        metrics.ERRORS.inc()
        metrics.FRAMES_REFUSED.labels(str(getattr(msg.data, "code", 1006))).inc()
        return False
    else:  # CLOSING (our own close), CLOSED
        return False
    return True


_CONTROL = frozenset((WSMsgType.PING, WSMsgType.PONG))


async def _control(conn: Connection, msg: WSMessage) -> None:
    """A ping is answered; a pong is the answer to a keep-alive ping (heard: nothing to do)."""
    if msg.type is WSMsgType.PING:
        with contextlib.suppress(ConnectionError):  # gone meanwhile: its handler ends next
            await conn.ws.pong(msg.data)


async def _final_checkpoint(state: WorkerState, conns: list[Connection]) -> None:
    try:
        await state.node.save_final(conns)
    except Exception as exc:
        log.warning("final session checkpoint failed: %s", describe(exc))


def _admit(conn: Connection, text: str | None = None) -> bool:
    """Every frame spends a token, refused ones too; a sustained flood is closed 1008.

    Frames that waited in the kernel while this worker was stalled count too: the server
    cannot tell them from a burst (docs/protocol.md). A text frame's id says which.
    """
    now = time.monotonic()
    if conn.bucket.take(now):
        return True
    metrics.RATE_LIMIT_DENIED.inc()
    conn.send_error(ErrorCode.RATE_LIMITED, "slow down", None if text is None else request_id_of(text))
    if conn.abuse is None:
        conn.abuse = AbuseWindow()
    if conn.abuse.deny(now):
        conn.close_soon(CloseCode.POLICY, "rate limit abuse")
    return False


async def _handle(state: WorkerState, conn: Connection, data: str) -> None:
    _RECEIVED.inc()
    if not _admit(conn, data):
        return
    try:
        command = parse(data)
    except ProtocolError as exc:
        conn.send_error(exc.code, exc.message, exc.request_id)
        return
    await _run(state, conn, command)


async def _run(state: WorkerState, conn: Connection, command: object) -> None:
    node = state.node
    request_id = getattr(command, "id", None)
    conn.busy = True  # its next frames wait meanwhile: the keep-alive counts no silence
    try:
        match command:
            case Publish():
                node.publish(conn, command)
            case Join():
                await node.join(conn, command)
            case Leave(room=room):
                await node.leave(conn, room, request_id)
            case Direct():
                node.direct(conn, command)
            case Members(room=room):
                await node.members(conn, room, request_id)
            case Refresh(token=token):
                await _refresh(state, conn, token, request_id)
            case Ping():
                conn.send(encode("pong", request_id))
            case Resume():
                raise ProtocolError(
                    ErrorCode.BAD_REQUEST, "resume is only taken as the first frame after a resumed welcome"
                )
    except ProtocolError as exc:
        conn.send_error(exc.code, exc.message, request_id)
    except LOST as exc:  # Redis down, or full (maxmemory, noeviction): it refused the write
        log.warning("command failed: Redis: %s", exc, extra={"conn": conn.id})
        conn.send_error(ErrorCode.UNAVAILABLE, "Redis unavailable", request_id)
    except Exception:
        log.exception("command failed", extra={"conn": conn.id})
        conn.send_error(ErrorCode.INTERNAL, "internal error", request_id)
    finally:
        conn.busy = False


async def _refresh(state: WorkerState, conn: Connection, token: str, request_id: object) -> None:
    try:
        principal = state.verifier.verify(token)
    except AuthError:
        raise ProtocolError(ErrorCode.FORBIDDEN, "token rejected") from None
    if principal.user != conn.user:
        raise ProtocolError(ErrorCode.FORBIDDEN, "token is for another user")
    conn.principal = principal
    for room in sorted(conn.rooms):
        if not principal.may_join(room):
            await state.node.leave(conn, room, None)
    conn.send(encode("refreshed", request_id, exp=principal.exp))  # type: ignore[arg-type]
