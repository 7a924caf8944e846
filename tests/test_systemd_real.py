"""The shipped unit under a real systemd (PID 1 of a Debian container, tests/nspawn.py),
installed as docs/deploy.md says, files from systemd/ unchanged.

The tests run in order against one booted machine and print each proof. Inside, rtc listens
on 0.0.0.0:8081 as rtc.env.example says; the container has a network of its own (loopback
only), and the clients (tests/ws_probe.py) run in that network.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.nspawn import Machine, booted, cached_root, install_rtc
from tests.proxies import require_program
from tests.rtcproc import stop_process, wait_for
from tests.systemd_unit import parse_unit, timespan_seconds

REPO = Path(__file__).resolve().parent.parent
UNIT = parse_unit((REPO / "systemd" / "rtc.service").read_text())["Service"]
WS = "ws://127.0.0.1:8081/ws"
DYNAMIC_UIDS = range(61184, 65520)  # systemd's DynamicUser= range

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    for program in ("debootstrap", "systemd-nspawn", "nsenter", "unshare"):
        require_program(program)
    assert os.geteuid() == 0, "booting a container needs root"
    started = time.monotonic()
    base = cached_root()
    root = tmp_path_factory.mktemp("nspawn") / "root"
    subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(root)], check=True, timeout=300)
    install_rtc(root)
    try:
        with booted(root) as booted_machine:
            print(f"\nroot ready and booted in {time.monotonic() - started:.0f}s")
            yield booted_machine
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _main_pid(machine: Machine) -> int:
    return int(machine.show("rtc", "MainPID")["MainPID"])


def _workers(machine: Machine) -> list[int]:
    """The supervisor's worker processes (redis-server left out)."""
    main = _main_pid(machine)
    listing = machine.out("ps", "-o", "pid=,comm=", "--ppid", str(main))
    return sorted(
        int(pid) for pid, comm in (line.split() for line in listing.splitlines()) if comm != "redis-server"
    )


def _proc_status(machine: Machine, pid: int) -> dict[str, str]:
    text = machine.out("cat", f"/proc/{pid}/status")
    return {k: v.strip() for k, v in (line.split(":", 1) for line in text.splitlines())}


def _token(machine: Machine, user: str) -> str:
    """As an operator mints one on the host: root, with the secret file."""
    return machine.out("rtc", "token", "--user", user, "--jwt-secret-file", "/etc/rtc/jwt-secret")


