"""Membership of rooms per (room, worker slot) in Redis, and the presence events it causes."""

from __future__ import annotations

import asyncio
import logging
import math

from rtc import metrics
from rtc.broker.base import Membership
from rtc.log import describe
from rtc.protocol import encode, presence_halves
from rtc.routing.tasks import Tasks

__all__ = ["MEMBERSHIP_TTL", "PRESENCE_LEAVE_DELAY", "Presence"]

log = logging.getLogger("rtc.presence")

PRESENCE_LEAVE_DELAY = 5.0  # SPEC: a leave is announced 5 s after the last connection left
MEMBERSHIP_TTL = 15  # a slot's membership keys expire this long after its last refresh
_SWEEP_LAG = 0.05  # the leave's due time is Redis's clock: sweep a little after it
# Leaves due in one slice of this length share one sweep of their room, at its end: after
# a mass disconnect, one sweep per room and slice instead of one per user (thousands at
# once, in the middle of the reconnect storm). A leave is announced up to a slice later.
SWEEP_SLICE = 0.25


class Presence:
    """Counts this slot's connections per room and user; announces joins and leaves.

    A leave is pending in Redis from the moment a user's last connection on this slot
    left, due `PRESENCE_LEAVE_DELAY` later. This worker sweeps the room when it is due
    (at the end of its `SWEEP_SLICE`, with the other leaves of the room due in it);
    every worker also sweeps the rooms it has members in at each membership refresh, which
    announces the pending leaves of workers that stopped meanwhile and the users of
    workers that died (their membership expired). So every `join` gets its `leave`.

    It keeps its own count of what it told Redis, so that a refresh can put back what a
    Redis restart without persistence lost (else `members` would miss those users until
    they joined again).
    """

    def __init__(
        self, membership: Membership, tasks: Tasks, slot: str, presence_max: int, worker: str
    ) -> None:
        self._membership = membership
        self._tasks = tasks
        self._slot = slot
        self._max = presence_max
        self._joins = metrics.BatchedCounter(metrics.JOINS.labels(worker))
        self._sweeps: dict[tuple[str, float], asyncio.TimerHandle] = {}  # (room, when) -> its timer
        self._counts: dict[str, dict[str, int]] = {}  # room -> user -> this slot's connections

    async def join(self, room: str, user: str) -> None:
        """A connection of `user` joined: count it; `join` if the user is new in the room."""
        self._joins.inc()
        users = self._counts.setdefault(room, {})
        users[user] = users.get(user, 0) + 1
        frame = encode("presence", room=room, user=user, event="join")
        await self._membership.join(room, self._slot, user, frame, self._max, MEMBERSHIP_TTL)

    async def leave(self, room: str, user: str) -> None:
        """A connection of `user` left; when it was the slot's last, its leave is pending."""
        users = self._counts.get(room, {})
        if users.get(user, 0) > 1:
            users[user] -= 1
        else:
            users.pop(user, None)
            if not users:
                self._counts.pop(room, None)
        try:
            if await self._membership.leave(
                room, self._slot, user, int(PRESENCE_LEAVE_DELAY * 1000), MEMBERSHIP_TTL
            ):
                self._sweep_later(room)
        except Exception as exc:
            log.warning("membership update for %s failed: %s", room, describe(exc))

    async def members(self, room: str, limit: int) -> tuple[int, list[str]]:
        return await self._membership.members(room, limit)

    async def refresh(self, rooms: list[str]) -> None:
        """Keep this slot's membership alive (put back if Redis lost it); announce due leaves."""
        counts = {room: self._counts.get(room, {}) for room in rooms}
        restated = await self._membership.refresh_members(self._slot, counts, MEMBERSHIP_TTL)
        if restated:
            log.warning("Redis had lost %d of this worker's room members: put back", restated)
        await asyncio.gather(*(self._sweep(room) for room in rooms))

    def _sweep_later(self, room: str) -> None:
        """Sweep `room` once a leave pending now is due: at the end of the slice it falls in."""
        loop = asyncio.get_running_loop()
        when = math.ceil((loop.time() + PRESENCE_LEAVE_DELAY + _SWEEP_LAG) / SWEEP_SLICE) * SWEEP_SLICE
        if (room, when) not in self._sweeps:
            self._sweeps[room, when] = loop.call_at(when, self._due, room, when)

    def _due(self, room: str, when: float) -> None:
        del self._sweeps[room, when]
        self._tasks.spawn(self._sweep(room))

    async def _sweep(self, room: str) -> None:
        try:
            await self._membership.sweep(room, presence_halves(room, "leave"), self._max)
        except Exception as exc:
            log.warning("presence sweep of %s failed: %s", room, exc)

    def close(self) -> None:
        """Pending leaves stay in Redis: the workers still in those rooms announce them."""
        for timer in self._sweeps.values():
            timer.cancel()
