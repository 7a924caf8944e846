"""Commands the parent sends to worker processes, and their replies (pickled over a pipe)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from bench.loadgen.stats import Histogram, Integrity

__all__ = [
    "Churn",
    "ChurnReply",
    "CloseAll",
    "CloseReply",
    "Command",
    "ConnSpec",
    "Drop",
    "DropReply",
    "Failed",
    "Open",
    "OpenReply",
    "PingReply",
    "PingSample",
    "PingStart",
    "PingStarted",
    "PingStop",
    "Ready",
    "Reply",
    "Resume",
    "Stop",
    "Traffic",
    "TrafficReply",
    "WorkerSetup",
]


class ConnSpec(NamedTuple):
    """One socket to open: where, as whom, joined to what, and who it sends to."""

    root: str  # ws://127.0.0.1:port
    user: str
    room: str | None  # room to join after the handshake
    peer: str | None  # user it sends direct messages to
    source: str  # client source address


@dataclass(frozen=True)
class WorkerSetup:
    """Fixed for a worker's life."""

    protocol: str
    jwt_secret: str
    command_timeout: float  # a worker waiting longer than this for its parent exits


@dataclass(frozen=True)
class Open:
    """Open and hold ``specs`` (handshake and join included)."""

    specs: list[ConnSpec]
    concurrency: int
    timeout: float


@dataclass
class OpenReply:
    opened: int = 0
    failed: int = 0
    resumed: int = 0  # welcomes that said `resumed: true`
    events: int = 0  # presence events the worker's sockets received meanwhile
    seconds: float = 0.0  # the worker's wall time for the whole command
    errors: Counter[str] = field(default_factory=Counter)
    connect: Histogram = field(default_factory=Histogram)


@dataclass(frozen=True)
class Drop:
    """Drop every socket ``Open`` held at once, without a close frame (a failed host)."""


@dataclass
class DropReply:
    dropped: int = 0


@dataclass(frozen=True)
class Resume:
    """Reconnect every dropped socket with ``?session=`` and wait for its room's ``joined``."""

    concurrency: int
    timeout: float


@dataclass(frozen=True)
class PingStart:
    """Open probe sockets (``specs``, no room) and ping each every ``interval`` s."""

    specs: list[ConnSpec]
    interval: float
    timeout: float


@dataclass
class PingStarted:
    ports: list[int] = field(default_factory=list)  # each connected probe's local port, in order
    failed: Counter[str] = field(default_factory=Counter)  # probes that could not connect


@dataclass(frozen=True)
class PingSample:
    """Each probe's round trips since the last sample (the probes keep pinging)."""


@dataclass(frozen=True)
class PingStop:
    """Stop pinging; reply with each probe's round-trip histogram."""


@dataclass
class PingReply:
    pongs: list[Histogram] = field(default_factory=list)


@dataclass(frozen=True)
class Traffic:
    """Send ``rate`` messages/s for ``seconds`` round-robin from the held sockets.

    After sending, wait until no delivery came for ``quiet`` seconds (at most
    ``max_wait``) so the step's deliveries are all counted in its reply.
    """

    kind: Literal["room", "direct"]
    rate: float
    seconds: float
    payload_bytes: int
    quiet: float = 0.3
    max_wait: float = 5.0


@dataclass
class TrafficReply:
    sent: int = 0
    acks: int = 0
    delivered: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latency: Histogram = field(default_factory=Histogram)  # server ts -> delivered
    e2e: Histogram = field(default_factory=Histogram)  # publisher send -> delivered
    integrity: Integrity = field(default_factory=Integrity)  # cumulative over the run
    dropped: int = 0  # held sockets the server closed, cumulative


@dataclass(frozen=True)
class Churn:
    """Connect, handshake, join, close: in a loop per spec, bounded in time and count."""

    specs: list[ConnSpec]
    seconds: float
    max_cycles: int
    timeout: float


@dataclass
class ChurnReply:
    cycles: int = 0
    failed: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    connect: Histogram = field(default_factory=Histogram)


@dataclass(frozen=True)
class CloseAll:
    """Close every held socket; the worker stays up for more commands."""


@dataclass
class CloseReply:
    closed: int = 0
    dropped: int = 0
    integrity: Integrity = field(default_factory=Integrity)


@dataclass(frozen=True)
class Stop:
    """Exit the worker process."""


@dataclass(frozen=True)
class Ready:
    """Sent once by a worker when its loop runs, so no timing includes process start-up."""


@dataclass
class Failed:
    """A command raised in the worker; the parent re-raises with this traceback."""

    traceback: str


Command = Open | Drop | Resume | Traffic | Churn | PingStart | PingSample | PingStop | CloseAll | Stop
Reply = OpenReply | DropReply | TrafficReply | ChurnReply | PingStarted | PingReply | CloseReply | Failed
