"""A worker process: serves its slot's inherited listening socket until told to stop.

Boot order: routing node (Redis reachable), HTTP site on the slot's socket, then the
ring (at once on first boot; on a rolling restart only when the supervisor says the
old worker of this slot has left). It reports `ready` on its pipe to the supervisor,
and `alive` from its event loop every second or so: a worker that goes silent for
`--worker-timeout` is hung, and the supervisor kills and replaces it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import random
import signal
import socket
import time
from dataclasses import dataclass

import orjson
import uvloop
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from rtc import keys, metrics
from rtc.app import build_app
from rtc.appstate import WorkerState
from rtc.auth import Verifier
from rtc.broker import SlotTaken, make_broker
from rtc.config import Settings
from rtc.connection import Connection
from rtc.errors import CloseCode, ExitStatus
from rtc.hostcount import HostConnections
from rtc.keepalive import keep_alive
from rtc.log import redact, setup_logging
from rtc.node import Node
from rtc.protocol import encode
from rtc.routing.channels import Channels

__all__ = ["LISTEN_BACKLOG", "WorkerSpec", "drain_connections", "run_worker"]

log = logging.getLogger("rtc.worker")

LISTEN_BACKLOG = 65535  # accept queue per worker; the kernel caps it at net.core.somaxconn
_CLOSE_TIMEOUT = 5.0
# Python collects cyclic garbage every 700 container allocations, and each full pass walks
# every live connection's objects: at 11,000 directs/s that set the p99 (53 ms; 10 ms with
# this), and in a 10,000-socket storm the loop stalled for 200 ms (50 ms with this).
# The middle generation is collected every third young pass, not every eleventh: in a
# storm its passes walk what the young ones kept (handshakes in flight) and stalled the
# loop for up to 240 ms; a third as much at a time, the same work in all.
# Garbage in cycles lives a little longer; memory stays flat (docs/performance.md, soak).
GC_THRESHOLDS = (20_000, 2, 50)
_ALIVE_EVERY = 1.0  # at most; a short --worker-timeout gets four reports per timeout


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What the supervisor hands a forked worker."""

    settings: Settings
    index: int
    sock: socket.socket
    instance: str
    join_ring_now: bool
    report_fd: int
    host_connections: HostConnections


class _AccessLogger(AbstractAccessLogger):
    """Access log without secrets: the query string has `token=` redacted."""

    @property
    def enabled(self) -> bool:
        """aiohttp skips `log` when False: below debug level, closing a socket builds no line."""
        return self.logger.isEnabledFor(logging.INFO)

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            '%s "%s %s" %s %.3fs',
            request.remote,
            request.method,
            redact(request.path_qs),
            response.status,
            time,
        )


def run_worker(spec: WorkerSpec) -> int:
    """The child's main: returns its exit status."""
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    setup_logging(spec.settings, worker=str(spec.index))
    gc.freeze()  # the imported modules are long-lived: keep them out of GC passes
    gc.set_threshold(*GC_THRESHOLDS)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_Worker(spec).run())


