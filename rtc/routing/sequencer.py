"""Sequencing what this worker owns: every room's batch in one round trip to Redis."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import NamedTuple

from rtc.broker.base import RoomLog, Sequenced, Unsequenced
from rtc.log import describe
from rtc.routing.tasks import Tasks

__all__ = ["Reply", "Sequencer", "Stamp", "Wanted"]

log = logging.getLogger("rtc.sequencer")


class Stamp(NamedTuple):
    """What a publish was given: its seq, in the history epoch it belongs to."""

    seq: int
    epoch: str


Reply = Callable[[Stamp | None], None]  # called with the stamp, or None when it failed
Wanted = Callable[[], bool]  # False once the publish was answered otherwise (its deadline)


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
        self._batches: dict[str, list[tuple[Unsequenced, Reply, Wanted | None]]] = {}
        self._running = False

    def sequence(self, room: str, item: Unsequenced, reply: Reply, wanted: Wanted | None = None) -> None:
        """Queue `item` for the next batch; one no longer `wanted` when it leaves is dropped."""
        batch = self._batches.get(room)
        if batch is None:
            self._batches[room] = [(item, reply, wanted)]
        else:
            batch.append((item, reply, wanted))
        if not self._running:
            self._running = True
            self._tasks.spawn(self._flush(), flush=True)

    async def _flush(self) -> None:
        try:  # started after this loop turn (a task's first step): its publishes are queued
            while self._batches:
                # A publish already answered `unavailable` (its deadline passed while it
                # waited here) is not sent: its retry, same id, is the one to sequence.
                batches = {
                    room: kept
                    for room, batch in self._batches.items()
                    if (kept := [entry for entry in batch if entry[2] is None or entry[2]()])
                }
                self._batches = {}
                if not batches:
                    break
                try:
                    async with asyncio.timeout(self._timeout):
                        results = await self._log.sequence_many(
                            {room: [item for item, _, _ in batch] for room, batch in batches.items()},
                            self._history_size,
                            self._history_ttl,
                        )
                except Exception as exc:
                    log.warning("sequencing %d rooms failed: %s", len(batches), describe(exc))
                    results = {}
                for room, batch in batches.items():
                    result = results.get(room)
                    if not isinstance(result, Sequenced):
                        if result is not None:
                            log.warning("sequencing %s failed: %s", room, describe(result))
                        for _, reply, _ in batch:
                            reply(None)
                        continue
                    for (_, reply, _), seq in zip(batch, result.seqs, strict=True):
                        reply(Stamp(seq, result.epoch))
        finally:
            self._running = False
