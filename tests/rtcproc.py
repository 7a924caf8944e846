"""Real processes for tests: redis-server and `rtc serve` hosts on free loopback ports."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt

from bench.loadgen.probe import redis_commandstats
from rtc.metrics import FLUSH_EVERY

SECRET = "rtc-test-secret-0123456789abcdef0123"
RTC = [sys.executable, "-m", "rtc"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Distinct free ports: each socket stays bound until all are picked."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def token(user: str, ttl: int = 3600, **claims: object) -> str:
    now = int(time.time())
    return jwt.encode({"sub": user, "iat": now, "exp": now + ttl, **claims}, SECRET, "HS256")


def stop_process(process: subprocess.Popen[bytes], timeout: float = 10) -> int:
    """Stop a child we started, by its PID: SIGTERM, then SIGKILL if it overstays."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


Description = str | Callable[[], str]


def _timed_out(timeout: float, what: Description) -> TimeoutError:
    """What never happened; a callable `what` is read now, to show the state still wrong."""
    return TimeoutError(f"timed out after {timeout}s waiting for {what() if callable(what) else what}")


def wait_for(predicate, timeout: float, what: Description, interval: float = 0.05):  # type: ignore[no-untyped-def]
    """Poll an external process's state (no event to await across processes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise _timed_out(timeout, what)


async def metrics_written() -> None:
    """Hot metrics reach a scrape within `FLUSH_EVERY` of the event (a timer in each
    worker, with nothing to await from outside): the documented lag, waited out twice.

    For a snapshot taken before traffic, a check that something did not happen, or a scrape
    whose many values come from several workers' timers; a test that expects one value
    polls for it with `until` instead."""
    await asyncio.sleep(2 * FLUSH_EVERY)


async def until(
    predicate: Callable[[], object], timeout: float, what: Description, interval: float = 0.05
) -> Any:
    """`wait_for` on the event loop: the clients' readers keep reading while it polls.

    The predicate may return an awaitable (a Redis read), awaited before it is judged.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(interval)
    raise _timed_out(timeout, what)


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen[bytes]
    dir: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def cli(self, *args: str) -> str:
        return subprocess.run(
            ["redis-cli", "-p", str(self.port), *args], check=True, capture_output=True, text=True
        ).stdout

    def calls(self) -> dict[str, int]:
        """Calls per command the server has run (INFO commandstats), as the bench reads them."""
        return redis_commandstats([self.url])[self.url]

    def stop(self) -> None:
        stop_process(self.process)
        shutil.rmtree(self.dir, ignore_errors=True)


def start_redis(*extra: str, port: int | None = None, directory: Path | None = None) -> RedisServer:
    """A redis-server on a free port; a port and directory given restart one there."""
    port = port or free_port()
    directory = directory or Path(tempfile.mkdtemp(prefix="rtc-redis-"))
    process = subprocess.Popen(
        [
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
            "--loglevel",
            "warning",
            *extra,
        ],
        stdout=subprocess.DEVNULL,
    )
    server = RedisServer(port, process, directory)
    try:
        wait_for(lambda: _redis_ping(port) or process.poll() is not None, 10, "redis-server")
        if process.poll() is not None:
            raise RuntimeError(f"redis-server on port {port} exited {process.returncode}")
    except BaseException:  # no half-started server left to whichever test runs next
        server.stop()
        raise
    return server


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _limit_nofile(limit: int) -> None:
    """Runs in the child before exec: a hard limit the supervisor cannot raise."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


@dataclass
class Host:
    """One `rtc serve` supervisor with its workers."""

    node_id: str
    port: int
    metrics_port: int
    process: subprocess.Popen[bytes]
    runtime_dir: Path
    log_path: Path
    host: str = "127.0.0.1"
    workers: int = 2
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def http(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://{self.host}:{self.port}/ws"

    def get(
        self, path: str, headers: dict[str, str] | None = None, port: int | None = None
    ) -> tuple[int, bytes]:
        url = f"http://{self.host}:{port or self.port}{path}"
        request = urllib.request.Request(url, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def request(self, method: str, path: str) -> tuple[int, bytes]:
        request = urllib.request.Request(self.http + path, method=method)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def active_connections(self) -> int:
        """Open WebSocket connections, all workers together (the /metrics summary)."""
        return int(json.loads(self.get("/metrics")[1])["active_connections"])

    def drain_report(self) -> dict[str, Any]:
        status, body = self.get("/admin/drain")
        assert status == 200, body
        return dict(json.loads(body))

    def drained(self) -> dict[str, Any] | None:
        """The drain report once the drain is done and no connection is left, else None."""
        report = self.drain_report()
        return report if report["done"] and report["active_connections"] == 0 else None

    def healthy(self) -> bool:
        try:
            return self.get("/health")[0] == 200
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_pids(self) -> list[int]:
        """The supervisor's worker processes (a worker exiting meanwhile is left out)."""
        import psutil

        pids = []
        for child in psutil.Process(self.process.pid).children():
            try:
                if child.name() != "redis-server":
                    pids.append(child.pid)
            except (psutil.NoSuchProcess, FileNotFoundError):
                continue  # it exited between the listing and the look
        return sorted(pids)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self, timeout: float = 30) -> int:
        return stop_process(self.process, timeout)


