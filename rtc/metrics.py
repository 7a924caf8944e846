"""Every metric rtc exports, declared once, in the multiprocess registry.

prometheus_client picks multiprocess mode when it is first imported, so the supervisor
sets `PROMETHEUS_MULTIPROC_DIR` before anything imports this module. The seed's six
unlabelled names come first: the seed's dashboard and alerts query them as they are.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from rtc.errors import ErrorCode

__all__ = [
    "ACTIVE_CONNECTIONS",
    "API_ENDPOINTS",
    "API_REQUESTS",
    "CONNECTIONS",
    "DELIVERIES",
    "DRAINS",
    "EPOCH_CHANGES",
    "ERRORS",
    "ERROR_FRAMES",
    "FANOUT_RECEIVED",
    "FANOUT_SIZE",
    "FLUSH_EVERY",
    "FORWARDED",
    "FRAMES_REFUSED",
    "GAPS_FILLED",
    "GAPS_REPORTED",
    "HANDSHAKE_REJECTED",
    "JOINS",
    "MESSAGES_RECEIVED",
    "MESSAGES_SENT",
    "MIGRATED",
    "PUBLISH_TO_DELIVER",
    "PUBSUB_RECONNECTS",
    "RATE_LIMIT_DENIED",
    "REDIS_ERRORS",
    "REDIS_SECONDS",
    "REDIS_UP",
    "RING_SLOTS",
    "ROOMS",
    "SLOW_CONSUMERS",
    "TOTAL_CONNECTIONS",
    "WORKER_RESTARTS",
    "BatchedCounter",
    "BatchedHistogram",
    "declare_label_values",
    "flush_batched",
]

# The seed's names (SPEC section 6): unlabelled host totals, present from start.
ACTIVE_CONNECTIONS = Gauge("active_connections", "Open WebSocket connections", multiprocess_mode="livesum")
TOTAL_CONNECTIONS = Gauge(
    "total_connections", "WebSocket connections opened since start", multiprocess_mode="sum"
)
MESSAGES_SENT = Counter("messages_sent", "Sequenced messages delivered to client sockets")
MESSAGES_RECEIVED = Counter("messages_received", "Frames received from clients")
ERRORS = Counter("errors", "Errors: error frames, rejected handshakes, abnormal closes")
RATE_LIMIT_DENIED = Counter("rate_limit_denied", "Client frames denied by the rate limit")

_WORKER = ("worker",)
CONNECTIONS = Gauge("rtc_connections", "Open connections per worker", _WORKER, multiprocess_mode="livesum")
ROOMS = Gauge("rtc_rooms", "Rooms and inboxes subscribed per worker", _WORKER, multiprocess_mode="livesum")
JOINS = Counter("rtc_joins", "Room joins", _WORKER)
FORWARDED = Counter("rtc_forwarded", "Publishes sent to another slot's owner over Redis", _WORKER)
FANOUT_RECEIVED = Counter(
    "rtc_fanout_received", "Sequenced messages received from Redis for local delivery", _WORKER
)
DELIVERIES = Counter("rtc_deliveries", "Sequenced frames written to local sockets", _WORKER)
PUBLISH_TO_DELIVER = Histogram(
    "rtc_publish_to_deliver_seconds",
    "From a publish being accepted to its frame being written to local sockets",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
FANOUT_SIZE = Histogram(
    "rtc_fanout_size",
    "Local recipients of one sequenced message on one worker",
    buckets=(1, 2, 5, 10, 50, 100, 500, 1000, 5000, 10000),
)
REDIS_SECONDS = Histogram(
    "rtc_redis_command_seconds",
    "Redis round trips by operation",
    ("op",),
    buckets=(0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.0),
)
REDIS_ERRORS = Counter("rtc_redis_errors", "Failed Redis operations", ("op",))
REDIS_UP = Gauge("rtc_redis_up", "1 when the worker reaches Redis", _WORKER, multiprocess_mode="livemin")
PUBSUB_RECONNECTS = Counter("rtc_pubsub_reconnects", "Pub/sub connection re-established", _WORKER)
GAPS_FILLED = Counter("rtc_gaps_filled", "Seq holes filled from history before delivery", _WORKER)
GAPS_REPORTED = Counter("rtc_gaps_reported", "Seq holes reported to clients as `gap`", _WORKER)
EPOCH_CHANGES = Counter(
    "rtc_epoch_changes", "Rooms whose history epoch changed under their members (Redis lost data)", _WORKER
)
DRAINS = Counter("rtc_drains", "Drains a worker went through (a host drain counts once per worker)", _WORKER)
MIGRATED = Counter("rtc_migrated_connections", "Connections closed by a drain", ("result",))
SLOW_CONSUMERS = Counter("rtc_slow_consumer_disconnects", "Connections closed 1013", _WORKER)
HANDSHAKE_REJECTED = Counter("rtc_handshake_rejected", "Upgrades refused", ("reason",))
FRAMES_REFUSED = Counter(
    "rtc_frames_refused", "Connections closed for a bad incoming frame, by close code", ("code",)
)
ERROR_FRAMES = Counter("rtc_errors", "Error frames sent, by code", ("code",))
WORKER_RESTARTS = Counter("rtc_worker_restarts", "Workers replaced after dying")
RING_SLOTS = Gauge("rtc_ring_slots", "Live slots in the ring", multiprocess_mode="livemax")
API_REQUESTS = Counter(
    "rtc_api_requests",
    "Server API requests (/api/*) answered, by endpoint and HTTP status",
    ("endpoint", "status"),
)

HANDSHAKE_REASONS = ("draining", "full", "origin", "auth", "per_ip", "connect_rate")
# The server API's endpoints by name (never a path: a path holds room ids); `other` is a
# path under /api/ that has no endpoint.
API_ENDPOINTS = ("publish", "broadcast", "direct", "disconnect", "members", "history", "info", "openapi")
REDIS_OPS = (
    "ping",
    "heartbeat",
    "subscribe",
    "publish",
    "open_room",
    "sequence",
    "history",
    "membership",
    "session",
)


def declare_label_values() -> None:
    """Create every child of the closed label vocabularies, so they are scraped from start
    (a labelled metric with no children is absent, and dashboards would show no data)."""
    for code in ErrorCode:
        ERROR_FRAMES.labels(code.value)
    for reason in HANDSHAKE_REASONS:
        HANDSHAKE_REJECTED.labels(reason)
    for close_code in ("1002", "1007", "1009"):
        FRAMES_REFUSED.labels(close_code)
    for result in ("migrated", "failed"):
        MIGRATED.labels(result)
    for op in REDIS_OPS:
        REDIS_ERRORS.labels(op)
    for endpoint in API_ENDPOINTS:
        API_REQUESTS.labels(endpoint, "200")


# -- batching of hot metrics -----------------------------------------------------------------

FLUSH_EVERY = 0.1  # s: how long a hot metric's updates wait to be written together


class BatchedCounter:
    """A counter whose increments reach its shared-memory file together, at most
    `FLUSH_EVERY` later.

    In multiprocess mode every `inc` is a pid check and an mmap write: paid per frame and
    per delivery, about 8 % of a busy worker; written once a loop turn, still 10 % of a
    worker routing directs (a turn carries few). A scrape sees at most `FLUSH_EVERY` of lag.
    """

    __slots__ = ("_metric", "_pending", "_scheduled")

    def __init__(self, metric: Any) -> None:
        self._metric = metric  # a Counter, or one labelled child of it
        self._pending = 0.0
        self._scheduled = False

    def inc(self, amount: float = 1) -> None:
        self._pending += amount
        if not self._scheduled:
            self._scheduled = _schedule(self)

    def flush(self) -> None:
        pending, self._pending, self._scheduled = self._pending, 0.0, False
        if pending:
            self._metric.inc(pending)


class BatchedHistogram:
    """A histogram whose observations are written together, one write per bucket."""

    __slots__ = ("_bounds", "_counts", "_metric", "_scheduled", "_sum")

    def __init__(self, metric: Any) -> None:
        self._metric = metric  # a Histogram, or one labelled child of it
        self._bounds: list[float] = list(metric._upper_bounds)
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0
        self._scheduled = False

    def observe(self, amount: float) -> None:
        self._sum += amount
        self._counts[bisect_left(self._bounds, amount)] += 1  # the last bound is +Inf
        if not self._scheduled:
            self._scheduled = _schedule(self)

    def flush(self) -> None:
        """What `observe` would have written, one write per bucket that changed."""
        counts, self._counts = self._counts, [0] * len(self._bounds)
        total, self._sum, self._scheduled = self._sum, 0.0, False
        if not any(counts):
            return
        self._metric._sum.inc(total)
        for bucket, count in zip(self._metric._buckets, counts, strict=True):
            if count:
                bucket.inc(count)


_due: list[BatchedCounter | BatchedHistogram] = []
_flush_loop: list[asyncio.AbstractEventLoop] = []  # the loop whose timer flushes `_due`


def _schedule(metric: BatchedCounter | BatchedHistogram) -> bool:
    """Flush `metric` within `FLUSH_EVERY`; True when that is arranged (without a running
    loop, e.g. in the supervisor, it is flushed at once)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        metric.flush()
        return False
    if _flush_loop != [loop]:  # none pending, or pending on a loop that ended (tests)
        _flush_loop[:] = [loop]
        loop.call_later(FLUSH_EVERY, flush_batched)
    _due.append(metric)
    return True


def flush_batched() -> None:
    """Write every batched metric's pending updates now (a stopping worker calls it last)."""
    due = _due[:]
    _due.clear()
    _flush_loop.clear()
    for metric in due:
        metric.flush()
