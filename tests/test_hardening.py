"""Safe by default (issue 12): each way in that the first attack suite did not try, tried.

Real `rtc serve` hosts and a real redis-server; the outcome is asserted from outside (HTTP
status, close code, frames, metrics, exit status and stderr, the host's log, process
command lines). The resource-bound figures under attack are in `test_memory_bounds.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import stat
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import jwt
import orjson
import psutil
import pytest

from rtc.appstate import FD_RESERVE
from rtc.endpoints import DEMO_ROOMS, DEMO_TOKEN_TTL
from tests.client import Client
from tests.rawws import OP_BINARY, RawWS
from tests.rtcproc import (
    RTC,
    SECRET,
    Host,
    RedisServer,
    counter,
    free_ports,
    hosts,
    start_host,
    start_redis,
    stop_process,
    token,
    wait_for,
)

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    """Two workers, `--demo`, the secret on the command line, the access log on (debug)."""
    redis = start_redis()
    server = start_host(
        "hard",
        redis.url,
        args=("--demo", "--jwt-secret", SECRET, "--log-level", "debug"),
    )
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.runtime_dir, ignore_errors=True)
        redis.stop()


def http(
    host: Host, method: str, path: str, headers: dict[str, str] | None = None, body: bytes | None = None
) -> tuple[int, bytes]:
    request = urllib.request.Request(host.http + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return int(exc.code), exc.read()


def mint_demo(host: Host, user: str) -> tuple[int, bytes]:
    return http(
        host, "POST", "/demo/token", {"Content-Type": "application/json"}, orjson.dumps({"user": user})
    )


def refused_or_open(host: Host, **kwargs: object) -> RawWS:
    """An upgrade attempt; a refused one's socket is closed at once (it holds a descriptor)."""
    raw = RawWS.open(host, **kwargs)  # type: ignore[arg-type]
    if raw.status != 101:
        raw.close()
    return raw


def admitted(host: Host, **kwargs: object) -> bool:
    """Whether an upgrade is taken (101); the socket is closed either way."""
    raw = refused_or_open(host, **kwargs)
    raw.close()
    return raw.status == 101


# ============================================================================ token minting


def test_embedded_mode_does_not_imply_the_demo() -> None:
    """The single-host setup of docs/deploy.md: no /demo, so no token minting, unless --demo."""
    server = start_host("nodemo", None)
    try:
        minted = mint_demo(server, "alice")
        page = http(server, "GET", "/demo")
        assert (minted[0], page[0]) == (404, 404), (minted, page)
    finally:
        assert server.stop() == 0
        shutil.rmtree(server.runtime_dir, ignore_errors=True)


async def test_demo_tokens_are_short_lived_and_confined_to_demo_rooms(host: Host) -> None:
    status, body = mint_demo(host, "mallory")
    assert status == 200, body
    minted = orjson.loads(body)["token"]
    claims = jwt.decode(minted, SECRET, algorithms=["HS256"])
    assert claims["sub"] == "mallory" and claims["rooms"] == DEMO_ROOMS == ["demo.*"]
    assert claims["exp"] - claims["iat"] == DEMO_TOKEN_TTL <= 600
    assert "admin" not in claims
    victim = await Client.connect(host.ws, "alice")
    mallory = await Client.connect(host.ws, "mallory", token=minted)
    try:
        await mallory.send(type="direct", to="alice", data="hi")
        await victim.expect("direct")  # alice has a direct in her inbox now
        for room in ("@alice", "orders", "secret.demo"):
            await mallory.send(type="join", room=room, since=0)
            error = await mallory.expect("error")
            assert error["code"] == "forbidden", (room, error)
        assert (await mallory.join("demo.lobby"))["room"] == "demo.lobby"
        own = await mallory.join("@mallory", since=0)
        assert own["recovered"] is True
    finally:
        await mallory.close()
        await victim.close()


