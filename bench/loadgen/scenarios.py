"""The scenarios: each opens a fleet, drives it and returns its figures as a JSON-able dict.

- ``idle``: hold N sockets; connect rate and server RSS per connection.
- ``fanout``: one room of K members; publish at a rising rate until p99 exceeds the
  limit; the best step's deliveries/s is the figure. ``cross`` is the same over the
  URLs of two or more hosts sharing Redis (members alternate between them).
- ``direct``: N users each sending 1:1 messages to the next one, at a rising rate.
- ``churn``: connect, handshake, join and close in a loop; cycles/s.
- ``soak``: hold N sockets with steady room traffic for a long time, sampling the
  server's RSS, open fds and longest loop stall per worker over time.
- ``storm``: N sockets connect and join at once; then all drop at once and reconnect
  with their session (a host failover); wall time of each, failed connects, and the
  ping round trips of every server worker's loop meanwhile.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from bench.loadgen.commands import (
    Churn,
    ChurnReply,
    CloseAll,
    CloseReply,
    ConnSpec,
    Drop,
    Open,
    OpenReply,
    PingReply,
    PingSample,
    PingStart,
    PingStarted,
    PingStop,
    Resume,
    Traffic,
    TrafficReply,
    WorkerSetup,
)
from bench.loadgen.fleet import Fleet
from bench.loadgen.probe import (
    CpuMeter,
    RedisCpuMeter,
    commands_between,
    owners,
    process_stats,
    redis_commandstats,
    tree_rss,
)
from bench.loadgen.stats import Histogram
from bench.loadgen.system import source_address

__all__ = ["FleetParams", "RampParams", "Target", "churn", "direct", "fanout", "idle", "soak", "storm"]

Result = dict[str, Any]
_MIB = 1024 * 1024
_SETTLE = 2.0  # seconds after connecting before the "after" RSS sample
_CONTROL_SLACK = 30.0  # extra seconds a worker may take to answer a command
_CLIENT_BUSY_PCT = 90.0  # a worker this busy may be the bottleneck, not the server


@dataclass(frozen=True)
class Target:
    """A server under test: its protocol, one root URL per host, PIDs to sample."""

    name: str
    protocol: str
    roots: tuple[str, ...]
    pids: tuple[int, ...] = ()
    redis_urls: tuple[str, ...] = ()  # sampled for commands per message (every master)


@dataclass(frozen=True)
class FleetParams:
    """How sockets are spread over processes and source addresses."""

    jwt_secret: str
    tag: str  # prefix of user and room names, unique per run (fresh seqs and inboxes)
    procs: int | None = None  # None: ceil(sockets / per_proc)
    per_proc: int = 15_000
    per_source: int = 10_000
    connect_concurrency: int = 200  # handshakes in flight per process
    connect_timeout: float = 15.0
    command_timeout: float = 900.0


@dataclass(frozen=True)
class RampParams:
    """The rising-rate schedule shared by ``fanout``, ``cross`` and ``direct``."""

    start_rate: float = 20.0  # messages/s sent by all publishers together
    factor: float = 1.5
    step_seconds: float = 5.0
    max_steps: int = 12
    p99_ms: float = 50.0
    payload_bytes: int = 64
    min_delivery_ratio: float = 0.99
    # Untimed traffic at the start rate first: a room's first messages pay one-off
    # costs (subscriptions, ownership lookups) that are not its sustained cost.
    warmup_seconds: float = 1.0
    # A failed step is run once more at the same rate before the ramp stops: on a
    # shared machine one hiccup must not end it. Both rows are kept.
    retries: int = 1


def _fleet(target: Target, fp: FleetParams, sockets: int, pause: float = 0.0) -> Fleet:
    """Workers for ``sockets``; ``pause`` is the longest planned gap between commands."""
    procs = fp.procs or max(1, math.ceil(sockets / fp.per_proc))
    if sockets > procs * fp.per_proc:
        raise ValueError(f"{sockets} sockets need more than {procs} processes of {fp.per_proc}")
    setup = WorkerSetup(target.protocol, fp.jwt_secret, fp.command_timeout + pause)
    return Fleet(procs, setup)


def _specs(
    target: Target,
    fp: FleetParams,
    count: int,
    room: Callable[[int], str | None],
    peer: Callable[[int], str | None] = lambda _i: None,
) -> list[ConnSpec]:
    return [
        ConnSpec(
            root=target.roots[i % len(target.roots)],
            user=f"{fp.tag}-u{i}",
            room=room(i),
            peer=peer(i),
            source=source_address(i, fp.per_source),
        )
        for i in range(count)
    ]


def _open(fleet: Fleet, specs: list[ConnSpec], fp: FleetParams) -> tuple[OpenReply, float]:
    """Open ``specs`` spread round-robin over the fleet; returns the merge and wall seconds."""
    n = len(fleet)
    commands = [Open(specs[w::n], fp.connect_concurrency, fp.connect_timeout) for w in range(n)]
    return _merge_opens(fleet, commands, _open_budget(fp, len(specs), n))


def _open_budget(fp: FleetParams, sockets: int, procs: int) -> float:
    per_worker = math.ceil(sockets / procs)
    return fp.connect_timeout * math.ceil(per_worker / fp.connect_concurrency) + _CONTROL_SLACK


def _merge_opens(fleet: Fleet, commands: list[Open] | list[Resume], budget: float) -> tuple[OpenReply, float]:
    """Run Open or Resume on every worker; the merge, and the slowest worker's seconds."""
    replies = fleet.call(commands, budget)
    merged = OpenReply()
    for reply in replies:
        assert isinstance(reply, OpenReply)
        merged.opened += reply.opened
        merged.failed += reply.failed
        merged.resumed += reply.resumed
        merged.events += reply.events
        merged.seconds = max(merged.seconds, reply.seconds)
        merged.errors.update(reply.errors)
        merged.connect.merge(reply.connect)
    return merged, merged.seconds


