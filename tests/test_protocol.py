"""rtc.protocol fed frames and values: commands out, error codes, encoded bytes."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from aiohttp._websocket.reader import WebSocketDataQueue
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_websocket import WebSocketReader, WSMsgType

from rtc.errors import ErrorCode, ProtocolError
from rtc.protocol import (
    Direct,
    Join,
    Leave,
    Members,
    Ping,
    Publish,
    Refresh,
    Resume,
    direct_halves,
    encode,
    encode_error,
    inbox,
    message_halves,
    parse,
    request_id_of,
    wire_text,
)


def frame(**fields: Any) -> bytes:
    return orjson.dumps(fields)


def parse_error(raw: str | bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        parse(raw)
    return caught.value


# -- valid commands -------------------------------------------------------------------------


@pytest.mark.parametrize("request_id", [None, "req-1", 7, 0, -3, "", "x" * 128, 2**63 - 1])
def test_every_command_parses_and_keeps_its_id(request_id: str | int | None) -> None:
    extra = {} if request_id is None else {"id": request_id}
    assert parse(frame(type="join", room="lobby", **extra)) == Join("lobby", None, None, request_id)
    assert parse(frame(type="leave", room="lobby", **extra)) == Leave("lobby", request_id)
    assert parse(frame(type="publish", room="lobby", data={"a": [1, 2]}, **extra)) == Publish(
        "lobby", b'{"a":[1,2]}', request_id
    )
    assert parse(frame(type="direct", to="bob", data="hi", **extra)) == Direct("bob", b'"hi"', request_id)
    assert parse(frame(type="members", room="lobby", **extra)) == Members("lobby", request_id)
    assert parse(frame(type="refresh", token="abc.def.ghi", **extra)) == Refresh("abc.def.ghi", request_id)
    assert parse(frame(type="ping", **extra)) == Ping(request_id)


def test_resume_carries_positions_and_epochs() -> None:
    got = parse(frame(type="resume", rooms={"lobby": 5, "@me": 0}, epochs={"lobby": "17"}, id=3))
    assert got == Resume({"lobby": 5, "@me": 0}, {"lobby": "17"}, 3)
    assert parse(frame(type="resume", rooms={})) == Resume({}, {}, None)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"rooms": [["lobby", 1]]},
        {"rooms": {"lobby": -1}},
        {"rooms": {"lobby": "5"}},
        {"rooms": {"lobby": True}},
        {"rooms": {"bad room": 1}},
        {"rooms": {"lobby": 1}, "epochs": {"lobby": 17}},
        {"rooms": {"lobby": 1}, "epochs": ["17"]},
    ],
)
def test_bad_resume_is_bad_request(fields: dict[str, Any]) -> None:
    assert parse_error(frame(type="resume", **fields)).code is ErrorCode.BAD_REQUEST


def test_id_type_is_kept_as_sent() -> None:
    assert parse(frame(type="ping", id="7")).id == "7"
    assert parse(frame(type="ping", id=7)).id == 7
    assert isinstance(parse(frame(type="ping", id=7)).id, int)


def test_join_with_since_and_epoch() -> None:
    assert parse(frame(type="join", room="r", since=0, epoch="e1")) == Join("r", 0, "e1")
    assert parse(frame(type="join", room="r", since=42)) == Join("r", 42, None)
    assert parse(frame(type="join", room="r", since=None, epoch=None)) == Join("r")


def test_join_of_an_inbox_room_parses() -> None:
    assert parse(frame(type="join", room="@alice", since=3)) == Join("@alice", 3)


def test_text_and_bytes_frames_parse_alike() -> None:
    text = '{"type":"publish","room":"a.b:c/d-e_f","data":null}'
    assert parse(text) == parse(text.encode()) == Publish("a.b:c/d-e_f", b"null")


@pytest.mark.parametrize("data", [None, 0, 1.5, "", "é€😀", [], {}, {"n": {"m": [True, False]}}])
def test_publish_data_is_encoded_once_as_json(data: Any) -> None:
    command = parse(frame(type="publish", room="r", data=data))
    assert isinstance(command, Publish)
    assert orjson.loads(command.data) == data


def test_unknown_fields_are_ignored() -> None:
    assert parse(frame(type="ping", extra={"x": 1}, room=5)) == Ping()


def test_room_names_at_the_length_limit() -> None:
    assert parse(frame(type="leave", room="r" * 128)) == Leave("r" * 128)
    assert parse(frame(type="leave", room="@" + "u" * 128)) == Leave("@" + "u" * 128)


# -- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"{",
        b'{"type":"ping"',
        b"\xff\xfe",
        '{"type":"ping"}garbage',
        b"NaN",
        b'{"type":"publish","room":"r","data":NaN}',
    ],
)
def test_not_json_is_bad_request(raw: str | bytes) -> None:
    assert parse_error(raw).code is ErrorCode.BAD_REQUEST


@pytest.mark.parametrize("raw", [b"[]", b'["ping"]', b"1", b'"ping"', b"null", b"true"])
def test_not_an_object_is_bad_request(raw: bytes) -> None:
    assert parse_error(raw).code is ErrorCode.BAD_REQUEST


@pytest.mark.parametrize("kind", [None, 1, True, ["ping"], {"t": "ping"}])
def test_type_missing_or_not_a_string_is_bad_request(kind: Any) -> None:
    raw = b"{}" if kind is None else frame(type=kind)
    assert parse_error(raw).code is ErrorCode.BAD_REQUEST


@pytest.mark.parametrize("kind", ["", "PING", "subscribe", "message", "x" * 1000])
def test_unknown_type(kind: str) -> None:
    error = parse_error(frame(type=kind, room="r"))
    assert error.code is ErrorCode.UNKNOWN_TYPE
    assert len(error.message) < 100  # the echo of a long type is cut


BAD_NAMES: list[Any] = [
    None,
    1,
    True,
    [],
    {},
    "",
    "r" * 129,
    "a b",
    "é",
    "a\nb",
    "a*",
    "a?",
    "a@b",
    "@",
    "@@a",
]


@pytest.mark.parametrize("kind", ["join", "leave", "publish", "members"])
@pytest.mark.parametrize("room", BAD_NAMES)
def test_missing_or_bad_room_is_bad_request(kind: str, room: Any) -> None:
    fields: dict[str, Any] = {"type": kind, "data": 1}
    if room is not None:
        fields["room"] = room
    assert parse_error(frame(**fields)).code is ErrorCode.BAD_REQUEST


@pytest.mark.parametrize("to", [*BAD_NAMES, "@bob"])
def test_missing_or_bad_direct_recipient_is_bad_request(to: Any) -> None:
    fields: dict[str, Any] = {"type": "direct", "data": 1}
    if to is not None:
        fields["to"] = to
    assert parse_error(frame(**fields)).code is ErrorCode.BAD_REQUEST


@pytest.mark.parametrize("since", [-1, True, False, 1.0, 1.5, "3", [3]])
def test_bad_since_is_bad_request(since: Any) -> None:
    error = parse_error(frame(type="join", room="r", since=since))
    assert error.code is ErrorCode.BAD_REQUEST
    assert "since" in error.message


@pytest.mark.parametrize("epoch", [1, True, ["e"], {"e": 1}])
def test_non_string_epoch_is_bad_request(epoch: Any) -> None:
    error = parse_error(frame(type="join", room="r", epoch=epoch))
    assert error.code is ErrorCode.BAD_REQUEST
    assert "epoch" in error.message


@pytest.mark.parametrize("kind,target", [("publish", {"room": "r"}), ("direct", {"to": "bob"})])
def test_missing_data_is_bad_request(kind: str, target: dict[str, str]) -> None:
    error = parse_error(frame(type=kind, **target))
    assert error.code is ErrorCode.BAD_REQUEST
    assert "data" in error.message


@pytest.mark.parametrize("request_id", [True, False, 1.0, 2.5, "x" * 129, [1], {"a": 1}, 2**63, -(2**63)])
def test_bad_id_is_bad_request(request_id: Any) -> None:
    error = parse_error(frame(type="ping", id=request_id))
    assert error.code is ErrorCode.BAD_REQUEST
    assert "id" in error.message


def test_huge_integer_id_is_bad_request() -> None:
    assert parse_error(b'{"type":"ping","id":123456789012345678901234567890}').code is ErrorCode.BAD_REQUEST


@pytest.mark.parametrize("token", [None, "", 1, ["t"]])
def test_missing_or_empty_token_is_bad_request(token: Any) -> None:
    fields: dict[str, Any] = {"type": "refresh"}
    if token is not None:
        fields["token"] = token
    assert parse_error(frame(**fields)).code is ErrorCode.BAD_REQUEST


@pytest.mark.parametrize("depth", [254, 255, 300, 1000])
def test_deeply_nested_data_is_a_protocol_error(depth: int) -> None:
    """orjson reads 1024 levels but writes only 254: the re-encode must not escape as TypeError."""
    raw = b'{"type":"publish","room":"r","data":' + b"[" * depth + b"]" * depth + b"}"
    try:
        command = parse(raw)
    except ProtocolError as exc:
        assert exc.code is ErrorCode.BAD_REQUEST
    else:
        assert isinstance(command, Publish)
        assert orjson.loads(command.data) is not None


# -- encoding -------------------------------------------------------------------------------


def test_encode_puts_type_first_and_echoes_the_id() -> None:
    assert encode("pong") == b'{"type":"pong"}'
    assert encode("pong", "a") == b'{"type":"pong","id":"a"}'
    assert encode("pong", 0) == b'{"type":"pong","id":0}'
    assert encode("ack", 5, room="r", seq=3) == b'{"type":"ack","room":"r","seq":3,"id":5}'


def test_encode_error_shape() -> None:
    assert orjson.loads(encode_error(ErrorCode.NOT_JOINED, "join first", "q")) == {
        "type": "error",
        "code": "not_joined",
        "message": "join first",
        "id": "q",
    }
    assert orjson.loads(encode_error(ErrorCode.INTERNAL, "oops")) == {
        "type": "error",
        "code": "internal",
        "message": "oops",
    }


def test_every_error_code_is_a_plain_string_on_the_wire() -> None:
    for code in ErrorCode:
        assert orjson.loads(encode_error(code, "m"))["code"] == code.value


def test_inbox() -> None:
    assert inbox("alice") == "@alice"


def test_message_halves_splice_a_seq() -> None:
    head, tail = message_halves('ro"om', "alice", b'{"x":[1,"\\u00e9"]}', 1700000000123)
    decoded = orjson.loads(head + b"7" + tail)
    assert decoded == {
        "type": "message",
        "room": 'ro"om',
        "seq": 7,
        "from": "alice",
        "data": {"x": [1, "é"]},
        "ts": 1700000000123,
    }
    assert list(decoded) == ["type", "room", "seq", "from", "data", "ts"]


def test_direct_halves_splice_a_seq() -> None:
    head, tail = direct_halves("bob", b"null", 5)
    decoded = orjson.loads(head + b"7" + tail)
    assert decoded == {"type": "direct", "from": "bob", "seq": 7, "data": None, "ts": 5}
    assert list(decoded) == ["type", "from", "seq", "data", "ts"]


def test_halves_take_parsed_data_verbatim() -> None:
    command = parse(frame(type="publish", room="r", data={"k": "v"}))
    assert isinstance(command, Publish)
    head, tail = message_halves(command.room, "u", command.data, 1)
    assert orjson.loads(head + b"12345678901234" + tail)["data"] == {"k": "v"}


# -- framing --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size,header",
    [
        (0, b"\x81\x00"),
        (125, b"\x81\x7d"),
        (126, b"\x81\x7e\x00\x7e"),
        (65535, b"\x81\x7e\xff\xff"),
        (65536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
    ],
)
def test_wire_text_header_bytes(size: int, header: bytes) -> None:
    payload = b"x" * size
    assert wire_text(payload) == header + payload


async def test_aiohttp_reads_wire_text_frames() -> None:
    """The frames written past aiohttp's writer are ones aiohttp's own reader accepts."""
    loop = asyncio.get_running_loop()
    queue = WebSocketDataQueue(BaseProtocol(loop), 1 << 20, loop=loop)
    reader = WebSocketReader(queue, 1 << 20, compress=False, decode_text=True)
    for size in (0, 125, 126, 65535, 65536):
        payload = ("é" * size).encode()[:size] if size % 2 == 0 else b"y" * size
        reader.feed_data(wire_text(payload))
        message = await queue.read()
        assert message.type is WSMsgType.TEXT
        assert message.data == payload.decode()


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ('{"type": "teleport", "id": "x"}', ErrorCode.UNKNOWN_TYPE),
        ('{"id": "x"}', ErrorCode.BAD_REQUEST),
        ('{"type": "join", "room": "has space", "id": "x"}', ErrorCode.BAD_REQUEST),
        ('{"type": "publish", "room": "r", "id": "x"}', ErrorCode.BAD_REQUEST),
    ],
)
def test_a_refused_frame_keeps_its_id(text: str, code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse(text)
    assert (caught.value.code, caught.value.request_id) == (code, "x")


def test_request_id_of_reads_only_a_valid_id() -> None:
    assert request_id_of('{"type": "ping", "id": 7}') == 7
    assert request_id_of('{"type": "ping", "id": [1]}') is None
    assert request_id_of("not json") is None
    assert request_id_of("[1]") is None
