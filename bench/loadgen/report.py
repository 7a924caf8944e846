"""Text output: a scenario's summary and the comparison table (Markdown)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["FIGURES", "Figure", "comparison_table", "summary"]

Result = dict[str, Any]


def _get(result: Result, *path: str) -> Any:
    value: Any = result
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _steps_table(steps: Sequence[Result]) -> list[str]:
    head = "  rate/s  sent/s  deliv/s  ratio  p50ms  p99ms  e2e99  srv%  gen%  rds%  failures"
    lines = [head]
    for s in steps:
        lines.append(
            f"  {_fmt(s['target_rate']):>6}  {_fmt(s['sent_per_s']):>6}"
            f"  {_fmt(s['deliveries_per_s']):>7}  {_fmt(s['delivery_ratio']):>5}"
            f"  {_fmt(s['latency']['p50_ms']):>5}  {_fmt(s['latency']['p99_ms']):>5}"
            f"  {_fmt(s['e2e_latency']['p99_ms']):>5}  {_fmt(s['server_cpu_pct']):>4}"
            f"  {_fmt(s['loadgen_cpu_pct']):>4}  {_fmt(s['redis_cpu_pct']):>4}"
            f"  {'; '.join(s['failures'])}" + (" -> retried" if s.get("retried") else "")
        )
    return lines


def summary(result: Result) -> str:
    """A few lines a person reads after one scenario (the JSON has everything)."""
    name = result["scenario"]
    lines = [f"== {name}"]
    if "opened" in result:
        lines.append(
            f"connected {result['opened']:,} (failed {result['failed']:,} {result['errors']})"
            f" in {result['connect_seconds']} s: {_fmt(result['connect_rate_per_s'])} conn/s,"
            f" handshake p99 {_fmt(result['connect_latency']['p99_ms'])} ms"
        )
    if name == "idle" and "server_rss_per_conn_kib" in result:
        lines.append(
            f"server RSS {result['server_rss_before_mib']} -> {result['server_rss_after_mib']}"
            f" MiB: {_fmt(result['server_rss_per_conn_kib'])} KiB per connection"
        )
    if "steps" in result:
        lines += _steps_table(result["steps"])
        lines.append(
            f"max sustainable: {_fmt(result['max_sustainable_deliveries_per_s'])} deliveries/s"
            f" (p99 {_fmt(result['p99_at_max_ms'])} ms);"
            f" stopped: {'; '.join(result['stopped_because']) or 'max steps reached'}"
        )
    if name == "churn":
        lines.append(
            f"{result['cycles']:,} cycles in {result['seconds']} s:"
            f" {_fmt(result['cycles_per_s'])} cycles/s, failed {result['failed']:,}"
            f" {result['errors']}, handshake p99 {_fmt(result['connect_latency']['p99_ms'])} ms"
        )
    if name == "soak" and result["samples"]:
        stalls = [v for s in result["samples"] for v in s["longest_stall_ms"].values() if v is not None]
        lines.append(
            f"{len(result['samples'])} samples over {result['seconds']:g} s; RSS MiB first/last"
            f" {result['drift'].get('rss_mib')}, fds first/last {result['drift'].get('fds')},"
            f" longest loop stall {max(stalls, default=None)} ms"
        )
    for phase in ("connect", "resume"):
        if phase in result:
            lines.append(_storm_line(phase, result[phase]))
    if "integrity" in result:
        lines.append(f"integrity {result['integrity']}, dropped by server {result['dropped']}")
    return "\n".join(lines)


def _storm_line(phase: str, r: Result) -> str:
    per_connect, redis_cpu = r.get("redis_commands_per_connect"), r["redis_cpu_pct"]
    return (
        f"{phase}: {r['opened']:,} in {r['connect_seconds']} s ({_fmt(r['connect_rate_per_s'])}/s),"
        f" failed {r['failed']:,} {r['errors']}, resumed {r['resumed']:,},"
        f" presence events received {r.get('presence_events', 0):,},"
        f" handshake p99 {_fmt(r['connect_latency']['p99_ms'])} ms,"
        f" loop ping p99 {_fmt(r['loop_ping_p99_ms'])} ms (worst worker),"
        f" srv {_fmt(r['server_cpu_pct'])}% gen {_fmt(r['loadgen_cpu_pct'])}%"
        + (f" Redis {_fmt(redis_cpu)}%" if redis_cpu is not None else "")
        + (" (client-bound)" if r["client_bound"] else "")
        + (f", Redis commands/connect {per_connect}" if per_connect is not None else "")
    )


@dataclass(frozen=True)
class Figure:
    """One row of the comparison table."""

    label: str
    value: Callable[[dict[str, Result]], Any]  # from a server's results by scenario
    ratio: bool = True  # False for counts, where a ratio means nothing


def _metric(scenario: str, *path: str) -> Callable[[dict[str, Result]], Any]:
    return lambda results: _get(results.get(scenario, {}), *path)


def _storm_failed(results: dict[str, Result]) -> int | None:
    storm = results.get("storm")
    if not storm or "connect" not in storm:
        return None
    return int(storm["connect"]["failed"]) + int(storm["resume"]["failed"])


def _faults(results: dict[str, Result]) -> int | None:
    counts = [r["integrity"] for r in results.values() if isinstance(r.get("integrity"), dict)]
    return sum(sum(c.values()) for c in counts) if counts else None


FIGURES = [
    Figure("idle: connect rate (conn/s)", _metric("idle", "connect_rate_per_s")),
    Figure("idle: server RSS per connection (KiB)", _metric("idle", "server_rss_per_conn_kib")),
    Figure("fanout: max deliveries/s (p99 <= limit)", _metric("fanout", "max_sustainable_deliveries_per_s")),
    Figure("fanout: p99 at that load (ms)", _metric("fanout", "p99_at_max_ms")),
    Figure("cross: max deliveries/s (2 hosts)", _metric("cross", "max_sustainable_deliveries_per_s")),
    Figure("direct: max messages/s", _metric("direct", "max_sustainable_deliveries_per_s")),
    Figure("churn: connect+close cycles/s", _metric("churn", "cycles_per_s")),
    Figure("churn: handshake p99 (ms)", _metric("churn", "connect_latency", "p99_ms")),
    Figure("storm: connect+join all (s)", _metric("storm", "connect", "connect_seconds")),
    Figure("storm: resume all (s)", _metric("storm", "resume", "connect_seconds")),
    Figure("storm: loop ping p99, worst worker (ms)", _metric("storm", "resume", "loop_ping_p99_ms")),
    Figure("storm: failed connects", _storm_failed, ratio=False),
    Figure("gaps + duplicates + reordered", _faults, ratio=False),
]


def comparison_table(results: dict[str, dict[str, Result]], servers: Sequence[str]) -> str:
    """Markdown table: figure, each server, and the first server's ratio to each other one."""
    first, others = servers[0], servers[1:]
    head = ["figure", *servers, *(f"{first}/{o}" for o in others)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for figure in FIGURES:
        values = [figure.value(results.get(s, {})) for s in servers]
        ratios = []
        for other in values[1:]:
            ok = isinstance(values[0], int | float) and isinstance(other, int | float) and other
            ratios.append(f"{values[0] / other:.2f}" if ok else "-")
        lines.append("| " + " | ".join([figure.label, *map(_fmt, values), *ratios]) + " |")
    return "\n".join(lines)
