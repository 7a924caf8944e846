"""The supervisor's workers as a pure state machine: boot, restarts, rolling restart, stop.

No I/O and no clock: the supervisor feeds it what happened (a worker reported listening,
ready or alive, a worker exited, a signal arrived, time passed) and carries out the
effects it returns (fork, signal a worker, notify systemd, log, exit). Workers are named
by ids the fleet hands out, so it never waits for a fork to learn a PID.

The rules are level-triggered: after every input `_advance` looks at the whole table and
does what is due, so no order of inputs can leave a step waiting for an edge that already
passed. The rules of a rolling restart (SPEC 1): one slot at a time; the replacement
starts on the slot's socket and must listen before the old worker is told to drain; the
replacement joins the ring only once no other worker of its slot is alive; a slot whose
worker is still starting is replaced like any other. A step that cannot finish in time
(its replacement keeps dying) is given up so the roll always ends with READY=1.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field

from rtc.errors import ExitStatus

__all__ = [
    "BACKOFF_CAP",
    "RETIRE_GRACE",
    "STABLE_AFTER",
    "STEP_TIMEOUT",
    "Effect",
    "Exit",
    "Fleet",
    "Join",
    "Kill",
    "Log",
    "Notify",
    "Phase",
    "Spawn",
    "Terminate",
]

STEP_TIMEOUT = 60.0  # a roll step still not done after this is given up
BACKOFF_CAP = 30.0
STABLE_AFTER = 60.0  # a worker that lived this long resets its slot's restart backoff
RETIRE_GRACE = 5.0  # past --shutdown-timeout, a draining worker is killed


# -- effects ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Spawn:
    """Fork a worker on `slot`'s socket; `join_ring` now, or wait for `Join`."""

    worker: int
    slot: int
    join_ring: bool
    restart: bool  # replaces a worker that died (counted), not a planned one


@dataclass(frozen=True, slots=True)
class _Order:
    worker: int


@dataclass(frozen=True, slots=True)
class Terminate(_Order):
    """SIGTERM: drain, leave the ring, exit."""


@dataclass(frozen=True, slots=True)
class Kill(_Order):
    """SIGKILL: hung, or past its deadline."""


@dataclass(frozen=True, slots=True)
class Join(_Order):
    """Tell a listening replacement to take its slot in the ring (SIGUSR1)."""


@dataclass(frozen=True, slots=True)
class Notify:
    """A systemd state: READY, RELOADING or STOPPING (the supervisor adds STATUS)."""

    state: str


@dataclass(frozen=True, slots=True)
class Log:
    """Something to log; `worker` names the worker it is about (the supervisor adds its PID)."""

    level: int
    message: str
    worker: int | None = None


@dataclass(frozen=True, slots=True)
class Exit:
    """The supervisor is done: exit with `status`; `failed` is the worker whose boot failed."""

    status: int
    failed: int | None = None


Effect = Spawn | Terminate | Kill | Join | Notify | Log | Exit


# -- state --------------------------------------------------------------------------------


class Phase(enum.Enum):
    BOOTING = "booting"  # until every slot has had a ready worker once
    RUNNING = "running"
    STOPPING = "stopping"
    DONE = "done"


@dataclass(slots=True)
class _Worker:
    id: int
    slot: int
    started: float
    alive_at: float
    joined: bool  # in the ring, or told to join
    listening: bool = False
    ready: bool = False
    retiring: bool = False  # told to stop: its exit is expected
    retire_by: float = 0.0
    killed: bool = False


@dataclass(slots=True)
class _Slot:
    failures: int = 0
    restart_at: float = 0.0  # a missing worker is spawned from then on
    restart: bool = False  # the next spawn replaces a worker that died


@dataclass(slots=True)
class _Step:
    """Replacing one slot's worker during a roll."""

    slot: int
    old: int | None  # the worker being replaced (None: the slot had none)
    deadline: float
    signalled: bool = False  # old told to drain
    aborted: bool = False


@dataclass(slots=True)
class _Roll:
    pending: list[int]
    step: _Step | None = None


