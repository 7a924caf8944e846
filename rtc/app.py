"""The worker's HTTP surface: `/ws`, `/health`, `/metrics`, `/admin/*`, dashboard and demo.

Handlers are thin: they check the request, then hand commands to the `Node`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import resource
import secrets
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import orjson
from aiohttp import WSMessage, WSMsgType, web

from rtc import hostmetrics, keys, metrics
from rtc.api import ServerApi, add_api_routes
from rtc.auth import LEEWAY_SECONDS, Principal, Verifier, mint, token_from_request
from rtc.broker import LOST
from rtc.broker.base import Broker
from rtc.config import Settings
from rtc.connection import Connection
from rtc.errors import AuthError, CloseCode, ErrorCode, ProtocolError
from rtc.hostcount import HostConnections
from rtc.log import describe
from rtc.node import Node
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

__all__ = [
    "DEMO_ROOMS",
    "DEMO_TOKEN_TTL",
    "FD_RESERVE",
    "STATE",
    "UPGRADES_IN_FLIGHT",
    "WorkerState",
    "build_app",
    "client_address",
    "drain_report",
    "require_admin",
]

log = logging.getLogger("rtc.app")

_FORWARDING_HEADERS = ("X-Forwarded-For", "Forwarded", "X-Real-IP")
_STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_WELCOMED = "rtc.welcomed"
POSITIONS_WAIT = 5.0  # SPEC 4: how long a `positions=1` resume waits for the `resume` frame
# Descriptors a worker keeps for everything but client sockets: its Redis pool (64) and
# pub/sub, the listener, metrics files, pipes, and requests still in their handshake.
FD_RESERVE = 256
DEMO_TOKEN_TTL = 600  # the demo page's SDK fetches a new token before this runs out
DEMO_ROOMS = ["demo.*"]  # plus the user's own inbox, which every token may read
# Upgrades a worker takes from the 101 to `welcome` at once; the rest wait their turn. In
# a 10,000-client storm 16 beat both 4 and 64, and no cap: 7.2 - 7.7 s against 10.5 s,
# with a lower loop ping p99 (docs/performance.md).
UPGRADES_IN_FLIGHT = 16


_RECEIVED = metrics.BatchedCounter(metrics.MESSAGES_RECEIVED)  # per frame: written in batches


def _fd_capacity() -> int:
    """Client sockets this worker's descriptor limit holds after the reserve."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(1, soft - FD_RESERVE) if soft != resource.RLIM_INFINITY else 0


@dataclass(slots=True)
class WorkerState:
    """Process state of one worker, kept on the app."""

    settings: Settings
    node: Node
    broker: Broker
    verifier: Verifier
    worker: str
    slot_index: int
    host_connections: HostConnections
    draining: bool = False
    opening: int = 0  # upgrades accepted whose `welcome` is not sent yet
    upgrades: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(UPGRADES_IN_FLIGHT))
    open_count: int = 0
    drain_task: asyncio.Task[None] | None = None
    drain_generation: int = 0  # bumped by every drain and undrain: an older drain stops
    api: ServerApi | None = None  # with --api-keys: answers the cluster's server API questions
    # `--max-connections auto`: this worker's own bound (0: none) and the host's (0: none).
    worker_cap: int = field(init=False, default=0)
    host_cap: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        # auto: each worker stops at its own descriptor limit, which bounds the host too.
        if self.settings.max_connections is None:
            self.worker_cap = _fd_capacity()
        else:
            self.host_cap = self.settings.max_connections

    def full(self) -> bool:
        """No room for one more connection (503), before a descriptor runs out (EMFILE)."""
        # Sockets still in their handshake hold descriptors too: FD_RESERVE covers them.
        if self.worker_cap and self.open_count >= self.worker_cap:
            return True
        return bool(self.host_cap) and self.host_connections.total() >= self.host_cap


STATE = web.AppKey("state", WorkerState)
SUPERVISOR_PID = web.AppKey("supervisor_pid", int)


def build_app(state: WorkerState) -> web.Application:
    app = web.Application(client_max_size=64 * 1024)
    app[STATE] = state
    app[SUPERVISOR_PID] = os.getppid()  # built in the worker, which the supervisor forked
    app.router.add_get("/ws", websocket)
    app.router.add_get("/health", health)
    app.router.add_get("/livez", livez)
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_route("*", "/admin/drain", admin_drain)
    app.router.add_get("/admin/ring", admin_ring)
    app.router.add_get("/dashboard", dashboard)
    app.router.add_get("/dashboard/data", dashboard_data)
    app.router.add_get("/dashboard/events", dashboard_events)
    app.router.add_get("/client.js", client_js)
    if state.settings.api_keys:
        state.api = ServerApi(state.settings, state.node, state.broker, state.host_connections.api_rate)
        add_api_routes(app, state.api)
    if state.settings.demo:
        app.router.add_get("/demo", demo)
        app.router.add_post("/demo/token", demo_token)
    if state.settings.conformance_echo:
        app.router.add_get("/echo", echo)
    return app


