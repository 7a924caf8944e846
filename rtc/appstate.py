"""What every handler of a worker's app needs: the worker's state, and who is calling."""

from __future__ import annotations

import asyncio
import ipaddress
import resource
from dataclasses import dataclass, field

from aiohttp import web

from rtc.api import ServerApi
from rtc.auth import Principal, Verifier, token_from_request
from rtc.broker.base import Broker
from rtc.config import Settings
from rtc.errors import AuthError
from rtc.hostcount import HostConnections
from rtc.node import Node

__all__ = [
    "FD_RESERVE",
    "STATE",
    "SUPERVISOR_PID",
    "UPGRADES_IN_FLIGHT",
    "WorkerState",
    "client_address",
    "principal_of",
    "require_admin",
]

_FORWARDING_HEADERS = ("X-Forwarded-For", "Forwarded", "X-Real-IP")
_STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Descriptors a worker keeps for everything but client sockets: its Redis pool (64) and
# pub/sub, the listener, metrics files, pipes, and requests still in their handshake.
FD_RESERVE = 256
# Upgrades a worker takes from the 101 to `welcome` at once; the rest wait their turn. In
# a 10,000-client storm 16 beat both 4 and 64, and no cap: 7.2 - 7.7 s against 10.5 s,
# with a lower loop ping p99 (docs/performance.md).
UPGRADES_IN_FLIGHT = 16


def _fd_capacity() -> int:
    """Client sockets this worker's descriptor limit holds after the reserve."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(1, soft - FD_RESERVE) if soft != resource.RLIM_INFINITY else 0


@dataclass(slots=True)
class WorkerState:
    """Process state of one worker, kept on the app."""

    settings: Settings
    node: Node
    broker: Broker
    verifier: Verifier
    worker: str
    slot_index: int
    host_connections: HostConnections
    draining: bool = False
    opening: int = 0  # upgrades accepted whose `welcome` is not sent yet
    upgrades: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(UPGRADES_IN_FLIGHT))
    open_count: int = 0
    drain_task: asyncio.Task[None] | None = None
    drain_generation: int = 0  # bumped by every drain and undrain: an older drain stops
    api: ServerApi | None = None  # with --api-keys: answers the cluster's server API questions
    # `--max-connections auto`: this worker's own bound (0: none) and the host's (0: none).
    worker_cap: int = field(init=False, default=0)
    host_cap: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        # auto: each worker stops at its own descriptor limit, which bounds the host too.
        if self.settings.max_connections is None:
            self.worker_cap = _fd_capacity()
        else:
            self.host_cap = self.settings.max_connections

    def full(self) -> bool:
        """No room for one more connection (503), before a descriptor runs out (EMFILE)."""
        # Sockets still in their handshake hold descriptors too: FD_RESERVE covers them.
        if self.worker_cap and self.open_count >= self.worker_cap:
            return True
        return bool(self.host_cap) and self.host_connections.total() >= self.host_cap


STATE = web.AppKey("state", WorkerState)
SUPERVISOR_PID = web.AppKey("supervisor_pid", int)


# -- who is calling ---------------------------------------------------------------------------


def client_address(request: web.Request, settings: Settings) -> str:
    """The peer, or the last untrusted hop of X-Forwarded-For behind a trusted proxy."""
    peer = request.remote or "?"
    if not settings.trusted_proxies or not _in_networks(peer, settings.trusted_proxies):
        return peer
    hops = [h.strip() for h in request.headers.get("X-Forwarded-For", "").split(",") if h.strip()]
    for hop in reversed(hops):
        if not _in_networks(hop, settings.trusted_proxies):
            return hop
    return peer


def _in_networks(address: str, networks: tuple[str, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in ipaddress.ip_network(n, strict=False) for n in networks)


def principal_of(request: web.Request, verifier: Verifier) -> Principal:
    """The verified caller of a request, from `?token=` or `Authorization: Bearer`."""
    token = token_from_request(request.query.get("token"), request.headers.get("Authorization"))
    return verifier.verify(token)


def require_admin(request: web.Request) -> None:
    """Admin token, or loopback with no forwarding header (a local operator's curl).

    Loopback trust never extends to a browser: a page on any site can make the browser on
    the host send a simple cross-site POST (no preflight), so a state-changing request that
    carries `Origin` or `Sec-Fetch-Site: cross-site` needs the admin token itself.
    """
    state = request.app[STATE]
    try:
        if principal_of(request, state.verifier).admin:
            return
    except AuthError:
        pass
    peer = request.remote or ""
    if (
        _is_loopback(peer)
        and not any(h in request.headers for h in _FORWARDING_HEADERS)
        and not _from_browser_page(request)
    ):
        return
    raise web.HTTPForbidden(text='{"error":"forbidden"}', content_type="application/json")


def _from_browser_page(request: web.Request) -> bool:
    """A state-changing request a web page made the browser send."""
    return request.method in _STATE_CHANGING and (
        "Origin" in request.headers or request.headers.get("Sec-Fetch-Site", "").lower() == "cross-site"
    )


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False
