"""What a Python shop picks today: python-socketio (AsyncServer + AsyncRedisManager) on aiohttp.

Events (acks carry what rtc's replies carry, so the load generator treats both alike):
- ``connect`` with auth ``{"token": JWT}``: checked with ``--jwt-secret`` when given
  (HS256, ``exp`` required), else only decoded; the socket joins its inbox ``@<sub>``.
- ``join {"room"}`` -> ack ``{"joined": room, "seq": N}``.
- ``publish {"room", "data"}`` -> ack ``{"room", "seq"}``; event ``message``
  ``{"room", "seq", "from", "data", "ts"}`` to the room, sender included.
- ``direct {"to", "data"}`` -> ack ``{"to", "seq"}``; event ``direct`` to ``@<to>``.

Seqs come from a Redis ``INCR`` per room (and per inbox) so that hosts sharing the
Redis agree on them, as an app needing gap detection would do. Socket.IO itself
promises no order (handlers run as concurrent tasks, emits go through Redis pub/sub),
so the load generator counts reorders separately from gaps. Emits are delivered
through Redis even on one host: that is AsyncRedisManager's design.

    python -m bench.baselines.socketio_server --port 8092 --redis-url redis://127.0.0.1:6379
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import jwt
import redis.asyncio as aioredis
import socketio
from aiohttp import web

from bench.baselines.runner import health, serve

__all__ = ["build_app", "main"]

_KEY_PREFIX = "bench:sio:"


class Handlers:
    """The event handlers of one server; state is per socket id."""

    def __init__(self, sio: socketio.AsyncServer, store: aioredis.Redis, secret: str | None):
        self.sio = sio
        self.store = store
        self.secret = secret
        self.users: dict[str, str] = {}
        self.rooms: dict[str, set[str]] = {}

    def register(self) -> None:
        """Attach every handler to the server."""
        for event in ("connect", "disconnect", "join", "publish", "direct"):
            self.sio.on(event, getattr(self, f"on_{event}"))

    def _claims(self, token: str) -> dict[str, Any]:
        if self.secret is None:
            return jwt.decode(token, options={"verify_signature": False})
        return jwt.decode(token, self.secret, algorithms=["HS256"], options={"require": ["exp"]})

    async def on_connect(self, sid: str, _environ: dict[str, Any], auth: Any) -> None:
        try:
            claims = self._claims(auth["token"])
        except (TypeError, KeyError, jwt.PyJWTError):
            raise socketio.exceptions.ConnectionRefusedError("unauthorized") from None
        user = str(claims.get("sub") or claims.get("user_id"))
        self.users[sid] = user
        self.rooms[sid] = set()
        await self.sio.enter_room(sid, "@" + user)

    async def on_disconnect(self, sid: str, _reason: str | None = None) -> None:
        self.users.pop(sid, None)
        self.rooms.pop(sid, None)

    async def on_join(self, sid: str, payload: dict[str, Any]) -> dict[str, Any]:
        room = payload["room"]
        await self.sio.enter_room(sid, room)
        self.rooms[sid].add(room)
        seq = int(await self.store.get(_KEY_PREFIX + room) or 0)
        return {"joined": room, "seq": seq}

    async def on_publish(self, sid: str, payload: dict[str, Any]) -> dict[str, Any]:
        room = payload["room"]
        if room not in self.rooms.get(sid, ()):
            return {"error": "not_joined"}
        seq = int(await self.store.incr(_KEY_PREFIX + room))
        message = {
            "room": room,
            "seq": seq,
            "from": self.users[sid],
            "data": payload.get("data"),
            "ts": int(time.time() * 1000),
        }
        await self.sio.emit("message", message, room=room)
        return {"room": room, "seq": seq}

    async def on_direct(self, sid: str, payload: dict[str, Any]) -> dict[str, Any]:
        to = payload["to"]
        seq = int(await self.store.incr(_KEY_PREFIX + "@" + to))
        message = {
            "from": self.users[sid],
            "seq": seq,
            "data": payload.get("data"),
            "ts": int(time.time() * 1000),
        }
        await self.sio.emit("direct", message, room="@" + to)
        return {"to": to, "seq": seq}


def build_app(redis_url: str, secret: str | None) -> web.Application:
    """The aiohttp app with Socket.IO at ``/socket.io/`` and ``/health``."""
    # redis-py's asyncio pool raises past 100 connections in use instead of waiting,
    # which a burst of joins or publishes reaches: the manager (whose client is built
    # by from_url) gets a larger pool, the seq store a pool that waits.
    manager = socketio.AsyncRedisManager(redis_url, redis_options={"max_connections": 1000})
    sio = socketio.AsyncServer(async_mode="aiohttp", client_manager=manager, cors_allowed_origins="*")
    pool = aioredis.BlockingConnectionPool.from_url(redis_url, max_connections=64, timeout=10)
    store = aioredis.Redis(connection_pool=pool)
    Handlers(sio, store, secret).register()
    app = web.Application()
    sio.attach(app)
    app.router.add_get("/health", health)

    async def close_store(_app: web.Application) -> None:
        await store.aclose()

    app.on_cleanup.append(close_store)
    return app


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8092)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--jwt-secret", help="verify tokens with it (default: decode only)")
    args = parser.parse_args(argv)
    serve(build_app(args.redis_url, args.jwt_secret), args.host, args.port)


if __name__ == "__main__":
    main()
