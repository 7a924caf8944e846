"""Lifecycle without loss: resume, sessions, drain, rolling restart, crashes, pub/sub loss."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import aiohttp
import psutil
import pytest

from tests.client import (
    FLOW,
    Client,
    ResilientPublisher,
    ResumingClient,
    all_reached,
    assert_complete,
    start_traffic,
    stop_traffic,
)
from tests.rtcproc import Host, RedisServer, hosts, start_redis, token, until, wait_for

pytestmark = pytest.mark.timeout(120)

FAST = ("--rate", "1000", "--rate-burst", "1000")


# -- history and resume ---------------------------------------------------------------------------


async def test_join_since_replays_exactly_the_gap(cluster: list[Host]) -> None:
    writer = await Client.connect(cluster[0].ws, "writer")
    reader = await Client.connect(cluster[1].ws, "reader")
    try:
        await writer.join("history")
        await reader.join("history")
        for n in range(5):
            await writer.request("publish", "ack", room="history", data=n)
        await reader.wait_messages("history", 5)
        epoch = reader.seen[1]["epoch"]
        await reader.close()
        for n in range(5, 10):
            await writer.request("publish", "ack", room="history", data=n)

        back = await Client.connect(cluster[0].ws, "reader")
        joined = await back.join("history", since=5, epoch=epoch)
        assert joined["recovered"] is True and joined["seq"] == 10
        await writer.request("publish", "ack", room="history", data=10)
        messages = await back.wait_messages("history", 6)
        assert [m["seq"] for m in messages] == [6, 7, 8, 9, 10, 11]
        assert [m["data"] for m in messages] == [5, 6, 7, 8, 9, 10]
        order = [f["type"] for f in back.seen]
        assert order.index("joined") < order.index("message")
        await back.close()
    finally:
        await writer.close()


async def test_resume_outside_the_window_says_not_recovered() -> None:
    redis = start_redis()
    try:
        with hosts(("small", redis.url), args=(*FAST, "--history-size", "5"), workers=1) as (host,):
            writer = await Client.connect(host.ws, "writer")
            await writer.join("tiny")
            for n in range(30):
                await writer.request("publish", "ack", room="tiny", data=n)
            late = await Client.connect(host.ws, "late")
            joined = await late.join("tiny", since=2)
            assert joined["recovered"] is False and joined["seq"] == 30
            replay = await late.wait_messages("tiny", 1)
            assert replay[0]["seq"] > 3  # what remains is replayed, from after the hole

            other_epoch = await late.join("tiny", since=29, epoch="not-this-one")
            assert other_epoch["recovered"] is False
            ahead = await late.join("tiny", since=99)
            assert ahead["recovered"] is False
            exact = await late.join("tiny", since=30, epoch=joined["epoch"])
            assert exact["recovered"] is True
            await late.close()
            await writer.close()
    finally:
        redis.stop()


async def test_session_resumes_on_another_host(cluster: list[Host]) -> None:
    writer = await Client.connect(cluster[0].ws, "writer2")
    member = await Client.connect(cluster[0].ws, "wanderer")
    try:
        for room in ("s-one", "s-two"):
            await writer.join(room)
            await member.join(room)
        for n in range(3):
            for room in ("s-one", "s-two"):
                await writer.request("publish", "ack", room=room, data=n)
        await member.wait_messages("s-two", 3)
        sid = member.welcome["session"]
        await member.close()  # orderly close: the checkpoint is written before it completes
        for room in ("s-one", "s-two"):
            await writer.request("publish", "ack", room=room, data="while away")

        back = await Client.connect(cluster[1].ws, "wanderer", session=sid)
        assert back.welcome["resumed"] is True and back.welcome["session"] == sid
        for room in ("s-one", "s-two"):
            joined = await back.expect("joined", room=room)
            assert joined["recovered"] is True
        for room in ("s-one", "s-two"):
            (missed,) = await back.wait_messages(room, 1)
            assert missed["seq"] == 4 and missed["data"] == "while away"
        await back.close()

        stranger = await Client.connect(cluster[1].ws, "someone-else", session=sid)
        assert stranger.welcome["resumed"] is False and stranger.welcome["session"] != sid
        await stranger.close()
    finally:
        await writer.close()


# -- refresh and expiry --------------------------------------------------------------------------------


async def test_refresh_extends_and_expiry_closes_4001(cluster: list[Host]) -> None:
    short = await Client.connect(cluster[0].ws, "brief", token=token("brief", ttl=-28))  # 2 s left in leeway
    refreshed = await Client.connect(cluster[0].ws, "kept", token=token("kept", ttl=-28))
    try:
        reply = await refreshed.request("refresh", "refreshed", token=token("kept", ttl=600))
        assert reply["exp"] > time.time() + 500
        wrong = await refreshed.request("refresh", "error", token=token("intruder"))
        assert wrong["code"] == "forbidden"
        await asyncio.wait_for(short.closed.wait(), 10)
        assert short.close_code == 4001
        assert not refreshed.closed.is_set()
        await refreshed.request("ping", "pong")
    finally:
        await short.close()
        await refreshed.close()


# -- drain --------------------------------------------------------------------------------------------------


async def test_drain_migrates_everyone_without_loss() -> None:
    redis = start_redis()
    try:
        with hosts(("drain-a", redis.url), ("drain-b", redis.url), args=FAST) as (a, b):
            members = [ResumingClient([a.ws, b.ws], f"m{i}", ["news"]) for i in range(20)]
            publisher = ResilientPublisher([b.ws], "news")
            await start_traffic(members, publisher)

            assert [m.welcomes[-1]["node"] for m in members] == ["drain-a"] * 20
            assert a.active_connections() == 20
            status, body = a.request("POST", "/admin/drain")
            assert status == 202 and json.loads(body)["draining"] == 20
            assert a.get("/health")[0] == 503
            async with aiohttp.ClientSession() as http:
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await http.ws_connect(a.ws, params={"token": token("late")})
                assert refused.value.status == 503

            report = await asyncio.to_thread(wait_for, a.drained, 20, "drain report")
            assert report["migrated"] == 20 and report["failed"] == 0
            assert a.active_connections() == 0
            last = await stop_traffic(members, publisher)  # publishing went on after the move
            assert all(m.migrations == 1 and 1001 in m.close_codes for m in members)
            assert all(m.welcomes[-1]["node"] == "drain-b" and m.welcomes[-1]["resumed"] for m in members)
            assert not publisher.errors and publisher.reconnects == 0
            assert_complete(members, "news", last)

            assert a.request("DELETE", "/admin/drain")[0] == 200
            wait_for(a.healthy, 5, "undrained host healthy")
    finally:
        redis.stop()


# -- rolling restart and crashes ---------------------------------------------------------------------------


async def test_sighup_rolls_workers_without_refusing_a_connection() -> None:
    redis = start_redis()
    try:
        with hosts(("roll", redis.url), args=FAST) as (host,):
            before = host.worker_pids()
            members = [ResumingClient([host.ws], f"r{i}", ["roll-room"]) for i in range(10)]
            publisher = ResilientPublisher([host.ws], "roll-room", interval=0.02)
            await start_traffic(members, publisher)

            attempts = failures = welcomed = 0
            why: list[str] = []
            stop = asyncio.Event()

            async def connect_forever() -> None:
                nonlocal attempts, failures, welcomed
                async with aiohttp.ClientSession() as http:
                    while not stop.is_set():
                        attempts += 1
                        try:
                            async with http.ws_connect(host.ws, params={"token": token("prober")}) as ws:
                                first = await ws.receive(timeout=5)
                                if first.type is not aiohttp.WSMsgType.TEXT or '"welcome"' not in first.data:
                                    failures += 1
                                    why.append(f"first frame {first.type.name}: {first.data!r:.80}")
                                else:
                                    welcomed += 1
                        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                            failures += 1
                            why.append(repr(exc))

            probes = [asyncio.create_task(connect_forever()) for _ in range(3)]
            await until(lambda: welcomed >= 6, 10, lambda: f"probes welcomed before the roll ({welcomed}/6)")
            host.signal(signal.SIGHUP)
            await asyncio.to_thread(
                wait_for,
                lambda: (
                    not set(host.worker_pids()) & set(before)
                    and len(host.worker_pids()) == 2
                    and host.healthy()
                ),
                60,
                "every worker replaced",
            )
            rolled_at = welcomed
            await until(
                lambda: welcomed >= rolled_at + 6,
                10,
                lambda: f"probes welcomed by the new workers ({welcomed - rolled_at} of 6)",
            )
            stop.set()
            await asyncio.gather(*probes)
            last = await stop_traffic(members, publisher)
            assert attempts > 20 and failures == 0, f"{failures} of {attempts} attempts failed: {why}"
            assert_complete(members, "roll-room", last)
            assert sorted(publisher.acked.values()) == list(range(1, last + 1))
    finally:
        redis.stop()


async def test_killed_worker_is_replaced_and_clients_resume_without_loss() -> None:
    redis = start_redis()
    try:
        with hosts(("crash", redis.url), args=FAST) as (host,):
            members = [ResumingClient([host.ws], f"k{i}", ["crash-room"]) for i in range(16)]
            publisher = ResilientPublisher([host.ws], "crash-room", interval=0.02)
            await start_traffic(members, publisher)
            victim = host.worker_pids()[0]
            psutil.Process(victim).kill()
            killed_at = time.monotonic()
            await asyncio.to_thread(
                wait_for,
                lambda: len(host.worker_pids()) == 2 and victim not in host.worker_pids(),
                5,
                "replacement worker",
            )
            replaced_in = time.monotonic() - killed_at
            await asyncio.to_thread(wait_for, host.healthy, 5, "host healthy")
            last = await stop_traffic(members, publisher)  # the killed worker's members resumed first
            assert replaced_in < 2.0
            assert any(m.reconnects for m in members), "no member was on the killed worker"
            assert_complete(members, "crash-room", last)
            assert sorted(publisher.acked.values()) == list(range(1, last + 1))
    finally:
        redis.stop()


async def test_pubsub_connection_killed_by_redis_leaves_no_gap() -> None:
    redis = start_redis()
    try:
        with hosts(("pubsub", redis.url), args=FAST) as (host,):
            members = [ResumingClient([host.ws], f"p{i}", ["ps-room"]) for i in range(10)]
            publisher = ResilientPublisher([host.ws], "ps-room", interval=0.005)
            await start_traffic(members, publisher)
            for _ in range(3):
                killed = redis.cli("CLIENT", "KILL", "TYPE", "pubsub")
                assert int(killed) >= 2
                await until(lambda: _both_subscribed(redis), 10, "both workers' pub/sub connections back")
                await all_reached(members, "ps-room", publisher.last_seq + FLOW)
            last = await stop_traffic(members, publisher)
            assert all(m.reconnects == 0 for m in members), "sockets should not notice"
            assert_complete(members, "ps-room", last)
            _, text = host.get("/metrics", {"Accept": "text/plain"})
            assert b"rtc_pubsub_reconnects_total" in text
    finally:
        redis.stop()


async def _both_subscribed(redis: RedisServer) -> bool:
    """Whether redis-server has a pub/sub connection from each of the two workers."""
    listed = await asyncio.to_thread(redis.cli, "CLIENT", "LIST", "TYPE", "pubsub")
    return len(listed.splitlines()) >= 2
