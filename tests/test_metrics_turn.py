"""Hot metrics written once a loop turn: the same samples as writing each event, later."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Counter, Histogram

from rtc.metrics import TurnCounter, TurnHistogram

BUCKETS = (0.001, 0.01, 0.1, 1.0)
AMOUNTS = [0.0005, 0.001, 0.002, 0.05, 0.1, 0.7, 3.0, 42.0, 0.01]


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


async def test_a_turns_increments_are_written_together_at_its_end() -> None:
    registry = CollectorRegistry()
    counter = TurnCounter(Counter("frames", "f", registry=registry))
    for _ in range(5):
        counter.inc()
    counter.inc(2.5)
    assert sample(registry, "frames_total") == 0  # nothing written during the turn
    await asyncio.sleep(0)  # the turn ends: the event under test, not a timed wait
    assert sample(registry, "frames_total") == 7.5
    counter.inc()
    await asyncio.sleep(0)  # the turn ends: the event under test, not a timed wait
    assert sample(registry, "frames_total") == 8.5


def test_without_a_loop_every_increment_is_written_at_once() -> None:
    registry = CollectorRegistry()
    counter = TurnCounter(Counter("frames", "f", registry=registry))
    counter.inc(3)
    assert sample(registry, "frames_total") == 3


async def test_a_turns_observations_land_in_the_buckets_observe_would_use() -> None:
    registry = CollectorRegistry()
    direct = Histogram("direct", "d", ["op"], buckets=BUCKETS, registry=registry)
    batched = Histogram("batched", "b", ["op"], buckets=BUCKETS, registry=registry)
    turn = TurnHistogram(batched.labels("x"))
    for amount in AMOUNTS:
        direct.labels("x").observe(amount)
        turn.observe(amount)
    assert sample(registry, "batched_count", op="x") == 0
    await asyncio.sleep(0)  # the turn ends: the event under test, not a timed wait
    for bound in ("0.001", "0.01", "0.1", "1.0", "+Inf"):
        expected = sample(registry, "direct_bucket", op="x", le=bound)
        assert sample(registry, "batched_bucket", op="x", le=bound) == expected, bound
    assert sample(registry, "batched_sum", op="x") == sample(registry, "direct_sum", op="x")
    assert sample(registry, "batched_count", op="x") == len(AMOUNTS)
