"""The hub, fed values: records in, effects out. No loop, no Redis, no sleeps.

Unit tests walk every transition; the property tests feed hypothesis-made schedules of
records (in order, duplicated, jumping ahead, going back), resubscribes, joins, and
history reads that fail transiently, and check what every member saw.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from rtc.protocol import encode
from rtc.routing import hub as h
from rtc.routing.records import RecordError

ROOM = "r"


@dataclass(frozen=True)
class User:
    user: str


def frame(seq: int) -> bytes:
    return b'{"type":"message","room":"r","seq":%d}' % seq


def payload(*seqs: int, ts: int = 0) -> bytes:
    return b"\n".join(b"%d %d %s" % (seq, ts, frame(seq)) for seq in seqs)


def presence(user: str, event: str = "join") -> bytes:
    return b"0 0 " + encode("presence", room=ROOM, user=user, event=event)


def frames_of(data: bytes) -> list[dict[str, object]]:
    """Undo `wire_text`: the JSON frames in a write."""
    out = []
    while data:
        assert data[0] == 0x81
        size, start = data[1], 2
        if size == 126:
            size, start = int.from_bytes(data[2:4], "big"), 4
        out.append(orjson.loads(data[start : start + size]))
        data = data[start + size :]
    return out


def live_hub(cursor: int = 0, epoch: str = "e1") -> h.Hub[User]:
    hub: h.Hub[User] = h.Hub()
    hub.open(ROOM)
    assert hub.opened(ROOM, cursor, epoch) == []
    return hub


def kinds(effects: list[h.Effect[User]]) -> list[str]:
    return [type(e).__name__ for e in effects]


def writes(
    hub: h.Hub[User], effects: list[h.Effect[User]], *, flush: bool = True
) -> dict[User, list[dict[str, object]]]:
    """What each member got from `effects`; `Flush` is acted on only when `flush`
    (else the caller flushes at the end of its loop turn)."""
    got: dict[User, list[dict[str, object]]] = {}
    for effect in effects:
        write = hub.flush(effect.room) if isinstance(effect, h.Flush) and flush else effect
        if isinstance(write, h.Write):
            for member in write.members:
                data, _marks = write.for_member(member)
                if data:
                    got.setdefault(member, []).extend(frames_of(data))
    return got


# -- opening ---------------------------------------------------------------------------------


def test_records_wait_while_opening_and_older_ones_are_dropped() -> None:
    hub: h.Hub[User] = h.Hub()
    room = hub.open(ROOM)
    assert hub.open(ROOM) is room
    alice = User("alice")
    hub.hold(ROOM, alice)
    assert hub.receive(ROOM, payload(4, 5, 6)) == []
    assert hub.resubscribed(ROOM) == []  # the open reads the seq after subscribing anyway
    effects = hub.opened(ROOM, 4, "e1")
    assert kinds(effects) == ["Flush", "Delivered", "Delivered"]
    assert room.cursor == 6 and room.phase is h.Phase.LIVE
    hub.release(ROOM, alice)
    assert [f["seq"] for f in writes(hub, effects).get(alice, [])] == []  # held: came on release


def test_a_jump_while_opening_fills_once_live() -> None:
    hub: h.Hub[User] = h.Hub()
    hub.open(ROOM)
    hub.receive(ROOM, payload(9))
    effects = hub.opened(ROOM, 5, "e1")
    assert effects == [h.Fill(ROOM, 5, 8, 0.0)]
    assert hub.rooms[ROOM].phase is h.Phase.FILLING


def test_unknown_rooms_are_ignored() -> None:
    hub: h.Hub[User] = h.Hub()
    assert hub.receive("nope", payload(1)) == []
    assert hub.resubscribed("nope") == []
    assert hub.resynced("nope", 1, "e") == []
    assert hub.resync_failed("nope") == []
    assert hub.filled("nope", []) == []
    assert hub.fill_failed("nope") == []
    assert hub.flush("nope") is None
    assert not hub.drop("nope", User("a"))
    assert not hub.holding("nope", User("a"))
    hub.forget("nope")


# -- live delivery ---------------------------------------------------------------------------------


def test_in_order_records_are_written_once_per_turn() -> None:
    hub = live_hub()
    alice, bob = User("alice"), User("bob")
    hub.hold(ROOM, alice)
    hub.release(ROOM, alice)
    hub.hold(ROOM, bob)
    hub.release(ROOM, bob)
    effects = hub.receive(ROOM, payload(1, 2, ts=7)) + hub.receive(ROOM, payload(3))
    assert kinds(effects) == ["Flush", "Delivered", "Delivered", "Delivered"]
    assert effects[1] == h.Delivered(ROOM, 1, 7, 2)
    write = hub.flush(ROOM)
    assert write is not None and set(write.members) == {alice, bob} and write.cursor == 3
    assert [f["seq"] for f in frames_of(write.data)] == [1, 2, 3]
    ends = [end for end, _ in write.marks]
    assert [seq for _, seq in write.marks] == [1, 2, 3] and ends[-1] == len(write.data)
    assert [frames_of(write.data[:end])[-1]["seq"] for end in ends] == [1, 2, 3]  # frame boundaries
    assert hub.flush(ROOM) is None


def test_duplicates_are_dropped() -> None:
    hub = live_hub(cursor=3)
    assert hub.receive(ROOM, payload(2, 3)) == []
    assert kinds(hub.receive(ROOM, payload(3, 4))) == ["Flush", "Delivered"]


def test_a_jump_fills_and_holds_what_follows() -> None:
    hub = live_hub(cursor=1)
    alice = User("alice")
    hub.hold(ROOM, alice)
    hub.release(ROOM, alice)
    effects = hub.receive(ROOM, payload(2, 5, 6))
    assert effects[-1] == h.Fill(ROOM, 2, 4, 0.0)
    assert hub.receive(ROOM, payload(7)) == []  # waits behind the fill
    effects += hub.filled(ROOM, [(3, frame(3)), (4, frame(4))])
    got = writes(hub, effects)
    assert [f["seq"] for f in got[alice]] == [2, 3, 4, 5, 6, 7]
    assert hub.rooms[ROOM].phase is h.Phase.LIVE


def test_history_that_lost_seqs_announces_exactly_those() -> None:
    hub = live_hub(cursor=0)
    alice = User("alice")
    hub.hold(ROOM, alice)
    hub.release(ROOM, alice)
    effects = hub.receive(ROOM, payload(9))
    effects += hub.filled(ROOM, [(4, frame(4)), (5, frame(5)), (7, frame(7)), (99, frame(99))])
    gaps = [e for e in effects if isinstance(e, h.Gap)]
    assert gaps == [h.Gap(ROOM, 1, 3), h.Gap(ROOM, 6, 6), h.Gap(ROOM, 8, 8)]
    got = [(f["type"], f.get("seq"), f.get("from"), f.get("to")) for f in writes(hub, effects)[alice]]
    assert got == [
        ("gap", None, 1, 3),
        ("message", 4, None, None),
        ("message", 5, None, None),
        ("gap", None, 6, 6),
        ("message", 7, None, None),
        ("gap", None, 8, 8),
        ("message", 9, None, None),
    ]


def test_a_failed_history_read_is_retried_before_any_gap() -> None:
    hub = live_hub(cursor=0)
    hub.receive(ROOM, payload(3))
    delays = []
    for _ in range(h.FILL_ATTEMPTS - 1):
        (retry,) = hub.fill_failed(ROOM)
        assert isinstance(retry, h.Fill) and (retry.after, retry.upto) == (0, 2)
        delays.append(retry.delay)
    assert delays == sorted(delays) and delays[0] > 0 and delays[-1] <= 4.0
    effects = hub.filled(ROOM, [(1, frame(1)), (2, frame(2))])
    assert not [e for e in effects if isinstance(e, h.Gap)]
    assert hub.rooms[ROOM].cursor == 3


def test_history_unreadable_for_every_attempt_is_announced() -> None:
    hub = live_hub(cursor=0)
    hub.receive(ROOM, payload(3))
    for _ in range(h.FILL_ATTEMPTS - 1):
        hub.fill_failed(ROOM)
    effects = hub.fill_failed(ROOM)
    assert h.Gap(ROOM, 1, 2) in effects and hub.rooms[ROOM].cursor == 3


def test_late_outcomes_of_a_fill_are_ignored() -> None:
    hub = live_hub(cursor=2)
    assert hub.filled(ROOM, [(3, frame(3))]) == []
    assert hub.fill_failed(ROOM) == []
    assert hub.resynced(ROOM, 5, "e1") == []
    assert hub.resync_failed(ROOM) == []
    assert hub.rooms[ROOM].cursor == 2


def test_a_full_backlog_keeps_only_the_highest_seq_and_fills_the_rest() -> None:
    hub = live_hub(cursor=0)
    hub.receive(ROOM, payload(2))  # fill (0, 1] outstanding
    hub.receive(ROOM, payload(*range(3, h.BACKLOG_MAX + 10)))
    room = hub.rooms[ROOM]
    assert len(room.backlog) == h.BACKLOG_MAX and room.known == h.BACKLOG_MAX + 9
    effects = hub.filled(ROOM, [(1, frame(1))])
    assert effects[-1] == h.Fill(ROOM, h.BACKLOG_MAX + 1, h.BACKLOG_MAX + 9, 0.0)


def test_a_foreign_payload_is_an_error() -> None:
    hub = live_hub()
    try:
        hub.receive(ROOM, b"hello")
    except RecordError:
        return
    raise AssertionError("accepted a payload that is no record")


# -- presence events ---------------------------------------------------------------------------------


def test_presence_goes_to_everyone_but_its_subject_after_queued_frames() -> None:
    hub = live_hub()
    alice, bob, carol = User("alice"), User("bob"), User("carol")
    for member in (alice, bob):
        hub.hold(ROOM, member)
        hub.release(ROOM, member)
    hub.hold(ROOM, carol)  # replaying: the message comes from history, the event on release
    effects = hub.receive(ROOM, payload(1) + b"\n" + presence("alice"))
    got = writes(hub, effects)
    assert [f["type"] for f in got[alice]] == ["message"]
    assert [f["type"] for f in got[bob]] == ["message", "presence"]
    assert carol not in got
    (release,) = hub.release(ROOM, carol)
    assert isinstance(release, h.Write) and release.members == (carol,)
    assert [f["type"] for f in frames_of(release.data)] == ["presence"]
    assert release.marks == ((len(release.data), 1),)  # carol is at the cursor once it is out


def test_presence_of_a_held_member_is_not_sent_to_it() -> None:
    hub = live_hub()
    alice = User("alice")
    hub.hold(ROOM, alice)
    assert writes(hub, hub.receive(ROOM, presence("alice"))) == {}
    assert hub.release(ROOM, alice) == []


def test_a_storm_of_joins_is_one_write_per_member_without_their_own_events() -> None:
    """Presence events of one turn are written together: one write per member, each
    without the events whose subject is that member's user."""
    hub = live_hub()
    users = [User(f"u{i}") for i in range(5)]
    for member in users:
        hub.hold(ROOM, member)
        hub.release(ROOM, member)
    effects: list[h.Effect[User]] = []
    for member in users:
        effects += hub.receive(ROOM, presence(member.user))
    assert kinds(effects) == ["Flush"]  # nothing written per event
    write = hub.flush(ROOM)
    assert write is not None and set(write.members) == set(users)
    for member in users:
        data, marks = write.for_member(member)
        assert [f["user"] for f in frames_of(data)] == [u.user for u in users if u != member]
        assert marks == ((len(data), write.cursor),)  # claimed once all of it is out


