"""What a session may claim was delivered: the one place that decides a checkpoint.

A frame written to a socket first sits in the transport's user-space buffer; only once
it left that buffer can the client have it (SPEC 4: the checkpoint never counts a frame
still in the buffer). Each connection counts the bytes it wrote; a write that brings a
room up to seq N leaves a mark `(bytes written so far, room, N)`. The bytes that left
the buffer are `written - buffered`, so every mark at or below that offset is delivered
as far as the server can know. A busy socket whose buffer never empties is therefore
still checkpointed, up to the last frame boundary that left it.

Marks are kept per frame, at most `MARKS_MAX` per connection: past that every other one
is dropped, so a socket that does not drain for long is checkpointed more coarsely (it
lags behind, never ahead).

A periodic checkpoint claims what had left the buffer one checkpoint earlier: bytes that
just left it may still sit in the kernel's buffers, and a worker that is killed with
unread input resets the connection and loses them. A resume may repeat up to a second of
messages, never skip them.
"""

from __future__ import annotations

from collections import deque
from itertools import islice

__all__ = ["MARKS_MAX", "Checkpoint", "Marks"]

MARKS_MAX = 512
Marks = tuple[tuple[int, int], ...]  # per frame of a write: (where it ends in it, seq once out)


class Checkpoint:
    """One connection's delivered seq per room, and what the session store has of it."""

    __slots__ = ("_marks", "_ripe", "_saved", "delivered", "written")

    def __init__(self) -> None:
        self.written = 0  # bytes handed to the transport, ever
        self.delivered: dict[str, int] = {}  # room -> last seq that left the buffer
        self._marks: deque[tuple[int, str, int]] = deque()
        self._ripe: dict[str, int] = {}  # `delivered` as of the previous checkpoint
        self._saved: dict[str, int] = {}

    def start(self, room: str, seq: int) -> None:
        """The room was joined (or rejoined) with `seq` as its starting checkpoint."""
        self._forget_marks(room)
        self.delivered[room] = self._ripe[room] = seq
        self._saved.pop(room, None)

    def stored(self, room: str, seq: int) -> None:
        """The session store holds `seq` for `room` (a join wrote it): no checkpoint need
        write it again. One written meanwhile knows better, and is kept."""
        if room in self.delivered:
            self._saved.setdefault(room, seq)

    def forget(self, room: str) -> None:
        self._forget_marks(room)
        self.delivered.pop(room, None)
        self._ripe.pop(room, None)
        self._saved.pop(room, None)

    def reached(self, room: str, marks: Marks, buffered: int) -> None:
        """A write just made (its frames end at `marks`, relative to its start) for `room`;
        `buffered` bytes of everything written still wait in the transport's buffer."""
        if buffered == 0:  # the common case: it all left at once
            self.settle(0)
            if room in self.delivered:
                self.delivered[room] = marks[-1][1]
            return
        self.settle(buffered)
        start = self.written - marks[-1][0]
        for end, seq in marks:
            if len(self._marks) >= MARKS_MAX:  # keep every other one: coarser, never ahead
                self._marks = deque(islice(self._marks, 1, None, 2))
            self._marks.append((start + end, room, seq))

    def settle(self, buffered: int) -> None:
        """Count every mark whose bytes left the buffer (`buffered` bytes still wait)."""
        sent = self.written - buffered
        marks = self._marks
        while marks and marks[0][0] <= sent:
            _, room, seq = marks.popleft()
            if room in self.delivered:
                self.delivered[room] = seq

    def changes(self, buffered: int, *, final: bool = False) -> dict[str, int]:
        """Rooms whose claimable seq the session store does not have yet (all if `final`).

        A periodic call claims `delivered` as of the previous call (see the module
        docstring); `final` is for an orderly close: what left the buffer by now counts
        (the rest may never leave it, if the close cannot be flushed in time).
        """
        self.settle(buffered)
        if final:
            claim = self.delivered
        else:
            claim, self._ripe = self._ripe, dict(self.delivered)
        changed = {
            room: seq
            for room, seq in claim.items()
            if room in self.delivered and (final or self._saved.get(room) != seq)
        }
        self._saved.update(changed)
        return changed

    def _forget_marks(self, room: str) -> None:
        if any(mark[1] == room for mark in self._marks):
            self._marks = deque(mark for mark in self._marks if mark[1] != room)
