"""A worker's HTTP endpoints beside `/ws` and `/api`: health, metrics, admin and pages."""

from __future__ import annotations

import asyncio
import os
import time
from importlib import resources
from pathlib import Path
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from rtc import hostmetrics, keys
from rtc.appstate import STATE, SUPERVISOR_PID, WorkerState, require_admin
from rtc.auth import mint

__all__ = [
    "DEMO_ROOMS",
    "DEMO_TOKEN_TTL",
    "admin_drain",
    "admin_ring",
    "client_js",
    "dashboard",
    "dashboard_data",
    "dashboard_events",
    "demo",
    "demo_token",
    "echo",
    "health",
    "livez",
    "metrics_endpoint",
]

DEMO_TOKEN_TTL = 600  # the demo page's SDK fetches a new token before this runs out
DEMO_ROOMS = ["demo.*"]  # plus the user's own inbox, which every token may read


# -- health and metrics ------------------------------------------------------------------------------


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    in_ring = state.node.in_ring and set(state.settings.local_slots) <= set(state.node.ring.slots)
    # The worker's last known Redis state: a load balancer's check never waits on Redis.
    redis_ok = state.node.redis_ok
    ok = in_ring and not state.draining
    status = "ok" if ok else ("draining" if state.draining else "starting")
    body = {
        "status": status,
        "node": state.settings.node_id,
        "worker": state.worker,
        "redis": redis_ok,
        "in_ring": in_ring,
    }
    return web.json_response(body, status=200 if ok else 503, dumps=_dumps)


async def livez(request: web.Request) -> web.Response:
    """Liveness: this worker's loop answers and its supervisor still runs, draining or not.

    A dead worker is the supervisor's to replace; a worker whose supervisor is gone or
    stopped (reparented, or in state T/Z) says 503 so Kubernetes restarts the pod.
    """
    state = request.app[STATE]
    supervisor = request.app[SUPERVISOR_PID]
    alive = os.getppid() == supervisor and _process_state(supervisor) not in ("T", "t", "Z", "")
    body = {"status": "alive" if alive else "supervisor gone", "node": state.settings.node_id}
    return web.json_response(body, status=200 if alive else 503, dumps=_dumps)


def _process_state(pid: int) -> str:
    """The state letter of /proc/PID/stat (R, S, T, Z, ...); "" if it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rpartition(")")[2].split()[0]


def _wants_prometheus(request: web.Request) -> bool:
    accept = request.headers.get("Accept", "")
    return "text/plain" in accept or "application/openmetrics-text" in accept


async def metrics_endpoint(request: web.Request) -> web.Response:
    if _wants_prometheus(request):
        body, content_type = hostmetrics.exposition(request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type})
    state = request.app[STATE]
    return web.json_response(
        {**hostmetrics.snapshot(), "node": state.settings.node_id, "draining": state.draining}, dumps=_dumps
    )


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


# -- admin -----------------------------------------------------------------------------------------------


async def admin_ring(request: web.Request) -> web.Response:
    require_admin(request)
    ring = request.app[STATE].node.ring
    body: dict[str, Any] = {"slots": list(ring.slots)}
    if "key" in request.query:
        body["owner"] = ring.owner(request.query["key"])
    return web.json_response(body, dumps=_dumps)


async def admin_drain(request: web.Request) -> web.Response:
    """POST starts a host drain, GET reports it, DELETE undoes it."""
    require_admin(request)
    state = request.app[STATE]
    broker = state.broker
    key = keys.drain(state.settings.node_id, state.node.instance)
    control = keys.host_control(state.settings.node_id)
    if request.method == "POST":
        active = hostmetrics.snapshot()["active_connections"]  # before any is closed
        await broker.set_fields(key, {"active": str(time.time())}, 86400)
        await broker.publish_many([(control, b"drain")])
        return web.json_response({"draining": active}, status=202, dumps=_dumps)
    if request.method == "DELETE":
        await broker.delete(key)
        await broker.publish_many([(control, b"undrain")])
        return web.json_response({"draining": False}, dumps=_dumps)
    if request.method == "GET":
        return web.json_response(await _drain_report(state), dumps=_dumps)
    raise web.HTTPMethodNotAllowed(request.method, ["GET", "POST", "DELETE"])


async def _drain_report(state: WorkerState) -> dict[str, Any]:
    """Progress of the host's drain, summed over the workers' reports."""
    fields = await state.broker.get_fields(keys.drain(state.settings.node_id, state.node.instance))
    reports = [orjson.loads(v) for k, v in fields.items() if k.startswith("w:")]
    done = bool(reports) and all(r["done"] for r in reports) and len(reports) >= state.settings.workers
    return {
        "draining": "active" in fields,
        "done": done,
        "migrated": sum(r["migrated"] for r in reports),
        "failed": sum(r["failed"] for r in reports),
        "seconds": max((r["seconds"] for r in reports), default=0.0),
        "active_connections": hostmetrics.snapshot()["active_connections"],
    }


# -- pages --------------------------------------------------------------------------------------------------


def _static(name: str) -> bytes:
    return resources.files("rtc").joinpath("static", name).read_bytes()


async def dashboard(request: web.Request) -> web.Response:
    require_admin(request)
    return web.Response(body=_static("dashboard.html"), content_type="text/html")


async def dashboard_data(request: web.Request) -> web.Response:
    require_admin(request)
    return web.json_response(_dashboard_snapshot(request.app[STATE]), dumps=_dumps)


async def dashboard_events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: one snapshot a second while the page is open."""
    require_admin(request)
    state = request.app[STATE]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    while not state.draining:
        await response.write(b"data: " + orjson.dumps(_dashboard_snapshot(state)) + b"\n\n")
        await asyncio.sleep(1.0)
    return response


