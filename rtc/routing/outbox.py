"""Slot records to other workers, queued in order: one message per slot per loop turn.

Each round trip is bounded by a deadline, so a stalled Redis fails it instead of holding
the queue for the length of the stall. A record no longer `wanted` when its turn comes
is dropped; one whose PUBLISH failed is reported (`on_failed`) at once, so its sender
can answer `unavailable` now rather than at its deadline.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import NamedTuple

from rtc.broker.base import Publisher
from rtc.log import describe
from rtc.routing.records import encode_slots
from rtc.routing.tasks import Tasks

__all__ = ["Outbox"]

log = logging.getLogger("rtc.outbox")


class _Record(NamedTuple):
    channel: str
    payload: bytes
    on_nobody: Callable[[], None] | None
    on_failed: Callable[[], None] | None
    wanted: Callable[[], bool] | None


class Outbox:
    """Order is kept per channel; `on_nobody` runs when no worker listened on the channel."""

    def __init__(self, publisher: Publisher, tasks: Tasks, timeout: float) -> None:
        self._publisher = publisher
        self._tasks = tasks
        self._timeout = timeout
        self._queue: list[_Record] = []
        self._scheduled = False

    def send(
        self,
        channel: str,
        payload: bytes,
        on_nobody: Callable[[], None] | None = None,
        on_failed: Callable[[], None] | None = None,
        wanted: Callable[[], bool] | None = None,
    ) -> None:
        self._queue.append(_Record(channel, payload, on_nobody, on_failed, wanted))
        if not self._scheduled:
            self._scheduled = True
            self._tasks.spawn(self._flush(), flush=True)

    async def _flush(self) -> None:
        try:  # started after this loop turn (a task's first step): its messages are queued
            while self._queue:
                batch, self._queue = self._queue, []
                # One message per channel: the records of a turn to one slot travel together.
                by_channel: dict[str, list[_Record]] = {}
                for record in batch:
                    if record.wanted is None or record.wanted():
                        by_channel.setdefault(record.channel, []).append(record)
                messages = [
                    (channel, encode_slots([r.payload for r in records]))
                    for channel, records in by_channel.items()
                ]
                try:
                    async with asyncio.timeout(self._timeout):
                        receivers = await self._publisher.publish_many(messages)
                except Exception as exc:
                    log.warning("forwarding %d messages failed: %s", len(messages), describe(exc))
                    for records in by_channel.values():
                        for record in records:
                            if record.on_failed is not None:
                                record.on_failed()
                    continue
                for count, records in zip(receivers, by_channel.values(), strict=True):
                    if count == 0:
                        for record in records:
                            if record.on_nobody is not None:
                                record.on_nobody()
        finally:
            self._scheduled = False
