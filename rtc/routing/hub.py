"""Local rooms as a pure state machine: feed it records and outcomes, act on its effects.

The hub keeps, per room with local members, what decides what a member may see next:
the cursor (last seq delivered here), the epoch, the backlog of records that arrived
while the room was opening or filling a hole, the frames queued for this loop turn, and
the members whose replay is still being sent (they get their messages from history, and
their events wait).

It does no I/O and knows no clock (python-websockets' `Protocol` is the model): the
caller feeds it what arrived (`receive`), what it fetched (`opened`, `filled`,
`resynced`) or failed to fetch, and carries out the effects it returns:

- `Flush`: frames were queued for the room; call `flush` at the end of the loop turn,
  which returns the `Write` (one write per member per turn: the fan-out's cost is its
  send syscalls). `messages` says whether messages are among them: a queue of events
  alone may wait longer (the caller paces presence), and the first message queued after
  events asks again, with `messages` set.
- `Write`: write `data` to each of `members`. Its `marks` say where each frame ends in
  `data` and the seq it brings the room to, so a session checkpoint can count every frame
  that left a socket's buffer (`rtc.routing.checkpoint`).
- `Fill`: read history (after, upto] (after `delay` seconds) and call `filled`, or
  `fill_failed` when the read failed.
- `Resync`: read the room's seq and epoch (after `delay`) and call `resynced`, or
  `resync_failed`.
- `Restart`: history was lost (a new epoch whose last seq is `seq`): tell `members`; the
  new epoch's messages from seq 1 follow (a `Fill`), as they were acked to their publishers.
- `Delivered`, `Gap`: a message went out to `members` members / seqs first..last were
  announced lost; for metrics and logs (the gap frame itself is already queued).

A seq above cursor + 1 means pub/sub dropped something: the hub asks for a fill and
delivers nothing further until it is done, so a hole is filled or announced, never
silent. A transient read failure is retried with backoff; only after
`FILL_ATTEMPTS` failures, or for seqs history no longer holds, is a `gap` announced.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Hashable, Mapping
from dataclasses import dataclass, field, replace
from itertools import accumulate
from typing import Generic, Protocol, TypeVar

import orjson

from rtc.protocol import encode, wire_text
from rtc.routing.checkpoint import Marks
from rtc.routing.records import Record, decode_records

__all__ = [
    "BACKLOG_MAX",
    "FILL_ATTEMPTS",
    "Delivered",
    "Effect",
    "Fill",
    "Flush",
    "Gap",
    "Hub",
    "Member",
    "Phase",
    "Restart",
    "Resync",
    "Room",
    "Write",
    "retry_delay",
]

FILL_ATTEMPTS = 8  # about 15 s of retries before unreadable history counts as lost
BACKLOG_MAX = 10_000  # records kept while filling; past it, history serves them instead


class Member(Hashable, Protocol):
    """What the hub needs of a member: presence events skip their own subject."""

    @property
    def user(self) -> str: ...


M = TypeVar("M", bound=Member)


class Phase(enum.Enum):
    OPENING = "opening"  # subscribed, seq and epoch not read yet
    LIVE = "live"
    FILLING = "filling"  # a history read (or a resync) is outstanding


@dataclass(frozen=True, slots=True)
class Flush:
    room: str
    messages: bool


@dataclass(frozen=True, slots=True)
class Write(Generic[M]):
    room: str
    members: Collection[M]
    data: bytes
    marks: Marks
    # Members of these users get this instead (their own presence events left out; empty
    # data: nothing to write to them).
    variants: Mapping[str, tuple[bytes, Marks]] = field(default_factory=dict)

    @property
    def cursor(self) -> int:
        """The seq the room is at once all of `data` is out."""
        return self.marks[-1][1]

    def for_member(self, member: M) -> tuple[bytes, Marks]:
        """What `member` is written: `data`, or its user's variant."""
        if self.variants:
            variant = self.variants.get(member.user)
            if variant is not None:
                return variant
        return self.data, self.marks


@dataclass(frozen=True, slots=True)
class Fill:
    room: str
    after: int
    upto: int
    delay: float


@dataclass(frozen=True, slots=True)
class Resync:
    room: str
    delay: float


@dataclass(frozen=True, slots=True)
class Restart(Generic[M]):
    room: str
    members: Collection[M]
    seq: int
    epoch: str


@dataclass(frozen=True, slots=True)
class Delivered:
    room: str
    seq: int
    ts: int
    members: int


@dataclass(frozen=True, slots=True)
class Gap:
    room: str
    first: int
    last: int


Effect = Flush | Write[M] | Fill | Resync | Restart[M] | Delivered | Gap


def retry_delay(attempt: int) -> float:
    """Seconds before retry `attempt` (1, 2, …) of a failed read: doubling, capped."""
    return float(min(0.1 * 2 ** (attempt - 1), 4.0))


