"""A ledger of publishes and deliveries through Redis faults, against real rtc hosts.

Publishers on both hosts publish numbered values at a steady pace and retry what was not
acked with the same `id` (as the SDKs do); subscribers on both hosts record every frame
and resume after a drop, by session or by per-room `since`/`epoch`; pollers time
`/health` on every host. Meanwhile one fault hits the one redis-server the hosts share.
The `Report` then says what reached whom: an acked value that a subscriber never got is
lost whatever the server announced (an epoch change included).

`tests/test_redis_faults.py` runs short faults and asserts the invariants;
`python -m tests.faultledger` runs the full matrix and prints the table that
docs/reliability.md quotes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from tests.client import Client
from tests.rtcproc import Host, RedisServer, hosts, settle_ring, start_redis, until

__all__ = [
    "FAULTS",
    "Fault",
    "RedisBox",
    "Report",
    "fault_cluster",
    "run_fault",
]

ANSWER_LIMIT = 2.0  # SPEC 4: a publish gets `ack` or `unavailable` within 2 s
RETRY_AFTER = 0.5  # a refused publish is sent again (same id) this long after the refusal
RESEND_SILENT = 5.0  # no answer at all this long: send again (same id)
RETRIES_PER_TICK = 2  # keeps a publisher's sending rate under the server's default --rate


# -- Redis and its faults ------------------------------------------------------------------------


PERSISTENT = ("--appendonly", "yes", "--appendfsync", "always")


@dataclass
class RedisBox:
    """The redis-server the hosts share; a restart keeps its port (and, persisted, its data)."""

    server: RedisServer
    extra: tuple[str, ...] = ()

    def restart(self) -> None:
        self.server = start_redis(*self.extra, port=self.server.port, directory=self.server.dir)


async def _stop_for(box: RedisBox, seconds: float) -> None:
    os.kill(box.server.process.pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(seconds)  # the fault's length, not a wait
    finally:
        os.kill(box.server.process.pid, signal.SIGCONT)


async def _kill_restart(box: RedisBox, down: float) -> None:
    box.server.process.kill()
    box.server.process.wait()
    await asyncio.sleep(down)  # as long as a service manager takes to restart it
    await asyncio.to_thread(box.restart)


async def _client_pause(box: RedisBox, seconds: float) -> None:
    await asyncio.to_thread(box.server.cli, "CLIENT", "PAUSE", str(int(seconds * 1000)), "ALL")
    await asyncio.sleep(seconds)  # the fault's length, not a wait


async def _debug_sleep(box: RedisBox, seconds: float) -> None:
    await asyncio.to_thread(box.server.cli, "DEBUG", "SLEEP", str(seconds))


@dataclass(frozen=True)
class Fault:
    """One fault: its name, whether the Redis it needs persists, and how to inject it."""

    name: str
    inject: Callable[[RedisBox], Awaitable[None]]
    persistent: bool = False


def sigstop(seconds: float) -> Fault:
    return Fault(f"SIGSTOP {seconds:g} s", lambda box: _stop_for(box, seconds))


def client_pause(seconds: float) -> Fault:
    return Fault(f"CLIENT PAUSE {seconds:g} s", lambda box: _client_pause(box, seconds))


def debug_sleep(seconds: float) -> Fault:
    return Fault(f"DEBUG SLEEP {seconds:g} s", lambda box: _debug_sleep(box, seconds))


def kill(down: float, *, persistent: bool) -> Fault:
    kind = "AOF always" if persistent else "no persistence"
    return Fault(f"SIGKILL, {kind}, {down:g} s down", lambda box: _kill_restart(box, down), persistent)


KILL_NO_PERSISTENCE = kill(2, persistent=False)

FAULTS: dict[str, Fault] = {
    f.name: f
    for f in (
        sigstop(2),
        sigstop(5),
        sigstop(12),
        kill(2, persistent=True),
        KILL_NO_PERSISTENCE,
        client_pause(5),
        debug_sleep(5),
    )
}


@contextlib.contextmanager
def fault_cluster(*, persistent: bool = False, workers: int = 2) -> Iterator[tuple[list[Host], RedisBox]]:
    """Two hosts sharing one redis-server that faults may stop, pause or kill."""
    extra = (
        (*PERSISTENT, "--enable-debug-command", "yes") if persistent else ("--enable-debug-command", "yes")
    )
    box = RedisBox(start_redis(*extra), extra)
    try:
        with hosts(("alpha", box.server.url), ("beta", box.server.url), workers=workers) as started:
            settle_ring(started)
            yield started, box
    finally:
        box.server.stop()


# -- the ledger's participants ------------------------------------------------------------------


@dataclass
class Attempt:
    """One sending of a value: when, and what came back when."""

    value: int
    sent: float
    answered: float | None = None
    outcome: str = ""  # "ack" or the error code
    seq: int | None = None
    epoch: str | None = None


class _Peer:
    """What a ledger publisher and subscriber share: one user's connection, opened again
    after every drop (resuming its session, if asked), each time counted."""

    def __init__(self, url: str, user: str) -> None:
        self.url, self.user = url, user
        self.reconnects = 0
        self._session: str | None = None

    async def _connect(self, resume: bool = True) -> Client | None:
        """A new connection; None once the host refused it and a client library's pause passed."""
        try:
            client = await Client.connect(self.url, self.user, session=self._session if resume else None)
        except (aiohttp.ClientError, OSError, TimeoutError):
            await asyncio.sleep(0.2)  # the host refused: try again, as a client library would
            return None
        if self._session is not None:
            self.reconnects += 1
        self._session = client.welcome["session"]
        return client


