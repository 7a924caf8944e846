"""The pre-fork supervisor: one process, one thread, one `selectors` loop, no Redis.

It owns the listening sockets (one `SO_REUSEPORT` socket per worker slot, created before
any fork, so a dying worker never resets connections queued on its slot), the runtime
directory, the embedded Redis and the host's metrics port. Signal handlers only record
the signal; the loop acts on it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import secrets
import selectors
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rtc.config import Settings
from rtc.embedded_redis import EmbeddedRedis
from rtc.errors import ConfigError
from rtc.fleet import Effect, Exit, Fleet, Join, Kill, Log, Notify, Phase, Spawn, Terminate
from rtc.hostcount import HostConnections
from rtc.lifeline import die_with_parent
from rtc.metrics_port import MetricsPort
from rtc.runtimedir import claim
from rtc.sdnotify import Notifier

if TYPE_CHECKING:
    from rtc.worker import WorkerSpec

__all__ = ["Supervisor"]

log = logging.getLogger("rtc.supervisor")


WorkerTarget = Callable[["WorkerSpec"], int]


@dataclass(slots=True)
class _Child:
    """One worker process: the fleet's id for it, and what it reported on its pipe."""

    id: int
    slot: int
    pid: int
    report: int  # read end of the worker's report pipe
    failure: str = ""  # why it could not start, as it reported
    buffer: bytes = b""
    code: int | None = None  # its exit status, once reaped


