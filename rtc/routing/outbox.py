"""PUBLISHes to other workers, queued in order and sent in one pipeline per loop turn.

Each pipeline is bounded by a deadline, so a stalled Redis fails it instead of holding
the queue for the length of the stall. A message no longer `wanted` when its turn comes
is dropped; one whose pipeline failed is reported (`on_failed`) at once, so its sender
can answer `unavailable` now rather than at its deadline.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import NamedTuple

from rtc.broker.base import Publisher
from rtc.log import describe
from rtc.routing.tasks import Tasks

__all__ = ["Outbox"]

log = logging.getLogger("rtc.outbox")


class _Message(NamedTuple):
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
        self._queue: list[_Message] = []
        self._scheduled = False

    def send(
        self,
        channel: str,
        payload: bytes,
        on_nobody: Callable[[], None] | None = None,
        on_failed: Callable[[], None] | None = None,
        wanted: Callable[[], bool] | None = None,
    ) -> None:
        self._queue.append(_Message(channel, payload, on_nobody, on_failed, wanted))
        if not self._scheduled:
            self._scheduled = True
            self._tasks.spawn(self._flush(), flush=True)

    async def _flush(self) -> None:
        try:
            await asyncio.sleep(0)  # let this loop turn's messages join the pipeline
            while self._queue:
                batch, self._queue = self._queue, []
                batch = [m for m in batch if m.wanted is None or m.wanted()]
                try:
                    async with asyncio.timeout(self._timeout):
                        receivers = await self._publisher.publish_many(
                            [(m.channel, m.payload) for m in batch]
                        )
                except Exception as exc:
                    log.warning("forwarding %d messages failed: %s", len(batch), describe(exc))
                    for message in batch:
                        if message.on_failed is not None:
                            message.on_failed()
                    continue
                for message, count in zip(batch, receivers, strict=True):
                    if message.on_nobody is not None and count == 0:
                        message.on_nobody()
        finally:
            self._scheduled = False
