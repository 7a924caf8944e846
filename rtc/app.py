"""A worker's aiohttp app: its routes (the handlers live in `websocket`, `endpoints`, `api`)."""

from __future__ import annotations

import os

from aiohttp import web

from rtc import endpoints
from rtc.api import ServerApi, add_api_routes
from rtc.appstate import STATE, SUPERVISOR_PID, WorkerState
from rtc.websocket import websocket

__all__ = ["build_app"]


def build_app(state: WorkerState) -> web.Application:
    app = web.Application(client_max_size=64 * 1024)
    app[STATE] = state
    app[SUPERVISOR_PID] = os.getppid()  # built in the worker, which the supervisor forked
    app.router.add_get("/ws", websocket)
    app.router.add_get("/health", endpoints.health)
    app.router.add_get("/livez", endpoints.livez)
    app.router.add_get("/metrics", endpoints.metrics_endpoint)
    app.router.add_route("*", "/admin/drain", endpoints.admin_drain)
    app.router.add_get("/admin/ring", endpoints.admin_ring)
    app.router.add_get("/dashboard", endpoints.dashboard)
    app.router.add_get("/dashboard/data", endpoints.dashboard_data)
    app.router.add_get("/dashboard/events", endpoints.dashboard_events)
    app.router.add_get("/client.js", endpoints.client_js)
    if state.settings.api_keys:
        state.api = ServerApi(state.settings, state.node, state.broker, state.host_connections.api_rate)
        add_api_routes(app, state.api)
    if state.settings.demo:
        app.router.add_get("/demo", endpoints.demo)
        app.router.add_post("/demo/token", endpoints.demo_token)
    if state.settings.conformance_echo:
        app.router.add_get("/echo", endpoints.echo)
    return app