def test_a_users_variant_leaves_out_each_of_its_events_and_ends_at_the_last_frame_kept() -> None:
    hub = live_hub()
    alice, bob = User("alice"), User("bob")
    for member in (alice, bob):
        hub.hold(ROOM, member)
        hub.release(ROOM, member)
    hub.receive(ROOM, presence("alice"))
    hub.receive(ROOM, payload(1))
    hub.receive(ROOM, presence("bob"))
    hub.receive(ROOM, payload(2))
    hub.receive(ROOM, presence("alice"))
    write = hub.flush(ROOM)
    assert write is not None
    data, marks = write.for_member(alice)
    assert [(f["type"], f.get("user")) for f in frames_of(data)] == [
        ("message", None),
        ("presence", "bob"),
        ("message", None),
    ]
    assert marks == ((len(data), 2),)
    data, marks = write.for_member(bob)
    assert [f["type"] for f in frames_of(data)] == ["presence", "message", "message", "presence"]
    assert marks == ((len(data), 2),)


def test_joins_between_events_write_nothing_until_the_turns_flush() -> None:
    """A connect storm: each join's hold and release would flush the room's queued events
    to every member, one write per join per member. Events stay queued instead; the
    turn's flush writes each member (the joiners too) once, without its own events."""
    hub = live_hub()
    users = [User(f"u{i}") for i in range(5)]
    effects: list[h.Effect[User]] = []
    for member in users:
        effects += hub.hold(ROOM, member) + hub.release(ROOM, member)
        effects += hub.receive(ROOM, presence(member.user))
    assert kinds(effects) == ["Flush"]
    write = hub.flush(ROOM)
    assert write is not None and set(write.members) == set(users)
    for member in users:
        data, _marks = write.for_member(member)
        assert [f["user"] for f in frames_of(data)] == [u.user for u in users if u != member]


