"""WebSocket conformance: Autobahn|Testsuite against `rtc serve --conformance-echo`.

`GET /echo` is a test-only WebSocket echo served with the same aiohttp settings as `/ws`
(max message size from `--max-message-bytes`, no compression). wstest (Autobahn|Testsuite
0.8.2, Python 2.7) is installed by scripts/autobahn-setup.sh and run as a fuzzing client
against it; its JSON report is compared with tests/autobahn/expected-failures.json, strictly:
an unexpected failure fails the test, and so does an expected failure that now passes.

    pytest tests/test_autobahn.py                       # CI subset ("rtc-ci-subset")
    RTC_AUTOBAHN_FULL=1 pytest tests/test_autobahn.py   # every case except 12.*/13.*

RTC_AUTOBAHN_URL=ws://127.0.0.1:PORT/echo tests a server that is already running instead
of starting rtc; RTC_AUTOBAHN_REPORT_DIR=DIR keeps wstest's HTML/JSON report there.
docs/autobahn.md has the results and the commands.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.rtcproc import free_ports, wait_for

REPO = Path(__file__).resolve().parents[1]
SPEC_TEMPLATE = REPO / "tests" / "autobahn" / "fuzzingclient.json"
EXPECTED_FAILURES = REPO / "tests" / "autobahn" / "expected-failures.json"
SETUP_SCRIPT = REPO / "scripts" / "autobahn-setup.sh"

FULL = os.environ.get("RTC_AUTOBAHN_FULL", "") == "1"
AGENT = "rtc"
MAX_MESSAGE_BYTES = 65536  # rtc's default --max-message-bytes; the expected list assumes it

# Autobahn grades each case twice: `behavior` (the exchange) and `behaviorClose` (the
# closing handshake). A case passes when both are a pass. NON-STRICT (e.g. a text message
# with invalid UTF-8 failed at its end rather than at the first bad fragment) and
# INFORMATIONAL (e.g. the close reason echoed) are passes, as in Autobahn's own report.
PASS_BEHAVIOR = frozenset({"OK", "NON-STRICT", "INFORMATIONAL"})
PASS_CLOSE = frozenset({"OK", "INFORMATIONAL"})

CASE_ID = re.compile(r"^\d+(\.\d+)+$")

pytestmark = pytest.mark.timeout(1200 if FULL else 360)


# --------------------------------------------------------------------------- helpers


def _pattern(p: str) -> re.Pattern[str]:
    """wstest's case pattern syntax: '.' literal, '*' any run of characters."""
    return re.compile("^" + re.escape(p).replace(r"\*", ".*") + "$")


def _matches(case_id: str, patterns: list[str]) -> bool:
    return any(_pattern(p).match(case_id) for p in patterns)


def _case_key(case_id: str) -> tuple[int, ...]:
    return tuple(int(x) for x in case_id.split("."))


def _passed(result: dict) -> bool:
    return result.get("behavior") in PASS_BEHAVIOR and result.get("behaviorClose") in PASS_CLOSE


def group_counts(results: dict[str, dict]) -> dict[str, tuple[int, int]]:
    """{top-level group: (passed, failed)}, groups in numeric order."""
    counts: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for case_id, r in results.items():
        counts[case_id.split(".")[0]][0 if _passed(r) else 1] += 1
    return {g: (p, f) for g, (p, f) in sorted(counts.items(), key=lambda kv: int(kv[0]))}