def _next_attempt(room: Room[M]) -> float | None:
    """Count a failed read of `room`: the delay before the next one, None after the last."""
    room.attempts += 1
    return retry_delay(room.attempts) if room.attempts < FILL_ATTEMPTS else None


@dataclass(eq=False, slots=True)
class Room(Generic[M]):
    """One room's delivery state on this worker."""

    name: str
    members: set[M] = field(default_factory=set)
    held: dict[M, list[bytes]] = field(default_factory=dict)  # replaying: its events wait here
    cursor: int = 0
    epoch: str = ""
    phase: Phase = Phase.OPENING
    backlog: list[Record] = field(default_factory=list)
    known: int = 0  # highest seq seen, also of records the full backlog turned away
    outgoing: list[bytes] = field(default_factory=list)
    outgoing_seqs: list[int] = field(default_factory=list)  # the seq after each outgoing frame
    outgoing_subjects: dict[int, str] = field(default_factory=dict)  # index of a presence event: its user
    fill_upto: int = 0
    attempts: int = 0  # failed reads of the outstanding fill or resync
    resync_due: bool = False  # pub/sub came back while filling: resync afterwards

    @property
    def messages_queued(self) -> bool:
        """The turn's queue holds messages (seqs up to the cursor), not only events."""
        return len(self.outgoing) > len(self.outgoing_subjects)


