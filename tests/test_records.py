"""The record codec: what workers exchange on room channels and slot inboxes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rtc.protocol import message_halves
from rtc.routing.records import (
    Answer,
    Forward,
    Record,
    RecordError,
    decode_records,
    decode_slot,
    decode_slots,
    encode_answer,
    encode_forward,
    encode_slots,
)

names = st.from_regex(r"[A-Za-z0-9_.:/\-]{1,40}", fullmatch=True)
heads = st.binary(max_size=80).filter(lambda b: b"\n" not in b)  # compact JSON: no newline
tails = st.binary(max_size=80)  # last in the record: it may hold anything


def test_fan_out_records_decode_in_order() -> None:
    payload = b'3 1700 {"seq":3}\n0 0 {"type":"presence"}\n4 1701 {"a":"b c"}'
    assert decode_records(payload) == [
        Record(3, 1700, b'{"seq":3}'),
        Record(0, 0, b'{"type":"presence"}'),
        Record(4, 1701, b'{"a":"b c"}'),
    ]


@pytest.mark.parametrize("payload", [b"", b"3 1700", b"x 1 {}", b"1 2 {}\n\n"])
def test_a_malformed_fan_out_payload_is_refused(payload: bytes) -> None:
    with pytest.raises(RecordError):
        decode_records(payload)


@given(
    origin=names,
    rid=st.integers(1, 2**40).map(lambda n: b"%d" % n),
    dedup=st.none() | names,
    key=names,
    ts=st.integers(0, 2**45),
    head=heads,
    tail=tails,
)
def test_a_forward_survives_the_round_trip(
    origin: str, rid: bytes, dedup: str | None, key: str, ts: int, head: bytes, tail: bytes
) -> None:
    forward = Forward(origin, rid, dedup, key, ts, head, tail)
    assert decode_slot(encode_forward(forward)) == forward


def test_a_real_message_forward_round_trips() -> None:
    head, tail = message_halves("lobby", "alice", b'{"text":"line1\\nline2"}', 1700)
    forward = Forward("alpha:0", b"7", "sid:1", "lobby", 1700, head, tail)
    assert decode_slot(encode_forward(forward)) == forward


@pytest.mark.parametrize("answer", [Answer(b"12", 5, "1795995095819035"), Answer(b"13", None)])
def test_answers_round_trip(answer: Answer) -> None:
    assert decode_slot(encode_answer(answer)) == answer


@pytest.mark.parametrize(
    "payload", [b"", b"X\n1", b"A\n1", b"A\n1\nx", b"A\n1\nx\ne", b"E\n1\n2", b"P\nonly\nthree"]
)
def test_a_malformed_slot_record_is_refused(payload: bytes) -> None:
    with pytest.raises(RecordError):
        decode_slot(payload)


def test_an_answer_without_epoch_from_an_older_worker_still_reads() -> None:
    assert decode_slot(b"A\n12\n5") == Answer(b"12", 5, "")
    with pytest.raises(RecordError):
        decode_slot(b"A\n12\n5\nepoch\nextra")


forwards = st.builds(
    Forward, names, st.integers(1, 2**40).map(lambda n: b"%d" % n), st.none() | names, names,
    st.integers(0, 2**45), heads, tails,
)  # fmt: skip
rids = st.integers(1, 2**40).map(lambda n: b"%d" % n)
answers = st.builds(
    Answer, rids, st.integers(1, 2**40), st.from_regex(r"[0-9]{0,20}", fullmatch=True)
) | st.builds(Answer, rids, st.none(), st.just(""))


@given(st.lists(forwards | answers, min_size=1, max_size=8))
def test_a_batch_of_slot_records_survives_the_round_trip(records: list[Forward | Answer]) -> None:
    payloads = [encode_forward(r) if isinstance(r, Forward) else encode_answer(r) for r in records]
    batch = encode_slots(payloads)
    assert decode_slots(batch) == records
    if len(records) == 1:
        assert batch == payloads[0]  # one record travels as it is


@pytest.mark.parametrize("payload", [b"B5\nA\n1", b"Bx\nA\n1\n2", b"B3\nA\n1\n2", b"B7\nX\n1\n2\n"])
def test_a_malformed_slot_batch_is_refused(payload: bytes) -> None:
    with pytest.raises(RecordError):
        decode_slots(payload)
