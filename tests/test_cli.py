"""`python -m rtc` as a user runs it: one clear line on stderr and exit 2 for a bad setting."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest

from rtc.config import SEED_FALLBACKS

SECRET = "cli-test-secret-0123456789abcdef0123456789"
# Variables that would change what rtc reads; the tests give each run exactly what it needs.
SCRUBBED = {name for names in SEED_FALLBACKS.values() for name in names} | {
    "CREDENTIALS_DIRECTORY",
    "RUNTIME_DIRECTORY",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "PROMETHEUS_MULTIPROC_DIR",
}


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RTC_") and k not in SCRUBBED}
    env["PYTHONWARNINGS"] = "default"  # a stray warning would show up on stderr and fail the test
    return {**env, **extra}


def rtc(
    *argv: str, env: dict[str, str] | None = None, timeout: float = 15.0
) -> subprocess.CompletedProcess[str]:
    """Run rtc in a session of its own, so a hang is killed with everything it started."""
    with subprocess.Popen(
        [sys.executable, "-m", "rtc", *argv],
        env=clean_env() if env is None else env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"rtc {' '.join(argv)} did not exit: {err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def assert_one_line_error(result: subprocess.CompletedProcess[str], status: int = 2) -> str:
    assert result.returncode == status, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("rtc: "), lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "argv,needle",
    [
        (("serve", "--bogus"), "--bogus"),
        (("check-config", "--bogus", "1"), "--bogus"),
        (("frobnicate",), "frobnicate"),
        ((), "command"),
        (("serve", "--port", "http"), "--port"),
        (("serve", "--workers", "0"), "--workers"),
        (("token",), "--user"),
    ],
)
def test_bad_arguments(argv: tuple[str, ...], needle: str) -> None:
    assert needle in assert_one_line_error(rtc(*argv, env=clean_env(JWT_SECRET=SECRET)))


@pytest.mark.parametrize("command", ["serve", "check-config"])
def test_missing_secret(command: str) -> None:
    assert "JWT_SECRET" in assert_one_line_error(rtc(command))


def test_missing_secret_for_token() -> None:
    assert_one_line_error(rtc("token", "--user", "alice"))


def test_check_config_ok() -> None:
    result = rtc("check-config", "--workers", "3", "--port", "9000", env=clean_env(JWT_SECRET=SECRET))
    assert result.returncode == 0, result
    assert result.stderr == ""
    assert "3 workers" in result.stdout and "9000" in result.stdout


def test_check_config_bad() -> None:
    line = assert_one_line_error(rtc("check-config", env=clean_env(JWT_SECRET=SECRET, RTC_LOG_FORMAT="xml")))
    assert "--log-format" in line


def test_check_config_unreadable_key(tmp_path: Path) -> None:
    result = rtc("check-config", "--jwt-algorithms", "RS256", "--jwt-public-key", str(tmp_path / "k.pem"))
    assert "--jwt-public-key" in assert_one_line_error(result)


def test_token() -> None:
    before = time.time()
    result = rtc("token", "--user", "alice", "--rooms", "a.*", "--admin", env=clean_env(JWT_SECRET=SECRET))
    assert result.returncode == 0, result
    assert result.stderr == ""
    token = result.stdout.strip()
    assert "\n" not in token
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice"
    assert claims["rooms"] == ["a.*"]
    assert claims["admin"] is True
    assert before + 3600 - 5 <= claims["exp"] <= time.time() + 3600 + 5


def test_token_ttl_and_no_rooms() -> None:
    result = rtc("token", "--user", "bob", "--ttl", "60", env=clean_env(RTC_JWT_SECRET=SECRET))
    assert result.returncode == 0, result
    claims = jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["exp"] - claims["iat"] == 60
    assert "rooms" not in claims and "admin" not in claims


def test_version() -> None:
    result = rtc("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("rtc ")


def test_status_of_a_host_that_is_not_there() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        result = rtc("status", "--url", f"http://127.0.0.1:{port}")
    line = assert_one_line_error(result, status=1)
    assert str(port) in line


def test_serve_on_a_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = rtc(
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--metrics-port",
            "0",
            "--workers",
            "1",
            "--runtime-dir",
            str(tmp_path / "run"),
            env=clean_env(JWT_SECRET=SECRET),
        )
    line = assert_one_line_error(result)
    assert str(port) in line and "in use" in line


def test_serve_with_unreachable_redis_is_one_line_and_exit_2() -> None:
    from tests.rtcproc import free_ports

    port, metrics_port, nobody = free_ports(3)  # nothing listens on `nobody`
    result = rtc(
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        "--workers",
        "2",
        "--redis-url",
        f"redis://127.0.0.1:{nobody}",
        env=clean_env(JWT_SECRET=SECRET),
    )
    assert result.returncode == 2
    line = assert_one_line_error(result)
    assert line.startswith("rtc: cannot reach Redis")


def test_token_help_describes_its_options() -> None:
    result = rtc("token", "--help")
    assert result.returncode == 0, result
    text = " ".join(result.stdout.split())
    assert "--jwt-secret-file /etc/rtc/jwt-secret" in text
    for option, words in (
        ("--user USER", "subject"),
        ("--rooms [PATTERN ...]", "glob patterns"),
        ("--admin", "/admin API"),
        ("--ttl TTL", "lifetime in seconds"),
    ):
        assert re.search(rf"{re.escape(option)} [^-]*{re.escape(words)}", text), option


def test_missing_secret_names_the_file_option() -> None:
    line = assert_one_line_error(rtc("token", "--user", "ops", "--admin"))
    assert "--jwt-secret-file" in line
