"""Run the shipped HAProxy and NGINX configurations on loopback, for tests.

The files under ``haproxy/`` and ``nginx/`` are the product. The render
functions here change only what a test must change (listen and backend
addresses, log and socket paths, and, with ``timeouts``, short timeouts and
check intervals) by rewriting known lines; a line that is no longer there
fails the render loudly instead of silently testing something else.

``run_haproxy`` and ``run_nginx`` start the real programs in the foreground on
127.0.0.1 in front of any backends (the echo stand-in of ``ws_echo.py`` or real
rtc hosts) and stop them by their own PID.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tests.rtcproc import free_port, stop_process, wait_for

__all__ = [
    "HAPROXY_CFG",
    "NGINX_CONF",
    "NGINX_SITE",
    "TEST_TIMEOUTS",
    "Backend",
    "ProxyTimeouts",
    "RunningProxy",
    "check_haproxy",
    "check_nginx",
    "haproxy_server_status",
    "render_haproxy",
    "render_nginx",
    "require_program",
    "run_haproxy",
    "run_nginx",
    "substitute",
]

REPO = Path(__file__).resolve().parent.parent
HAPROXY_CFG = REPO / "haproxy" / "haproxy.cfg"
NGINX_CONF = REPO / "nginx" / "nginx.conf"
NGINX_SITE = REPO / "nginx" / "rtc.conf"
LOOPBACK = "127.0.0.1"


class Backend(Protocol):
    """Where a proxy sends traffic: an rtc host or the echo stand-in."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...


@dataclass(frozen=True)
class ProxyTimeouts:
    """Short timeouts so a test can wait past them (seconds)."""

    client: float = 2.0
    server: float = 2.0
    # HAProxy's `timeout tunnel` and NGINX's proxy_read/send_timeout: the idle
    # limit after the upgrade, above the backends' 1 s WebSocket ping.
    tunnel: float = 3.0
    http_request: float = 2.0
    check_interval: float = 0.3


TEST_TIMEOUTS = ProxyTimeouts()


