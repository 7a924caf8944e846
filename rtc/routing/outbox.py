"""PUBLISHes to other workers, queued in order and sent in one pipeline per loop turn.

Each pipeline is bounded by a deadline: a stalled Redis fails it (what it carried is
answered `unavailable` by the forwarder's own deadlines) instead of holding the queue
for the length of the stall. A message no longer `wanted` when its turn comes is dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from rtc.broker.base import Publisher
from rtc.log import describe
from rtc.routing.tasks import Tasks

__all__ = ["Outbox"]

log = logging.getLogger("rtc.outbox")


class Outbox:
    """Order is kept per channel; `on_nobody` runs when no worker listened on the channel."""

    def __init__(self, publisher: Publisher, tasks: Tasks, timeout: float) -> None:
        self._publisher = publisher
        self._tasks = tasks
        self._timeout = timeout
        self._queue: list[tuple[str, bytes, Callable[[], bool] | None]] = []
        self._nobody: dict[int, Callable[[], None]] = {}
        self._scheduled = False

    def send(
        self,
        channel: str,
        payload: bytes,
        on_nobody: Callable[[], None] | None = None,
        wanted: Callable[[], bool] | None = None,
    ) -> None:
        self._queue.append((channel, payload, wanted))
        if on_nobody is not None:
            self._nobody[len(self._queue) - 1] = on_nobody
        if not self._scheduled:
            self._scheduled = True
            self._tasks.spawn(self._flush(), flush=True)

    async def _flush(self) -> None:
        try:
            await asyncio.sleep(0)  # let this loop turn's messages join the pipeline
            while self._queue:
                batch, self._queue = self._queue, []
                nobody, self._nobody = self._nobody, {}
                kept = [i for i, (_, _, wanted) in enumerate(batch) if wanted is None or wanted()]
                try:
                    async with asyncio.timeout(self._timeout):
                        receivers = await self._publisher.publish_many([batch[i][:2] for i in kept])
                except Exception as exc:
                    log.warning("forwarding %d messages failed: %s", len(kept), describe(exc))
                    continue  # the forwards expire into `unavailable`
                for index, count in zip(kept, receivers, strict=True):
                    callback = nobody.get(index)
                    if callback is not None and count == 0:
                        callback()
        finally:
            self._scheduled = False
