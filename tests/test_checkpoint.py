"""What a session checkpoint may claim: only frames that left the user-space buffer."""

from __future__ import annotations

from rtc.routing.checkpoint import MARKS_MAX, Checkpoint


def write(cp: Checkpoint, room: str, seq: int, size: int, buffered: int) -> None:
    """One frame of `size` bytes, bringing `room` to `seq`, written."""
    cp.written += size
    cp.reached(room, ((size, seq),), buffered)


def test_a_drained_buffer_claims_the_last_write_one_checkpoint_later() -> None:
    cp = Checkpoint()
    cp.start("r", 0)
    write(cp, "r", 5, 100, buffered=0)
    assert cp.delivered["r"] == 5
    assert cp.changes(0) == {"r": 0}  # the join's value, then what left a round ago
    assert cp.changes(0) == {"r": 5}
    assert cp.changes(0) == {}


def test_a_busy_buffer_claims_up_to_the_last_frame_boundary_that_left_it() -> None:
    cp = Checkpoint()
    cp.start("r", 0)
    write(cp, "r", 1, 100, buffered=100)  # offset 100
    write(cp, "r", 2, 100, buffered=200)  # offset 200
    write(cp, "r", 3, 100, buffered=250)  # offset 300: 50 bytes left so far
    cp.settle(250)
    assert cp.delivered["r"] == 0
    cp.settle(150)  # 150 left: seq 1's frame, not yet seq 2's
    assert cp.delivered["r"] == 1
    cp.changes(99)  # 201 left: seq 2
    assert cp.changes(99) == {"r": 2}  # never empty, still checkpointed


def test_one_write_of_many_frames_counts_frame_by_frame() -> None:
    cp = Checkpoint()
    cp.start("r", 0)
    cp.written += 300
    cp.reached("r", ((100, 1), (200, 2), (300, 3)), buffered=300)
    cp.settle(150)  # 150 bytes left: the first frame
    assert cp.delivered["r"] == 1
    cp.settle(100)
    assert cp.delivered["r"] == 2


def test_an_orderly_close_claims_what_left_the_buffer() -> None:
    cp = Checkpoint()
    cp.start("r", 0)
    write(cp, "r", 7, 100, buffered=100)
    assert cp.changes(100, final=True) == {"r": 0}  # still buffered: the close may never flush it
    assert cp.changes(0, final=True) == {"r": 7}
    assert cp.changes(0, final=True) == {"r": 7}  # final repeats every room


def test_marks_are_bounded_and_lag_rather_than_lead() -> None:
    cp = Checkpoint()
    cp.start("r", 0)
    last = 3 * MARKS_MAX
    for seq in range(1, last + 1):
        write(cp, "r", seq, 10, buffered=10 * seq)  # nothing ever leaves
        assert len(cp._marks) <= MARKS_MAX
    for left in range(1, last + 1):  # now it drains, frame by frame
        cp.settle(10 * (last - left))
        assert cp.delivered["r"] <= left
    assert cp.delivered["r"] == last


def test_leaving_and_rejoining_forget_the_old_marks() -> None:
    cp = Checkpoint()
    cp.start("r", 0)
    write(cp, "r", 4, 100, buffered=100)
    write(cp, "s", 9, 100, buffered=200)  # a room not started: not claimed
    write(cp, "s", 10, 100, buffered=0)
    cp.forget("r")
    cp.settle(0)
    assert cp.delivered == {}
    cp.start("r", 2)
    write(cp, "r", 3, 10, buffered=10)
    cp.start("r", 1)  # rejoined before seq 3's frame left: its mark is dropped
    cp.settle(0)
    assert cp.delivered == {"r": 1}
    assert cp.changes(0) == {"r": 1}


def test_a_left_room_leaves_nothing_behind() -> None:
    """A long-lived socket joining and leaving 10,000 rooms keeps no state for any of them."""
    cp = Checkpoint()
    for n in range(10_000):
        room = f"room{n}"
        cp.start(room, n)
        write(cp, room, n + 1, 100, buffered=100)
        cp.changes(100)
        cp.forget(room)
    cp.settle(0)
    assert cp.delivered == {} and cp.changes(0) == {} and cp.changes(0, final=True) == {}
    assert not any(getattr(cp, slot) for slot in ("_marks", "_ripe", "_saved"))


def test_a_stored_join_is_not_claimed_again_but_what_follows_is() -> None:
    cp = Checkpoint()
    cp.start("r", 4)
    cp.stored("r", 4)  # the join wrote 4
    assert cp.changes(0) == {}
    write(cp, "r", 5, 100, buffered=0)
    cp.changes(0)
    assert cp.changes(0) == {"r": 5}


def test_a_checkpoint_written_while_the_join_was_stored_is_kept() -> None:
    cp = Checkpoint()
    cp.start("r", 4)
    write(cp, "r", 6, 100, buffered=0)
    assert cp.changes(0) == {"r": 4}  # a periodic checkpoint, while the join's write is out
    cp.stored("r", 4)
    assert cp.changes(0) == {"r": 6}
    cp.stored("r", 2)  # a stale answer changes nothing
    assert cp.changes(0) == {}