class Publisher(_Peer):
    """Publishes 1, 2, 3, ... to one room; retries what was refused with the same `id`."""

    def __init__(self, index: int, url: str, room: str, interval: float) -> None:
        super().__init__(url, f"pub{index}")
        self.index, self.room, self.interval = index, room, interval
        self.attempts: dict[int, list[Attempt]] = {}
        self.acked: dict[int, Attempt] = {}
        self.unmatched: list[dict[str, Any]] = []  # errors without an `id`: no publish to pin them on
        self._next = 0

    def pending(self) -> list[int]:
        return [v for v in self.attempts if v not in self.acked]

    async def run(self, stop: asyncio.Event, deadline: Callable[[], float]) -> None:
        """Publish until `stop`, then retry until everything is acked or `deadline()` passes."""
        while time.monotonic() < deadline():
            client = await self._connect()
            if client is None:
                continue
            try:
                if not client.welcome["resumed"]:
                    await client.send(type="join", room=self.room)
                await client.expect("joined", room=self.room, timeout=10)
                if await self._publish(client, stop, deadline):
                    return
            except (aiohttp.ClientError, ConnectionError, TimeoutError):
                pass
            finally:
                await client.close()

    async def _publish(self, client: Client, stop: asyncio.Event, deadline: Callable[[], float]) -> bool:
        reader = asyncio.create_task(self._read(client))  # answers are timed as they arrive
        try:
            for value in self.pending():  # a new connection: nothing sent before will be answered
                await self._send(client, value)
            while not client.closed.is_set():
                if stop.is_set():
                    if not self.pending() or time.monotonic() >= deadline():
                        return True
                else:
                    self._next += 1
                    await self._send(client, self._next)
                for value in self._due()[:RETRIES_PER_TICK]:
                    await self._send(client, value)
                await asyncio.sleep(self.interval)  # the publishing pace, not a wait
            return False
        finally:
            reader.cancel()

    async def _send(self, client: Client, value: int) -> None:
        self.attempts.setdefault(value, []).append(Attempt(value, time.monotonic()))
        await client.send(type="publish", room=self.room, data={"p": self.index, "n": value}, id=value)

    def _due(self) -> list[int]:
        now = time.monotonic()
        due = []
        for value in self.pending():
            last = self.attempts[value][-1]
            if (last.answered is not None and now - last.answered > RETRY_AFTER) or (
                last.answered is None and now - last.sent > RESEND_SILENT
            ):
                due.append(value)
        return due

    async def _read(self, client: Client) -> None:
        while True:
            frame = await client.frames.get()
            kind = frame["type"]
            if kind not in ("ack", "error"):
                continue
            value = frame.get("id")
            attempt = next((a for a in self.attempts.get(value, ()) if a.answered is None), None)  # type: ignore[arg-type]
            if attempt is None:
                if kind == "error":
                    self.unmatched.append(frame)
                continue
            attempt.answered = time.monotonic()
            if kind == "ack":
                attempt.outcome, attempt.seq, attempt.epoch = "ack", frame["seq"], frame.get("epoch")
                self.acked.setdefault(attempt.value, attempt)
            else:
                attempt.outcome = frame["code"]


