"""Children that must not outlive the supervisor ask the kernel for a signal when it dies."""

from __future__ import annotations

import ctypes
import signal

__all__ = ["die_with_parent"]

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(signum: signal.Signals) -> None:
    """Have the kernel send `signum` to this process when its parent exits (Linux prctl)."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signum)
