"""A load-generator worker process: one uvloop event loop holding many sockets.

The parent sends one command at a time over a pipe and waits for the reply, so the
workers of a run move in lockstep. A worker exits when told to, when its parent goes
away (EOF on the pipe), or when no command came for ``command_timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
import traceback
from dataclasses import replace
from multiprocessing.connection import Connection

import aiohttp
import uvloop

from bench.loadgen import protocols
from bench.loadgen.commands import (
    Churn,
    ChurnReply,
    CloseAll,
    CloseReply,
    Command,
    ConnSpec,
    Failed,
    Open,
    OpenReply,
    Ready,
    Reply,
    Stop,
    Traffic,
    TrafficReply,
    WorkerSetup,
)
from bench.loadgen.protocols import Frame, Kind
from bench.loadgen.stats import Integrity, SeqChecker
from bench.loadgen.system import mint_token, raise_nofile_limit

__all__ = ["run"]

_MAX_FRAME = 4 * 1024 * 1024
_WS_TIMEOUT = aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0)
_CLOSE_CONCURRENCY = 500
_MIN_PAUSE = 0.002
_MAX_BURST = 500  # sends before yielding to the loop when the sender falls behind


class HandshakeError(Exception):
    """The server refused or broke the handshake; ``args[0]`` is a short reason."""


def _reason(exc: BaseException) -> str:
    """A short, countable name for a connect failure."""
    if isinstance(exc, aiohttp.WSServerHandshakeError):
        return f"http_{exc.status}"
    if isinstance(exc, HandshakeError):
        return str(exc.args[0])
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, OSError) and exc.errno:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return type(exc).__name__


class Client:
    """One held socket and what its deliveries are checked against."""

    __slots__ = ("checker", "closing", "spec", "ws")

    def __init__(self, spec: ConnSpec, ws: aiohttp.ClientWebSocketResponse, checker: SeqChecker):
        self.spec = spec
        self.ws = ws
        self.checker = checker
        self.closing = False


class Worker:
    """Executes the parent's commands; see :mod:`bench.loadgen.commands`."""

    def __init__(self, conn: Connection, setup: WorkerSetup) -> None:
        self._conn = conn
        self._setup = setup
        self._proto = protocols.get(setup.protocol)
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        self._clients: list[Client] = []
        self._readers: set[asyncio.Task[None]] = set()
        self._integrity = Integrity()
        self._tally = TrafficReply()
        self._dropped = 0
        self._last_delivery = 0.0

    async def serve(self) -> None:
        """Answer commands until told to stop."""
        self._conn.send(Ready())
        try:
            while not isinstance(command := await self._receive(), Stop):
                try:
                    reply = await self._dispatch(command)
                except Exception:  # the parent reports it and ends the run
                    reply = Failed(traceback.format_exc())
                self._conn.send(reply)
        finally:
            await self._close_all(CloseAll())
            for session in self._sessions.values():
                await session.close()

    async def _dispatch(self, command: Command) -> Reply:
        match command:
            case Open():
                return await self._open(command)
            case Traffic():
                return await self._traffic(command)
            case Churn():
                return await self._churn(command)
            case CloseAll():
                return await self._close_all(command)
        raise TypeError(f"unexpected command {command!r}")

    async def _receive(self) -> Command:
        """The next command, without blocking the loop while waiting for it."""
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        fd = self._conn.fileno()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(fd, wake)
        try:
            await asyncio.wait_for(ready, self._setup.command_timeout)
        finally:
            loop.remove_reader(fd)
            # The loop made the pipe non-blocking; a large command arrives in chunks.
            os.set_blocking(fd, True)
        command: Command = self._conn.recv()
        return command

    def _session(self, source: str) -> aiohttp.ClientSession:
        """One session per source address: a connector binds every socket to it."""
        session = self._sessions.get(source)
        if session is None:
            connector = aiohttp.TCPConnector(local_addr=(source, 0), limit=0)
            session = aiohttp.ClientSession(connector=connector)
            self._sessions[source] = session
        return session

    async def _handshake(self, spec: ConnSpec, checker: SeqChecker) -> aiohttp.ClientWebSocketResponse:
        """Connect, wait for the welcome, join ``spec.room`` and note its seq."""
        token = mint_token(self._setup.jwt_secret, spec.user)
        ws = await self._session(spec.source).ws_connect(
            self._proto.url(spec.root, token), compress=0, max_msg_size=_MAX_FRAME, timeout=_WS_TIMEOUT
        )
        try:
            if hello := self._proto.hello(token):
                await ws.send_str(hello)
            await self._expect(ws, spec.user, Kind.READY)
            if spec.room is not None:
                await ws.send_str(self._proto.join(spec.room))
                joined = await self._expect(ws, spec.user, Kind.JOINED)
                checker.start(joined.key, joined.seq)
        except BaseException:
            await ws.close()
            raise
        return ws

    async def _expect(self, ws: aiohttp.ClientWebSocketResponse, user: str, kind: Kind) -> Frame:
        """Read frames until one of ``kind``; the caller bounds it with a timeout."""
        while True:
            msg = await ws.receive()
            if msg.type is not aiohttp.WSMsgType.TEXT:
                raise HandshakeError(f"closed_{ws.close_code}")
            frame = self._proto.decode(msg.data, user)
            if frame.kind is kind:
                return frame
            if frame.kind is Kind.ERROR:
                raise HandshakeError(frame.key)
            if frame.kind is Kind.REPLY:
                await ws.send_str(frame.reply)

    async def _open(self, command: Open) -> OpenReply:
        reply = OpenReply()
        gate = asyncio.Semaphore(command.concurrency)
        loop = asyncio.get_running_loop()

        async def open_one(spec: ConnSpec) -> None:
            async with gate:
                started = loop.time()
                checker = SeqChecker(self._integrity)
                try:
                    async with asyncio.timeout(command.timeout):
                        ws = await self._handshake(spec, checker)
                except (OSError, TimeoutError, aiohttp.ClientError, HandshakeError) as exc:
                    reply.failed += 1
                    reply.errors[_reason(exc)] += 1
                    return
                reply.connect.add((loop.time() - started) * 1000.0)
                reply.opened += 1
                client = Client(spec, ws, checker)
                self._clients.append(client)
                task = asyncio.create_task(self._read(client))
                self._readers.add(task)
                task.add_done_callback(self._readers.discard)

        await asyncio.gather(*(open_one(spec) for spec in command.specs))
        return reply

    async def _read(self, client: Client) -> None:
        """The per-socket hot path: decode, time, check order, count."""
        user = client.spec.user
        decode = self._proto.decode
        try:
            async for msg in client.ws:
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    break
                tally = self._tally
                try:
                    frame = decode(msg.data, user)
                except (ValueError, KeyError, TypeError, IndexError):
                    tally.errors["bad_frame"] += 1
                    continue
                kind = frame.kind
                if kind is Kind.DELIVERY:
                    now = time.time() * 1000.0
                    tally.delivered += 1
                    tally.latency.add(now - frame.ts)
                    if frame.sent:
                        tally.e2e.add(now - frame.sent)
                    client.checker.observe(frame.key, frame.seq)
                    self._last_delivery = now
                elif kind is Kind.ACK:
                    tally.acks += 1
                elif kind is Kind.ERROR:
                    tally.errors[frame.key] += 1
                elif kind is Kind.REPLY:
                    await client.ws.send_str(frame.reply)
        except (ConnectionError, aiohttp.ClientError):
            pass
        if not client.closing:
            self._dropped += 1

    async def _traffic(self, command: Traffic) -> TrafficReply:
        self._tally = TrafficReply()
        self._last_delivery = time.time() * 1000.0
        wanted = "room" if command.kind == "room" else "peer"
        senders = [c for c in self._clients if not c.ws.closed and getattr(c.spec, wanted) is not None]
        if senders and command.rate > 0:
            await self._send_paced(command, senders)
        await self._settle(command.quiet, command.max_wait)
        reply = self._tally
        reply.integrity = self._integrity_now()
        reply.dropped = self._dropped
        return reply

    async def _send_paced(self, command: Traffic, senders: list[Client]) -> None:
        """Send at ``command.rate`` for ``command.seconds``, round-robin over ``senders``.

        The schedule is absolute (message i is due at start + i/rate), so a late
        wake-up sends the backlog instead of silently lowering the rate.
        """
        loop = asyncio.get_running_loop()
        tally = self._tally
        pad = "x" * command.payload_bytes
        total = int(command.rate * command.seconds)
        start = loop.time()
        deadline = start + command.seconds
        encode = self._proto.publish if command.kind == "room" else self._proto.direct
        while tally.sent < total and (now := loop.time()) < deadline:
            due = min(total, int((now - start) * command.rate) + 1)
            for _ in range(min(due - tally.sent, _MAX_BURST)):
                client = senders[tally.sent % len(senders)]
                target = client.spec.room if command.kind == "room" else client.spec.peer
                data = {"t": time.time() * 1000.0, "pad": pad}
                tally.sent += 1
                try:
                    await client.ws.send_str(encode(target or "", data))
                except (ConnectionError, aiohttp.ClientError):
                    tally.errors["send_failed"] += 1
            # Never below the timer resolution (1 ms in uvloop): a shorter sleep
            # returns at once and the loop would spin; the backlog goes out in bursts.
            next_due = start + tally.sent / command.rate
            pause = max(next_due - loop.time(), _MIN_PAUSE)
            await asyncio.sleep(min(pause, deadline - loop.time(), 0.05))

    async def _settle(self, quiet: float, max_wait: float) -> None:
        """Wait for in-flight deliveries: until ``quiet`` s without one, at most ``max_wait``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max_wait
        while loop.time() < deadline:
            idle = time.time() - self._last_delivery / 1000.0
            if idle >= quiet:
                return
            await asyncio.sleep(min(quiet - idle, deadline - loop.time()))

    def _integrity_now(self) -> Integrity:
        """Findings so far, counting still-missing seqs as gaps."""
        outstanding = sum(c.checker.outstanding() for c in self._clients)
        return replace(self._integrity, gaps=self._integrity.gaps + outstanding)

    async def _churn(self, command: Churn) -> ChurnReply:
        reply = ChurnReply()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + command.seconds
        budget = [command.max_cycles]

        async def cycle(spec: ConnSpec) -> None:
            while loop.time() < deadline and budget[0] > 0:
                budget[0] -= 1
                started = loop.time()
                try:
                    async with asyncio.timeout(command.timeout):
                        ws = await self._handshake(spec, SeqChecker(Integrity()))
                        reply.connect.add((loop.time() - started) * 1000.0)
                        await ws.close()
                except (OSError, TimeoutError, aiohttp.ClientError, HandshakeError) as exc:
                    reply.failed += 1
                    reply.errors[_reason(exc)] += 1
                    await asyncio.sleep(0.05)  # a refusing server is not hammered
                    continue
                reply.cycles += 1

        await asyncio.gather(*(cycle(spec) for spec in command.specs))
        return reply

    async def _close_all(self, _command: CloseAll) -> CloseReply:
        reply = CloseReply(integrity=self._integrity_now())
        gate = asyncio.Semaphore(_CLOSE_CONCURRENCY)

        async def close(client: Client) -> None:
            async with gate:
                client.closing = True
                await client.ws.close()

        clients, self._clients = self._clients, []
        # A socket that fails to close cleanly is gone anyway.
        await asyncio.gather(*(close(c) for c in clients), return_exceptions=True)
        for task in list(self._readers):
            task.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        reply.closed = len(clients)
        reply.dropped, self._dropped = self._dropped, 0
        self._integrity = Integrity()
        return reply


def run(conn: Connection, setup: WorkerSetup) -> None:
    """Process entry point (spawned by :class:`bench.loadgen.fleet.Fleet`)."""
    raise_nofile_limit()
    uvloop.run(Worker(conn, setup).serve())
