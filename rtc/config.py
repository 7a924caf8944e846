"""One frozen `Settings` built from defaults < environment < command line.

This is the only module that reads `os.environ`. Every setting has a flag of
`rtc serve` and a variable `RTC_<FLAG_IN_UPPER_SNAKE>`; the seed's names
(`JWT_SECRET`, `REDIS_URL`, `MAX_CONNECTIONS`, `NODE_ID`, `POD_NAME`) are
fallbacks that an `RTC_` variable beats.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from rtc.errors import ConfigError

__all__ = ["Settings", "add_serve_arguments", "reference", "settings_from"]

API_KEY_MIN_LENGTH = 16  # a guessable server API key would open publishing to anyone
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
PUBLIC_KEY_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512", "EdDSA"}
)
SEED_FALLBACKS = {
    "jwt_secret": ("JWT_SECRET",),
    "redis_url": ("REDIS_URL",),
    "max_connections": ("MAX_CONNECTIONS",),
    "node_id": ("NODE_ID", "POD_NAME"),
}


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a supervisor and its workers need to know, validated."""

    host: str = "0.0.0.0"
    port: int = 8081
    metrics_port: int = 9090
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    node_id: str = field(default_factory=socket.gethostname)
    redis_url: str | None = None
    redis_cluster: tuple[str, ...] = ()
    jwt_secret: str | None = field(default=None, repr=False)
    jwt_public_key: str | None = field(default=None, repr=False)
    jwt_algorithms: tuple[str, ...] = ("HS256",)
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    allowed_origins: tuple[str, ...] = ()
    trusted_proxies: tuple[str, ...] = ()
    max_connections: int | None = None  # None: auto, from the workers' descriptor limit
    max_connections_per_ip: int = 0
    max_message_bytes: int = 65536
    max_rooms: int = 100
    rate: float = 20.0
    rate_burst: int = 40
    send_queue_bytes: int = 1 << 20
    history_size: int = 1000
    history_ttl: int = 3600
    session_ttl: int = 300
    presence_events_max: int = 100
    public_url: str | None = None
    api_keys: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    api_rate: float = 1000.0
    api_burst: int = 2000
    drain_batch: int = 500
    drain_interval: float = 0.1
    shutdown_timeout: float = 30.0
    worker_timeout: float = 10.0
    runtime_dir: str | None = None
    demo: bool = False
    redis_maxmemory: int = 256 << 20
    connect_rate: float = 0.0
    connect_burst: int = 200
    log_level: str = "info"
    log_format: str = "text"
    ws_heartbeat: float = 20.0
    handshake_timeout: float = 10.0
    conformance_echo: bool = False
    notify_socket: str | None = None
    watchdog_usec: int = 0

    @property
    def embedded_redis(self) -> bool:
        """No Redis configured: the supervisor runs a private one."""
        return not self.redis_url and not self.redis_cluster

    @property
    def local_slots(self) -> tuple[str, ...]:
        """This host's worker slot ids in the ring: `<node_id>:<index>`."""
        return tuple(f"{self.node_id}:{i}" for i in range(self.workers))

    def with_changes(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def _csv(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _auto_int(value: str) -> int | None:
    """An integer, or `auto` (None): the program works the value out."""
    return None if value.strip().lower() == "auto" else int(value)


_BYTE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def _bytes(value: str) -> int:
    """A size: `268435456`, `256m`, `256MiB`, `1g` (binary units, as redis.conf reads them)."""
    text = value.strip().lower().removesuffix("ib").removesuffix("b")
    number = text.rstrip("kmg")
    unit = text[len(number) :]
    if not number.isdigit() or unit not in _BYTE_UNITS:
        raise ValueError(f"not a size: {value!r}")
    return int(number) * _BYTE_UNITS[unit]


def _api_keys(value: str) -> tuple[tuple[str, str], ...]:
    """`NAME:KEY` entries, comma or newline separated; the name says which key was used."""
    pairs: list[tuple[str, str]] = []
    for entry in value.replace("\n", ",").split(","):
        entry = entry.strip()
        if not entry or entry.startswith("#"):
            continue
        name, _, key = entry.partition(":")
        if not name.strip() or len(key.strip()) < API_KEY_MIN_LENGTH:
            raise ValueError(f"API keys are NAME:KEY with a key of at least {API_KEY_MIN_LENGTH} characters")
        pairs.append((name.strip(), key.strip()))
    return tuple(pairs)


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"not a boolean: {value!r}")


@dataclass(frozen=True, slots=True)
class _Option:
    name: str
    parse: Callable[[str], Any]
    help: str
    metavar: str | None = None
    default: str | None = None  # shown instead of the raw default when that says too little

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> tuple[str, ...]:
        """The variables that set it, strongest first."""
        return ("RTC_" + self.name.upper(), *SEED_FALLBACKS.get(self.name, ()))

    def default_text(self) -> str:
        if self.default is not None:
            return self.default
        spec = _DEFAULTS.get(self.name)
        value = None if spec is None else spec.default
        if value is None or value == ():
            return "none"
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, tuple):
            return ",".join(value)
        return str(value)


