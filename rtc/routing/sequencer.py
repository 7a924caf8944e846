"""Sequencing what this worker owns: every room's batch in one round trip to Redis."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from rtc.broker.base import RoomLog, Sequenced, Unsequenced
from rtc.routing.tasks import Tasks

__all__ = ["Reply", "Sequencer"]

log = logging.getLogger("rtc.sequencer")

Reply = Callable[[int | None], None]  # called with the seq, or None when it failed


class Sequencer:
    """Batches publishes per room; one flush in flight at a time keeps each room's order.

    What arrives while a flush is in flight forms the next, larger batch, sent as one
    pipeline of scripts (one per room) as soon as the previous one returned.
    """

    def __init__(
        self, log_: RoomLog, tasks: Tasks, history_size: int, history_ttl: int, timeout: float
    ) -> None:
        self._log = log_
        self._tasks = tasks
        self._history_size = history_size
        self._history_ttl = history_ttl
        self._timeout = timeout
        self._batches: dict[str, list[tuple[Unsequenced, Reply]]] = {}
        self._running = False

    def sequence(self, room: str, item: Unsequenced, reply: Reply) -> None:
        batch = self._batches.get(room)
        if batch is None:
            self._batches[room] = [(item, reply)]
        else:
            batch.append((item, reply))
        if not self._running:
            self._running = True
            self._tasks.spawn(self._flush(), flush=True)

    async def _flush(self) -> None:
        try:
            await asyncio.sleep(0)  # let this loop turn's publishes join the batch
            while self._batches:
                batches, self._batches = self._batches, {}
                try:
                    async with asyncio.timeout(self._timeout):
                        results = await self._log.sequence_many(
                            {room: [item for item, _ in batch] for room, batch in batches.items()},
                            self._history_size,
                            self._history_ttl,
                        )
                except Exception as exc:
                    log.warning("sequencing %d rooms failed: %s", len(batches), exc)
                    results = {}
                for room, batch in batches.items():
                    result = results.get(room)
                    if not isinstance(result, Sequenced):
                        if result is not None:
                            log.warning("sequencing %s failed: %s", room, result)
                        for _, reply in batch:
                            reply(None)
                        continue
                    for (_, reply), seq in zip(batch, result.seqs, strict=True):
                        reply(seq)
        finally:
            self._running = False