def _probe(machine: Machine, *argv: str) -> subprocess.Popen[str]:
    return machine.host_command_in_network(
        [sys.executable, "-m", "tests.ws_probe", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def _connects(machine: Machine) -> int:
    """WebSocket connections the host opened since it started (all workers, live and dead)."""
    return int(json.loads(machine.out("curl", "-s", "http://127.0.0.1:8081/metrics"))["total_connections"])


def _report(process: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = process.communicate(timeout=150)
    assert process.returncode == 0, err
    report: dict[str, Any] = json.loads(out.splitlines()[-1])
    return report


def _http_status(machine: Machine, path: str) -> int:
    """curl inside the machine, as docs/deploy.md section 6 does."""
    return int(
        machine.out("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:8081{path}")
    )


def _ready(machine: Machine) -> bool:
    state = machine.show("rtc", "ActiveState", "StatusText")
    return state["ActiveState"] == "active" and state["StatusText"].startswith("2/2 workers ready")


def test_starts_ready_as_a_dynamic_user_with_its_sandbox(machine: Machine) -> None:
    assert machine.out("systemctl", "is-active", "rtc") == "active"
    state = machine.show("rtc", "Type")
    # Type=notify: "active" is reached only through the supervisor's READY=1.
    assert state["Type"] == "notify"
    # `systemctl restart` returns when READY=1 arrives: at that moment every worker must already
    # listen and be in the ring (/health 200 on each; the port's two sockets take turns).
    machine.run("systemctl", "restart", "rtc", timeout=120)
    health = [_http_status(machine, "/health") for _ in range(6)]
    assert health == [200] * 6, health
    assert machine.out("systemctl", "is-active", "rtc") == "active"
    pid = _main_pid(machine)
    status = _proc_status(machine, pid)
    uid = int(status["Uid"].split()[0])
    assert uid in DYNAMIC_UIDS, status["Uid"]
    assert str(uid) not in machine.out("cut", "-d:", "-f3", "/etc/passwd").split()
    assert status["CapEff"] == "0000000000000000"
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"
    mounts = machine.out("cat", f"/proc/{pid}/mountinfo")
    assert re.search(r"^\S+ \S+ \S+ \S+ / \S*\bro\b", mounts, re.MULTILINE), "root not read-only"
    for worker in _workers(machine):
        assert int(_proc_status(machine, worker)["Uid"].split()[0]) == uid
    print(
        f"PROOF ready: Type=notify; `systemctl restart` returned on READY=1 with /health 200 x6 "
        f"right away; is-active=active, Status={machine.show('rtc', 'StatusText')['StatusText']!r}"
    )
    print(f"PROOF user: MainPID {pid} runs as dynamic uid {uid} (no passwd entry), workers too")
    print("PROOF sandbox: CapEff=0, NoNewPrivs=1, Seccomp=2 (filter), / mounted read-only")


def test_secret_arrives_through_load_credential(machine: Machine) -> None:
    pid = _main_pid(machine)
    uid = _proc_status(machine, pid)["Uid"].split()[0]
    credential = machine.out("stat", "-c", "%u %a", "/run/credentials/rtc.service/jwt-secret")
    assert credential == f"{uid} 400", credential
    secret = machine.out("cat", "/etc/rtc/jwt-secret")
    environ = machine.out("cat", f"/proc/{pid}/environ").split("\0")
    assert "CREDENTIALS_DIRECTORY=/run/credentials/rtc.service" in environ
    assert not [line for line in environ if secret in line]
    assert secret not in machine.out("systemctl", "show", "rtc")
    # A token signed with the file's secret is accepted: rtc verifies with that credential.
    held = _probe(machine, "hold", WS, _token(machine, "alice"), "1")
    assert held.stdout is not None and held.stdout.readline().strip() == "held"
    stop_process(held)  # type: ignore[arg-type]
    held.communicate()
    print(f"PROOF credential: /run/credentials/rtc.service/jwt-secret mode 0400 owned by uid {uid};")
    print("  not in the environment or `systemctl show`; a token signed with it gets `welcome`")


def test_open_file_limit_is_the_units(machine: Machine) -> None:
    unit_limit = int(UNIT["LimitNOFILE"][0])
    machine_hard = int(machine.out("sh", "-c", "ulimit -Hn"))  # what PID 1 here may hand out
    in_force = []
    for pid in [_main_pid(machine), *_workers(machine)]:
        line = next(x for x in machine.out("cat", f"/proc/{pid}/limits").splitlines() if "open files" in x)
        in_force.append(tuple(int(n) for n in line.split()[3:5]))
    expected = min(unit_limit, machine_hard)
    assert in_force == [(expected, expected)] * len(in_force), in_force
    shown = machine.show("rtc", "LimitNOFILE")["LimitNOFILE"]
    print(
        f"PROOF nofile: unit LimitNOFILE={unit_limit} (systemctl show: {shown}), this machine's hard "
        f"limit {machine_hard}: in force soft=hard={expected} for the supervisor and both workers"
    )


def test_reload_rolls_the_workers_without_refusing_a_connection(machine: Machine) -> None:
    before = _workers(machine)
    loop = _probe(machine, "loop", WS, _token(machine, "looper"))
    assert loop.stdout is not None and loop.stdout.readline().strip() == "looping"
    # Status lines as `systemctl status` shows them, sampled inside as fast as systemctl answers.
    # (bounded, and stopped by a file: signals would reach only nsenter, not the shell inside)
    watch = subprocess.Popen(
        [
            *machine.command(
                "sh",
                "-c",
                "i=0; while [ $i -lt 5000 ] && [ ! -e /run/watch.stop ]; do "
                "systemctl show -p StatusText --value rtc >> /run/watch.log; i=$((i+1)); done",
            )
        ]
    )
    try:
        baseline = _connects(machine)  # 20 successful connects before the reload
        wait_for(lambda: _connects(machine) >= baseline + 20, 30, "20 connects before the reload", 0.2)
        machine.run("systemctl", "reload", "rtc")
        wait_for(
            lambda: not set(_workers(machine)) & set(before) and _ready(machine),
            60,
            "both workers replaced",
            interval=0.1,
        )
        rolled = _connects(machine)  # and 20 to the new workers
        wait_for(lambda: _connects(machine) >= rolled + 20, 30, "20 connects after the reload", 0.2)
    finally:
        loop.send_signal(signal.SIGTERM)
        machine.run("touch", "/run/watch.stop")
        watch.wait(30)
    statuses = machine.out("cat", "/run/watch.log").splitlines()
    report = _report(loop)
    assert report["failures"] == [], report
    assert report["attempts"] > 20, report
    journal = machine.journal("rtc")
    assert "Reloading rtc.service" in journal and "Reloaded rtc.service" in journal
    progress = sorted(set(statuses), key=statuses.index)
    # The Status line shows the reload while it runs, and its outcome afterwards.
    assert any(line.startswith("reloading: replacing worker ") for line in progress), progress
    assert re.search(r"last reload replaced 2 workers in [\d.]+s$", progress[-1]), progress
    print(
        f"PROOF reload: workers {before} -> {_workers(machine)}; {report['attempts']} connects during it, "
        f"0 refused; Status lines seen: {progress}"
    )


def test_killed_worker_is_replaced_by_the_supervisor(machine: Machine) -> None:
    restarts = machine.show("rtc", "NRestarts")["NRestarts"]
    main = _main_pid(machine)
    victim = _workers(machine)[0]
    machine.run("kill", "-KILL", str(victim))
    wait_for(
        lambda: victim not in _workers(machine) and len(_workers(machine)) == 2 and _ready(machine),
        30,
        "a new worker",
    )
    assert _main_pid(machine) == main
    assert machine.show("rtc", "NRestarts")["NRestarts"] == restarts
    print(
        f"PROOF worker: SIGKILLed worker {victim}, workers now {_workers(machine)}; "
        f"MainPID {main} kept, NRestarts still {restarts}"
    )


def test_stopped_supervisor_is_killed_by_the_watchdog_and_restarted(machine: Machine) -> None:
    restarts = int(machine.show("rtc", "NRestarts")["NRestarts"])
    main = _main_pid(machine)
    since = machine.out("date", "+%Y-%m-%d %H:%M:%S")
    stopped_at = time.monotonic()
    machine.run("kill", "-STOP", str(main))
    watchdog = timespan_seconds(UNIT["WatchdogSec"][0])
    restart = timespan_seconds(UNIT["RestartSec"][0])
    wait_for(
        lambda: int(machine.show("rtc", "NRestarts")["NRestarts"]) > restarts and _ready(machine),
        watchdog + restart + 60,
        "the watchdog restart",
        interval=0.5,
    )
    took = time.monotonic() - stopped_at
    journal = machine.journal("rtc", since)
    assert "Watchdog timeout" in journal, journal
    assert _main_pid(machine) != main
    assert took >= watchdog / 2  # systemd counts from the last WATCHDOG=1, sent every WatchdogSec/2
    print(
        f"PROOF watchdog: SIGSTOPped MainPID {main}; systemd logged 'Watchdog timeout', killed it and "
        f"Restart= brought up MainPID {_main_pid(machine)} ({took:.0f}s; WatchdogSec={watchdog:.0f}s)"
    )


def test_stop_drains_and_exits_zero_within_the_timeout(machine: Machine) -> None:
    held = _probe(machine, "hold", WS, _token(machine, "bob"), "6")
    assert held.stdout is not None and held.stdout.readline().strip() == "held"
    since = machine.out("date", "+%Y-%m-%d %H:%M:%S")
    started = time.monotonic()
    machine.run("systemctl", "stop", "rtc", timeout=120)
    took = time.monotonic() - started
    state = machine.show("rtc", "ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    assert state == {
        "ActiveState": "inactive",
        "Result": "success",
        "ExecMainCode": "1",
        "ExecMainStatus": "0",
    }
    assert took < timespan_seconds(UNIT["TimeoutStopSec"][0])
    closes = _report(held)["closes"]
    assert closes == [{"code": 1001, "migrating": True}] * 6, closes
    journal = machine.journal("rtc", since)
    migrated = sum(int(n) for n in re.findall(r"drain done: (\d+) migrated", journal))
    assert migrated == 6, journal
    assert "SIGKILL" not in journal and "Killing process" not in journal
    print(
        f"PROOF stop: 6 clients got `migrating` and close 1001, journal 'drain done': {migrated} migrated, "
        f"exit status 0 (Result=success) in {took:.1f}s < TimeoutStopSec, no SIGKILL"
    )


def test_missing_credential_shows_as_243(machine: Machine) -> None:
    """The symptom docs/deploy.md describes, then the documented way back."""
    machine.run("mv", "/etc/rtc/jwt-secret", "/etc/rtc/jwt-secret.away")
    try:
        since = machine.out("date", "+%Y-%m-%d %H:%M:%S")
        assert machine.run("systemctl", "start", "rtc", check=False).returncode != 0
        state = machine.show("rtc", "Result")
        status = machine.run("systemctl", "status", "rtc", "--no-pager", check=False).stdout
        assert "status=243/CREDENTIALS" in status, status
        # Logged by the forked child ("(rtc)"), which may reach the journal a moment later,
        # and exits at once: journald may not know its unit, so the whole journal is read.
        wait_for(
            lambda: "rtc.service: Failed to set up credentials" in machine.journal(None, since),
            10,
            "the credentials error in the journal",
        )
    finally:
        machine.run("mv", "/etc/rtc/jwt-secret.away", "/etc/rtc/jwt-secret")
    machine.run("systemctl", "reset-failed", "rtc")
    machine.run("systemctl", "start", "rtc", timeout=120)
    assert _ready(machine)
    print(
        f"PROOF credential missing: Result={state['Result']}, 'status=243/CREDENTIALS', journal "
        "'Failed to set up credentials'; file restored, reset-failed, started again"
    )
