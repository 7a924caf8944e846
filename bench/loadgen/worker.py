"""A load-generator worker process: one uvloop event loop holding many sockets.

Sockets are picows clients: the frame parser and the masking are compiled, and a
frame reaches ``on_ws_frame`` as a callback, with no task and no future per socket.
That keeps the generator well below the server's cost per socket, so what is
measured is the server (aiohttp's client spent more CPU per handshake than the server
it measured).

The parent sends one command at a time over a pipe and waits for the reply, so the
workers of a run move in lockstep. A worker exits when told to, when its parent goes
away (EOF on the pipe), or when no command came for ``command_timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import socket
import time
import traceback
from dataclasses import replace
from multiprocessing.connection import Connection

import picows
import uvloop

from bench.loadgen import protocols
from bench.loadgen.commands import (
    Churn,
    ChurnReply,
    CloseAll,
    CloseReply,
    Command,
    ConnSpec,
    Drop,
    DropReply,
    Failed,
    Open,
    OpenReply,
    PingReply,
    PingSample,
    PingStart,
    PingStarted,
    PingStop,
    Ready,
    Reply,
    Resume,
    Stop,
    Traffic,
    TrafficReply,
    WorkerSetup,
)
from bench.loadgen.protocols import ClientProtocol, Frame, Kind
from bench.loadgen.stats import Histogram, Integrity, SeqChecker
from bench.loadgen.system import mint_token, raise_nofile_limit

__all__ = ["run"]

_MAX_FRAME = 4 * 1024 * 1024
_READ_BUFFER = 2048  # grows on demand; 16 KiB (the default) per idle socket adds up
_CLOSE_WAIT = 5.0
_MIN_PAUSE = 0.002
_MAX_BURST = 500  # sends before yielding to the loop when the sender falls behind
_TEXT = picows.WSMsgType.TEXT


class HandshakeError(Exception):
    """The server refused or broke the handshake; ``args[0]`` is a short reason."""


def _reason(exc: BaseException) -> str:
    """A short, countable name for a connect failure."""
    response = getattr(exc, "response", None)
    if isinstance(exc, picows.WSHandshakeError) and response is not None:
        return f"http_{response.status}"
    if isinstance(exc, HandshakeError):
        return str(exc.args[0])
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, OSError) and exc.errno:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return type(exc).__name__


_CONNECT_ERRORS = (OSError, TimeoutError, picows.WSError, HandshakeError)
_IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux 4.2+


def _bound_socket(source: str) -> socket.socket:
    """A socket bound to ``source`` whose port is picked at connect, not at bind.

    Binding port 0 makes the kernel search for a port free for *any* destination: with
    ten thousand sockets on one address that search is linear, and a storm's connects
    queue behind it. With IP_BIND_ADDRESS_NO_PORT the port is chosen per 4-tuple.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source, 0))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def _connected_socket(source: str, host: str, port: int) -> socket.socket:
    """A socket bound to ``source`` and connected to ``host`` (a numeric address).

    The connect is made here rather than by the loop's ``sock_connect``, which resolves
    even a numeric address in uvloop's thread pool: that hand-off was 16 % of a load
    process's samples in a connect storm.
    """
    sock = _bound_socket(source)
    try:
        if error := sock.connect_ex((host, port)):
            if error != errno.EINPROGRESS:
                raise OSError(error, os.strerror(error))
            await _writable(sock.fileno())
            if error := sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                raise OSError(error, os.strerror(error))
    except BaseException:
        sock.close()
        raise
    return sock


async def _writable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(fd, wake)
    try:
        await ready
    finally:
        loop.remove_writer(fd)


