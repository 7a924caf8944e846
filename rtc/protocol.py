"""The wire protocol (SPEC section 4) as pure functions: bytes in, commands out, bytes back.

Nothing here does I/O. `parse` turns one text frame into a typed command or raises
`ProtocolError`; the `encode_*` functions build server frames. Sequenced frames are built
in two halves around the seq, so Redis can splice the number in without re-encoding.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from rtc.errors import ErrorCode, ProtocolError

__all__ = [
    "Command",
    "Direct",
    "Join",
    "Leave",
    "Members",
    "Ping",
    "Publish",
    "Refresh",
    "Resume",
    "check_name",
    "direct_halves",
    "encode",
    "encode_error",
    "inbox",
    "message_halves",
    "parse",
    "presence_halves",
    "request_id_of",
    "wire_text",
]

RequestId = str | int | None
_NAME = re.compile(r"[A-Za-z0-9_.:/\-]{1,128}")
_MAX_ID_LENGTH = 128


def inbox(user: str) -> str:
    """The personal inbox room of a user."""
    return "@" + user


@dataclass(frozen=True, slots=True)
class Join:
    room: str
    since: int | None = None
    epoch: str | None = None
    id: RequestId = None


@dataclass(frozen=True, slots=True)
class Leave:
    room: str
    id: RequestId = None


@dataclass(frozen=True, slots=True)
class Publish:
    room: str
    data: bytes  # the `data` value, already JSON-encoded once
    id: RequestId = None


@dataclass(frozen=True, slots=True)
class Direct:
    to: str
    data: bytes
    id: RequestId = None


@dataclass(frozen=True, slots=True)
class Members:
    room: str
    id: RequestId = None


@dataclass(frozen=True, slots=True)
class Refresh:
    token: str
    id: RequestId = None


@dataclass(frozen=True, slots=True)
class Ping:
    id: RequestId = None


@dataclass(frozen=True, slots=True)
class Resume:
    """The client's own positions, sent right after a resumed `welcome` (positions=1)."""

    rooms: Mapping[str, int]
    epochs: Mapping[str, str]
    id: RequestId = None


Command = Join | Leave | Publish | Direct | Members | Refresh | Ping | Resume


def parse(frame: str | bytes) -> Command:
    """One client text frame to a command. Raises ProtocolError with the reply's code.

    The error carries the frame's `id` whenever the frame is an object with a valid one,
    so the client can tell which of its frames was refused.
    """
    obj = _object(frame)
    request_id = _request_id(obj)
    try:
        return _command(obj, request_id)
    except ProtocolError as exc:
        exc.request_id = request_id
        raise


def request_id_of(frame: str | bytes) -> RequestId:
    """The frame's valid `id`, or None: for replies to frames that are not parsed (rate limited)."""
    try:
        return _request_id(_object(frame))
    except ProtocolError:
        return None


def _object(frame: str | bytes) -> dict[str, Any]:
    try:
        obj = orjson.loads(frame)
    except orjson.JSONDecodeError:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "frame must be a JSON object")
    return obj


def _command(obj: dict[str, Any], request_id: RequestId) -> Command:
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "field 'type' must be a string")
    match kind:
        case "join":
            since = obj.get("since")
            if since is not None and (not _is_int(since) or since < 0):
                raise ProtocolError(ErrorCode.BAD_REQUEST, "field 'since' must be a non-negative integer")
            epoch = obj.get("epoch")
            if epoch is not None and not isinstance(epoch, str):
                raise ProtocolError(ErrorCode.BAD_REQUEST, "field 'epoch' must be a string")
            return Join(_name(obj, "room"), since, epoch, request_id)
        case "leave":
            return Leave(_name(obj, "room"), request_id)
        case "publish":
            return Publish(_name(obj, "room"), _data(obj), request_id)
        case "direct":
            return Direct(_name(obj, "to"), _data(obj), request_id)
        case "members":
            return Members(_name(obj, "room"), request_id)
        case "refresh":
            token = obj.get("token")
            if not isinstance(token, str) or not token:
                raise ProtocolError(ErrorCode.BAD_REQUEST, "field 'token' must be a non-empty string")
            return Refresh(token, request_id)
        case "ping":
            return Ping(request_id)
        case "resume":
            return Resume(_positions(obj), _epochs(obj), request_id)
    raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown type {kind[:64]!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _request_id(obj: dict[str, Any]) -> RequestId:
    request_id = obj.get("id")
    if request_id is None:
        return None
    if isinstance(request_id, str) and len(request_id) <= _MAX_ID_LENGTH:
        return request_id
    if _is_int(request_id) and abs(request_id) < 2**63:
        return int(request_id)
    raise ProtocolError(ErrorCode.BAD_REQUEST, "field 'id' must be a short string or an integer")


def check_name(value: object, key: str) -> str:
    """A room or user name given outside a frame (the server API), checked as in one."""
    return _name({key: value}, key)


def _name(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"field {key!r} must be a string")
    if not _NAME.fullmatch(value.removeprefix("@") if key == "room" else value):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"field {key!r} must be 1-128 of A-Z a-z 0-9 _ . : / -")
    return value


