"""Alert rules, Prometheus configuration and the Grafana dashboard, checked with promtool.

Every PromQL expression shipped under ``ops/`` is parsed by promtool and may
only name documented metrics (docs/operations.md; ``DOCUMENTED_METRICS``);
``promql_names`` extracts the names, so a test against a live scrape of rtc
can reuse the same check.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from tests.promql_names import expand_grafana, exposed_names, metric_names
from tests.proxies import require_program

REPO = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = REPO / "ops" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERT_TESTS = PROMETHEUS_DIR / "alerts.test.yml"
PROMETHEUS_YML = PROMETHEUS_DIR / "prometheus.yml"
DASHBOARD = REPO / "ops" / "grafana" / "rtc.json"

SEED_METRICS = frozenset(
    {
        "active_connections",
        "total_connections",
        "messages_sent_total",
        "messages_received_total",
        "errors_total",
        "rate_limit_denied_total",
    }
)
RTC_HISTOGRAMS = frozenset({"rtc_publish_to_deliver_seconds", "rtc_fanout_size", "rtc_redis_command_seconds"})
RTC_METRICS = frozenset(
    {
        "rtc_connections",
        "rtc_rooms",
        "rtc_joins_total",
        "rtc_forwarded_total",
        "rtc_fanout_received_total",
        "rtc_deliveries_total",
        "rtc_redis_errors_total",
        "rtc_redis_up",
        "rtc_pubsub_reconnects_total",
        "rtc_gaps_filled_total",
        "rtc_gaps_reported_total",
        "rtc_drains_total",
        "rtc_migrated_connections_total",
        "rtc_slow_consumer_disconnects_total",
        "rtc_handshake_rejected_total",
        "rtc_errors_total",
        "rtc_worker_restarts_total",
        "rtc_ring_slots",
    }
)
# Sample names as scraped: a histogram is its _bucket, _sum and _count series.
DOCUMENTED_METRICS = (
    SEED_METRICS
    | RTC_METRICS
    | {h + suffix for h in RTC_HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
)
# Written by Prometheus itself for every target.
SCRAPE_METRICS = frozenset({"up"})


def _promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_program("promtool"), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def _alert_blocks(text: str) -> dict[str, str]:
    """Each `- alert:` rule of alerts.yml as its text, by alert name."""
    starts = list(re.finditer(r"^      - alert: (\w+)\n", text, flags=re.MULTILINE))
    ends = [m.start() for m in starts[1:]] + [len(text)]
    return {m.group(1): text[m.start() : end] for m, end in zip(starts, ends, strict=True)}


def _alert_exprs() -> dict[str, str]:
    exprs = {}
    for name, block in _alert_blocks(ALERTS.read_text()).items():
        match = re.search(r"^        expr: (.+)$", block, flags=re.MULTILINE)
        assert match, f"{name}: no one-line expr"
        exprs[name] = match.group(1)
    return exprs


# --- alert rules -------------------------------------------------------------


def test_promtool_accepts_the_rules() -> None:
    result = _promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_alert_exprs())} rules found" in result.stdout


def test_promtool_rule_unit_tests_pass() -> None:
    result = _promtool("test", "rules", ALERT_TESTS.name, cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_required_alerts_exist() -> None:
    """The seed's three alerts on its names, and the ones the rtc metrics add."""
    read = {name: metric_names(expr) for name, expr in _alert_exprs().items()}
    for metric in (
        "active_connections",
        "errors_total",
        "rate_limit_denied_total",
        "rtc_redis_up",
        "rtc_gaps_reported_total",
        "rtc_slow_consumer_disconnects_total",
        "rtc_worker_restarts_total",
        "up",
    ):
        assert any(metric in names for names in read.values()), metric
    exprs = _alert_exprs().values()
    assert "rate(errors_total[5m])" in " ".join(exprs)
    assert "rate(rate_limit_denied_total[5m])" in " ".join(exprs)


def test_alerts_read_only_documented_metrics() -> None:
    for name, expr in _alert_exprs().items():
        unknown = metric_names(expr) - DOCUMENTED_METRICS - SCRAPE_METRICS
        assert not unknown, f"{name}: {unknown}"


@pytest.fixture
def rules_copy(tmp_path: Path) -> Iterator[Path]:
    shutil.copy(ALERT_TESTS, tmp_path / ALERT_TESTS.name)
    yield tmp_path


@pytest.mark.parametrize("alert", sorted(_alert_blocks(ALERTS.read_text())))
def test_each_alert_is_proven_to_fire(rules_copy: Path, alert: str) -> None:
    """Without this alert's rule, the unit tests fail: some test expects it to fire."""
    text = ALERTS.read_text()
    (rules_copy / ALERTS.name).write_text(text.replace(_alert_blocks(text)[alert], ""))
    result = _promtool("test", "rules", ALERT_TESTS.name, cwd=rules_copy)
    assert result.returncode != 0, f"no test expects {alert} to fire"
    assert f"alertname: {alert}" in result.stdout + result.stderr


def test_each_alert_is_proven_quiet_too() -> None:
    """Every alert also has a case where it must not fire (below threshold or pending)."""
    cases = re.findall(r"alertname: (\w+)\n\s+exp_alerts:( \[\])?", ALERT_TESTS.read_text())
    quiet = {name for name, empty in cases if empty}
    firing = {name for name, empty in cases if not empty}
    assert quiet == firing == set(_alert_exprs())