def _health(port: int) -> int | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    # wstest's one-line list of all case ids only drowns the interesting part
    kept = [line for line in text if not line.startswith("Cases = ")]
    return "\n".join(kept[-lines:])


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def wstest() -> str:
    """The wstest command, installed (once, cached) by scripts/autobahn-setup.sh."""
    proc = subprocess.run(
        ["bash", str(SETUP_SCRIPT)],
        check=False,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"scripts/autobahn-setup.sh failed (exit {proc.returncode}):\n{proc.stderr}",
            pytrace=False,
        )
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def echo_url() -> Iterator[str]:
    """ws:// URL of the conformance echo: rtc started on free loopback ports."""
    external = os.environ.get("RTC_AUTOBAHN_URL")
    if external:
        yield external
        return

    port, metrics_port = free_ports(2)
    # short path: the embedded redis-server's Unix socket lives in the runtime dir
    runtime_dir = Path(tempfile.mkdtemp(prefix="rtc-ab-"))
    log_path = runtime_dir / "rtc.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RTC_")}
    env.update({"JWT_SECRET": "autobahn-test-secret", "PYTHONUNBUFFERED": "1"})
    for name in ("REDIS_URL", "NODE_ID", "MAX_CONNECTIONS", "RUNTIME_DIRECTORY"):
        env.pop(name, None)
    cmd = [
        sys.executable, "-m", "rtc", "serve",
        "--host", "127.0.0.1", "--port", str(port),
        "--metrics-port", str(metrics_port),
        "--workers", "1",
        "--max-message-bytes", str(MAX_MESSAGE_BYTES),
        "--conformance-echo",
        "--runtime-dir", str(runtime_dir),
        "--shutdown-timeout", "5",
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:

        def healthy() -> bool:
            if proc.poll() is not None:
                pytest.fail(
                    f"rtc serve exited with {proc.returncode} before it was healthy:\n"
                    f"{' '.join(cmd)}\n{_tail(log_path)}",
                    pytrace=False,
                )
            return _health(port) == 200

        wait_for(healthy, 60, lambda: f"rtc serve to be healthy:\n{_tail(log_path)}", 0.2)
        yield f"ws://127.0.0.1:{port}/echo"
        if proc.poll() is not None:
            pytest.fail(
                f"rtc serve died during the run (exit {proc.returncode}):\n{_tail(log_path)}",
                pytrace=False,
            )
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(runtime_dir, ignore_errors=True)


# --------------------------------------------------------------------------- tests


def _load_expected(excluded: list[str]) -> dict[str, str]:
    expected = json.loads(EXPECTED_FAILURES.read_text())
    assert isinstance(expected, dict) and expected, "expected-failures.json: a {case id: reason} object"
    for case_id, reason in expected.items():
        assert CASE_ID.match(case_id), f"expected-failures.json: bad case id {case_id!r}"
        assert isinstance(reason, str) and reason.strip(), f"expected-failures.json: {case_id} needs a reason"
        assert not _matches(case_id, excluded), f"expected-failures.json: {case_id} is excluded from runs"
    return expected


def _describe(case_id: str, result: dict, outdir: Path) -> str:
    line = (
        f"  {case_id}: behavior={result.get('behavior')} close={result.get('behaviorClose')}"
        f" remoteCloseCode={result.get('remoteCloseCode')}"
    )
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        detail = json.loads((outdir / result["reportfile"]).read_text())
        desc = " ".join(str(detail.get("description", "")).split())[:160]
        line += f"\n      {desc}\n      -> {detail.get('result')} / {detail.get('resultClose')}"
    return line


def test_autobahn_fuzzingclient(wstest: str, echo_url: str, tmp_path: Path) -> None:
    template = json.loads(SPEC_TEMPLATE.read_text())
    excluded = list(template["exclude-cases"])
    expected = _load_expected(excluded)
    cases = list(template["cases"] if FULL else template["rtc-ci-subset"])

    outdir = tmp_path / "reports"
    spec = {k: v for k, v in template.items() if k not in ("_comment", "rtc-ci-subset")}
    spec.update(
        outdir=str(outdir),
        servers=[{"agent": AGENT, "url": echo_url}],
        cases=cases,
    )
    spec_path = tmp_path / "fuzzingclient.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    log_path = tmp_path / "wstest.log"

    started = time.monotonic()
    with open(log_path, "wb") as log:
        try:
            proc = subprocess.run(
                [wstest, "-m", "fuzzingclient", "-s", str(spec_path)],
                check=False,
                cwd=tmp_path,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=1080 if FULL else 300,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"wstest timed out:\n{_tail(log_path)}", pytrace=False)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, f"wstest exited {proc.returncode}:\n{_tail(log_path)}"

    keep = os.environ.get("RTC_AUTOBAHN_REPORT_DIR")
    if keep:
        shutil.copytree(outdir, keep, dirs_exist_ok=True)

    announced = re.search(r"will run (\d+) test cases", log_path.read_text(errors="replace"))
    assert announced, f"wstest did not start the cases:\n{_tail(log_path)}"
    index = json.loads((outdir / "index.json").read_text())
    results: dict[str, dict] = index.get(AGENT, {})
    assert len(results) == int(announced.group(1)) > 0, (
        f"wstest announced {announced.group(1)} cases but reported {len(results)} "
        f"(the server stopped answering?):\n{_tail(log_path)}"
    )

    failed = {c for c, r in results.items() if not _passed(r)}
    in_scope = {c for c in expected if _matches(c, cases)}
    unknown = sorted(in_scope - results.keys(), key=_case_key)
    unexpected_failures = sorted(failed - expected.keys(), key=_case_key)
    unexpected_passes = sorted((in_scope & results.keys()) - failed, key=_case_key)

    summary = ", ".join(f"{g}.*: {p} ok/{f} failed" for g, (p, f) in group_counts(results).items())
    print(f"\nAutobahn ({'full' if FULL else 'subset'}): {len(results)} cases in {elapsed:.1f} s; {summary}")

    problems = []
    if unexpected_failures:
        problems.append(
            "unexpected failures (fix rtc, or add to tests/autobahn/expected-failures.json with a reason):"
        )
        problems += [_describe(c, results[c], outdir) for c in unexpected_failures]
        if any(results[c].get("remoteCloseCode") == 1009 for c in unexpected_failures):
            problems.append(
                f"  hint: a message of exactly --max-message-bytes ({MAX_MESSAGE_BYTES}) must be accepted;"
                " aiohttp rejects messages >= max_msg_size, so rtc must pass max_msg_size=limit+1"
            )
    if unexpected_passes:
        problems.append(
            "expected failures that now pass (remove them from tests/autobahn/expected-failures.json):"
        )
        problems += [_describe(c, results[c], outdir) for c in unexpected_passes]
    if unknown:
        problems.append(f"expected-failures.json names cases wstest does not have: {', '.join(unknown)}")
    assert not problems, "\n".join(problems)


async def test_message_size_limit_boundary(echo_url: str) -> None:
    """A message of exactly --max-message-bytes is echoed; one byte more closes with 1009."""
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(echo_url, max_msg_size=0) as ws:
            await ws.send_str("x" * MAX_MESSAGE_BYTES)
            msg = await ws.receive(timeout=10)
            assert msg.type == aiohttp.WSMsgType.TEXT, msg
            assert len(msg.data) == MAX_MESSAGE_BYTES
            await ws.send_bytes(b"\x00" * MAX_MESSAGE_BYTES)
            msg = await ws.receive(timeout=10)
            assert msg.type == aiohttp.WSMsgType.BINARY, msg
            assert len(msg.data) == MAX_MESSAGE_BYTES

        async with session.ws_connect(echo_url, max_msg_size=0) as ws:
            await ws.send_str("x" * (MAX_MESSAGE_BYTES + 1))
            msg = await ws.receive(timeout=10)
            assert msg.type == aiohttp.WSMsgType.CLOSE, msg
            assert ws.close_code == 1009 or msg.data == 1009, (msg, ws.close_code)