@dataclass
class Supervisor:
    settings: Settings
    target: WorkerTarget | None = None
    instance: str = field(default_factory=lambda: secrets.token_hex(8))

    def __post_init__(self) -> None:
        self._signals: list[int] = []
        self._children: dict[int, _Child] = {}  # fleet id -> child
        self._exited: _Child | None = None  # the child being reaped, for the fleet's log lines
        self._fleet = Fleet(
            self.settings.workers, self.settings.shutdown_timeout, self.settings.worker_timeout
        )
        self._sockets: list[socket.socket] = []
        self._selector = selectors.DefaultSelector()
        self._notifier = Notifier(self.settings.notify_socket)
        self._redis: EmbeddedRedis | None = None
        self._runtime: Path | None = None
        self._own_runtime = False
        self._metrics: MetricsPort | None = None
        self._booted = False
        self._exit: int | None = None
        self._wakeup_r = self._wakeup_w = -1
        self._next_status = 0.0
        self._roll_step: tuple[int | None, int] | None = None  # last reload step shown
        self._reload_started: float | None = None
        self._last_reload = ""  # shown after a reload, which may be over before anyone looks
        self._next_watchdog = 0.0

    # -- start ------------------------------------------------------------------------------

    def run(self) -> int:
        """Start everything, supervise until stopped; returns the exit status."""
        try:
            self._prepare()
            return self._loop()
        finally:
            self._cleanup()

    def _prepare(self) -> None:
        _raise_nofile()
        self._runtime = self._runtime_dir()
        metrics_dir = self._runtime / "metrics"
        metrics_dir.mkdir(exist_ok=True)
        for stale in metrics_dir.glob("*.db"):
            stale.unlink()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        self._probe_port()
        from rtc.worker import LISTEN_BACKLOG, run_worker  # imports prometheus_client: only now

        self._sockets = [self._listen(LISTEN_BACKLOG) for _ in range(self.settings.workers)]
        self._connections = HostConnections(self.settings.workers)
        if self.settings.embedded_redis:
            self._redis = EmbeddedRedis(self._runtime, self.settings.redis_maxmemory)
            self._redis.start()
        self.settings = self.settings.with_changes(
            runtime_dir=str(self._runtime),
            redis_url=self.settings.redis_url or (self._redis.url if self._redis else None),
        )
        if self.settings.metrics_port:
            self._metrics = MetricsPort(
                self._bind_metrics(), self._selector, _metrics_exposition, time.monotonic
            )
        self._wakeup_r, self._wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wakeup_w, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, self._record_signal)
        self._selector.register(self._wakeup_r, selectors.EVENT_READ, "signal")
        if self.target is None:
            self.target = run_worker
        self._apply(self._fleet.start(time.monotonic()))

    def _runtime_dir(self) -> Path:
        """Ours alone and locked for this host's life (the lock's descriptor stays open)."""
        if self.settings.runtime_dir:
            path = Path(self.settings.runtime_dir)
            try:
                path.mkdir(parents=True, exist_ok=True, mode=0o700)
                self._runtime_lock = claim(path)
            except OSError as exc:
                raise ConfigError(f"--runtime-dir: cannot use {path}: {exc.strerror}") from None
            return path
        self._own_runtime = True
        path = Path(tempfile.mkdtemp(prefix="rtc-"))
        self._runtime_lock = claim(path)
        return path

    def _probe_port(self) -> None:
        """A plain bind (no SO_REUSEPORT) fails if any other program holds the port."""
        with socket.socket(_family(self.settings.host), socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((self.settings.host, self.settings.port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise ConfigError(f"--port {self.settings.port}: address already in use") from None
                raise ConfigError(f"--host {self.settings.host}: {exc.strerror}") from None

    def _listen(self, backlog: int) -> socket.socket:
        """The same depth as the worker asks for when it listens again on this socket."""
        sock = socket.socket(_family(self.settings.host), socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((self.settings.host, self.settings.port))
        sock.listen(backlog)
        sock.set_inheritable(True)
        return sock

    def _bind_metrics(self) -> socket.socket:
        sock = socket.socket(_family(self.settings.host), socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.settings.host, self.settings.metrics_port))
        except OSError as exc:
            sock.close()
            raise ConfigError(f"--metrics-port {self.settings.metrics_port}: {exc.strerror}") from None
        sock.listen(64)
        sock.setblocking(False)
        return sock

    # -- workers ------------------------------------------------------------------------------

    def _spawn(self, worker: int, slot: int, *, join_ring_now: bool) -> None:
        from rtc.worker import WorkerSpec

        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        spec = WorkerSpec(
            self.settings,
            slot,
            self._sockets[slot],
            self.instance,
            join_ring_now,
            write_end,
            self._connections,
        )
        pid = os.fork()
        if pid == 0:  # the worker
            status = 1
            try:
                self._become_worker(slot, read_end)
                assert self.target is not None
                status = self.target(spec)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(status)
        os.close(write_end)
        os.set_blocking(read_end, False)
        child = _Child(worker, slot, pid, read_end)
        self._children[worker] = child
        self._selector.register(read_end, selectors.EVENT_READ, child)

    def _become_worker(self, slot: int, own_report: int) -> None:
        """In the child: drop the supervisor's descriptors, die with the supervisor."""
        die_with_parent(signal.SIGTERM)
        os.close(own_report)
        self._selector.close()
        for fd in (self._wakeup_r, self._wakeup_w):
            os.close(fd)
        for child in self._children.values():
            os.close(child.report)
        if self._metrics is not None:
            self._metrics.forget()
        for index, sock in enumerate(self._sockets):
            if index != slot:
                sock.close()

    def _on_report(self, child: _Child) -> None:
        """Lines from a worker's pipe: `listening`, `ready`, `alive`, `fail <why>`."""
        try:
            data = os.read(child.report, 4096)
        except BlockingIOError:
            return
        if not data:
            with contextlib.suppress(KeyError):
                self._selector.unregister(child.report)
            return
        child.buffer += data
        *lines, child.buffer = child.buffer.split(b"\n")
        now = time.monotonic()
        for line in lines:
            if line == b"alive":
                self._apply(self._fleet.alive(child.id, now))
            elif line == b"listening":
                self._apply(self._fleet.listening(child.id, now))
            elif line == b"ready":
                self._apply(self._fleet.ready(child.id, now))
            elif line.startswith(b"fail "):
                child.failure = line[5:].decode(errors="replace")

    def _reap(self) -> None:
        """Collect dead workers and tell the fleet."""
        for child in list(self._children.values()):
            try:
                done, status = os.waitpid(child.pid, os.WNOHANG)
            except ChildProcessError:
                done, status = child.pid, 0
            if done == 0:
                continue
            self._on_report(child)  # what it said last, e.g. why it could not start
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(child.report)
            os.close(child.report)
            # Gone from the table before the fleet's effects run: a replacement spawned by
            # them must not close this descriptor number again (the new pipe may reuse it).
            del self._children[child.id]
            self._exited = child
            self._mark_dead(child.pid)
            child.code = os.waitstatus_to_exitcode(status)
            log.debug("worker %d (pid %d) exited %d", child.slot, child.pid, child.code)
            self._apply(self._fleet.exited(child.id, child.code, time.monotonic()))
            self._exited = None

    def _mark_dead(self, pid: int) -> None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]

    def _apply(self, effects: list[Effect]) -> None:
        """Carry out what the fleet decided."""
        for effect in effects:
            match effect:
                case Spawn(worker, slot, join_ring, restart):
                    self._spawn(worker, slot, join_ring_now=join_ring)
                    if restart:
                        from rtc import metrics

                        metrics.WORKER_RESTARTS.inc()
                case Terminate(worker):
                    self._signal(worker, signal.SIGTERM)
                case Kill(worker):
                    self._signal(worker, signal.SIGKILL)
                case Join(worker):
                    self._signal(worker, signal.SIGUSR1)  # join the ring now
                case Notify(state):
                    self._notify(state)
                case Log(level, message, worker):
                    child = self._children.get(worker) if worker is not None else None
                    if child is None and self._exited is not None and self._exited.id == worker:
                        child = self._exited
                    if child is not None:
                        why = f": {child.failure}" if child.failure else ""
                        message = f"{message} (pid {child.pid}{why})"
                    log.log(level, "%s", message)
                case Exit(status, failed):
                    failed_child = self._children.get(failed) if failed is not None else None
                    if failed is not None and failed_child is None:
                        failed_child = self._exited  # reaped just now: out of the table
                    if failed_child is not None:  # the first boot failed: one clear line
                        child = failed_child
                        reason = child.failure or f"worker {child.slot} failed to start (exit {child.code})"
                        print(f"rtc: {reason}", file=sys.stderr, flush=True)
                    self._exit = status

    def _signal(self, worker: int, signum: int) -> None:
        child = self._children.get(worker)
        if child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signum)

    def _notify(self, state: str) -> None:
        if state == "READY":
            if self._reload_started is not None:
                took = time.monotonic() - self._reload_started
                self._last_reload = f"; last reload replaced {self.settings.workers} workers in {took:.1f}s"
                self._reload_started = None
            self._notifier.notify("READY=1", self._status_line())
            if not self._booted:
                self._booted = True
                log.info(
                    "rtc %s serving on %s:%d with %d workers (runtime %s, redis %s)",
                    self.settings.node_id,
                    self.settings.host,
                    self.settings.port,
                    self.settings.workers,
                    self._runtime,
                    "embedded" if self._redis else "external",
                )
        elif state == "RELOADING":
            self._reload_started = time.monotonic()
            self._notifier.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        else:
            log.info("draining workers")
            self._notifier.notify(f"{state}=1")

    # -- loop ----------------------------------------------------------------------------------------

    def _record_signal(self, signum: int, _frame: object) -> None:
        self._signals.append(signum)

    def _loop(self) -> int:
        while self._exit is None:
            for key, mask in self._selector.select(timeout=0.25):
                if key.data == "signal":
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wakeup_r, 512)
                elif isinstance(key.data, _Child):
                    self._on_report(key.data)
                else:
                    key.data(mask)  # the metrics port
            if self._metrics is not None:
                self._metrics.expire()
            signals, self._signals = self._signals, []
            for signum in signals:
                if signum in (signal.SIGTERM, signal.SIGINT):
                    log.info("%s received", signal.Signals(signum).name)
                    self._apply(self._fleet.stop(time.monotonic()))
                elif signum == signal.SIGHUP:
                    self._apply(self._fleet.hup(time.monotonic()))
            self._reap()
            if self._exit is not None:
                break
            self._apply(self._fleet.tick(time.monotonic()))
            if self._redis is not None and self._redis.died() and self._fleet.phase is not Phase.STOPPING:
                log.error("embedded redis-server died; restarting it (history is lost)")
                self._redis.restart()
            self._heartbeat_systemd()
        return self._exit

    def _heartbeat_systemd(self) -> None:
        if not self._notifier.enabled:
            return
        now = time.monotonic()
        if self.settings.watchdog_usec and now >= self._next_watchdog:
            self._notifier.notify("WATCHDOG=1")
            self._next_watchdog = now + self.settings.watchdog_usec / 2e6
        if not self._booted:
            return
        # Every 5 s; during a reload also at each step, so a short one shows its progress too.
        step = (self._fleet.roll_position(), self._fleet.ready_count()) if self._fleet.rolling else None
        if now >= self._next_status or step != self._roll_step:
            self._roll_step = step
            self._notifier.notify(self._status_line())
            self._next_status = now + 5.0

    def _status_line(self) -> str:
        from rtc import hostmetrics

        ready = self._fleet.ready_count()
        active = hostmetrics.snapshot()["active_connections"]
        position = self._fleet.roll_position()
        if position is not None:
            return (
                f"STATUS=reloading: replacing worker {max(position, 1)}/{self.settings.workers}, "
                f"{ready} ready, {active} connections"
            )
        return (
            f"STATUS={ready}/{self.settings.workers} workers ready, {active} connections{self._last_reload}"
        )

    def _cleanup(self) -> None:
        if self._children:  # a failed boot or an exception: stop what is left, bounded
            self._fleet.abandon()
            for child in self._children.values():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGTERM)
            end = time.monotonic() + self.settings.shutdown_timeout
            while self._children and time.monotonic() < end:
                self._reap()
                time.sleep(0.05)
            for child in self._children.values():
                log.warning("worker %d (pid %d) did not stop in time: killed", child.slot, child.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(child.pid, 0)
                self._mark_dead(child.pid)
            self._children.clear()
        if self._redis is not None:
            self._redis.stop()
        for sock in self._sockets:
            sock.close()
        if self._metrics is not None:
            self._metrics.close()
        if self._own_runtime and self._runtime is not None:
            shutil.rmtree(self._runtime, ignore_errors=True)


def _metrics_exposition(accept: str) -> tuple[bytes, str]:
    from rtc import hostmetrics  # imports prometheus_client: only once its directory is set

    return hostmetrics.exposition(accept)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _raise_nofile() -> None:
    """Every socket is a descriptor: take all the kernel allows this process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