class Client(picows.WSListener):  # type: ignore[misc]
    """One socket: the handshake's two futures, then the per-frame hot path.

    ``ready`` resolves with the welcome, ``joined`` with the ``joined`` of the spec's
    room; both exist from the start, since a frame may arrive in the same read as the
    upgrade's answer, before the caller awaits it.
    """

    def __init__(self, worker: Worker, spec: ConnSpec, token: str) -> None:
        loop = asyncio.get_running_loop()
        self.worker = worker
        self.spec = spec
        self.token = token
        self.checker = SeqChecker(worker.integrity)
        self.transport: picows.WSTransport | None = None
        self.session = ""
        self.closing = False
        self.ready: asyncio.Future[Frame] = loop.create_future()
        self.joined: asyncio.Future[Frame] = loop.create_future()
        self.pongs: Histogram | None = None  # a ping probe's round trips

    @property
    def resumed(self) -> bool:
        return self.ready.done() and not self.ready.exception() and bool(self.ready.result().seq)

    def on_ws_connected(self, transport: picows.WSTransport) -> None:
        self.transport = transport

    def send(self, text: str) -> None:
        assert self.transport is not None
        self.transport.send(_TEXT, text.encode())

    def _fail_handshake(self, reason: str) -> bool:
        """Fail whatever the handshake still waits for; False when it waits for nothing."""
        pending = [f for f in (self.ready, self.joined) if not f.done()]
        for future in pending:
            future.set_exception(HandshakeError(reason))
            future.exception()  # retrieved: the joined future may never be awaited
        return bool(pending)

    def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
        if frame.msg_type is not _TEXT:
            if frame.msg_type is picows.WSMsgType.CLOSE:
                transport.send_close(frame.get_close_code())
                transport.disconnect()
            return
        worker = self.worker
        tally = worker.tally
        try:
            decoded = worker.proto.decode(frame.get_payload_as_utf8_text(), self.spec.user)
        except (ValueError, KeyError, TypeError, IndexError):
            tally.errors["bad_frame"] += 1
            return
        kind = decoded.kind
        if kind is Kind.DELIVERY:
            now = time.time() * 1000.0
            tally.delivered += 1
            tally.latency.add(now - decoded.ts)
            if decoded.sent:
                tally.e2e.add(now - decoded.sent)
            self.checker.observe(decoded.key, decoded.seq)
            worker.last_delivery = now
        elif kind is Kind.EVENT:
            worker.events += 1
        elif kind is Kind.ACK:
            tally.acks += 1
        elif kind is Kind.PONG:
            if self.pongs is not None and decoded.sent:
                self.pongs.add(time.time() * 1000.0 - decoded.sent)
        elif kind is Kind.READY:
            if not self.ready.done():
                self.ready.set_result(decoded)
        elif kind is Kind.JOINED:
            if decoded.key == self.spec.room and not self.joined.done():
                self.joined.set_result(decoded)
        elif kind is Kind.ERROR:
            if not self._fail_handshake(decoded.key):
                tally.errors[decoded.key] += 1
        elif kind is Kind.REPLY:
            transport.send(_TEXT, decoded.reply.encode())

    def on_ws_disconnected(self, transport: picows.WSTransport) -> None:
        if not self._fail_handshake("closed") and not self.closing:
            self.worker.dropped += 1
        self.worker.clients.discard(self)

    def close(self) -> None:
        """Close handshake started, transport closed; ``wait_disconnected`` finishes it."""
        self.closing = True
        if self.transport is not None:
            self.transport.send_close(picows.WSCloseCode.OK)
            self.transport.disconnect()

    def abort(self) -> None:
        """Drop the TCP connection with no close frame: what a dead client host does."""
        self.closing = True
        if self.transport is not None:
            self.transport.disconnect(graceful=False)