def test_a_joiner_replayed_to_gets_the_turns_events_once_on_release() -> None:
    hub = live_hub()
    alice, bob = User("alice"), User("bob")
    hub.hold(ROOM, alice)
    hub.release(ROOM, alice)
    queued = hub.receive(ROOM, presence("carol"))
    assert hub.hold(ROOM, bob) == []  # only an event queued: nothing to flush yet
    turn = writes(hub, queued)
    assert [f["user"] for f in turn[alice]] == ["carol"] and bob not in turn
    (release,) = hub.release(ROOM, bob)  # the event waited for bob's replay to end
    assert isinstance(release, h.Write) and [f["user"] for f in frames_of(release.data)] == ["carol"]
    assert hub.flush(ROOM) is None


def test_a_flush_says_whether_messages_wait_and_the_first_message_after_events_asks_again() -> None:
    """Events alone may be paced by the caller; a message may not wait behind them."""
    hub = live_hub()
    alice = User("alice")
    hub.hold(ROOM, alice)
    hub.release(ROOM, alice)
    assert hub.receive(ROOM, presence("bob")) == [h.Flush(ROOM, messages=False)]
    assert hub.receive(ROOM, presence("carol")) == []
    effects = hub.receive(ROOM, payload(1))
    assert [e for e in effects if isinstance(e, h.Flush)] == [h.Flush(ROOM, messages=True)]
    assert [e for e in hub.receive(ROOM, payload(2)) if isinstance(e, h.Flush)] == []
    write = hub.flush(ROOM)
    assert write is not None
    assert [f.get("user", f.get("seq")) for f in frames_of(write.data)] == ["bob", "carol", 1, 2]