@dataclass
class Delivery:
    epoch: str
    seq: int
    value: tuple[int, int]


class Subscriber(_Peer):
    """Joins every room, records every frame and resumes after a drop.

    `session` mode reconnects with `?session=`; `since` mode opens a fresh connection and
    joins each room with the last seq and epoch it saw. Each `message` is keyed by the
    epoch of the latest `joined` of its room on its connection.
    """

    def __init__(self, index: int, url: str, rooms: Sequence[str], mode: str) -> None:
        super().__init__(url, f"sub{index}")
        self.index, self.rooms, self.mode = index, list(rooms), mode
        self.delivered: dict[str, dict[tuple[str, int], tuple[int, int]]] = {r: {} for r in rooms}
        self.repeats = 0  # a seq seen again: allowed after a resume, de-duplicated by seq
        self.conflicts = 0  # one (epoch, seq) with two different values
        self.reordered = 0
        self.gaps: list[dict[str, Any]] = []
        self.epochs: dict[str, list[str]] = {r: [] for r in rooms}
        self.unrecovered = 0  # `joined` with recovered:false after the first join
        self._last: dict[str, tuple[str, int]] = {}
        self._joined = asyncio.Event()

    def values(self, room: str) -> dict[tuple[int, int], set[tuple[str, int]]]:
        """Each value delivered in `room`, with every (epoch, seq) it came under."""
        seen: dict[tuple[int, int], set[tuple[str, int]]] = {}
        for key, value in self.delivered[room].items():
            seen.setdefault(value, set()).add(key)
        return seen

    async def started(self) -> None:
        await asyncio.wait_for(self._joined.wait(), 15)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            client = await self._connect(resume=self.mode == "session")
            if client is None:
                continue
            try:
                if not client.welcome["resumed"]:
                    for room in self.rooms:
                        epoch, seq = self._last.get(room, ("", 0))
                        since = {"since": seq, "epoch": epoch} if epoch else {}
                        await client.send(type="join", room=room, **since)
                await self._consume(client, stop)
            except (aiohttp.ClientError, ConnectionError):
                pass
            finally:
                await client.close()

    async def _consume(self, client: Client, stop: asyncio.Event) -> None:
        current: dict[str, str] = {}
        top: dict[str, int] = {}
        joined: set[str] = set()
        async for frame in client.frames_until(stop):
            kind, room = frame["type"], frame.get("room")
            if room not in self.delivered:
                continue
            if kind == "joined":
                if room in joined or room in self._last:
                    self.unrecovered += not frame["recovered"]
                joined.add(room)
                current[room] = frame["epoch"]
                top[room] = 0
                if not self.epochs[room] or self.epochs[room][-1] != frame["epoch"]:
                    self.epochs[room].append(frame["epoch"])
                if joined == set(self.rooms):
                    self._joined.set()
            elif kind == "message" and room in current:
                self._record(room, current[room], frame, top)
            elif kind == "gap":
                self.gaps.append(frame)

    def _record(self, room: str, epoch: str, frame: dict[str, Any], top: dict[str, int]) -> None:
        seq = frame["seq"]
        value = (frame["data"]["p"], frame["data"]["n"])
        key = (epoch, seq)
        known = self.delivered[room].get(key)
        if known is not None:
            self.repeats += 1
            self.conflicts += known != value
            return
        if seq < top[room]:
            self.reordered += 1
        top[room] = max(top[room], seq)
        self.delivered[room][key] = value
        last = self._last.get(room)
        if last is None or last[0] != epoch or seq > last[1]:
            self._last[room] = key


