"""Hot metrics written in batches: the same samples as writing each event, a little later."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry, Counter, Histogram

from rtc.metrics import FLUSH_EVERY, BatchedCounter, BatchedHistogram, flush_batched
from tests.rtcproc import until

BUCKETS = (0.001, 0.01, 0.1, 1.0)
AMOUNTS = [0.0005, 0.001, 0.002, 0.05, 0.1, 0.7, 3.0, 42.0, 0.01]


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


async def test_increments_are_written_together_once_the_flush_delay_passed() -> None:
    registry = CollectorRegistry()
    counter = BatchedCounter(Counter("frames", "f", registry=registry))
    for _ in range(5):
        counter.inc()
    counter.inc(2.5)
    await asyncio.sleep(0)  # one loop turn: the per-turn write this replaced would be done
    assert sample(registry, "frames_total") == 0
    written = time.monotonic()
    await until(lambda: sample(registry, "frames_total") == 7.5, 1, "the batch written")
    assert time.monotonic() - written <= 2 * FLUSH_EVERY
    counter.inc()
    await until(lambda: sample(registry, "frames_total") == 8.5, 1, "the next batch written")


async def test_a_final_flush_writes_what_is_pending_at_once() -> None:
    registry = CollectorRegistry()
    counter = BatchedCounter(Counter("frames", "f", registry=registry))
    counter.inc(4)
    flush_batched()
    assert sample(registry, "frames_total") == 4


def test_without_a_loop_every_increment_is_written_at_once() -> None:
    registry = CollectorRegistry()
    counter = BatchedCounter(Counter("frames", "f", registry=registry))
    counter.inc(3)
    assert sample(registry, "frames_total") == 3


async def test_observations_land_in_the_buckets_observe_would_use() -> None:
    registry = CollectorRegistry()
    direct = Histogram("direct", "d", ["op"], buckets=BUCKETS, registry=registry)
    batched = Histogram("batched", "b", ["op"], buckets=BUCKETS, registry=registry)
    histogram = BatchedHistogram(batched.labels("x"))
    for amount in AMOUNTS:
        direct.labels("x").observe(amount)
        histogram.observe(amount)
    assert sample(registry, "batched_count", op="x") == 0
    flush_batched()
    for bound in ("0.001", "0.01", "0.1", "1.0", "+Inf"):
        expected = sample(registry, "direct_bucket", op="x", le=bound)
        assert sample(registry, "batched_bucket", op="x", le=bound) == expected, bound
    assert sample(registry, "batched_sum", op="x") == sample(registry, "direct_sum", op="x")
    assert sample(registry, "batched_count", op="x") == len(AMOUNTS)
