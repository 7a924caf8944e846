"""When a room's presence events go out: at once after a quiet spell, else once a window.

Messages are written at the end of the loop turn they arrive in. Events alone (presence
`join` and `leave`) may wait: in a connect storm a room gets a join every few hundred
milliseconds, and writing each to every member made presence half of the storm's cost
(one socket write per event per member). Paced, a member of a busy room gets its events
in at most one write per window; the first event after a quiet window goes at once, and
a message takes the waiting events with it, in order.
"""

from __future__ import annotations

__all__ = ["EVENTS_WINDOW", "EventPacer"]

EVENTS_WINDOW = 0.5  # seconds: a busy room's events reach its members at most this late


class EventPacer:
    """Per room, when a queue holding only events may be written. Pure: times are given."""

    def __init__(self, window: float = EVENTS_WINDOW) -> None:
        self._window = window
        self._written: dict[str, float] = {}  # room -> when its frames last went out

    def due(self, room: str, now: float) -> float:
        """Now after a quiet window, else a window after the room's last write."""
        last = self._written.get(room)
        return now if last is None else max(now, last + self._window)

    def written(self, room: str, now: float) -> None:
        self._written[room] = now

    def forget(self, room: str) -> None:
        self._written.pop(room, None)