_DEFAULTS = {spec.name: spec for spec in dataclasses.fields(Settings)}

_OPTIONS: tuple[_Option, ...] = (
    _Option("host", str, "public listener address"),
    _Option("port", int, "public listener port"),
    _Option("metrics_port", int, "host aggregate metrics port (0: off)"),
    _Option("workers", int, "worker processes", default="CPUs"),
    _Option("node_id", str, "this host's id in the cluster", default="hostname"),
    _Option("redis_url", str, "redis://, rediss:// or unix:// URL", default="embedded redis-server"),
    _Option("redis_cluster", _csv, "Redis Cluster seed URLs, comma separated", "URLS"),
    _Option("jwt_secret", str, "HMAC secret for HS256/HS384/HS512 tokens (visible in ps: prefer a file)"),
    _Option("jwt_secret_file", str, "read the HMAC secret from FILE", "FILE"),
    _Option("jwt_public_key", str, "PEM public key FILE for RS, ES, PS and EdDSA tokens", "FILE"),
    _Option("jwt_algorithms", _csv, "accepted token algorithms, comma separated", "ALGS"),
    _Option("jwt_audience", str, "required `aud` claim"),
    _Option("jwt_issuer", str, "required `iss` claim"),
    _Option("allowed_origins", _csv, "comma list of allowed Origin values; others get 403", default="any"),
    _Option("trusted_proxies", _csv, "CIDRs whose X-Forwarded-For names the client"),
    _Option(
        "max_connections",
        _auto_int,
        "per-host connection cap: auto (each worker's descriptor limit less 256), N, or 0 (off); 503",
        default="auto",
    ),
    _Option("max_connections_per_ip", int, "per-client-address cap (0: off)"),
    _Option("max_message_bytes", int, "largest incoming frame in bytes; larger: close 1009"),
    _Option("max_rooms", int, "rooms joined per connection"),
    _Option("rate", float, "frames per second per connection (token bucket)"),
    _Option("rate_burst", int, "token bucket burst"),
    _Option(
        "send_queue_bytes",
        int,
        "per-connection outbound bound in bytes; past it the consumer is closed 1013, and "
        "history replays are paced to it",
        default="1048576 (1 MiB)",
    ),
    _Option("history_size", int, "messages kept per room and inbox for replay"),
    _Option("history_ttl", int, "seconds history is kept after the last message"),
    _Option("session_ttl", int, "seconds a session can be resumed after its last checkpoint"),
    _Option("presence_events_max", int, "no presence events in rooms with more members"),
    _Option("public_url", str, "WebSocket URL announced as new_endpoint on drain"),
    _Option("api_keys", _api_keys, "server API keys, NAME:KEY comma list", "KEYS", default="none (API off)"),
    _Option("api_keys_file", str, "read server API keys from FILE, one NAME:KEY a line", "FILE"),
    _Option(
        "api_rate",
        float,
        "server API requests per second per API key, host-wide (token bucket); over it 429; 0: off",
    ),
    _Option("api_burst", int, "server API token bucket burst per API key"),
    _Option("drain_batch", int, "connections closed per drain step"),
    _Option("drain_interval", float, "seconds between drain steps"),
    _Option("shutdown_timeout", float, "seconds a graceful stop may take"),
    _Option("worker_timeout", float, "seconds a worker's loop may go silent before it is replaced"),
    _Option(
        "runtime_dir",
        str,
        "metrics files and embedded Redis socket",
        default="$RUNTIME_DIRECTORY, else a private temporary directory",
    ),
    _Option("demo", _bool, "serve /demo and /demo/token, which mint tokens", default="off: never implied"),
    _Option(
        "redis_maxmemory",
        _bytes,
        "embedded Redis only: maxmemory with noeviction (a full Redis refuses writes: unavailable)",
        "SIZE",
        default="256m",
    ),
    _Option(
        "connect_rate",
        float,
        "WebSocket upgrades per second per client address; over it 429",
        default="0 (off)",
    ),
    _Option("connect_burst", int, "upgrade token bucket burst per client address"),
    _Option("log_level", str, "debug, info, warning or error"),
    _Option("log_format", str, "text or json"),
    _Option("ws_heartbeat", float, "WebSocket ping interval in seconds"),
    _Option("handshake_timeout", float, "seconds a client has to complete the upgrade"),
    _Option("conformance_echo", _bool, "serve /echo for Autobahn (tests only)"),
)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Register every setting as a flag; values stay strings until `settings_from`."""
    for option in _OPTIONS:
        text = f"{option.help} [default: {option.default_text()}; env {', '.join(option.env)}]"
        text = text.replace("%", "%%")  # argparse formats help with %
        if option.parse is _bool:
            parser.add_argument(
                option.flag, dest=option.name, action=argparse.BooleanOptionalAction, help=text
            )
        else:
            parser.add_argument(option.flag, dest=option.name, metavar=option.metavar, help=text)


def reference() -> str:
    """docs/configuration.md, made from the options table so the two cannot drift."""
    rows = [
        f"| `{o.flag}` | {', '.join(f'`{e}`' for e in o.env)} | {o.default_text()} | {o.help} |"
        for o in _OPTIONS
    ]
    return _REFERENCE.format(table="\n".join(rows))


_REFERENCE = """\
# Configuration reference

