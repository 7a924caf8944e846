"""A real scrape of real hosts: what Prometheus, the seed's dashboard and ops/ read.

Two hosts (two workers each) share one Redis. The module scrapes both right after start,
then makes traffic (connections, joins, publishes forwarded across hosts, a bad frame, a
refused handshake) and scrapes again while the clients are still connected. On those
scrapes: ``promtool check metrics`` is clean; every PromQL expression of the Grafana
dashboard and the alert rules names only metrics the scrape exposes; the seed's six names
are there, unlabelled, with their types; ``GET /metrics`` on the public port gives the same
families (or the JSON summary without ``Accept: text/plain``); and the routing counters
exist for every worker from start and count what SPEC section 6 says they count.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from tests.client import Client
from tests.promql_names import expand_grafana, exposed_names, metric_names
from tests.proxies import require_program
from tests.rtcproc import Host, hosts, metrics_written, settle_ring, start_redis

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "ops" / "grafana" / "rtc.json"
ALERTS = REPO / "ops" / "prometheus" / "alerts.yml"

WORKERS = 2
PUBLISHES = 20
# What Prometheus 2.x/3.x sends when it scrapes.
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0;q=0.5,"
    "application/openmetrics-text;version=0.0.1;q=0.4,"
    "text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
)
SEED_TYPES = {
    "active_connections": "gauge",
    "total_connections": "gauge",
    "messages_sent_total": "counter",
    "messages_received_total": "counter",
    "errors_total": "counter",
    "rate_limit_denied_total": "counter",
}
# Written by Prometheus itself for every target, never by the target.
SCRAPE_METRICS = frozenset({"up"})


@dataclass
class Fetched:
    status: int
    content_type: str
    text: str


def fetch(host: Host, path: str, port: int | None = None, accept: str | None = None) -> Fetched:
    request = urllib.request.Request(
        f"http://{host.host}:{port or host.port}{path}",
        headers={"Accept": accept} if accept else {},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return Fetched(response.status, response.headers.get("Content-Type", ""), response.read().decode())


def scrape(host: Host) -> str:
    """The host's metrics port in Prometheus text (what promtool checks)."""
    got = fetch(host, "/metrics", port=host.metrics_port, accept="text/plain;version=0.0.4")
    assert got.status == 200
    assert got.content_type.startswith("text/plain"), got.content_type
    return got.text


@dataclass
class Scrapes:
    """Each host's scrapes: at start, and after the traffic with its clients connected."""

    hosts: list[Host]
    room: str
    start: list[str] = field(default_factory=list)
    joined: list[str] = field(default_factory=list)  # every member joined, nothing published
    after: list[str] = field(default_factory=list)
    public_text: list[str] = field(default_factory=list)
    public_json: list[dict[str, object]] = field(default_factory=list)
    connected: list[int] = field(default_factory=list)


def owned_by(host: Host, prefix: str) -> str:
    """A fresh room id whose owner slot is on the host ``host`` (per its ring view)."""
    for _ in range(200):
        room = f"metrics-{uuid.uuid4().hex[:8]}"
        status, body = host.get(f"/admin/ring?key={room}")
        assert status == 200, body
        if json.loads(body)["owner"].startswith(f"{prefix}:"):
            return room
    raise AssertionError(f"no room owned by {prefix}")


async def traffic(result: Scrapes) -> None:
    """Members on both hosts; a publisher on host B whose room is owned on host A, so each
    publish is forwarded; a frame that is not JSON; an upgrade with a bad token."""
    a, b = result.hosts
    room = result.room
    sub_a = await Client.connect(a.ws, "sub-a")
    sub_b = await Client.connect(b.ws, "sub-b")
    pub = await Client.connect(b.ws, "pub")
    clients = [sub_a, sub_b, pub]
    try:
        for client in clients:
            await client.join(room)
        # sub-a sees the two later joins as presence events: the room's traffic so far
        await sub_a.wait_frames("presence", 2, room=room, event="join")
        await metrics_written()
        result.joined = [scrape(host) for host in result.hosts]
        for i in range(PUBLISHES):
            await pub.send(type="publish", room=room, data={"n": i}, id=i)
        await pub.wait_frames("ack", PUBLISHES, room=room)
        for client in clients:
            got = await client.wait_messages(room, PUBLISHES)
            assert [m["seq"] for m in got] == list(range(1, PUBLISHES + 1))
        await pub.send_raw("{this is not json")
        assert (await pub.expect("error"))["code"] == "bad_request"

        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(a.ws, params={"token": "not-a-jwt"})
            assert refused.value.status == 401

        result.connected = [1, 2]
        await metrics_written()
        for host in result.hosts:
            result.after.append(scrape(host))
            text = fetch(host, "/metrics", accept="text/plain")
            assert text.status == 200 and text.content_type.startswith("text/plain")
            result.public_text.append(text.text)
            summary = fetch(host, "/metrics")
            assert summary.status == 200 and summary.content_type.startswith("application/json"), (
                summary.content_type
            )
            result.public_json.append(json.loads(summary.text))
    finally:
        for client in clients:
            await client.close()


