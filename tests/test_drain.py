"""Host drain control against a real host: DELETE stops a drain in progress, and a drain
started again after it runs alone and reports only what it migrated."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.client import Client
from tests.rtcproc import Host, RedisServer, hosts, wait_for

pytestmark = pytest.mark.timeout(120)

CONNECTIONS = 12
INTERVAL = 0.5  # one connection per worker every half second: a drain takes seconds


def closed(clients: list[Client]) -> int:
    return sum(c.closed.is_set() for c in clients)


async def finished_drain(host: Host) -> dict[str, Any]:
    report: dict[str, Any] = await asyncio.to_thread(
        wait_for, lambda: (r := host.drain_report())["done"] and r, 30, "drain done"
    )
    return report


@contextlib.asynccontextmanager
async def slow_drain_host(node_id: str, redis: RedisServer) -> AsyncIterator[tuple[Host, list[Client]]]:
    """A host whose drain closes one connection per worker every INTERVAL, with clients on it."""
    pacing = ("--drain-batch", "1", "--drain-interval", str(INTERVAL), "--rate", "1000")
    with hosts((node_id, redis.url), args=pacing) as (host,):
        clients = [await Client.connect(host.ws, f"{node_id}{i}") for i in range(CONNECTIONS)]
        try:
            yield host, clients
        finally:
            for client in clients:
                await client.close()


async def delete_midway(host: Host, clients: list[Client]) -> int:
    """POST a drain, DELETE it once two connections are closed; returns how many were."""
    assert host.request("POST", "/admin/drain")[0] == 202
    async with asyncio.timeout(10):
        while closed(clients) < 2:
            await asyncio.wait([asyncio.create_task(c.closed.wait()) for c in clients], timeout=0.1)
    assert host.request("DELETE", "/admin/drain")[0] == 200
    return closed(clients)


async def test_delete_stops_a_drain_in_progress_and_a_new_one_runs_alone(redis_server: RedisServer) -> None:
    async with slow_drain_host("undrain", redis_server) as (host, clients):
        at_delete = await delete_midway(host, clients)
        await asyncio.to_thread(wait_for, host.healthy, 5, "healthy after DELETE")
        # Nothing to await: the point is that nothing happens for several drain steps.
        await asyncio.sleep(5 * INTERVAL)
        after = closed(clients)
        # A batch already being closed when DELETE arrived may finish: one per worker.
        assert after <= at_delete + host.workers, f"{after - at_delete} closed after DELETE"
        clients.append(await Client.connect(host.ws, "late"))  # upgrades are accepted again

        remaining = len(clients) - closed(clients)
        assert host.request("POST", "/admin/drain")[0] == 202
        report = await finished_drain(host)
        assert closed(clients) == len(clients)
        assert report["migrated"] == remaining and report["failed"] == 0, report
        assert {c.close_code for c in clients} == {1001}
        print(f"\n{at_delete} closed before DELETE, {after - at_delete} after; second drain {report}")


async def test_delete_then_post_at_once_runs_one_drain(redis_server: RedisServer) -> None:
    """DELETE and POST back to back: the first drain stops (at most the batch it was closing
    finishes, unreported) and the second alone closes and reports the rest."""
    async with slow_drain_host("redrain", redis_server) as (host, clients):
        at_delete = await delete_midway(host, clients)
        assert host.request("POST", "/admin/drain")[0] == 202
        report = await finished_drain(host)
        await asyncio.sleep(3 * INTERVAL)  # anything still closing would show now
        assert closed(clients) == CONNECTIONS
        by_first = CONNECTIONS - report["migrated"]
        assert at_delete <= by_first <= at_delete + host.workers, (at_delete, report)


async def test_a_second_post_does_not_start_a_second_drain(redis_server: RedisServer) -> None:
    async with slow_drain_host("twice", redis_server) as (host, _):
        assert host.request("POST", "/admin/drain")[0] == 202
        assert host.request("POST", "/admin/drain")[0] == 202
        report = await finished_drain(host)
        assert report["migrated"] == CONNECTIONS and report["failed"] == 0, report
        _, text = host.get("/metrics", {"Accept": "text/plain"})
        drains = [line for line in text.decode().splitlines() if line.startswith("rtc_drains_total")]
        # one drain, counted once by each worker (docs/operations.md)
        assert sorted(drains) == [f'rtc_drains_total{{worker="{i}"}} 1.0' for i in range(host.workers)], (
            drains
        )
