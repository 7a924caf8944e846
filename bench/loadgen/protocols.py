"""Client-side wire protocols: rtc's JSON frames and Socket.IO over raw engine.io frames.

Each protocol turns the load generator's few actions (join, publish, direct) into text
frames and decodes incoming text into a :class:`Frame`, so the worker's hot path is the
same for every server. The rtc protocol is also what the bare-aiohttp and Node baselines
speak.

Socket.IO is spoken as raw engine.io v4 WebSocket frames instead of through
``socketio.AsyncClient``: that client keeps an aiohttp session, a ping task and a
reconnect machinery per connection, which would make the load generator, not the
server, the bottleneck at 10k+ sockets per process. The subset needed is small:
``0{...}`` open, ``40{auth}`` connect, ``2``/``3`` ping/pong, ``42["event",obj]``
events and ``43<id>[obj]`` acks.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, NamedTuple, Protocol
from urllib.parse import quote

import orjson

__all__ = ["ClientProtocol", "Frame", "Kind", "RtcProtocol", "SocketIOProtocol", "get"]


class Kind(Enum):
    """What an incoming frame means to the load generator."""

    READY = "ready"  # rtc welcome, Socket.IO namespace connected
    JOINED = "joined"
    DELIVERY = "delivery"  # a room message or a direct message
    ACK = "ack"
    PONG = "pong"  # answer to a probe's ping; ``sent`` is when the ping left
    ERROR = "error"
    REPLY = "reply"  # must be answered with Frame.reply (engine.io ping)
    EVENT = "event"  # a presence event (join or leave): counted, it is work the server did
    OTHER = "other"


class Frame(NamedTuple):
    """A decoded frame; ``key`` is the room, or ``@user`` for a direct message.

    A READY frame carries the session in ``key`` and 1 in ``seq`` when it was resumed.
    """

    kind: Kind
    key: str = ""
    seq: int = 0
    ts: float = 0.0  # server stamp (ms since the epoch)
    sent: float = 0.0  # the publisher's clock when it sent (ms), from our payload
    reply: str = ""


_OTHER = Frame(Kind.OTHER)
_EVENT = Frame(Kind.EVENT)


def _delivery(key: str, msg: dict[str, Any]) -> Frame:
    data = msg.get("data")
    sent = float(data.get("t", 0.0)) if isinstance(data, dict) else 0.0
    return Frame(Kind.DELIVERY, key, int(msg["seq"]), float(msg["ts"]), sent)


class ClientProtocol(Protocol):
    """What the worker needs from a wire protocol."""

    def url(self, root: str, token: str, session: str = "") -> str:
        """The WebSocket URL for server root ``root`` (``ws://host:port``), resuming ``session``."""

    def hello(self, token: str) -> str | None:
        """A frame to send right after the upgrade, if the protocol needs one."""

    def join(self, room: str) -> str:
        """Frame joining ``room``."""

    def publish(self, room: str, data: dict[str, Any]) -> str:
        """Frame publishing ``data`` to ``room``."""

    def direct(self, to: str, data: dict[str, Any]) -> str:
        """Frame sending ``data`` to user ``to``."""

    def ping(self, now_ms: float) -> str:
        """An application-level ping whose answer carries ``now_ms`` back."""

    def decode(self, text: str, user: str) -> Frame:
        """Decode a frame received by ``user``'s socket."""


class RtcProtocol:
    """rtc's protocol (SPEC section 4): one JSON object per text frame."""

    def url(self, root: str, token: str, session: str = "") -> str:
        resume = f"&session={quote(session)}" if session else ""
        return f"{root}/ws?token={quote(token)}{resume}"

    def hello(self, token: str) -> str | None:
        return None

    def join(self, room: str) -> str:
        return orjson.dumps({"type": "join", "room": room}).decode()

    def publish(self, room: str, data: dict[str, Any]) -> str:
        return orjson.dumps({"type": "publish", "room": room, "data": data}).decode()

    def direct(self, to: str, data: dict[str, Any]) -> str:
        return orjson.dumps({"type": "direct", "to": to, "data": data}).decode()

    def ping(self, now_ms: float) -> str:
        # rtc's ids are strings or integers: the clock goes in microseconds.
        return orjson.dumps({"type": "ping", "id": int(now_ms * 1000)}).decode()

    def decode(self, text: str, user: str) -> Frame:
        msg = orjson.loads(text)
        kind = msg.get("type")
        if kind == "message":
            return _delivery(msg["room"], msg)
        if kind == "direct":
            return _delivery("@" + user, msg)
        if kind == "ack":
            return Frame(Kind.ACK)
        if kind == "presence":
            return _EVENT
        if kind == "joined":
            return Frame(Kind.JOINED, msg["room"], int(msg["seq"]))
        if kind == "welcome":
            return Frame(Kind.READY, str(msg.get("session", "")), int(bool(msg.get("resumed"))))
        if kind == "pong":
            return Frame(Kind.PONG, sent=int(msg.get("id") or 0) / 1000)
        if kind == "error":
            return Frame(Kind.ERROR, str(msg.get("code", "unknown")))
        return _OTHER


class SocketIOProtocol:
    """Socket.IO v5 on engine.io v4, as served by ``bench.baselines.socketio_server``.

    Joins and publishes ask for an ack (the server's return value), which carries the
    room's seq like rtc's ``joined`` and ``ack``; the ack id is only ever ``1``
    because the load generator never needs to match acks to requests.
    """

    def url(self, root: str, token: str, session: str = "") -> str:
        return f"{root}/socket.io/?EIO=4&transport=websocket"

    def ping(self, now_ms: float) -> str:
        raise ValueError("the storm's loop probes speak rtc's protocol only")

    def hello(self, token: str) -> str | None:
        return "40" + orjson.dumps({"token": token}).decode()

    def join(self, room: str) -> str:
        return "421" + orjson.dumps(["join", {"room": room}]).decode()

    def publish(self, room: str, data: dict[str, Any]) -> str:
        return "421" + orjson.dumps(["publish", {"room": room, "data": data}]).decode()

    def direct(self, to: str, data: dict[str, Any]) -> str:
        return "421" + orjson.dumps(["direct", {"to": to, "data": data}]).decode()

    def decode(self, text: str, user: str) -> Frame:
        if text.startswith("42"):
            event, msg = orjson.loads(text[2:])
            if event == "message":
                return _delivery(msg["room"], msg)
            if event == "direct":
                return _delivery("@" + user, msg)
            return _OTHER
        if text.startswith("43"):
            payload = orjson.loads(text[text.index("[") :])[0]
            if isinstance(payload, dict) and "error" in payload:
                return Frame(Kind.ERROR, str(payload["error"]))
            if isinstance(payload, dict) and "joined" in payload:
                return Frame(Kind.JOINED, payload["joined"], int(payload["seq"]))
            return Frame(Kind.ACK)
        if text == "2":
            return Frame(Kind.REPLY, reply="3")
        if text.startswith("40"):
            return Frame(Kind.READY)
        if text.startswith("44"):
            return Frame(Kind.ERROR, "connect_refused")
        return _OTHER


_PROTOCOLS: dict[str, ClientProtocol] = {"rtc": RtcProtocol(), "socketio": SocketIOProtocol()}


def get(name: str) -> ClientProtocol:
    """The protocol called ``name`` (``rtc`` or ``socketio``)."""
    return _PROTOCOLS[name]
