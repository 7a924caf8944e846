"""Process and address plumbing: fd limits, loopback-only URLs, source addresses, tokens."""

from __future__ import annotations

import ipaddress
import resource
import socket
import time
from urllib.parse import urlsplit

import jwt

__all__ = ["check_loopback", "free_port", "mint_token", "raise_nofile_limit", "source_address"]

# The first client source address: 127.0.0.1 is left to the servers.
_FIRST_SOURCE = ipaddress.IPv4Address("127.0.0.2")


def raise_nofile_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit; every socket is a descriptor."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def check_loopback(url: str) -> str:
    """Return ``url`` without a trailing slash, or raise if its host is not 127.x.x.x.

    The load generator must never send traffic off the machine.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "http"):
        raise ValueError(f"{url}: scheme must be ws:// or http://")
    try:
        host = ipaddress.IPv4Address(parts.hostname or "")
    except ValueError:
        raise ValueError(f"{url}: host must be a 127.x.x.x address") from None
    if not host.is_loopback:
        raise ValueError(f"{url}: only 127.x.x.x targets are allowed")
    return f"ws://{parts.netloc}"


def source_address(index: int, per_source: int) -> str:
    """Client source address for the ``index``-th socket of a run.

    One source address has ~28k ephemeral ports (a bound port 0 is unique per
    address), so sockets are spread ``per_source`` at a time over 127.0.0.2, .3, ...
    """
    return str(_FIRST_SOURCE + index // per_source)


def free_port(avoid: int = 0) -> int:
    """A TCP port free on 127.0.0.1 right now, other than ``avoid`` (picked, not bound yet)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port != avoid:
            return port


def mint_token(secret: str, user: str, ttl: float = 3600.0) -> str:
    """An HS256 token with the claims rtc requires (``sub``, ``exp``)."""
    return jwt.encode({"sub": user, "exp": int(time.time() + ttl)}, secret, algorithm="HS256")