# -- request checks --------------------------------------------------------------------------


def client_address(request: web.Request, settings: Settings) -> str:
    """The peer, or the last untrusted hop of X-Forwarded-For behind a trusted proxy."""
    peer = request.remote or "?"
    if not settings.trusted_proxies or not _in_networks(peer, settings.trusted_proxies):
        return peer
    hops = [h.strip() for h in request.headers.get("X-Forwarded-For", "").split(",") if h.strip()]
    for hop in reversed(hops):
        if not _in_networks(hop, settings.trusted_proxies):
            return hop
    return peer


def _in_networks(address: str, networks: tuple[str, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in ipaddress.ip_network(n, strict=False) for n in networks)


def _reject(status: int, reason: str, text: str) -> web.HTTPException:
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


def _principal(request: web.Request, verifier: Verifier) -> Principal:
    token = token_from_request(request.query.get("token"), request.headers.get("Authorization"))
    return verifier.verify(token)


def require_admin(request: web.Request) -> None:
    """Admin token, or loopback with no forwarding header (a local operator's curl).

    Loopback trust never extends to a browser: a page on any site can make the browser on
    the host send a simple cross-site POST (no preflight), so a state-changing request that
    carries `Origin` or `Sec-Fetch-Site: cross-site` needs the admin token itself.
    """
    state = request.app[STATE]
    try:
        if _principal(request, state.verifier).admin:
            return
    except AuthError:
        pass
    peer = request.remote or ""
    if (
        _is_loopback(peer)
        and not any(h in request.headers for h in _FORWARDING_HEADERS)
        and not _from_browser_page(request)
    ):
        return
    raise web.HTTPForbidden(text='{"error":"forbidden"}', content_type="application/json")


def _from_browser_page(request: web.Request) -> bool:
    """A state-changing request a web page made the browser send."""
    return request.method in _STATE_CHANGING and (
        "Origin" in request.headers or request.headers.get("Sec-Fetch-Site", "").lower() == "cross-site"
    )


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


# -- WebSocket ------------------------------------------------------------------------------------


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
        principal = _principal(request, state.verifier)
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


# -- health and metrics ------------------------------------------------------------------------------


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    in_ring = state.node.in_ring and set(state.settings.local_slots) <= set(state.node.ring.slots)
    # The worker's last known Redis state: a load balancer's check never waits on Redis.
    redis_ok = state.node.redis_ok
    ok = in_ring and not state.draining
    status = "ok" if ok else ("draining" if state.draining else "starting")
    body = {
        "status": status,
        "node": state.settings.node_id,
        "worker": state.worker,
        "redis": redis_ok,
        "in_ring": in_ring,
    }
    return web.json_response(body, status=200 if ok else 503, dumps=_dumps)


async def livez(request: web.Request) -> web.Response:
    """Liveness: this worker's loop answers and its supervisor still runs, draining or not.

    A dead worker is the supervisor's to replace; a worker whose supervisor is gone or
    stopped (reparented, or in state T/Z) says 503 so Kubernetes restarts the pod.
    """
    state = request.app[STATE]
    supervisor = request.app[SUPERVISOR_PID]
    alive = os.getppid() == supervisor and _process_state(supervisor) not in ("T", "t", "Z", "")
    body = {"status": "alive" if alive else "supervisor gone", "node": state.settings.node_id}
    return web.json_response(body, status=200 if alive else 503, dumps=_dumps)


def _process_state(pid: int) -> str:
    """The state letter of /proc/PID/stat (R, S, T, Z, ...); "" if it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rpartition(")")[2].split()[0]


def wants_prometheus(request: web.Request) -> bool:
    accept = request.headers.get("Accept", "")
    return "text/plain" in accept or "application/openmetrics-text" in accept


async def metrics_endpoint(request: web.Request) -> web.Response:
    if wants_prometheus(request):
        body, content_type = hostmetrics.exposition(request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type})
    state = request.app[STATE]
    return web.json_response(
        {**hostmetrics.snapshot(), "node": state.settings.node_id, "draining": state.draining}, dumps=_dumps
    )


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


# -- admin -----------------------------------------------------------------------------------------------


async def admin_ring(request: web.Request) -> web.Response:
    require_admin(request)
    ring = request.app[STATE].node.ring
    body: dict[str, Any] = {"slots": list(ring.slots)}
    if "key" in request.query:
        body["owner"] = ring.owner(request.query["key"])
    return web.json_response(body, dumps=_dumps)


async def admin_drain(request: web.Request) -> web.Response:
    """POST starts a host drain, GET reports it, DELETE undoes it."""
    require_admin(request)
    state = request.app[STATE]
    broker = state.broker
    key = keys.drain(state.settings.node_id, state.node.instance)
    control = keys.host_control(state.settings.node_id)
    if request.method == "POST":
        active = hostmetrics.snapshot()["active_connections"]  # before any is closed
        await broker.set_fields(key, {"active": str(time.time())}, 86400)
        await broker.publish_many([(control, b"drain")])
        return web.json_response({"draining": active}, status=202, dumps=_dumps)
    if request.method == "DELETE":
        await broker.delete(key)
        await broker.publish_many([(control, b"undrain")])
        return web.json_response({"draining": False}, dumps=_dumps)
    if request.method == "GET":
        return web.json_response(await drain_report(state), dumps=_dumps)
    raise web.HTTPMethodNotAllowed(request.method, ["GET", "POST", "DELETE"])


async def drain_report(state: WorkerState) -> dict[str, Any]:
    """Progress of the host's drain, summed over the workers' reports."""
    fields = await state.broker.get_fields(keys.drain(state.settings.node_id, state.node.instance))
    reports = [orjson.loads(v) for k, v in fields.items() if k.startswith("w:")]
    done = bool(reports) and all(r["done"] for r in reports) and len(reports) >= state.settings.workers
    return {
        "draining": "active" in fields,
        "done": done,
        "migrated": sum(r["migrated"] for r in reports),
        "failed": sum(r["failed"] for r in reports),
        "seconds": max((r["seconds"] for r in reports), default=0.0),
        "active_connections": hostmetrics.snapshot()["active_connections"],
    }


# -- pages --------------------------------------------------------------------------------------------------


def _static(name: str) -> bytes:
    return resources.files("rtc").joinpath("static", name).read_bytes()


async def dashboard(request: web.Request) -> web.Response:
    require_admin(request)
    return web.Response(body=_static("dashboard.html"), content_type="text/html")


async def dashboard_data(request: web.Request) -> web.Response:
    require_admin(request)
    return web.json_response(_dashboard_snapshot(request.app[STATE]), dumps=_dumps)


async def dashboard_events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: one snapshot a second while the page is open."""
    require_admin(request)
    state = request.app[STATE]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    while not state.draining:
        await response.write(b"data: " + orjson.dumps(_dashboard_snapshot(state)) + b"\n\n")
        await asyncio.sleep(1.0)
    return response


def _dashboard_snapshot(state: WorkerState) -> dict[str, Any]:
    snap = hostmetrics.snapshot()
    return {
        "node": state.settings.node_id,
        "draining": state.draining,
        "workers": snap.pop("workers"),
        "latency_ms": snap.pop("latency_ms"),
        "totals": snap,
        "ring": {"slots": list(state.node.ring.slots)},
        "ts": int(time.time() * 1000),
    }


async def client_js(request: web.Request) -> web.Response:
    """The JavaScript SDK as an ES module (no auth: it holds no secret)."""
    return web.Response(
        body=_static("client.js"),
        content_type="text/javascript",
        headers={"Cache-Control": "public, max-age=300"},
    )


async def demo(request: web.Request) -> web.Response:
    return web.Response(body=_static("demo.html"), content_type="text/html")


async def demo_token(request: web.Request) -> web.Response:
    """Development tokens for the demo page (only with --demo: never in production).

    Short-lived and confined to `demo.*` rooms (and the user's own inbox), so a demo left
    on by mistake still mints nothing that opens a real room.
    """
    state = request.app[STATE]
    try:
        body = await request.json(loads=orjson.loads)
        user = body["user"]
        if not isinstance(user, str) or not 0 < len(user) <= 64 or "@" in user:
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise web.HTTPBadRequest(
            text='{"error":"user must be a short name"}', content_type="application/json"
        ) from None
    if not state.settings.jwt_secret:
        raise web.HTTPServiceUnavailable(
            text='{"error":"demo needs an HMAC secret"}', content_type="application/json"
        )
    token = mint(
        state.settings.jwt_secret,
        user,
        now=time.time(),
        ttl=DEMO_TOKEN_TTL,
        rooms=DEMO_ROOMS,
        algorithm=state.settings.jwt_algorithms[0],
    )
    return web.json_response({"token": token}, dumps=_dumps)


async def echo(request: web.Request) -> web.WebSocketResponse:
    """Autobahn conformance only: echo with the same limits and settings as `/ws`."""
    settings = request.app[STATE].settings
    ws = web.WebSocketResponse(
        max_msg_size=settings.max_message_bytes + 1, compress=False, heartbeat=settings.ws_heartbeat
    )
    await ws.prepare(request)
    async for msg in ws:
        if msg.type is WSMsgType.TEXT:
            await ws.send_str(msg.data)
        elif msg.type is WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws
