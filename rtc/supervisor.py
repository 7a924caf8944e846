"""The pre-fork supervisor: one process, one thread, one `selectors` loop, no Redis.

It owns the listening sockets (one `SO_REUSEPORT` socket per worker slot, created before
any fork, so a dying worker never resets connections queued on its slot), the runtime
directory, the embedded Redis and the host's metrics port. Signal handlers only record
the signal; the loop acts on it.
"""

from __future__ import annotations

import contextlib
import ctypes
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
from rtc.hostcount import HostConnections
from rtc.runtimedir import claim
from rtc.sdnotify import Notifier

if TYPE_CHECKING:
    from rtc.worker import WorkerSpec

__all__ = ["EXIT_BOOT_FAILED", "Supervisor"]

log = logging.getLogger("rtc.supervisor")

EXIT_BOOT_FAILED = 3
_EXIT_CONFIG = 2
_LISTEN_BACKLOG = 4096
_ROLL_STEP_TIMEOUT = 60.0
_BACKOFF_CAP = 30.0
_STABLE_AFTER = 60.0  # a worker that lived this long resets the restart backoff
_PR_SET_PDEATHSIG = 1

WorkerTarget = Callable[["WorkerSpec"], int]


@dataclass(slots=True)
class _Child:
    """One worker process and what the supervisor knows of it."""

    slot: int
    pid: int
    report: int  # read end of the worker's report pipe
    started: float
    listening: bool = False
    ready: bool = False
    retiring: bool = False
    failure: str = ""  # why it could not start, as it reported
    buffer: bytes = b""


@dataclass(slots=True)
class _Roll:
    """A rolling restart in progress: slots still to replace, and the current step."""

    pending: list[int]
    replacement: _Child | None = None
    old: _Child | None = None
    step_started: float = 0.0


@dataclass(slots=True)
class _SlotState:
    failures: int = 0
    restart_at: float = 0.0


