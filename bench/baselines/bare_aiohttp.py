"""The floor of Python overhead: a bare single-process aiohttp broadcast server.

It speaks the subset of rtc's protocol that the load generator uses (``welcome``;
``join`` -> ``joined``; ``publish`` -> ``ack`` + ``message`` with a per-room seq;
``direct`` -> ``ack`` + ``direct`` with a per-user inbox seq; ``ping``), with no auth,
no Redis, no limits and no backpressure: a slow member stalls its room's broadcast.
Whatever rtc spends beyond this is the price of its guarantees.

Each message is encoded once (``orjson`` bytes) and the same bytes are written as a
text frame to every member, without per-member re-encoding (``send_str`` would
UTF-8-encode the str again for each one). Compression is off.

    python -m bench.baselines.bare_aiohttp --host 127.0.0.1 --port 8091
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Iterable
from typing import Any

import jwt
import orjson
from aiohttp import WSMsgType, web

from bench.baselines.runner import health, serve

__all__ = ["Hub", "build_app", "main"]

_MAX_MESSAGE_BYTES = 65536


class Hub:
    """Rooms, inboxes and their seqs; one per process."""

    def __init__(self) -> None:
        self.rooms: dict[str, set[web.WebSocketResponse]] = {}
        self.room_seq: dict[str, int] = {}
        self.inboxes: dict[str, set[web.WebSocketResponse]] = {}
        self.inbox_seq: dict[str, int] = {}
        self.anonymous = itertools.count(1)


HUB = web.AppKey("hub", Hub)


async def _send(members: Iterable[web.WebSocketResponse], payload: bytes) -> None:
    for ws in list(members):
        try:
            await ws.send_frame(payload, WSMsgType.TEXT)
        except ConnectionError:
            continue  # the reader of that socket cleans it up


def _user(request: web.Request, hub: Hub) -> str:
    """The token's ``sub``, unverified (no auth here), or a generated name."""
    token = request.query.get("token")
    if token:
        try:
            claims = jwt.decode(token, options={"verify_signature": False})
            return str(claims.get("sub") or claims.get("user_id"))
        except jwt.PyJWTError:
            pass
    return f"anon-{next(hub.anonymous)}"


class Session:
    """One socket's user and rooms; handles its frames."""

    def __init__(self, hub: Hub, ws: web.WebSocketResponse, user: str) -> None:
        self.hub = hub
        self.ws = ws
        self.user = user
        self.rooms: set[str] = set()

    async def _answer(self, msg: dict[str, Any], request: dict[str, Any]) -> None:
        """Send ``msg`` to this socket, echoing the request's ``id``."""
        if "id" in request:
            msg["id"] = request["id"]
        await _send((self.ws,), orjson.dumps(msg))

    async def handle(self, request: dict[str, Any]) -> None:
        """Answer one client frame."""
        kind = request.get("type")
        hub = self.hub
        if kind == "publish" and request.get("room") in self.rooms:
            room = request["room"]
            seq = hub.room_seq[room] = hub.room_seq.get(room, 0) + 1
            message = {
                "type": "message",
                "room": room,
                "seq": seq,
                "from": self.user,
                "data": request.get("data"),
                "ts": int(time.time() * 1000),
            }
            await self._answer({"type": "ack", "room": room, "seq": seq}, request)
            await _send(hub.rooms[room], orjson.dumps(message))
        elif kind == "direct" and isinstance(request.get("to"), str):
            to = request["to"]
            seq = hub.inbox_seq[to] = hub.inbox_seq.get(to, 0) + 1
            message = {
                "type": "direct",
                "from": self.user,
                "seq": seq,
                "data": request.get("data"),
                "ts": int(time.time() * 1000),
            }
            await self._answer({"type": "ack", "to": to, "seq": seq}, request)
            await _send(hub.inboxes.get(to, ()), orjson.dumps(message))
        elif kind == "join" and isinstance(request.get("room"), str):
            room = request["room"]
            hub.rooms.setdefault(room, set()).add(self.ws)
            self.rooms.add(room)
            joined = {
                "type": "joined",
                "room": room,
                "seq": hub.room_seq.get(room, 0),
                "epoch": "bare",
                "recovered": True,
            }
            await self._answer(joined, request)
        elif kind == "leave" and request.get("room") in self.rooms:
            self._leave(request["room"])
            await self._answer({"type": "left", "room": request["room"]}, request)
        elif kind == "ping":
            await self._answer({"type": "pong"}, request)
        else:
            code = "not_joined" if kind in ("publish", "leave") else "bad_request"
            error = {"type": "error", "code": code, "message": f"cannot {kind}"}
            await self._answer(error, request)

    def _leave(self, room: str) -> None:
        self.rooms.discard(room)
        members = self.hub.rooms.get(room)
        if members is not None:
            members.discard(self.ws)
            if not members:
                del self.hub.rooms[room]

    def close(self) -> None:
        """Forget the socket everywhere."""
        for room in list(self.rooms):
            self._leave(room)
        inbox = self.hub.inboxes.get(self.user)
        if inbox is not None:
            inbox.discard(self.ws)
            if not inbox:
                del self.hub.inboxes[self.user]


async def websocket(request: web.Request) -> web.WebSocketResponse:
    """``GET /ws``: the protocol subset described in the module docstring."""
    hub = request.app[HUB]
    ws = web.WebSocketResponse(compress=False, max_msg_size=_MAX_MESSAGE_BYTES)
    await ws.prepare(request)
    session = Session(hub, ws, _user(request, hub))
    hub.inboxes.setdefault(session.user, set()).add(ws)
    welcome = {
        "type": "welcome",
        "session": str(id(ws)),
        "user": session.user,
        "node": "bare",
        "resumed": False,
    }
    await _send((ws,), orjson.dumps(welcome))
    try:
        async for msg in ws:
            if msg.type is not WSMsgType.TEXT:
                break
            try:
                frame = orjson.loads(msg.data)
            except orjson.JSONDecodeError:
                frame = {}
            await session.handle(frame if isinstance(frame, dict) else {})
    finally:
        session.close()
    return ws


def build_app() -> web.Application:
    """The aiohttp application: ``/ws`` and ``/health``."""
    app = web.Application()
    app[HUB] = Hub()
    app.router.add_get("/ws", websocket)
    app.router.add_get("/health", health)
    return app


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8091)
    args = parser.parse_args(argv)
    serve(build_app(), args.host, args.port)


if __name__ == "__main__":
    main()
