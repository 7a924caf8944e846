"""Samples a server's process trees (RSS and CPU) and the load generator's own CPU."""

from __future__ import annotations

import time
from collections.abc import Iterable

import psutil

__all__ = ["CpuMeter", "tree_rss"]


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
