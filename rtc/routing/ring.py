"""This worker's place in the consistent-hash ring: its slot's lease and its view of the others."""

from __future__ import annotations

import contextlib
import logging

from rtc import keys, metrics
from rtc.broker.base import RingStore, Subscriber
from rtc.hashring import Ring

__all__ = ["RING_TTL_MS", "RingMember"]

log = logging.getLogger("rtc.ring")

RING_TTL_MS = 3000  # a dead worker's slot leaves every ring view within this


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
        if self.in_ring:
            live = await self._store.heartbeat(self.slot, self.instance, RING_TTL_MS)
        else:
            live = await self._store.live_slots()
        ring = Ring(live)
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
