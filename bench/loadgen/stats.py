"""Pure measurement types: a mergeable latency histogram and a per-room seq checker.

Both are plain data so that worker processes can pickle them to the parent, which
merges them; nothing here does I/O or reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Histogram", "Integrity", "SeqChecker"]

# 0.1 ms buckets below 100 ms (where the 50 ms limit lives), 1 ms buckets up to 10 s,
# then one overflow bucket: fixed buckets make recording O(1) and merging a sum.
_FINE_LIMIT_MS = 100.0
_FINE_PER_MS = 10
_FINE_BUCKETS = int(_FINE_LIMIT_MS * _FINE_PER_MS)
_COARSE_LIMIT_MS = 10_000.0
_BUCKETS = _FINE_BUCKETS + int(_COARSE_LIMIT_MS - _FINE_LIMIT_MS) + 1


def _upper_edge(index: int) -> float:
    """Upper edge in ms of bucket ``index``; percentiles report it (never optimistic)."""
    if index < _FINE_BUCKETS:
        return (index + 1) / _FINE_PER_MS
    if index < _BUCKETS - 1:
        return _FINE_LIMIT_MS + (index - _FINE_BUCKETS + 1)
    return float("inf")


@dataclass(slots=True)
class Histogram:
    """Latency histogram in milliseconds with fixed buckets."""

    counts: list[int] = field(default_factory=lambda: [0] * _BUCKETS)
    total: int = 0
    sum_ms: float = 0.0
    max_ms: float = 0.0

    def add(self, ms: float) -> None:
        """Record one sample; negative values (ms-rounded server clocks) count as 0.

        The generator calls this twice per delivery, so it is written for speed: the
        common case (a fine bucket) first, no builtin calls.
        """
        if ms < _FINE_LIMIT_MS:
            if ms < 0.0:
                ms = 0.0
            self.counts[int(ms * _FINE_PER_MS)] += 1
        elif ms < _COARSE_LIMIT_MS:
            self.counts[_FINE_BUCKETS + int(ms - _FINE_LIMIT_MS)] += 1
        else:
            self.counts[_BUCKETS - 1] += 1
        self.total += 1
        self.sum_ms += ms
        if ms > self.max_ms:
            self.max_ms = ms

    def merge(self, other: Histogram) -> None:
        """Add ``other``'s samples to this histogram."""
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.total += other.total
        self.sum_ms += other.sum_ms
        self.max_ms = max(self.max_ms, other.max_ms)

    def percentile(self, q: float) -> float | None:
        """The upper bucket edge below which a fraction ``q`` of samples lie."""
        if not self.total:
            return None
        rank = q * self.total
        seen = 0
        for index, count in enumerate(self.counts):
            seen += count
            if count and seen >= rank:
                return min(_upper_edge(index), self.max_ms)
        return self.max_ms

    def summary(self) -> dict[str, float | int | None]:
        """Count, mean and the usual percentiles, ready for JSON."""
        return {
            "count": self.total,
            "mean_ms": round(self.sum_ms / self.total, 3) if self.total else None,
            "p50_ms": self.percentile(0.50),
            "p90_ms": self.percentile(0.90),
            "p99_ms": self.percentile(0.99),
            "max_ms": round(self.max_ms, 3) if self.total else None,
        }


@dataclass
class Integrity:
    """Delivery-order findings, summed over every socket of a run."""

    gaps: int = 0
    duplicates: int = 0
    reordered: int = 0

    def merge(self, other: Integrity) -> None:
        """Add ``other``'s findings."""
        self.gaps += other.gaps
        self.duplicates += other.duplicates
        self.reordered += other.reordered

    def as_dict(self) -> dict[str, int]:
        """JSON form."""
        return {"gaps": self.gaps, "duplicates": self.duplicates, "reordered": self.reordered}


class SeqChecker:
    """Checks one socket's deliveries per room (or inbox) against seq 1, 2, 3, ...

    A jump records the skipped seqs as missing; one that arrives later counts as
    reordered, not as a gap. At most ``max_missing`` seqs are remembered per socket
    so a flood of loss cannot grow memory; the excess counts as gaps at once.
    """

    __slots__ = ("_last", "_max_missing", "_missing", "integrity")

    def __init__(self, integrity: Integrity, max_missing: int = 1024) -> None:
        self._last: dict[str, int] = {}
        self._missing: set[tuple[str, int]] = set()
        self._max_missing = max_missing
        self.integrity = integrity

    def start(self, key: str, seq: int) -> None:
        """Expect ``seq + 1`` next for ``key`` (the seq of ``joined``)."""
        self._last[key] = seq

    def observe(self, key: str, seq: int) -> None:
        """Check one delivery."""
        last = self._last.get(key, 0)
        if seq == last + 1:
            self._last[key] = seq
        elif seq > last + 1:
            for skipped in range(last + 1, seq):
                if len(self._missing) < self._max_missing:
                    self._missing.add((key, skipped))
                else:
                    self.integrity.gaps += 1
            self._last[key] = seq
        elif (key, seq) in self._missing:
            self._missing.discard((key, seq))
            self.integrity.reordered += 1
        else:
            self.integrity.duplicates += 1

    def outstanding(self) -> int:
        """Seqs skipped and not (yet) delivered: gaps, once traffic has settled."""
        return len(self._missing)
