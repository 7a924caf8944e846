"""rtc.fleet: the supervisor's state machine, fed events with an injected clock.

A simulated host carries out the fleet's effects the way real workers would (listen,
join when told, drain and exit when terminated, die when killed) and hypothesis drives it
through arbitrary orders of reports, crashes, hangs, SIGHUPs, SIGTERM and time. After every
step the SPEC 1 rules must hold; at the end the simulated workers behave and the fleet must
settle: no roll left running, READY=1 after the last RELOADING=1, every slot served.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from rtc.errors import ExitStatus
from rtc.fleet import (
    RETIRE_GRACE,
    STABLE_AFTER,
    STEP_TIMEOUT,
    Effect,
    Exit,
    Fleet,
    Join,
    Kill,
    Log,
    Notify,
    Phase,
    Spawn,
    Terminate,
)

SHUTDOWN = 5.0
TIMEOUT = 10.0


@dataclass
class Proc:
    """A simulated worker process."""

    id: int
    slot: int
    spawned: float
    joined: bool
    listening: bool = False
    ready: bool = False
    terminated: bool = False
    killed: bool = False
    hung: bool = False


@dataclass
class Host:
    """Carries out effects and checks the rules at the moment each one is issued."""

    fleet: Fleet
    now: float = 0.0
    procs: dict[int, Proc] = field(default_factory=dict)
    notified: list[str] = field(default_factory=list)
    logs: list[tuple[float, int, str]] = field(default_factory=list)
    exit: Exit | None = None
    stop_at: float | None = None
    killed_at_stop: bool = False

    def live(self, slot: int) -> list[Proc]:
        return [p for p in self.procs.values() if p.slot == slot]

    def apply(self, effects: list[Effect]) -> None:
        for effect in effects:
            assert self.exit is None, f"{effect} after {self.exit}"
            match effect:
                case Spawn(worker, slot, join_ring, _):
                    assert self.stop_at is None, "spawned while stopping"
                    assert worker not in self.procs
                    if join_ring:
                        assert not self.live(slot), "joined the ring while another worker of its slot lives"
                    self.procs[worker] = Proc(worker, slot, self.now, join_ring)
                case Join(worker):
                    proc = self.procs[worker]
                    assert proc.listening and not proc.joined and not proc.terminated
                    assert self.live(proc.slot) == [proc], "joined while the old worker still lives"
                    proc.joined = True
                case Terminate(worker):
                    proc = self.procs[worker]
                    assert not proc.terminated
                    if self.stop_at is None:
                        others = [p for p in self.live(proc.slot) if p is not proc]
                        if all(p.id > proc.id for p in others):
                            # The old worker of a roll drains only once its replacement accepts.
                            assert any(p.listening for p in others), "drained before its replacement listened"
                        else:  # a replacement given up: the old worker stays
                            assert any(not p.terminated for p in others), "gave up with no worker left"
                    proc.terminated = True
                case Kill(worker):
                    proc = self.procs[worker]
                    assert not proc.killed
                    proc.killed = True
                    if self.stop_at is not None and self.now >= self.stop_at + SHUTDOWN:
                        self.killed_at_stop = True
                case Notify(state):
                    self.notified.append(state)
                case Log(level, message):
                    self.logs.append((self.now, level, message))
                case Exit():
                    self.exit = effect
        busy = [s for s in range(self.fleet.workers) if len(self.live(s)) > 1]
        assert len(busy) <= 1, f"slots {busy} replaced at once"
        assert all(len(self.live(s)) <= 2 for s in range(self.fleet.workers))

    # -- what a worker does ---------------------------------------------------------------

    def report_listening(self, proc: Proc) -> None:
        proc.listening = True
        if proc.joined:
            proc.ready = True
            self.apply(self.fleet.ready(proc.id, self.now))
        else:
            self.apply(self.fleet.listening(proc.id, self.now))

    def report_ready(self, proc: Proc) -> None:
        proc.ready = True
        self.apply(self.fleet.ready(proc.id, self.now))

    def exit_proc(self, proc: Proc, code: int) -> None:
        del self.procs[proc.id]
        self.apply(self.fleet.exited(proc.id, code, self.now))

    def tick(self, seconds: float) -> None:
        self.now += seconds
        self.apply(self.fleet.tick(self.now))

    def behave(self) -> None:
        """One second of well-behaved workers: the hung stay hung until killed."""
        for proc in list(self.procs.values()):
            if proc.killed:
                self.exit_proc(proc, -9)
            elif proc.hung or self.exit is not None:
                continue
            elif proc.terminated:
                self.exit_proc(proc, 0)
            elif not proc.listening:
                self.report_listening(proc)
            elif proc.joined and not proc.ready:
                self.report_ready(proc)
            else:
                self.apply(self.fleet.alive(proc.id, self.now))
        if self.exit is None:
            self.tick(1.0)

    def settled(self) -> bool:
        if self.exit is not None:
            return True
        if self.fleet.rolling or self.fleet.phase is not Phase.RUNNING:
            return False
        return all(
            len(live := self.live(s)) == 1 and live[0].ready and not live[0].terminated
            for s in range(self.fleet.workers)
        )


def booted(workers: int) -> Host:
    host = Host(Fleet(workers, SHUTDOWN, TIMEOUT))
    host.apply(host.fleet.start(host.now))
    for _ in range(3):
        host.behave()
    assert host.notified == ["READY"] and host.fleet.phase is Phase.RUNNING
    return host


class FleetMachine(RuleBasedStateMachine):
    host: Host

    @initialize(workers=st.integers(1, 3))
    def boot(self, workers: int) -> None:
        self.host = booted(workers)
        self.hups = 0

    def _pick(self, index: int) -> Proc | None:
        procs = sorted(self.host.procs.values(), key=lambda p: p.id)
        return procs[index % len(procs)] if procs and self.host.exit is None else None

    @rule(index=st.integers(0, 5))
    def reports(self, index: int) -> None:
        proc = self._pick(index)
        if proc is None or proc.hung or proc.killed:
            return
        if not proc.listening:
            self.host.report_listening(proc)
        elif proc.joined and not proc.ready:
            self.host.report_ready(proc)
        else:
            self.host.apply(self.host.fleet.alive(proc.id, self.host.now))

    @rule(index=st.integers(0, 5), code=st.sampled_from([0, 1, 2, -9, -15]))
    def exits(self, index: int, code: int) -> None:
        proc = self._pick(index)
        if proc is not None:
            self.host.exit_proc(proc, code)

    @rule(index=st.integers(0, 5))
    def hangs(self, index: int) -> None:
        proc = self._pick(index)
        if proc is not None:
            proc.hung = True

    @rule(seconds=st.sampled_from([0.0, 0.3, 1.0, 4.0, 11.0, 61.0]))
    def time_passes(self, seconds: float) -> None:
        if self.host.exit is None:
            self.host.tick(seconds)

    @rule()
    def sighup(self) -> None:
        if self.host.exit is None:
            self.hups += 1
            self.host.apply(self.host.fleet.hup(self.host.now))

    @rule()
    def sigterm(self) -> None:
        if self.host.exit is None and self.host.stop_at is None:
            self.host.stop_at = self.host.now
            self.host.apply(self.host.fleet.stop(self.host.now))

    @invariant()
    def never_two_in_the_ring(self) -> None:
        for slot in range(self.host.fleet.workers):
            joined = [p for p in self.host.live(slot) if p.joined and not p.terminated]
            assert len(joined) <= 1, joined

    def teardown(self) -> None:
        host = getattr(self, "host", None)
        if host is None:
            return
        for _ in range(1000):
            if host.settled():
                break
            host.behave()
        assert host.settled(), f"stuck: {host.procs} {host.fleet.phase} {host.logs[-5:]}"
        if host.exit is not None:
            assert host.stop_at is not None or host.fleet.phase is Phase.DONE
            if host.stop_at is not None:
                expected = ExitStatus.STOP_OVERRAN if host.killed_at_stop else ExitStatus.OK
                assert host.exit.status == expected
            return
        if "RELOADING" in host.notified:
            last = len(host.notified) - 1 - host.notified[::-1].index("RELOADING")
            assert "READY" in host.notified[last:], "no READY=1 after RELOADING=1"
            rolled_at = max(t for t, _, m in host.logs if m.startswith("rolling restart of"))
            for slot in range(host.fleet.workers):
                (proc,) = host.live(slot)
                gave_up = any(
                    t >= rolled_at and level == logging.ERROR and f"worker {slot} " in m
                    for t, level, m in host.logs
                )
                assert proc.spawned >= rolled_at or gave_up, f"slot {slot} not replaced by the roll"


TestFleet = FleetMachine.TestCase
TestFleet.settings = settings(
    max_examples=5000 if os.environ.get("RTC_SLOW") else 300,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# -- examples worth naming ----------------------------------------------------------------


def test_roll_goes_on_when_a_replacement_dies_before_listening() -> None:
    host = booted(2)
    old = {p.slot: p.id for p in host.procs.values()}
    host.apply(host.fleet.hup(host.now))
    assert host.notified == ["READY", "RELOADING"]
    (replacement,) = [p for p in host.procs.values() if p.id not in old.values()]
    host.exit_proc(replacement, 2)  # could not reach Redis
    assert host.procs[old[0]].terminated is False  # the old one keeps serving
    for _ in range(20):
        host.behave()
    assert host.notified == ["READY", "RELOADING", "READY"]
    assert not set(old.values()) & set(host.procs) and host.settled()
    host.apply(host.fleet.hup(host.now))  # and the next SIGHUP rolls again
    for _ in range(20):
        host.behave()
    assert host.notified == ["READY", "RELOADING", "READY", "RELOADING", "READY"]


def test_replacement_joins_only_after_the_old_worker_exits() -> None:
    host = booted(1)
    (old,) = host.procs.values()
    host.apply(host.fleet.hup(host.now))
    (new,) = [p for p in host.procs.values() if p is not old]
    assert not new.joined
    host.report_listening(new)
    assert old.terminated and not new.joined
    host.tick(1.0)
    assert not new.joined
    host.exit_proc(old, 0)
    assert new.joined
    host.report_ready(new)
    assert host.notified[-1] == "READY" and not host.fleet.rolling


def test_roll_replaces_a_slot_whose_worker_is_still_starting() -> None:
    host = booted(1)
    (first,) = host.procs.values()
    host.exit_proc(first, -9)
    (starting,) = host.procs.values()
    assert starting.joined and not starting.listening
    host.apply(host.fleet.hup(host.now))
    (new,) = [p for p in host.procs.values() if p is not starting]
    host.report_listening(new)
    assert starting.terminated
    for _ in range(5):
        host.behave()
    assert list(host.procs) == [new.id] and host.settled()


def test_step_is_given_up_when_no_replacement_listens_in_time() -> None:
    host = booted(2)
    old = {p.slot: p.id for p in host.procs.values()}
    host.apply(host.fleet.hup(host.now))
    waited = 0.0
    while waited <= STEP_TIMEOUT + 1:
        for proc in [p for p in host.procs.values() if p.id not in old.values()]:
            host.exit_proc(proc, 2)  # every replacement dies before it listens
        host.tick(1.0)
        waited += 1.0
    assert any("keeps its old worker" in m for _, _, m in host.logs)
    assert old[0] in host.procs and not host.procs[old[0]].terminated
    for _ in range(20):
        host.behave()
    assert host.settled() and host.notified[-1] == "READY"


def test_hung_worker_is_killed_after_the_timeout_and_replaced() -> None:
    host = booted(2)
    victim = host.procs[0]
    victim.hung = True
    for _ in range(int(TIMEOUT) - 1):
        host.behave()
    assert not victim.killed
    host.behave()
    host.behave()
    assert victim.id not in host.procs
    assert any("did not report alive" in m for _, _, m in host.logs)
    for _ in range(3):
        host.behave()
    assert host.settled()


def test_restart_backoff_grows_and_resets_after_a_stable_run() -> None:
    host = booted(1)
    delays = []
    for _ in range(4):
        (proc,) = host.procs.values()
        host.exit_proc(proc, 1)
        died = host.now
        while not host.procs:
            host.tick(0.25)
        delays.append(host.now - died)
        host.report_listening(next(iter(host.procs.values())))
    assert delays == [0.0, 0.5, 1.0, 2.0]
    host.tick(STABLE_AFTER + 1)
    (proc,) = host.procs.values()
    host.exit_proc(proc, 1)
    assert host.procs, "a worker that ran long enough is restarted at once"


@pytest.mark.parametrize("code", [2, 1, -9])
def test_first_boot_failure_halts(code: int) -> None:
    host = Host(Fleet(2, SHUTDOWN, TIMEOUT))
    host.apply(host.fleet.start(0.0))
    host.report_listening(host.procs[0])
    host.exit_proc(host.procs[1], code)
    assert host.exit == Exit(ExitStatus.CONFIG if code == 2 else ExitStatus.BOOT_FAILED, failed=1)


def test_stop_exits_zero_in_time_and_four_after_killing() -> None:
    host = booted(2)
    host.stop_at = host.now
    host.apply(host.fleet.stop(host.now))
    assert host.notified[-1] == "STOPPING"
    assert host.fleet.stop(host.now) == []  # a second SIGTERM changes nothing
    for proc in list(host.procs.values()):
        host.exit_proc(proc, 0)
    assert host.exit == Exit(ExitStatus.OK)

    host = booted(2)
    host.procs[0].hung = True
    host.stop_at = host.now
    host.apply(host.fleet.stop(host.now))
    for _ in range(int(SHUTDOWN) + 3):
        host.behave()
    assert host.exit == Exit(ExitStatus.STOP_OVERRAN)


def test_sighup_while_booting_rolls_after_the_boot() -> None:
    host = Host(Fleet(1, SHUTDOWN, TIMEOUT))
    host.apply(host.fleet.start(0.0))
    host.apply(host.fleet.hup(0.0))
    assert host.notified == [] and not host.fleet.rolling
    host.report_listening(host.procs[0])
    assert host.notified == ["READY", "RELOADING"] and host.fleet.rolling


def test_a_draining_worker_that_never_exits_is_killed_after_the_grace() -> None:
    host = booted(1)
    (old,) = host.procs.values()
    host.apply(host.fleet.hup(host.now))
    (new,) = [p for p in host.procs.values() if p is not old]
    host.report_listening(new)
    assert old.terminated
    for _ in range(int(SHUTDOWN + RETIRE_GRACE)):
        host.apply(host.fleet.alive(old.id, host.now))  # its loop runs, its drain never ends
        host.tick(1.0)
    assert not old.killed
    host.apply(host.fleet.alive(old.id, host.now))
    host.tick(1.0)
    assert old.killed and any("did not finish draining" in m for _, _, m in host.logs)
    host.exit_proc(old, -9)
    assert new.joined and host.fleet.ready_count() == 0
    host.report_ready(new)
    assert host.fleet.ready_count() == 1 and host.notified[-1] == "READY"


def test_reports_of_unknown_workers_change_nothing() -> None:
    host = booted(1)
    for report in (host.fleet.listening, host.fleet.ready, host.fleet.alive):
        assert report(99, host.now) == []
    assert host.fleet.exited(99, 0, host.now) == []
    host.fleet.abandon()
    (proc,) = host.procs.values()
    assert host.fleet.exited(proc.id, 1, host.now) == []  # abandoned: nothing is restarted