def require_program(name: str) -> str:
    """The program's path; a missing program fails the test, it is never skipped."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        raise AssertionError(f"{name} is not installed (apt-get install -y {name})")
    return path


def substitute(text: str, rules: Sequence[tuple[str, str]]) -> str:
    """Apply ``re.sub(pattern, replacement)`` rules (multiline); each must match."""
    for pattern, replacement in rules:
        text, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
        if count == 0:
            raise ValueError(f"render: {pattern!r} no longer matches the shipped file")
    return text


def _ms(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


def render_haproxy(
    *,
    port: int,
    stats_port: int,
    backends: Sequence[Backend],
    workdir: Path,
    timeouts: ProxyTimeouts | None = TEST_TIMEOUTS,
    affinity: bool = False,
) -> str:
    """haproxy/haproxy.cfg for loopback: logs to stdout, runtime socket in ``workdir``.

    ``affinity`` switches to the documented hash-on-user variant (the
    ``#affinity`` lines replace ``balance leastconn``).
    """

    def servers(match: re.Match[str]) -> str:
        tracked = "track" in match.group(0)
        return "".join(
            f"    server rtc{i} {b.host}:{b.port}" + (f" track be_rtc_ws/rtc{i}" if tracked else "") + "\n"
            for i, b in enumerate(backends, start=1)
        )

    text = HAPROXY_CFG.read_text()
    text = substitute(
        text,
        [
            (r"^    log /dev/log local0$", "    log stdout format raw local0"),
            (r"^    (chroot|user|group) .*\n", ""),
            (r"^    maxconn 200000$", "    maxconn 4096"),
            (
                r"^(    stats socket )/run/haproxy/admin\.sock",
                rf"\g<1>{workdir}/admin.sock",
            ),
            (r"^    bind :80$", f"    bind {LOOPBACK}:{port}"),
            (r"^    bind 127\.0\.0\.1:8404$", f"    bind {LOOPBACK}:{stats_port}"),
        ],
    )
    text, count = re.subn(r"(?:^    server rtc\d+ [^\n]*\n)+", servers, text, flags=re.MULTILINE)
    if count != 2:
        raise ValueError(f"render: expected 2 server blocks, found {count}")
    if timeouts is not None:
        check = _ms(timeouts.check_interval)
        text = substitute(
            text,
            [
                (
                    r"^    timeout client \S+$",
                    f"    timeout client {_ms(timeouts.client)}",
                ),
                (
                    r"^    timeout server \S+$",
                    f"    timeout server {_ms(timeouts.server)}",
                ),
                (
                    r"^    timeout tunnel \S+$",
                    f"    timeout tunnel {_ms(timeouts.tunnel)}",
                ),
                (
                    r"^    timeout http-request \S+$",
                    f"    timeout http-request {_ms(timeouts.http_request)}",
                ),
                (
                    r"\binter \S+ fastinter \S+ downinter \S+",
                    f"inter {check} fastinter {check} downinter {check}",
                ),
            ],
        )
    if affinity:
        text = substitute(text, [(r"^    balance leastconn\n", ""), (r"^    #affinity   ", "    ")])
    return text


def render_nginx(
    *,
    port: int,
    backends: Sequence[Backend],
    workdir: Path,
    timeouts: ProxyTimeouts | None = TEST_TIMEOUTS,
) -> Path:
    """Write nginx.conf and rtc.conf for loopback into ``workdir``; return nginx.conf.

    Runs as the invoking user (no ``user`` line), one small worker, every path
    (pid, logs, temp files) inside ``workdir``.
    """
    temp_paths = "".join(
        f"    {kind}_temp_path {workdir}/{kind}_temp;\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    main = substitute(
        NGINX_CONF.read_text(),
        [
            (r"^user .*\n", ""),
            (r"^worker_processes auto;$", "worker_processes 1;"),
            (r"^pid /run/nginx\.pid;$", f"pid {workdir}/nginx.pid;"),
            (
                r"^error_log /var/log/nginx/error\.log (\w+);$",
                rf"error_log {workdir}/error.log \1;",
            ),
            (r"^worker_rlimit_nofile \d+;$", "worker_rlimit_nofile 4096;"),
            (r"^    worker_connections \d+;$", "    worker_connections 1024;"),
            (r"^    server_tokens off;\n", "    server_tokens off;\n" + temp_paths),
        ],
    )
    upstream = "".join(f"    server {b.host}:{b.port} max_fails=1 fail_timeout=10s;\n" for b in backends)
    site = substitute(
        NGINX_SITE.read_text(),
        [
            (r"(?:^    server \d+\.\d+\.\d+\.\d+:\d+ [^\n]*\n)+", upstream),
            (r"^    listen 80 ", f"    listen {LOOPBACK}:{port} "),
            (r"/var/log/nginx/rtc\.access\.log", f"{workdir}/access.log"),
        ],
    )
    if timeouts is not None:
        client = f"{round(timeouts.client)}s"
        tunnel = f"{round(timeouts.tunnel)}s"
        site = substitute(
            site,
            [
                (
                    r"^    client_header_timeout \S+;",
                    f"    client_header_timeout {client};",
                ),
                (
                    r"^    client_body_timeout \S+;",
                    f"    client_body_timeout {client};",
                ),
                (r"^    keepalive_timeout \S+;", f"    keepalive_timeout {client};"),
                (r"^    send_timeout \S+;", f"    send_timeout {client};"),
                (
                    r"^        proxy_read_timeout \S+;",
                    f"        proxy_read_timeout {tunnel};",
                ),
                (
                    r"^        proxy_send_timeout \S+;",
                    f"        proxy_send_timeout {tunnel};",
                ),
            ],
        )
    conf = workdir / "nginx.conf"
    conf.write_text(main)
    (workdir / "rtc.conf").write_text(site)
    return conf


def check_haproxy(cfg: Path) -> subprocess.CompletedProcess[str]:
    """``haproxy -c``: exit 0 and no warning is what a test expects."""
    return subprocess.run(
        [require_program("haproxy"), "-c", "-f", str(cfg)],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )


def _nginx_argv(conf: Path) -> list[str]:
    # -e: the error log before the configuration is read (the compiled-in
    # default is under /var/log/nginx); -p: relative paths resolve to the workdir.
    workdir = conf.parent
    return [
        require_program("nginx"),
        "-p",
        f"{workdir}/",
        "-c",
        str(conf),
        "-e",
        str(workdir / "error.log"),
    ]


def check_nginx(conf: Path) -> subprocess.CompletedProcess[str]:
    """``nginx -t`` on a rendered configuration."""
    return subprocess.run(
        [*_nginx_argv(conf), "-t"],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )


@dataclass
class RunningProxy:
    kind: str
    port: int
    workdir: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    runtime_socket: Path | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{LOOPBACK}:{self.port}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def runtime(self, command: str) -> str:
        """One command on HAProxy's runtime API (stats socket)."""
        assert self.runtime_socket is not None, "only HAProxy has a runtime socket"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.runtime_socket))
            sock.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()


