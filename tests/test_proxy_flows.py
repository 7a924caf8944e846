"""Issue 5's must-show flows through the real HAProxy and the real NGINX.

Two real rtc hosts, ``a`` on 127.0.0.2 and ``b`` on 127.0.0.3 (two workers
each), share one real redis-server; the shipped ``haproxy/haproxy.cfg`` and
``nginx/*.conf``, rendered by ``tests/proxies.py`` for loopback with short
timeouts and a 0.3 s health-check interval, run in front of them on
127.0.0.1. Every test runs once per proxy:

1. clients that connect through the proxy spread over both hosts and a
   publish reaches members on both (cross-host through Redis);
2. draining a host (POST /admin/drain on its own address, as an operator on
   the host would) takes it out of the proxy's rotation (HAProxy: its active
   check marks it DOWN; NGINX: its 503 handshake is retried on the other
   host), new connections land on the other host, and the drained clients,
   whose only URL is the proxy's, resume their session through the proxy
   without losing a message while a publisher keeps publishing;
3. ``/admin/drain`` through the proxy is refused, even with an admin token,
   and no host is drained;
4. an idle WebSocket stays open past the proxy's client, server and tunnel
   timeouts because rtc's heartbeat (--ws-heartbeat 1) crosses the tunnel.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import aiohttp
import pytest

from tests.client import FLOW, Client, ResilientPublisher, ResumingClient, all_reached, assert_complete
from tests.proxies import (
    TEST_TIMEOUTS,
    RunningProxy,
    haproxy_server_status,
    require_program,
    run_haproxy,
    run_nginx,
)
from tests.rtcproc import Host, settle_ring, start_host, start_redis, token, until, wait_for

pytestmark = pytest.mark.timeout(90)

HEARTBEAT_S = 1.0
HOST_ARGS = (
    "--rate", "1000", "--rate-burst", "1000",
    "--ws-heartbeat", str(HEARTBEAT_S),
    # As deployed: the proxy's X-Forwarded-For names the client.
    "--trusted-proxies", "127.0.0.1/32",
)  # fmt: skip
# HAProxy names the servers after their order in the backend list: [a, b].
SERVER_OF = {"a": "rtc1", "b": "rtc2"}


# --- fixtures ---------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[Host, Host]]:
    """Hosts ``a`` (127.0.0.2) and ``b`` (127.0.0.3) sharing one Redis."""
    for program in ("haproxy", "nginx", "redis-server"):
        require_program(program)
    redis = start_redis()
    with ExitStack() as stack:
        stack.callback(redis.stop)
        started: list[Host] = []
        for node_id, address in (("a", "127.0.0.2"), ("b", "127.0.0.3")):
            host = start_host(node_id, redis.url, host=address, args=HOST_ARGS)
            stack.callback(shutil.rmtree, host.runtime_dir, True)
            stack.callback(host.stop)
            started.append(host)
        settle_ring(started)
        yield started[0], started[1]


@pytest.fixture
def serving(cluster: tuple[Host, Host]) -> Iterator[tuple[Host, Host]]:
    """Both hosts serving before the test and again after it (a drain is undone)."""
    assert all(h.healthy() for h in cluster)
    yield cluster
    for host in cluster:
        if host.drain_report()["draining"]:
            assert host.request("DELETE", "/admin/drain")[0] == 200
    wait_for(lambda: all(h.healthy() for h in cluster), 10, "hosts serving again")


@pytest.fixture(params=["haproxy", "nginx"])
def proxy(
    request: pytest.FixtureRequest, serving: tuple[Host, Host], tmp_path: Path
) -> Iterator[RunningProxy]:
    run = run_haproxy if request.param == "haproxy" else run_nginx
    with run(tmp_path / request.param, list(serving)) as running:
        if running.kind == "haproxy":
            wait_for(
                lambda: all(_server_status(running, s) == "UP" for s in ("rtc1", "rtc2")),
                10,
                "both servers UP in HAProxy",
            )
        yield running


# --- helpers ----------------------------------------------------------------


def _server_status(proxy: RunningProxy, server: str) -> str:
    return haproxy_server_status(proxy, "be_rtc_ws", server)


def _ws(proxy: RunningProxy) -> str:
    return f"{proxy.ws_url}/ws"


async def _handshakes_logged(proxy: RunningProxy, count: int) -> str:
    """The proxy's log once ``count`` WebSocket handshakes are in it.

    NGINX logs an upgraded request when the tunnel ends, HAProxy when the
    handshake response has been relayed.
    """
    pattern = re.compile(r"/ws\b")

    def logged() -> str | None:
        log = proxy.log_text()
        return log if len(pattern.findall(log)) >= count else None

    log: str = await until(logged, 5, f"{count} WebSocket handshakes in the {proxy.kind} log", 0.1)
    return log


# --- 1. spread and cross-host delivery -----------------------------------------


async def test_clients_spread_over_both_hosts_and_messages_cross_hosts(
    proxy: RunningProxy,
) -> None:
    """Least connections spreads held WebSockets; a publish reaches both hosts' members."""
    room = f"spread-{proxy.kind}"
    members = [await Client.connect(_ws(proxy), f"spread{i}") for i in range(6)]
    sender: Client | None = None
    try:
        nodes = [m.welcome["node"] for m in members]
        assert sorted(nodes) == ["a"] * 3 + ["b"] * 3, nodes
        for member in members:
            await member.join(room)
        sender = await Client.connect(_ws(proxy), "spread-sender")
        await sender.join(room)
        for n in range(20):
            await sender.request("publish", "ack", room=room, data=n)
        for member in members:
            got = await member.wait_messages(room, 20)
            assert [m["seq"] for m in got] == list(range(1, 21)), member.welcome
            assert [m["data"] for m in got] == list(range(20))
            assert {m["from"] for m in got} == {"spread-sender"}
        # The sender sits on one host; the members of the other received its
        # messages through Redis.
        other = {"a": "b", "b": "a"}[sender.welcome["node"]]
        assert other in nodes
    finally:
        for client in [*members, *([sender] if sender else [])]:
            await client.close()