@pytest.fixture(scope="module")
def scrapes() -> Iterator[Scrapes]:
    redis = start_redis()
    try:
        with hosts(("ma", redis.url), ("mb", redis.url), workers=WORKERS) as started:
            result = Scrapes(started, room="")
            result.start = [scrape(host) for host in started]
            settle_ring(started)
            result.room = owned_by(started[0], started[0].node_id)
            asyncio.run(traffic(result))
            yield result
    finally:
        redis.stop()


def families(text: str) -> dict[str, str]:
    """Family name (as in its ``# TYPE`` line) -> type."""
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.MULTILINE))


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


def value(text: str, name: str) -> float:
    (only,) = samples(text, name)
    assert only[0] == {}, f"{name} is labelled: {only[0]}"
    return only[1]


def per_worker(text: str, name: str) -> dict[str, float]:
    found = samples(text, name)
    assert all(set(labels) == {"worker"} for labels, _ in found), found
    return {labels["worker"]: v for labels, v in found}


def all_scrapes(s: Scrapes) -> list[tuple[str, str]]:
    return [
        (f"{host.node_id} {when}", text)
        for when, texts in (("at start", s.start), ("after traffic", s.after))
        for host, text in zip(s.hosts, texts, strict=True)
    ]


# --- (a) promtool ---------------------------------------------------------------------------


def test_promtool_check_metrics_is_clean(scrapes: Scrapes) -> None:
    promtool = require_program("promtool")
    for what, text in [
        *all_scrapes(scrapes),
        *((f"{h.node_id} :port/metrics", t) for h, t in zip(scrapes.hosts, scrapes.public_text, strict=True)),
    ]:
        result = subprocess.run(
            [promtool, "check", "metrics"],
            input=text,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
            f"{what}:\n{result.stdout}{result.stderr}"
        )


# --- (b) dashboards and alerts read only what is exposed -------------------------------------


def dashboard_exprs() -> dict[str, str]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for top in dashboard["panels"] for p in (top, *top.get("panels", []))]
    exprs = {
        f"{panel['title']} [{target['refId']}]": expand_grafana(target["expr"])
        for panel in panels
        for target in panel.get("targets", [])
    }
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((\w+), *\w+\)", variable["definition"])
            assert match, variable["definition"]
            exprs[f"variable ${variable['name']}"] = match.group(1)
    return exprs


def alert_exprs() -> dict[str, str]:
    text = ALERTS.read_text()
    names = re.findall(r"^\s+- alert: (\w+)$", text, flags=re.MULTILINE)
    exprs = re.findall(r"^\s+expr: (.+)$", text, flags=re.MULTILINE)
    assert len(names) == len(exprs) and names, "one one-line expr per alert"
    return dict(zip(names, exprs, strict=True))


def test_ops_queries_name_only_scraped_metrics(scrapes: Scrapes) -> None:
    queries = {
        **{f"grafana {k}": v for k, v in dashboard_exprs().items()},
        **{f"alert {k}": v for k, v in alert_exprs().items()},
    }
    assert len(queries) > 20
    read: set[str] = set()
    for what, text in all_scrapes(scrapes):
        exposed = exposed_names(text) | SCRAPE_METRICS
        for query, expr in queries.items():
            names = metric_names(expr)
            read |= names
            missing = names - exposed
            assert not missing, f"{query}: {expr}\nnot in the scrape of {what}: {missing}"
    # Histograms are read through their series; the scrape has all three of each.
    for name in {n for n in read if n.endswith("_bucket")}:
        base = name.removesuffix("_bucket")
        for _, text in all_scrapes(scrapes):
            assert {f"{base}_sum", f"{base}_count"} <= exposed_names(text)


# --- (c) the seed's six names ----------------------------------------------------------------


def test_seed_names_unlabelled_with_their_types(scrapes: Scrapes) -> None:
    for what, text in all_scrapes(scrapes):
        types = families(text)
        for name, kind in SEED_TYPES.items():
            assert types.get(name) == kind, f"{what}: # TYPE {name} {types.get(name)}"
            lines = re.findall(rf"^{name}(\S*) (\S+)$", text, flags=re.MULTILINE)
            assert [suffix for suffix, _ in lines] == [""], f"{what}: {name}: {lines}"
    for text in scrapes.start:  # present from start, at 0 (nothing connected yet)
        assert all(value(text, name) == 0 for name in SEED_TYPES if name != "active_connections")
        assert value(text, "active_connections") == 0