def test_serve_script_binds_loopback_with_demo_and_a_random_secret(tmp_path: Path) -> None:
    serve = REPO / "scripts" / "serve.sh"
    assert "JWT_SECRET=" not in serve.read_text(), "a secret published in the repo"
    port, metrics_port = free_ports(2)
    runtime = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RTC_", "JWT_", "NOTIFY_"))}
    env["RTC_RUNTIME_DIR"] = str(runtime)
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [str(serve), "--port", str(port), "--metrics-port", str(metrics_port), "--workers", "1"],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
    server = Host("serve", port, metrics_port, process, runtime, log_path, workers=1)
    try:
        wait_for(lambda: server.healthy() or process.poll() is not None, 90, "serve.sh")
        assert process.poll() is None, server.log()
        secret_file = runtime / "jwt-secret"
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
        secret = secret_file.read_text().strip()
        assert len(secret) == 64 and int(secret, 16) >= 0  # 32 random bytes, hex
        listening = {
            c.laddr.ip
            for p in (psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True))
            for c in p.net_connections("inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port in (port, metrics_port)
        }
        assert listening == {"127.0.0.1"}, listening
        status, body = mint_demo(server, "u")
        assert status == 200, body
        assert jwt.decode(orjson.loads(body)["token"], secret, algorithms=["HS256"])["rooms"] == ["demo.*"]
    finally:
        assert stop_process(process, 30) == 0, server.log()


# ============================================================================ frames


def test_binary_frames_spend_the_rate_limit_and_close_1008(host: Host) -> None:
    """Every refused frame counts: 400 binary frames get the burst's worth of answers, then 1008."""
    denied_before = counter(host, "rate_limit_denied_total")
    raw = RawWS.open(host, token=token("binary"))
    try:
        assert raw.status == 101
        raw.frames_until("welcome")
        for _ in range(400):
            try:
                raw.send_frame(OP_BINARY, b"\x00" * 64)
            except OSError:  # closed by the server mid-flood
                break
        code, frames = raw.close_outcome()
    finally:
        raw.close()
    codes = [f.get("code") for f in frames if f.get("type") == "error"]
    assert code == 1008, (code, codes[:5])
    assert 40 <= codes.count("bad_request") <= 45, codes.count("bad_request")  # burst 40 (+ refill)
    assert codes.count("rate_limited") > 100
    wait_for(lambda: counter(host, "rate_limit_denied_total") - denied_before > 100, 5, "denials counted")


async def test_rooms_per_connection_are_capped_at_max_rooms(host: Host) -> None:
    """--max-rooms (100) at a time; a left room frees its place."""
    client = await Client.connect(host.ws, "collector")
    try:
        for i in range(100):
            await client.join(f"cap.{i}")
            await asyncio.sleep(1 / 20)  # within --rate 20: this test is about rooms, not rate
        await client.send(type="join", room="cap.100")
        assert (await client.expect("error"))["code"] == "forbidden"
        await client.request("leave", "left", room="cap.0")
        assert (await client.join("cap.100"))["room"] == "cap.100"
    finally:
        await client.close()


# ============================================================================ admin from a browser


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Origin": "http://127.0.0.1:8081", "Sec-Fetch-Site": "same-origin"},
    ],
    ids=["foreign-origin", "null-origin", "sec-fetch-cross-site", "own-origin"],
)
def test_browser_admin_writes_need_an_admin_token(host: Host, headers: dict[str, str]) -> None:
    """A page cannot drive POST/DELETE /admin/drain through loopback trust; GET still works."""
    for method in ("POST", "DELETE"):
        status, _ = http(host, method, "/admin/drain", headers)
        assert status == 403, (method, headers, status)
    assert host.healthy(), "a refused POST /admin/drain drained the host"
    assert http(host, "GET", "/admin/ring", headers)[0] == 200


def test_browser_admin_write_with_an_admin_token_is_served(host: Host) -> None:
    admin = {"Origin": "https://ops.example", "Authorization": f"Bearer {token('ops', admin=True)}"}
    not_admin = {"Origin": "https://ops.example", "Authorization": f"Bearer {token('user')}"}
    assert http(host, "POST", "/admin/drain", not_admin)[0] == 403
    assert http(host, "POST", "/admin/drain", admin)[0] == 202
    wait_for(lambda: not host.healthy(), 5, "the host to drain")
    assert http(host, "DELETE", "/admin/drain", admin)[0] == 200
    wait_for(host.healthy, 10, "the host to serve again")


# ============================================================================ secrets


