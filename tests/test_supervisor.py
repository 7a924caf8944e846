"""The supervisor against real hosts and a real Redis: rolls that survive a dying
replacement, hung workers replaced, the exit status of an overrun stop, and a metrics
port that a silent client cannot stall."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.client import ResilientPublisher, ResumingClient, assert_complete, start_traffic, stop_traffic
from tests.rtcproc import Host, RedisServer, hosts, ring_view, settle_ring, start_host, wait_for
from tests.test_lifecycle import FAST

pytestmark = pytest.mark.timeout(120)


class NotifySocket:
    """What systemd would receive on `$NOTIFY_SOCKET`, collected in order."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="rtc-notify-")
        self.path = str(Path(self._dir.name) / "notify")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.path)
        self._sock.setblocking(False)
        self.lines: list[str] = []

    def read(self) -> list[str]:
        with contextlib.suppress(BlockingIOError):
            while True:
                self.lines += self._sock.recv(4096).decode().splitlines()
        return self.lines

    def states(self) -> list[str]:
        """READY=1, RELOADING=1 and STOPPING=1 in the order sent (STATUS and WATCHDOG left out)."""
        return [line for line in self.read() if line in ("READY=1", "RELOADING=1", "STOPPING=1")]

    def close(self) -> None:
        self._sock.close()
        self._dir.cleanup()


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    sock = NotifySocket()
    yield sock
    sock.close()


class RedisConsole:
    """One connection of our own to Redis, kept open while new ones are refused."""

    def __init__(self, server: RedisServer) -> None:
        self._sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)

    def command(self, *args: str) -> bytes:
        parts = [f"*{len(args)}\r\n".encode()]
        for arg in args:
            parts.append(f"${len(arg.encode())}\r\n{arg}\r\n".encode())
        self._sock.sendall(b"".join(parts))
        return self._sock.recv(4096)

    def close(self) -> None:
        self._sock.close()


def replaced(host: Host, before: list[int]) -> bool:
    now = host.worker_pids()
    return len(now) == host.workers and not set(now) & set(before) and host.healthy()


def test_roll_finishes_when_a_replacement_dies_before_listening(
    fresh_redis: RedisServer, notify: NotifySocket
) -> None:
    """Redis refuses new connections while SIGHUP starts the roll: the first replacement
    cannot start and exits. The roll must go on once Redis accepts again, end with
    READY=1, and a later SIGHUP must roll again."""
    console = RedisConsole(fresh_redis)
    try:
        with hosts(("roll-dies", fresh_redis.url), env={"NOTIFY_SOCKET": notify.path}) as (host,):
            wait_for(lambda: notify.states() == ["READY=1"], 10, "READY=1 after boot")
            before = host.worker_pids()
            assert console.command("CONFIG", "SET", "maxclients", "1") == b"+OK\r\n"
            host.signal(signal.SIGHUP)
            wait_for(lambda: "died (exit 2" in host.log(), 10, "a replacement that could not start")
            assert console.command("CONFIG", "SET", "maxclients", "10000") == b"+OK\r\n"
            wait_for(lambda: replaced(host, before), 30, "every worker replaced after the failure")
            wait_for(lambda: notify.states() == ["READY=1", "RELOADING=1", "READY=1"], 10, "READY=1")

            second = host.worker_pids()
            host.signal(signal.SIGHUP)
            wait_for(lambda: replaced(host, second), 30, "a second SIGHUP rolls again")
            wait_for(lambda: notify.states()[-2:] == ["RELOADING=1", "READY=1"], 10, "READY=1 again")
            assert len(notify.states()) == 5
    finally:
        console.close()


def test_hung_worker_is_killed_and_replaced(redis_server: RedisServer) -> None:
    """A worker whose loop stops (SIGSTOP) is SIGKILLed after --worker-timeout and its
    slot is served by a replacement that takes it back in the ring."""
    with hosts(("hung", redis_server.url), env={"RTC_WORKER_TIMEOUT": "3"}) as (host,):
        # /health answers 200 once one worker serves; the other may still be joining.
        settle_ring([host])
        victim, survivor = host.worker_pids()
        slots = ring_view(host)
        assert slots == ["hung:0", "hung:1"]
        psutil.Process(victim).suspend()
        stopped_at = time.monotonic()
        wait_for(lambda: not psutil.pid_exists(victim), 10, "the hung worker killed")
        killed_after = time.monotonic() - stopped_at
        wait_for(lambda: len(host.worker_pids()) == 2 and host.healthy(), 10, "a replacement")
        assert survivor in host.worker_pids()
        wait_for(lambda: all(ring_view(host) == slots for _ in range(4)), 10, "the slot back in the ring")
        assert "did not report alive" in host.log()
        print(f"\nhung worker killed {killed_after:.1f}s after SIGSTOP (--worker-timeout 3)")