# -- members ---------------------------------------------------------------------------------


def test_a_joiner_gets_nothing_up_to_its_cursor_and_everything_after() -> None:
    hub = live_hub()
    alice, bob = User("alice"), User("bob")
    hub.hold(ROOM, alice)
    hub.release(ROOM, alice)
    queued = hub.receive(ROOM, payload(1))
    effects = hub.hold(ROOM, bob)  # frames queued so far are before bob's `joined`
    assert hub.holding(ROOM, bob) and hub.rooms[ROOM].cursor == 1
    assert [set(w.members) for w in effects if isinstance(w, h.Write)] == [{alice}]
    later = hub.receive(ROOM, payload(2))
    got = writes(hub, queued + effects + later, flush=False)  # the turn's flush is below
    assert [f["seq"] for f in got[alice]] == [1] and bob not in got
    turn = hub.flush(ROOM)
    assert turn is not None and set(turn.members) == {alice}
    hub.receive(ROOM, payload(3))
    # bob's replay read 2 and 3 from history: release writes nothing of them to bob
    (turn_write,) = hub.release(ROOM, bob)
    assert isinstance(turn_write, h.Write) and set(turn_write.members) == {alice}
    assert [f["seq"] for f in frames_of(turn_write.data)] == [3]
    assert not hub.holding(ROOM, bob)
    after = writes(hub, hub.receive(ROOM, payload(4)))
    assert [f["seq"] for f in after[bob]] == [4] and [f["seq"] for f in after[alice]] == [4]
    assert hub.drop(ROOM, bob) and not hub.drop(ROOM, bob)


def test_a_member_being_replayed_to_queues_no_messages() -> None:
    """However long a replay takes, the hub keeps nothing for its member but events."""
    hub = live_hub()
    alice = User("alice")
    hub.hold(ROOM, alice)
    for seq in range(1, 1001):
        writes(hub, hub.receive(ROOM, payload(seq)))
    assert hub.rooms[ROOM].held[alice] == [] and hub.rooms[ROOM].cursor == 1000


def test_a_member_dropped_while_held_leaves_no_queue() -> None:
    hub = live_hub()
    alice = User("alice")
    hub.hold(ROOM, alice)
    hub.drop(ROOM, alice)
    hub.receive(ROOM, payload(1))
    assert not hub.holding(ROOM, alice) and hub.release(ROOM, alice)[0].members == ()


# -- resubscribe and resync ---------------------------------------------------------------------------


def test_resubscribe_reads_the_seq_and_fills_what_was_missed() -> None:
    hub = live_hub(cursor=3)
    assert hub.resubscribed(ROOM) == [h.Resync(ROOM, 0.0)]
    assert hub.resynced(ROOM, 5, "e1") == [h.Fill(ROOM, 3, 5, 0.0)]


