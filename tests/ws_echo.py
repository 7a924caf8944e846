"""A tiny stand-in for an rtc host, for proxy and ops-script tests.

It answers like rtc where the proxies and scripts look (`/health`, `/ws`,
`/admin/drain`, JSON `/metrics`) and tells which backend served a request, so a
test can see where HAProxy or NGINX sent it. Run as a script; it prints
``LISTENING <port>`` once it accepts connections. Control endpoints under
``/_ctl`` are for the test, talking to the backend directly, never through a
proxy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import WSCloseCode, web

__all__ = ["EchoBackend", "make_app", "run_echo_backend"]

ADMIN_REACHED = "ADMIN-REACHED"


@dataclass
class _State:
    name: str
    health_status: int = 200
    ws_status: int = 101
    draining: bool = False
    drain_closes: bool = True
    admin_hits: int = 0
    sockets: set[web.WebSocketResponse] = field(default_factory=set)
    drain_task: asyncio.Task[None] | None = None


STATE = web.AppKey("state", _State)


async def _health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response(
        {"status": "ok" if state.health_status == 200 else "unavailable"},
        status=state.health_status,
    )


async def _ws(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    if state.ws_status != 101:
        return web.Response(status=state.ws_status, text=state.name)
    # heartbeat=0 disables the server's pings, to see a proxy's idle timeout fire.
    heartbeat = float(request.query.get("heartbeat", "1")) or None
    ws = web.WebSocketResponse(heartbeat=heartbeat)
    await ws.prepare(request)
    state.sockets.add(ws)
    try:
        await ws.send_str(json.dumps({"type": "welcome", "node": state.name}))
        async for msg in ws:
            await ws.send_str(msg.data)
    finally:
        state.sockets.discard(ws)
    return ws


async def _whoami(request: web.Request) -> web.Response:
    headers = {k: request.headers.get(k) for k in ("X-Forwarded-For", "Forwarded", "X-Real-IP")}
    return web.json_response({"node": request.app[STATE].name, "path": request.path, "headers": headers})


async def _admin(request: web.Request) -> web.Response:
    """Any /admin, /metrics or /dashboard request that reaches a backend through a proxy is a leak."""
    state = request.app[STATE]
    state.admin_hits += 1
    if request.path == "/admin/drain" and request.method == "POST":
        state.draining = True
        state.health_status = 503
        state.ws_status = 503
        if state.drain_closes:
            state.drain_task = asyncio.get_running_loop().create_task(_close_slowly(state))
        return web.json_response({"draining": len(state.sockets)}, status=202)
    if request.path == "/metrics":
        return web.json_response({"active_connections": len(state.sockets), "node": state.name})
    return web.Response(text=ADMIN_REACHED)


async def _close_slowly(state: _State) -> None:
    """Close sockets one every 0.2 s, as a paced drain would."""
    while state.sockets:
        await asyncio.sleep(0.2)  # the paced drain's step, not a wait
        ws = next(iter(state.sockets))
        state.sockets.discard(ws)
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"drain")


async def _ctl(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if "reset" in request.query:
        state.health_status, state.ws_status, state.admin_hits = 200, 101, 0
        state.draining, state.drain_closes = False, True
    if "health" in request.query:
        state.health_status = int(request.query["health"])
    if "ws" in request.query:
        state.ws_status = int(request.query["ws"])
    if "drain_closes" in request.query:
        state.drain_closes = request.query["drain_closes"] == "1"
    return web.json_response(
        {
            "node": state.name,
            "health": state.health_status,
            "ws": state.ws_status,
            "admin_hits": state.admin_hits,
            "draining": state.draining,
            "sockets": len(state.sockets),
        }
    )


async def _close_all(app: web.Application) -> None:
    for ws in list(app[STATE].sockets):
        await ws.close(code=WSCloseCode.GOING_AWAY)


def make_app(name: str) -> web.Application:
    app = web.Application()
    app[STATE] = _State(name)
    app.router.add_get("/health", _health)
    app.router.add_get("/ws", _ws)
    app.router.add_get("/whoami", _whoami)
    app.router.add_route("*", "/_ctl", _ctl)
    for path in ("/metrics", "/dashboard", "/dashboard/{tail:.*}", "/admin/{tail:.*}"):
        app.router.add_route("*", path, _admin)
    app.on_shutdown.append(_close_all)
    return app


async def _serve(host: str, port: int, name: str) -> None:
    runner = web.AppRunner(make_app(name), handle_signals=False)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    await web.SockSite(runner, sock).start()
    print("LISTENING", sock.getsockname()[1], flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()


@dataclass(frozen=True)
class EchoBackend:
    name: str
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@contextmanager
def run_echo_backend(name: str, host: str, log_dir: Path) -> Iterator[EchoBackend]:
    """Start this module as a child on ``host`` (a free port) and stop it by its PID."""
    log = (log_dir / f"echo-{name}.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, __file__, "--host", host, "--port", "0", "--name", name],
        stdout=subprocess.PIPE,
        stderr=log,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        if not line.startswith("LISTENING "):
            raise RuntimeError(f"echo backend {name} did not start: {line!r}")
        yield EchoBackend(name, host, int(line.split()[1]))
    finally:
        from tests.rtcproc import stop_process  # here: this file also runs as a plain script

        stop_process(proc)
        if proc.stdout is not None:
            proc.stdout.close()
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--name", required=True)
    args = parser.parse_args()
    asyncio.run(_serve(args.host, args.port, args.name))


if __name__ == "__main__":
    main()