<!-- Generated from the options table in rtc/config.py by `python scripts/configdoc.py`;
tests/test_configdoc.py fails when this file and the table differ. Do not edit by hand. -->

Every setting is a flag of `rtc serve` (also accepted by `rtc check-config`) and an
environment variable. A flag beats the environment; `RTC_<NAME>` beats the older names listed
after it (`JWT_SECRET`, `REDIS_URL`, `MAX_CONNECTIONS`, `NODE_ID`, `POD_NAME`). A bad value, an
unknown flag or an unreadable file ends `rtc serve` at once with one line on stderr and exit
status 2. `rtc serve --help` prints this table's defaults and variable names too.

| flag | environment | default | meaning |
| --- | --- | --- | --- |
{table}

Booleans take `--flag`/`--no-flag`, or `1/true/yes/on` and `0/false/no/off` in the
environment. Lists are comma separated.

## Read from the environment only

| variable | meaning |
| --- | --- |
| `RUNTIME_DIRECTORY` | set by systemd (`RuntimeDirectory=`): the default `--runtime-dir` |
| `CREDENTIALS_DIRECTORY` | set by systemd (`LoadCredential=`): its `jwt-secret` is the HMAC \
secret when no other is given |
| `NOTIFY_SOCKET`, `WATCHDOG_USEC` | set by systemd (`Type=notify`, `WatchdogSec=`): readiness \
and watchdog pings |

## What the defaults mean for clients

* **History:** each room and each inbox keeps its last `--history-size` messages (1000) for
  `--history-ttl` seconds after its last message (one hour). A `join` with `since`, or a
  session resume, replays from there; anything older is announced (`recovered:false`).
* **Sessions:** a session can be resumed for `--session-ttl` seconds (300) after its last
  checkpoint; checkpoints are written every second while the connection lives.
* **Send queue:** each connection may have `--send-queue-bytes` (1 MiB) written but not yet
  taken by the kernel. A live consumer past it is closed 1013; a history replay never passes
  it: it is read and sent a page at a time (at most half the queue's worth of the largest
  message), as the client reads, however large.
"""


def settings_from(
    args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Merge defaults, environment and parsed flags into validated `Settings`."""
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    for option in _OPTIONS:
        cli_value = getattr(args, option.name, None) if args is not None else None
        if cli_value is not None:
            raw[option.name] = (
                cli_value if isinstance(cli_value, bool) else _parse(option, cli_value, option.flag)
            )
            continue
        for name in option.env:
            if environ.get(name, "") != "":
                raw[option.name] = _parse(option, environ[name], name)
                break
    secret_file = raw.pop("jwt_secret_file", None)
    raw["jwt_secret"] = _secret(raw.get("jwt_secret"), secret_file, environ)
    keys_file = raw.pop("api_keys_file", None)
    if keys_file:
        try:
            file_keys = _api_keys(_read(keys_file, "--api-keys-file"))
        except ValueError as exc:
            raise ConfigError(f"--api-keys-file: {exc}") from None
        raw["api_keys"] = (*raw.get("api_keys", ()), *file_keys)
    if raw.get("jwt_public_key"):
        raw["jwt_public_key"] = _read(raw["jwt_public_key"], "--jwt-public-key")
    if raw.get("runtime_dir") is None and environ.get("RUNTIME_DIRECTORY"):
        raw["runtime_dir"] = environ["RUNTIME_DIRECTORY"].split(":")[0]
    raw["notify_socket"] = environ.get("NOTIFY_SOCKET") or None
    raw["watchdog_usec"] = _parse(
        _Option("watchdog_usec", int, ""), environ.get("WATCHDOG_USEC", "0"), "WATCHDOG_USEC"
    )
    settings = Settings(**raw)
    _validate(settings)
    return settings


