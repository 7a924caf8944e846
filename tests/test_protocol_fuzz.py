"""rtc.protocol under arbitrary input: `parse` returns a command or raises ProtocolError."""

from __future__ import annotations

import keyword
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rtc.errors import ErrorCode, ProtocolError
from rtc.protocol import (
    Command,
    Direct,
    Join,
    Publish,
    direct_halves,
    encode,
    message_halves,
    parse,
)

# No example database: the suite leaves nothing behind in the work tree.
FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

TYPES = ["join", "leave", "publish", "direct", "members", "refresh", "ping", "nope", ""]
FIELDS = ["type", "id", "room", "to", "data", "since", "epoch", "token"]

# orjson writes text without lone surrogates and integers of 64 bits.
texts = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=20,
)
names = st.from_regex(r"@?[A-Za-z0-9_.:/\-]{1,130}", fullmatch=True) | texts
field_values = names | json_values | st.sampled_from(TYPES)


@st.composite
def frames(draw: st.DrawFn) -> dict[str, Any]:
    """Objects that look like client frames, so the parser gets past its first checks."""
    obj: dict[str, Any] = {"type": draw(st.sampled_from(TYPES) | field_values)}
    for name in draw(st.lists(st.sampled_from(FIELDS), unique=True, max_size=6)):
        obj[name] = draw(field_values)
    return obj


def parse_or_error(raw: str | bytes) -> Command | None:
    try:
        return parse(raw)
    except ProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)
        assert exc.message
        return None


@FUZZ
@given(st.text())
def test_any_text(raw: str) -> None:
    parse_or_error(raw)


@FUZZ
@given(st.binary())
def test_any_bytes(raw: bytes) -> None:
    parse_or_error(raw)


@FUZZ
@given(json_values)
def test_any_json_value(value: Any) -> None:
    parse_or_error(orjson.dumps(value))


@FUZZ
@given(frames())
def test_frame_like_objects(obj: dict[str, Any]) -> None:
    command = parse_or_error(orjson.dumps(obj))
    if command is None:
        return
    assert obj["type"] in TYPES
    assert command.id == obj.get("id")
    if isinstance(command, Publish | Direct):
        assert orjson.loads(command.data) == obj["data"]
    if isinstance(command, Join):
        assert command.since is None or command.since >= 0


@FUZZ
@given(st.integers(0, 1100), st.sampled_from(["[", '{"k":']))
def test_nested_data(depth: int, opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    parse_or_error('{"type":"publish","room":"r","data":' + opener * depth + "0" + closer * depth + "}")


field_names = st.from_regex(r"[a-z_][a-z0-9_]{0,15}", fullmatch=True).filter(
    lambda name: name not in {"type", "id", "kind", "request_id"} and not keyword.iskeyword(name)
)


@FUZZ
@given(
    st.sampled_from(["ack", "joined", "message", "error"]),
    st.none() | st.integers(-(2**63) + 1, 2**63 - 1) | texts,
    st.dictionaries(field_names, json_values, max_size=6),
)
def test_encode_round_trips(kind: str, request_id: str | int | None, fields: dict[str, Any]) -> None:
    decoded = orjson.loads(encode(kind, request_id, **fields))
    expected = {"type": kind, **fields}
    if request_id is not None:
        expected["id"] = request_id
    assert decoded == expected
    assert next(iter(decoded)) == "type"


@FUZZ
@given(texts, texts, json_values, st.integers(0, 2**53), st.integers(1, 2**63 - 1))
def test_halves_round_trip(room: str, sender: str, data: Any, ts: int, seq: int) -> None:
    head, tail = message_halves(room, sender, orjson.dumps(data), ts)
    assert orjson.loads(head + b"%d" % seq + tail) == {
        "type": "message",
        "room": room,
        "seq": seq,
        "from": sender,
        "data": data,
        "ts": ts,
    }
    head, tail = direct_halves(sender, orjson.dumps(data), ts)
    assert orjson.loads(head + b"%d" % seq + tail) == {
        "type": "direct",
        "from": sender,
        "seq": seq,
        "data": data,
        "ts": ts,
    }
