"""Serve an aiohttp app on uvloop until SIGTERM or SIGINT (shared by the baselines)."""

from __future__ import annotations

import asyncio
import signal

import uvloop
from aiohttp import web

__all__ = ["health", "serve"]


async def health(_request: web.Request) -> web.Response:
    """``GET /health``: lets the compare mode know the server listens."""
    return web.json_response({"status": "ok"})


async def _serve(app: web.Application, host: str, port: int) -> None:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        # A deep accept queue: connect storms would otherwise wait for SYN retransmits.
        await web.TCPSite(runner, host, port, backlog=4096).start()
        await stop.wait()
    finally:
        await runner.cleanup()


def serve(app: web.Application, host: str, port: int) -> None:
    """Run ``app`` on ``host:port`` until a stop signal."""
    uvloop.run(_serve(app, host, port))