def haproxy_server_status(proxy: RunningProxy, backend: str, server: str) -> str:
    """UP, DOWN, MAINT, ... from ``show stat`` (first word of the status column)."""
    lines = proxy.runtime("show stat").splitlines()
    header = lines[0].lstrip("# ").split(",")
    for line in lines[1:]:
        row = dict(zip(header, line.split(","), strict=False))
        if row.get("pxname") == backend and row.get("svname") == server:
            return row["status"].split()[0]
    raise KeyError(f"{backend}/{server} not in show stat")


def _wait_listening(proc: subprocess.Popen[bytes], address: int | Path, errors: Path, what: str) -> None:
    """Until ``proc`` accepts on a loopback port or a Unix socket path (HAProxy's runtime
    socket appears after its ports do: one cannot stand for the other)."""
    family, target = (
        (socket.AF_INET, (LOOPBACK, address)) if isinstance(address, int) else (socket.AF_UNIX, str(address))
    )

    def accepting() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited {proc.returncode}: {errors.read_text()}")
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            return sock.connect_ex(target) == 0

    wait_for(accepting, 10, lambda: f"{what} to listen on {address}: {errors.read_text()}")


@contextmanager
def run_haproxy(
    workdir: Path,
    backends: Sequence[Backend],
    *,
    timeouts: ProxyTimeouts | None = TEST_TIMEOUTS,
    affinity: bool = False,
) -> Iterator[RunningProxy]:
    """HAProxy in the foreground (-db); its log lines go to ``workdir/haproxy.log``."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cfg = workdir / "haproxy.cfg"
    cfg.write_text(
        render_haproxy(
            port=port,
            stats_port=free_port(),
            backends=backends,
            workdir=workdir,
            timeouts=timeouts,
            affinity=affinity,
        )
    )
    log_path, err_path = workdir / "haproxy.log", workdir / "haproxy.err"
    with log_path.open("wb") as out, err_path.open("wb") as err:
        proc = subprocess.Popen([require_program("haproxy"), "-db", "-f", str(cfg)], stdout=out, stderr=err)
    try:
        _wait_listening(proc, port, err_path, "haproxy")
        _wait_listening(proc, workdir / "admin.sock", err_path, "haproxy")
        yield RunningProxy("haproxy", port, workdir, proc, log_path, workdir / "admin.sock")
    finally:
        stop_process(proc)


@contextmanager
def run_nginx(
    workdir: Path,
    backends: Sequence[Backend],
    *,
    timeouts: ProxyTimeouts | None = TEST_TIMEOUTS,
) -> Iterator[RunningProxy]:
    """NGINX in the foreground (daemon off); access log at ``workdir/access.log``."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = render_nginx(port=port, backends=backends, workdir=workdir, timeouts=timeouts)
    err_path = workdir / "error.log"
    with (workdir / "nginx.out").open("wb") as out:
        proc = subprocess.Popen(
            [*_nginx_argv(conf), "-g", "daemon off;"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_listening(proc, port, err_path, "nginx")
        yield RunningProxy("nginx", port, workdir, proc, workdir / "access.log")
    finally:
        stop_process(proc)
