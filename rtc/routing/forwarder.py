"""Getting each publish to its key's owner, in the order one connection sent them.

The owner of a key (a room, or a user's inbox) sequences it: this worker's sequencer
when it owns the key, else the owner's, reached by a forward record on the owner slot's
inbox channel; the owner answers on ours. A forward that no worker received (its owner
just died) is sequenced here instead; Redis's atomic seq keeps that safe. One not
answered within `FORWARD_TIMEOUT` fails (the client gets `unavailable` and may retry).

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
from rtc.routing.sequencer import Reply, Sequencer

__all__ = ["FORWARD_TIMEOUT", "Forwarder"]

FORWARD_TIMEOUT = 2.0  # SPEC: a publish not sequenced in time gets `unavailable`

_Lane = tuple[Hashable, str]  # (sender, key)


@dataclass(eq=False, slots=True)
class _Entry:
    """One publish of a lane: waiting, or in flight to `target`."""

    key: str
    item: Unsequenced
    reply: Reply
    target: str | None = None
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
        self._forwards: dict[bytes, tuple[_Lane, _Entry, float]] = {}
        self._next_rid = 0
        self._forwarded = metrics.FORWARDED.labels(worker)

    def route(self, sender: Hashable, key: str, item: Unsequenced, reply: Reply) -> None:
        """Sequence `item` at the owner of `key`; `reply` gets its seq or None."""
        lane_id = (sender, key)
        lane = self._lanes.get(lane_id)
        if lane is None:
            lane = self._lanes[lane_id] = deque()
        lane.append(_Entry(key, item, reply))
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
        if target == self._ring.slot:
            self._sequencer.sequence(entry.key, entry.item, lambda seq: self._resolve(lane_id, entry, seq))
            return
        self._next_rid += 1
        rid = b"%d" % self._next_rid
        self._forwards[rid] = (lane_id, entry, self._clock() + FORWARD_TIMEOUT)
        item = entry.item
        record = Forward(self._ring.slot, rid, item.dedup, entry.key, item.ts, item.head, item.tail)
        self._forwarded.inc()
        self._outbox.send(
            keys.slot_inbox(target), encode_forward(record), on_nobody=lambda: self._unforward(rid)
        )

    def _resolve(self, lane_id: _Lane, entry: _Entry, seq: int | None) -> None:
        if entry.done:
            return
        entry.done = True
        entry.reply(seq)
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
            lane_id, entry, _ = pending
            entry.target, entry.here = None, True
            lane = self._lanes.get(lane_id)
            if lane is not None:
                self._pump(lane_id, lane)

    def expire(self) -> None:
        """Forwards not answered in time fail (`unavailable`); their lanes move on."""
        now = self._clock()
        expired = [rid for rid, (_, _, deadline) in self._forwards.items() if deadline < now]
        for rid in expired:
            lane_id, entry, _ = self._forwards.pop(rid)
            self._resolve(lane_id, entry, None)

    def on_slot_message(self, payload: bytes) -> None:
        """Forwards to sequence for other workers, and answers to ours."""
        for record in decode_slots(payload):
            self._on_record(record)

    def _on_record(self, record: Forward | Answer) -> None:
        if isinstance(record, Answer):
            pending = self._forwards.pop(record.rid, None)
            if pending is not None:
                lane_id, entry, _ = pending
                self._resolve(lane_id, entry, record.seq)
            return
        origin, rid = keys.slot_inbox(record.origin), record.rid

        def answer(seq: int | None) -> None:
            self._outbox.send(origin, encode_answer(Answer(rid, seq)))

        self._sequencer.sequence(
            record.key, Unsequenced(record.head, record.tail, record.ts, record.dedup), answer
        )
