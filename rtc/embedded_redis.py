"""A private redis-server for a host that was given no Redis (the embedded default).

It listens only on a Unix socket in the runtime directory, keeps nothing on disk, has a
`maxmemory` with `noeviction` (a full Redis refuses writes, which clients see as
`unavailable`, instead of growing until the kernel's OOM killer ends it), runs in its own
process group (Ctrl-C reaches the supervisor first) and gets SIGKILL from
the kernel if the supervisor dies (PR_SET_PDEATHSIG), so it never outlives it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from rtc.errors import ConfigError
from rtc.lifeline import die_with_parent

__all__ = ["EmbeddedRedis"]

_START_TIMEOUT = 10.0


def _die_with_parent() -> None:
    """Runs in the child between fork and exec."""
    os.setpgrp()
    die_with_parent(signal.SIGKILL)


class EmbeddedRedis:
    def __init__(self, runtime_dir: Path, maxmemory: int) -> None:
        self.socket_path = runtime_dir / "redis.sock"
        self.log_path = runtime_dir / "redis.log"  # its chatter stays out of rtc's own log
        self._dir = runtime_dir
        self._maxmemory = maxmemory
        self._process: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ConfigError("redis-server not found on PATH (install it, or set --redis-url)")
        self.socket_path.unlink(missing_ok=True)
        self._process = subprocess.Popen(
            [
                binary,
                "--port",
                "0",
                "--unixsocket",
                str(self.socket_path),
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "no",
                "--maxmemory",
                str(self._maxmemory),
                "--maxmemory-policy",
                "noeviction",
                "--dir",
                str(self._dir),
                "--loglevel",
                "warning",
                "--logfile",
                str(self.log_path),
                "--daemonize",
                "no",
            ],
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + _START_TIMEOUT
        while not self._answers_ping():
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise ConfigError(f"the embedded redis-server did not start (see {self.log_path})")
            time.sleep(0.02)

    def _answers_ping(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(1.0)
                sock.connect(str(self.socket_path))
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def died(self) -> bool:
        return self._process is not None and self._process.poll() is not None

    def restart(self) -> None:
        """Start again after a death; the workers see new room epochs (history is gone)."""
        self.restarts += 1
        self.start()

    def stop(self, timeout: float = 5.0) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
