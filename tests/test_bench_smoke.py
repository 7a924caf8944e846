"""Smoke runs of the benchmark tools (bench/), so they do not rot between big runs.

Every server here is started by the test on a free 127.0.0.1 port and stopped by its
PID. Runs are tiny (tens of sockets, one-second steps); the figures are not judged,
only that traffic flowed and arrived complete and in order.
"""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.rtcproc import SECRET as RTC_SECRET
from tests.rtcproc import RedisServer, free_port, hosts, wait_for

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
LOCUST = str(Path(sys.executable).with_name("locust"))
SECRET = "bench-secret-for-loopback-load-tests"


def _run(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, f"{argv[:4]} exited {result.returncode}:\n{result.stderr}"
    return result


def _loadgen(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return _run([PYTHON, "-m", "bench.loadgen", *args, "--jwt-secret", SECRET], timeout)


@pytest.fixture(scope="module")
def bare() -> Iterator[tuple[str, int]]:
    """The bare-aiohttp baseline: (root URL, PID)."""
    port = free_port()
    proc = subprocess.Popen(
        [PYTHON, "-m", "bench.baselines.bare_aiohttp", "--host", "127.0.0.1", "--port", str(port)], cwd=REPO
    )
    try:

        def healthy() -> bool:
            assert proc.poll() is None, f"bare exited {proc.returncode}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                    return True
            except OSError:
                return False

        wait_for(healthy, 20, "the bare baseline's /health", 0.1)
        yield f"ws://127.0.0.1:{port}", proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _assert_clean(result: dict[str, Any]) -> None:
    assert result["failed"] == 0, result["errors"]
    assert result["dropped"] == 0
    assert result["integrity"] == {"gaps": 0, "duplicates": 0, "reordered": 0}


def _assert_ramp(result: dict[str, Any], start_rate: float, factor: float, max_steps: int) -> None:
    """The ramp's schedule, which the machine's speed cannot change (how many steps pass can):
    rates rise by `factor` from `start_rate` for at most `max_steps` steps, a failed step is
    run once more at its rate (the failed row kept, marked retried), and only a step that
    failed again ends the ramp before `max_steps`."""
    steps = result["steps"]
    rates = [step["target_rate"] for step in steps if not step.get("retried")]
    assert 1 <= len(rates) <= max_steps, steps
    assert rates == [round(start_rate * factor**k, 1) for k in range(len(rates))], steps
    for step, following in itertools.pairwise(steps):
        if step.get("retried"):
            assert step["failures"] and following["target_rate"] == step["target_rate"], steps
            assert not following.get("retried"), steps
    assert not steps[-1].get("retried")
    if len(rates) < max_steps:
        assert steps[-1]["failures"], steps


@pytest.mark.timeout(60)
def test_fanout_against_bare(bare: tuple[str, int], tmp_path: Path) -> None:
    url, pid = bare
    out = tmp_path / "fanout.json"
    run = _loadgen(
        "fanout", "--url", url, "--server-pid", str(pid), "--members", "20",
        "--start-rate", "20", "--factor", "2", "--step-seconds", "1", "--max-steps", "2",
        "--p99-ms", "60000", "--json", str(out),  # latency is not judged: a busy machine is slow
    )  # fmt: skip
    result = json.loads(out.read_text())
    _assert_clean(result)
    assert result["opened"] == 20
    _assert_ramp(result, start_rate=20, factor=2, max_steps=2)
    first = result["steps"][0]
    assert first["deliveries_per_s"] > 0
    assert first["delivery_ratio"] == 1.0
    assert first["server_cpu_pct"] is not None
    assert 0 <= first["server_sys_pct"] <= first["server_cpu_pct"]  # the kernel's part of it
    assert first["redis_cpu_pct"] is None  # no Redis given: none sampled
    # Whether a step is sustained depends on the machine (a starved load generator cannot
    # keep its rate); what the tool must get right is the figure it reports from them.
    sustained = [step["deliveries_per_s"] for step in result["steps"] if not step["failures"]]
    assert result["max_sustainable_deliveries_per_s"] == max(sustained, default=0.0), result["steps"]
    assert "max sustainable" in run.stdout


@pytest.mark.timeout(60)
def test_idle_and_direct_against_bare(bare: tuple[str, int], tmp_path: Path) -> None:
    url, pid = bare
    idle_out, direct_out = tmp_path / "idle.json", tmp_path / "direct.json"
    _loadgen(
        "idle", "--url", url, "--server-pid", str(pid), "--conns", "60", "--rooms", "3",
        "--hold", "0.2", "--per-source", "25", "--json", str(idle_out),
    )  # fmt: skip
    idle = json.loads(idle_out.read_text())
    _assert_clean(idle)
    assert idle["opened"] == 60
    assert idle["server_rss_after_mib"] > 0
    _loadgen(
        "direct", "--url", url, "--users", "10", "--start-rate", "50", "--step-seconds", "1",
        "--max-steps", "1", "--json", str(direct_out),
    )  # fmt: skip
    direct = json.loads(direct_out.read_text())
    _assert_clean(direct)
    assert direct["steps"][0]["deliveries_per_s"] > 0
    assert direct["steps"][0]["delivery_ratio"] == 1.0


@pytest.mark.timeout(60)
def test_soak_against_bare_samples_memory_fds_and_stalls(bare: tuple[str, int], tmp_path: Path) -> None:
    url, pid = bare
    out, chart = tmp_path / "soak.json", tmp_path / "soak.png"
    run = _loadgen(
        "soak", "--url", url, "--server-pid", str(pid), "--conns", "20", "--rooms", "2",
        "--seconds", "2", "--interval", "1", "--rate", "10", "--json", str(out), "--plot", str(chart),
    )  # fmt: skip
    result = json.loads(out.read_text())
    _assert_clean(result)
    assert len(result["samples"]) == 2
    for sample in result["samples"]:
        assert sample["deliveries_per_s"] > 0
        assert sample["processes"][str(pid)]["fds"] >= 20 and sample["processes"][str(pid)]["rss_mib"] > 0
        assert sample["longest_stall_ms"][str(pid)] > 0  # the probes reached the one process
    assert chart.stat().st_size > 0
    assert "longest loop stall" in run.stdout


@pytest.mark.timeout(90)
def test_compare_bare_and_socketio(tmp_path: Path) -> None:
    """Compare mode starts its own Redis and servers; socket.io runs ``cross`` over two."""
    out = tmp_path / "compare"
    run = _loadgen(
        "compare", "--out", str(out), "--servers", "bare,socketio", "--scenarios",
        "cross,churn", "--members", "10", "--start-rate", "10", "--step-seconds", "1",
        "--max-steps", "1", "--churn-slots", "2", "--churn-seconds", "1",
        timeout=90,
    )  # fmt: skip
    document = json.loads((out / "results.json").read_text())
    results = document["results"]
    assert set(results) == {"bare", "socketio"}
    assert "cross" not in results["bare"]  # hosts sharing nothing cannot do cross
    cross = results["socketio"]["cross"]
    assert cross["opened"] == 10
    assert cross["steps"][0]["deliveries_per_s"] > 0
    assert cross["steps"][0]["delivery_ratio"] == 1.0
    # Socket.IO does not order emits (reordered may be > 0); nothing may be lost.
    assert cross["integrity"]["gaps"] == 0
    assert cross["integrity"]["duplicates"] == 0
    for server in ("bare", "socketio"):
        churn = results[server]["churn"]
        assert churn["cycles"] > 0 and churn["failed"] == 0, churn
    assert (out / "latency-vs-load.png").stat().st_size > 0
    assert "| figure | bare | socketio | bare/socketio |" in (out / "table.md").read_text()
    assert "churn: connect+close cycles/s" in run.stdout


def _locust(url: str, secret: str, users: int, rooms: int, tmp_path: Path, timeout: float) -> None:
    """The locust user for 5 s, headless: every user connected, publishes and deliveries
    counted, no failure. Its figures are read from --json-file, not its --csv files: those
    are snapshots rewritten once a second and not at exit, so a loaded run's last second (or,
    for a short run, its connects) can be missing from them."""
    figures = tmp_path / "locust"
    run = _run(
        [
            LOCUST, "-f", str(REPO / "bench" / "locustfile.py"), "--headless", "-u", str(users),
            "-r", str(users), "-t", "5s", "--rooms", str(rooms), "--host", url, "--jwt-secret", secret,
            "--json-file", str(figures), "--only-summary",
        ],
        timeout=timeout,
    )  # fmt: skip
    entries = json.loads(figures.with_name(figures.name + ".json").read_text())
    rows: dict[str, dict[str, Any]] = {entry["name"]: entry for entry in entries}
    assert "connect" in rows, run.stderr[-3000:]
    assert rows["connect"]["num_requests"] == users
    assert rows["deliver"]["num_requests"] > 0
    assert rows["publish"]["num_requests"] > 0
    assert all(row["num_failures"] == 0 for row in rows.values()), rows


@pytest.mark.timeout(60)
def test_locustfile_against_bare(bare: tuple[str, int], tmp_path: Path) -> None:
    url, _pid = bare
    _locust(url, SECRET, users=2, rooms=1, tmp_path=tmp_path, timeout=45)


@pytest.mark.timeout(90)
def test_locustfile_against_rtc(tmp_path: Path) -> None:
    """The locust user speaks rtc: connects, publishes acked, deliveries in order."""
    with hosts(("a", None)) as (host,):
        _locust(f"ws://127.0.0.1:{host.port}", RTC_SECRET, users=4, rooms=2, tmp_path=tmp_path, timeout=60)


@pytest.mark.timeout(90)
def test_storm_against_rtc_resumes_every_session(fresh_redis: RedisServer, tmp_path: Path) -> None:
    """Connect storm, drop, resume storm, on a real host: every socket resumes its own
    session, every worker's loop is pinged, Redis commands per connect are counted and
    Redis's CPU is sampled."""
    out = tmp_path / "storm.json"
    with hosts(("a", fresh_redis.url)) as (host,):
        _run(
            [
                PYTHON, "-m", "bench.loadgen", "storm", "--url", f"ws://127.0.0.1:{host.port}",
                "--server-pid", str(host.process.pid), "--redis-url", fresh_redis.url,
                "--conns", "20", "--rooms", "2", "--jwt-secret", RTC_SECRET, "--json", str(out),
            ],
            timeout=75,
        )  # fmt: skip
    storm = json.loads(out.read_text())
    assert storm["connect"]["opened"] == 20 and storm["connect"]["failed"] == 0, storm["connect"]
    # Every socket dropped and came back into its own session, which rejoined its room.
    assert storm["resume"]["opened"] == 20 and storm["resume"]["resumed"] == 20, storm["resume"]
    for phase in ("connect", "resume"):
        pings = storm[phase]["loop_pings"]
        assert pings and "?" not in pings, pings  # every probe was matched to its worker
        assert all(summary["count"] > 0 for summary in pings.values()), pings
        assert storm[phase]["redis_commands_per_connect"] > 0
        assert storm[phase]["redis_cpu_pct"] > 0  # the Redis that ran those commands
        assert isinstance(storm[phase]["presence_events"], int)  # reported, for the comparison with bare


@pytest.mark.timeout(120)
def test_compare_smoke_on_rtc(tmp_path: Path) -> None:
    """Every scenario against real rtc hosts (two for `cross`), tiny: the tools speak rtc."""
    out = tmp_path / "rtc"
    _loadgen(
        "compare", "--out", str(out), "--servers", "rtc", "--rtc-workers", "2",
        "--scenarios", "idle,fanout,cross,direct,churn", "--idle-conns", "20", "--members", "10",
        "--users", "10", "--start-rate", "10", "--direct-start-rate", "10", "--step-seconds", "1",
        "--max-steps", "1", "--churn-slots", "2", "--churn-seconds", "1",
        timeout=110,
    )  # fmt: skip
    results = json.loads((out / "results.json").read_text())["results"]["rtc"]
    assert results["idle"]["opened"] == 20 and results["idle"]["failed"] == 0
    for scenario in ("fanout", "cross", "direct"):
        step = results[scenario]["steps"][0]
        assert step["deliveries_per_s"] > 0 and step["delivery_ratio"] == 1.0, (scenario, step)
        assert results[scenario]["integrity"] == {"gaps": 0, "duplicates": 0, "reordered": 0}
    assert results["churn"]["cycles"] > 0 and results["churn"]["failed"] == 0