def _parse(option: _Option, value: str, source: str) -> Any:
    try:
        return option.parse(value)
    except ValueError as exc:
        if option.parse is _api_keys:  # never echo a secret to the log
            raise ConfigError(f"{source}: {exc}") from None
        raise ConfigError(f"{source}: invalid value {value!r}") from None


def _read(path: str, source: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read {path}: {exc.strerror}") from None


def _secret(secret: str | None, secret_file: str | None, environ: Mapping[str, str]) -> str | None:
    if secret_file:
        return _read(secret_file, "--jwt-secret-file")
    if secret:
        return secret
    credentials = environ.get("CREDENTIALS_DIRECTORY")
    if credentials and (Path(credentials) / "jwt-secret").is_file():
        return _read(str(Path(credentials) / "jwt-secret"), "$CREDENTIALS_DIRECTORY/jwt-secret")
    return None


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _cluster_seed(url: str) -> bool:
    """A Redis Cluster seed: redis://[user:password@]host[:port][/0]."""
    parsed = urlparse(url)
    try:
        port_ok = parsed.port != 0  # None: the default 6379
    except ValueError:  # not a number, or out of range
        return False
    return port_ok and parsed.scheme == "redis" and bool(parsed.hostname) and parsed.path in ("", "/", "/0")


def _validate(s: Settings) -> None:
    _require(1 <= s.port <= 65535, f"--port: {s.port} is not a TCP port")
    _require(0 <= s.metrics_port <= 65535, f"--metrics-port: {s.metrics_port} is not a TCP port")
    _require(s.metrics_port != s.port, "--metrics-port must differ from --port")
    _require(1 <= s.workers <= 256, f"--workers: {s.workers} is not in 1..256")
    _require(
        bool(s.node_id) and all(c.isalnum() or c in "-_." for c in s.node_id),
        f"--node-id: {s.node_id!r} may hold only letters, digits, '-', '_' and '.'",
    )
    if s.redis_url:
        scheme = urlparse(s.redis_url).scheme
        _require(scheme in {"redis", "rediss", "unix"}, f"--redis-url: unsupported scheme {scheme!r}")
    _require(not (s.redis_url and s.redis_cluster), "--redis-cluster: not together with --redis-url")
    for url in s.redis_cluster:
        _require(_cluster_seed(url), f"--redis-cluster: {url!r} is not redis://HOST[:PORT] (only db 0)")
    unknown = set(s.jwt_algorithms) - HMAC_ALGORITHMS - PUBLIC_KEY_ALGORITHMS
    _require(bool(s.jwt_algorithms) and not unknown, f"--jwt-algorithms: unsupported {sorted(unknown)}")
    hmac = set(s.jwt_algorithms) & HMAC_ALGORITHMS
    _require(
        not (hmac and set(s.jwt_algorithms) - HMAC_ALGORITHMS),
        "--jwt-algorithms: do not mix HMAC and public-key algorithms (key confusion)",
    )
    if hmac:
        _require(
            bool(s.jwt_secret), "a JWT secret is required: set JWT_SECRET, --jwt-secret or --jwt-secret-file"
        )
    else:
        _require(bool(s.jwt_public_key), "--jwt-public-key is required for public-key algorithms")
    for cidr in s.trusted_proxies:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise ConfigError(f"--trusted-proxies: {cidr!r} is not a CIDR") from None
    for name in (
        "max_connections",
        "max_connections_per_ip",
        "presence_events_max",
        "connect_rate",
        "api_rate",
    ):
        value = getattr(s, name)
        _require(value is None or value >= 0, f"--{name.replace('_', '-')} must be >= 0")
    for name in (
        "max_message_bytes",
        "max_rooms",
        "rate_burst",
        "send_queue_bytes",
        "history_size",
        "history_ttl",
        "session_ttl",
        "drain_batch",
        "connect_burst",
        "api_burst",
    ):
        _require(getattr(s, name) > 0, f"--{name.replace('_', '-')} must be > 0")
    for name in (
        "rate",
        "drain_interval",
        "shutdown_timeout",
        "worker_timeout",
        "ws_heartbeat",
        "handshake_timeout",
    ):
        _require(getattr(s, name) > 0, f"--{name.replace('_', '-')} must be > 0")
    _require(s.redis_maxmemory >= 1 << 20, "--redis-maxmemory must be at least 1 MiB")
    _require(s.log_level in {"debug", "info", "warning", "error"}, f"--log-level: {s.log_level!r}")
    _require(s.log_format in {"text", "json"}, f"--log-format: {s.log_format!r} is not text or json")
    if s.runtime_dir is not None:
        _require(
            len(os.path.join(s.runtime_dir, "redis.sock")) <= 100,
            "--runtime-dir: path too long for a Unix socket (100 bytes at most)",
        )