@dataclass
class Probe:
    """`/health` timings of one host: (sent, seconds, status or 0 for no answer)."""

    host: Host
    samples: list[tuple[float, float, int]] = field(default_factory=list)

    async def run(self, stop: asyncio.Event, limit: float = 15.0) -> None:
        async with aiohttp.ClientSession() as http:
            while not stop.is_set():
                sent = time.monotonic()
                status = 0
                try:
                    async with http.get(
                        self.host.http + "/health", timeout=aiohttp.ClientTimeout(total=limit)
                    ) as response:
                        await response.read()
                        status = response.status
                except (aiohttp.ClientError, OSError, TimeoutError):
                    pass
                self.samples.append((sent, time.monotonic() - sent, status))
                await asyncio.sleep(0.2)  # the sampling interval, not a wait


# -- one run ---------------------------------------------------------------------------------------


@dataclass
class Report:
    """What one fault did to the ledger. Times in seconds."""

    fault: str
    published: int = 0
    attempts: int = 0
    acked: int = 0
    unavailable: int = 0  # `unavailable` answers (a value may get several before its ack)
    refused_other: dict[str, int] = field(default_factory=dict)
    never_acked: int = 0
    indeterminate_delivered: int = 0  # values answered `unavailable` once yet delivered
    unanswered: int = 0  # attempts that got no answer at all
    unmatched_errors: int = 0  # error frames without the publish's `id`
    answer_max: float = 0.0
    answer_p99: float = 0.0
    late_answers: int = 0  # answered after more than ANSWER_LIMIT
    delivered_to_all: int = 0
    lost: int = 0  # (subscriber, acked value) pairs never delivered
    lost_examples: list[str] = field(default_factory=list)
    duplicates: int = 0  # a value under two seqs of one epoch, or one seq with two values
    resequenced_new_epoch: int = 0  # a value under seqs of two epochs (Redis lost its dedup keys)
    reordered: int = 0
    repeats: int = 0
    gaps: int = 0
    epoch_changes: int = 0
    unrecovered_joins: int = 0
    acks_without_epoch: int = 0
    health_max: float = 0.0
    health_failures: int = 0  # non-200 or no answer, from the fault's start to the end of the run
    health_unanswered: int = 0
    recover: float | None = None  # fault end -> every publisher has an ack for a later publish
    fault_seconds: float = 0.0
    subscriber_reconnects: int = 0
    publisher_reconnects: int = 0

    def invariant_failures(self, answer_limit: float = 4.0, health_limit: float = 3.0) -> list[str]:
        """What broke a contract: loss, duplicates, reorder, slow answers, /health."""
        failures = []
        if self.lost:
            failures.append(f"{self.lost} acked deliveries lost: {self.lost_examples[:5]}")
        if self.duplicates:
            failures.append(f"{self.duplicates} duplicates")
        if self.reordered:
            failures.append(f"{self.reordered} reordered")
        if self.never_acked:
            failures.append(f"{self.never_acked} values never acked")
        if self.unanswered or self.unmatched_errors:
            failures.append(
                f"{self.unanswered} attempts unanswered, {self.unmatched_errors} errors without id"
            )
        if self.answer_max > answer_limit:
            failures.append(f"a publish waited {self.answer_max:.2f} s for its answer")
        if self.health_max > health_limit or self.health_unanswered:
            failures.append(
                f"/health took up to {self.health_max:.2f} s ({self.health_unanswered} unanswered)"
            )
        if self.health_failures:
            failures.append(f"/health answered non-200 {self.health_failures} times")
        if self.acks_without_epoch:
            failures.append(f"{self.acks_without_epoch} acks without epoch")
        return failures


ROW_HEADER = (
    "| fault | published | acked | unavailable answers | delivered to all | lost | duplicates | reordered "
    "| answer max / p99 (s) | answered > 2 s | /health max (s) | /health non-200 | recover (s) |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
)