class Hub(Generic[M]):
    """The rooms of one worker; every method returns the effects to carry out, in order."""

    def __init__(self) -> None:
        self.rooms: dict[str, Room[M]] = {}

    # -- opening and closing ------------------------------------------------------------

    def open(self, name: str) -> Room[M]:
        """The room, created (OPENING: records wait in the backlog) if it is new."""
        room = self.rooms.get(name)
        if room is None:
            room = self.rooms[name] = Room(name)
        return room

    def opened(self, name: str, seq: int, epoch: str) -> list[Effect[M]]:
        """The room's seq and epoch as of after the subscription: go live."""
        room = self.rooms[name]
        room.cursor, room.epoch = seq, epoch
        effects: list[Effect[M]] = []
        self._go_live(room, effects)
        return effects

    def forget(self, name: str) -> None:
        self.rooms.pop(name, None)

    # -- members --------------------------------------------------------------------------

    def hold(self, name: str, member: M) -> list[Effect[M]]:
        """`member` joins (or rejoins) and is replayed to until `release`.

        Meanwhile its live messages are not queued for it: the replay reads them from
        history until it reaches the cursor, so a long replay holds no more than a page,
        and only events (presence) wait. Messages queued so far go to the other members
        first: they are up to the cursor, which the joiner's `joined` and replay cover.
        Events queued this turn stay queued, the joiner's share included: a storm of joins
        into one room is then one write per member per turn, not one per join.
        """
        room = self.rooms[name]
        effects: list[Effect[M]] = []
        if room.messages_queued:
            self._flush_into(room, effects)
        room.members.add(member)
        room.held.setdefault(member, [])
        return effects

    def release(self, name: str, member: M) -> list[Effect[M]]:
        """The replay reached the cursor: write the events held back, then deliver live.

        Messages queued this turn are up to the cursor, which the replay covered: they go
        to the others first. Events queued this turn stay queued, the member's share too.
        """
        room = self.rooms[name]
        effects: list[Effect[M]] = []
        if room.messages_queued:
            self._flush_into(room, effects)
        held = room.held.pop(member, None)
        if held:
            data = b"".join(held)
            effects.append(Write(name, (member,), data, ((len(data), room.cursor),)))
        return effects

    def drop(self, name: str, member: M) -> bool:
        """`member` leaves; False when it was no member."""
        room = self.rooms.get(name)
        if room is None or member not in room.members:
            return False
        room.members.discard(member)
        room.held.pop(member, None)
        return True

    def holding(self, name: str, member: M) -> bool:
        room = self.rooms.get(name)
        return room is not None and member in room.held

    # -- what arrives -----------------------------------------------------------------------

    def receive(self, name: str, payload: bytes) -> list[Effect[M]]:
        """A message on the room's channel: records in seq order, perhaps with holes."""
        room = self.rooms.get(name)
        effects: list[Effect[M]] = []
        if room is None:
            return effects
        records = decode_records(payload)
        if room.phase is Phase.LIVE:
            self._process(room, records, effects)
        else:
            self._keep(room, records)
        return effects

    def resubscribed(self, name: str) -> list[Effect[M]]:
        """Pub/sub came back: what was published meanwhile is in history only."""
        room = self.rooms.get(name)
        if room is None or room.phase is Phase.OPENING:
            return []  # the open reads the seq after subscribing anyway
        if room.phase is Phase.FILLING:
            room.resync_due = True
            return []
        room.phase = Phase.FILLING
        room.attempts = 0
        return [Resync(name, 0.0)]

    def resynced(self, name: str, seq: int, epoch: str) -> list[Effect[M]]:
        room = self._filling(name)
        effects: list[Effect[M]] = []
        if room is None:
            return effects
        room.attempts = 0
        if epoch != room.epoch:
            # History was lost (Redis restarted without persistence): members start over
            # in this epoch, from its first seq. What it holds already was acked to its
            # publishers, so skipping to `seq` would lose it silently.
            self._flush_into(room, effects)
            for member in list(room.held):  # their replays of the old epoch end here
                effects.extend(self.release(name, member))
            room.epoch, room.cursor = epoch, 0
            room.known = seq  # the backlog holds only records from after the resubscribe
            effects.append(Restart(name, tuple(room.members), seq, epoch))
            self._go_live(room, effects)
        else:
            room.known = max(room.known, seq)  # the backlog first; history for what it lacks
            self._go_live(room, effects)
        return effects

    def resync_failed(self, name: str) -> list[Effect[M]]:
        """Reading the room's seq failed: retry; after the last attempt, carry on live."""
        room = self._filling(name)
        effects: list[Effect[M]] = []
        if room is None:
            return effects
        if (delay := _next_attempt(room)) is not None:
            effects.append(Resync(name, delay))
        else:
            self._go_live(room, effects)  # a later seq jump still fills the hole
        return effects

    def filled(self, name: str, entries: list[tuple[int, bytes]]) -> list[Effect[M]]:
        """History's frames for the outstanding fill: deliver them, announce what is gone."""
        room = self._filling(name)
        effects: list[Effect[M]] = []
        if room is None:
            return effects
        room.attempts = 0
        for seq, frame in entries:
            if seq <= room.cursor or seq > room.fill_upto:
                continue
            if seq > room.cursor + 1:
                self._gap(room, seq - 1, effects)
            self._deliver(room, Record(seq, 0, frame), effects)
        if room.cursor < room.fill_upto:
            self._gap(room, room.fill_upto, effects)
        self._go_live(room, effects)
        return effects

    def fill_failed(self, name: str) -> list[Effect[M]]:
        """The history read failed: retry with backoff; a gap only after the last attempt."""
        room = self._filling(name)
        if room is None:
            return []
        if (delay := _next_attempt(room)) is not None:
            return [Fill(name, room.cursor, room.fill_upto, delay)]
        return self.filled(name, [])

    def _filling(self, name: str) -> Room[M] | None:
        """The room a fill or resync answers for; None when it was closed (and maybe
        reopened) meanwhile, so the answer is stale and changes nothing."""
        room = self.rooms.get(name)
        return room if room is not None and room.phase is Phase.FILLING else None

    # -- writing ---------------------------------------------------------------------------------

    def flush(self, name: str) -> Write[M] | None:
        """The frames queued this turn, as one write per member (not to those being replayed to).

        Presence events queued this turn go to every member but their subject's: members
        of a subject user get a variant without their own events. A storm of joins in one
        room therefore costs one write per member per turn, not one per join per member.
        Its `members` may be the room's own set: write it before changing membership.
        """
        room = self.rooms.get(name)
        if room is None or not room.outgoing:
            return None
        outgoing, seqs, subjects = room.outgoing, room.outgoing_seqs, room.outgoing_subjects
        data, marks = _frames(outgoing, seqs)
        variants = _without_own_events(data, marks, subjects)
        self._hold_events(room)
        outgoing.clear()
        seqs.clear()
        subjects.clear()
        return Write(name, self._live_members(room), data, marks, variants)

    # -- internals --------------------------------------------------------------------------------

    @staticmethod
    def _hold_events(room: Room[M]) -> None:
        """A member being replayed to gets its messages from history; the turn's events
        (but its own user's) wait for its release."""
        events = sorted(room.outgoing_subjects.items())
        for member, queue in room.held.items():
            queue.extend(room.outgoing[i] for i, user in events if user != member.user)

    @staticmethod
    def _live_members(room: Room[M]) -> Collection[M]:
        """The members to write the room's frames to now: not those being replayed to."""
        if not room.held:
            return room.members
        return [m for m in room.members if m not in room.held]

    def _flush_into(self, room: Room[M], effects: list[Effect[M]]) -> None:
        """Queue the turn's write among other effects: on a copy of the member set, which
        the caller changes (a joiner must not get frames from before its `joined`)."""
        write = self.flush(room.name)
        if write is not None:
            effects.append(replace(write, members=tuple(write.members)))

    def _keep(self, room: Room[M], records: list[Record]) -> None:
        """Records that cannot be delivered yet; past the bound only their seq is kept."""
        for record in records:
            room.known = max(room.known, record.seq)
            if len(room.backlog) < BACKLOG_MAX:
                room.backlog.append(record)

    def _process(self, room: Room[M], records: list[Record], effects: list[Effect[M]]) -> None:
        for index, record in enumerate(records):
            seq = record.seq
            room.known = max(room.known, seq)
            if seq == 0:
                self._event(room, record.frame, effects)
            elif seq == room.cursor + 1:
                self._deliver(room, record, effects)
            elif seq > room.cursor + 1:
                room.backlog[:0] = records[index:]
                self._start_fill(room, seq - 1, effects)
                return
            # else a seq already delivered (a fill overlapped pub/sub): drop it

    def _go_live(self, room: Room[M], effects: list[Effect[M]]) -> None:
        """Deliver the backlog; fill again if it left a hole or pub/sub came back meanwhile."""
        room.phase = Phase.LIVE
        while room.backlog and room.phase is Phase.LIVE:
            backlog, room.backlog = room.backlog, []
            self._process(room, backlog, effects)
        if room.phase is not Phase.LIVE:
            return
        if room.resync_due:
            room.resync_due = False
            room.phase = Phase.FILLING
            room.attempts = 0
            effects.append(Resync(room.name, 0.0))
        elif room.known > room.cursor:
            self._start_fill(room, room.known, effects)

    def _start_fill(self, room: Room[M], upto: int, effects: list[Effect[M]]) -> None:
        room.phase = Phase.FILLING
        room.fill_upto = upto
        room.attempts = 0
        effects.append(Fill(room.name, room.cursor, upto, 0.0))

    def _queue(self, room: Room[M], wire: bytes, effects: list[Effect[M]], *, event: bool = False) -> None:
        room.outgoing.append(wire)
        room.outgoing_seqs.append(room.cursor)
        if len(room.outgoing) == 1:
            effects.append(Flush(room.name, not event))
        elif not event and len(room.outgoing) - len(room.outgoing_subjects) == 1:
            effects.append(Flush(room.name, True))  # the first message after queued events

    def _deliver(self, room: Room[M], record: Record, effects: list[Effect[M]]) -> None:
        room.cursor = record.seq
        self._queue(room, wire_text(record.frame), effects)
        effects.append(Delivered(room.name, record.seq, record.ts, len(room.members)))

    def _gap(self, room: Room[M], last: int, effects: list[Effect[M]]) -> None:
        first = room.cursor + 1
        room.cursor = last
        self._queue(room, wire_text(encode("gap", room=room.name, **{"from": first, "to": last})), effects)
        effects.append(Gap(room.name, first, last))

    def _event(self, room: Room[M], frame: bytes, effects: list[Effect[M]]) -> None:
        """An unsequenced room event (presence): queued for every member but its subject."""
        room.outgoing_subjects[len(room.outgoing)] = orjson.loads(frame).get("user")
        self._queue(room, wire_text(frame), effects, event=True)