# --- 2. drain through the proxy ------------------------------------------------


async def test_drain_moves_clients_through_the_proxy_without_loss(
    proxy: RunningProxy, serving: tuple[Host, Host]
) -> None:
    a, _ = serving
    url = _ws(proxy)
    room = f"drain-{proxy.kind}"
    members: list[ResumingClient] = []
    publisher = ResilientPublisher([url], room, interval=0.01)
    late: list[Client] = []
    publishing = False
    try:
        for i in range(10):  # one by one: least connections alternates
            members.append(ResumingClient([url], f"{proxy.kind}-m{i}", [room]))
            await members[-1].start()
        first_nodes = [m.welcomes[0]["node"] for m in members]
        assert sorted(first_nodes) == ["a"] * 5 + ["b"] * 5, first_nodes
        await publisher.start()
        publishing = True
        await all_reached(members, room, FLOW)
        acked_before_drain = len(publisher.acked)
        assert acked_before_drain > 0, "the publisher is publishing before the drain"

        started = time.monotonic()
        status, body = a.request("POST", "/admin/drain")  # on a's own address
        assert status == 202, body
        assert a.get("/health")[0] == 503

        if proxy.kind == "haproxy":
            # The active check (inter 0.3 s, fall 2) marks the host DOWN.
            # Until then a drained client's reconnect may reach a and get its
            # 503 (the shipped file has no `retry-on 503`); the client retries.
            await asyncio.to_thread(
                wait_for,
                lambda: _server_status(proxy, SERVER_OF["a"]) == "DOWN",
                2.0,
                "HAProxy to mark the drained host DOWN",
            )
            assert _server_status(proxy, SERVER_OF["b"]) == "UP"
            down_after = time.monotonic() - started
            assert down_after < 2.0, down_after

        # New connections through the proxy all land on b. (NGINX: a's 503
        # answer is retried on b, or a is already skipped as failed.)
        late = [await Client.connect(url, f"{proxy.kind}-late{i}") for i in range(4)]
        assert [c.welcome["node"] for c in late] == ["b"] * 4

        report = await asyncio.to_thread(wait_for, a.drained, 20, "drain report")
        assert report["failed"] == 0, report
        assert report["migrated"] >= first_nodes.count("a"), report
        acked_at_drain_end = len(publisher.acked)
        await all_reached(members, room, publisher.last_seq + FLOW)  # publishing goes on after everyone moved
    finally:
        last = await publisher.stop() if publishing else 0
        await all_reached(members, room, last)
        for member in members:
            await member.stop()
        for client in late:
            await client.close()

    moved = [m for m, node in zip(members, first_nodes, strict=True) if node == "a"]
    stayed = [m for m in members if m not in moved]
    for member in moved:
        final = member.welcomes[-1]
        assert member.migrations == 1 and 1001 in member.close_codes, member.close_codes
        assert final["node"] == "b" and final["resumed"] is True, final
        assert final["session"] == member.welcomes[0]["session"]
    for member in stayed:
        assert member.migrations == 0 and member.reconnects == 0
        assert [w["node"] for w in member.welcomes] == ["b"]
    # Every value was sequenced exactly once, and every member has every seq.
    assert sorted(publisher.acked.values()) == list(range(1, last + 1))
    # Published throughout: before the drain, while clients moved, and after.
    assert 0 < acked_before_drain < acked_at_drain_end < last, (acked_before_drain, acked_at_drain_end, last)
    assert_complete(members, room, last)
    assert not publisher.errors, publisher.errors

    if proxy.kind == "nginx":
        # The shipped proxy_next_upstream retried a 503 handshake on the
        # other host; no client ever saw that 503 itself.
        log = await _handshakes_logged(proxy, len(members) + len(moved) + len(late) + 1)
        assert re.search(r"upstream=127\.0\.0\.2:\d+, 127\.0\.0\.3:\d+ status=503, 101", log), log
        assert not re.search(r'"GET /ws HTTP/1\.1" 503 ', log), log