def test_seed_values_follow_the_traffic(scrapes: Scrapes) -> None:
    a, b = scrapes.after
    assert value(a, "active_connections") == 1 and value(b, "active_connections") == 2
    assert value(a, "total_connections") == 1 and value(b, "total_connections") == 2
    # join (every client), PUBLISHES publishes and one bad frame (pub, on b)
    assert value(a, "messages_received_total") == 1
    assert value(b, "messages_received_total") == 2 + PUBLISHES + 1
    assert value(a, "messages_sent_total") >= PUBLISHES
    assert value(b, "messages_sent_total") >= 2 * PUBLISHES
    # a: the refused upgrade; b: the bad frame
    assert value(a, "errors_total") == 1 and value(b, "errors_total") == 1
    assert {lab["reason"]: v for lab, v in samples(a, "rtc_handshake_rejected_total")}["auth"] == 1
    assert {lab["code"]: v for lab, v in samples(b, "rtc_errors_total")}["bad_request"] == 1
    assert value(a, "rate_limit_denied_total") == value(b, "rate_limit_denied_total") == 0


# --- (d) GET /metrics on the public port ------------------------------------------------------


def test_public_metrics_text_has_the_same_families(scrapes: Scrapes) -> None:
    for host, port_text, public in zip(scrapes.hosts, scrapes.after, scrapes.public_text, strict=True):
        assert families(public) == families(port_text), host.node_id
        assert exposed_names(public) == exposed_names(port_text), host.node_id


def test_public_metrics_json_summary(scrapes: Scrapes) -> None:
    for host, summary, text, connected in zip(
        scrapes.hosts, scrapes.public_json, scrapes.after, scrapes.connected, strict=True
    ):
        assert summary["active_connections"] == connected, (host.node_id, summary)
        assert summary["active_connections"] == value(text, "active_connections")
        for name in SEED_TYPES:
            assert isinstance(summary[name], int), (name, summary)
        # docs/operations.md documents each of these fields
        assert summary["node"] == host.node_id and summary["draining"] is False
        assert set(summary["latency_ms"]) == {"p50", "p90", "p99"}
        assert sum(w["connections"] for w in summary["workers"]) == connected


def test_openmetrics_when_prometheus_asks_for_it(scrapes: Scrapes) -> None:
    """Prometheus prefers OpenMetrics in its Accept header: both ports answer in it."""
    for host in scrapes.hosts:
        for port in (host.metrics_port, host.port):
            got = fetch(host, "/metrics", port=port, accept=PROMETHEUS_ACCEPT)
            assert got.status == 200
            assert got.content_type.startswith("application/openmetrics-text"), got.content_type
            assert got.text.endswith("# EOF\n")
            names = {s.name for f in openmetrics_families(got.text) for s in f.samples}
            assert {"active_connections", "messages_sent_total", "rtc_forwarded_total"} <= names


def test_metrics_port_answers_only_get_metrics(scrapes: Scrapes) -> None:
    host = scrapes.hosts[0]
    assert host.get("/metrics?x=1", port=host.metrics_port)[0] == 200
    for path in ("/health", "/", "/metrics/extra"):
        assert host.get(path, port=host.metrics_port)[0] == 404, path
    request = urllib.request.Request(f"http://{host.host}:{host.metrics_port}/metrics", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=5)
    assert refused.value.code == 405
    refused.value.close()


def test_drains_are_counted_per_worker_from_start(scrapes: Scrapes) -> None:
    workers = {str(i) for i in range(WORKERS)}
    for what, text in all_scrapes(scrapes):
        assert per_worker(text, "rtc_drains_total") == dict.fromkeys(workers, 0.0), what


# --- (e) the routing counters ------------------------------------------------------------------


def test_routing_counters_exist_for_every_worker_from_start(scrapes: Scrapes) -> None:
    workers = {str(i) for i in range(WORKERS)}
    for what, text in all_scrapes(scrapes):
        types = families(text)
        for name in ("rtc_forwarded_total", "rtc_fanout_received_total"):
            assert types.get(name) == "counter", (what, name)
            assert set(per_worker(text, name)) == workers, (what, name)
    for text in scrapes.start:
        assert set(per_worker(text, "rtc_forwarded_total").values()) == {0}
        assert set(per_worker(text, "rtc_fanout_received_total").values()) == {0}


def test_forwarded_counts_publishes_sent_to_another_hosts_owner(scrapes: Scrapes) -> None:
    """The room is owned on host A and every publish comes from host B."""
    a, b = scrapes.after
    assert sum(per_worker(a, "rtc_forwarded_total").values()) == 0
    assert sum(per_worker(b, "rtc_forwarded_total").values()) == PUBLISHES


def test_fanout_received_counts_sequenced_messages_per_worker(scrapes: Scrapes) -> None:
    """Each worker with a member of the room received each of its PUBLISHES sequenced
    messages once; a worker with no member received none; presence events (before any
    publish) are no sequenced messages (SPEC section 6)."""
    for host, text in zip(scrapes.hosts, scrapes.joined, strict=True):
        received = per_worker(text, "rtc_fanout_received_total")
        assert set(received.values()) == {0}, (host.node_id, "presence counted", received)
    for host, text in zip(scrapes.hosts, scrapes.after, strict=True):
        connections = per_worker(text, "rtc_connections")
        received = per_worker(text, "rtc_fanout_received_total")
        expected = {w: PUBLISHES if n else 0 for w, n in connections.items()}
        assert received == expected, (host.node_id, connections, received)
