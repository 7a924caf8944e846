"""The server API (`/api/*`, SPEC 8): application backends publish without a WebSocket.

JSON in and out, one error shape, API keys (several, so they can be rotated). A publish
goes through the room's owner exactly like a client's; its `id` makes it idempotent
within the dedup window (the same seq comes back, nothing is sequenced twice).
Cluster-wide calls (`disconnect`, `info`) ask every worker of every host over the hosts'
control channels and count the answers: PUBLISH says how many workers heard the question,
so the asker knows how many answers to wait for.

Each key has a token bucket shared by the host's workers (`--api-rate`, `--api-burst`):
one backend in a loop cannot take the host's Redis from the others. Every answer is
counted in `rtc_api_requests_total{endpoint,status}`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import orjson
from aiohttp import web

from rtc import keys, metrics
from rtc.broker.base import Broker
from rtc.config import Settings
from rtc.errors import CloseCode, ErrorCode, ProtocolError
from rtc.hostcount import ConnectRate
from rtc.node import MEMBERS_LIMIT, Node
from rtc.protocol import Direct, Publish, check_name, direct_halves, inbox, message_halves, parse

__all__ = ["API", "ServerApi", "add_api_routes"]

log = logging.getLogger("rtc.api")

SERVER_SENDER = "server"  # `from` of an API publish that names no sender
BROADCAST_MAX = 100
HISTORY_MAX = 1000
HISTORY_DEFAULT = 100
ASK_TIMEOUT = 2.0  # a worker that has not answered by then is not counted
SEQUENCE_TIMEOUT = 5.0  # the node answers None after 2-3 s; this only guards against a bug
DISCONNECT_CODES = range(4000, 5000)
_REASON_MAX = 120  # a close frame's reason is at most 123 bytes
_ASK, _ANSWER = b"api?", b"api!"

_STATUS: dict[ErrorCode, int] = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.UNKNOWN_TYPE: 400,
    ErrorCode.NOT_JOINED: 400,
    ErrorCode.FORBIDDEN: 401,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.INTERNAL: 500,
}


class ApiError(ProtocolError):
    """A refused API call with an HTTP status of its own (404, 405: no protocol code has one)."""

    def __init__(self, status: int, code: ErrorCode, message: str) -> None:
        super().__init__(code, message)
        self.status = status


@dataclass(slots=True)
class _Ask:
    answers: list[dict[str, Any]] = field(default_factory=list)
    expected: int | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def check(self) -> None:
        if self.expected is not None and len(self.answers) >= self.expected:
            self.done.set()


class ServerApi:
    """What the `/api` handlers do, on top of this worker's node."""

    def __init__(self, settings: Settings, node: Node, broker: Broker, rate: ConnectRate) -> None:
        self.settings = settings
        self.node = node
        self.broker = broker
        self._rate = rate
        self._keys = tuple((name, key.encode()) for name, key in settings.api_keys)
        self._asks: dict[str, _Ask] = {}

    # -- keys --------------------------------------------------------------------------------

    def key_name(self, request: web.Request) -> str | None:
        """The name of the API key the request carries, or None (every key is compared)."""
        given = request.headers.get("X-API-Key", "")
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "apikey":
            given = value.strip()
        found = None
        for name, key in self._keys:  # no early exit: the time does not tell which matched
            if hmac.compare_digest(key, given.encode()) and given:
                found = name
        return found

    def admit(self, key_name: str) -> None:
        """Spend one of the key's tokens (host-wide), or refuse the call with 429."""
        settings = self.settings
        if settings.api_rate and not self._rate.take(
            key_name, settings.api_rate, settings.api_burst, time.monotonic()
        ):
            raise ApiError(
                429, ErrorCode.RATE_LIMITED, f"over --api-rate for API key {key_name!r}: slow down"
            )

    # -- sequencing --------------------------------------------------------------------------

    async def publish(self, cmd: Publish, sender: str) -> int:
        if cmd.room.startswith("@"):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "inboxes take /api/direct")
        ts = _now_ms()
        head, tail = message_halves(cmd.room, sender, cmd.data, ts)
        return await self._sequence(cmd.room, head, tail, ts, cmd.id)

    async def direct(self, cmd: Direct, sender: str) -> int:
        ts = _now_ms()
        head, tail = direct_halves(sender, cmd.data, ts)
        return await self._sequence(inbox(cmd.to), head, tail, ts, cmd.id)

    async def _sequence(self, key: str, head: bytes, tail: bytes, ts: int, request_id: object) -> int:
        # API ids share one namespace across backends: the same id is the same event.
        dedup = None if request_id is None else "api:" + orjson.dumps(request_id).decode()
        async with asyncio.timeout(SEQUENCE_TIMEOUT):
            seq = await self.node.submit(key, head, tail, ts, dedup)
        if seq is None:
            raise ProtocolError(ErrorCode.UNAVAILABLE, "could not sequence the message in time")
        return seq

    # -- cluster-wide questions --------------------------------------------------------------

    async def ask(self, op: str, **args: Any) -> list[dict[str, Any]]:
        """Ask every worker of every host in the ring; the answers that came in time."""
        rid = secrets.token_hex(8)
        node_id = self.settings.node_id
        hosts = sorted({slot.rpartition(":")[0] for slot in self.node.ring.slots} | {node_id})
        question = _ASK + orjson.dumps({"rid": rid, "reply": node_id, "op": op, **args})
        ask = self._asks[rid] = _Ask()
        try:
            heard = await self.broker.publish_many([(keys.host_control(h), question) for h in hosts])
            ask.expected = sum(heard)
            ask.check()
            try:
                async with asyncio.timeout(ASK_TIMEOUT):
                    await ask.done.wait()
            except TimeoutError:
                log.warning("%s: %d of %d workers answered", op, len(ask.answers), ask.expected)
            return list(ask.answers)
        finally:
            del self._asks[rid]

    def on_control(self, payload: bytes) -> None:
        """A question from some worker's `ask`, or an answer to one of ours."""
        message = orjson.loads(payload[len(_ASK) :])
        if payload.startswith(_ANSWER):
            ask = self._asks.get(message.pop("rid"))
            if ask is not None:
                ask.answers.append(message)
                ask.check()
            return
        answer: dict[str, Any] = {
            "rid": message["rid"],
            "node": self.settings.node_id,
            "slot": self.node.slot,
        }
        if message["op"] == "disconnect":
            answer["closed"] = self._close_local(message["user"], message["code"], message["reason"])
        else:
            answer["connections"] = len(self.node.connections)
        reply = [(keys.host_control(message["reply"]), _ANSWER + orjson.dumps(answer))]
        self.node.spawn(self._answer(reply))

    async def _answer(self, reply: list[tuple[str, bytes]]) -> None:
        try:
            await self.broker.publish_many(reply)
        except Exception as exc:
            log.warning("answering a server API question failed: %s", exc)

    def _close_local(self, user: str, code: int, reason: str) -> int:
        closing = [c for c in self.node.connections if c.user == user and not c.closing]
        for conn in closing:
            conn.close_soon(code, reason)
        return len(closing)


