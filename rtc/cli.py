"""`rtc serve | check-config | token | drain | status`."""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from rtc import __version__
from rtc.config import Settings, add_serve_arguments, settings_from
from rtc.errors import ConfigError, ExitStatus

__all__ = ["SECRET_IN_ARGV", "main"]

# Workers are forked, so every one of them shows the supervisor's command line too.
SECRET_IN_ARGV = (
    "--jwt-secret on the command line is visible to every local user (ps, /proc/PID/cmdline) "
    "for the supervisor and each worker: use --jwt-secret-file FILE or the jwt-secret "
    "credential ($CREDENTIALS_DIRECTORY) instead"
)


class _Parser(argparse.ArgumentParser):
    """Argument errors are one line on stderr and exit 2, like every bad setting."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rtc", description="Real-time Communication Service")
    parser.add_argument("--version", action="version", version=f"rtc {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    serve = commands.add_parser("serve", help="run the supervisor and its workers")
    add_serve_arguments(serve)
    check = commands.add_parser("check-config", help="validate the settings and exit 0 or 2")
    add_serve_arguments(check)
    token = commands.add_parser(
        "token",
        help="print a signed token (HS256 with the service's secret)",
        description="Print a JWT signed with the HMAC secret rtc verifies. On a host the secret "
        "is root-only: run as root with --jwt-secret-file /etc/rtc/jwt-secret (the unit's "
        "credential is not visible outside the service); JWT_SECRET or RTC_JWT_SECRET work too. "
        "The other `rtc serve` settings are accepted and ignored, except --jwt-algorithms.",
    )
    add_serve_arguments(token)
    token.add_argument("--user", required=True, help="the subject (`sub` claim): who connects")
    token.add_argument(
        "--rooms",
        nargs="*",
        metavar="PATTERN",
        help="rooms the token may join, as glob patterns (`news`, `team.*`); default: no claim, any room",
    )
    token.add_argument(
        "--admin", action="store_true", help="add `admin: true`: the /admin API and the dashboard"
    )
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")
    for name, text, timeout, wait in (
        ("drain", "drain a host and wait, printing progress", 300.0, "for the drain to finish"),
        ("status", "print the host's JSON summary (GET /metrics)", 10.0, "for the answer"),
    ):
        sub = commands.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        sub.add_argument(
            "--url", default="http://127.0.0.1:8081", help="the host's own port (default %(default)s)"
        )
        sub.add_argument(
            "--timeout", type=float, default=timeout, help=f"seconds to wait {wait} (default %(default)s)"
        )
        sub.add_argument(
            "--token-file",
            metavar="FILE",
            help="admin token (`rtc token --admin`) sent as a Bearer header: needed unless the "
            "host is reached on its own loopback",
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        match args.command:
            case "serve":
                return _serve(settings_from(args), secret_in_argv=args.jwt_secret is not None)
            case "check-config":
                settings = settings_from(args)
                if args.jwt_secret is not None:
                    print(f"rtc: warning: {SECRET_IN_ARGV}", file=sys.stderr)
                print(
                    f"rtc: configuration ok ({settings.workers} workers on {settings.host}:{settings.port})"
                )
                return 0
            case "token":
                return _token(settings_from(args), args)
            case "drain":
                return _drain(args.url, args.timeout, _admin_token(args.token_file))
            case "status":
                status = _request("GET", args.url + "/metrics", _admin_token(args.token_file), args.timeout)
                print(json.dumps(status, indent=2))
                return 0
    except ConfigError as exc:
        print(f"rtc: {exc}", file=sys.stderr)
        return ExitStatus.CONFIG
    except (urllib.error.URLError, OSError) as exc:
        print(f"rtc: {args.url}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
        return ExitStatus.FAILURE
    return ExitStatus.CONFIG


def _serve(settings: Settings, *, secret_in_argv: bool) -> int:
    import logging

    from rtc.log import setup_logging
    from rtc.supervisor import Supervisor

    setup_logging(settings, worker="-")
    if secret_in_argv:
        logging.getLogger("rtc.cli").warning(SECRET_IN_ARGV)
    return Supervisor(settings).run()


def _token(settings: Settings, args: argparse.Namespace) -> int:
    from rtc.auth import mint

    if not settings.jwt_secret:
        raise ConfigError(
            "rtc token needs the HMAC secret: --jwt-secret-file FILE (/etc/rtc/jwt-secret on a host)"
        )
    print(
        mint(
            settings.jwt_secret,
            args.user,
            now=time.time(),
            ttl=args.ttl,
            rooms=args.rooms,
            admin=args.admin,
            algorithm=settings.jwt_algorithms[0],
        )
    )
    return 0


def _admin_token(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"--token-file: cannot read {path}: {exc.strerror}") from None
    if not token:
        raise ConfigError(f"--token-file: {path} is empty")
    return token


def _request(method: str, url: str, token: str | None, timeout: float = 10) -> Any:
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, method=method, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _drain(url: str, timeout: float, token: str | None) -> int:
    """POST /admin/drain, then poll until the host reports the drain done."""
    url = url.rstrip("/")
    started = _request("POST", url + "/admin/drain", token)
    print(f"draining {started['draining']} connections on {url}", flush=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        report = _request("GET", url + "/admin/drain", token)
        print(
            f"  active={report['active_connections']} migrated={report['migrated']} "
            f"failed={report['failed']}",
            flush=True,
        )
        if report["done"] and report["active_connections"] == 0:
            print(
                f"drained in {report['seconds']:.2f}s: {report['migrated']} migrated, "
                f"{report['failed']} failed"
            )
            return 0
        time.sleep(0.5)
    print("rtc: drain did not finish in time", file=sys.stderr)
    return ExitStatus.FAILURE