@dataclass
class Fleet:
    """Every worker of one host and what to do next. Feed inputs, carry out the effects."""

    workers: int
    shutdown_timeout: float
    worker_timeout: float
    phase: Phase = Phase.BOOTING
    _table: dict[int, _Worker] = field(default_factory=dict)
    _slots: list[_Slot] = field(default_factory=list)
    _roll: _Roll | None = None
    _hup_pending: bool = False
    _next_id: int = 0
    _stop_by: float = 0.0
    _overran: bool = False
    _out: list[Effect] = field(default_factory=list)

    # -- inputs ---------------------------------------------------------------------------

    def start(self, now: float) -> list[Effect]:
        """Spawn one worker per slot, each joining the ring at once."""
        self._slots = [_Slot() for _ in range(self.workers)]
        return self._advance(now)

    def listening(self, worker: int, now: float) -> list[Effect]:
        """The worker serves its slot's socket but waits for `Join` to enter the ring."""
        if (w := self._table.get(worker)) is not None:
            w.listening = True
            w.alive_at = now
        return self._advance(now)

    def ready(self, worker: int, now: float) -> list[Effect]:
        """The worker listens and is in the ring."""
        if (w := self._table.get(worker)) is not None:
            w.listening = w.ready = w.joined = True
            w.alive_at = now
        return self._advance(now)

    def alive(self, worker: int, now: float) -> list[Effect]:
        """The worker's event loop turned: it is not hung."""
        if (w := self._table.get(worker)) is not None:
            w.alive_at = now
        return self._advance(now)

    def exited(self, worker: int, code: int, now: float) -> list[Effect]:
        w = self._table.pop(worker, None)
        if w is None:
            return self._advance(now)
        step = self._roll.step if self._roll is not None else None
        if step is not None and step.old == w.id:
            step.deadline = now + STEP_TIMEOUT  # from here the replacement has to get ready
        if self.phase is Phase.BOOTING and not w.retiring:
            # The first boot failed: halt with one clear line, no crash loop.
            self.phase = Phase.DONE
            status = ExitStatus.CONFIG if code == ExitStatus.CONFIG else ExitStatus.BOOT_FAILED
            return [Exit(status, failed=w.id)]
        if self.phase is Phase.RUNNING and not w.retiring:
            slot = self._slots[w.slot]
            slot.failures = 1 if now - w.started > STABLE_AFTER else slot.failures + 1
            delay = 0.0 if slot.failures == 1 else min(BACKOFF_CAP, 0.5 * 2 ** (slot.failures - 2))
            slot.restart_at = now + delay
            slot.restart = True
            self._log(logging.WARNING, f"worker {w.slot} died (exit {code}); restarting in {delay:.1f}s", w)
        return self._advance(now)

    def hup(self, now: float) -> list[Effect]:
        """A rolling restart; one that arrives while booting waits for the boot to finish."""
        if self.phase is Phase.BOOTING:
            self._hup_pending = True
        elif self.phase is Phase.RUNNING:
            if self._roll is not None:
                self._log(logging.INFO, "SIGHUP during a rolling restart: the restart continues")
            else:
                self._begin_roll()
        return self._advance(now)

    def stop(self, now: float) -> list[Effect]:
        """Drain every worker; past --shutdown-timeout the rest are killed."""
        if self.phase in (Phase.BOOTING, Phase.RUNNING):
            self.phase = Phase.STOPPING
            self._roll = None
            self._stop_by = now + self.shutdown_timeout
            self._out.append(Notify("STOPPING"))
            for w in self._table.values():
                self._terminate(w, now)
        return self._advance(now)

    def abandon(self) -> None:
        """The supervisor is going away on its own terms: decide nothing more."""
        self.phase = Phase.DONE
        self._roll = None

    def tick(self, now: float) -> list[Effect]:
        """Time passed: restarts, roll steps, hung workers and deadlines that are due."""
        return self._advance(now)

    # -- views ----------------------------------------------------------------------------

    @property
    def rolling(self) -> bool:
        return self._roll is not None

    def roll_position(self) -> int | None:
        """During a rolling restart, the slot being replaced counting from 1 (0: not begun)."""
        return None if self._roll is None else self.workers - len(self._roll.pending)

    def ready_count(self) -> int:
        return sum(1 for w in self._table.values() if w.ready and not w.retiring)

    # -- rules ----------------------------------------------------------------------------

    def _advance(self, now: float) -> list[Effect]:
        if self.phase is Phase.STOPPING:
            self._advance_stop(now)
        elif self.phase is not Phase.DONE:
            self._kill_silent(now)
            self._advance_roll(now)
            self._spawn_missing(now)
            self._join_alone()
            self._check_booted()
        out, self._out = self._out, []
        return out

    def _advance_stop(self, now: float) -> None:
        if now >= self._stop_by:
            for w in self._table.values():
                if not w.killed:
                    self._log(logging.WARNING, f"worker {w.slot} did not stop in time: killed", w)
                    self._overran = True
                    w.killed = True
                    self._out.append(Kill(w.id))
        if not self._table:
            self.phase = Phase.DONE
            self._log(logging.INFO, "stopped")
            self._out.append(Exit(ExitStatus.STOP_OVERRAN if self._overran else ExitStatus.OK))

    def _kill_silent(self, now: float) -> None:
        """A worker whose loop stopped reporting, or a drain past its deadline, is killed."""
        for w in self._table.values():
            if w.killed:
                continue
            if now - w.alive_at > self.worker_timeout:
                self._log(
                    logging.ERROR,
                    f"worker {w.slot} did not report alive for {now - w.alive_at:.1f}s: killed",
                    w,
                )
            elif w.retiring and now > w.retire_by:
                self._log(logging.WARNING, f"worker {w.slot} did not finish draining in time: killed", w)
            else:
                continue
            w.killed = True
            self._out.append(Kill(w.id))

    def _spawn_missing(self, now: float) -> None:
        """Every slot needs a worker that is not retiring (and, in a roll step, a replacement)."""
        step = self._roll.step if self._roll is not None else None
        for index, slot in enumerate(self._slots):
            live = self._live(index)
            if step is not None and step.slot == index and not step.aborted:
                needed = not any(w.id != step.old and not w.retiring for w in live)
            else:
                needed = not any(not w.retiring for w in live)
            if needed and now >= slot.restart_at:
                w = _Worker(self._next_id, index, now, now, joined=not live)
                self._next_id += 1
                self._table[w.id] = w
                self._out.append(Spawn(w.id, index, w.joined, slot.restart))
                slot.restart = False

    def _join_alone(self) -> None:
        """A listening worker enters the ring once no other worker of its slot is alive."""
        for w in self._table.values():
            if w.listening and not w.joined and not w.retiring and len(self._live(w.slot)) == 1:
                w.joined = True
                self._out.append(Join(w.id))

    def _check_booted(self) -> None:
        if self.phase is not Phase.BOOTING:
            return
        ready = {w.slot for w in self._table.values() if w.ready and not w.retiring}
        if len(ready) == self.workers:
            self.phase = Phase.RUNNING
            self._out.append(Notify("READY"))
            if self._hup_pending:
                self._hup_pending = False
                self._begin_roll()

    def _begin_roll(self) -> None:
        self._log(logging.INFO, f"rolling restart of {self.workers} workers")
        self._out.append(Notify("RELOADING"))
        self._roll = _Roll(pending=list(range(self.workers)))

    def _advance_roll(self, now: float) -> None:
        roll = self._roll
        if roll is None:
            return
        step = roll.step
        if step is None:
            if not roll.pending:
                self._roll = None
                self._log(logging.INFO, "rolling restart done")
                self._out.append(Notify("READY"))
                return
            slot = roll.pending.pop(0)
            current = [w for w in self._live(slot) if not w.retiring]
            step = roll.step = _Step(slot, current[0].id if current else None, now + STEP_TIMEOUT)
            self._slots[slot].restart_at = min(self._slots[slot].restart_at, now)
            return  # `_spawn_missing` starts the replacement in this same pass
        live = self._live(step.slot)
        old = self._table.get(step.old) if step.old is not None else None
        new = [w for w in live if w is not old and not w.retiring]
        if step.aborted:
            if not any(w.retiring for w in live):
                roll.step = None
        elif old is not None and not step.signalled:
            if new and new[0].listening:
                step.signalled = True
                self._terminate(old, now)
            elif now > step.deadline:
                step.aborted = True
                self._log(
                    logging.ERROR,
                    f"rolling restart: no replacement for worker {step.slot} listened in "
                    f"{STEP_TIMEOUT:.0f}s; it keeps its old worker",
                )
                for w in new:
                    self._terminate(w, now)
        elif old is None and new and new[0].ready:
            roll.step = None
        elif old is None and now > step.deadline:
            self._log(logging.ERROR, f"rolling restart: worker {step.slot} not ready in time; moving on")
            roll.step = None
        if roll.step is None:
            self._advance_roll(now)  # the next step starts in this same pass

    # -- helpers --------------------------------------------------------------------------

    def _live(self, slot: int) -> list[_Worker]:
        return [w for w in self._table.values() if w.slot == slot]

    def _terminate(self, w: _Worker, now: float) -> None:
        if not w.retiring:
            w.retiring = True
            w.retire_by = now + self.shutdown_timeout + RETIRE_GRACE
            self._out.append(Terminate(w.id))

    def _log(self, level: int, message: str, w: _Worker | None = None) -> None:
        self._out.append(Log(level, message, None if w is None else w.id))
