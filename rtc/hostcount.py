"""The host's open connections, per worker slot, in memory shared across the fork.

Each worker writes only its own slot and reads the sum, so `--max-connections` is enforced
host-wide without a lock or a round trip; concurrent admissions overshoot by at most one
per worker. A replacement worker starts its slot from zero, so a crashed worker's count
does not leak.

The same holds per client address for `--max-connections-per-ip`: each slot has a row of
counters indexed by a hash of the address. Two addresses sharing a bucket only make the
cap stricter for both, never looser.
"""

from __future__ import annotations

import ctypes
import zlib
from multiprocessing.sharedctypes import RawArray

__all__ = ["HostConnections"]

ADDRESS_BUCKETS = 65536


class HostConnections:
    def __init__(self, slots: int, buckets: int = ADDRESS_BUCKETS) -> None:
        self._slots = slots
        self._buckets = buckets
        self._counts = RawArray(ctypes.c_long, slots)  # created before fork: shared
        self._by_address = RawArray(ctypes.c_int32, slots * buckets)

    def set(self, slot: int, count: int) -> None:
        self._counts[slot] = count

    def total(self) -> int:
        return sum(self._counts)

    def reset(self, slot: int) -> None:
        """A (replacement) worker starts its slot from zero."""
        self._counts[slot] = 0
        ctypes.memset(ctypes.addressof(self._by_address) + slot * self._buckets * 4, 0, self._buckets * 4)

    def add_address(self, slot: int, address: str, delta: int) -> None:
        self._by_address[slot * self._buckets + self._bucket(address)] += delta

    def from_address(self, address: str) -> int:
        """Open connections from `address` on every worker of the host."""
        bucket = self._bucket(address)
        return sum(self._by_address[slot * self._buckets + bucket] for slot in range(self._slots))

    def _bucket(self, address: str) -> int:
        return zlib.crc32(address.encode()) % self._buckets
