"""`rtc serve` with no Redis settings runs its own redis-server, and never leaves it behind."""

from __future__ import annotations

import asyncio
import os
import signal

import psutil
import pytest

from tests.client import Client
from tests.rtcproc import start_host, wait_for

pytestmark = pytest.mark.timeout(90)


def redis_children(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(pid).children(recursive=True) if "redis-server" in p.name()]


def test_embedded_redis_serves_and_stops_with_sigterm() -> None:
    host = start_host("solo", None)
    try:
        (redis,) = redis_children(host.process.pid)
        assert host.runtime_dir.joinpath("redis.sock").exists()

        async def chat() -> None:
            a = await Client.connect(host.ws, "a")
            b = await Client.connect(host.ws, "b")
            await a.join("room")
            await b.join("room")
            await a.request("publish", "ack", room="room", data="hello")
            (message,) = await b.wait_messages("room", 1)
            assert message["data"] == "hello" and message["seq"] == 1
            await a.close()
            await b.close()

        asyncio.run(chat())
    finally:
        assert host.stop() == 0
    assert not psutil.pid_exists(redis.pid), "redis-server outlived its supervisor"


def test_embedded_redis_dies_with_a_killed_supervisor() -> None:
    host = start_host("doomed", None)
    (redis,) = redis_children(host.process.pid)
    workers = host.worker_pids()
    os.kill(host.process.pid, signal.SIGKILL)
    host.process.wait()
    wait_for(lambda: not psutil.pid_exists(redis.pid), 5, "redis-server to die with its parent")
    wait_for(lambda: not any(psutil.pid_exists(p) for p in workers), 15, "workers to exit")
