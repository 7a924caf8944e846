"""The record formats workers exchange over Redis pub/sub, named and in one place.

Two formats travel on two kinds of channel:

- **Fan-out records** on a room's channel, written by the SEQUENCE and presence scripts:
  `<seq> <ts> <frame>`, several joined by `\\n` in one message. Seq 0 marks an unsequenced
  room event (presence). Frames are compact JSON, which never holds a raw newline.
- **Slot records** on a worker slot's inbox: a forwarded publish
  `P\\n<origin>\\n<rid>\\n<dedup>\\n<key>\\n<ts>\\n<head>\\n<tail>`, and its answer,
  `A\\n<rid>\\n<seq>\\n<epoch>` (sequenced) or `E\\n<rid>` (failed); an answer without the
  epoch (from a worker of an older version, during a rolling upgrade) reads as epoch "".
  Slot ids, request ids, dedup tokens, epochs and room names never hold a newline, nor does
  the head (compact JSON up to the seq); the tail comes last, so it may. Several records
  for one slot in one message: `B`, then each as `<length>\\n<record>` (`encode_slots`).
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = [
    "Answer",
    "Forward",
    "Record",
    "RecordError",
    "decode_records",
    "decode_slot",
    "decode_slots",
    "encode_answer",
    "encode_forward",
    "encode_slots",
]


class RecordError(ValueError):
    """A payload that is not one of the formats above (a bug or a foreign publisher)."""


class Record(NamedTuple):
    """One fan-out record: a sequenced frame, or (seq 0) an unsequenced room event."""

    seq: int
    ts: int
    frame: bytes


class Forward(NamedTuple):
    """A publish forwarded to the owner of `key`, to be sequenced there."""

    origin: str  # the forwarding worker's slot: where the answer goes
    rid: bytes  # the origin's request id, echoed in the answer
    dedup: str | None
    key: str
    ts: int
    head: bytes
    tail: bytes


class Answer(NamedTuple):
    """The owner's answer to a forward: the seq and its epoch, or seq None when it failed."""

    rid: bytes
    seq: int | None
    epoch: str = ""


def decode_records(payload: bytes) -> list[Record]:
    """The records of one fan-out message, in order."""
    records = []
    try:
        for line in payload.split(b"\n"):
            seq, ts, frame = line.split(b" ", 2)
            records.append(Record(int(seq), int(ts), frame))
    except ValueError:
        raise RecordError(f"not a fan-out record: {payload[:60]!r}") from None
    return records


def encode_forward(forward: Forward) -> bytes:
    return b"\n".join(
        (
            b"P",
            forward.origin.encode(),
            forward.rid,
            (forward.dedup or "").encode(),
            forward.key.encode(),
            b"%d" % forward.ts,
            forward.head,
            forward.tail,
        )
    )


def encode_answer(answer: Answer) -> bytes:
    if answer.seq is None:
        return b"E\n" + answer.rid
    return b"A\n%s\n%d\n%s" % (answer.rid, answer.seq, answer.epoch.encode())


def decode_slot(payload: bytes) -> Forward | Answer:
    """A record from a slot inbox: a forward to sequence, or an answer to one of ours."""
    try:
        kind = payload[:2]
        if kind == b"P\n":
            _, origin, rid, dedup, key, ts, head, tail = payload.split(b"\n", 7)
            return Forward(origin.decode(), rid, dedup.decode() or None, key.decode(), int(ts), head, tail)
        if kind == b"A\n":
            _, rid, seq, *epoch = payload.split(b"\n")
            if len(epoch) > 1:
                raise ValueError
            return Answer(rid, int(seq), epoch[0].decode() if epoch else "")
        if kind == b"E\n":
            _, rid = payload.split(b"\n")
            return Answer(rid, None)
    except ValueError:
        pass
    raise RecordError(f"not a slot record: {payload[:60]!r}")


def encode_slots(payloads: list[bytes]) -> bytes:
    """Several slot records for one inbox as one message: `B` then `<length>\\n<record>` each.

    Under load a worker forwards (and answers) many publishes to the same slot per loop
    turn; one pub/sub message for all of them is one PUBLISH and one read on the other
    side instead of one per record. A single record goes as it is.
    """
    if len(payloads) == 1:
        return payloads[0]
    return b"B" + b"".join(b"%d\n%s" % (len(p), p) for p in payloads)


def decode_slots(payload: bytes) -> list[Forward | Answer]:
    """The records of one slot-inbox message, batched (`encode_slots`) or single."""
    if payload[:1] != b"B":
        return [decode_slot(payload)]
    records: list[Forward | Answer] = []
    pos, end = 1, len(payload)
    try:
        while pos < end:
            newline = payload.index(b"\n", pos)
            start = newline + 1
            stop = start + int(payload[pos:newline])
            if stop > end:
                raise ValueError
            records.append(decode_slot(payload[start:stop]))
            pos = stop
    except ValueError:
        raise RecordError(f"not a slot batch: {payload[:60]!r}") from None
    return records