def _frames(outgoing: list[bytes], seqs: list[int]) -> tuple[bytes, Marks]:
    """Frames written as one, with the marks of where each ends and the seq it brings."""
    if len(outgoing) == 1:
        return outgoing[0], ((len(outgoing[0]), seqs[0]),)
    if not outgoing:
        return b"", ()
    return b"".join(outgoing), tuple(zip(accumulate(map(len, outgoing)), seqs, strict=True))


def _without_own_events(
    data: bytes, marks: Marks, subjects: Mapping[int, str]
) -> dict[str, tuple[bytes, Marks]]:
    """Per subject user of the write's events (by frame index), the write without them.

    Linear in the events: a storm's paced half-second may hold a hundred joins, each its
    own subject, and rebuilding the write frame by frame per subject was quadratic (16 % of
    a worker in a resume storm). A variant's one mark is its end: a checkpoint claims its
    frames once all of it left the buffer, coarser than per frame, never ahead.
    """
    mine: dict[str, list[int]] = {}
    for index, user in subjects.items():  # in frame order: events are queued in order
        mine.setdefault(user, []).append(index)
    view = memoryview(data)  # slices without copies: the join makes the one copy
    variants: dict[str, tuple[bytes, Marks]] = {}
    for user, indexes in mine.items():
        pieces, start = [], 0
        for index in indexes:
            pieces.append(view[start : marks[index - 1][0] if index else 0])
            start = marks[index][0]
        pieces.append(view[start:])
        kept = b"".join(pieces)
        last = len(marks) - 1
        for index in reversed(indexes):  # the last frame kept brings the variant's seq
            if index != last:
                break
            last -= 1
        variants[user] = (kept, ((len(kept), marks[last][1]),)) if kept else (b"", ())
    return variants
