"""Command line: ``python -m bench.loadgen {idle,fanout,cross,direct,churn,storm,compare} ...``."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from bench.loadgen import compare, plot, report, scenarios
from bench.loadgen.fleet import WorkerError
from bench.loadgen.scenarios import FleetParams, RampParams, Target
from bench.loadgen.servers import KINDS
from bench.loadgen.system import check_loopback

__all__ = ["main"]

_DEFAULT_SECRET = "bench-secret-for-loopback-load-tests"  # >= 32 bytes for HS256


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def _add_fleet(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("load generator")
    g.add_argument(
        "--jwt-secret",
        default=os.environ.get("JWT_SECRET", _DEFAULT_SECRET),
        help="HS256 secret for the tokens (default: $JWT_SECRET or %(default)s)",
    )
    g.add_argument("--procs", type=_positive_int, help="worker processes (default: enough)")
    g.add_argument("--per-proc", type=_positive_int, default=15_000, help="sockets per process")
    g.add_argument("--per-source", type=_positive_int, default=10_000, help="sockets per source address")
    g.add_argument("--connect-concurrency", type=_positive_int, default=200, help="per process")
    g.add_argument("--connect-timeout", type=_positive_float, default=15.0)


def _add_target(parser: argparse.ArgumentParser, hosts: str) -> None:
    g = parser.add_argument_group("server")
    g.add_argument(
        "--url",
        action="append",
        required=True,
        type=check_loopback,
        help=f"server root, e.g. ws://127.0.0.1:8081 ({hosts})",
    )
    g.add_argument("--protocol", choices=("rtc", "socketio"), default="rtc")
    g.add_argument(
        "--server-pid",
        action="append",
        type=int,
        default=[],
        help="PID whose process tree is sampled for RSS and CPU (repeatable)",
    )
    g.add_argument(
        "--redis-url",
        action="append",
        default=[],
        help="the server's Redis (every master of a cluster), for Redis commands per message",
    )


def _add_idle(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("idle")
    g.add_argument("--conns", type=_positive_int, default=1000, help="sockets to hold")
    g.add_argument("--rooms", type=_non_negative_int, default=100, help="rooms they join (0: none)")
    g.add_argument("--hold", type=_non_negative_float, default=5.0, help="seconds to hold them")


def _add_ramp(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("rising rate (fanout, cross, direct)")
    g.add_argument("--start-rate", type=_positive_float, default=20.0, help="messages/s, total")
    g.add_argument("--factor", type=_positive_float, default=1.5, help="rate multiplier per step")
    g.add_argument("--step-seconds", type=_positive_float, default=5.0)
    g.add_argument("--max-steps", type=_positive_int, default=12)
    g.add_argument("--p99-ms", type=_positive_float, default=50.0, help="latency limit")
    g.add_argument("--payload-bytes", type=_non_negative_int, default=64)
    g.add_argument("--retries", type=_non_negative_int, default=1, help="re-runs of a failed step")
    g.add_argument("--warmup-seconds", type=_non_negative_float, default=1.0, help="untimed, before step 1")


def _add_members(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--members", type=_positive_int, default=100, help="room size")


def _add_users(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--users", type=_positive_int, default=100, help="sockets")


def _add_churn(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("churn")
    g.add_argument("--slots", type=_positive_int, default=20, help="concurrent loops")
    g.add_argument("--seconds", type=_positive_float, default=10.0)
    g.add_argument("--max-cycles", type=_positive_int, default=100_000)


def _add_storm(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("storm")
    g.add_argument("--conns", type=_positive_int, default=1000, help="sockets")
    g.add_argument("--rooms", type=_positive_int, default=100, help="rooms they join")
    g.add_argument("--probes", type=_positive_int, default=8, help="loop-ping sockets")
    g.add_argument("--ping-interval", type=_positive_float, default=0.02, help="seconds")


def _add_soak(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("soak")
    g.add_argument("--conns", type=_positive_int, default=1000, help="sockets")
    g.add_argument("--rooms", type=_positive_int, default=100, help="rooms they join")
    g.add_argument("--seconds", type=_positive_float, default=600.0, help="how long")
    g.add_argument("--interval", type=_positive_float, default=10.0, help="seconds per sample")
    g.add_argument("--rate", type=_positive_float, default=100.0, help="publishes/s, all rooms")
    g.add_argument("--plot", type=Path, help="write RSS, fds and loop stall over time here (PNG)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    sub = parser.add_subparsers(dest="scenario", required=True)
    specs: dict[str, tuple[str, list[Any]]] = {
        "idle": ("hold N sockets: connect rate, server RSS per connection", [_add_idle]),
        "fanout": ("one room, rising publish rate", [_add_ramp, _add_members]),
        "cross": ("one room over 2+ hosts sharing Redis", [_add_ramp, _add_members]),
        "direct": ("1:1 direct messages, rising rate", [_add_ramp, _add_users]),
        "churn": ("connect/join/close loops", [_add_churn]),
        "storm": ("connect storm, then drop all and resume storm", [_add_storm]),
        "soak": ("hold sockets with traffic; RSS, fds, loop stalls over time", [_add_soak]),
    }
    for name, (help_text, adders) in specs.items():
        p = sub.add_parser(name, help=help_text)
        _add_target(p, "give it twice" if name == "cross" else "one host")
        p.add_argument("--json", type=Path, help="also write the full result here")
        _add_fleet(p)
        for add in adders:
            add(p)
    p = sub.add_parser("compare", help="run every scenario on rtc and each baseline")
    p.add_argument("--out", type=Path, required=True, help="directory for results")
    p.add_argument("--servers", default="rtc,bare,socketio,node", help="first one is the base")
    p.add_argument("--scenarios", default=",".join(compare.SCENARIOS))
    p.add_argument("--rtc-workers", type=_positive_int, default=os.cpu_count() or 1)
    p.add_argument("--idle-conns", type=_positive_int, default=1000)
    p.add_argument("--idle-rooms", type=_non_negative_int, default=100)
    p.add_argument("--idle-hold", type=_non_negative_float, default=5.0)
    p.add_argument("--direct-start-rate", type=_positive_float, default=200.0, help="messages/s")
    p.add_argument("--churn-slots", type=_positive_int, default=20)
    p.add_argument("--churn-seconds", type=_positive_float, default=10.0)
    p.add_argument("--churn-max-cycles", type=_positive_int, default=100_000)
    p.add_argument("--storm-conns", type=_positive_int, default=1000)
    p.add_argument("--storm-rooms", type=_positive_int, default=100)
    p.add_argument("--hosts", type=_positive_int, default=1, help="rtc hosts per scenario (cross: 2+)")
    p.add_argument(
        "--redis-cluster", type=_non_negative_int, default=0, help="run on a Redis Cluster of N masters"
    )
    _add_fleet(p)
    _add_ramp(p)
    _add_members(p)
    _add_users(p)
    return parser


def _fleet(args: argparse.Namespace) -> FleetParams:
    return FleetParams(
        jwt_secret=args.jwt_secret,
        tag=f"lg{secrets.token_hex(3)}",
        procs=args.procs,
        per_proc=args.per_proc,
        per_source=args.per_source,
        connect_concurrency=args.connect_concurrency,
        connect_timeout=args.connect_timeout,
    )


def _ramp(args: argparse.Namespace) -> RampParams:
    return RampParams(
        start_rate=args.start_rate,
        factor=args.factor,
        step_seconds=args.step_seconds,
        max_steps=args.max_steps,
        p99_ms=args.p99_ms,
        payload_bytes=args.payload_bytes,
        warmup_seconds=args.warmup_seconds,
        retries=args.retries,
    )


def _csv(text: str, allowed: Any, what: str) -> tuple[str, ...]:
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in items if s not in allowed]
    if unknown or not items:
        raise SystemExit(f"unknown {what}: {','.join(unknown) or '(none)'}")
    return items


def _run_scenario(args: argparse.Namespace) -> dict[str, Any]:
    if args.scenario == "cross" and len(args.url) < 2:
        raise SystemExit("cross needs --url for at least two hosts")
    target = Target("server", args.protocol, tuple(args.url), tuple(args.server_pid), tuple(args.redis_url))
    fleet = _fleet(args)
    if args.scenario == "soak":
        result = scenarios.soak(target, fleet, args.conns, args.rooms, args.seconds, args.interval, args.rate)
        if args.plot:
            plot.soak_over_time(result, args.plot)
        return result
    if args.scenario == "storm":
        return scenarios.storm(target, fleet, args.conns, args.rooms, args.probes, args.ping_interval)
    if args.scenario == "idle":
        return scenarios.idle(target, fleet, args.conns, args.rooms, args.hold)
    if args.scenario in ("fanout", "cross"):
        return scenarios.fanout(target, fleet, _ramp(args), args.members)
    if args.scenario == "direct":
        return scenarios.direct(target, fleet, _ramp(args), args.users)
    return scenarios.churn(target, fleet, args.slots, args.seconds, args.max_cycles)


def _run_compare(args: argparse.Namespace) -> None:
    plan = compare.Plan(
        servers=_csv(args.servers, KINDS, "servers"),
        scenarios=_csv(args.scenarios, compare.SCENARIOS, "scenarios"),
        out=args.out,
        rtc_workers=args.rtc_workers,
        fleet=_fleet(args),
        ramp=_ramp(args),
        direct_start_rate=args.direct_start_rate,
        idle_conns=args.idle_conns,
        idle_rooms=args.idle_rooms,
        idle_hold=args.idle_hold,
        members=args.members,
        users=args.users,
        churn_slots=args.churn_slots,
        churn_seconds=args.churn_seconds,
        churn_max_cycles=args.churn_max_cycles,
        storm_conns=args.storm_conns,
        storm_rooms=args.storm_rooms,
        hosts=args.hosts,
        redis_cluster=args.redis_cluster,
    )
    compare.run(plan)


def main(argv: list[str] | None = None) -> int:
    """Entry point; exit status 1 when the run failed, 0 otherwise."""
    args = _parser().parse_args(argv)
    try:
        if args.scenario == "compare":
            _run_compare(args)
            return 0
        result = _run_scenario(args)
    except (WorkerError, RuntimeError, ValueError) as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return 1
    print(report.summary(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0