def _close(fleet: Fleet) -> CloseReply:
    merged = CloseReply()
    for reply in fleet.broadcast(CloseAll(), _CONTROL_SLACK):
        assert isinstance(reply, CloseReply)
        merged.closed += reply.closed
        merged.dropped += reply.dropped
        merged.integrity.merge(reply.integrity)
    return merged


def _connect_figures(opened: OpenReply, seconds: float) -> Result:
    return {
        "opened": opened.opened,
        "failed": opened.failed,
        "errors": dict(opened.errors),
        "connect_seconds": round(seconds, 3),
        "connect_rate_per_s": round(opened.opened / seconds, 1) if seconds > 0 else None,
        "connect_latency": opened.connect.summary(),
    }


def idle(target: Target, fp: FleetParams, conns: int, rooms: int, hold: float) -> Result:
    """Hold ``conns`` sockets (each joined to one of ``rooms`` rooms, none if 0)."""
    specs = _specs(target, fp, conns, lambda i: f"{fp.tag}-r{i % rooms}" if rooms else None)
    with _fleet(target, fp, conns, pause=_SETTLE + hold) as fleet:
        rss_before = tree_rss(target.pids)
        opened, seconds = _open(fleet, specs, fp)
        time.sleep(_SETTLE)
        rss_after = tree_rss(target.pids)
        time.sleep(hold)
        closed = _close(fleet)
    result = {"scenario": "idle", "conns": conns, "rooms": rooms, "hold_s": hold}
    result |= _connect_figures(opened, seconds)
    if target.pids:
        result["server_rss_before_mib"] = round(rss_before / _MIB, 1)
        result["server_rss_after_mib"] = round(rss_after / _MIB, 1)
        per_conn = (rss_after - rss_before) / opened.opened / 1024 if opened.opened else None
        result["server_rss_per_conn_kib"] = round(per_conn, 2) if per_conn is not None else None
    result["dropped"] = closed.dropped
    result["integrity"] = closed.integrity.as_dict()
    return result


