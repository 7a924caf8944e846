"""The routing layer's background tasks: kept referenced, awaited on leave, cancelled on close."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any

__all__ = ["Tasks"]


class Tasks:
    """A set of tasks; the `flush` ones (sequencing, forwarding) are waited for on leave."""

    def __init__(self) -> None:
        self._all: set[asyncio.Task[None]] = set()
        self._flushes: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None], *, flush: bool = False) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._all.add(task)
        task.add_done_callback(self._all.discard)
        if flush:
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def settle(self, limit: float) -> None:
        """Wait (bounded) until no flush is in flight; a batch's replies flush after it."""
        deadline = time.monotonic() + limit
        while self._flushes and time.monotonic() < deadline:
            await asyncio.wait(set(self._flushes), timeout=deadline - time.monotonic())

    def cancel(self) -> None:
        for task in list(self._all):
            task.cancel()
