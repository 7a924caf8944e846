"""`rtc serve` with no Redis settings runs its own redis-server, and never leaves it behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import psutil
import pytest

from tests.client import Client
from tests.rtcproc import start_host, wait_for

pytestmark = pytest.mark.timeout(90)


def redis_children(pid: int) -> list[psutil.Process]:
    """The redis-servers under `pid`; one that exits between the listing and the look is left out."""
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "redis-server" in child.name():
                found.append(child)
        except psutil.NoSuchProcess:  # ZombieProcess included: its /proc entry is going or gone
            continue
    return found


def test_embedded_redis_serves_and_stops_with_sigterm() -> None:
    host = start_host("solo", None)
    try:
        (redis,) = redis_children(host.process.pid)
        assert host.runtime_dir.joinpath("redis.sock").exists()

        async def chat() -> None:
            async with contextlib.AsyncExitStack() as clients:
                a = await Client.connect(host.ws, "a")
                clients.push_async_callback(a.close)
                b = await Client.connect(host.ws, "b")
                clients.push_async_callback(b.close)
                await a.join("room")
                await b.join("room")
                await a.request("publish", "ack", room="room", data="hello")
                (message,) = await b.wait_messages("room", 1)
                assert message["data"] == "hello" and message["seq"] == 1

        asyncio.run(chat())
    finally:
        assert host.stop() == 0
    assert not psutil.pid_exists(redis.pid), "redis-server outlived its supervisor"


def test_embedded_redis_dies_with_a_killed_supervisor() -> None:
    host = start_host("doomed", None)
    orphans: list[psutil.Process] = []
    try:
        (redis,) = redis_children(host.process.pid)
        workers = [psutil.Process(pid) for pid in host.worker_pids()]
        orphans = [redis, *workers]
        os.kill(host.process.pid, signal.SIGKILL)
        host.process.wait()
        wait_for(lambda: not redis.is_running(), 5, "redis-server to die with its parent")
        wait_for(lambda: not any(w.is_running() for w in workers), 15, "workers to exit")
    finally:
        host.stop()
        for orphan in orphans:  # only if the test failed: what the killed supervisor left behind
            with contextlib.suppress(psutil.NoSuchProcess):
                orphan.kill()


def test_a_dead_embedded_redis_is_restarted_and_rooms_start_a_new_epoch() -> None:
    host = start_host("phoenix", None, args=("--rate", "1000", "--rate-burst", "1000"))
    try:

        async def scenario() -> None:
            async with contextlib.AsyncExitStack() as clients:
                member = await Client.connect(host.ws, "member")
                clients.push_async_callback(member.close)
                writer = await Client.connect(host.ws, "writer")
                clients.push_async_callback(writer.close)
                await survive_a_redis_death(member, writer)

        async def survive_a_redis_death(member: Client, writer: Client) -> None:
            joined = await member.join("room")
            await writer.join("room")
            await writer.request("publish", "ack", room="room", data="before")
            await member.wait_messages("room", 1)

            (redis,) = redis_children(host.process.pid)
            redis.kill()  # history is gone with it: nothing was persisted
            await asyncio.to_thread(
                wait_for,
                lambda: [p.pid for p in redis_children(host.process.pid)] not in ([], [redis.pid]),
                10,
                "a new redis-server",
            )
            fresh = await member.expect("joined", timeout=15, room="room")
            assert fresh["recovered"] is False and fresh["epoch"] != joined["epoch"]

            async with asyncio.timeout(15):
                while True:  # the writer retries as a client would, until Redis is back
                    await writer.send(type="publish", room="room", data="after")
                    reply = await writer.next()
                    while reply["type"] not in ("ack", "error"):
                        reply = await writer.next()
                    if reply["type"] == "ack":
                        break
                    await asyncio.sleep(0.2)  # the writer's retry pace, as a client's backoff
            assert reply["seq"] >= 1
            after = await member.expect("message", timeout=10, data="after")
            assert after["seq"] == reply["seq"]

        asyncio.run(scenario())
    finally:
        assert host.stop() == 0


def test_embedded_mode_serves_the_demo_and_keeps_redis_chatter_out_of_the_log() -> None:
    host = start_host("demo", None, args=("--demo",))
    try:
        status, _ = host.get("/demo")
        assert status == 200
        assert "Redis is starting" not in host.log()
        assert host.runtime_dir.joinpath("redis.log").exists()
    finally:
        assert host.stop() == 0
