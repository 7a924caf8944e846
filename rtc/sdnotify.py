"""systemd's notify protocol in a few lines of stdlib (no dependency)."""

from __future__ import annotations

import socket

__all__ = ["Notifier"]


class Notifier:
    """Sends READY=1, STATUS=..., STOPPING=1, WATCHDOG=1 to `$NOTIFY_SOCKET`, if set."""

    def __init__(self, address: str | None) -> None:
        self._address = address
        if address and address.startswith("@"):
            self._address = "\0" + address[1:]  # abstract namespace

    def notify(self, *lines: str) -> None:
        if not self._address:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            try:
                sock.connect(self._address)
                sock.sendall("\n".join(lines).encode())
            except OSError:
                pass  # systemd gone or not listening: notification is best effort

    @property
    def enabled(self) -> bool:
        return bool(self._address)