def _step(
    fleet: Fleet,
    kind: Literal["room", "direct"],
    rate: float,
    rp: RampParams,
    per_message: int,
    meters: tuple[CpuMeter, CpuMeter, CpuMeter],
) -> Result:
    """One step of the ramp: every worker sends its share of ``rate`` for a step."""
    n = len(fleet)
    command = Traffic(kind, rate / n, rp.step_seconds, rp.payload_bytes)
    fleet.send([command] * n)
    # CPU is sampled over the sending window only, not the wait for stragglers.
    for meter in meters:
        meter.start()
    time.sleep(rp.step_seconds)
    server_cpu, server_sys = meters[0].percents() or (None, None)
    loadgen_cpu, redis_cpu = (meter.percent() for meter in meters[1:])
    replies = fleet.gather(command.max_wait + _CONTROL_SLACK)
    merged = TrafficReply()
    for reply in replies:
        assert isinstance(reply, TrafficReply)
        merged.sent += reply.sent
        merged.acks += reply.acks
        merged.delivered += reply.delivered
        merged.errors.update(reply.errors)
        merged.latency.merge(reply.latency)
        merged.e2e.merge(reply.e2e)
        merged.dropped += reply.dropped
    expected = merged.sent * per_message
    row: Result = {
        "target_rate": round(rate, 1),
        "sent_per_s": round(merged.sent / rp.step_seconds, 1),
        "acks": merged.acks,
        "deliveries_per_s": round(merged.delivered / rp.step_seconds, 1),
        "delivery_ratio": round(merged.delivered / expected, 4) if expected else None,
        "latency": merged.latency.summary(),
        "e2e_latency": merged.e2e.summary(),
        "errors": dict(merged.errors),
        "server_cpu_pct": server_cpu,
        "server_sys_pct": server_sys,  # the kernel's part of it: system calls
        "loadgen_cpu_pct": loadgen_cpu,
        "redis_cpu_pct": redis_cpu,
    }
    row["failures"] = _failures(row, merged, rp, rate, n)
    return row


def _failures(row: Result, merged: TrafficReply, rp: RampParams, rate: float, procs: int) -> list[str]:
    """Why a step does not count as sustained (empty when it does)."""
    reasons = []
    p99 = merged.latency.percentile(0.99)
    if p99 is None or p99 > rp.p99_ms:
        reasons.append(f"p99 {p99} ms > {rp.p99_ms} ms")
    # The server's ts misses time a publish queued before the server read it.
    e2e_p99 = merged.e2e.percentile(0.99)
    if e2e_p99 is not None and e2e_p99 > rp.p99_ms:
        reasons.append(f"send-to-deliver p99 {e2e_p99} ms > {rp.p99_ms} ms")
    ratio = row["delivery_ratio"]
    if ratio is None or ratio < rp.min_delivery_ratio:
        reasons.append(f"delivery ratio {ratio} < {rp.min_delivery_ratio}")
    if merged.errors:
        reasons.append(f"errors {dict(merged.errors)}")
    if merged.sent < 0.95 * rate * rp.step_seconds:
        reasons.append(f"load generator sent only {row['sent_per_s']}/s (client-bound)")
    if merged.dropped:
        reasons.append(f"server closed {merged.dropped} sockets")
    busy = row["loadgen_cpu_pct"]
    if reasons and busy is not None and busy >= _CLIENT_BUSY_PCT * procs:
        reasons.append(f"load generator at {busy}% CPU for {procs} processes (client-bound)")
    return reasons


