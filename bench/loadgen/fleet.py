"""The parent's side of the worker processes: spawn, drive in lockstep, stop.

The parent runs no event loop: it sends one command to every worker and blocks on
the replies with a deadline, which keeps the control flow of a scenario linear.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Self

from bench.loadgen import worker
from bench.loadgen.commands import Command, Failed, Ready, Reply, Stop, WorkerSetup

__all__ = ["Fleet", "WorkerError"]

_START_TIMEOUT = 60.0
_STOP_GRACE = 15.0


class WorkerError(RuntimeError):
    """A worker failed a command or did not answer in time."""


class Fleet:
    """``procs`` worker processes sharing one :class:`WorkerSetup`.

    Spawned rather than forked: the parent may hold sockets and subprocess handles
    (servers it started) that workers must not inherit.
    """

    def __init__(self, procs: int, setup: WorkerSetup) -> None:
        context = multiprocessing.get_context("spawn")
        self._conns = []
        self._procs = []
        for index in range(procs):
            parent_end, child_end = context.Pipe()
            proc = context.Process(
                target=worker.run, args=(child_end, setup), name=f"loadgen-{index}", daemon=True
            )
            proc.start()
            child_end.close()
            self._conns.append(parent_end)
            self._procs.append(proc)
        try:
            self._await_ready()
        except WorkerError:
            self.close()
            raise

    def _await_ready(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        for index, conn in enumerate(self._conns):
            if not conn.poll(max(deadline - time.monotonic(), 0.0)):
                raise WorkerError(f"worker {index} did not start within {_START_TIMEOUT:.0f} s")
            if not isinstance(conn.recv(), Ready):
                raise WorkerError(f"worker {index} sent something before Ready")

    def __len__(self) -> int:
        return len(self._procs)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def pids(self) -> list[int]:
        """Worker PIDs, for sampling the load generator's own CPU."""
        return [p.pid for p in self._procs if p.pid is not None]

    def call(self, commands: Sequence[Command], timeout: float) -> list[Reply]:
        """Send ``commands[i]`` to worker ``i`` and return every reply, in order."""
        self.send(commands)
        return self.gather(timeout)

    def send(self, commands: Sequence[Command]) -> None:
        """Send ``commands[i]`` to worker ``i``; :meth:`gather` collects the replies.

        Split from :meth:`call` so the parent can sample CPU while the workers work.
        """
        for conn, command in zip(self._conns, commands, strict=True):
            conn.send(command)

    def gather(self, timeout: float) -> list[Reply]:
        """Every worker's reply to the last :meth:`send`, in order."""
        deadline = time.monotonic() + timeout
        replies: list[Reply] = []
        for index, conn in enumerate(self._conns):
            if not conn.poll(max(deadline - time.monotonic(), 0.0)):
                raise WorkerError(f"worker {index} did not answer within {timeout:.0f} s")
            reply: Reply = conn.recv()
            if isinstance(reply, Failed):
                raise WorkerError(f"worker {index} failed:\n{reply.traceback}")
            replies.append(reply)
        return replies

    def broadcast(self, command: Command, timeout: float) -> list[Reply]:
        """Send the same command to every worker."""
        return self.call([command] * len(self._conns), timeout)

    def close(self) -> None:
        """Stop every worker: politely, then by PID if it does not exit."""
        for conn in self._conns:
            try:
                conn.send(Stop())
            except (BrokenPipeError, OSError):
                continue
        deadline = time.monotonic() + _STOP_GRACE
        for proc in self._procs:
            proc.join(max(deadline - time.monotonic(), 0.1))
            if proc.is_alive():
                proc.terminate()
                proc.join(5.0)
        for conn in self._conns:
            conn.close()