def test_prometheus_example_config_is_valid() -> None:
    """promtool check config also loads the rule file it names."""
    result = _promtool("check", "config", str(PROMETHEUS_YML))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout
    assert re.search(r"- \S+:9090$", PROMETHEUS_YML.read_text(), flags=re.MULTILINE)


# --- Grafana dashboard --------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def _exprs(dashboard: dict[str, Any]) -> dict[str, str]:
    return {
        f"panel_{panel['id']}:{target['refId']}": target["expr"]
        for panel in _panels(dashboard)
        for target in panel.get("targets", [])
    }


def test_dashboard_has_a_prometheus_datasource_variable(
    dashboard: dict[str, Any],
) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in _panels(dashboard):
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"], panel["title"]
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"]["uid"] == "${datasource}"


def test_dashboard_layout_is_sane(dashboard: dict[str, Any]) -> None:
    """Unique ids, inside 24 columns, no two panels on the same cells."""
    panels = _panels(dashboard)
    assert len({p["id"] for p in panels}) == len(panels)
    taken: dict[tuple[int, int], str] = {}
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken[(x, y)]}"
                taken[(x, y)] = panel["title"]
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 30


def test_every_dashboard_query_parses(dashboard: dict[str, Any], tmp_path: Path) -> None:
    """promtool parses every target (Grafana variables expanded) as a recording rule."""
    rules = [
        {"record": f"grafana:{name}", "expr": expand_grafana(expr)}
        for name, expr in _exprs(dashboard).items()
    ]
    path = tmp_path / "dashboard-rules.json"
    path.write_text(json.dumps({"groups": [{"name": "grafana", "rules": rules}]}))
    result = _promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_dashboard_reads_only_documented_metrics(dashboard: dict[str, Any]) -> None:
    for name, expr in _exprs(dashboard).items():
        unknown = metric_names(expand_grafana(expr)) - DOCUMENTED_METRICS
        assert not unknown, f"{name} {expr}: {unknown}"
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            metric = re.fullmatch(r"label_values\((\w+), *\w+\)", variable["definition"])
            assert metric and metric.group(1) in DOCUMENTED_METRICS


def test_dashboard_covers_every_documented_metric(dashboard: dict[str, Any]) -> None:
    """The seed's six panels, and a panel for each rtc_* metric."""
    read = set().union(*(metric_names(expand_grafana(e)) for e in _exprs(dashboard).values()))
    wanted = SEED_METRICS | RTC_METRICS | {h + "_bucket" for h in RTC_HISTOGRAMS}
    assert wanted - read == set()
    titles = {p["title"] for p in _panels(dashboard)}
    assert {
        "Active connections",
        "Connection rate",
        "Messages sent",
        "Messages received",
        "Errors",
        "Rate-limit denials",
    } <= titles
    quantiles = [e for e in _exprs(dashboard).values() if "rtc_publish_to_deliver" in e]
    assert any(e.startswith("histogram_quantile(0.5,") for e in quantiles)
    assert any(e.startswith("histogram_quantile(0.99,") for e in quantiles)


# --- the name extractor itself -------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("active_connections > 10000", {"active_connections"}),
        ('up{job="rtc"} == 0', {"up"}),
        (
            'histogram_quantile(0.99, sum by (le, op) (rate(h_bucket{le!="1", op=~"x|y"}[5m])))',
            {"h_bucket"},
        ),
        (
            "sum(rate(a_total[1h30m] offset 5m)) by (instance) / on(instance) b",
            {"a_total", "b"},
        ),
        ("a * on (instance) group_left (worker, node) b", {"a", "b"}),
        ('{__name__="via_name", job="rtc"}', {"via_name"}),
        ('count_values("version", build_info)', {"build_info"}),
        ('label_replace(x, "dst", "$1", "src", "(.*)")', {"x"}),
        ("max_over_time(deriv(g[10m])[1h:1m]) > bool 3", {"g"}),
        ("x @ start() - x offset -1d", {"x"}),
        ("SUM WITHOUT (worker) (x) AND y UNLESS z", {"x", "y", "z"}),
        ("-rtc:recorded:rate5m * 1e3 + 0x10 - .5", {"rtc:recorded:rate5m"}),
        ("vector(1) + time() - scalar(s)", {"s"}),
        ('topk(5, q) or absent(q{a="}{"})', {"q"}),
    ],
)
def test_metric_names(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


@pytest.mark.parametrize(
    "expr",
    ["frobnicate(x)", '{__name__=~"rtc_.*"}', "rate(x[$__rate_interval])", "x{a="],
)
def test_metric_names_refuses_what_it_cannot_check(expr: str) -> None:
    with pytest.raises(ValueError, match="PromQL"):
        metric_names(expr)


def test_expand_grafana() -> None:
    expr = 'sum by (instance) (rate(x{instance=~"$instance", w="${w}"}[$__rate_interval]))'
    assert expand_grafana(expr, {"w": "0"}) == ('sum by (instance) (rate(x{instance=~".*", w="0"}[5m]))')


def test_exposed_names_reads_a_real_exposition() -> None:
    registry = CollectorRegistry()
    Counter("rtc_joins", "joins", ["worker"], registry=registry).labels("0").inc()
    Gauge("active_connections", "open sockets", registry=registry).set(3)
    Histogram("rtc_fanout_size", "recipients", registry=registry).observe(2)
    names = exposed_names(generate_latest(registry).decode())
    assert {"rtc_joins_total", "active_connections", "rtc_fanout_size_bucket"} <= names
    assert metric_names("sum(rate(rtc_joins_total[5m])) + active_connections") <= names