class Worker:
    """Executes the parent's commands; see :mod:`bench.loadgen.commands`."""

    def __init__(self, conn: Connection, setup: WorkerSetup) -> None:
        self._conn = conn
        self._setup = setup
        self.proto: ClientProtocol = protocols.get(setup.protocol)
        self.clients: set[Client] = set()
        self._held: list[Client] = []  # what Open opened, in order (Drop/Resume use it)
        self._probes: list[Client] = []
        self._pinger: asyncio.Task[None] | None = None
        self.integrity = Integrity()
        self.tally = TrafficReply()
        self.dropped = 0
        self.events = 0  # presence events received, over the worker's life
        self.last_delivery = 0.0

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

    async def _dispatch(self, command: Command) -> Reply:
        match command:
            case Open():
                return await self._open(command)
            case Drop():
                return await self._drop()
            case Resume():
                return await self._resume(command)
            case Traffic():
                return await self._traffic(command)
            case Churn():
                return await self._churn(command)
            case PingStart():
                return await self._ping_start(command)
            case PingSample():
                return self._ping_sample()
            case PingStop():
                return await self._ping_stop()
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

    async def _connect(self, spec: ConnSpec, token: str, session: str = "") -> Client:
        """Upgrade and wait for the welcome (or the protocol's equivalent)."""
        url = self.proto.url(spec.root, token, session)
        transport, client = await picows.ws_connect(
            lambda: Client(self, spec, token),
            url,
            socket_factory=lambda url: _connected_socket(spec.source, url.host, url.port),
            max_frame_size=_MAX_FRAME,
            read_buffer_init_size=_READ_BUFFER,
            websocket_handshake_timeout=None,  # the caller's timeout bounds it
        )
        if not isinstance(client, Client):
            raise HandshakeError("upgrade_lost")  # picows gave no listener: closed mid-upgrade
        client.transport = transport
        self.clients.add(client)
        try:
            if hello := self.proto.hello(token):
                client.send(hello)
            client.session = (await client.ready).key
        except BaseException:
            client.abort()
            raise
        return client

    async def _join(self, client: Client) -> None:
        """Join the spec's room, unless a resumed session rejoins it by itself."""
        room = client.spec.room
        if room is None:
            return
        try:
            if not client.resumed:
                client.send(self.proto.join(room))
            frame = await client.joined
        except BaseException:
            client.abort()
            raise
        client.checker.start(frame.key, frame.seq)

    async def _open_many(
        self, jobs: list[tuple[ConnSpec, str, str]], concurrency: int, timeout: float
    ) -> tuple[OpenReply, list[Client | None]]:
        """Connect and join every (spec, token, session) with ``concurrency`` in flight."""
        reply = OpenReply()
        gate = asyncio.Semaphore(concurrency)
        loop = asyncio.get_running_loop()
        opened: list[Client | None] = [None] * len(jobs)

        async def open_one(index: int, spec: ConnSpec, token: str, session: str) -> None:
            async with gate:
                started = loop.time()
                try:
                    async with asyncio.timeout(timeout):
                        client = await self._connect(spec, token, session)
                        await self._join(client)
                except _CONNECT_ERRORS as exc:
                    reply.failed += 1
                    reply.errors[_reason(exc)] += 1
                    return
                reply.connect.add((loop.time() - started) * 1000.0)
                reply.opened += 1
                reply.resumed += client.resumed
                opened[index] = client

        started, events = loop.time(), self.events
        await asyncio.gather(*(open_one(i, *job) for i, job in enumerate(jobs)))
        reply.seconds = loop.time() - started
        reply.events = self.events - events
        return reply, opened

    async def _open(self, command: Open) -> OpenReply:
        jobs = [(spec, mint_token(self._setup.jwt_secret, spec.user), "") for spec in command.specs]
        reply, opened = await self._open_many(jobs, command.concurrency, command.timeout)
        self._held = [c for c in opened if c is not None]
        return reply

    async def _drop(self) -> DropReply:
        """Every held socket drops at once, without a close frame."""
        held = [c for c in self._held if c.transport is not None and not c.transport.is_disconnected]
        for client in held:
            client.abort()
        await asyncio.gather(*(c.transport.wait_disconnected() for c in held if c.transport))
        return DropReply(dropped=len(held))

    async def _resume(self, command: Resume) -> OpenReply:
        """Reconnect every dropped socket with its session, and wait for its room's `joined`."""
        jobs = [(c.spec, c.token, c.session) for c in self._held]
        reply, opened = await self._open_many(jobs, command.concurrency, command.timeout)
        self._held = [c for c in opened if c is not None]
        return reply

    async def _ping_start(self, command: PingStart) -> PingStarted:
        """Open the probe sockets and ping each every ``interval`` s until PingStop."""
        started = PingStarted()
        token_of = {spec.user: mint_token(self._setup.jwt_secret, spec.user) for spec in command.specs}
        for spec in command.specs:
            try:
                async with asyncio.timeout(command.timeout):
                    client = await self._connect(spec, token_of[spec.user])
            except _CONNECT_ERRORS as exc:  # a busy server refusing a probe is a finding
                started.failed[_reason(exc)] += 1
                continue
            client.pongs = Histogram()
            assert client.transport is not None
            sockname = client.transport.underlying_transport.get_extra_info("sockname")
            started.ports.append(int(sockname[1]))
            self._probes.append(client)
        self._pinger = asyncio.create_task(self._ping_forever(command.interval))
        return started

    async def _ping_forever(self, interval: float) -> None:
        """Pings on a fixed schedule (not one at a time): a stall shows in every late pong."""
        loop = asyncio.get_running_loop()
        tick = loop.time()
        while True:
            now = time.time() * 1000.0
            for probe in self._probes:
                probe.send(self.proto.ping(now))
            tick += interval
            await asyncio.sleep(max(tick - loop.time(), 0.0))

    def _ping_sample(self) -> PingReply:
        reply = PingReply([p.pongs or Histogram() for p in self._probes])
        for probe in self._probes:
            probe.pongs = Histogram()
        return reply

    async def _ping_stop(self) -> PingReply:
        if self._pinger is not None:
            self._pinger.cancel()
            await asyncio.gather(self._pinger, return_exceptions=True)
        await asyncio.sleep(0.2)  # the last pongs in flight
        reply = PingReply([p.pongs or Histogram() for p in self._probes])
        for probe in self._probes:
            probe.close()
        self._probes = []
        return reply

    async def _traffic(self, command: Traffic) -> TrafficReply:
        self.tally = TrafficReply()
        self.last_delivery = time.time() * 1000.0
        wanted = "room" if command.kind == "room" else "peer"
        senders = [
            c
            for c in self._held
            if c.transport is not None
            and not c.transport.is_disconnected
            and getattr(c.spec, wanted) is not None
        ]
        if senders and command.rate > 0:
            await self._send_paced(command, senders)
        await self._settle(command.quiet, command.max_wait)
        reply = self.tally
        reply.integrity = self._integrity_now()
        reply.dropped = self.dropped
        return reply

    async def _send_paced(self, command: Traffic, senders: list[Client]) -> None:
        """Send at ``command.rate`` for ``command.seconds``, round-robin over ``senders``.

        The schedule is absolute (message i is due at start + i/rate), so a late
        wake-up sends the backlog instead of silently lowering the rate.
        """
        loop = asyncio.get_running_loop()
        tally = self.tally
        pad = "x" * command.payload_bytes
        total = int(command.rate * command.seconds)
        start = loop.time()
        deadline = start + command.seconds
        encode = self.proto.publish if command.kind == "room" else self.proto.direct
        while tally.sent < total and (now := loop.time()) < deadline:
            due = min(total, int((now - start) * command.rate) + 1)
            for _ in range(min(due - tally.sent, _MAX_BURST)):
                client = senders[tally.sent % len(senders)]
                target = client.spec.room if command.kind == "room" else client.spec.peer
                data = {"t": time.time() * 1000.0, "pad": pad}
                tally.sent += 1
                transport = client.transport
                if transport is None or transport.is_disconnected:
                    tally.errors["send_failed"] += 1
                    continue
                transport.send(_TEXT, encode(target or "", data).encode())
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
            idle = time.time() - self.last_delivery / 1000.0
            if idle >= quiet:
                return
            await asyncio.sleep(min(quiet - idle, deadline - loop.time()))

    def _integrity_now(self) -> Integrity:
        """Findings so far, counting still-missing seqs as gaps."""
        outstanding = sum(c.checker.outstanding() for c in self._held)
        return replace(self.integrity, gaps=self.integrity.gaps + outstanding)

    async def _churn(self, command: Churn) -> ChurnReply:
        reply = ChurnReply()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + command.seconds
        budget = [command.max_cycles]

        async def cycle(spec: ConnSpec) -> None:
            token = mint_token(self._setup.jwt_secret, spec.user)
            while loop.time() < deadline and budget[0] > 0:
                budget[0] -= 1
                started = loop.time()
                try:
                    async with asyncio.timeout(command.timeout):
                        client = await self._connect(spec, token)
                        await self._join(client)
                        reply.connect.add((loop.time() - started) * 1000.0)
                        client.close()
                        assert client.transport is not None
                        await client.transport.wait_disconnected()
                except _CONNECT_ERRORS as exc:
                    reply.failed += 1
                    reply.errors[_reason(exc)] += 1
                    await asyncio.sleep(0.05)  # a refusing server is not hammered
                    continue
                reply.cycles += 1

        await asyncio.gather(*(cycle(spec) for spec in command.specs))
        return reply

    async def _close_all(self, _command: CloseAll) -> CloseReply:
        reply = CloseReply(integrity=self._integrity_now())
        clients = list(self.clients)
        for client in clients:
            client.close()
        waits = [asyncio.ensure_future(c.transport.wait_disconnected()) for c in clients if c.transport]
        if waits:  # a socket that does not finish closing in time is gone anyway
            await asyncio.wait(waits, timeout=_CLOSE_WAIT)
        for client in clients:
            if client.transport is not None and not client.transport.is_disconnected:
                client.transport.disconnect(graceful=False)
        reply.closed = len(self._held)
        reply.dropped, self.dropped = self.dropped, 0
        self._held = []
        self.integrity = Integrity()
        return reply


def run(conn: Connection, setup: WorkerSetup) -> None:
    """Process entry point (spawned by :class:`bench.loadgen.fleet.Fleet`).

    The cyclic garbage collector is off. Its full passes walk every socket's objects: in a
    10,000-socket storm they paused each generator process eight times, for up to 0.4 s,
    and in 20 s of directs at 6,000/s for up to 46 ms; a frame that waits out such a pause
    counts as the server's latency. Measured with it off, a whole storm leaves 130 - 210
    objects of cyclic garbage per process, and traffic adds none: reference counting frees
    the rest.
    """
    raise_nofile_limit()
    gc.disable()
    uvloop.run(Worker(conn, setup).serve())