# --- 3. the admin surface through the proxy ----------------------------------------


async def test_admin_drain_through_the_proxy_is_refused(
    proxy: RunningProxy, serving: tuple[Host, Host]
) -> None:
    admin = token("ops", admin=True)
    attempts: list[tuple[dict[str, str], dict[str, str]]] = [
        ({}, {}),
        ({"Authorization": f"Bearer {admin}"}, {}),
        ({}, {"token": admin}),
    ]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        for headers, params in attempts:
            async with http.post(f"{proxy.url}/admin/drain", headers=headers, params=params) as resp:
                assert resp.status == 403, (headers, params, await resp.text())
        # The same admin token sent straight to a host is accepted (and the
        # forwarding header rules out the loopback exemption): the refusal
        # above is the proxy's.
        a = serving[0]
        async with http.get(
            f"{a.http}/admin/drain",
            headers={"Authorization": f"Bearer {admin}", "X-Forwarded-For": "203.0.113.9"},
        ) as resp:
            assert resp.status == 200
    for host in serving:
        assert host.get("/health")[0] == 200
        assert host.drain_report()["draining"] is False
    # Still serving WebSockets through the proxy.
    client = await Client.connect(_ws(proxy), "after-admin")
    try:
        assert (await client.request("ping", "pong"))["type"] == "pong"
    finally:
        await client.close()


# --- 4. idle WebSocket through the proxy ------------------------------------------


async def test_idle_websocket_outlives_the_proxy_timeouts(proxy: RunningProxy) -> None:
    """rtc's pings (every 1 s) keep the tunnel busy past client/server 2 s and tunnel 3 s.

    The client answers pings as a browser does and sends nothing else.
    ``tests/test_deploy_configs.py`` shows the same rendered proxies cutting a
    tunnel whose backend stays silent, so these timeouts are live.
    """
    idle_for = TEST_TIMEOUTS.tunnel + 1.0
    assert idle_for > max(TEST_TIMEOUTS.client, TEST_TIMEOUTS.server, TEST_TIMEOUTS.http_request)
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(_ws(proxy), params={"token": token("idle")}, autoping=False) as ws,
    ):
        welcome = await ws.receive_json(timeout=5)
        assert welcome["type"] == "welcome"
        pings = 0
        deadline = time.monotonic() + idle_for
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = await ws.receive(timeout=left)
            except TimeoutError:
                break
            assert msg.type is aiohttp.WSMsgType.PING, msg
            pings += 1
            await ws.pong(msg.data)
        assert pings >= idle_for / HEARTBEAT_S - 1, pings
        assert not ws.closed

        await ws.send_json({"type": "ping", "id": "still-here"})
        while (msg := await ws.receive(timeout=5)).type is aiohttp.WSMsgType.PING:
            await ws.pong(msg.data)
        assert msg.type is aiohttp.WSMsgType.TEXT, msg
        assert json.loads(msg.data) == {"type": "pong", "id": "still-here"}
