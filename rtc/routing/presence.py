"""Membership of rooms per (room, worker slot) in Redis, and the presence events it causes."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from rtc import metrics
from rtc.broker.base import Membership
from rtc.log import describe
from rtc.protocol import encode
from rtc.routing.tasks import Tasks

__all__ = ["MEMBERSHIP_TTL", "PRESENCE_LEAVE_DELAY", "Presence"]

log = logging.getLogger("rtc.presence")

PRESENCE_LEAVE_DELAY = 5.0  # SPEC: a leave is announced 5 s after the last connection left
MEMBERSHIP_TTL = 15  # a slot's membership keys expire this long after its last refresh


class Presence:
    """Counts this slot's connections per room and user; announces joins and leaves."""

    def __init__(
        self, membership: Membership, tasks: Tasks, slot: str, presence_max: int, worker: str
    ) -> None:
        self._membership = membership
        self._tasks = tasks
        self._slot = slot
        self._max = presence_max
        self._joins = metrics.JOINS.labels(worker)
        self._timers: set[asyncio.TimerHandle] = set()

    async def join(self, room: str, user: str) -> None:
        """A connection of `user` joined: count it; `join` if the user is new in the room."""
        self._joins.inc()
        frame = encode("presence", room=room, user=user, event="join")
        await self._membership.join(room, self._slot, user, frame, self._max, MEMBERSHIP_TTL)

    async def leave(self, room: str, user: str) -> None:
        """A connection of `user` left; when it was the slot's last, a leave follows later."""
        try:
            if await self._membership.leave(room, self._slot, user):
                self._schedule_leave(room, user)
        except Exception as exc:
            log.warning("membership update for %s failed: %s", room, describe(exc))

    async def members(self, room: str, limit: int) -> tuple[int, list[str]]:
        return await self._membership.members(room, limit)

    async def refresh(self, rooms: list[str]) -> None:
        """Keep this slot's membership alive; a dead worker's expires on its own."""
        await self._membership.refresh_members(self._slot, rooms, MEMBERSHIP_TTL)

    def _schedule_leave(self, room: str, user: str) -> None:
        """Announce the leave later, so a drain or a resume does not flap presence."""

        def due() -> None:
            self._timers.discard(timer)
            self._tasks.spawn(self._announce_leave(room, user))

        timer = asyncio.get_running_loop().call_later(PRESENCE_LEAVE_DELAY, due)
        self._timers.add(timer)

    async def _announce_leave(self, room: str, user: str) -> None:
        frame = encode("presence", room=room, user=user, event="leave")
        with contextlib.suppress(Exception):
            await self._membership.presence_gone(room, user, frame, self._max)

    def close(self) -> None:
        for timer in self._timers:  # their users are migrating: no leave to announce
            timer.cancel()