class _Worker:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.settings = spec.settings
        self.label = str(spec.index)
        self.slot = f"{self.settings.node_id}:{spec.index}"
        self.stop = asyncio.Event()
        self.join_ring = asyncio.Event()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        os.set_blocking(self.spec.report_fd, False)  # a stalled supervisor never blocks the loop
        self._report_alive()
        loop.add_signal_handler(signal.SIGTERM, self.stop.set)
        loop.add_signal_handler(signal.SIGUSR1, self.join_ring.set)
        if self.spec.join_ring_now:
            self.join_ring.set()
        for family in (
            metrics.FORWARDED,
            metrics.FANOUT_RECEIVED,
            metrics.DELIVERIES,
            metrics.CONNECTIONS,
            metrics.ROOMS,
            metrics.JOINS,
            metrics.SLOW_CONSUMERS,
            metrics.PUBSUB_RECONNECTS,
            metrics.GAPS_FILLED,
            metrics.GAPS_REPORTED,
            metrics.EPOCH_CHANGES,
            metrics.DRAINS,
        ):
            family.labels(self.label)
        metrics.REDIS_UP.labels(self.label).set(1)
        metrics.declare_label_values()

        channels = Channels()
        broker = make_broker(self.settings, channels, self.label)
        node = Node(self.settings, self.slot, self.spec.instance, self.label, broker, channels)
        try:
            await node.start()
        except Exception as exc:  # a bad --redis-url, or Redis down: a setting to fix
            return self._fail(f"cannot reach Redis: {exc}")
        self.spec.host_connections.reset(self.spec.index)
        state = WorkerState(
            self.settings,
            node,
            broker,
            Verifier(self.settings, time.time),
            self.label,
            self.spec.index,
            self.spec.host_connections,
        )
        node.on_control = lambda command: self._on_control(state, command)
        app = build_app(state)
        runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log_class=_AccessLogger,
            shutdown_timeout=1.0,
            # aiohttp closes a connection that has not completed a request within this (from
            # accept, and between keep-alive requests): the handshake deadline. Upgraded
            # WebSockets are not affected (their request is in progress).
            keepalive_timeout=self.settings.handshake_timeout,
        )
        await runner.setup()
        # create_server listens again: without this, aiohttp's default of 128 would replace
        # the supervisor's deep queue, and a reconnect storm would overflow it (SYNs dropped
        # and retried after 1 s, 3 s, 7 s: seconds of connect time for nothing).
        site = web.SockSite(runner, self.spec.sock, backlog=LISTEN_BACKLOG)
        await site.start()
        node.spawn(keep_alive(node.connections, self.settings.ws_heartbeat))
        try:
            joined = await self._enter_ring(node)
        except SlotTaken:
            await runner.cleanup()
            await node.close()
            return self._fail(
                f"slot {self.slot} is held by another live host: is --node-id "
                f"{self.settings.node_id} used twice?"
            )
        if joined:
            node.spawn(node.maintain())
            node.spawn(node.checkpoint_forever())
            drain = await broker.get_fields(keys.drain(self.settings.node_id, self.spec.instance))
            if "active" in drain:
                self._on_control(state, b"drain")
            self._report(b"ready")
            log.info("worker %s serving as slot %s", self.label, self.slot)

        await self.stop.wait()
        log.info("worker %s stopping", self.label)
        state.drain_generation += 1  # a host drain in progress gives way to this one
        # Stop accepting first: the slot's socket stays open in the supervisor (and in a
        # replacement), so connections keep queueing there instead of being refused.
        await site.stop()
        await _settle_accepted(runner, state)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(1.0, self.settings.shutdown_timeout - 2.0)):
                await drain_connections(state, host=False)
        if joined:  # a replacement stopped before it joined holds nothing: the slot is not its to drop
            await node.leave_ring()
        await runner.cleanup()
        await node.close()
        metrics.flush_batched()  # what the last tenth of a second counted
        return 0

    def _report(self, line: bytes) -> None:
        """One line to the supervisor; if its pipe is full the supervisor is stuck, not us."""
        with contextlib.suppress(BlockingIOError, BrokenPipeError):
            os.write(self.spec.report_fd, line + b"\n")

    def _report_alive(self) -> None:
        """A timer, not a task: it fires only while the event loop turns."""
        self._report(b"alive")
        every = min(_ALIVE_EVERY, self.settings.worker_timeout / 4)
        asyncio.get_running_loop().call_later(every, self._report_alive)

    def _fail(self, reason: str) -> int:
        """Tell the supervisor why this worker cannot start; it says so once, and exits 2."""
        self._report(b"fail " + reason.replace("\n", " ").encode())
        return ExitStatus.CONFIG

    async def _enter_ring(self, node: Node) -> bool:
        """Join the ring, on a rolling restart once told to; False if told to stop first."""
        await node.heartbeat()
        if not self.join_ring.is_set():
            self._report(b"listening")
            told = [asyncio.ensure_future(event.wait()) for event in (self.join_ring, self.stop)]
            await asyncio.wait(told, return_when=asyncio.FIRST_COMPLETED)
            for waiter in told:
                waiter.cancel()
            if self.stop.is_set():
                return False
        await node.join_ring()
        # Siblings still booting: ready means they are in our view. Told to stop meanwhile, a
        # sibling may already have left the ring for good: waiting for it would never end.
        while not self.stop.is_set() and not set(self.settings.local_slots) <= set(node.ring.slots):
            await asyncio.sleep(0.05)
            await node.heartbeat()
        return True

    def _on_control(self, state: WorkerState, command: bytes) -> None:
        """A host drain starts unless one runs; undrain stops it between two batches."""
        if command == b"drain" and not (state.draining and state.drain_task and not state.drain_task.done()):
            state.draining = True
            state.drain_generation += 1
            state.drain_task = asyncio.get_running_loop().create_task(drain_connections(state, host=True))
        elif command == b"undrain":
            state.draining = False
            state.drain_generation += 1
        elif command.startswith(b"api") and state.api is not None:
            state.api.on_control(command)


