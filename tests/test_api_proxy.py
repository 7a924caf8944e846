"""The shipped HAProxy and NGINX configs let only the listed networks reach `/api/`.

A real rtc host with API keys behind the real proxy, rendered from the shipped files
by tests/proxies.py. Requests come from two loopback source addresses: 127.0.0.1 is
in the configs' default list (the proxy's own machine), 127.0.0.5 stands for the
public side. The public side gets 403 for every spelling of the API path and still
reaches everything else.
"""

from __future__ import annotations

import http.client
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.proxies import RunningProxy, require_program, run_haproxy, run_nginx
from tests.rtcproc import Host, RedisServer, start_host

pytestmark = pytest.mark.timeout(60)

KEY = "proxy-key-0123456789abcdef"
BACKEND_SIDE = "127.0.0.1"
PUBLIC_SIDE = "127.0.0.5"


@pytest.fixture(scope="module")
def host(redis_server: RedisServer) -> Iterator[Host]:
    for program in ("haproxy", "nginx"):
        require_program(program)
    started = start_host("apiproxy", redis_server.url, workers=1, args=("--api-keys", f"app:{KEY}"))
    yield started
    started.stop()
    shutil.rmtree(started.runtime_dir, ignore_errors=True)


@pytest.fixture(params=["haproxy", "nginx"])
def proxy(request: pytest.FixtureRequest, host: Host, tmp_path: Path) -> Iterator[RunningProxy]:
    run = run_haproxy if request.param == "haproxy" else run_nginx
    with run(tmp_path / request.param, [host]) as running:
        yield running


def _call(
    proxy: RunningProxy, source: str, method: str, path: str, key: str | None = KEY
) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5, source_address=(source, 0))
    try:
        headers = {"Content-Type": "application/json"}
        if key:
            headers["X-API-Key"] = key
        body = json.dumps({"room": "proxied", "data": 1}).encode() if method == "POST" else None
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _wait_up(proxy: RunningProxy) -> None:
    from tests.rtcproc import wait_for

    wait_for(lambda: _call(proxy, BACKEND_SIDE, "GET", "/health")[0] == 200, 10, "rtc behind the proxy")


def test_backends_network_reaches_the_api(proxy: RunningProxy) -> None:
    _wait_up(proxy)
    status, body = _call(proxy, BACKEND_SIDE, "POST", "/api/publish")
    assert status == 200, body
    assert json.loads(body)["room"] == "proxied"
    status, body = _call(proxy, BACKEND_SIDE, "POST", "/api/publish", key=None)
    assert status == 401, body  # rtc's own answer: the proxy only filters networks


def test_public_side_is_refused_every_spelling_of_the_api(proxy: RunningProxy) -> None:
    _wait_up(proxy)
    for method, path in (
        ("POST", "/api/publish"),
        ("GET", "/api/info"),
        ("GET", "/api/openapi.json"),
        ("POST", "//api/publish"),
        ("POST", "/%61pi/publish"),
        ("POST", "/ws/../api/publish"),
        ("GET", "/api/rooms/x/history"),
    ):
        status, body = _call(proxy, PUBLIC_SIDE, method, path)
        assert status == 403, (proxy.kind, path, status, body[:200])
    # Everything public still works from there.
    assert _call(proxy, PUBLIC_SIDE, "GET", "/health")[0] == 200
    assert _call(proxy, PUBLIC_SIDE, "GET", "/client.js")[0] == 200
