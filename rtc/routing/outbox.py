"""Slot records to other workers, queued in order: one message per slot per loop turn."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from rtc.broker.base import Publisher
from rtc.routing.records import encode_slots
from rtc.routing.tasks import Tasks

__all__ = ["Outbox"]

log = logging.getLogger("rtc.outbox")


class Outbox:
    """Order is kept per channel; `on_nobody` runs when no worker listened on the channel."""

    def __init__(self, publisher: Publisher, tasks: Tasks) -> None:
        self._publisher = publisher
        self._tasks = tasks
        self._queue: list[tuple[str, bytes]] = []
        self._nobody: dict[int, Callable[[], None]] = {}
        self._scheduled = False

    def send(self, channel: str, payload: bytes, on_nobody: Callable[[], None] | None = None) -> None:
        self._queue.append((channel, payload))
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
                # One message per channel: the records of a turn to one slot travel together.
                by_channel: dict[str, list[int]] = {}
                for index, (channel, _) in enumerate(batch):
                    by_channel.setdefault(channel, []).append(index)
                messages = [
                    (channel, encode_slots([batch[i][1] for i in indexes]))
                    for channel, indexes in by_channel.items()
                ]
                try:
                    receivers = await self._publisher.publish_many(messages)
                except Exception as exc:
                    log.warning("forwarding failed: %s", exc)
                    continue  # the forwards expire into `unavailable`
                for count, indexes in zip(receivers, by_channel.values(), strict=True):
                    if count == 0:
                        for index in indexes:
                            callback = nobody.get(index)
                            if callback is not None:
                                callback()
        finally:
            self._scheduled = False
