"""Every example in README.md and docs/ is either run here or marked illustrative.

A fenced block's info string says which: `sh commands` (shell lines run one by one against a
real host started by the block itself), `text exchange` (a WebSocket exchange played against a
real host, frame by frame), `<lang> test:<file>` (run by that test file, which reads the doc),
or `<lang> illustrative` (a diagram, or commands for a machine the tests do not own:
systemctl, apt-get). An unmarked block fails the first test.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.rawstream import RawSocket
from tests.rtcproc import Host, free_ports, hosts, start_redis, stop_process, token, wait_for

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
KINDS = {"commands", "exchange", "illustrative"}
FENCE = re.compile(r"^```(\w*)(?: (\S+))?\n(.*?)^```$", re.MULTILINE | re.DOTALL)
# Values the server chooses; the docs write them as these names.
PLACEHOLDERS = {"SID", "NODE", "EPOCH", "TS", "JWT"}
BARE = re.compile(r"(?<=[:\[,])(" + "|".join(PLACEHOLDERS) + r")(?=[,}\]])")


@dataclass(frozen=True)
class Block:
    path: Path
    kind: str
    text: str

    def __str__(self) -> str:
        return f"{self.path.relative_to(REPO)}: {self.text.splitlines()[0] if self.text else ''}"


def blocks(kind: str | None = None) -> list[Block]:
    found = []
    for path in DOCS:
        for match in FENCE.finditer(path.read_text()):
            found.append(Block(path, match.group(2) or "", match.group(3)))
    return [b for b in found if kind is None or b.kind == kind]


def test_every_example_is_run_or_marked_illustrative() -> None:
    unmarked = [str(b) for b in blocks() if b.kind not in KINDS and not b.kind.startswith("test:")]
    assert not unmarked, f"mark these `illustrative`, or make them `commands`/`exchange`: {unmarked}"
    assert blocks("commands") and blocks("exchange")
    for block in blocks():
        if block.kind.startswith("test:"):
            runner = Path(__file__).parent / block.kind.removeprefix("test:")
            assert block.path.name in runner.read_text(), f"{runner.name} does not read {block}"


def test_no_doc_links_outside_the_repository() -> None:
    for path in DOCS:
        for target in re.findall(r"\]\(([^)#]+)", path.read_text()):
            if "://" in target:
                continue
            resolved = (path.parent / target).resolve()
            assert resolved.is_relative_to(REPO) and resolved.exists(), f"{path.name}: {target}"


# -- `commands` blocks ---------------------------------------------------------------------------


@pytest.fixture
def shell_env() -> Iterator[dict[str, str]]:
    runtime = tempfile.mkdtemp(prefix="rtc-docs-")
    port, metrics_port = free_ports(2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RTC_") and k != "JWT_SECRET"}
    env |= {
        "PATH": f"{Path(sys.executable).parent}:{env['PATH']}",
        "RTC_METRICS_PORT": str(metrics_port),
        "RTC_RUNTIME_DIR": runtime,
        "DOCS_PORT": str(port),
    }
    yield env
    shutil.rmtree(runtime, ignore_errors=True)


@pytest.mark.parametrize("block", blocks("commands"), ids=str)
def test_commands_run(block: Block, shell_env: dict[str, str]) -> None:
    """Each line as a user would type it (8081 swapped for a free port); `&` starts the host."""
    port = shell_env.pop("DOCS_PORT")
    background: list[subprocess.Popen[bytes]] = []
    try:
        for line in block.text.splitlines():
            line = line.replace("8081", port)
            if line.startswith("export "):
                name, _, value = line.removeprefix("export ").partition("=")
                shell_env[name] = run(f"echo {value}", shell_env).strip()
            elif line.endswith("&"):
                background.append(subprocess.Popen(["bash", "-c", line.removesuffix("&")], env=shell_env))
                wait_for(lambda: healthy(port), 30, f"{line!r} to serve")
            else:
                run(line, shell_env)
    finally:
        for process in background:
            assert stop_process(process, 30) == 0, "the host did not stop cleanly"


def run(line: str, env: dict[str, str]) -> str:
    done = subprocess.run(["bash", "-c", line], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{line!r} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    return done.stdout


def healthy(port: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


# -- `exchange` blocks -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    redis = start_redis()
    try:
        with hosts(("docs", redis.url)) as (started,):
            yield started
    finally:
        redis.stop()


@pytest.mark.parametrize("block", blocks("exchange"), ids=str)
async def test_exchange_plays(block: Block, host: Host) -> None:
    """`GET` opens a connection (dropping the previous one with a reset), `>` sends, a run
    of `<` lines is received in any order. Placeholders bind to what the server chose."""
    bound: dict[str, Any] = {"JWT": token("alice")}
    sock: RawSocket | None = None
    expected: list[Any] = []
    try:
        for line in [*block.text.splitlines(), "END"]:
            if not line.startswith("<") and expected:
                assert sock is not None
                await receive_all(sock, expected, bound)
                expected = []
            if line.startswith("GET "):
                if sock is not None:
                    sock.reset()
                query = dict(p.split("=", 1) for p in line.split("?", 1)[1].split("&"))
                sock = await RawSocket.open(
                    host.host, host.port, **{k: str(bound.get(v, v)) for k, v in query.items()}
                )
            elif line.startswith(">"):
                assert sock is not None
                await sock.send(**substitute(orjson.loads(quoted(line[1:])), bound))
            elif line.startswith("<"):
                expected.append(orjson.loads(quoted(line[1:])))
    finally:
        if sock is not None:
            sock.abandon()
            await sock.closed()


def quoted(text: str) -> str:
    """Bare placeholders (`"ts":TS`) become strings, so each line parses as JSON."""
    return BARE.sub(r'"\1"', text)


def substitute(value: Any, bound: dict[str, Any]) -> Any:
    if isinstance(value, dict):
        return {substitute(k, bound): substitute(v, bound) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, bound) for v in value]
    return bound.get(value, value) if isinstance(value, str) else value


async def receive_all(sock: RawSocket, expected: list[Any], bound: dict[str, Any]) -> None:
    pending = list(expected)
    async with asyncio.timeout(10):
        while pending:
            frame = await sock.recv()
            assert frame is not None, f"closed; still expected {pending}"
            for want in pending:
                trial = dict(bound)
                if matches(want, frame, trial):
                    bound.update(trial)
                    pending.remove(want)
                    break
            else:
                raise AssertionError(f"unexpected {frame}; expected one of {pending}")


def matches(want: Any, got: Any, bound: dict[str, Any]) -> bool:
    """`got` equals `want`; a placeholder binds on first sight (for the frames sent later)
    and must then have the same type, and the session id the same value."""
    if isinstance(want, str) and want in PLACEHOLDERS:
        first = bound.setdefault(want, got)
        return first == got if want == "SID" else type(first) is type(got)
    if isinstance(want, dict):
        return (
            isinstance(got, dict)
            and set(want) == set(got)
            and all(matches(want[k], got[k], bound) for k in want)
        )
    if isinstance(want, list):
        return (
            isinstance(got, list)
            and len(want) == len(got)
            and all(matches(w, g, bound) for w, g in zip(want, got, strict=True))
        )
    return bool(want == got)