async def _settle_accepted(runner: web.AppRunner, state: WorkerState, limit: float = 1.0) -> None:
    """Give requests accepted just before the listener closed time to become sockets.

    Connections the kernel handed over while the listener was still open may still be
    parsing their upgrade; the drain then migrates them instead of the shutdown cutting
    them. Bounded: an idle keep-alive HTTP connection would otherwise hold it.
    """
    server = runner.server
    deadline = time.monotonic() + limit
    while server is not None and time.monotonic() < deadline:
        if len(server.connections) <= sum(1 for c in state.node.connections if c.welcomed):
            return
        await asyncio.sleep(0.02)


async def drain_connections(state: WorkerState, *, host: bool) -> None:
    """Migrate every connection: `migrating` status, session checkpoint, close 1001, paced.

    A `host` drain (POST /admin/drain) refuses new upgrades (503, set by the caller),
    reports its progress, and stops between two batches when it is undone or superseded
    (the generation moved on). A worker that stops has stopped listening instead, and
    migrates the upgrades still in flight too.
    """
    settings = state.settings
    node = state.node
    generation = state.drain_generation
    metrics.DRAINS.labels(state.worker).inc()
    started = time.monotonic()
    migrated = failed = 0
    key = keys.drain(settings.node_id, node.instance)
    log.info("draining %d connections", len(node.connections))

    def reporting() -> bool:
        return host and state.drain_generation == generation

    while not host or reporting():
        pending = sorted((c for c in node.connections if c.welcomed and not c.closing), key=lambda c: c.id)
        if not pending:
            if not state.opening:
                break
            await asyncio.sleep(0.01)  # upgrades in flight: migrate them once greeted
            continue
        batch = pending[: settings.drain_batch]
        for conn in batch:
            conn.send(
                encode(
                    "status",
                    status="migrating",
                    details={
                        "new_endpoint": settings.public_url,
                        "reconnect_after": random.randint(100, 2000),
                        "session": conn.session,
                    },
                )
            )
            conn.closing = True  # nothing more is written: the checkpoint is exact
        with contextlib.suppress(Exception):
            await node.save_final(batch)
        results = await asyncio.gather(*(_close(conn) for conn in batch))
        migrated += sum(results)
        failed += len(results) - sum(results)
        if reporting():
            await _report_drain(state, key, migrated, failed, started, done=False)
        if len(pending) > len(batch):
            await asyncio.sleep(settings.drain_interval)
    metrics.MIGRATED.labels("migrated").inc(migrated)
    metrics.MIGRATED.labels("failed").inc(failed)
    if host and not reporting():
        log.info("drain stopped: %d migrated, %d failed", migrated, failed)
        return
    if host:
        await _report_drain(state, key, migrated, failed, started, done=True)
    log.info("drain done: %d migrated, %d failed in %.2fs", migrated, failed, time.monotonic() - started)


async def _close(conn: Connection) -> bool:
    try:
        async with asyncio.timeout(_CLOSE_TIMEOUT):
            await conn.ws.close(code=CloseCode.GOING_AWAY, message=b"draining")
        return True
    except (TimeoutError, ConnectionError):
        conn.transport.abort()
        return False


async def _report_drain(
    state: WorkerState, key: str, migrated: int, failed: int, started: float, *, done: bool
) -> None:
    report = {
        "migrated": migrated,
        "failed": failed,
        "done": done,
        "seconds": round(time.monotonic() - started, 3),
    }
    with contextlib.suppress(Exception):
        await state.broker.set_fields(key, {f"w:{state.worker}": orjson.dumps(report).decode()}, 86400)
