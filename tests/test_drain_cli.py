"""`rtc drain` and `rtc status` against live hosts: the admin token from a file when the host is
not reached on its loopback, and the drain pacing flags setting the migration rate."""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web

from tests.client import Client
from tests.rtcproc import Host, RedisServer, hosts, token


async def _rtc(*argv: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "rtc",
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.fixture
async def forwarding_proxy(redis: RedisServer) -> AsyncIterator[tuple[Host, str]]:
    """A host behind a minimal reverse proxy that, like HAProxy, adds X-Forwarded-For: to the
    host the requests come from outside its loopback, so /admin needs the token."""
    with hosts(("proxied", redis.url), workers=1) as (host,):
        async with aiohttp.ClientSession() as upstream:

            async def forward(request: web.Request) -> web.Response:
                headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
                headers["X-Forwarded-For"] = "203.0.113.7"
                async with upstream.request(
                    request.method, host.http + request.path_qs, headers=headers, data=await request.read()
                ) as response:
                    return web.Response(
                        status=response.status, body=await response.read(), content_type=response.content_type
                    )

            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", forward)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            try:
                yield host, f"http://127.0.0.1:{port}"
            finally:
                await runner.cleanup()


async def test_drain_and_status_use_the_token_file(
    forwarding_proxy: tuple[Host, str], tmp_path: Path
) -> None:
    host, url = forwarding_proxy
    status, _, err = await _rtc("drain", "--url", url, "--timeout", "10")
    assert status == 1 and "Forbidden" in err, err
    assert orjson.loads(host.get("/metrics")[1])["draining"] is False
    admin = tmp_path / "admin-token"
    admin.write_text(token("ops", admin=True) + "\n")
    status, out, err = await _rtc("drain", "--url", url, "--timeout", "10", "--token-file", str(admin))
    assert status == 0, err
    assert "drained in" in out
    status, out, err = await _rtc("status", "--url", url, "--token-file", str(admin))
    assert status == 0, err
    assert orjson.loads(out)["draining"] is True
    missing = tmp_path / "nowhere"
    status, _, err = await _rtc("status", "--url", url, "--token-file", str(missing))
    assert status == 2 and err.startswith("rtc: --token-file: cannot read"), err


@pytest.mark.parametrize("batch, interval, groups", [(3, 1.0, [3, 3, 3]), (9, 1.0, [9])])
async def test_drain_pacing_sets_the_migration_rate(
    redis: RedisServer, batch: int, interval: float, groups: list[int]
) -> None:
    """`--drain-batch B --drain-interval S`: clients are told to migrate B at a time, S apart."""
    args = ["--drain-batch", str(batch), "--drain-interval", str(interval)]
    with hosts((f"paced{batch}", redis.url), workers=1, args=args) as (host,):
        clients = [await Client.connect(host.ws, f"user{i}") for i in range(9)]
        try:

            async def told_at(client: Client) -> float:
                await client.expect("status", timeout=30, status="migrating")
                return time.monotonic()

            waits = [asyncio.create_task(told_at(c)) for c in clients]
            status, _, err = await _rtc("drain", "--url", host.http, "--timeout", "30")
            assert status == 0, err
            times = sorted(await asyncio.gather(*waits))
        finally:
            for client in clients:
                await client.close()
    # Batches are written in one loop turn; between them the worker sleeps `interval`.
    sizes = [1]
    for before, after in itertools.pairwise(times):
        if after - before > interval / 2:
            sizes.append(1)
        else:
            sizes[-1] += 1
    print(f"batch {batch}, interval {interval}s: groups {sizes}, spread {times[-1] - times[0]:.2f}s")
    assert sizes == groups, times
    assert times[-1] - times[0] >= (len(groups) - 1) * interval * 0.9
