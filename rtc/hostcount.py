"""The host's open connections, per worker slot, in memory shared across the fork.

Each worker writes only its own slot and reads the sum, so `--max-connections` is enforced
host-wide without a lock or a round trip; concurrent admissions overshoot by at most one
per worker. A replacement worker starts its slot from zero, so a crashed worker's count
does not leak.

The same holds per client address for `--max-connections-per-ip`: each slot has a row of
counters indexed by a hash of the address. Two addresses sharing a bucket only make the
cap stricter for both, never looser.

`--connect-rate` is a token bucket per address bucket, shared by every worker of the host
(CLOCK_MONOTONIC is one clock for all processes). Its read-modify-write takes no lock, so
upgrades arriving at the same instant on different workers may each spend the same token:
the overshoot is at most one per worker, and a worker that dies mid-update cannot wedge it.
`--api-rate` is the same, per server API key name.
"""

from __future__ import annotations

import ctypes
import zlib
from multiprocessing.sharedctypes import RawArray

__all__ = ["API_KEY_BUCKETS", "ConnectRate", "HostConnections"]

ADDRESS_BUCKETS = 65536
API_KEY_BUCKETS = 1024  # API keys are few (a handful, for rotation): collisions are rare


def _bucket(address: str, buckets: int) -> int:
    return zlib.crc32(address.encode()) % buckets


class ConnectRate:
    """Requests per second per name (a client address, an API key), host-wide: `rate` a
    second up to `burst`. Names sharing a bucket share its tokens: stricter, never looser."""

    def __init__(self, buckets: int = ADDRESS_BUCKETS) -> None:
        self._buckets = buckets
        # Per bucket: tokens spent (so zeroed memory means a full bucket), and its last refill.
        self._spent = RawArray(ctypes.c_double, buckets)
        self._stamp = RawArray(ctypes.c_double, buckets)

    def take(self, name: str, rate: float, burst: int, now: float) -> bool:
        """Spend one of `name`'s tokens if it has one."""
        bucket = _bucket(name, self._buckets)
        spent = max(0.0, self._spent[bucket] - (now - self._stamp[bucket]) * rate)
        self._stamp[bucket] = now
        if spent + 1.0 > burst:
            self._spent[bucket] = spent
            return False
        self._spent[bucket] = spent + 1.0
        return True


class HostConnections:
    def __init__(self, slots: int, buckets: int = ADDRESS_BUCKETS) -> None:
        self._slots = slots
        self._buckets = buckets
        self._counts = RawArray(ctypes.c_long, slots)  # created before fork: shared
        self._by_address = RawArray(ctypes.c_int32, slots * buckets)
        self.connect_rate = ConnectRate(buckets)
        self.api_rate = ConnectRate(API_KEY_BUCKETS)

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
        return _bucket(address, self._buckets)
