"""This worker's place in the consistent-hash ring: its slot's lease and its view of the others.

Redis stalls and restarts: after a heartbeat failed, or came later than a lease after
the previous one, every slot's lease may have lapsed together (or Redis lost the ring),
though no worker died. The first views after that miss the live slots that have not
renewed yet; adopting them would take hosts out of their load balancer (`/health` 503)
and move ownership back and forth. So for one lease after such a heartbeat, a view may
gain slots but loses none (`next_view`); a slot that really died leaves a lease later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Collection

from rtc import keys, metrics
from rtc.broker.base import RingStore, Subscriber
from rtc.hashring import Ring

__all__ = ["HEARTBEAT_TIMEOUT", "RING_TTL_MS", "RingMember", "next_view"]

log = logging.getLogger("rtc.ring")

RING_TTL_MS = 3000  # a dead worker's slot leaves every ring view within this
LEASE = RING_TTL_MS / 1000
HEARTBEAT_TIMEOUT = 2.0  # a heartbeat slower than this failed: Redis is stalled


def next_view(current: Ring, live: Collection[str], settled: bool) -> Ring:
    """The ring view after a heartbeat saw `live`: while not `settled`, it only grows."""
    if settled or set(current.slots) <= set(live):
        return Ring(live)
    return Ring({*live, *current.slots})


class RingMember:
    """Holds the slot (forwards for it arrive on its inbox) and keeps the ring view fresh."""

    def __init__(self, store: RingStore, subscriber: Subscriber, slot: str, instance: str) -> None:
        self._store = store
        self._subscriber = subscriber
        self.slot = slot
        self.instance = instance
        self.inbox = keys.slot_inbox(slot)
        self.ring = Ring(())
        self.in_ring = False
        self.redis_seen = 0.0  # monotonic time of the last heartbeat that succeeded
        self._failed = False  # the last heartbeat failed
        self._settles_at = 0.0  # until then the view only grows

    @property
    def redis_ok(self) -> bool:
        """Redis answered a heartbeat within a lease: the last known state, not a round trip."""
        return time.monotonic() - self.redis_seen < LEASE

    def owner(self, key: str) -> str:
        """The slot that sequences `key`: this one while the ring is empty."""
        return self.ring.owner(key) or self.slot

    async def join(self) -> None:
        """Take the slot: receive forwards for it and heartbeat it into the ring."""
        await self._subscriber.subscribe(self.inbox)
        self.in_ring = True
        await self.heartbeat()

    async def heartbeat(self) -> None:
        """Renew the slot's lease (once in the ring) and refresh the ring view."""
        try:
            async with asyncio.timeout(HEARTBEAT_TIMEOUT):
                if self.in_ring:
                    live = await self._store.heartbeat(self.slot, self.instance, RING_TTL_MS)
                else:
                    live = await self._store.live_slots()
        except Exception:
            self._failed = True
            raise
        now = time.monotonic()
        if self._failed or (self.redis_seen and now - self.redis_seen > LEASE):
            self._settles_at = now + LEASE
        self._failed = False
        self.redis_seen = now
        ring = next_view(self.ring, live, now >= self._settles_at)
        if ring != self.ring:
            log.info("ring changed: %d slots", len(ring))
            self.ring = ring
            metrics.RING_SLOTS.set(len(ring))

    async def leave(self) -> None:
        """Give up the slot; what was already forwarded to it is still answered."""
        self.in_ring = False
        with contextlib.suppress(Exception):
            await self._subscriber.unsubscribe(self.inbox)
            await self._store.leave_ring(self.slot)