API = web.AppKey("api", ServerApi)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def add_api_routes(app: web.Application, api: ServerApi) -> None:
    """Mount `/api/*`: only called when keys are configured (else every path is 404)."""
    app[API] = api
    app.middlewares.append(_api_middleware)
    router = app.router
    # Route names are the endpoint labels of `rtc_api_requests_total` (metrics.API_ENDPOINTS).
    router.add_get("/api/openapi.json", openapi, name="openapi")
    router.add_post("/api/publish", publish, name="publish")
    router.add_post("/api/broadcast", broadcast, name="broadcast")
    router.add_post("/api/direct", direct, name="direct")
    router.add_post("/api/disconnect", disconnect, name="disconnect")
    router.add_get("/api/rooms/{room}/members", members, name="members")
    router.add_get("/api/rooms/{room}/history", history, name="history")
    router.add_get("/api/info", info, name="info")


@web.middleware
async def _api_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Key check, rate limit, the one error shape and the count, for every path under /api/."""
    if not request.path.startswith("/api/"):
        return await handler(request)
    endpoint = request.match_info.route.name
    if endpoint not in metrics.API_ENDPOINTS:
        endpoint = "other"
    try:
        response = await _answer(request, handler)
    except web.HTTPException as exc:
        metrics.API_REQUESTS.labels(endpoint, str(exc.status)).inc()
        raise
    metrics.API_REQUESTS.labels(endpoint, str(response.status)).inc()
    return response


async def _answer(request: web.Request, handler: Handler) -> web.StreamResponse:
    api = request.app[API]
    try:
        if request.path != "/api/openapi.json":
            name = api.key_name(request)
            if name is None:
                raise ApiError(401, ErrorCode.FORBIDDEN, "missing or wrong API key")
            api.admit(name)
        return await handler(request)
    except ApiError as exc:
        response = _error(exc.status, exc.code, exc.message)
        if exc.status == 429:  # when the next token is due
            response.headers["Retry-After"] = str(max(1, math.ceil(1 / api.settings.api_rate)))
        return response
    except ProtocolError as exc:
        return _error(_STATUS[exc.code], exc.code, exc.message)
    except web.HTTPException as exc:  # no such path, or the wrong method for it
        if exc.status not in (404, 405):
            raise
        return _error(exc.status, ErrorCode.BAD_REQUEST, exc.reason)
    except Exception:
        log.exception("server API call %s failed", request.path)
        return _error(500, ErrorCode.INTERNAL, "internal error")


def _error(status: int, code: ErrorCode, message: str) -> web.Response:
    return _json({"error": {"code": code.value, "message": message}}, status)


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


async def _body(request: web.Request) -> dict[str, Any]:
    """The JSON object of the request, refused (413) as soon as it passes the size limit."""
    limit = request.app[API].settings.max_message_bytes
    if (request.content_length or 0) > limit:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"body over {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"body over {limit} bytes")
        chunks.append(chunk)
    try:
        body = orjson.loads(b"".join(chunks))
    except orjson.JSONDecodeError:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "body must be a JSON object")
    return body


def _command(kind: str, body: dict[str, Any]) -> Any:
    """Check the body's fields exactly as the WebSocket protocol checks a frame."""
    return parse(orjson.dumps({**body, "type": kind}))