def test_a_killed_workers_replacement_starts_at_the_first_attempt(redis_server: RedisServer) -> None:
    """The reaped worker's pipe is out of the supervisor's table before its replacement
    forks: the replacement must not close that descriptor number again (the new pipe can
    reuse it), which made the first attempt die with EBADF and the slot wait for a retry."""
    with hosts(("killed", redis_server.url)) as (host,):
        victim, survivor = host.worker_pids()
        psutil.Process(victim).kill()
        # Until the supervisor reaps it, the victim is still listed (a zombie).
        try:
            wait_for(
                lambda: victim not in (pids := host.worker_pids()) and len(pids) == 2 and host.healthy(),
                10,
                "a replacement",
            )
        except TimeoutError:
            pytest.fail(f"no replacement: workers {host.worker_pids()}\n{host.log()}")
        assert survivor in host.worker_pids()
        log = host.log()
        assert "Bad file descriptor" not in log and "Traceback" not in log, log
        assert log.count("died (exit") == 1, log


async def test_clients_of_a_hung_worker_resume_without_loss(redis_server: RedisServer) -> None:
    """Members and a publisher on a host whose worker hangs: once it is killed they
    reconnect with their sessions, and every published message reaches every member."""
    with hosts(("hung-load", redis_server.url), args=FAST, env={"RTC_WORKER_TIMEOUT": "3"}) as (host,):
        members = [ResumingClient([host.ws], f"h{i}", ["hung-room"]) for i in range(16)]
        publisher = ResilientPublisher([host.ws], "hung-room", interval=0.02)
        await start_traffic(members, publisher)
        victim = host.worker_pids()[0]
        psutil.Process(victim).suspend()
        await asyncio.to_thread(wait_for, lambda: not psutil.pid_exists(victim), 10, "the hung worker killed")
        await asyncio.to_thread(wait_for, lambda: replaced(host, [victim]), 10, "a replacement")
        last = await stop_traffic(members, publisher)  # the hung worker's members resumed first
        assert any(m.reconnects for m in members), "no member was on the hung worker"
        assert_complete(members, "hung-room", last)
        assert sorted(publisher.acked.values()) == list(range(1, last + 1))


def test_overrun_stop_exits_non_zero(redis_server: RedisServer) -> None:
    """A worker that cannot drain (stopped) is SIGKILLed at --shutdown-timeout: exit 4."""
    with hosts(("overrun", redis_server.url), args=("--shutdown-timeout", "1")) as (host,):
        victim = host.worker_pids()[0]
        psutil.Process(victim).suspend()
        host.signal(signal.SIGTERM)
        assert host.process.wait(20) == 4
        assert "did not stop in time" in host.log()
        assert not psutil.pid_exists(victim)


def test_sigterm_while_workers_still_boot_stops_them_all_in_time() -> None:
    """SIGTERM as soon as the first worker serves: the others are still waiting to see
    their siblings in the ring, and one that already left for good must not hold them.
    Before the fix most attempts ended with a worker killed at the deadline (exit 4)."""
    codes = []
    for attempt in range(5):
        host = start_host(f"early{attempt}", None, workers=3, wait=False)
        try:
            wait_for(lambda h=host: "serving as slot" in h.log(), 30, "a worker serving", interval=0.005)
            host.signal(signal.SIGTERM)
            codes.append(host.process.wait(30))
        finally:
            host.stop()
            shutil.rmtree(host.runtime_dir, ignore_errors=True)
    assert codes == [0] * 5, codes


def test_graceful_stop_exits_zero(redis_server: RedisServer) -> None:
    with hosts(("graceful", redis_server.url)) as (host,):
        host.signal(signal.SIGTERM)
        assert host.process.wait(20) == 0


def test_silent_metrics_clients_do_not_stall_the_supervisor(redis_server: RedisServer) -> None:
    """Clients that connect to the metrics port and say nothing neither delay a scrape
    nor the supervisor's reaping and restarting of a killed worker."""
    with hosts(("silent", redis_server.url)) as (host,):
        with contextlib.ExitStack() as stack:
            for _ in range(20):
                stack.enter_context(socket.create_connection((host.host, host.metrics_port), timeout=5))
            started = time.monotonic()
            status, body = host.get("/metrics", port=host.metrics_port)
            scraped_in = time.monotonic() - started
            assert status == 200 and b"active_connections" in body

            victim = host.worker_pids()[0]
            psutil.Process(victim).kill()
            killed_at = time.monotonic()
            wait_for(lambda: len(host.worker_pids()) == 2 and victim not in host.worker_pids(), 5, "reaped")
            replaced_in = time.monotonic() - killed_at
        print(f"\nwith 20 silent clients: scrape {scraped_in:.2f}s, worker replaced {replaced_in:.2f}s")