def test_jwt_secret_on_the_command_line_warns(host: Host) -> None:
    worker = host.worker_pids()[0]
    assert SECRET in psutil.Process(worker).cmdline()  # why it warns: every worker shows it
    warnings = [line for line in host.log().splitlines() if "--jwt-secret on the command line" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0] and "--jwt-secret-file" in warnings[0]
    assert SECRET not in host.log()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RTC_", "JWT_"))}
    checked = subprocess.run(
        [*RTC, "check-config", "--jwt-secret", SECRET], capture_output=True, text=True, env=env, timeout=30
    )
    assert checked.returncode == 0 and "--jwt-secret-file" in checked.stderr


@pytest.mark.parametrize("key", ["%74oken", "%74%6F%6B%65%6E", "t%6Fken"])
def test_percent_encoded_token_key_is_served_and_redacted(host: Host, key: str) -> None:
    secret_token = token(f"enc-{key.count('%')}")
    raw = RawWS.open(host, path=f"/ws?{key}={secret_token}")
    try:
        assert raw.status == 101, raw.body  # the server reads the key decoded: it is the token
        raw.frames_until("welcome")
    finally:
        raw.close()
    signature = secret_token.rsplit(".", 1)[1]
    wait_for(lambda: f"{key}=***" in host.log(), 5, "the access log line")
    assert signature not in host.log()


def test_scale_down_keeps_the_admin_token_out_of_argv(tmp_path: Path) -> None:
    """Every curl the script runs is recorded (argv, and the config it reads on stdin)."""
    real_curl = shutil.which("curl")
    assert real_curl and shutil.which("jq"), "curl and jq are needed"
    argv_log, stdin_log = tmp_path / "argv", tmp_path / "stdin"
    spy = tmp_path / "bin" / "curl"
    spy.parent.mkdir()
    spy.write_text(
        "#!/bin/sh\n"
        f'printf "%s\\n" "$*" >> {argv_log}\n'
        f'if [ "$*" != "${{*#*-K -}}" ]; then tee -a {stdin_log} | {real_curl} "$@"; exit; fi\n'
        f'exec {real_curl} "$@"\n'
    )  # fmt: skip
    spy.chmod(0o755)
    fake_ssh = tmp_path / "bin" / "ssh"
    fake_ssh.write_text("#!/bin/sh\nexit 0\n")
    fake_ssh.chmod(0o755)
    admin = token("ops", admin=True)
    redis = start_redis()
    server = start_host("scale", redis.url, workers=1)
    try:
        result = subprocess.run(
            ["bash", str(REPO / "scripts" / "scale-down.sh"), server.http, "ops@host"],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=60,
            env={
                **os.environ,
                "PATH": f"{spy.parent}:{os.environ['PATH']}",
                "RTC_ADMIN_TOKEN": admin,
                "DRAIN_DEADLINE": "20",
                "POLL_INTERVAL": "0.2",
            },
        )
        assert result.returncode == 0, result.stderr
        assert not server.healthy()  # drained
        calls = argv_log.read_text()
        assert "/admin/drain" in calls and "/metrics" in calls
        assert admin not in calls and "Bearer" not in calls
        assert f'header = "Authorization: Bearer {admin}"' in stdin_log.read_text()
    finally:
        server.stop()
        shutil.rmtree(server.runtime_dir, ignore_errors=True)
        redis.stop()


# ============================================================================ runtime directory