def _dashboard_snapshot(state: WorkerState) -> dict[str, Any]:
    snap = hostmetrics.snapshot()
    return {
        "node": state.settings.node_id,
        "draining": state.draining,
        "workers": snap.pop("workers"),
        "latency_ms": snap.pop("latency_ms"),
        "totals": snap,
        "ring": {"slots": list(state.node.ring.slots)},
        "ts": int(time.time() * 1000),
    }


async def client_js(request: web.Request) -> web.Response:
    """The JavaScript SDK as an ES module (no auth: it holds no secret)."""
    return web.Response(
        body=_static("client.js"),
        content_type="text/javascript",
        headers={"Cache-Control": "public, max-age=300"},
    )


async def demo(request: web.Request) -> web.Response:
    return web.Response(body=_static("demo.html"), content_type="text/html")


async def demo_token(request: web.Request) -> web.Response:
    """Development tokens for the demo page (only with --demo: never in production).

    Short-lived and confined to `demo.*` rooms (and the user's own inbox), so a demo left
    on by mistake still mints nothing that opens a real room.
    """
    state = request.app[STATE]
    try:
        body = await request.json(loads=orjson.loads)
        user = body["user"]
        if not isinstance(user, str) or not 0 < len(user) <= 64 or "@" in user:
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise web.HTTPBadRequest(
            text='{"error":"user must be a short name"}', content_type="application/json"
        ) from None
    if not state.settings.jwt_secret:
        raise web.HTTPServiceUnavailable(
            text='{"error":"demo needs an HMAC secret"}', content_type="application/json"
        )
    token = mint(
        state.settings.jwt_secret,
        user,
        now=time.time(),
        ttl=DEMO_TOKEN_TTL,
        rooms=DEMO_ROOMS,
        algorithm=state.settings.jwt_algorithms[0],
    )
    return web.json_response({"token": token}, dumps=_dumps)


async def echo(request: web.Request) -> web.WebSocketResponse:
    """Autobahn conformance only: echo with the same limits and settings as `/ws`."""
    settings = request.app[STATE].settings
    ws = web.WebSocketResponse(
        max_msg_size=settings.max_message_bytes + 1, compress=False, heartbeat=settings.ws_heartbeat
    )
    await ws.prepare(request)
    async for msg in ws:
        if msg.type is WSMsgType.TEXT:
            await ws.send_str(msg.data)
        elif msg.type is WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws
