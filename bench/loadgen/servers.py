"""Start and stop the servers under test (and a Redis for them) on 127.0.0.1.

Every process is started here and stopped by its own PID (its descendants, such as
rtc's workers, by theirs); nothing is ever looked up or killed by name.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import psutil
import redis

from bench.loadgen.system import free_port

__all__ = ["KINDS", "Launch", "Process", "Redis", "RedisCluster", "ServerKind"]

REPO = Path(__file__).resolve().parents[2]
NODE_SERVER = REPO / "bench" / "baselines" / "node_ws" / "server.js"
_HOST = "127.0.0.1"
_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 20.0


class Process:
    """A child process with its output in a log file."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.argv = argv
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL for it and any descendant still there after the timeout."""
        if not self.alive():
            return
        try:
            descendants = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            descendants = []
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5.0)
        _gone, alive = psutil.wait_procs(descendants, timeout=5.0)
        for proc in alive:
            proc.kill()

    def wait_healthy(self, url: str, timeout: float = _START_TIMEOUT) -> None:
        """Poll ``url`` until it answers 200; raise with the log's tail if it never does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                break
            try:
                with urllib.request.urlopen(url, timeout=1.0) as response:
                    if response.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.2)
        tail = self.log.read_text(errors="replace")[-2000:]
        self.stop()
        raise RuntimeError(f"{' '.join(self.argv[:4])} did not become healthy:\n{tail}")


class Redis:
    """A private redis-server on a free loopback port, without persistence."""

    def __init__(self, workdir: Path, extra: list[str] | None = None) -> None:
        self.port = free_port()
        self.url = f"redis://{_HOST}:{self.port}/0"
        argv = [
            shutil.which("redis-server") or "redis-server",
            "--bind", _HOST, "--port", str(self.port), "--save", "", "--appendonly", "no",
            "--dir", str(workdir), "--maxmemory-policy", "noeviction", *(extra or []),
        ]  # fmt: skip
        self.process = Process(argv, workdir / "redis.log")
        self.client = self._client = redis.Redis(host=_HOST, port=self.port, socket_timeout=5.0)
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            try:
                self._client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or not self.process.alive():
                    self.process.stop()
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.1)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def urls(self) -> tuple[str, ...]:
        """Every server to sample for commands (one here)."""
        return (self.url,)

    @property
    def rtc_args(self) -> list[str]:
        return ["--redis-url", self.url]

    def flush(self) -> None:
        """Empty it between servers so none sees another's keys."""
        self._client.flushall()

    def stop(self) -> None:
        self._client.close()
        self.process.stop()


class RedisCluster:
    """``masters`` cluster-enabled redis-servers on free loopback ports, joined into one cluster."""

    def __init__(self, workdir: Path, masters: int) -> None:
        self.nodes: list[Redis] = []
        try:
            for index in range(masters):
                node_dir = workdir / f"cluster-{index}"
                node_dir.mkdir(parents=True, exist_ok=True)
                # The bus port defaults to port + 10000, which may be taken: pick one.
                extra = ["--cluster-enabled", "yes", "--cluster-port", str(free_port()),
                         "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000"]  # fmt: skip
                self.nodes.append(Redis(node_dir, extra))
            subprocess.run(
                ["redis-cli", "--cluster", "create", *(f"{_HOST}:{n.port}" for n in self.nodes),
                 "--cluster-replicas", "0", "--cluster-yes"],
                check=True, capture_output=True, timeout=30,
            )  # fmt: skip
            self._await_ok()
        except BaseException:
            self.stop()
            raise
        self.url = self.nodes[0].url

    def _await_ok(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            states = [n.client.cluster("info").get("cluster_state") for n in self.nodes]
            if all(state == "ok" for state in states):
                return
            time.sleep(0.2)
        raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(n.url for n in self.nodes)

    @property
    def rtc_args(self) -> list[str]:
        return ["--redis-cluster", ",".join(f"redis://{_HOST}:{n.port}" for n in self.nodes)]

    def flush(self) -> None:
        for node in self.nodes:
            node.flush()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@dataclass(frozen=True)
class Launch:
    """What a server needs to start one host."""

    port: int
    redis_url: str
    redis_args: list[str]  # how rtc reaches it: --redis-url URL or --redis-cluster SEEDS
    jwt_secret: str
    node_id: str
    workdir: Path
    rtc_workers: int


@dataclass(frozen=True)
class ServerKind:
    """A server the compare mode knows how to run."""

    name: str
    protocol: str  # client protocol, see bench.loadgen.protocols
    shared: bool  # hosts share state through Redis, so ``cross`` applies
    argv: Callable[[Launch], list[str]]
    unavailable: Callable[[], str | None]  # why it cannot run here, or None

    def start(self, launch: Launch) -> Process:
        """Start one host and wait until its ``/health`` answers."""
        log = launch.workdir / f"{self.name}-{launch.node_id}.log"
        process = Process(self.argv(launch), log)
        process.wait_healthy(f"http://{_HOST}:{launch.port}/health")
        return process


def _rtc_argv(launch: Launch) -> list[str]:
    # The per-connection rate limit is lifted: the benchmark measures the server, and
    # the load generator spreads its rate over every member anyway.
    return [
        sys.executable, "-m", "rtc", "serve", "--host", _HOST, "--port", str(launch.port),
        "--metrics-port", str(free_port(avoid=launch.port)), "--workers", str(launch.rtc_workers),
        "--node-id", launch.node_id, *launch.redis_args,
        "--runtime-dir", str(launch.workdir / f"rtc-{launch.node_id}"),
        "--jwt-secret", launch.jwt_secret, "--rate", "100000", "--rate-burst", "100000",
        "--log-level", "warning",
    ]  # fmt: skip


def _rtc_unavailable() -> str | None:
    probe = subprocess.run(
        [sys.executable, "-m", "rtc", "serve", "--help"],
        cwd=REPO,
        capture_output=True,
        timeout=30,
        check=False,
    )
    return None if probe.returncode == 0 else "`python -m rtc serve --help` fails"


def _node_unavailable() -> str | None:
    if shutil.which("node") is None:
        return "node is not installed"
    if not (NODE_SERVER.parent / "node_modules" / "ws").is_dir():
        return f"run `npm ci` in {NODE_SERVER.parent.relative_to(REPO)}"
    return None


def _bare_argv(launch: Launch) -> list[str]:
    module = "bench.baselines.bare_aiohttp"
    return [sys.executable, "-m", module, "--host", _HOST, "--port", str(launch.port)]


def _socketio_argv(launch: Launch) -> list[str]:
    return [
        sys.executable, "-m", "bench.baselines.socketio_server", "--host", _HOST,
        "--port", str(launch.port), "--redis-url", launch.redis_url,
        "--jwt-secret", launch.jwt_secret,
    ]  # fmt: skip


def _node_argv(launch: Launch) -> list[str]:
    return ["node", str(NODE_SERVER), "--host", _HOST, "--port", str(launch.port)]


def _available() -> None:
    return None


KINDS: dict[str, ServerKind] = {
    kind.name: kind
    for kind in (
        ServerKind("rtc", "rtc", True, _rtc_argv, _rtc_unavailable),
        ServerKind("bare", "rtc", False, _bare_argv, _available),
        ServerKind("socketio", "socketio", True, _socketio_argv, _available),
        ServerKind("node", "rtc", False, _node_argv, _node_unavailable),
    )
}