def serve_once(runtime: Path, *extra: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    port, metrics_port = free_ports(2)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RTC_", "NOTIFY_"))}
    env["JWT_SECRET"] = SECRET
    command = [*RTC, "serve", "--runtime-dir", str(runtime), "--port", str(port)]
    command += ["--metrics-port", str(metrics_port), "--workers", "1", *extra]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_runtime_dir_writable_by_others_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    line = one_line(serve_once(shared))
    assert line.startswith("rtc: --runtime-dir:") and "writable by others" in line
    shared.chmod(0o770)
    assert "writable by others" in one_line(serve_once(shared))


def test_runtime_dir_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        foreign = tmp_path / "foreign"
        foreign.mkdir(mode=0o700)
        os.chown(foreign, 65534, 65534)  # nobody
    else:
        foreign = Path("/")  # root's, and not writable by others
    line = one_line(serve_once(foreign))
    assert line.startswith("rtc: --runtime-dir:") and "owned by uid" in line


def test_runtime_dir_held_by_a_live_host_is_refused() -> None:
    redis = start_redis()
    first = start_host("holder", redis.url, workers=1)
    try:
        line = one_line(serve_once(first.runtime_dir, "--redis-url", redis.url, "--node-id", "intruder"))
        assert "in use by another live rtc host" in line and f"pid {first.process.pid}" in line
        assert first.healthy()
        assert list((first.runtime_dir / "metrics").glob("*.db")), "the live host's metrics were wiped"
    finally:
        first.stop()
        redis.stop()
    # Once the holder has exited, its lock is gone with it: the directory can be used again.
    second = start_host("after", None, workers=1, args=("--runtime-dir", str(first.runtime_dir)))
    try:
        assert second.healthy()
    finally:
        assert second.stop() == 0
        shutil.rmtree(first.runtime_dir, ignore_errors=True)


# ============================================================================ connection caps


def test_max_connections_auto_answers_503_before_the_descriptor_limit(redis_server: RedisServer) -> None:
    """One worker whose hard descriptor limit is 400: auto caps it at 400 - reserve, then 503."""
    limit = 400
    capacity = limit - FD_RESERVE
    with hosts(("fds", redis_server.url), workers=1, nofile=limit) as (server,), closing_all() as sockets:
        full_before = counter(server, "rtc_handshake_rejected_total", reason="full")
        statuses: list[int] = []
        for _ in range(capacity + 60):
            raw = refused_or_open(server, token=token("fd"))
            statuses.append(raw.status)
            if raw.status == 101:
                raw.frames_until("welcome")
                sockets.append(raw)
        assert statuses.count(101) == capacity and statuses[capacity:] == [503] * 60, statuses.count(101)
        assert counter(server, "rtc_handshake_rejected_total", reason="full") - full_before == 60
        sockets.pop().close()  # one leaves: the next one gets in
        wait_for(lambda: admitted(server, token=token("fd")), 5, "a free place")
        assert server.healthy()
        assert "Too many open files" not in server.log()


def test_connect_rate_per_address_is_host_wide_and_gets_429(redis_server: RedisServer) -> None:
    args = ("--connect-rate", "1", "--connect-burst", "5")
    with hosts(("rate", redis_server.url), workers=2, args=args) as (server,), closing_all() as opened:
        statuses = []
        for _ in range(10):
            raw = refused_or_open(server, token=token("storm"))
            statuses.append(raw.status)
            if raw.status == 101:
                opened.append(raw)
        # Five from the burst, plus at most one refilled or taken twice by two workers at once.
        assert 5 <= statuses.count(101) <= 6 and statuses[:5] == [101] * 5, statuses
        assert set(statuses[6:]) == {429}, statuses
        assert counter(server, "rtc_handshake_rejected_total", reason="connect_rate") >= 4
        # Bad tokens spend the bucket too: a guesser gets 429, not another signature check.
        assert refused_or_open(server, token="not.a.jwt").status == 429
        other = refused_or_open(server, token=token("storm"), source="127.0.0.2")
        assert other.status == 101, "another address has its own bucket"
        opened.append(other)
        wait_for(lambda: admitted(server, token=token("storm")), 5, "a refill")


@contextlib.contextmanager
def closing_all() -> Iterator[list[RawWS]]:
    """A list for the test's raw sockets, each closed at the end whatever happened."""
    sockets: list[RawWS] = []
    try:
        yield sockets
    finally:
        for raw in sockets:
            raw.close()


def test_shipped_env_file_sets_the_per_address_limits() -> None:
    lines = (REPO / "systemd" / "rtc.env.example").read_text().splitlines()
    settings = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    assert int(settings["RTC_MAX_CONNECTIONS_PER_IP"]) > 0
    assert float(settings["RTC_CONNECT_RATE"]) > 0 and int(settings["RTC_CONNECT_BURST"]) > 0
    assert settings["RTC_TRUSTED_PROXIES"], "per-address limits need the proxies' addresses"
    assert "RTC_MAX_CONNECTIONS" not in settings  # auto, the default


def test_rtc_check_config_takes_the_new_settings() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RTC_", "JWT_"))}
    env["JWT_SECRET"] = SECRET
    result = subprocess.run(
        [
            *RTC,
            "check-config",
            "--max-connections",
            "auto",
            "--connect-rate",
            "5",
            "--redis-maxmemory",
            "64m",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