def test_resubscribe_during_a_resync_reads_the_seq_again() -> None:
    hub = live_hub(cursor=3)
    hub.resubscribed(ROOM)
    assert hub.resubscribed(ROOM) == []  # one read at a time, but it may predate this one
    assert hub.resynced(ROOM, 3, "e1") == [h.Resync(ROOM, 0.0)]
    assert hub.resynced(ROOM, 4, "e1") == [h.Fill(ROOM, 3, 4, 0.0)]


def test_resubscribe_with_nothing_missed_goes_live() -> None:
    hub = live_hub(cursor=3)
    hub.resubscribed(ROOM)
    hub.receive(ROOM, payload(4))
    assert kinds(hub.resynced(ROOM, 4, "e1")) == ["Flush", "Delivered"]
    assert hub.rooms[ROOM].phase is h.Phase.LIVE


def test_resubscribe_during_a_fill_resyncs_after_it() -> None:
    hub = live_hub(cursor=0)
    hub.receive(ROOM, payload(2))
    hub.resubscribed(ROOM)
    effects = hub.filled(ROOM, [(1, frame(1))])
    assert effects[-1] == h.Resync(ROOM, 0.0)


def test_a_new_epoch_restarts_every_member_from_its_first_seq() -> None:
    """Redis lost the room: what the new epoch holds (acked to its publishers) is delivered."""
    hub = live_hub(cursor=8)
    alice = User("alice")
    hub.hold(ROOM, alice)
    hub.release(ROOM, alice)
    hub.receive(ROOM, payload(9))
    hub.resubscribed(ROOM)
    hub.receive(ROOM, payload(3))  # arrived after the resubscribe: the new epoch's
    effects = hub.resynced(ROOM, 2, "e2")
    assert kinds(effects) == ["Write", "Restart", "Fill"]
    assert effects[1] == h.Restart(ROOM, (alice,), 2, "e2")
    assert effects[2] == h.Fill(ROOM, 0, 2, 0.0)
    assert hub.rooms[ROOM].epoch == "e2"
    written = writes(hub, hub.filled(ROOM, [(1, frame(1)), (2, frame(2))]))
    assert [f["seq"] for f in written[alice]] == [1, 2, 3]
    assert kinds(hub.receive(ROOM, payload(4))) == ["Flush", "Delivered"]


def test_a_new_epoch_releases_a_member_whose_replay_it_ended() -> None:
    """A member held for a replay of the old epoch is released by the restart: its replay
    stops there, and the new epoch's messages from seq 1 reach it like every member."""
    hub = live_hub(cursor=8)
    bob = User("bob")
    hub.hold(ROOM, bob)
    hub.resubscribed(ROOM)
    effects = hub.resynced(ROOM, 2, "e2")
    assert h.Restart(ROOM, (bob,), 2, "e2") in effects
    assert not hub.holding(ROOM, bob)
    written = writes(hub, hub.filled(ROOM, [(1, frame(1)), (2, frame(2))]))
    assert [f["seq"] for f in written[bob]] == [1, 2]


def test_a_new_epoch_with_nothing_in_it_goes_live() -> None:
    hub = live_hub(cursor=8)
    hub.resubscribed(ROOM)
    assert kinds(hub.resynced(ROOM, 0, "e2")) == ["Restart"]
    assert hub.rooms[ROOM].phase is h.Phase.LIVE
    assert kinds(hub.receive(ROOM, payload(1))) == ["Flush", "Delivered"]


def test_a_failed_resync_is_retried_then_gives_up_live() -> None:
    hub = live_hub(cursor=1)
    hub.resubscribed(ROOM)
    for attempt in range(1, h.FILL_ATTEMPTS):
        assert hub.resync_failed(ROOM) == [h.Resync(ROOM, h.retry_delay(attempt))]
    assert hub.resync_failed(ROOM) == []
    assert hub.rooms[ROOM].phase is h.Phase.LIVE


def test_forget_drops_the_room() -> None:
    hub = live_hub()
    hub.forget(ROOM)
    assert ROOM not in hub.rooms


# -- properties ---------------------------------------------------------------------------------------