def _sender(body: dict[str, Any]) -> str:
    return check_name(body["from"], "from") if "from" in body else SERVER_SENDER


def _now_ms() -> int:
    return int(time.time() * 1000)


# -- handlers ---------------------------------------------------------------------------------


async def openapi(request: web.Request) -> web.Response:
    document = resources.files("rtc").joinpath("static", "openapi.json").read_bytes()
    return web.Response(body=document, content_type="application/json")


async def publish(request: web.Request) -> web.Response:
    body = await _body(request)
    cmd: Publish = _command("publish", body)
    seq = await request.app[API].publish(cmd, _sender(body))
    return _json({"room": cmd.room, "seq": seq})


async def broadcast(request: web.Request) -> web.Response:
    body = await _body(request)
    rooms = body.get("rooms")
    if not isinstance(rooms, list) or not 0 < len(rooms) <= BROADCAST_MAX:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"field 'rooms' must list 1-{BROADCAST_MAX} rooms")
    sender = _sender(body)
    api = request.app[API]

    async def one(room: object) -> dict[str, Any]:
        try:
            cmd: Publish = _command("publish", {**body, "room": room})
            return {"room": cmd.room, "seq": await api.publish(cmd, sender)}
        except ProtocolError as exc:
            return {"room": room, "error": {"code": exc.code.value, "message": exc.message}}

    results = await asyncio.gather(*(one(room) for room in rooms))
    return _json({"results": results})


async def direct(request: web.Request) -> web.Response:
    body = await _body(request)
    cmd: Direct = _command("direct", body)
    seq = await request.app[API].direct(cmd, _sender(body))
    return _json({"to": cmd.to, "seq": seq})


async def disconnect(request: web.Request) -> web.Response:
    body = await _body(request)
    user = check_name(body.get("user"), "user")
    code = body.get("code", int(CloseCode.DISCONNECTED))
    if type(code) is not int or code not in DISCONNECT_CODES:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "field 'code' must be an integer in 4000-4999")
    reason = body.get("reason", "disconnected by the server")
    if not isinstance(reason, str) or len(reason.encode()) > _REASON_MAX:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"field 'reason' must be a string of {_REASON_MAX} bytes at most"
        )
    answers = await request.app[API].ask("disconnect", user=user, code=code, reason=reason)
    return _json({"user": user, "closed": sum(a["closed"] for a in answers)})


def _room(request: web.Request) -> str:
    room = check_name(request.match_info["room"], "room")
    if room.startswith("@"):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "inboxes have no members or public history")
    return room


async def members(request: web.Request) -> web.Response:
    room = _room(request)
    count, users = await request.app[API].broker.members(room, MEMBERS_LIMIT)
    return _json({"room": room, "users": users, "count": count})


def _int_query(request: web.Request, name: str, low: int, high: int) -> int | None:
    text = request.query.get(name)
    if text is None:
        return None
    if not text.isdigit() or not low <= int(text) <= high:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"query '{name}' must be an integer in {low}-{high}")
    return int(text)


async def history(request: web.Request) -> web.Response:
    """A page of the room's history: seqs in (since, since+limit]; the newest page by default."""
    room = _room(request)
    limit = _int_query(request, "limit", 1, HISTORY_MAX) or HISTORY_DEFAULT
    since = _int_query(request, "since", 0, 2**63 - 1)
    api = request.app[API]
    broker = api.broker
    seq, epoch = await broker.open_room(room, api.settings.history_ttl)
    after = max(0, seq - limit) if since is None else since
    messages = []
    for _, frame in await broker.history(room, after, min(seq, after + limit)):
        message = orjson.loads(frame)
        messages.append({k: message[k] for k in ("seq", "from", "data", "ts")})
    return _json({"room": room, "epoch": epoch, "seq": seq, "messages": messages})


async def info(request: web.Request) -> web.Response:
    api = request.app[API]
    answers = await api.ask("info")
    slots = sorted(api.node.ring.slots)
    hosts: dict[str, dict[str, Any]] = {}
    for slot in slots:
        node_id = slot.rpartition(":")[0]
        hosts.setdefault(node_id, {"node": node_id, "slots": [], "connections": 0})["slots"].append(slot)
    for answer in answers:
        host = hosts.setdefault(answer["node"], {"node": answer["node"], "slots": [], "connections": 0})
        host["connections"] += answer["connections"]
    return _json({"hosts": sorted(hosts.values(), key=lambda h: h["node"]), "slots": slots})