def _positions(obj: dict[str, Any]) -> dict[str, int]:
    rooms = obj.get("rooms")
    if not isinstance(rooms, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "field 'rooms' must be an object of room: seq")
    for room, seq in rooms.items():
        _name({"room": room}, "room")
        if not _is_int(seq) or seq < 0:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, "each position in 'rooms' must be a non-negative integer"
            )
    return rooms


def _epochs(obj: dict[str, Any]) -> dict[str, str]:
    epochs = obj.get("epochs", {})
    if not isinstance(epochs, dict) or not all(isinstance(e, str) for e in epochs.values()):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "field 'epochs' must be an object of room: epoch string")
    return epochs


def _data(obj: dict[str, Any]) -> bytes:
    if "data" not in obj:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "field 'data' is required")
    try:
        return orjson.dumps(obj["data"])
    except orjson.JSONEncodeError:
        # orjson reads 1024 levels of nesting but writes only 254.
        raise ProtocolError(ErrorCode.BAD_REQUEST, "field 'data' is nested too deeply") from None


def encode(kind: str, request_id: RequestId = None, **fields: Any) -> bytes:
    """A server frame: `type` first, the client's `id` echoed when it sent one."""
    frame: dict[str, Any] = {"type": kind, **fields}
    if request_id is not None:
        frame["id"] = request_id
    return orjson.dumps(frame)


def encode_error(code: ErrorCode, message: str, request_id: RequestId = None) -> bytes:
    return encode("error", request_id, code=code.value, message=message)


def message_halves(room: str, sender: str, data: bytes, ts: int) -> tuple[bytes, bytes]:
    """A room `message` frame split where its seq goes: `head + seq + tail`.

    The split lets the sequencing script in Redis build the frame without decoding it.
    """
    head = b'{"type":"message","room":' + orjson.dumps(room) + b',"seq":'
    tail = b',"from":' + orjson.dumps(sender) + b',"data":' + data + b',"ts":' + b"%d}" % ts
    return head, tail


def direct_halves(sender: str, data: bytes, ts: int) -> tuple[bytes, bytes]:
    """A `direct` frame split where the recipient inbox's seq goes."""
    head = b'{"type":"direct","from":' + orjson.dumps(sender) + b',"seq":'
    tail = b',"data":' + data + b',"ts":' + b"%d}" % ts
    return head, tail


def presence_halves(room: str, event: str) -> tuple[bytes, bytes]:
    """A `presence` frame split where the user goes (a Redis script fills it in)."""
    return b'{"type":"presence","room":' + orjson.dumps(
        room
    ) + b',"user":', b',"event":"%s"}' % event.encode()


def wire_text(payload: bytes) -> bytes:
    """A complete unmasked WebSocket text frame (RFC 6455 5.2) around `payload`.

    The fan-out path frames a message once and writes these same bytes to every local
    socket, instead of asking the WebSocket writer to frame it per recipient.
    """
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 65536:
        return bytes((0x81, 126)) + size.to_bytes(2, "big") + payload
    return bytes((0x81, 127)) + size.to_bytes(8, "big") + payload
