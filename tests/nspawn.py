"""A Debian machine booted with systemd as PID 1 (systemd-nspawn), with rtc installed in it
the way docs/deploy.md tells an operator to.

The Debian root is built once per machine with debootstrap and cached under
``/var/cache/rtc-nspawn/<key>`` (the key hashes the release and the package list);
every test run copies it, installs the wheel built from this checkout and the shipped
files from ``systemd/`` unchanged, and boots the copy with a private network (loopback
only: rtc's 0.0.0.0 listeners are reachable from nowhere else).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from tests.rtcproc import stop_process, wait_for

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("RTC_NSPAWN_CACHE", "/var/cache/rtc-nspawn"))
RELEASE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# What docs/deploy.md section 1 installs, plus systemd as init and ps/ip for the checks.
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "python3",
    "python3-venv",
    "redis-server",
    "curl",
    "jq",
    "procps",
    "iproute2",
)
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _run(argv: Sequence[str], timeout: float = 600, **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result  # type: ignore[no-any-return]


def cached_root() -> Path:
    """The debootstrapped root for PACKAGES, built on first use (about a minute)."""
    key = hashlib.sha256(f"{RELEASE} {MIRROR} minbase {' '.join(PACKAGES)}".encode()).hexdigest()[:16]
    root = CACHE / key
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build per machine, even with parallel runs
        if not (root / "etc" / "os-release").exists():
            building = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=CACHE))
            building.chmod(0o755)  # it becomes the container's "/": mkdtemp's 0700 locks out every user
            try:
                started = time.monotonic()
                _run(
                    [
                        "debootstrap",
                        "--variant=minbase",
                        f"--include={','.join(PACKAGES)}",
                        RELEASE,
                        str(building),
                        MIRROR,
                    ],
                    timeout=1200,
                )
                building.rename(root)
                print(f"built {root} in {time.monotonic() - started:.0f}s")
            finally:
                shutil.rmtree(building, ignore_errors=True)
    return root


def _wheelhouse(dest: Path) -> None:
    """The wheel of this checkout and its dependencies, for an offline install in the root."""
    _run([sys.executable, "-m", "pip", "-q", "wheel", "-w", str(dest), str(REPO)])


def install_rtc(root: Path) -> None:
    """docs/deploy.md section 1, with the wheel built here and the shipped files unchanged."""
    wheels = root / "tmp" / "wheels"
    wheels.mkdir(parents=True)
    _wheelhouse(wheels)
    chroot = ["chroot", str(root), "env", "-i", f"PATH={PATH}"]
    _run([*chroot, "python3", "-m", "venv", "/opt/rtc"])
    install = [
        *chroot,
        "/opt/rtc/bin/pip",
        "install",
        "-q",
        "--no-index",
        "--find-links",
        "/tmp/wheels",
        "rtc-server",
    ]
    # The root's Python is Debian's (3.11.2): its markers may want a wheel the host's did not.
    for _ in range(5):
        result = subprocess.run(install, check=False, capture_output=True, text=True, timeout=300)
        if result.returncode == 0:
            break
        missing = re.search(r"No matching distribution found for ([^;\s]+)", result.stderr)
        if missing is None:
            raise RuntimeError(result.stderr)
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "-q",
                "download",
                "--only-binary=:all:",
                "-d",
                str(wheels),
                missing.group(1),
            ]
        )
    else:
        raise RuntimeError(result.stderr)
    shutil.rmtree(wheels)
    (root / "usr/local/bin/rtc").symlink_to("/opt/rtc/bin/rtc")
    systemd = REPO / "systemd"
    shutil.copy(systemd / "rtc.service", root / "etc/systemd/system/rtc.service")
    (root / "etc/rtc").mkdir(mode=0o700)
    shutil.copy(systemd / "rtc.env.example", root / "etc/rtc/rtc.env")
    (root / "etc/rtc/rtc.env").chmod(0o600)
    secret = root / "etc/rtc/jwt-secret"
    secret.write_text(_run(["sh", "-c", "head -c 48 /dev/urandom | base64"]).stdout)
    secret.chmod(0o600)
    shutil.copy(systemd / "99-rtc.conf", root / "etc/sysctl.d/99-rtc.conf")
    shutil.copy(systemd / "90-rtc-nofile.conf", root / "etc/security/limits.d/90-rtc-nofile.conf")
    _run([*chroot, "systemctl", "enable", "rtc"])
    _run([*chroot, "systemctl", "disable", "redis-server"])  # as docs/deploy.md: rtc runs its own


@dataclass
class Machine:
    """A booted container: commands run inside through nsenter into its leader's namespaces."""

    root: Path
    process: subprocess.Popen[bytes]
    leader: int
    console: Path

    def command(self, *argv: str) -> list[str]:
        """``argv`` run inside, as root, with a clean environment."""
        return ["nsenter", "-t", str(self.leader), "-a", "env", "-i", f"PATH={PATH}", *argv]

    def run(self, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self.command(*argv),
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {result.returncode}: {result.stdout}{result.stderr}"
            )
        return result

    def out(self, *argv: str) -> str:
        return self.run(*argv).stdout.strip()

    def host_command_in_network(self, argv: Sequence[str], **kwargs: object) -> subprocess.Popen[str]:
        """A program of this machine's host (the test's Python) inside the container's network."""
        return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
            ["nsenter", "-t", str(self.leader), "-n", *argv], text=True, cwd=REPO, **kwargs
        )

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        text = self.out("systemctl", "show", unit, *(f"-p{p}" for p in properties))
        return dict(line.split("=", 1) for line in text.splitlines())

    def journal(self, unit: str | None, since: str = "") -> str:
        """The journal of `unit`, or (None) all of it: a process that exits at once may log
        before journald learns its unit, and `-u` misses such a line."""
        args = ["journalctl", *(["-u", unit] if unit else []), "--no-pager", "-o", "short-precise"]
        return self.out(*args, *(["--since", since] if since else []))


@contextlib.contextmanager
def booted(root: Path) -> Iterator[Machine]:
    """Boot ``root`` with systemd as PID 1; power it off afterwards."""
    console = root.parent / (root.name + ".console")
    # nspawn wants /run/systemd/nspawn on a tmpfs; give it one in a mount namespace of its own,
    # leaving the host's /run alone.
    script = (
        "mkdir -p /run/systemd/nspawn && mount -t tmpfs tmpfs /run/systemd/nspawn && "
        'exec systemd-nspawn --boot --register=no --keep-unit --private-network --quiet -D "$0" '
        "-M rtc-test --console=pipe"
    )
    with open(console, "wb") as log:
        process = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(root)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def leader() -> int:
        if process.poll() is not None:
            raise RuntimeError(f"systemd-nspawn exited {process.returncode}:\n{console.read_text()}")
        children = [c for c in psutil.Process(process.pid).children() if c.name() == "systemd"]
        return children[0].pid if children else 0

    try:
        machine = Machine(root, process, wait_for(leader, 30, "the container's systemd"), console)
        # systemctl talks to PID 1 over /run/systemd/private, which appears a moment after boot.
        wait_for(
            lambda: machine.run("test", "-S", "/run/systemd/private", check=False).returncode == 0,
            60,
            "PID 1's socket",
        )
        state = machine.run("systemctl", "is-system-running", "--wait", check=False, timeout=120)
        assert state.stdout.strip() in ("running", "degraded"), state
        yield machine
    finally:
        if process.poll() is None:
            with contextlib.suppress(Exception):
                subprocess.run(
                    ["nsenter", "-t", str(leader()), "-a", "systemctl", "poweroff"], timeout=10, check=False
                )
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(30)
        stop_process(process)
