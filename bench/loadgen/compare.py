"""``compare``: every scenario against rtc and each baseline, same parameters, one run.

Each (server, scenario) pair gets freshly started hosts on free 127.0.0.1 ports and a
flushed private Redis, so no result inherits another's memory or keys. Writes
``results.json``, ``table.md`` and ``latency-vs-load.png`` into the output directory.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench.loadgen import plot, report, scenarios
from bench.loadgen.fleet import WorkerError
from bench.loadgen.probe import shard_distribution
from bench.loadgen.scenarios import FleetParams, RampParams, Target
from bench.loadgen.servers import KINDS, Launch, Process, Redis, RedisCluster, ServerKind
from bench.loadgen.system import free_port

__all__ = ["SCENARIOS", "Plan", "run"]

SCENARIOS = ("idle", "fanout", "cross", "direct", "churn", "storm")
Result = dict[str, Any]


@dataclass(frozen=True)
class Plan:
    """Everything a compare run does, recorded in its results."""

    servers: tuple[str, ...]
    scenarios: tuple[str, ...]
    out: Path
    rtc_workers: int
    fleet: FleetParams
    ramp: RampParams
    direct_start_rate: float  # one delivery per message: direct needs a higher start
    idle_conns: int
    idle_rooms: int
    idle_hold: float
    members: int
    users: int
    churn_slots: int
    churn_seconds: float
    churn_max_cycles: int
    storm_conns: int = 1000
    storm_rooms: int = 100
    hosts: int = 1  # rtc hosts per scenario (cross: at least 2)
    redis_cluster: int = 0  # masters of a Redis Cluster to run on; 0: one redis-server


def _scenario(plan: Plan, name: str, target: Target) -> Result:
    fleet = replace(plan.fleet, tag=f"{plan.fleet.tag}-{name}")
    if name == "idle":
        return scenarios.idle(target, fleet, plan.idle_conns, plan.idle_rooms, plan.idle_hold)
    if name in ("fanout", "cross"):
        return scenarios.fanout(target, fleet, plan.ramp, plan.members)
    if name == "direct":
        ramp = replace(plan.ramp, start_rate=plan.direct_start_rate)
        return scenarios.direct(target, fleet, ramp, plan.users)
    if name == "storm":
        return scenarios.storm(target, fleet, plan.storm_conns, plan.storm_rooms, 8, 0.02)
    return scenarios.churn(target, fleet, plan.churn_slots, plan.churn_seconds, plan.churn_max_cycles)


def _run_one(plan: Plan, kind: ServerKind, name: str, redis: Redis | RedisCluster) -> Result:
    """Start the hosts ``name`` needs, run it, stop them whatever happens."""
    hosts: list[Process] = []
    roots: list[str] = []
    count = max(plan.hosts, 2) if name == "cross" else plan.hosts
    try:
        for index in range(count if kind.shared else 1):
            port = free_port()
            node_id = "abcdefgh"[index]
            launch = Launch(
                port, redis.url, redis.rtc_args, plan.fleet.jwt_secret, node_id, plan.out, plan.rtc_workers
            )
            hosts.append(kind.start(launch))
            roots.append(f"ws://127.0.0.1:{port}")
        redis_urls = redis.urls if kind.shared else ()
        target = Target(kind.name, kind.protocol, tuple(roots), tuple(h.pid for h in hosts), redis_urls)
        return _scenario(plan, name, target)
    finally:
        for host in hosts:
            host.stop()


def _server(plan: Plan, kind: ServerKind, redis: Redis | RedisCluster) -> dict[str, Result]:
    results: dict[str, Result] = {}
    for name in plan.scenarios:
        if name == "cross" and not kind.shared:
            continue  # hosts that share nothing cannot deliver across each other
        if name == "storm" and kind.protocol != "rtc":
            continue  # the loop probes speak rtc's protocol
        redis.flush()
        try:
            results[name] = _run_one(plan, kind, name, redis)
        except (RuntimeError, WorkerError) as exc:
            results[name] = {"scenario": name, "error": str(exc)}
            print(f"[{kind.name}] {name}: {exc}", flush=True)
            continue
        print(f"[{kind.name}] " + report.summary(results[name]), flush=True)
    return results


def run(plan: Plan) -> dict[str, Any]:
    """Run the plan; print and write the table, the JSON and the chart."""
    plan.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Result]] = {}
    unavailable: dict[str, str] = {}
    distribution: dict[str, Any] | None = None
    started = time.time()
    redis = RedisCluster(plan.out, plan.redis_cluster) if plan.redis_cluster else Redis(plan.out)
    with redis:
        for name in plan.servers:
            kind = KINDS[name]
            reason = kind.unavailable()
            if reason is not None:
                unavailable[name] = reason
                print(f"[{name}] skipped: {reason}", flush=True)
                continue
            if plan.redis_cluster and kind.name != "rtc":
                unavailable[name] = "runs on one Redis only"
                continue
            results[name] = _server(plan, kind, redis)
        if isinstance(redis, RedisCluster):
            distribution = shard_distribution(redis.urls, plan.storm_rooms, f"{plan.fleet.tag}-storm-r")
    ran = [s for s in plan.servers if s in results]
    table = report.comparison_table(results, ran) if ran else "(no server could run)"
    document = {
        "started": started,
        "seconds": round(time.time() - started, 1),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "plan": {**asdict(plan), "out": str(plan.out)},
        "unavailable": unavailable,
        "results": results,
        "table": table,
        "shards": distribution,
    }
    (plan.out / "results.json").write_text(json.dumps(document, indent=2, default=str))
    (plan.out / "table.md").write_text(table + "\n")
    plot.latency_vs_load(results, plan.ramp.p99_ms, plan.out / "latency-vs-load.png")
    print(table, flush=True)
    return document
