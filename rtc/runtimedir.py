"""The runtime directory belongs to one host: checked before anything in it is trusted.

It holds the metrics files every worker writes and the embedded Redis socket, so a
directory another user owns or may write to would let that user plant or read them, and
one another live host uses would mix two hosts' metrics and Redis. The lock is an
`flock` on a file inside, held by the supervisor (and inherited by its workers) for the
host's life: the kernel drops it when they exit, however they exit.
"""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

from rtc.errors import ConfigError

__all__ = ["claim"]

LOCK_NAME = "rtc.lock"


def claim(path: Path) -> int:
    """Check `path` is ours alone and lock it; returns the lock's descriptor (keep it open)."""
    info = os.stat(path)
    if info.st_uid != os.geteuid():
        raise ConfigError(
            f"--runtime-dir: {path} is owned by uid {info.st_uid}, not by this user ({os.geteuid()})"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(
            f"--runtime-dir: {path} is writable by others "
            f"(mode {stat.S_IMODE(info.st_mode):o}): use 0700 or 0750"
        )
    fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ConfigError(
            f"--runtime-dir: {path} is in use by another live rtc host (pid {holder})"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
