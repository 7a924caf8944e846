"""rtc.config: defaults < environment < flags, seed fallbacks, secrets from files, validation."""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path

import pytest

from rtc.config import Settings, add_serve_arguments, settings_from
from rtc.errors import ConfigError

BASE = {"JWT_SECRET": "seed-secret"}


def settings(*argv: str, env: dict[str, str] | None = None) -> Settings:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return settings_from(parser.parse_args(argv), BASE if env is None else env)


def config_error(*argv: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        settings(*argv, env=env)
    message = str(caught.value)
    assert message and "\n" not in message
    return message


# -- defaults and precedence ----------------------------------------------------------------


def test_defaults() -> None:
    s = settings()
    assert (s.host, s.port, s.metrics_port) == ("0.0.0.0", 8081, 9090)
    assert s.workers == (os.cpu_count() or 1)
    assert s.node_id == socket.gethostname()
    assert s.redis_url is None and s.redis_cluster == ()
    assert s.jwt_secret == "seed-secret"
    assert s.jwt_algorithms == ("HS256",)
    assert s.jwt_public_key is s.jwt_audience is s.jwt_issuer is None
    assert s.allowed_origins == () and s.trusted_proxies == ()
    assert (s.max_connections, s.max_connections_per_ip) == (None, 0)  # None: auto
    assert (s.connect_rate, s.connect_burst) == (0.0, 200)
    assert s.redis_maxmemory == 256 << 20 and s.demo is False
    assert (s.max_message_bytes, s.max_rooms) == (65536, 100)
    assert (s.rate, s.rate_burst, s.send_queue_bytes) == (20.0, 40, 1 << 20)
    assert (s.history_size, s.history_ttl, s.session_ttl) == (1000, 3600, 300)
    assert s.presence_events_max == 100
    assert s.public_url is None
    assert (s.drain_batch, s.drain_interval, s.shutdown_timeout) == (500, 0.1, 30.0)
    assert s.worker_timeout == 10.0
    assert s.runtime_dir is None
    assert (s.log_level, s.log_format) == ("info", "text")
    assert s.notify_socket is None and s.watchdog_usec == 0


def test_the_process_environment_is_read_only_when_none_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RTC_JWT_SECRET", "from-os-environ")
    monkeypatch.setenv("RTC_PORT", "8123")
    s = settings_from(None)
    assert (s.jwt_secret, s.port) == ("from-os-environ", 8123)
    assert settings_from(None, {**BASE}).port == 8081


def test_env_sets_a_value() -> None:
    assert settings(env={**BASE, "RTC_PORT": "9000"}).port == 9000


def test_flag_beats_env() -> None:
    assert settings("--port", "9001", env={**BASE, "RTC_PORT": "9000"}).port == 9001


def test_env_of_every_kind() -> None:
    s = settings(
        env={
            **BASE,
            "RTC_RATE": "2.5",
            "RTC_ALLOWED_ORIGINS": "https://a.example, https://b.example,",
            "RTC_DEMO": "off",
            "RTC_DRAIN_INTERVAL": "0.5",
            "RTC_MAX_ROOMS": "7",
            "RTC_WORKER_TIMEOUT": "2.5",
        }
    )
    assert s.rate == 2.5
    assert s.allowed_origins == ("https://a.example", "https://b.example")
    assert s.demo is False
    assert s.drain_interval == 0.5
    assert s.max_rooms == 7
    assert s.worker_timeout == 2.5


def test_empty_env_is_unset() -> None:
    assert settings(env={**BASE, "RTC_PORT": ""}).port == 8081


def test_boolean_flags() -> None:
    assert settings("--demo").demo is True
    assert settings("--no-demo", env={**BASE, "RTC_DEMO": "yes"}).demo is False
    assert settings(env={**BASE, "RTC_DEMO": "1"}).demo is True
    assert "RTC_DEMO" in config_error(env={**BASE, "RTC_DEMO": "maybe"})


def test_rtc_jwt_secret_beats_seed_name() -> None:
    assert settings(env={"JWT_SECRET": "seed", "RTC_JWT_SECRET": "rtc"}).jwt_secret == "rtc"
    assert (
        settings("--jwt-secret", "flag", env={"JWT_SECRET": "seed", "RTC_JWT_SECRET": "rtc"}).jwt_secret
        == "flag"
    )


def test_seed_names() -> None:
    s = settings(env={**BASE, "REDIS_URL": "redis://r:6379/0", "MAX_CONNECTIONS": "1000", "NODE_ID": "n1"})
    assert (s.redis_url, s.max_connections, s.node_id) == ("redis://r:6379/0", 1000, "n1")


def test_rtc_names_beat_seed_names() -> None:
    s = settings(
        env={
            **BASE,
            "REDIS_URL": "redis://seed",
            "RTC_REDIS_URL": "redis://rtc",
            "MAX_CONNECTIONS": "5",
            "RTC_MAX_CONNECTIONS": "6",
            "NODE_ID": "seed",
            "POD_NAME": "pod",
            "RTC_NODE_ID": "rtc",
        }
    )
    assert (s.redis_url, s.max_connections, s.node_id) == ("redis://rtc", 6, "rtc")


def test_node_id_then_pod_name() -> None:
    assert settings(env={**BASE, "POD_NAME": "rtc-7f9c-abcde"}).node_id == "rtc-7f9c-abcde"
    assert settings(env={**BASE, "NODE_ID": "n1", "POD_NAME": "pod"}).node_id == "n1"
    assert settings("--node-id", "flag", env={**BASE, "NODE_ID": "n1"}).node_id == "flag"


def test_seed_value_errors_name_the_variable() -> None:
    assert config_error(env={**BASE, "MAX_CONNECTIONS": "many"}).startswith("MAX_CONNECTIONS:")


# -- secrets from files ---------------------------------------------------------------------


def test_jwt_secret_file(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("  from-file\n")
    assert settings("--jwt-secret-file", str(path)).jwt_secret == "from-file"
    assert settings("--jwt-secret-file", str(path), "--jwt-secret", "flag").jwt_secret == "from-file"
    assert settings(env={"RTC_JWT_SECRET_FILE": str(path)}).jwt_secret == "from-file"


def test_unreadable_jwt_secret_file(tmp_path: Path) -> None:
    message = config_error("--jwt-secret-file", str(tmp_path / "missing"))
    assert message.startswith("--jwt-secret-file:") and "missing" in message


def test_credentials_directory(tmp_path: Path) -> None:
    (tmp_path / "jwt-secret").write_text("from-systemd\n")
    assert settings(env={"CREDENTIALS_DIRECTORY": str(tmp_path)}).jwt_secret == "from-systemd"
    assert settings(env={**BASE, "CREDENTIALS_DIRECTORY": str(tmp_path)}).jwt_secret == "seed-secret"


def test_credentials_directory_without_the_file(tmp_path: Path) -> None:
    assert "secret" in config_error(env={"CREDENTIALS_DIRECTORY": str(tmp_path)})


def test_missing_secret() -> None:
    assert "JWT_SECRET" in config_error(env={})


def test_public_key_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    path.write_text("-----BEGIN PUBLIC KEY-----\nabc\n-----END PUBLIC KEY-----\n\n")
    s = settings("--jwt-algorithms", "RS256,ES256", "--jwt-public-key", str(path), env={})
    assert s.jwt_algorithms == ("RS256", "ES256")
    assert s.jwt_public_key == "-----BEGIN PUBLIC KEY-----\nabc\n-----END PUBLIC KEY-----"
    assert s.jwt_secret is None


def test_unreadable_public_key_file(tmp_path: Path) -> None:
    message = config_error("--jwt-algorithms", "RS256", "--jwt-public-key", str(tmp_path / "nope.pem"))
    assert message.startswith("--jwt-public-key:")
    message = config_error("--jwt-algorithms", "RS256", "--jwt-public-key", str(tmp_path))  # a directory
    assert message.startswith("--jwt-public-key:")


def test_secrets_are_not_in_repr() -> None:
    assert "seed-secret" not in repr(settings())


# -- systemd environment --------------------------------------------------------------------


def test_systemd_variables() -> None:
    s = settings(
        env={
            **BASE,
            "RUNTIME_DIRECTORY": "/run/rtc:/run/other",
            "NOTIFY_SOCKET": "@notify",
            "WATCHDOG_USEC": "20000000",
        }
    )
    assert s.runtime_dir == "/run/rtc"
    assert s.notify_socket == "@notify"
    assert s.watchdog_usec == 20_000_000
    assert (
        settings("--runtime-dir", "/tmp/x", env={**BASE, "RUNTIME_DIRECTORY": "/run/rtc"}).runtime_dir
        == "/tmp/x"
    )


def test_bad_watchdog_usec() -> None:
    assert config_error(env={**BASE, "WATCHDOG_USEC": "soon"}).startswith("WATCHDOG_USEC:")


# -- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv,flag",
    [
        (("--port", "0"), "--port"),
        (("--port", "65536"), "--port"),
        (("--port", "-1"), "--port"),
        (("--port", "http"), "--port"),
        (("--metrics-port", "70000"), "--metrics-port"),
        (("--metrics-port", "8081"), "--metrics-port"),
        (("--workers", "0"), "--workers"),
        (("--workers", "1000"), "--workers"),
        (("--workers", "two"), "--workers"),
        (("--node-id", "a b"), "--node-id"),
        (("--node-id", "host:1"), "--node-id"),
        (("--log-format", "xml"), "--log-format"),
        (("--log-level", "loud"), "--log-level"),
        (("--jwt-algorithms", "HS256,RS256"), "--jwt-algorithms"),
        (("--jwt-algorithms", "none"), "--jwt-algorithms"),
        (("--jwt-algorithms", ","), "--jwt-algorithms"),
        (("--jwt-algorithms", "RS256"), "--jwt-public-key"),
        (("--redis-url", "http://r:6379"), "--redis-url"),
        (("--redis-url", "r:6379"), "--redis-url"),
        (("--redis-cluster", "http://a:7000"), "--redis-cluster"),
        (("--trusted-proxies", "10.0.0.0/8,not-a-net"), "--trusted-proxies"),
        (("--trusted-proxies", "10.0.0.0/33"), "--trusted-proxies"),
        (("--max-connections", "-1"), "--max-connections"),
        (("--max-message-bytes", "0"), "--max-message-bytes"),
        (("--rate", "0"), "--rate"),
        (("--rate", "fast"), "--rate"),
        (("--rate-burst", "0"), "--rate-burst"),
        (("--drain-interval", "-0.1"), "--drain-interval"),
        (("--shutdown-timeout", "0"), "--shutdown-timeout"),
        (("--worker-timeout", "0"), "--worker-timeout"),
        (("--worker-timeout", "soon"), "--worker-timeout"),
        (("--runtime-dir", "/tmp/" + "d" * 100), "--runtime-dir"),
    ],
)
def test_bad_values_name_the_flag(argv: tuple[str, ...], flag: str) -> None:
    assert config_error(*argv).startswith(flag), flag


def test_bad_env_values_name_the_variable() -> None:
    assert config_error(env={**BASE, "RTC_PORT": "http"}).startswith("RTC_PORT:")
    assert config_error(env={**BASE, "RTC_PORT": "0"}).startswith("--port")


def test_accepted_edge_values(tmp_path: Path) -> None:
    s = settings(
        "--port",
        "65535",
        "--metrics-port",
        "0",
        "--workers",
        "256",
        "--redis-url",
        "unix:///run/redis.sock",
        "--trusted-proxies",
        "10.0.0.1,::1/128",
        "--runtime-dir",
        str(tmp_path),
        "--log-format",
        "json",
        "--log-level",
        "debug",
    )
    assert (s.port, s.metrics_port, s.workers) == (65535, 0, 256)
    assert s.trusted_proxies == ("10.0.0.1", "::1/128")
    assert settings("--redis-url", "rediss://h:6380/1").redis_url == "rediss://h:6380/1"


def test_runtime_dir_at_the_socket_path_limit() -> None:
    limit = "/" + "d" * (100 - len("/redis.sock") - 1)
    assert len(limit + "/redis.sock") == 100
    assert settings("--runtime-dir", limit).runtime_dir == limit
    assert config_error("--runtime-dir", limit + "d").startswith("--runtime-dir")


# -- derived values -------------------------------------------------------------------------


def test_embedded_redis_never_implies_the_demo() -> None:
    embedded = settings()
    assert embedded.embedded_redis and not embedded.demo
    assert settings("--demo").demo
    external = settings("--redis-url", "redis://r:6379")
    assert not external.embedded_redis and not external.demo
    assert settings("--redis-url", "redis://r:6379", "--demo").demo
    assert not settings(env={**BASE, "REDIS_URL": "redis://r"}).embedded_redis


def test_max_connections_is_auto_a_number_or_off() -> None:
    assert settings("--max-connections", "auto").max_connections is None
    assert settings("--max-connections", "AUTO").max_connections is None
    assert settings("--max-connections", "0").max_connections == 0
    assert settings(env={**BASE, "MAX_CONNECTIONS": "500"}).max_connections == 500
    assert config_error("--max-connections", "-1").startswith("--max-connections")
    assert config_error("--max-connections", "lots").startswith("--max-connections")


@pytest.mark.parametrize(
    "value,expected",
    [
        ("268435456", 256 << 20),
        ("256m", 256 << 20),
        ("256MiB", 256 << 20),
        ("64mb", 64 << 20),
        ("1G", 1 << 30),
    ],
)
def test_redis_maxmemory_sizes(value: str, expected: int) -> None:
    assert settings("--redis-maxmemory", value).redis_maxmemory == expected


def test_bad_redis_maxmemory_and_connect_rate() -> None:
    for bad in ("lots", "12x", "m", "5.5m"):
        assert config_error("--redis-maxmemory", bad).startswith("--redis-maxmemory"), bad
    assert config_error(env={**BASE, "RTC_REDIS_MAXMEMORY": "-5m"}).startswith("RTC_REDIS_MAXMEMORY")
    assert "at least 1 MiB" in config_error("--redis-maxmemory", "1000")
    assert config_error("--connect-rate", "-1").startswith("--connect-rate")
    assert config_error("--connect-burst", "0").startswith("--connect-burst")
    assert settings("--connect-rate", "2.5", "--connect-burst", "5").connect_rate == 2.5


def test_local_slots() -> None:
    assert settings("--node-id", "h1", "--workers", "3").local_slots == ("h1:0", "h1:1", "h1:2")


def test_with_changes_returns_a_new_settings() -> None:
    s = settings()
    changed = s.with_changes(port=9999)
    assert (s.port, changed.port) == (8081, 9999)
    with pytest.raises(AttributeError):
        s.port = 1  # type: ignore[misc]


def test_api_keys_from_flag_env_and_file(tmp_path: Path) -> None:
    assert settings().api_keys == ()
    one = settings("--api-keys", "app:0123456789abcdef, old:fedcba9876543210")
    assert one.api_keys == (("app", "0123456789abcdef"), ("old", "fedcba9876543210"))
    env = {**BASE, "RTC_API_KEYS": "env:abcdefabcdefabcdef"}
    assert settings(env=env).api_keys == (("env", "abcdefabcdefabcdef"),)
    listed = tmp_path / "keys"
    listed.write_text("# rotated monthly\nnew:0000111122223333\n\nold:4444555566667777\n")
    both = settings("--api-keys", "cli:abcdefabcdefabcd", "--api-keys-file", str(listed))
    assert [name for name, _ in both.api_keys] == ["cli", "new", "old"]
    assert "0000111122223333" not in repr(both)


def test_bad_api_keys_never_echo_the_key(tmp_path: Path) -> None:
    message = config_error("--api-keys", "short:tiny-secret")
    assert message.startswith("--api-keys:") and "tiny-secret" not in message
    assert config_error("--api-keys", "no-name-here-0123456789").startswith("--api-keys:")
    listed = tmp_path / "keys"
    listed.write_text("weak:hunter2\n")
    message = config_error("--api-keys-file", str(listed))
    assert message.startswith("--api-keys-file:") and "hunter2" not in message
    assert config_error("--api-keys-file", str(tmp_path / "missing")).startswith(
        "--api-keys-file: cannot read"
    )
