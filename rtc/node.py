"""The routing layer of one worker: rooms, ownership, sequencing, delivery and sessions.

A `Node` is the worker's view of the cluster. It asks the ring who owns a key, forwards
publishes to the owner over Redis (or sequences them itself when it is the owner), and
delivers the owner's sequenced frames arriving over pub/sub to its local sockets,
framing each message once. It checks every frame's seq against the room's cursor and
fills holes from history before delivering further, so pub/sub's at-most-once delivery
never turns into a silent gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from rtc import keys, metrics
from rtc.broker import make_broker
from rtc.broker.base import Sequenced, Unsequenced
from rtc.config import Settings
from rtc.connection import Connection
from rtc.errors import ErrorCode, ProtocolError
from rtc.hashring import Ring
from rtc.protocol import (
    Direct,
    Join,
    Publish,
    RequestId,
    direct_halves,
    encode,
    encode_error,
    inbox,
    message_halves,
    wire_text,
)

__all__ = ["Node", "Room"]

log = logging.getLogger("rtc.node")

FORWARD_TIMEOUT = 2.0  # SPEC: a publish not sequenced in time gets `unavailable`
PRESENCE_LEAVE_DELAY = 5.0
MEMBERS_LIMIT = 1000
MEMBERSHIP_TTL = 15
RING_TTL_MS = 3000  # a dead worker's slot leaves every ring view within this
_SEQ_DIGITS = 20  # room in a frame for the seq when checking the size limit

Reply = Callable[[int | None], None]  # called with the seq, or None when it failed


@dataclass(eq=False, slots=True)
class Room:
    """A room (or inbox) with local members on this worker."""

    name: str
    channel: bytes
    members: set[Connection] = field(default_factory=set)
    cursor: int = 0  # last seq delivered to local members
    epoch: str = ""
    ready: asyncio.Future[None] | None = None
    backlog: list[bytes] = field(default_factory=list)  # payloads waiting for a fill or open
    outgoing: list[bytes] = field(default_factory=list)  # framed, written at the end of the turn
    filling: bool = False
    joining: int = 0
    idle_since: float = 0.0


class Node:
    """Routes one worker's traffic; the broker pushes channel messages into it."""

    def __init__(self, settings: Settings, slot: str, instance: str, worker: str) -> None:
        self.settings = settings
        self.slot = slot
        self.instance = instance
        self.worker = worker
        self.ring = Ring(())
        self.in_ring = False
        self.connections: set[Connection] = set()
        self.rooms: dict[str, Room] = {}
        self._by_channel: dict[bytes, Room] = {}
        self._inbox_channel = keys.slot_inbox(slot).encode()
        self._control_channel = keys.host_control(settings.node_id).encode()
        self._batches: dict[str, list[tuple[Unsequenced, Reply]]] = {}
        self._sequencing = False
        self._forwards: dict[bytes, tuple[Reply, float]] = {}
        self._outbox: list[tuple[str, bytes]] = []
        self._outbox_scheduled = False
        self._nobody: dict[int, Callable[[], None]] = {}
        self._next_rid = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._flushes: set[asyncio.Task[None]] = set()  # sequencing and forwarding in flight
        self._leave_timers: set[asyncio.TimerHandle] = set()
        self._dirty: list[Room] = []  # rooms with frames queued this loop turn
        self.on_control: Callable[[bytes], None] = lambda _: None
        self.broker = make_broker(settings, self, worker)
        self._fanout_received = metrics.FANOUT_RECEIVED.labels(worker)
        self._deliveries = metrics.DELIVERIES.labels(worker)
        self._forwarded = metrics.FORWARDED.labels(worker)
        self._rooms_gauge = metrics.ROOMS.labels(worker)

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        await self.broker.start()
        await self.broker.subscribe(self._control_channel.decode())

    async def join_ring(self) -> None:
        """Take this worker's slot: receive forwards for it and heartbeat it into the ring."""
        await self.broker.subscribe(self._inbox_channel.decode())
        self.in_ring = True
        await self.heartbeat()

    async def heartbeat(self) -> None:
        """Renew the slot's lease (once in the ring) and refresh the ring view."""
        if self.in_ring:
            live = await self.broker.heartbeat(self.slot, self.instance, RING_TTL_MS)
        else:
            live = await self.broker.live_slots()
        ring = Ring(live)
        if ring != self.ring:
            log.info("ring changed: %d slots", len(ring))
            self.ring = ring
            metrics.RING_SLOTS.set(len(ring))

    async def leave_ring(self) -> None:
        """Give up the slot, then finish what was already forwarded to it."""
        self.in_ring = False
        with contextlib.suppress(Exception):
            await self.broker.unsubscribe(self._inbox_channel.decode())
            await self.broker.leave_ring(self.slot)
        deadline = time.monotonic() + FORWARD_TIMEOUT
        while self._flushes and time.monotonic() < deadline:  # a batch's replies flush after it
            await asyncio.wait(set(self._flushes), timeout=deadline - time.monotonic())

    async def close(self) -> None:
        for timer in self._leave_timers:  # their users are migrating: no leave to announce
            timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        await self.broker.close()

    def spawn(self, coro: Coroutine[Any, Any, None], *, flush: bool = False) -> None:
        """Run a background task that is kept referenced and cancelled on close."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if flush:
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def maintain(self) -> None:
        """Every second: ring heartbeat, expired forwards, idle rooms; every 5 s membership."""
        tick = 0
        while True:
            await asyncio.sleep(1.0)
            tick += 1
            try:
                await self.heartbeat()
                self._expire_forwards()
                await self._close_idle_rooms()
                if tick % 5 == 0:
                    rooms = [r.name for r in self.rooms.values() if r.members and r.name[0] != "@"]
                    await self.broker.refresh_members(self.slot, rooms, MEMBERSHIP_TTL)
            except Exception:
                log.exception("maintenance failed")

    # -- connections ------------------------------------------------------------------------

    async def attach(self, conn: Connection) -> None:
        """A new connection: listen to its inbox."""
        self.connections.add(conn)
        room = await self._open(inbox(conn.user))
        room.members.add(conn)
        conn.rooms.add(room.name)

    async def detach(self, conn: Connection) -> None:
        """A closed connection: leave its rooms (its session stays resumable)."""
        self.connections.discard(conn)
        for name in list(conn.rooms):
            await self._drop_member(conn, name)

    # -- commands ---------------------------------------------------------------------------

    async def join(self, conn: Connection, cmd: Join) -> None:
        """Join (or resume) a room: `joined`, then any replay, then live frames."""
        name = cmd.room
        if not conn.principal.may_join(name):
            raise ProtocolError(ErrorCode.FORBIDDEN, f"not allowed to join {name!r}")
        already = name in conn.rooms
        if not already and len(conn.rooms) > self.settings.max_rooms:  # the inbox is free
            raise ProtocolError(ErrorCode.FORBIDDEN, f"at most {self.settings.max_rooms} rooms")
        room = await self._open(name)
        if conn.closing:
            return
        self._flush_room(room)  # frames up to the cursor are not this joiner's
        conn.held[name] = []
        room.members.add(conn)
        conn.rooms.add(name)
        try:
            await self._send_joined(conn, room, cmd)
        except BaseException:
            held = conn.held.pop(name, [])
            if not already:  # no `joined` went out: not a member after all
                room.members.discard(conn)
                conn.rooms.discard(name)
                held = []
            for wire in held:
                conn.send_wire(wire)
            raise
        for wire in conn.held.pop(name, ()):
            conn.send_wire(wire)
        if not already and name[0] != "@":
            metrics.JOINS.labels(self.worker).inc()
            presence = encode("presence", room=name, user=conn.user, event="join")
            await self.broker.join(
                name, self.slot, conn.user, presence, self.settings.presence_events_max, MEMBERSHIP_TTL
            )

    async def _send_joined(self, conn: Connection, room: Room, cmd: Join) -> None:
        last = room.cursor
        replay: list[tuple[int, bytes]] = []
        recovered = True
        if cmd.since is not None:
            after = cmd.since
            if cmd.epoch is not None and cmd.epoch != room.epoch:
                recovered, after = False, 0
            if after > last:
                recovered = False
            else:
                replay = await self.broker.history(room.name, after, last)
                contiguous = all(seq == after + 1 + i for i, (seq, _) in enumerate(replay))
                if len(replay) != last - after or not contiguous:
                    recovered = False
        conn.send(encode("joined", cmd.id, room=room.name, seq=last, epoch=room.epoch, recovered=recovered))
        for _, frame in replay:
            conn.send(frame)
        # The session knows the room at once; the checkpoint advances once this is sent.
        conn.cursors[room.name] = cmd.since if cmd.since is not None and recovered else last
        await self.broker.save_sessions(
            {conn.session: {f"r:{room.name}": f"{conn.cursors[room.name]}:{room.epoch}"}},
            self.settings.session_ttl,
        )

    async def leave(self, conn: Connection, name: str, request_id: RequestId) -> None:
        if name not in conn.rooms or name == inbox(conn.user):
            raise ProtocolError(ErrorCode.NOT_JOINED, f"not joined to {name!r}")
        await self._drop_member(conn, name)
        conn.send(encode("left", request_id, room=name))
        await self.broker.drop_session_rooms(conn.session, [name])

    async def members(self, conn: Connection, name: str, request_id: RequestId) -> None:
        if name not in conn.rooms or name[0] == "@":
            raise ProtocolError(ErrorCode.NOT_JOINED, f"not joined to {name!r}")
        count, users = await self.broker.members(name, MEMBERS_LIMIT)
        conn.send(encode("members", request_id, room=name, users=users, count=count))

    def publish(self, conn: Connection, cmd: Publish) -> None:
        if cmd.room not in conn.rooms or cmd.room[0] == "@":
            raise ProtocolError(ErrorCode.NOT_JOINED, f"not joined to {cmd.room!r}")
        if not conn.principal.may_join(cmd.room):
            raise ProtocolError(ErrorCode.FORBIDDEN, f"not allowed to publish to {cmd.room!r}")
        ts = int(time.time() * 1000)
        head, tail = message_halves(cmd.room, conn.user, cmd.data, ts)

        def ack(seq: int | None) -> None:
            if seq is None:
                _fail(conn, ErrorCode.UNAVAILABLE, "could not sequence the message in time", cmd.id)
            else:
                conn.send(encode("ack", cmd.id, room=cmd.room, seq=seq))

        self._route(cmd.room, self._unsequenced(conn, head, tail, ts, cmd.id), ack)

    def direct(self, conn: Connection, cmd: Direct) -> None:
        ts = int(time.time() * 1000)
        head, tail = direct_halves(conn.user, cmd.data, ts)

        def ack(seq: int | None) -> None:
            if seq is None:
                _fail(conn, ErrorCode.UNAVAILABLE, "could not sequence the message in time", cmd.id)
            else:
                conn.send(encode("ack", cmd.id, to=cmd.to, seq=seq))

        self._route(inbox(cmd.to), self._unsequenced(conn, head, tail, ts, cmd.id), ack)

    def submit(
        self, key: str, head: bytes, tail: bytes, ts: int, dedup: str | None
    ) -> asyncio.Future[int | None]:
        """Sequence a frame for a room or inbox on behalf of no connection (the server API).

        Resolves to the seq, or None when it could not be sequenced in time.
        """
        item = self._item(head, tail, ts, dedup)
        future: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()

        def reply(seq: int | None) -> None:
            if not future.done():
                future.set_result(seq)

        self._route(key, item, reply)
        return future

    def _unsequenced(
        self, conn: Connection, head: bytes, tail: bytes, ts: int, request_id: RequestId
    ) -> Unsequenced:
        dedup = None if request_id is None else f"{conn.session}:{orjson.dumps(request_id).decode()}"
        return self._item(head, tail, ts, dedup)

    def _item(self, head: bytes, tail: bytes, ts: int, dedup: str | None) -> Unsequenced:
        if len(head) + len(tail) + _SEQ_DIGITS > self.settings.max_message_bytes:
            raise ProtocolError(ErrorCode.TOO_LARGE, "message exceeds the size limit")
        return Unsequenced(head, tail, ts, dedup)

    # -- ownership: forward or sequence ---------------------------------------------------------

    def _route(self, key: str, item: Unsequenced, reply: Reply) -> None:
        owner = self.ring.owner(key)
        if owner is None or owner == self.slot:
            self._sequence(key, item, reply)
            return
        self._next_rid += 1
        rid = b"%d" % self._next_rid
        self._forwards[rid] = (reply, time.monotonic() + FORWARD_TIMEOUT)
        record = b"\n".join(
            (
                b"P",
                self.slot.encode(),
                rid,
                (item.dedup or "").encode(),
                key.encode(),
                b"%d" % item.ts,
                item.head,
                item.tail,
            )
        )
        self._forwarded.inc()
        self._send(keys.slot_inbox(owner), record, on_nobody=lambda: self._unforward(rid, key, item))

    def _unforward(self, rid: bytes, key: str, item: Unsequenced) -> None:
        """Nobody listens on the owner's slot (it died): sequence here; Redis keeps it safe."""
        pending = self._forwards.pop(rid, None)
        if pending is not None:
            self._sequence(key, item, pending[0])

    def _sequence(self, room: str, item: Unsequenced, reply: Reply) -> None:
        batch = self._batches.get(room)
        if batch is None:
            self._batches[room] = [(item, reply)]
        else:
            batch.append((item, reply))
        if not self._sequencing:
            self._sequencing = True
            self.spawn(self._flush_batches(), flush=True)

    async def _flush_batches(self) -> None:
        """Sequence what this worker owns: every room's batch in one round trip.

        One flush at a time keeps each room's publishes in arrival order; what arrives
        while a flush is in flight forms the next, larger batch.
        """
        try:
            await asyncio.sleep(0)  # let this loop turn's publishes join the batch
            while self._batches:
                batches, self._batches = self._batches, {}
                try:
                    async with asyncio.timeout(FORWARD_TIMEOUT):
                        results = await self.broker.sequence_many(
                            {room: [item for item, _ in batch] for room, batch in batches.items()},
                            self.settings.history_size,
                            self.settings.history_ttl,
                        )
                except Exception as exc:
                    log.warning("sequencing %d rooms failed: %s", len(batches), exc)
                    results = {}
                for room, batch in batches.items():
                    result = results.get(room)
                    if not isinstance(result, Sequenced):
                        if result is not None:
                            log.warning("sequencing %s failed: %s", room, result)
                        for _, reply in batch:
                            reply(None)
                        continue
                    for (_, reply), seq in zip(batch, result.seqs, strict=True):
                        reply(seq)
        finally:
            self._sequencing = False

    def _send(self, channel: str, payload: bytes, on_nobody: Callable[[], None] | None = None) -> None:
        """Queue a PUBLISH; the queue is flushed in order, in one pipeline per loop turn."""
        self._outbox.append((channel, payload))
        if on_nobody is not None:
            self._nobody[len(self._outbox) - 1] = on_nobody
        if not self._outbox_scheduled:
            self._outbox_scheduled = True
            self.spawn(self._flush_outbox(), flush=True)

    async def _flush_outbox(self) -> None:
        await asyncio.sleep(0)
        while self._outbox:
            batch, self._outbox = self._outbox, []
            nobody, self._nobody = self._nobody, {}
            try:
                receivers = await self.broker.publish_many(batch)
            except Exception as exc:
                log.warning("forwarding failed: %s", exc)
                continue  # the forwards expire into `unavailable`
            for index, callback in nobody.items():
                if receivers[index] == 0:
                    callback()
        self._outbox_scheduled = False

    def _expire_forwards(self) -> None:
        now = time.monotonic()
        expired = [rid for rid, (_, deadline) in self._forwards.items() if deadline < now]
        for rid in expired:
            reply, _ = self._forwards.pop(rid)
            reply(None)

    def _on_slot_message(self, payload: bytes) -> None:
        kind = payload[:1]
        if kind == b"P":
            _, origin, rid, dedup, key, ts, head, tail = payload.split(b"\n", 7)
            item = Unsequenced(head, tail, int(ts), dedup.decode() or None)

            def reply(seq: int | None) -> None:
                answer = b"A\n%s\n%d" % (rid, seq) if seq is not None else b"E\n" + rid
                self._send(keys.slot_inbox(origin.decode()), answer)

            self._sequence(key.decode(), item, reply)
        elif kind in (b"A", b"E"):
            parts = payload.split(b"\n")
            pending = self._forwards.pop(parts[1], None)
            if pending is not None:
                pending[0](int(parts[2]) if kind == b"A" else None)

    # -- delivery -------------------------------------------------------------------------------

    def on_channel_message(self, channel: bytes, payload: bytes) -> None:
        room = self._by_channel.get(channel)
        if room is not None:
            if not payload.startswith(b"0 "):  # presence events (`0 0 <frame>`) are no message
                self._fanout_received.inc(payload.count(b"\n") + 1)  # one record per message
            if room.filling or room.ready is None or not room.ready.done():
                room.backlog.append(payload)
            else:
                self._receive(room, payload.split(b"\n"))
        elif channel == self._inbox_channel:
            self._on_slot_message(payload)
        elif channel == self._control_channel:
            self.on_control(payload)

    def on_resubscribed(self, channel: bytes) -> None:
        """Pub/sub came back: anything published meanwhile is in history, fetch it."""
        room = self._by_channel.get(channel)
        if room is not None and not room.filling and room.ready is not None and room.ready.done():
            room.filling = True
            self.spawn(self._resync(room))

    def _receive(self, room: Room, records: list[bytes]) -> None:
        for index, record in enumerate(records):
            seq_text, ts_text, frame = record.split(b" ", 2)
            seq = int(seq_text)
            if seq == 0:
                self._deliver_event(room, frame)
            elif seq == room.cursor + 1:
                self._deliver(room, seq, frame, int(ts_text))
            elif seq > room.cursor + 1:
                room.filling = True
                room.backlog[:0] = [b"\n".join(records[index:])]
                self.spawn(self._fill(room, seq - 1))
                return

    def _deliver(self, room: Room, seq: int, frame: bytes, ts: int) -> None:
        room.cursor = seq
        self._emit(room, wire_text(frame))
        count = len(room.members)
        self._deliveries.inc(count)
        metrics.MESSAGES_SENT.inc(count)
        metrics.FANOUT_SIZE.observe(count)
        if ts:
            metrics.PUBLISH_TO_DELIVER.observe(max(0.0, time.time() - ts / 1000))

    def _emit(self, room: Room, wire: bytes) -> None:
        """Queue a framed message for every member; written once per loop turn.

        Everything a room receives in one turn of the event loop goes out as one write per
        socket: under load that divides the send syscalls, the bulk of the fan-out cost, by
        the batch size; at low rates it costs nothing but a `call_soon`.
        """
        room.outgoing.append(wire)
        if len(room.outgoing) == 1:
            self._dirty.append(room)
            if len(self._dirty) == 1:
                asyncio.get_running_loop().call_soon(self.flush_deliveries)

    def flush_deliveries(self) -> None:
        """Write what the rooms queued this turn (also before anything that reads cursors)."""
        dirty, self._dirty = self._dirty, []
        for room in dirty:
            self._flush_room(room)

    @staticmethod
    def _flush_room(room: Room) -> None:
        outgoing = room.outgoing
        if not outgoing:
            return
        data = outgoing[0] if len(outgoing) == 1 else b"".join(outgoing)
        outgoing.clear()
        name = room.name
        for conn in room.members:
            conn.deliver(name, data)

    def _deliver_event(self, room: Room, frame: bytes) -> None:
        """Unsequenced room events (presence): to every member but their subject."""
        self._flush_room(room)
        user = orjson.loads(frame).get("user")
        wire = wire_text(frame)
        for conn in room.members:
            if conn.user != user:
                conn.deliver(room.name, wire)

    def _report_gap(self, room: Room, first: int, last: int) -> None:
        metrics.GAPS_REPORTED.labels(self.worker).inc()
        log.warning("gap in %s: %d..%d not in history", room.name, first, last)
        self._emit(room, wire_text(encode("gap", room=room.name, **{"from": first, "to": last})))
        room.cursor = last

    async def _fill(self, room: Room, upto: int) -> None:
        """Deliver (cursor, upto] from history, report what history lost, then the backlog."""
        try:
            if upto > room.cursor:
                metrics.GAPS_FILLED.labels(self.worker).inc()
                try:
                    entries = await self.broker.history(room.name, room.cursor, upto)
                except Exception as exc:
                    log.warning("history read for %s failed: %s", room.name, exc)
                    entries = []
                for seq, frame in entries:
                    if seq > room.cursor + 1:
                        self._report_gap(room, room.cursor + 1, seq - 1)
                    if seq == room.cursor + 1:
                        self._deliver(room, seq, frame, 0)
                if room.cursor < upto:
                    self._report_gap(room, room.cursor + 1, upto)
        finally:
            self._drain_backlog(room)

    def _drain_backlog(self, room: Room) -> None:
        room.filling = False
        while room.backlog and not room.filling:
            payload = room.backlog.pop(0)
            self._receive(room, payload.split(b"\n"))

    async def _resync(self, room: Room) -> None:
        try:
            seq, epoch = await self.broker.open_room(room.name, self.settings.history_ttl)
        except Exception as exc:
            log.warning("resync of %s failed: %s", room.name, exc)
            self._drain_backlog(room)
            return
        if epoch != room.epoch:
            # History was lost (Redis restarted): members start over from this epoch.
            self._flush_room(room)
            room.epoch, room.cursor = epoch, seq
            for conn in room.members:
                conn.send(encode("joined", room=room.name, seq=seq, epoch=epoch, recovered=False))
            self._drain_backlog(room)
            return
        await self._fill(room, seq)

    # -- local rooms ------------------------------------------------------------------------------

    async def _open(self, name: str) -> Room:
        """The local room, subscribing to its channel on first use."""
        room = self.rooms.get(name)
        if room is None:
            channel = keys.room_channel(name)
            room = self.rooms[name] = Room(name, channel.encode())
            room.ready = asyncio.get_running_loop().create_future()
            self._by_channel[room.channel] = room
            self._rooms_gauge.set(len(self.rooms))
            room.joining += 1
            try:
                await self.broker.subscribe(channel)
                room.cursor, room.epoch = await self.broker.open_room(name, self.settings.history_ttl)
            except Exception as exc:
                self._forget(room)
                error = ProtocolError(ErrorCode.UNAVAILABLE, "Redis unavailable")
                room.ready.set_exception(error)
                room.ready.exception()  # mark retrieved; concurrent joiners re-raise it
                raise error from exc
            finally:
                room.joining -= 1
            room.ready.set_result(None)
            self._drain_backlog(room)
            return room
        if room.ready is not None and not room.ready.done():
            room.joining += 1
            try:
                await asyncio.shield(room.ready)
            finally:
                room.joining -= 1
        return room

    def _forget(self, room: Room) -> None:
        self.rooms.pop(room.name, None)
        self._by_channel.pop(room.channel, None)
        self._rooms_gauge.set(len(self.rooms))

    async def _close_idle_rooms(self) -> None:
        now = time.monotonic()
        for room in list(self.rooms.values()):
            if room.members or room.joining or room.filling:
                room.idle_since = 0.0
            elif not room.idle_since:
                room.idle_since = now
            elif now - room.idle_since > 5.0:
                self._forget(room)
                await self.broker.unsubscribe(keys.room_channel(room.name))

    async def _drop_member(self, conn: Connection, name: str) -> None:
        conn.rooms.discard(name)
        conn.held.pop(name, None)
        room = self.rooms.get(name)
        if room is None or conn not in room.members:
            return
        room.members.discard(conn)
        if name[0] == "@":
            return
        try:
            if await self.broker.leave(name, self.slot, conn.user):
                self._schedule_leave(name, conn.user)
        except Exception as exc:
            log.warning("membership update for %s failed: %s", name, exc)

    def _schedule_leave(self, room: str, user: str) -> None:
        """Announce the leave later, so a drain or a resume does not flap presence."""

        def due() -> None:
            self._leave_timers.discard(timer)
            self.spawn(self._announce_leave(room, user))

        timer = asyncio.get_running_loop().call_later(PRESENCE_LEAVE_DELAY, due)
        self._leave_timers.add(timer)

    async def _announce_leave(self, room: str, user: str) -> None:
        presence = encode("presence", room=room, user=user, event="leave")
        with contextlib.suppress(Exception):
            await self.broker.presence_gone(room, user, presence, self.settings.presence_events_max)

    # -- sessions ----------------------------------------------------------------------------------

    def checkpoints(self, conns: Iterable[Connection], *, final: bool = False) -> dict[str, dict[str, str]]:
        """Session fields that changed: `r:<room>` -> `<seq>:<epoch>` per connection.

        A periodic checkpoint only advances while the socket's send buffer is empty, so it
        never claims a frame the client cannot have received yet; a final checkpoint (an
        orderly close, after the buffer was flushed) takes the current cursors.
        """
        self.flush_deliveries()  # cursors count only what was written
        sessions: dict[str, dict[str, str]] = {}
        for conn in conns:
            if not final and conn.transport.get_write_buffer_size():
                continue
            changed: dict[str, str] = {}
            for name in conn.rooms:
                room = self.rooms.get(name)
                if room is None or name in conn.held:
                    continue
                if conn.cursors.get(name) != room.cursor or final:
                    conn.cursors[name] = room.cursor
                    changed[f"r:{name}"] = f"{room.cursor}:{room.epoch}"
            if changed:
                sessions[conn.session] = {"user": conn.user, **changed}
        return sessions

    async def checkpoint_forever(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                await self.broker.save_sessions(self.checkpoints(self.connections), self.settings.session_ttl)
            except Exception as exc:
                log.warning("session checkpoint failed: %s", exc)


def _fail(conn: Connection, code: ErrorCode, message: str, request_id: RequestId) -> None:
    metrics.ERROR_FRAMES.labels(code.value).inc()
    metrics.ERRORS.inc()
    conn.send(encode_error(code, message, request_id))