def start_host(
    node_id: str,
    redis_url: str | None,
    *,
    workers: int = 2,
    host: str = "127.0.0.1",
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    wait: bool = True,
    nofile: int | None = None,
) -> Host:
    """Start `rtc serve` on free ports; `nofile` caps its descriptor limit (soft and hard)."""
    port, metrics_port = free_ports(2, host)
    runtime = Path(tempfile.mkdtemp(prefix="rtc-"))
    log_path = runtime.parent / (runtime.name + ".log")
    command = [
        *RTC,
        "serve",
        "--host",
        host,
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        "--workers",
        str(workers),
        "--node-id",
        node_id,
        "--runtime-dir",
        str(runtime),
        "--shutdown-timeout",
        "10",
        *args,
    ]
    if redis_url:
        command += ["--redis-url", redis_url]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("RTC_", "NOTIFY_"))}
    full_env.update({"JWT_SECRET": SECRET, **(env or {})})
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=full_env,
            preexec_fn=None if nofile is None else functools.partial(_limit_nofile, nofile),
        )
    server = Host(node_id, port, metrics_port, process, runtime, log_path, host, workers, env or {})
    if wait:
        try:
            # One worker answering /health is not a booted host: a worker killed before the
            # supervisor saw it ready fails the first boot. The supervisor says when it is.
            wait_for(lambda: _booted(server) or process.poll() is not None, 30, f"host {node_id}")
        except TimeoutError:
            server.stop()
            raise
        if process.poll() is not None:
            raise RuntimeError(f"rtc serve exited {process.returncode}:\n{server.log()}")
    return server


def _booted(server: Host) -> bool:
    return server.healthy() and " serving on " in server.log()


@contextlib.contextmanager
def hosts(*specs: tuple[str, str | None], **kwargs: object) -> Iterator[list[Host]]:
    started: list[Host] = []
    try:
        for node_id, url in specs:
            started.append(start_host(node_id, url, **kwargs))  # type: ignore[arg-type]
        yield started
    finally:
        for server in started:
            server.stop()
            shutil.rmtree(server.runtime_dir, ignore_errors=True)


def counter(host: Host, name: str, **labels: str) -> float:
    """One sample of the host's Prometheus aggregate (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    _, text = host.get("/metrics", {"Accept": "text/plain"})
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def ring_view(host: Host) -> list[str]:
    return list(json.loads(host.get("/admin/ring")[1])["slots"])


def settle_ring(cluster: Sequence[Host], timeout: float = 10) -> None:
    """Wait until every worker of every host sees every slot (heartbeats are 1 s apart)."""
    expected = sorted(f"{h.node_id}:{i}" for h in cluster for i in range(h.workers))
    wait_for(
        lambda: all(ring_view(h) == expected for h in cluster for _ in range(6)),
        timeout,
        "ring views to converge",
    )
