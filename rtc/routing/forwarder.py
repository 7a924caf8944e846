"""Getting each publish to its key's owner, in the order one connection sent them.

The owner of a key (a room, or a user's inbox) sequences it: this worker's sequencer
when it owns the key, else the owner's, reached by a forward record on the owner slot's
inbox channel; the owner answers on ours. A forward that no worker received (its owner
just died) is sequenced here instead; Redis's atomic seq keeps that safe.

Deadline: every publish is answered within `FORWARD_TIMEOUT` of being routed, whatever
Redis does (SPEC 4). The deadline runs from `route`, for a publish in flight or still
waiting in its lane alike; `expire` is driven by its own timer, never by a heartbeat
that waits on Redis. A publish answered `unavailable` that has not left this worker yet
is dropped (its retry, same id, is the one to sequence); one that left may still be
sequenced: `unavailable` is indeterminate. A forward whose PUBLISH failed is answered
`unavailable` at once, so its lane moves on as soon as Redis is back.

Order: the publishes of one connection to one key form a lane. While publishes of a
lane are in flight to one owner, later ones go to the same owner without waiting
(pipelined); a later one whose owner differs (the ring changed, or the owner died) waits
until everything ahead of it in its lane was answered, so two owners never sequence one
lane's publishes concurrently and they keep their send order (SPEC 4).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from rtc import keys, metrics
from rtc.broker.base import Unsequenced
from rtc.routing.outbox import Outbox
from rtc.routing.records import Answer, Forward, decode_slots, encode_answer, encode_forward
from rtc.routing.ring import RingMember
from rtc.routing.sequencer import Reply, Sequencer, Stamp

__all__ = ["FORWARD_TIMEOUT", "Forwarder"]

FORWARD_TIMEOUT = 1.5  # SPEC 4: answered within 2 s; the rest is margin for a busy loop and the way back

_Lane = tuple[Hashable, str]  # (sender, key)


@dataclass(eq=False, slots=True)
class _Entry:
    """One publish of a lane: waiting, or in flight to `target`."""

    key: str
    item: Unsequenced
    reply: Reply
    deadline: float
    target: str | None = None
    rid: bytes | None = None  # while forwarded
    here: bool = False  # its owner did not listen: sequence it on this worker
    done: bool = False


class Forwarder:
    """Routes publishes by ownership and answers the forwards this worker's slot receives."""

    def __init__(
        self,
        ring: RingMember,
        sequencer: Sequencer,
        outbox: Outbox,
        worker: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ring = ring
        self._sequencer = sequencer
        self._outbox = outbox
        self._clock = clock
        self._lanes: dict[_Lane, deque[_Entry]] = {}
        self._forwards: dict[bytes, tuple[_Lane, _Entry]] = {}
        self._deadlines: deque[tuple[_Lane, _Entry]] = deque()  # in route order: deadline order
        self._next_rid = 0
        self._forwarded = metrics.BatchedCounter(metrics.FORWARDED.labels(worker))

    def route(self, sender: Hashable, key: str, item: Unsequenced, reply: Reply) -> None:
        """Sequence `item` at the owner of `key`; `reply` gets its stamp or None, in time."""
        lane_id = (sender, key)
        lane = self._lanes.get(lane_id)
        if lane is None:
            lane = self._lanes[lane_id] = deque()
        entry = _Entry(key, item, reply, self._clock() + FORWARD_TIMEOUT)
        lane.append(entry)
        self._deadlines.append((lane_id, entry))
        self._pump(lane_id, lane)

    def _pump(self, lane_id: _Lane, lane: deque[_Entry]) -> None:
        """Send the lane's waiting publishes that may go now (same owner as those in flight)."""
        busy: str | None = None
        for entry in lane:
            if entry.target is not None:
                busy = entry.target
                continue
            target = self._ring.slot if entry.here else self._ring.owner(entry.key)
            if busy is not None and target != busy:
                return
            busy = target
            self._dispatch(lane_id, entry, target)

    def _dispatch(self, lane_id: _Lane, entry: _Entry, target: str) -> None:
        entry.target = target

        def wanted() -> bool:
            return not entry.done

        if target == self._ring.slot:
            self._sequencer.sequence(
                entry.key, entry.item, lambda stamp: self._resolve(lane_id, entry, stamp), wanted
            )
            return
        self._next_rid += 1
        rid = entry.rid = b"%d" % self._next_rid
        self._forwards[rid] = (lane_id, entry)
        item = entry.item
        record = Forward(self._ring.slot, rid, item.dedup, entry.key, item.ts, item.head, item.tail)
        self._forwarded.inc()
        self._outbox.send(
            keys.slot_inbox(target),
            encode_forward(record),
            on_nobody=lambda: self._unforward(rid),
            on_failed=lambda: self._resolve(lane_id, entry, None),
            wanted=wanted,
        )

    def _resolve(self, lane_id: _Lane, entry: _Entry, stamp: Stamp | None) -> None:
        if entry.done:
            return
        entry.done = True
        if entry.rid is not None:
            self._forwards.pop(entry.rid, None)
        entry.reply(stamp)
        lane = self._lanes.get(lane_id)
        if lane is None:
            return
        if lane[0] is entry:
            lane.popleft()
        else:
            lane.remove(entry)
        if lane:
            self._pump(lane_id, lane)
        else:
            del self._lanes[lane_id]

    def _unforward(self, rid: bytes) -> None:
        """Nobody listens on the owner's slot (it died): sequence here, in lane order."""
        pending = self._forwards.pop(rid, None)
        if pending is not None:
            lane_id, entry = pending
            entry.target, entry.here, entry.rid = None, True, None
            lane = self._lanes.get(lane_id)
            if lane is not None:
                self._pump(lane_id, lane)

    def expire(self) -> None:
        """Publishes not answered by their deadline fail (`unavailable`); their lanes move on."""
        now = self._clock()
        deadlines = self._deadlines
        while deadlines and deadlines[0][1].deadline <= now:
            lane_id, entry = deadlines.popleft()
            self._resolve(lane_id, entry, None)  # nothing when it was answered already

    def on_slot_message(self, payload: bytes) -> None:
        """Forwards to sequence for other workers, and answers to ours."""
        for record in decode_slots(payload):
            self._on_record(record)

    def _on_record(self, record: Forward | Answer) -> None:
        if isinstance(record, Answer):
            pending = self._forwards.get(record.rid)
            if pending is not None:
                lane_id, entry = pending
                stamp = None if record.seq is None else Stamp(record.seq, record.epoch)
                self._resolve(lane_id, entry, stamp)
            return
        origin, rid = keys.slot_inbox(record.origin), record.rid

        def answer(stamp: Stamp | None) -> None:
            if stamp is None:
                self._outbox.send(origin, encode_answer(Answer(rid, None)))
            else:
                self._outbox.send(origin, encode_answer(Answer(rid, stamp.seq, stamp.epoch)))

        self._sequencer.sequence(
            record.key, Unsequenced(record.head, record.tail, record.ts, record.dedup), answer
        )