def row(report: Report) -> str:
    r = report
    recover = "-" if r.recover is None else f"{r.recover:.1f}"
    answered = f"{r.late_answers}" + (f" (+{r.unanswered} none)" if r.unanswered else "")
    return (
        f"| {r.fault} | {r.published} | {r.acked} | {r.unavailable} | {r.delivered_to_all} | {r.lost} "
        f"| {r.duplicates} | {r.reordered} | {r.answer_max:.2f} / {r.answer_p99:.2f} | {answered} "
        f"| {r.health_max:.2f} | {r.health_failures} | {recover} |"
    )


async def run_fault(
    cluster: Sequence[Host],
    box: RedisBox,
    fault: Fault,
    *,
    warm: int = 5,
    after: float = 5.0,
    interval: float = 0.2,
    publishers: int = 4,
    subscribers: int = 4,
    settle: float = 25.0,
) -> Report:
    """Run the ledger through `fault`; returns what it recorded.

    The fault comes once every publisher has `warm` publishes delivered to every subscriber;
    publishing goes on for `after` seconds past it, the window the report measures."""
    tag = f"{time.monotonic_ns():x}"
    rooms = [f"fault-a-{tag}", f"fault-b-{tag}"]
    subs = [
        Subscriber(i, cluster[i % len(cluster)].ws, rooms, "session" if i < subscribers // 2 else "since")
        for i in range(subscribers)
    ]
    pubs = [
        Publisher(i, cluster[(i + i // 2) % len(cluster)].ws, rooms[i % 2], interval)
        for i in range(publishers)
    ]
    probes = [Probe(h) for h in cluster]
    stop_subs, stop_pubs = asyncio.Event(), asyncio.Event()
    give_up = [float("inf")]
    tasks = [asyncio.create_task(s.run(stop_subs)) for s in subs]
    tasks += [asyncio.create_task(p.run(stop_subs)) for p in probes]
    pub_tasks: list[asyncio.Task[None]] = []
    try:
        await asyncio.gather(*(s.started() for s in subs))
        pub_tasks = [asyncio.create_task(p.run(stop_pubs, lambda: give_up[0])) for p in pubs]
        await _flowing(subs, pubs, warm)
        fault_start = time.monotonic()
        await fault.inject(box)
        fault_end = time.monotonic()
        await asyncio.sleep(after)  # the measured window after the fault, not a wait
        stop_pubs.set()
        give_up[0] = time.monotonic() + settle
        await asyncio.gather(*pub_tasks)
        # What is still missing then is the report's `lost`, with examples: that is the failure.
        with contextlib.suppress(TimeoutError):
            await until(lambda: not any(_missing(s, pubs) for s in subs), 10, "every acked value delivered")
    finally:
        stop_pubs.set()
        give_up[0] = 0.0
        stop_subs.set()
        await asyncio.gather(*pub_tasks, *tasks, return_exceptions=True)
    return _report(fault.name, pubs, subs, probes, fault_start, fault_end)


async def _flowing(subs: Sequence[Subscriber], pubs: Sequence[Publisher], count: int) -> None:
    """Until every publisher has `count` publishes acked and every subscriber has those: the
    ledger runs end to end (before the fault)."""
    await until(lambda: all(len(p.acked) >= count for p in pubs), 15, f"{count} acks for every publisher")
    acked = [(p, v) for p in pubs for v in p.acked]

    def behind() -> list[str]:
        return [s.user for s in subs if any((p.index, v) not in s.values(p.room) for p, v in acked)]

    await until(lambda: not behind(), 15, lambda: f"{behind()} to receive the first acked values")


def _missing(sub: Subscriber, pubs: Sequence[Publisher]) -> list[tuple[int, int]]:
    missing = []
    for pub in pubs:
        got = sub.values(pub.room)
        missing += [(pub.index, v) for v in pub.acked if (pub.index, v) not in got]
    return missing


def _report(
    name: str,
    pubs: Sequence[Publisher],
    subs: Sequence[Subscriber],
    probes: Sequence[Probe],
    fault_start: float,
    fault_end: float,
) -> Report:
    r = Report(name, fault_seconds=fault_end - fault_start)
    waits: list[float] = []
    for pub in pubs:
        r.published += len(pub.attempts)
        r.acked += len(pub.acked)
        r.never_acked += len(pub.pending())
        r.unmatched_errors += len(pub.unmatched)
        r.publisher_reconnects += pub.reconnects
        for attempts in pub.attempts.values():
            r.attempts += len(attempts)
            for a in attempts:
                if a.answered is None:
                    r.unanswered += 1
                    continue
                waits.append(a.answered - a.sent)
                if a.outcome == "unavailable":
                    r.unavailable += 1
                elif a.outcome != "ack":
                    r.refused_other[a.outcome] = r.refused_other.get(a.outcome, 0) + 1
        r.acks_without_epoch += sum(1 for a in pub.acked.values() if a.epoch is None)
        first_after = [a.answered for a in pub.acked.values() if a.sent >= fault_end and a.answered]
        if first_after:
            r.recover = max(r.recover or 0.0, min(first_after) - fault_end)
    if waits:
        waits.sort()
        r.answer_max = waits[-1]
        r.answer_p99 = waits[min(len(waits) - 1, int(len(waits) * 0.99))]
        r.late_answers = sum(1 for w in waits if w > ANSWER_LIMIT)
    everyone: set[tuple[int, int]] | None = None
    for sub in subs:
        r.repeats += sub.repeats
        r.reordered += sub.reordered
        r.duplicates += sub.conflicts
        r.gaps += len(sub.gaps)
        r.unrecovered_joins += sub.unrecovered
        r.subscriber_reconnects += sub.reconnects
        r.epoch_changes = max(r.epoch_changes, *(len(e) - 1 for e in sub.epochs.values()))
        got: set[tuple[int, int]] = set()
        for room in sub.rooms:
            for value, keys in sub.values(room).items():
                got.add(value)
                epochs = {epoch for epoch, _ in keys}
                r.duplicates += sum(1 for epoch in epochs if sum(1 for e, _ in keys if e == epoch) > 1)
                r.resequenced_new_epoch += len(epochs) > 1
        missing = _missing(sub, pubs)
        r.lost += len(missing)
        r.lost_examples += [f"{sub.user} p{p}#{n}" for p, n in missing[:3]]
        everyone = got if everyone is None else everyone & got
    acked = {(p.index, v) for p in pubs for v in p.acked}
    r.delivered_to_all = len(acked & (everyone or set()))
    refused = {
        (p.index, v)
        for p in pubs
        for v, atts in p.attempts.items()
        if any(a.outcome == "unavailable" for a in atts)
    }
    r.indeterminate_delivered = len(refused & (everyone or set()))
    for probe in probes:
        for sent, seconds, status in probe.samples:
            if sent < fault_start:
                continue
            r.health_max = max(r.health_max, seconds)
            r.health_failures += status != 200
            r.health_unanswered += status == 0
    return r


# -- the full matrix as a command ----------------------------------------------------------------------


async def _matrix(names: Sequence[str], after: float) -> list[Report]:
    reports = []
    for name in names:
        fault = FAULTS[name]
        with fault_cluster(persistent=fault.persistent) as (cluster, box):
            report = await run_fault(cluster, box, fault, after=after)
        reports.append(report)
        print(row(report), flush=True)
        print(f"    details: {report}", file=sys.stderr, flush=True)
    return reports


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the Redis fault ledger and print its table.")
    parser.add_argument("--fault", action="append", choices=sorted(FAULTS), help="default: every fault")
    parser.add_argument("--after", type=float, default=6.0, help="seconds of publishing after the fault")
    args = parser.parse_args(argv)
    print(ROW_HEADER, flush=True)
    reports = asyncio.run(_matrix(args.fault or list(FAULTS), args.after))
    return 1 if any(r.lost or r.duplicates for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