@dataclass
class Supervisor:
    settings: Settings
    target: WorkerTarget | None = None
    instance: str = field(default_factory=lambda: secrets.token_hex(8))

    def __post_init__(self) -> None:
        self._signals: list[int] = []
        self._children: dict[int, _Child] = {}  # pid -> child
        self._slots: dict[int, _SlotState] = {}
        self._sockets: list[socket.socket] = []
        self._selector = selectors.DefaultSelector()
        self._notifier = Notifier(self.settings.notify_socket)
        self._redis: EmbeddedRedis | None = None
        self._runtime: Path | None = None
        self._own_runtime = False
        self._metrics_sock: socket.socket | None = None
        self._booted = False
        self._stopping = False
        self._roll: _Roll | None = None
        self._wakeup_r = self._wakeup_w = -1
        self._next_status = 0.0
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
        self._sockets = [self._listen() for _ in range(self.settings.workers)]
        self._connections = HostConnections(self.settings.workers)
        if self.settings.embedded_redis:
            self._redis = EmbeddedRedis(self._runtime, self.settings.redis_maxmemory)
            self._redis.start()
        self.settings = self.settings.with_changes(
            runtime_dir=str(self._runtime),
            redis_url=self.settings.redis_url or (self._redis.url if self._redis else None),
        )
        if self.settings.metrics_port:
            self._metrics_sock = self._bind_metrics()
            self._selector.register(self._metrics_sock, selectors.EVENT_READ, "metrics")
        self._wakeup_r, self._wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wakeup_w, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, self._record_signal)
        self._selector.register(self._wakeup_r, selectors.EVENT_READ, "signal")
        if self.target is None:
            from rtc.worker import run_worker  # imports prometheus_client: only now

            self.target = run_worker
        for slot in range(self.settings.workers):
            self._slots[slot] = _SlotState()
            self._spawn(slot, join_ring_now=True)

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

    def _listen(self) -> socket.socket:
        sock = socket.socket(_family(self.settings.host), socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((self.settings.host, self.settings.port))
        sock.listen(_LISTEN_BACKLOG)
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

    def _spawn(self, slot: int, *, join_ring_now: bool) -> _Child:
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
        child = _Child(slot, pid, read_end, time.monotonic())
        self._children[pid] = child
        self._selector.register(read_end, selectors.EVENT_READ, child)
        return child

    def _become_worker(self, slot: int, own_report: int) -> None:
        """In the child: drop the supervisor's descriptors, die with the supervisor."""
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        os.close(own_report)
        self._selector.close()
        for fd in (self._wakeup_r, self._wakeup_w):
            os.close(fd)
        for child in self._children.values():
            os.close(child.report)
        if self._metrics_sock is not None:
            self._metrics_sock.close()
        for index, sock in enumerate(self._sockets):
            if index != slot:
                sock.close()

    def _on_report(self, child: _Child) -> None:
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
        for line in lines:
            if line == b"listening":
                child.listening = True
            elif line == b"ready":
                child.listening = child.ready = True
            elif line.startswith(b"fail "):
                child.failure = line[5:].decode(errors="replace")
        if not self._booted and self._all_ready():
            self._booted = True
            self._notifier.notify("READY=1", self._status_line())
            log.info(
                "rtc %s serving on %s:%d with %d workers (runtime %s, redis %s)",
                self.settings.node_id,
                self.settings.host,
                self.settings.port,
                self.settings.workers,
                self._runtime,
                "embedded" if self._redis else "external",
            )

    def _all_ready(self) -> bool:
        ready = {c.slot for c in self._children.values() if c.ready and not c.retiring}
        return ready == set(range(self.settings.workers))

    def _reap(self) -> int | None:
        """Collect dead workers. Returns an exit status when the supervisor must halt."""
        for pid, child in list(self._children.items()):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done == 0:
                continue
            code = os.waitstatus_to_exitcode(status)
            del self._children[pid]
            self._on_report(child)  # what it said last, e.g. why it could not start
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(child.report)
            os.close(child.report)
            self._mark_dead(pid)
            if self._stopping or child.retiring:
                log.debug("worker %d (pid %d) exited %d", child.slot, pid, code)
                self._on_retired(child)
                continue
            if not self._booted:
                # The first boot failed: one clear line, no crash loop.
                reason = child.failure or f"worker {child.slot} failed to start (exit {code})"
                print(f"rtc: {reason}", file=sys.stderr, flush=True)
                return _EXIT_CONFIG if code == _EXIT_CONFIG else EXIT_BOOT_FAILED
            self._schedule_restart(child, code)
        return None

    def _mark_dead(self, pid: int) -> None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]

    def _schedule_restart(self, child: _Child, code: int) -> None:
        state = self._slots[child.slot]
        lived = time.monotonic() - child.started
        state.failures = 1 if lived > _STABLE_AFTER else state.failures + 1
        delay = 0.0 if state.failures == 1 else min(_BACKOFF_CAP, 0.5 * 2 ** (state.failures - 2))
        state.restart_at = time.monotonic() + delay
        log.warning(
            "worker %d (pid %d) died (exit %d); restarting in %.1fs", child.slot, child.pid, code, delay
        )
        from rtc import metrics

        metrics.WORKER_RESTARTS.inc()
        if self._roll is not None and self._roll.replacement is child:
            self._roll.replacement = None  # the roll step restarts the slot itself

    def _restart_due(self) -> None:
        now = time.monotonic()
        alive = {c.slot for c in self._children.values() if not c.retiring}
        for slot, state in self._slots.items():
            if slot not in alive and state.restart_at and now >= state.restart_at:
                state.restart_at = 0.0
                self._spawn(slot, join_ring_now=True)

    # -- rolling restart --------------------------------------------------------------------------

    def _start_roll(self) -> None:
        if self._roll is not None:
            log.info("SIGHUP during a rolling restart: the restart continues")
            return
        log.info("rolling restart of %d workers", self.settings.workers)
        self._notifier.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        self._roll = _Roll(pending=list(range(self.settings.workers)))

    def _advance_roll(self) -> None:
        """One slot at a time: replacement listening, then the old one drains and leaves,
        then the replacement joins the ring."""
        roll = self._roll
        if roll is None:
            return
        now = time.monotonic()
        if roll.replacement is None:
            if roll.old is not None:
                return  # waiting for the old worker to exit
            if not roll.pending:
                self._roll = None
                self._notifier.notify("READY=1", self._status_line())
                log.info("rolling restart done")
                return
            slot = roll.pending.pop(0)
            roll.old = next((c for c in self._children.values() if c.slot == slot and not c.retiring), None)
            roll.replacement = self._spawn(slot, join_ring_now=roll.old is None)
            roll.step_started = now
            return
        if roll.old is not None and not roll.old.retiring and roll.replacement.listening:
            roll.old.retiring = True
            os.kill(roll.old.pid, signal.SIGTERM)
        elif roll.old is None and roll.replacement.ready:
            roll.replacement = None
        elif now - roll.step_started > _ROLL_STEP_TIMEOUT:
            log.error("rolling restart of slot %d timed out", roll.replacement.slot)
            roll.replacement = None

    def _on_retired(self, child: _Child) -> None:
        roll = self._roll
        if roll is not None and roll.old is child:
            roll.old = None
            if roll.replacement is not None and roll.replacement.pid in self._children:
                os.kill(roll.replacement.pid, signal.SIGUSR1)  # join the ring now

    # -- loop ----------------------------------------------------------------------------------------

    def _record_signal(self, signum: int, _frame: object) -> None:
        self._signals.append(signum)

    def _loop(self) -> int:
        deadline = 0.0
        while True:
            for key, _ in self._selector.select(timeout=0.25):
                if key.data == "signal":
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wakeup_r, 512)
                elif key.data == "metrics":
                    self._serve_metrics()
                else:
                    self._on_report(key.data)
            signals, self._signals = self._signals, []
            for signum in signals:
                if signum in (signal.SIGTERM, signal.SIGINT) and not self._stopping:
                    deadline = self._begin_stop(signum)
                elif signum == signal.SIGHUP and not self._stopping:
                    self._start_roll()
            halt = self._reap()
            if halt is not None:
                return halt
            if self._stopping:
                if not self._children:
                    log.info("stopped")
                    return 0
                if time.monotonic() > deadline:
                    self._kill_remaining()
                    return 0
                continue
            if self._redis is not None and self._redis.died():
                log.error("embedded redis-server died; restarting it (history is lost)")
                self._redis.restart()
            self._restart_due()
            self._advance_roll()
            self._heartbeat_systemd()

    def _begin_stop(self, signum: int) -> float:
        log.info("%s: draining workers", signal.Signals(signum).name)
        self._stopping = True
        self._notifier.notify("STOPPING=1")
        for child in self._children.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGTERM)
        return time.monotonic() + self.settings.shutdown_timeout

    def _kill_remaining(self) -> None:
        for pid in list(self._children):
            log.warning("worker pid %d did not stop in time: killed", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            self._mark_dead(pid)
        self._children.clear()

    def _heartbeat_systemd(self) -> None:
        if not self._notifier.enabled:
            return
        now = time.monotonic()
        if self.settings.watchdog_usec and now >= self._next_watchdog:
            self._notifier.notify("WATCHDOG=1")
            self._next_watchdog = now + self.settings.watchdog_usec / 2e6
        if self._booted and now >= self._next_status:
            self._notifier.notify(self._status_line())
            self._next_status = now + 5.0

    def _status_line(self) -> str:
        from rtc import hostmetrics

        ready = sum(1 for c in self._children.values() if c.ready and not c.retiring)
        active = hostmetrics.snapshot()["active_connections"]
        return f"STATUS={ready}/{self.settings.workers} workers ready, {active} connections"

    def _serve_metrics(self) -> None:
        """One short blocking exchange per scrape: the supervisor has nothing else to wait on."""
        assert self._metrics_sock is not None
        try:
            conn, _ = self._metrics_sock.accept()
        except BlockingIOError:
            return
        from rtc import hostmetrics

        with conn:
            conn.settimeout(1.0)
            try:
                request = conn.recv(8192)
                if not request.startswith(b"GET "):
                    conn.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
                    return
                body = hostmetrics.prometheus_text()
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; "
                    b"charset=utf-8\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body
                )
            except OSError:
                pass

    def _cleanup(self) -> None:
        if self._children:
            self._stopping = True
            for child in self._children.values():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGTERM)
            end = time.monotonic() + self.settings.shutdown_timeout
            while self._children and time.monotonic() < end:
                self._reap()
                time.sleep(0.05)
            self._kill_remaining()
        if self._redis is not None:
            self._redis.stop()
        for sock in self._sockets:
            sock.close()
        if self._metrics_sock is not None:
            self._metrics_sock.close()
        if self._own_runtime and self._runtime is not None:
            shutil.rmtree(self._runtime, ignore_errors=True)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _raise_nofile() -> None:
    """Every socket is a descriptor: take all the kernel allows this process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