def _ramp(
    target: Target,
    fp: FleetParams,
    rp: RampParams,
    kind: Literal["room", "direct"],
    specs: list[ConnSpec],
    per_message: Callable[[int], int],
) -> Result:
    """Open ``specs``, then raise the rate step by step until a step fails."""
    with _fleet(target, fp, len(specs)) as fleet:
        opened, seconds = _open(fleet, specs, fp)
        meters = (CpuMeter(target.pids), CpuMeter(fleet.pids), RedisCpuMeter(target.redis_urls))
        steps: list[Result] = []
        rate = rp.start_rate
        before = redis_commandstats(target.redis_urls) if target.redis_urls else {}
        if opened.opened and rp.warmup_seconds > 0:
            warmup = Traffic(kind, rate / len(fleet), rp.warmup_seconds, rp.payload_bytes)
            fleet.broadcast(warmup, rp.warmup_seconds + warmup.max_wait + _CONTROL_SLACK)
        if opened.opened:
            for _ in range(rp.max_steps):
                row = _step(fleet, kind, rate, rp, per_message(opened.opened), meters)
                for _retry in range(rp.retries if row["failures"] else 0):
                    steps.append(row | {"retried": True})
                    row = _step(fleet, kind, rate, rp, per_message(opened.opened), meters)
                    if not row["failures"]:
                        break
                steps.append(row)
                if row["failures"]:
                    break
                rate *= rp.factor
        after = redis_commandstats(target.redis_urls) if target.redis_urls else {}
        closed = _close(fleet)
    sustained = [s for s in steps if not s["failures"]]
    best = max(sustained, key=lambda s: s["deliveries_per_s"], default=None)
    result: Result = {"roots": list(target.roots), "sockets": len(specs)}
    result |= _connect_figures(opened, seconds)
    result |= {
        "max_sustainable_deliveries_per_s": best["deliveries_per_s"] if best else 0.0,
        "p99_at_max_ms": best["latency"]["p99_ms"] if best else None,
        "stopped_because": steps[-1]["failures"] if steps and steps[-1]["failures"] else [],
        "steps": steps,
        "dropped": closed.dropped,
        "integrity": closed.integrity.as_dict(),
    }
    # Warm-up sends are not in the steps: the ratio is over the steps' messages only, a
    # slight overestimate (at most the warm-up's share).
    sent = sum(s["sent_per_s"] for s in steps) * rp.step_seconds
    if target.redis_urls and sent:
        commands, per_server = commands_between(before, after)
        result["redis_commands"] = commands
        result["redis_commands_by_server"] = per_server
        result["redis_commands_per_message"] = round(sum(commands.values()) / sent, 2)
    return result


def fanout(target: Target, fp: FleetParams, rp: RampParams, members: int) -> Result:
    """One room of ``members`` sockets spread over ``target.roots``; every member publishes."""
    room = f"{fp.tag}-fanout"
    specs = _specs(target, fp, members, lambda _i: room)
    name = "cross" if len(target.roots) > 1 else "fanout"
    return {"scenario": name} | _ramp(target, fp, rp, "room", specs, lambda opened: opened)


def direct(target: Target, fp: FleetParams, rp: RampParams, users: int) -> Result:
    """``users`` sockets, user i sending direct messages to user i+1 (mod ``users``)."""
    specs = _specs(target, fp, users, lambda _i: None, lambda i: f"{fp.tag}-u{(i + 1) % users}")
    return {"scenario": "direct"} | _ramp(target, fp, rp, "direct", specs, lambda _opened: 1)


def churn(target: Target, fp: FleetParams, slots: int, seconds: float, max_cycles: int) -> Result:
    """``slots`` concurrent connect-join-close loops for ``seconds`` (at most ``max_cycles``)."""
    specs = _specs(target, fp, slots, lambda i: f"{fp.tag}-c{i}")
    with _fleet(target, fp, slots) as fleet:
        n = len(fleet)
        per_worker = math.ceil(max_cycles / n)
        commands = [Churn(specs[w::n], seconds, per_worker, fp.connect_timeout) for w in range(n)]
        meter = CpuMeter(target.pids)
        meter.start()
        started = time.monotonic()
        replies = fleet.call(commands, seconds + fp.connect_timeout + _CONTROL_SLACK)
        elapsed = time.monotonic() - started
        server_cpu = meter.percent()
    merged = ChurnReply()
    for reply in replies:
        assert isinstance(reply, ChurnReply)
        merged.cycles += reply.cycles
        merged.failed += reply.failed
        merged.errors.update(reply.errors)
        merged.connect.merge(reply.connect)
    return {
        "scenario": "churn",
        "slots": slots,
        "seconds": round(elapsed, 2),
        "cycles": merged.cycles,
        "failed": merged.failed,
        "errors": dict(merged.errors),
        "cycles_per_s": round(merged.cycles / elapsed, 1),
        "connect_latency": merged.connect.summary(),
        "server_cpu_pct": server_cpu,
    }


