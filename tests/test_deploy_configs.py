"""The deployment files are product: each is checked by the real program that reads it.

systemd-analyze and rtc itself for the unit and its env file (the Exec lines
run as systemd would, under a notify socket of the test's own), the kernel's
/proc/sys for the sysctl keys, ``haproxy -c`` and ``nginx -t`` for the proxy
configurations, then real HAProxy and NGINX processes carrying WebSocket
traffic to two stand-in backends on 127.0.0.2 and 127.0.0.3 (``ws_echo.py``;
rtc hosts can take their place), and the scale-down script against a stand-in.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import jwt
import pytest

from tests.proxies import (
    HAPROXY_CFG,
    NGINX_CONF,
    NGINX_SITE,
    TEST_TIMEOUTS,
    RunningProxy,
    check_haproxy,
    check_nginx,
    haproxy_server_status,
    render_haproxy,
    render_nginx,
    require_program,
    run_haproxy,
    run_nginx,
)
from tests.rtcproc import free_port, until
from tests.systemd_unit import parse_environment_file, parse_unit, timespan_seconds
from tests.ws_echo import EchoBackend, run_echo_backend

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "rtc.service"
ENV_EXAMPLE = REPO / "systemd" / "rtc.env.example"
SYSCTL = REPO / "systemd" / "99-rtc.conf"
LIMITS = REPO / "systemd" / "90-rtc-nofile.conf"
SCALE_DOWN = REPO / "scripts" / "scale-down.sh"

# SPEC section 2 defaults the files must agree with.
SHUTDOWN_TIMEOUT_S = 30
WS_HEARTBEAT_S = 20
# The installed console script; the unit's /usr/local/bin/rtc on a real host.
RTC_BIN = Path(sys.executable).with_name("rtc")


# --- systemd ---------------------------------------------------------------


@pytest.fixture(scope="module")
def unit() -> dict[str, list[str]]:
    return parse_unit(UNIT.read_text())["Service"]


def _unit_with_stub_binary(tmp_path: Path) -> Path:
    """The shipped unit, with its /usr/local/bin/rtc replaced by a stub executable.

    systemd-analyze verify insists that every Exec*= program exists; rtc is
    installed on deployment, not on the test machine.
    """
    stub = tmp_path / "rtc"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = UNIT.read_text()
    assert text.count("/usr/local/bin/rtc ") == 2
    out = tmp_path / "rtc.service"
    out.write_text(text.replace("/usr/local/bin/rtc ", f"{stub} "))
    return out


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = require_program("systemd-analyze")
    result = subprocess.run(
        [analyze, "verify", str(_unit_with_stub_binary(tmp_path))],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    # verify exits 0 on unknown keys too; they only show on stderr.
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr


def test_unit_sandbox_exposure_is_low(tmp_path: Path) -> None:
    """systemd's own review rates the sandbox at most 2.0 ("OK") on its 0-10 scale."""
    analyze = require_program("systemd-analyze")
    result = subprocess.run(
        [
            analyze,
            "security",
            "--offline=true",
            "--threshold=20",
            "--no-pager",
            str(_unit_with_stub_binary(tmp_path)),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    level = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout)
    assert level is not None and float(level.group(1)) <= 2.0, result.stdout


def test_unit_lifecycle_contract(unit: dict[str, list[str]]) -> None:
    """What rtc's supervisor and docs/deploy.md rely on."""
    assert unit["Type"] == ["notify"]
    assert unit["NotifyAccess"] == ["main"]
    assert timespan_seconds(unit["WatchdogSec"][0]) >= 10
    assert unit["ExecStartPre"] == ["/usr/local/bin/rtc check-config"]
    assert unit["ExecStart"] == ["/usr/local/bin/rtc serve"]
    assert unit["ExecReload"] == ["/bin/kill -s HUP $MAINPID"]
    assert unit["KillMode"] == ["mixed"]
    assert unit["KillSignal"] == ["SIGTERM"]
    # The drain must finish before systemd's SIGKILL, with room to stop Redis.
    assert timespan_seconds(unit["TimeoutStopSec"][0]) >= SHUTDOWN_TIMEOUT_S + 10
    assert unit["Restart"] == ["on-failure"]
    assert unit["OOMPolicy"] == ["continue"]
    assert int(unit["LimitNOFILE"][0]) >= 100_000
    assert unit["RuntimeDirectory"] == ["rtc"]
    assert unit["EnvironmentFile"] == ["-/etc/rtc/rtc.env"]
    assert unit["LoadCredential"] == ["jwt-secret:/etc/rtc/jwt-secret"]


def test_unit_hardening_baseline(unit: dict[str, list[str]]) -> None:
    expected = {
        "DynamicUser": "yes",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "SystemCallErrorNumber": "EPERM",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "RestrictNamespaces": "yes",
        "RestrictSUIDSGID": "yes",
    }
    assert {key: unit.get(key, ["<missing>"])[-1] for key in expected} == expected
    assert unit["SystemCallFilter"][0] == "@system-service"


def test_sysctl_keys_exist_and_fit_the_unit(unit: dict[str, list[str]]) -> None:
    """Every key is one the running kernel knows (a typo would be ignored by sysctl --system)."""
    settings: dict[str, str] = {}
    for line in SYSCTL.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith(("#", ";")):
            key, sep, value = line.partition("=")
            assert sep, line
            settings[key.strip()] = value.strip()
    missing = [k for k in settings if not Path("/proc/sys", *k.split(".")).exists()]
    assert missing == []
    required = {
        "net.core.somaxconn",
        "net.ipv4.tcp_max_syn_backlog",
        "net.ipv4.ip_local_port_range",
        "fs.file-max",
        "fs.nr_open",
        "net.ipv4.tcp_migrate_req",
    }
    assert required <= settings.keys()
    assert settings["net.ipv4.tcp_migrate_req"] == "1"
    assert settings["vm.overcommit_memory"] == "1"  # Redis forks to save
    assert int(settings["fs.nr_open"]) >= int(unit["LimitNOFILE"][0])
    assert int(settings["net.core.somaxconn"]) >= 4096
    low, high = map(int, settings["net.ipv4.ip_local_port_range"].split())
    assert high - low >= 50_000


def test_limits_dropin_is_well_formed() -> None:
    rows = [
        line.split() for line in LIMITS.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    assert rows
    for _domain, kind, item, value in rows:
        assert kind in {"soft", "hard", "-"}
        assert item == "nofile"
        assert int(value) <= 1_048_576  # fs.nr_open


def _env_example_lines(*, uncomment: bool) -> dict[str, str]:
    """The example's variables; with ``uncomment`` also the commented-out ones."""
    text = ENV_EXAMPLE.read_text()
    if uncomment:
        text = re.sub(r"^# (RTC_[A-Z_]+=)", r"\1", text, flags=re.MULTILINE)
    return parse_environment_file(text)


@pytest.fixture(scope="module")
def rtc_env_names() -> set[str]:
    """RTC_* names of every flag the real `rtc serve` accepts."""
    assert RTC_BIN.exists(), f"{RTC_BIN} missing: pip install -e ."
    result = subprocess.run(
        [str(RTC_BIN), "serve", "--help"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    flags = set(re.findall(r"--(?:no-)?([a-z][a-z-]+)", result.stdout)) - {"help"}
    assert {"host", "port", "shutdown-timeout", "redis-url"} <= flags
    return {"RTC_" + flag.upper().replace("-", "_") for flag in flags}


def test_env_example_names_only_rtc_settings(unit: dict[str, list[str]], rtc_env_names: set[str]) -> None:
    """Each variable, set or commented out, is a flag of rtc serve; no secret in it."""
    names = _env_example_lines(uncomment=True)
    assert set(names) <= rtc_env_names, set(names) - rtc_env_names
    assert "RTC_JWT_SECRET" not in names
    shutdown = float(names.get("RTC_SHUTDOWN_TIMEOUT") or SHUTDOWN_TIMEOUT_S)
    assert timespan_seconds(unit["TimeoutStopSec"][0]) > shutdown


def _service_environment(
    unit: dict[str, list[str]], variables: dict[str, str], credentials: Path
) -> dict[str, str]:
    """What systemd hands rtc: a clean environment, the unit's Environment= and
    EnvironmentFile= variables, and the credentials directory."""
    env = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8"}
    for assignment in unit.get("Environment", []):
        key, _, value = assignment.partition("=")
        env[key] = value
    env.update(variables)
    (credentials / "jwt-secret").write_text("s3cret-from-a-credential")
    env["CREDENTIALS_DIRECTORY"] = str(credentials)
    return env


def _exec_argv(unit: dict[str, list[str]], key: str) -> list[str]:
    argv = shlex.split(unit[key][0])
    assert argv[0] == "/usr/local/bin/rtc"
    return [str(RTC_BIN), *argv[1:]]


@pytest.mark.parametrize("uncomment", [False, True], ids=["as-shipped", "every-example"])
def test_env_example_passes_check_config(unit: dict[str, list[str]], tmp_path: Path, uncomment: bool) -> None:
    """The unit's ExecStartPre accepts the example, the JWT secret coming as a credential."""
    variables = _env_example_lines(uncomment=uncomment)
    # A key file that does not exist here; Redis URLs that must not be dialled.
    for name in ("RTC_JWT_PUBLIC_KEY", "RTC_REDIS_URL", "RTC_REDIS_CLUSTER"):
        variables.pop(name, None)
    env = _service_environment(unit, variables, tmp_path)
    argv = _exec_argv(unit, "ExecStartPre")
    result = subprocess.run(argv, check=False, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    del env["CREDENTIALS_DIRECTORY"]
    result = subprocess.run(argv, check=False, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2, "without the jwt-secret credential rtc must refuse"
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


class _NotifySocket:
    """The service manager's end of sd_notify: a datagram socket that learns the sender's PID."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.received: list[tuple[int, dict[str, str]]] = []

    def close(self) -> None:
        self.sock.close()

    def wait_for(self, key: str, value: str | None, timeout: float) -> dict[str, str]:
        """The next message carrying ``key`` (with ``value``, if given)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except TimeoutError:
                break
            pid = 0
            for level, kind, payload in ancillary:
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS):
                    pid = struct.unpack("iII", payload[:12])[0]
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.received.append((pid, fields))
            if key in fields and (value is None or fields[key] == value):
                return fields
        raise AssertionError(f"no {key}={value} within {timeout}s; got {self.received}")


def test_unit_exec_lines_speak_sd_notify(unit: dict[str, list[str]]) -> None:
    """ExecStartPre, then ExecStart under a real NOTIFY_SOCKET, reload, then stop.

    Run as systemd would: a clean environment from the unit and the example
    env file (moved to loopback ports), credentials and runtime directories,
    WATCHDOG_USEC/WATCHDOG_PID, SIGHUP for ExecReload, SIGTERM to the main
    process only (KillMode=mixed). Every message must come from the main PID
    (NotifyAccess=main).
    """
    require_program("redis-server")  # the embedded engine, as on a single host
    # Short paths: the embedded Redis socket lives in the runtime directory.
    root = Path(tempfile.mkdtemp(prefix="rtc-unit-", dir="/tmp"))
    runtime, credentials = root / "run", root / "cred"
    runtime.mkdir()
    credentials.mkdir()
    notify = _NotifySocket(root / "notify")
    port, metrics_port = free_port(), free_port()
    variables = _env_example_lines(uncomment=False) | {
        "RTC_HOST": "127.0.0.1",
        "RTC_PORT": str(port),
        "RTC_METRICS_PORT": str(metrics_port),
        "RTC_WORKERS": "2",
        "RTC_NODE_ID": f"unit-{port}",
    }
    env = _service_environment(unit, variables, credentials) | {
        "RUNTIME_DIRECTORY": str(runtime),
        "NOTIFY_SOCKET": str(notify.path),
        "WATCHDOG_USEC": "1000000",
    }
    log = (root / "rtc.log").open("wb")
    proc: subprocess.Popen[bytes] | None = None
    try:
        pre = subprocess.run(_exec_argv(unit, "ExecStartPre"), env=env, check=False, timeout=60)
        assert pre.returncode == 0
        # systemd sets WATCHDOG_PID to the main PID: the shell's, which exec keeps.
        proc = subprocess.Popen(
            [
                "/bin/sh",
                "-c",
                'WATCHDOG_PID=$$ exec "$@"',
                "sh",
                *_exec_argv(unit, "ExecStart"),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        ready = notify.wait_for("READY", "1", timeout=60)
        assert ready.get("STATUS"), ready
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
            assert resp.status == 200
        notify.wait_for("WATCHDOG", "1", timeout=3)

        proc.send_signal(signal.SIGHUP)  # ExecReload=/bin/kill -s HUP $MAINPID
        reloading = notify.wait_for("RELOADING", "1", timeout=10)
        assert "MONOTONIC_USEC" in reloading
        reloaded = notify.wait_for("READY", "1", timeout=60)
        # The Status line follows the reload step by step, then keeps its outcome.
        during = [f["STATUS"] for _, f in notify.received if f.get("STATUS", "").startswith("reloading:")]
        assert "reloading: replacing worker 2/2" in " ".join(during), during
        assert re.search(r"last reload replaced 2 workers in [\d.]+s$", reloaded["STATUS"]), reloaded

        proc.send_signal(signal.SIGTERM)  # KillMode=mixed: the main process only
        notify.wait_for("STOPPING", "1", timeout=10)
        assert proc.wait(timeout=timespan_seconds(unit["TimeoutStopSec"][0])) == 0
        assert {pid for pid, _ in notify.received} == {proc.pid}
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        notify.close()
        shutil.rmtree(root, ignore_errors=True)


# --- proxy configurations as files ----------------------------------------


def _assert_clean_haproxy_check(cfg: Path) -> None:
    result = check_haproxy(cfg)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Configuration file is valid" in result.stdout
    assert "[WARNING]" not in result.stderr and "[ALERT]" not in result.stderr, result.stderr


def test_haproxy_accepts_the_shipped_file() -> None:
    _assert_clean_haproxy_check(HAPROXY_CFG)


@pytest.mark.parametrize("affinity", [False, True], ids=["leastconn", "affinity-variant"])
def test_haproxy_accepts_the_rendered_file(tmp_path: Path, affinity: bool) -> None:
    backends = [
        EchoBackend("b1", "127.0.0.2", 18081),
        EchoBackend("b2", "127.0.0.3", 18081),
    ]
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(
        render_haproxy(
            port=18080,
            stats_port=18404,
            backends=backends,
            workdir=tmp_path,
            affinity=affinity,
        )
    )
    _assert_clean_haproxy_check(cfg)


def test_haproxy_file_contract() -> None:
    text = HAPROXY_CFG.read_text()
    for needle in (
        "balance leastconn",
        "option httpchk GET /health",
        "http-check expect status 200",
        "option forwardfor",
        "hash-type consistent",
        "hard-stop-after",
        "stats socket",
    ):
        assert needle in text, needle
    timeouts = dict(re.findall(r"^\s+timeout (\S+) (\S+)$", text, flags=re.MULTILINE))
    assert timespan_seconds(timeouts["tunnel"]) >= 3 * WS_HEARTBEAT_S
    assert timespan_seconds(timeouts["http-request"]) <= 15
    assert len(re.findall(r"^\s+server rtc\d+ (?!.*track)", text, flags=re.MULTILINE)) >= 2


@pytest.mark.parametrize("short_timeouts", [False, True], ids=["shipped-timeouts", "test-timeouts"])
def test_nginx_accepts_the_rendered_files(tmp_path: Path, short_timeouts: bool) -> None:
    """nginx -t on the shipped files with only paths and addresses changed (and then timeouts)."""
    backends = [
        EchoBackend("b1", "127.0.0.2", 18081),
        EchoBackend("b2", "127.0.0.3", 18081),
    ]
    conf = render_nginx(
        port=18080,
        backends=backends,
        workdir=tmp_path,
        timeouts=TEST_TIMEOUTS if short_timeouts else None,
    )
    result = check_nginx(conf)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr
    assert "[warn]" not in result.stderr and "[emerg]" not in result.stderr, result.stderr


def test_nginx_file_contract() -> None:
    site = NGINX_SITE.read_text()
    assert "include rtc.conf;" in NGINX_CONF.read_text()
    assert re.search(r"map \$http_upgrade \$connection_upgrade", site)
    assert "least_conn;" in site
    assert "proxy_buffering off;" in site
    assert len(re.findall(r"^\s+server \S+ max_fails=\d+ fail_timeout=\S+;", site, re.MULTILINE)) >= 2
    read_timeout = re.search(r"proxy_read_timeout (\S+);", site)
    assert read_timeout and timespan_seconds(read_timeout.group(1)) >= 3 * WS_HEARTBEAT_S
    log_format = re.search(r"log_format rtc (.*?);\n", site, flags=re.DOTALL)
    assert log_format is not None
    for leaky in (
        "$request ",
        '$request"',
        "$request_uri",
        "$args",
        "$query_string",
        "$arg_",
    ):
        assert leaky not in log_format.group(1), leaky
    assert "$uri" in log_format.group(1)
    assert "$http_authorization" not in site


# --- real proxies carrying traffic ----------------------------------------


def _ctl(backend: EchoBackend, query: str = "") -> dict[str, object]:
    with urllib.request.urlopen(f"{backend.url}/_ctl?{query}", data=b"", timeout=5) as resp:
        answer: dict[str, object] = json.loads(resp.read())
        return answer


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[EchoBackend]]:
    logs = tmp_path_factory.mktemp("backends")
    with (
        run_echo_backend("b1", "127.0.0.2", logs) as b1,
        run_echo_backend("b2", "127.0.0.3", logs) as b2,
    ):
        yield [b1, b2]


@pytest.fixture
def fresh_backends(backends: list[EchoBackend]) -> Iterator[list[EchoBackend]]:
    for b in backends:
        _ctl(b, "reset=1")
    yield backends
    for b in backends:
        _ctl(b, "reset=1")


@pytest.fixture(params=["haproxy", "nginx"])
def proxy(
    request: pytest.FixtureRequest, fresh_backends: list[EchoBackend], tmp_path: Path
) -> Iterator[RunningProxy]:
    run = run_haproxy if request.param == "haproxy" else run_nginx
    with run(tmp_path / request.param, fresh_backends) as running:
        yield running


@pytest.fixture
def haproxy(fresh_backends: list[EchoBackend], tmp_path: Path) -> Iterator[RunningProxy]:
    with run_haproxy(tmp_path / "haproxy", fresh_backends) as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


async def _welcome_node(ws: aiohttp.ClientWebSocketResponse) -> str:
    msg = await ws.receive_json(timeout=5)
    assert msg["type"] == "welcome"
    node: str = msg["node"]
    return node


async def _raw_request(proxy: RunningProxy, request_line: str) -> int:
    """Send one request byte for byte (clients normalise paths; an attacker does not)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(f"{request_line}\r\nHost: rtc.example\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 5)
        return int(status_line.split()[1])
    finally:
        writer.close()
        await writer.wait_closed()


async def test_websocket_upgrade_and_least_connections(
    proxy: RunningProxy, http: aiohttp.ClientSession
) -> None:
    """Upgrades pass both ways, and held connections spread evenly over the two hosts."""
    sockets = [await http.ws_connect(f"{proxy.ws_url}/ws") for _ in range(4)]
    try:
        nodes = [await _welcome_node(ws) for ws in sockets]
        assert sorted(nodes) == ["b1", "b1", "b2", "b2"]
        for i, ws in enumerate(sockets):
            await ws.send_str(f"hello {i}")
            assert await ws.receive_str(timeout=5) == f"hello {i}"
    finally:
        for ws in sockets:
            await ws.close()
    async with http.get(f"{proxy.url}/health") as resp:
        assert resp.status == 200


@pytest.mark.parametrize(
    "request_line",
    [
        "POST /admin/drain HTTP/1.1",
        "DELETE /admin/drain HTTP/1.1",
        "GET /admin/ring?key=room1 HTTP/1.1",
        "GET //admin/drain HTTP/1.1",
        "GET /%61dmin/drain HTTP/1.1",
        "GET /admin%2Fdrain HTTP/1.1",
        "GET /ws/../admin/drain HTTP/1.1",
        "GET /./admin/drain HTTP/1.1",
        "GET /ADMIN/drain HTTP/1.1",
        "GET http://rtc.example/admin/drain HTTP/1.1",
        "GET /metrics HTTP/1.1",
        "GET /dashboard HTTP/1.1",
        "GET /dashboard/events HTTP/1.1",
    ],
)
async def test_admin_surface_is_refused(
    proxy: RunningProxy, fresh_backends: list[EchoBackend], request_line: str
) -> None:
    assert await _raw_request(proxy, request_line) == 403
    assert [_ctl(b)["admin_hits"] for b in fresh_backends] == [0, 0]


async def test_client_cannot_forge_its_address(proxy: RunningProxy, http: aiohttp.ClientSession) -> None:
    forged = {
        "X-Forwarded-For": "6.6.6.6",
        "Forwarded": "for=6.6.6.6",
        "X-Real-IP": "6.6.6.6",
    }
    async with http.get(f"{proxy.url}/whoami", headers=forged) as resp:
        seen = (await resp.json())["headers"]
    assert seen["X-Forwarded-For"] == "127.0.0.1"
    assert seen["Forwarded"] is None
    assert seen["X-Real-IP"] in (None, "127.0.0.1")


async def test_idle_websocket_outlives_client_and_server_timeouts(
    proxy: RunningProxy, http: aiohttp.ClientSession
) -> None:
    """With the backend's 1 s ping the tunnel stays up; without it the proxy's limit ends it.

    Proxy timeouts here: client/server/header 2 s, tunnel (HAProxy) or
    proxy_read_timeout (NGINX) 3 s. Shipped: 30 s / 10 s and 1 h, rtc's ping 20 s.
    """
    idle_for = TEST_TIMEOUTS.tunnel + 1.5
    assert idle_for > max(TEST_TIMEOUTS.client, TEST_TIMEOUTS.server)

    async def with_heartbeat() -> None:
        async with http.ws_connect(f"{proxy.ws_url}/ws?heartbeat=1") as ws:
            await _welcome_node(ws)
            # A pending receive() answers the pings, as a browser does on its own.
            reader = asyncio.ensure_future(ws.receive())
            done, _ = await asyncio.wait({reader}, timeout=idle_for)
            assert not done, reader.result()
            await ws.send_str("still here")
            assert (await asyncio.wait_for(reader, 5)).data == "still here"

    async def without_heartbeat() -> float:
        async with http.ws_connect(f"{proxy.ws_url}/ws?heartbeat=0") as ws:
            await _welcome_node(ws)
            start = time.monotonic()
            msg = await ws.receive(timeout=TEST_TIMEOUTS.tunnel + 5)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            return time.monotonic() - start

    _, closed_after = await asyncio.gather(with_heartbeat(), without_heartbeat())
    assert closed_after >= TEST_TIMEOUTS.tunnel - 0.5


async def test_slow_request_head_is_cut_off(proxy: RunningProxy) -> None:
    """Slowloris: a request head that never completes is dropped after the header timeout."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(b"GET /ws HTTP/1.1\r\nHost: rtc.example\r\n")
        await writer.drain()
        start = time.monotonic()
        # HAProxy answers 408 then closes; NGINX just closes.
        while await asyncio.wait_for(reader.read(4096), TEST_TIMEOUTS.http_request + 3):
            pass
        assert time.monotonic() - start <= TEST_TIMEOUTS.http_request + 1.5
    finally:
        writer.close()
        await writer.wait_closed()


async def test_token_is_not_logged(proxy: RunningProxy, http: aiohttp.ClientSession) -> None:
    secret = "eyJSECRET.TOKEN.VALUE"
    async with http.ws_connect(f"{proxy.ws_url}/ws?session=s1&token={secret}") as ws:
        await _welcome_node(ws)
    # Another process writes the log: the event is its line appearing there.
    log = await until(lambda: "/ws" in (text := proxy.log_text()) and text, 5, "the /ws line in the log", 0.1)
    assert secret not in log
    if proxy.kind == "haproxy":
        assert "/ws?session=s1&token=REDACTED" in log
    else:
        assert '"GET /ws HTTP/1.1" 101' in log


async def test_haproxy_health_check_takes_a_host_out(
    haproxy: RunningProxy,
    fresh_backends: list[EchoBackend],
    http: aiohttp.ClientSession,
) -> None:
    """/health 503 on b1 (as while rtc drains) -> DOWN -> every new connection goes to b2."""
    b1, _ = fresh_backends
    await _wait_server_status(haproxy, "rtc1", "UP")
    _ctl(b1, "health=503")  # its /ws still works: only the check can steer away from it
    await _wait_server_status(haproxy, "rtc1", "DOWN")
    sockets = [await http.ws_connect(f"{haproxy.ws_url}/ws") for _ in range(4)]
    try:
        assert [await _welcome_node(ws) for ws in sockets] == ["b2"] * 4
        for _ in range(3):
            async with http.get(f"{haproxy.url}/whoami") as resp:
                assert (await resp.json())["node"] == "b2"
        _ctl(b1, "health=200")
        await _wait_server_status(haproxy, "rtc1", "UP")
    finally:
        for ws in sockets:
            await ws.close()


async def _wait_server_status(proxy: RunningProxy, server: str, want: str) -> None:
    def status() -> str:
        return haproxy_server_status(proxy, "be_rtc_ws", server)

    await until(lambda: status() == want, 10, lambda: f"{server} to be {want} (it is {status()})", 0.1)


async def test_nginx_retries_a_refusing_host(
    fresh_backends: list[EchoBackend], tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """Upgrades answered 503 by b1 (rtc while starting or draining) are retried on b2."""
    b1, _ = fresh_backends
    _ctl(b1, "ws=503")
    with run_nginx(tmp_path / "nginx", fresh_backends) as nginx:
        sockets = [await http.ws_connect(f"{nginx.ws_url}/ws") for _ in range(4)]
        try:
            assert [await _welcome_node(ws) for ws in sockets] == ["b2"] * 4
        finally:
            for ws in sockets:
                await ws.close()


async def test_haproxy_affinity_variant_keeps_a_user_on_one_host(
    fresh_backends: list[EchoBackend], tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """The documented hash-on-`sub` variant: the same user always lands on the same host."""
    with run_haproxy(tmp_path / "affinity", fresh_backends, affinity=True) as proxy:
        placement: dict[str, set[str]] = {}
        for user in ("alice", "bob", "carol", "dave", "erin", "frank"):
            token = jwt.encode({"sub": user, "exp": int(time.time()) + 60}, "k" * 32)
            for header in (False, True):
                url = f"{proxy.ws_url}/ws" + ("" if header else f"?token={token}")
                headers = {"Authorization": f"Bearer {token}"} if header else {}
                async with http.ws_connect(url, headers=headers) as ws:
                    placement.setdefault(user, set()).add(await _welcome_node(ws))
        assert all(len(nodes) == 1 for nodes in placement.values()), placement
        assert set().union(*placement.values()) == {"b1", "b2"}, placement


# --- scale-down script ------------------------------------------------------


def _run_scale_down(
    backend: EchoBackend, tmp_path: Path, deadline: float
) -> tuple[subprocess.CompletedProcess[str], Path]:
    record = tmp_path / "ssh-calls"
    fake_ssh = tmp_path / "fake-ssh"
    fake_ssh.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {record}\n'
        f"curl -s {backend.url}/metrics >> {record}\n"
    )  # fmt: skip
    fake_ssh.chmod(0o755)
    env = {
        **os.environ,
        "SSH": str(fake_ssh),
        "DRAIN_DEADLINE": str(deadline),
        "POLL_INTERVAL": "0.2",
    }
    result = subprocess.run(
        ["bash", str(SCALE_DOWN), backend.url, "ops@host-1"],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    return result, record


def test_scale_down_script_is_valid_bash() -> None:
    result = subprocess.run(["bash", "-n", str(SCALE_DOWN)], check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert os.access(SCALE_DOWN, os.X_OK)


async def test_scale_down_drains_then_stops(
    fresh_backends: list[EchoBackend], tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """Drain request, polling until 0 connections, then the stop command, in that order."""
    for program in ("curl", "jq"):
        require_program(program)
    b1, _ = fresh_backends
    sockets = [await http.ws_connect(f"{b1.url}/ws?heartbeat=0") for _ in range(3)]
    try:
        result, record = await asyncio.to_thread(_run_scale_down, b1, tmp_path, 20)
        assert result.returncode == 0, result.stderr
        calls = record.read_text().splitlines()
        assert calls[0] == "ops@host-1 sudo systemctl stop rtc"
        assert json.loads(calls[1])["active_connections"] == 0
        polled = [int(n) for n in re.findall(r"active_connections=(\d+)", result.stderr)]
        assert polled[0] > 0 and polled[-1] == 0, result.stderr
        for ws in sockets:
            while (msg := await ws.receive(timeout=5)).type == aiohttp.WSMsgType.TEXT:
                pass
            assert (msg.type, msg.data) == (
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSCloseCode.GOING_AWAY,
            )
    finally:
        for ws in sockets:
            await ws.close()


async def test_scale_down_deadline_is_bounded(
    fresh_backends: list[EchoBackend], tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """Connections that never leave: the script gives up at the deadline and stops anyway (2)."""
    b1, _ = fresh_backends
    _ctl(b1, "drain_closes=0")
    async with http.ws_connect(f"{b1.url}/ws?heartbeat=0") as ws:
        await _welcome_node(ws)
        start = time.monotonic()
        result, record = await asyncio.to_thread(_run_scale_down, b1, tmp_path, 1)
        assert time.monotonic() - start < 10
        assert result.returncode == 2, result.stderr
        assert "deadline" in result.stderr
        assert record.read_text().startswith("ops@host-1 sudo systemctl stop rtc")


def test_scale_down_refused_drain_stops_nothing(tmp_path: Path) -> None:
    nowhere = EchoBackend("none", "127.0.0.1", 9)  # discard port: connection refused
    result, record = _run_scale_down(nowhere, tmp_path, 1)
    assert result.returncode == 1, result.stderr
    assert not record.exists()
