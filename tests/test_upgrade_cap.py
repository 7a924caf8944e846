"""A worker takes at most UPGRADES_IN_FLIGHT upgrades from the 101 to `welcome` at once;
the others wait their turn and then complete."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest

from rtc.appstate import UPGRADES_IN_FLIGHT
from tests.rtcproc import Host, RedisServer, token, until

pytestmark = pytest.mark.timeout(60)

CLIENTS = UPGRADES_IN_FLIGHT + 24


async def test_upgrades_past_the_cap_wait_their_turn_then_all_are_welcomed(
    host_and_redis: tuple[RedisServer, Host],
) -> None:
    redis, host = host_and_redis
    # Writes held: every upgrade let through stops at its session write, after its 101.
    redis.cli("CLIENT", "PAUSE", "30000", "WRITE")
    upgraded: list[aiohttp.ClientWebSocketResponse] = []
    async with aiohttp.ClientSession() as http:

        async def connect(i: int) -> None:
            ws = await http.ws_connect(host.ws, params={"token": token(f"u{i}")})
            upgraded.append(ws)

        tasks = [asyncio.create_task(connect(i)) for i in range(CLIENTS)]
        try:
            await until(lambda: len(upgraded) >= UPGRADES_IN_FLIGHT, 10, "the first upgrades")
            await asyncio.sleep(1.0)  # watching for an upgrade past the cap: none may come
            assert len(upgraded) == UPGRADES_IN_FLIGHT
        finally:
            redis.cli("CLIENT", "UNPAUSE")
        await asyncio.wait_for(asyncio.gather(*tasks), 20)
        welcomes = [orjson.loads((await ws.receive(timeout=10)).data) for ws in upgraded]
        assert [w["type"] for w in welcomes] == ["welcome"] * CLIENTS
        for ws in upgraded:
            await ws.close()