class _LoopProbes:
    """Pings the first host's worker loops from a process of its own during a storm phase.

    Probe sockets land on workers as the kernel's SO_REUSEPORT hash picks (8 of them reach
    both workers of a 2-worker host but for a 1-in-128 chance); each is mapped to its
    worker by its peer port, and the summary is per worker PID.
    """

    def __init__(self, target: Target, fp: FleetParams, count: int, interval: float) -> None:
        self._target = target
        self._fp = fp
        self._count = count
        self._interval = interval
        self._round = 0
        setup = WorkerSetup(target.protocol, fp.jwt_secret, fp.command_timeout)
        self._fleet = Fleet(1, setup)
        self._owner: list[int | None] = []
        self._failed: dict[str, int] = {}

    def start(self) -> None:
        self._round += 1
        root = self._target.roots[0]
        specs = [
            ConnSpec(root, f"{self._fp.tag}-probe{self._round}-{i}", None, None, "127.0.0.1")
            for i in range(self._count)
        ]
        (started,) = self._fleet.call([PingStart(specs, self._interval, self._fp.connect_timeout)], 60.0)
        assert isinstance(started, PingStarted)
        port = int(root.rsplit(":", 1)[1])
        found = owners(self._target.pids, port, started.ports)
        self._owner = [found.get(p) for p in started.ports]
        self._failed = dict(started.failed)

    def sample(self) -> dict[str, Any]:
        """Round trips per worker since the last sample; the probes keep pinging."""
        (reply,) = self._fleet.call([PingSample()], 60.0)
        assert isinstance(reply, PingReply)
        return self._summaries(reply)

    def stop(self) -> dict[str, Any]:
        """p99 and max round trip per server worker PID (probes whose owner was not found: "?")."""
        (reply,) = self._fleet.call([PingStop()], 60.0)
        assert isinstance(reply, PingReply)
        return self._summaries(reply)

    def _summaries(self, reply: PingReply) -> dict[str, Any]:
        per_worker: dict[str, Histogram] = {}
        for owner, pongs in zip(self._owner, reply.pongs, strict=True):
            per_worker.setdefault(str(owner or "?"), Histogram()).merge(pongs)
        pings: dict[str, Any] = {pid: h.summary() for pid, h in sorted(per_worker.items())}
        if self._failed:
            pings["probes_failed"] = self._failed
        return pings

    def close(self) -> None:
        self._fleet.close()


def _worst_p99(pings: dict[str, Any]) -> float | None:
    values = [s["p99_ms"] for k, s in pings.items() if k != "probes_failed" and s["p99_ms"] is not None]
    return max(values) if values else None


def storm(
    target: Target, fp: FleetParams, conns: int, rooms: int, probes: int, ping_interval: float
) -> Result:
    """Connect storm, then resume storm: ``conns`` sockets over ``rooms`` rooms.

    Phase 1: every socket connects and joins at once (``connect_concurrency`` in flight
    per load process). Phase 2: every socket drops at once without a close frame; once
    the server has seen the drops, all reconnect with ``?session=``, and a resumed session
    rejoins its room by itself (a server without sessions, like bare, gets a fresh
    ``join``). Each phase's figure is the wall time until the last ``joined``.
    """
    specs = _specs(target, fp, conns, lambda i: f"{fp.tag}-r{i % rooms}")
    result: Result = {"scenario": "storm", "conns": conns, "rooms": rooms}
    loop_probes = _LoopProbes(target, fp, probes, ping_interval)
    try:
        with _fleet(target, fp, conns) as fleet:
            n = len(fleet)
            budget = _open_budget(fp, conns, n)
            opens = [Open(specs[w::n], fp.connect_concurrency, fp.connect_timeout) for w in range(n)]
            result["connect"] = _storm_phase(target, fleet, loop_probes, opens, budget)
            fleet.broadcast(Drop(), _CONTROL_SLACK)
            time.sleep(_SETTLE)  # the server has seen every drop: only reconnects remain
            resumes = [Resume(fp.connect_concurrency, fp.connect_timeout)] * n
            result["resume"] = _storm_phase(target, fleet, loop_probes, resumes, budget)
            _close(fleet)
    finally:
        loop_probes.close()
    return result


