"""The host's open connections, per worker slot, in memory shared across the fork.

Each worker writes only its own slot and reads the sum, so `--max-connections` is enforced
host-wide without a lock or a round trip; concurrent admissions overshoot by at most one
per worker. A replacement worker starts its slot from zero, so a crashed worker's count
does not leak.
"""

from __future__ import annotations

import ctypes
from multiprocessing.sharedctypes import RawArray

__all__ = ["HostConnections"]


class HostConnections:
    def __init__(self, slots: int) -> None:
        self._counts = RawArray(ctypes.c_long, slots)  # created before fork: shared

    def set(self, slot: int, count: int) -> None:
        self._counts[slot] = count

    def total(self) -> int:
        return sum(self._counts)
