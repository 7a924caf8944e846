"""The host's aggregate of every worker's metrics, as Prometheus text or a JSON summary."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector

__all__ = ["SEED_NAMES", "exposition", "snapshot"]

SEED_NAMES = (
    "active_connections",
    "total_connections",
    "messages_sent_total",
    "messages_received_total",
    "errors_total",
    "rate_limit_denied_total",
)


def _registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


def exposition(accept: str) -> tuple[bytes, str]:
    """The whole host (all workers, live and dead) in the format `accept` asks for:
    OpenMetrics when it names `application/openmetrics-text` (as Prometheus does), else
    Prometheus text. Returns the body and its Content-Type."""
    encoder, content_type = choose_encoder(accept)
    return encoder(_registry()), content_type


def snapshot() -> dict[str, Any]:
    """The seed's totals, per-worker connections and latency percentiles."""
    totals = dict.fromkeys(SEED_NAMES, 0)
    workers: dict[str, float] = {}
    buckets: list[tuple[float, float]] = []
    for family in _registry().collect():
        for sample in family.samples:
            if sample.name in totals and not sample.labels:
                totals[sample.name] = int(sample.value)
            elif sample.name == "rtc_connections":
                worker = sample.labels.get("worker", "?")
                workers[worker] = workers.get(worker, 0) + sample.value
            elif sample.name == "rtc_publish_to_deliver_seconds_bucket":
                buckets.append((float(sample.labels["le"]), sample.value))
    buckets.sort()
    return {
        **totals,
        "workers": [{"worker": w, "connections": int(n)} for w, n in sorted(workers.items())],
        "latency_ms": {f"p{q}": _quantile(buckets, q / 100) for q in (50, 90, 99)},
    }


def _quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """histogram_quantile over cumulative buckets, as PromQL does it (linear in a bucket)."""
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if upper == float("inf"):
                return round(lower * 1000, 3)
            share = (rank - below) / (count - below) if count > below else 1.0
            return round((lower + (upper - lower) * share) * 1000, 3)
        lower, below = upper, count
    return None
