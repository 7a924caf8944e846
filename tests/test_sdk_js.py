"""The JavaScript SDK's own tests (`node --test`), run against a real rtc so CI runs them.

clients/js/test/state.test.js drives the client's state machine with a fake socket and an
injected clock; clients/js/test/server.test.js talks to the host started here (two
workers, API keys on) through Node's built-in WebSocket.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.rtcproc import SECRET, Host, RedisServer, start_host

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).parent.parent
JS = ROOT / "clients" / "js"
API_KEY = "sdk-js-key-0123456789abcdef"
NODE = ["node", "--experimental-websocket"]


@pytest.fixture(scope="module")
def host(redis_server: RedisServer) -> Iterator[Host]:
    if shutil.which("node") is None:
        pytest.fail("node (>= 20) is required: scripts/setup.sh test installs it")
    started = start_host("sdkjs", redis_server.url, args=("--api-keys", f"js:{API_KEY}", "--rate", "1000"))
    yield started
    started.stop()
    shutil.rmtree(started.runtime_dir, ignore_errors=True)


def node_env(host: Host) -> dict[str, str]:
    return {
        **os.environ,
        "RTC_WS": host.ws,
        "RTC_HTTP": host.http,
        "RTC_JWT_SECRET": SECRET,
        "RTC_API_KEY": API_KEY,
    }


def test_js_sdk_node_test_suite(host: Host) -> None:
    files = sorted(str(p) for p in (JS / "test").glob("*.test.js"))
    result = subprocess.run(
        [*NODE, "--test", *files], env=node_env(host), capture_output=True, text=True, timeout=100
    )
    summary = [line for line in result.stdout.splitlines() if line.startswith(("# pass", "# fail", "not ok"))]
    print("\n".join(summary))
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "# fail 0" in result.stdout


def test_client_js_is_the_sdk_module(host: Host) -> None:
    status, body = host.get("/client.js")
    assert status == 200
    assert body == (JS / "src" / "rtc-client.js").read_bytes()
    print(f"/client.js: {len(body)} bytes (not minified)")
