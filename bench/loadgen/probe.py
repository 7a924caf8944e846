"""Samples a server's process trees (RSS, CPU, sockets), its Redis, and the load generator's CPU."""

from __future__ import annotations

import time
from collections.abc import Iterable

import psutil
import redis

__all__ = ["CpuMeter", "commands_between", "owners", "redis_commandstats", "tree_rss"]


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
        self._cpu = 0.0
        self._wall = 0.0

    def _cpu_seconds(self) -> float:
        total = 0.0
        for proc in _tree(self._pids):
            try:
                times = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
        return total

    def start(self) -> None:
        """Begin a measurement window."""
        self._cpu = self._cpu_seconds()
        self._wall = time.monotonic()

    def percent(self) -> float | None:
        """Average CPU in percent since :meth:`start`; None when nothing is sampled."""
        if not self._pids:
            return None
        wall = time.monotonic() - self._wall
        return round(100.0 * (self._cpu_seconds() - self._cpu) / wall, 1) if wall > 0 else None


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


def redis_commandstats(urls: Iterable[str]) -> dict[str, int]:
    """Calls per command since each Redis started (``INFO commandstats``), summed over ``urls``.

    Give every master of a cluster: each counts only what it ran.
    """
    calls: dict[str, int] = {}
    for url in urls:
        client = redis.Redis.from_url(url, socket_timeout=5.0)
        try:
            info = client.info("commandstats")
        finally:
            client.close()
        for name, stats in info.items():
            key = name.removeprefix("cmdstat_")
            calls[key] = calls.get(key, 0) + int(stats["calls"])
    return calls


def commands_between(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Commands Redis ran between two ``redis_commandstats`` samples (the nonzero ones)."""
    delta = {name: calls - before.get(name, 0) for name, calls in after.items()}
    return {name: calls for name, calls in sorted(delta.items()) if calls > 0}
