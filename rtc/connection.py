"""One client connection: who it is, what it joined, and its one bounded way out.

Outgoing frames are written straight to the connection's transport; the transport's
write buffer is the connection's send queue, and the event loop is its one writer. When
that buffer passes `--send-queue-bytes` the consumer is too slow: it is closed with
1013 and nothing waits on it. A broadcast therefore never blocks on one socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from typing import TYPE_CHECKING

from aiohttp import web

from rtc import metrics
from rtc.errors import CloseCode, ErrorCode
from rtc.protocol import RequestId, encode_error, wire_text
from rtc.ratelimit import AbuseWindow, TokenBucket
from rtc.routing.checkpoint import Checkpoint, Marks

if TYPE_CHECKING:
    from rtc.auth import Principal

__all__ = ["Connection"]

log = logging.getLogger("rtc.connection")

_ids = itertools.count(1)
_CLOSE_FLUSH_SECONDS = 5.0


class Connection:
    """State of one WebSocket; the routing layer delivers to it with `send_wire`."""

    __slots__ = (
        "_limit",
        "_worker",
        "abuse",
        "bucket",
        "busy",
        "checkpoint",
        "closing",
        "id",
        "peer",
        "principal",
        "quiet",
        "replays",
        "rooms",
        "session",
        "transport",
        "welcomed",
        "ws",
    )

    def __init__(
        self,
        ws: web.WebSocketResponse,
        transport: asyncio.Transport,
        principal: Principal,
        session: str,
        peer: str,
        bucket: TokenBucket,
        send_queue_bytes: int,
        worker: str,
    ) -> None:
        self.id = next(_ids)
        self.ws = ws
        self.transport = transport
        self.principal = principal
        self.session = session
        self.peer = peer
        self.bucket = bucket
        self.abuse: AbuseWindow | None = None  # made on the first denial: most never need it
        self.rooms: set[str] = set()
        self.checkpoint = Checkpoint()  # what its session may claim was delivered
        self.replays: dict[str, asyncio.Task[None]] = {}  # rooms whose replay is being sent
        self.closing = False
        self.welcomed = False
        self.quiet = 0  # keep-alive sweeps since a frame last arrived (`rtc.keepalive`)
        self.busy = False  # a command of its own is running (waiting on Redis, say)
        self._limit = send_queue_bytes
        self._worker = worker

    @property
    def user(self) -> str:
        return self.principal.user

    def send(self, payload: bytes) -> None:
        """Send one JSON frame (a reply or an event)."""
        self.send_wire(wire_text(payload))

    def send_error(self, code: ErrorCode, message: str, request_id: RequestId = None) -> None:
        """An `error` frame, counted by code."""
        metrics.ERROR_FRAMES.labels(code.value).inc()
        metrics.ERRORS.inc()
        self.send(encode_error(code, message, request_id))

    def send_wire(self, wire: bytes) -> None:
        """Write an already framed message; close the consumer if it cannot keep up."""
        self._write(wire)

    def deliver(self, room: str, wire: bytes, marks: Marks) -> None:
        """Room frames (ending at `marks`): written, and marked for the session checkpoint."""
        buffered = self._write(wire)
        if buffered is not None:
            self.checkpoint.reached(room, marks, buffered)

    def reached(self, room: str, seq: int) -> None:
        """What was written so far brings `room` up to `seq` (a replay was sent)."""
        if not self.closing:
            self.checkpoint.reached(room, ((0, seq),), self.transport.get_write_buffer_size())

    def _write(self, wire: bytes) -> int | None:
        """The bytes still buffered after writing `wire`; None when nothing was written."""
        if self.closing or self.transport.is_closing():
            return None  # the peer is gone (e.g. a reset): the handler's `detach` follows
        self.transport.write(wire)
        self.checkpoint.written += len(wire)
        buffered = self.transport.get_write_buffer_size()
        if buffered > self._limit:
            metrics.SLOW_CONSUMERS.labels(self._worker).inc()
            log.info("slow consumer closed", extra={"conn": self.id, "user": self.user})
            self.close_soon(CloseCode.TRY_AGAIN, "slow consumer")
        return buffered

    async def drained(self, limit: int) -> None:
        """Until at most `limit` bytes wait in the send buffer (or the socket is going).

        Polled: the transport's flow control belongs to aiohttp's writer, and only replays
        wait here, so a 10 ms tick costs nothing that matters.
        """
        while self.transport.get_write_buffer_size() > limit and not (  # noqa: ASYNC110 (see above)
            self.closing or self.transport.is_closing()
        ):
            await asyncio.sleep(0.01)

    def close_soon(self, code: int, reason: str) -> None:
        """Start a close handshake; abort the transport if it cannot finish in time."""
        if self.closing:
            return
        self.closing = True
        asyncio.get_running_loop().create_task(self._close(code, reason))

    async def _close(self, code: int, reason: str) -> None:
        try:
            async with asyncio.timeout(_CLOSE_FLUSH_SECONDS):
                await self.ws.close(code=code, message=reason.encode())
        except (TimeoutError, ConnectionError):
            self.transport.abort()
        with contextlib.suppress(Exception):
            if not self.ws.closed:
                self.transport.abort()
