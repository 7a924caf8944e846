"""WebSocket clients for a host the test cannot import into: run as a program, e.g. inside a
container's network namespace (tests/nspawn.py), reporting one JSON object on stdout.

    python -m tests.ws_probe loop URL TOKEN   connect, await `welcome`, close; again, until
                                              SIGTERM; report attempts and every failure
    python -m tests.ws_probe hold URL TOKEN N open N connections, print "held", then wait
                                              until the server closes each; report close
                                              codes and whether `migrating` came first
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from typing import Any

import aiohttp
import orjson

__all__ = ["main"]

PACE = 0.04  # seconds between connects: 25 a second


async def _welcome(http: aiohttp.ClientSession, url: str, token: str) -> aiohttp.ClientWebSocketResponse:
    ws = await http.ws_connect(url, params={"token": token})
    frame = orjson.loads((await ws.receive(timeout=10)).data)
    if frame.get("type") != "welcome":
        raise RuntimeError(f"first frame {frame}")
    return ws


async def _loop(url: str, token: str) -> dict[str, Any]:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("looping", flush=True)
    attempts, failures = 0, []
    async with aiohttp.ClientSession() as http:
        while not stop.is_set():
            attempts += 1
            try:
                ws = await _welcome(http, url, token)
                await ws.close()
            except Exception as exc:  # every kind of refusal is what the report is for
                failures.append(f"{type(exc).__name__}: {exc}")
            # Pacing, not synchronisation: the shipped environment file allows 50 upgrades
            # a second per address (RTC_CONNECT_RATE), and this loop is one address.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), PACE)
    return {"attempts": attempts, "failures": failures}


async def _hold(url: str, token: str, count: int) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        sockets = [await _welcome(http, url, token) for _ in range(count)]
        print("held", flush=True)

        async def until_closed(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
            migrating = False
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    frame = orjson.loads(msg.data)
                    migrating = migrating or frame.get("status") == "migrating"
            return {"code": ws.close_code, "migrating": migrating}

        closes = await asyncio.wait_for(asyncio.gather(*(until_closed(ws) for ws in sockets)), 120)
    return {"closes": closes}


def main(argv: list[str]) -> int:
    mode, url, token, *rest = argv
    with contextlib.suppress(KeyboardInterrupt):
        report = asyncio.run(_loop(url, token) if mode == "loop" else _hold(url, token, int(rest[0])))
        print(orjson.dumps(report).decode(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
