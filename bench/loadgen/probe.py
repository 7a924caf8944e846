"""Samples a server's process trees (RSS, CPU, sockets), its Redis, and the load generator's CPU."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import psutil
import redis

from rtc import keys

__all__ = [
    "CpuMeter",
    "RedisCpuMeter",
    "commands_between",
    "owners",
    "process_stats",
    "redis_commandstats",
    "shard_distribution",
    "tree_rss",
]


def _tree(pids: Iterable[int]) -> list[psutil.Process]:
    """Each PID's process and all its descendants (workers, an embedded Redis)."""
    procs: list[psutil.Process] = []
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs += [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    return procs


def tree_rss(pids: Iterable[int]) -> int:
    """Sum of resident set sizes in bytes over the process trees of ``pids``."""
    total = 0
    for proc in _tree(pids):
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


class CpuMeter:
    """CPU used by process trees between :meth:`start` and :meth:`percent`.

    100 % is one core busy; on a 2-core machine the ceiling is 200 %.
    """

    def __init__(self, pids: Iterable[int]) -> None:
        self._pids = list(pids)
        self._cpu = (0.0, 0.0)
        self._wall = 0.0

    def _cpu_seconds(self) -> tuple[float, float]:
        """CPU seconds so far: (user and system, system)."""
        total = system = 0.0
        for proc in _tree(self._pids):
            try:
                times = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
            system += times.system
        return total, system

    def start(self) -> None:
        """Begin a measurement window."""
        self._cpu = self._cpu_seconds()
        self._wall = time.monotonic()

    def _sampled(self) -> bool:
        return bool(self._pids)

    def percents(self) -> tuple[float, float] | None:
        """Average CPU in percent since :meth:`start`, and the kernel's part of it (system
        calls: socket reads and writes); None when nothing is sampled."""
        wall = time.monotonic() - self._wall
        if not self._sampled() or wall <= 0:
            return None
        (total, system), (total0, system0) = self._cpu_seconds(), self._cpu
        return round(100.0 * (total - total0) / wall, 1), round(100.0 * (system - system0) / wall, 1)

    def percent(self) -> float | None:
        """Average CPU in percent since :meth:`start`; None when nothing is sampled."""
        percents = self.percents()
        return None if percents is None else percents[0]


class RedisCpuMeter(CpuMeter):
    """CPU used by the Redis servers at ``urls`` (every master of a cluster), from ``INFO cpu``.

    Beside the server's and the generator's share it shows where the rest of the machine
    went. A Redis that is a child of the server (embedded) is in the server's share too.
    """

    def __init__(self, urls: Iterable[str]) -> None:
        super().__init__(())
        self._urls = list(urls)

    def _sampled(self) -> bool:
        return bool(self._urls)

    def _cpu_seconds(self) -> tuple[float, float]:
        total = system = 0.0
        for url in self._urls:
            info = _info(url, "cpu")
            total += float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
            system += float(info["used_cpu_sys"])
        return total, system


def process_stats(pids: Iterable[int]) -> dict[str, dict[str, float]]:
    """RSS (MiB) and open file descriptors of every process in the trees of ``pids``."""
    stats: dict[str, dict[str, float]] = {}
    for proc in _tree(pids):
        try:
            stats[str(proc.pid)] = {
                "rss_mib": round(proc.memory_info().rss / 2**20, 1),
                "fds": proc.num_fds(),
            }
        except psutil.NoSuchProcess:
            continue
    return stats


def owners(pids: Iterable[int], server_port: int, client_ports: Iterable[int]) -> dict[int, int]:
    """Which process of the trees of ``pids`` holds each client port's server socket.

    With SO_REUSEPORT the kernel picks a worker per connection; the probe sockets are
    mapped to the worker that answers them by their peer port.
    """
    wanted = set(client_ports)
    found: dict[int, int] = {}
    for proc in _tree(pids):
        try:
            conns = proc.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for conn in conns:
            if conn.laddr and conn.laddr.port == server_port and conn.raddr and conn.raddr.port in wanted:
                found[conn.raddr.port] = proc.pid
    return found


def redis_commandstats(urls: Iterable[str]) -> dict[str, dict[str, int]]:
    """Calls per command since each Redis started (``INFO commandstats``), per URL.

    Give every master of a cluster: each counts only what it ran.
    """
    calls: dict[str, dict[str, int]] = {}
    for url in urls:
        info = _info(url, "commandstats")
        calls[url] = {name.removeprefix("cmdstat_"): int(stats["calls"]) for name, stats in info.items()}
    return calls


def _info(url: str, section: str) -> dict[str, Any]:
    """One section of the Redis at ``url``'s ``INFO``."""
    client = redis.Redis.from_url(url, socket_timeout=5.0)
    try:
        return dict(client.info(section))
    finally:
        client.close()


def commands_between(
    before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]
) -> tuple[dict[str, int], dict[str, int]]:
    """Commands run between two samples: per command (all servers), and per server."""
    per_command: dict[str, int] = {}
    per_server: dict[str, int] = {}
    for url, calls in after.items():
        old = before.get(url, {})
        for name, count in calls.items():
            delta = count - old.get(name, 0)
            if delta > 0:
                per_command[name] = per_command.get(name, 0) + delta
                per_server[url] = per_server.get(url, 0) + delta
    return dict(sorted(per_command.items())), per_server


def shard_distribution(urls: Iterable[str], rooms: int, prefix: str = "room-") -> dict[str, Any]:
    """How ``rooms`` rooms named ``<prefix><i>`` spread over a cluster's masters.

    Each room's keys share one hash tag, so a room lives on the master that serves its
    tag's slot; a master with far more rooms than the others is a scaling wall. Asks the
    cluster itself (``CLUSTER SLOTS`` and ``CLUSTER KEYSLOT``), using rtc's key names.
    """
    urls = list(urls)
    client = redis.Redis.from_url(urls[0], socket_timeout=5.0)
    try:
        owners: list[tuple[int, int, str]] = []
        for start, end, primary, *_replicas in client.execute_command("CLUSTER SLOTS"):
            host, port = primary[0], primary[1]
            owners.append((int(start), int(end), f"{_text(host)}:{int(port)}"))
        pipe = client.pipeline(transaction=False)
        for index in range(rooms):
            pipe.execute_command("CLUSTER KEYSLOT", keys.room_meta(f"{prefix}{index}"))
        slots = pipe.execute()
    finally:
        client.close()
    counts: dict[str, int] = {name: 0 for _s, _e, name in owners}
    for slot in slots:
        name = next(n for start, end, n in owners if start <= int(slot) <= end)
        counts[name] += 1
    mean = rooms / len(counts)
    return {
        "rooms": rooms,
        "per_master": dict(sorted(counts.items())),
        "max_over_mean": round(max(counts.values()) / mean, 3),
    }


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