@dataclass
class Model:
    """A room's history as Redis holds it, and a hub fed from it under a schedule."""

    last: int
    trimmed: int  # history no longer holds seqs <= trimmed
    hub: h.Hub[User] = field(default_factory=h.Hub)
    got: dict[User, list[dict[str, object]]] = field(default_factory=dict)
    starts: dict[User, int] = field(default_factory=dict)
    pending: list[h.Fill | h.Resync] = field(default_factory=list)

    def apply(self, effects: list[h.Effect[User]]) -> None:
        for member, frames in writes(self.hub, effects, flush=False).items():
            self.got.setdefault(member, []).extend(frames)
        self.pending += [e for e in effects if isinstance(e, h.Fill | h.Resync)]
        assert not [e for e in effects if isinstance(e, h.Restart)]  # one epoch here

    def history(self, after: int, upto: int) -> list[tuple[int, bytes]]:
        return [(s, frame(s)) for s in range(max(after, self.trimmed) + 1, min(upto, self.last) + 1)]

    def complete(self, fail: bool) -> None:
        effect = self.pending.pop(0)
        if isinstance(effect, h.Fill):
            if fail:
                self.apply(self.hub.fill_failed(ROOM))
            else:
                self.apply(self.hub.filled(ROOM, self.history(effect.after, effect.upto)))
        elif fail:
            self.apply(self.hub.resync_failed(ROOM))
        else:
            self.apply(self.hub.resynced(ROOM, self.last, "e1"))

    def feed(self, seqs: list[int]) -> None:
        """One pub/sub message: these records, or a presence event when there are none."""
        self.apply(self.hub.receive(ROOM, payload(*seqs) if seqs else presence("z")))

    def turn(self) -> None:
        """The end of a loop turn: what the rooms queued is written."""
        write = self.hub.flush(ROOM)
        if write is not None:
            self.apply([write])

    def join(self, name: str) -> None:
        member = User(name)
        self.apply(self.hub.hold(ROOM, member))
        self.starts.setdefault(member, self.hub.rooms[ROOM].cursor)
        self.apply(self.hub.release(ROOM, member))


steps = st.lists(
    st.one_of(
        st.tuples(st.just("records"), st.lists(st.integers(0, 40), min_size=1, max_size=6)),
        st.tuples(st.just("complete"), st.booleans()),
        st.tuples(st.just("resubscribed"), st.none()),
        st.tuples(st.just("join"), st.sampled_from(["a", "b", "c"])),
        st.tuples(st.just("turn"), st.none()),
    ),
    max_size=40,
)


@settings(max_examples=100, deadline=None)
@given(last=st.integers(0, 40), trimmed=st.integers(0, 40), opened=st.integers(0, 40), schedule=steps)
def test_any_schedule_delivers_each_seq_once_in_order_and_gaps_only_what_history_lost(
    last: int, trimmed: int, opened: int, schedule: list[tuple[str, object]]
) -> None:
    opened, trimmed = min(opened, last), min(trimmed, last)
    model = Model(last, trimmed)
    model.hub.open(ROOM)
    for kind, arg in schedule[:5]:  # records may arrive before the room's seq is read
        if kind == "records":
            model.feed([s for s in arg if 0 < s <= last])  # type: ignore[union-attr]
    model.apply(model.hub.opened(ROOM, opened, "e1"))
    model.join("a")
    failures = 0
    for kind, arg in schedule:
        if kind == "records":
            model.feed([s for s in arg if 0 < s <= last])  # type: ignore[union-attr]
        elif kind == "complete" and model.pending:
            failures += bool(arg)
            model.complete(fail=bool(arg) and failures < h.FILL_ATTEMPTS - 1)
        elif kind == "resubscribed":
            model.apply(model.hub.resubscribed(ROOM))
        elif kind == "join":
            model.join(str(arg))
        elif kind == "turn":
            model.turn()
    model.turn()
    while model.pending:  # Redis answers from here on
        model.complete(fail=False)
    model.apply(model.hub.resubscribed(ROOM))  # pub/sub came back: anything missed is read
    while model.pending:
        model.complete(fail=False)
    model.turn()
    assert model.hub.rooms[ROOM].cursor == last

    for member, frames in model.got.items():
        covered: list[int] = []
        for f in frames:
            if f["type"] == "message":
                covered.append(int(f["seq"]))  # type: ignore[call-overload]
            elif f["type"] == "gap":
                first, to = int(f["from"]), int(f["to"])  # type: ignore[call-overload]
                assert to <= trimmed, f"gap {first}..{to} but history holds seqs above {trimmed}"
                covered += range(first, to + 1)
        start = model.starts[member]
        assert covered == list(range(start + 1, last + 1)), (member, covered)
