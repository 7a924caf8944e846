"""What one authenticated client can cost in memory (SPEC 11), measured under attack.

Each test attacks a real host with its embedded redis-server (so `--redis-maxmemory`
applies) and prints its figures (`pytest -s`): worker RSS and Redis `used_memory`, sampled
while the attack runs, each against the bound it states. `RTC_SLOW=1` runs the long
versions (30 s of directs instead of 10 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from rtc.routing.presence import MEMBERSHIP_TTL
from tests.client import Client
from tests.rtcproc import Host, counter, start_host, token, wait_for

pytestmark = pytest.mark.timeout(300)

SLOW = os.environ.get("RTC_SLOW") == "1"
MiB = 1 << 20
RSS_BOUND = 300 * MiB  # one worker, whatever one client does (the bound of test_security too)
DIRECT_DATA = 65000  # characters: the direct's frames stay within --max-message-bytes (65536)


@dataclass
class Embedded:
    """A host, its embedded Redis, and the probes the figures come from."""

    host: Host
    peak_rss: int = 0
    peak_used: int = 0
    samples: int = 0

    @property
    def socket(self) -> Path:
        return self.host.runtime_dir / "redis.sock"

    def redis(self, *args: str) -> str:
        return subprocess.run(
            ["redis-cli", "-s", str(self.socket), *args],
            check=True,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout

    def info(self) -> dict[str, str]:
        lines = self.redis("INFO", "memory").splitlines()
        return dict(line.split(":", 1) for line in lines if ":" in line)

    def used(self) -> int:
        return int(self.info()["used_memory"])

    def rss(self) -> int:
        return max(psutil.Process(pid).memory_info().rss for pid in self.host.worker_pids())

    def redis_pid(self) -> int:
        children = psutil.Process(self.host.process.pid).children()
        (pid,) = [c.pid for c in children if c.name() == "redis-server"]
        return pid

    def sample(self) -> None:
        self.peak_rss = max(self.peak_rss, self.rss())
        self.peak_used = max(self.peak_used, self.used())
        self.samples += 1


@contextlib.contextmanager
def embedded(node_id: str, *args: str) -> Iterator[Embedded]:
    host = start_host(node_id, None, workers=1, args=args)
    try:
        yield Embedded(host)
    finally:
        host.stop()
        shutil.rmtree(host.runtime_dir, ignore_errors=True)


def figure(title: str, rows: list[tuple[str, str, str]]) -> None:
    """Print a table of figures: what, measured, bound."""
    width = max(len(r[0]) for r in rows)
    print(f"\n{title}")
    for what, measured, bound in rows:
        print(f"  {what:<{width}}  {measured:>12}  bound {bound}")


def mib(value: float) -> str:
    return f"{value / MiB:.1f} MiB"


async def reply_to(client: Client, request_id: object) -> dict[str, Any]:
    """The ack or error answering the frame sent with `request_id`."""
    while True:
        frame = await client.next(timeout=10)
        if frame.get("id") == request_id and frame.get("type") in ("ack", "error"):
            return frame


# ============================================================================ a full Redis


async def test_full_embedded_redis_refuses_writes_with_unavailable() -> None:
    """Fill an 8 MiB embedded Redis with directs: `unavailable`, never an OOM kill."""
    maxmemory = 8 * MiB
    with embedded("full", "--redis-maxmemory", "8m", "--rate", "1000", "--rate-burst", "1000") as box:
        info = box.info()
        assert (int(info["maxmemory"]), info["maxmemory_policy"]) == (maxmemory, "noeviction")
        redis_pid = box.redis_pid()
        client = await Client.connect(box.host.ws, "filler")
        try:
            data = "x" * DIRECT_DATA
            replies: list[dict[str, Any]] = []
            for i in range(2 * maxmemory // DIRECT_DATA):  # twice what fits: the loop is bounded
                await client.send(type="direct", to=f"made-up-{i}", data=data, id=i)
                replies.append(await reply_to(client, i))
                if replies[-1]["type"] == "error":
                    break
            box.sample()
            acked = sum(r["type"] == "ack" for r in replies)
            assert replies[-1]["type"] == "error" and replies[-1]["code"] == "unavailable", replies[-1]
            assert box.peak_used <= maxmemory + MiB, box.peak_used  # one write may overshoot
            # Small writes still fit under the limit; push Redis past it, as a last allowed
            # write can: now every write is refused, and the host stays up all the same.
            box.redis("CONFIG", "SET", "maxmemory", str(box.used() - MiB))
            assert box.host.healthy() and box.redis_pid() == redis_pid
            assert (await client.request("ping", "pong"))["type"] == "pong"
            await client.send(type="join", room="brand-new", id="j")
            assert (await client.expect("error", id="j"))["code"] == "unavailable"
            await client.send(type="direct", to="someone", data="small", id="small")
            assert (await reply_to(client, "small"))["code"] == "unavailable"
            async with aiohttp.ClientSession() as http:
                ws = await http.ws_connect(box.host.ws, params={"token": token("newcomer")})
                closed = await ws.receive(timeout=10)
                assert (closed.type, ws.close_code) == (aiohttp.WSMsgType.CLOSE, 1013), closed
            figure(
                "full embedded Redis (--redis-maxmemory 8m, 64 KiB directs to made-up users)",
                [
                    ("directs acked before the first refusal", str(acked), f"~{maxmemory // DIRECT_DATA}"),
                    (
                        "Redis used_memory at refusal",
                        mib(box.peak_used),
                        f"maxmemory {mib(maxmemory)} + 1 MiB",
                    ),
                    ("worker RSS", mib(box.peak_rss), mib(RSS_BOUND)),
                ],
            )
            # Room again (history expires; here flushed): writes are served again.
            box.redis("CONFIG", "SET", "maxmemory", str(maxmemory))
            box.redis("FLUSHALL")
            await client.send(type="direct", to="made-up-again", data="hi", id="after")
            assert (await reply_to(client, "after"))["type"] == "ack"
        finally:
            await client.close()


def test_a_full_redis_is_logged_as_one_outage_not_a_line_a_second() -> None:
    """Every heartbeat fails while Redis is full: one warning, then one line when it recovers."""
    with embedded("fullog", "--redis-maxmemory", "8m") as box:
        errors = counter(box.host, "rtc_redis_errors_total", op="heartbeat")
        # Redis checks maxmemory before a write: one short SETRANGE makes a 9 MiB string.
        box.redis("SETRANGE", "filler", str(9 * MiB), "f")
        wait_for(
            lambda: counter(box.host, "rtc_redis_errors_total", op="heartbeat") >= errors + 5,
            30,
            "five failed heartbeats",
        )
        box.redis("DEL", "filler")
        recovered = wait_for(
            lambda: re.findall(r"ring heartbeat recovered after (\d+) failures", box.host.log()),
            30,
            "the recovery line",
        )
    log = box.host.log()
    print(log)
    assert log.count("ring heartbeat failed: OutOfMemoryError") == 1
    assert "ring heartbeat still failing" not in log  # a reminder comes after a minute
    assert int(recovered[0]) >= 5


# ============================================================================ figures


async def test_directs_to_made_up_users_stay_within_the_rate_bound() -> None:
    """One token sends 64 KiB directs to random users at the default rate (20/s, burst 40)."""
    seconds = 30.0 if SLOW else 10.0
    rate, burst = 20, 40
    with embedded("directs") as box:
        box.sample()
        rss_before, used_before = box.peak_rss, box.peak_used
        client = await Client.connect(box.host.ws, "attacker")
        try:
            data = "y" * DIRECT_DATA
            sent = 0
            started = time.monotonic()
            next_sample = started
            while (elapsed := time.monotonic() - started) < seconds:
                # As fast as the bucket refills: the burst at once, then `rate` a second.
                while sent < burst + rate * elapsed:
                    await client.send(
                        type="direct", to=f"random-{sent}-{os.urandom(4).hex()}", data=data, id=sent
                    )
                    sent += 1
                if time.monotonic() >= next_sample:
                    box.sample()
                    next_sample += 0.5
                await asyncio.sleep(0.5 / rate)  # the attack's pace is the rate itself
            replies = [f for f in client.seen if f.get("type") in ("ack", "error")]
            acked = sum(f["type"] == "ack" for f in replies)
            box.sample()
        finally:
            await client.close()
        grown = box.peak_used - used_before
        bound = (burst + rate * seconds) * 66 * 1024 * 1.5 + 4 * MiB  # stream entry + key overhead
        figure(
            f"64 KiB directs to made-up users, one token, {seconds:.0f} s at --rate {rate}, burst {burst}",
            [
                (
                    "directs sent / acked",
                    f"{sent} / {acked}",
                    f"burst + rate x t = {burst + rate * seconds:.0f}",
                ),
                ("Redis used_memory growth", mib(grown), f"{mib(bound)} (acked x 64 KiB x 1.5 + 4 MiB)"),
                ("Redis used_memory peak", mib(box.peak_used), "--redis-maxmemory 256 MiB"),
                ("worker RSS before / peak", f"{mib(rss_before)} / {mib(box.peak_rss)}", mib(RSS_BOUND)),
                ("one hour at this rate would need", mib(rate * 3600 * DIRECT_DATA), "refused past 256 MiB"),
            ],
        )
        assert acked <= burst + rate * seconds + 1
        assert grown <= bound and box.peak_used <= 256 * MiB
        assert box.peak_rss <= RSS_BOUND


async def test_joining_and_leaving_10000_rooms_frees_their_state() -> None:
    """One socket joins and leaves 10,000 distinct rooms; their state goes with them."""
    rooms = 10_000
    window = 200  # rooms in flight
    with embedded("rooms", "--rate", "100000", "--rate-burst", "100000") as box:
        box.sample()
        rss_before, used_before = box.peak_rss, box.peak_used
        client = await Client.connect(box.host.ws, "roamer")
        try:
            started = time.monotonic()
            left = 0
            for i in range(rooms):
                await client.send(type="join", room=f"roam.{i}")
                await client.send(type="leave", room=f"roam.{i}")
                if i - left >= window:
                    await client.expect("left", timeout=30)
                    left += 1
                if i % 1000 == 0:
                    box.sample()
            while left < rooms:
                await client.expect("left", timeout=30)
                left += 1
            took = time.monotonic() - started
            box.sample()
            errors = [f for f in client.seen if f.get("type") == "error"]
            assert not errors, errors[:3]
            # Idle rooms leave the worker (and their subscriptions) about 5 s after their last member.
            await_rooms_closed(box.host)
            box.sample()
            session = box.redis("HKEYS", f"rtc:{{s:{client.welcome['session']}}}").split()
            # Membership, slot set, presence and pending leaves expire MEMBERSHIP_TTL after
            # the last join or refresh; what stays is each room's meta, for --history-ttl.
            waited = time.monotonic()
            wait_for(lambda: not room_keys(box, meta=False), MEMBERSHIP_TTL + 15, "room state to expire")
            waited = time.monotonic() - waited
            metas = room_keys(box, meta=True)
            meta_ttl = int(box.redis("TTL", "rtc:{r:roam.9999}:meta"))
            rss_after, used_after = box.rss(), box.used()
        finally:
            await client.close()
        rss = f"{mib(rss_before)} / {mib(box.peak_rss)} / {mib(rss_after)}"
        used = f"{mib(used_before)} / {mib(box.peak_used)} / {mib(used_after)}"
        figure(
            f"one socket joins and leaves {rooms} distinct rooms ({took:.1f} s)",
            [
                ("worker RSS before / peak / after", rss, "+64 MiB"),
                ("Redis used_memory before / peak / after", used, "+10 MiB (1 KiB a room)"),
                ("session fields of left rooms", str(sum(k.startswith("r:roam.") for k in session)), "0"),
                ("other room keys gone after", f"{waited:.1f} s", f"{MEMBERSHIP_TTL} s (+ 15 s slack)"),
                ("room meta keys left (epoch, seq)", str(len(metas)), f"{rooms}, for --history-ttl"),
                ("TTL of a left room's meta", f"{meta_ttl} s", "--history-ttl 3600 s"),
            ],
        )
        assert not any(k.startswith("r:roam.") for k in session)
        assert len(metas) <= rooms and 0 < meta_ttl <= 3600
        assert box.peak_rss - rss_before <= 64 * MiB and box.peak_rss <= RSS_BOUND
        assert used_after - used_before <= 10 * MiB


def room_keys(box: Embedded, *, meta: bool) -> list[str]:
    """The test rooms' Redis keys: their meta keys, or every other one."""
    found = box.redis("--scan", "--pattern", "rtc:{r:roam.*}*").split()
    return [k for k in found if k.endswith(":meta") is meta]


def await_rooms_closed(host: Host, timeout: float = 60) -> None:
    """Until the worker holds only the user's inbox (`rtc_rooms` is the per-worker gauge)."""

    def closed() -> bool:
        _, text = host.get("/metrics", {"Accept": "text/plain"})
        lines = text.decode().splitlines()
        counts = [float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("rtc_rooms{")]
        return bool(counts) and sum(counts) <= 1

    wait_for(closed, timeout, "idle rooms to be closed", 0.5)
