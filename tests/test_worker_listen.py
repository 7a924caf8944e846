"""A worker keeps the deep accept queue a reconnect storm needs (SPEC 1: listening sockets)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from rtc.worker import LISTEN_BACKLOG
from tests.rtcproc import hosts


def test_each_workers_listening_socket_has_the_deep_backlog() -> None:
    """aiohttp listens again with 128 unless told: a storm of 1,000 handshakes would overflow
    it and wait for SYN retransmits. The listen queue (`ss` Send-Q) is the configured one."""
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    with hosts(("a", None)) as (host,):
        listing = subprocess.run(
            ["ss", "-ltnH", f"sport = :{host.port}"], capture_output=True, text=True, check=True
        ).stdout.split("\n")
    queues = [int(line.split()[2]) for line in listing if line.strip()]
    assert queues and all(q == min(LISTEN_BACKLOG, somaxconn) for q in queues), listing