def _storm_phase(
    target: Target, fleet: Fleet, loop_probes: _LoopProbes, commands: list[Open] | list[Resume], budget: float
) -> Result:
    meters = (CpuMeter(target.pids), CpuMeter(fleet.pids), RedisCpuMeter(target.redis_urls))
    loop_probes.start()
    before = redis_commandstats(target.redis_urls) if target.redis_urls else {}
    for meter in meters:
        meter.start()
    opened, seconds = _merge_opens(fleet, commands, budget)
    server_cpu, loadgen_cpu, redis_cpu = (meter.percent() for meter in meters)
    after = redis_commandstats(target.redis_urls) if target.redis_urls else {}
    pings = loop_probes.stop()
    figures = _connect_figures(opened, seconds)
    figures |= {
        "resumed": opened.resumed,
        "presence_events": opened.events,
        "server_cpu_pct": server_cpu,
        "loadgen_cpu_pct": loadgen_cpu,
        "redis_cpu_pct": redis_cpu,
        "client_bound": loadgen_cpu is not None and loadgen_cpu >= _CLIENT_BUSY_PCT * len(fleet),
        "loop_ping_p99_ms": _worst_p99(pings),
        "loop_pings": pings,
    }
    if target.redis_urls and opened.opened:
        counted, per_server = commands_between(before, after)
        figures["redis_commands"] = counted
        figures["redis_commands_by_server"] = per_server
        figures["redis_commands_per_connect"] = round(sum(counted.values()) / opened.opened, 2)
    time.sleep(_SETTLE)  # what the server does after the last joined (presence) settles
    return figures


def soak(
    target: Target, fp: FleetParams, conns: int, rooms: int, seconds: float, interval: float, rate: float
) -> Result:
    """Hold ``conns`` sockets over ``rooms`` rooms; publish ``rate`` messages/s for ``seconds``.

    Every ``interval`` s: each server process's RSS and open fds, and each worker's
    longest ping round trip (its longest loop stall, as a client sees it) and p99.
    """
    specs = _specs(target, fp, conns, lambda i: f"{fp.tag}-r{i % rooms}")
    samples: list[Result] = []
    loop_probes = _LoopProbes(target, fp, 8, 0.02)
    try:
        with _fleet(target, fp, conns, pause=interval) as fleet:
            opened, connect_seconds = _open(fleet, specs, fp)
            n = len(fleet)
            loop_probes.start()
            started = time.monotonic()
            while time.monotonic() - started < seconds:
                command = Traffic("room", rate / n, interval, 64)
                replies = fleet.call([command] * n, interval + command.max_wait + _CONTROL_SLACK)
                traffic = TrafficReply()
                for reply in replies:
                    assert isinstance(reply, TrafficReply)
                    traffic.delivered += reply.delivered
                    traffic.latency.merge(reply.latency)
                    traffic.dropped += reply.dropped
                    traffic.errors.update(reply.errors)
                pings = loop_probes.sample()
                samples.append(
                    {
                        "t": round(time.monotonic() - started, 1),
                        "deliveries_per_s": round(traffic.delivered / interval, 1),
                        "p99_ms": traffic.latency.percentile(0.99),
                        "errors": dict(traffic.errors),
                        "dropped": traffic.dropped,
                        "processes": process_stats(target.pids),
                        "longest_stall_ms": {
                            pid: s["max_ms"] for pid, s in pings.items() if pid != "probes_failed"
                        },
                    }
                )
            loop_probes.stop()
            closed = _close(fleet)
    finally:
        loop_probes.close()
    result: Result = {"scenario": "soak", "conns": conns, "rooms": rooms, "seconds": seconds, "rate": rate}
    result |= _connect_figures(opened, connect_seconds)
    result |= {"samples": samples, "drift": _drift(samples), "dropped": closed.dropped}
    result["integrity"] = closed.integrity.as_dict()
    return result


def _drift(samples: list[Result]) -> dict[str, Any]:
    """Summed RSS and fds of the server at the first and last sample: flat means unchanged."""
    if len(samples) < 2:
        return {}
    first, last = samples[0]["processes"], samples[-1]["processes"]
    return {
        name: [round(sum(p[name] for p in ends.values()), 1) for ends in (first, last)]
        for name in ("rss_mib", "fds")
    }
