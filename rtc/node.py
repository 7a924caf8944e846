"""A worker's routing node: the facade that wires the routing pieces and runs client commands.

The pieces live in `rtc.routing` and never import this module: the ring membership,
the forwarder (with its sequencer and outbox), local delivery (driving the pure hub),
presence and sessions. Each is handed only the part of the broker it needs; the broker
itself is built by the worker and handed in, and pushes what arrives on pub/sub into
`Channels`, where each piece registered the channels it listens on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

import orjson

from rtc import keys
from rtc.broker.base import Broker, Unsequenced
from rtc.config import Settings
from rtc.connection import Connection
from rtc.errors import CloseCode, ErrorCode, ProtocolError
from rtc.hashring import Ring
from rtc.log import Repeats
from rtc.protocol import Direct, Join, Publish, RequestId, direct_halves, encode, inbox, message_halves
from rtc.routing.channels import Channels, Listener
from rtc.routing.delivery import LocalRooms
from rtc.routing.forwarder import FORWARD_TIMEOUT, Forwarder
from rtc.routing.outbox import Outbox
from rtc.routing.presence import Presence
from rtc.routing.ring import RingMember
from rtc.routing.sequencer import Reply, Sequencer, Stamp
from rtc.routing.sessions import Sessions
from rtc.routing.tasks import Tasks

__all__ = ["MEMBERS_LIMIT", "Node"]

log = logging.getLogger("rtc.node")

MEMBERS_LIMIT = 1000
MAINTAIN_EVERY = 1.0
EXPIRE_EVERY = 0.05  # publishes past their deadline are answered within this
REFRESH_EVERY = 5  # maintenance ticks between membership refreshes
MAINTENANCE_TIMEOUT = 10.0  # a round of room maintenance that Redis holds longer is given up
_SEQ_DIGITS = 20  # room in a frame for the seq when checking the size limit


class Node:
    """Routes one worker's traffic: commands in from `app`, frames out to connections."""

    def __init__(
        self, settings: Settings, slot: str, instance: str, worker: str, broker: Broker, channels: Channels
    ) -> None:
        self.settings = settings
        self.instance = instance
        self.connections: set[Connection] = set()
        self.on_control: Callable[[bytes], None] = lambda _: None
        self._broker = broker
        self._tasks = Tasks()
        self.membership = RingMember(broker, broker, slot, instance)
        self.forwarder = Forwarder(
            self.membership,
            Sequencer(broker, self._tasks, settings.history_size, settings.history_ttl, FORWARD_TIMEOUT),
            Outbox(broker, self._tasks, FORWARD_TIMEOUT),
            worker,
        )
        # A replay page holds at most half the send queue of the largest messages, and the
        # next page goes once the queue is below half: a replay never passes the bound.
        window = settings.send_queue_bytes // 2
        self.rooms = LocalRooms(
            channels,
            broker,
            broker,
            self._tasks,
            settings.history_ttl,
            worker,
            replay_page=max(1, window // settings.max_message_bytes),
            replay_window=window,
        )
        self.presence = Presence(broker, self._tasks, slot, settings.presence_events_max, worker)
        self.sessions = Sessions(broker, self._epoch, settings.session_ttl)
        self._control = keys.host_control(settings.node_id)
        channels.listen(self.membership.inbox, Listener(self.forwarder.on_slot_message))
        channels.listen(self._control, Listener(lambda command: self.on_control(command)))

    @property
    def ring(self) -> Ring:
        return self.membership.ring

    @property
    def slot(self) -> str:
        return self.membership.slot

    @property
    def in_ring(self) -> bool:
        return self.membership.in_ring

    def _epoch(self, room: str) -> str | None:
        return self.rooms.epoch(room) if room in self.rooms else None

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def redis_ok(self) -> bool:
        return self.membership.redis_ok

    async def start(self) -> None:
        await self._broker.start()
        await self._broker.subscribe(self._control)
        self._tasks.spawn(self._expire_forever())

    async def _expire_forever(self) -> None:
        """Answer publishes past their deadline: a timer of its own, never behind Redis."""
        while True:
            await asyncio.sleep(EXPIRE_EVERY)
            self.forwarder.expire()

    async def join_ring(self) -> None:
        await self.membership.join()

    async def heartbeat(self) -> None:
        await self.membership.heartbeat()

    async def leave_ring(self) -> None:
        """Give up the slot, then finish what was already forwarded to it."""
        await self.membership.leave()
        await self._tasks.settle(FORWARD_TIMEOUT)

    async def close(self) -> None:
        self.presence.close()
        self._tasks.cancel()
        await self._broker.close()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a background task that is kept referenced and cancelled on close."""
        self._tasks.spawn(coro)

    async def maintain(self) -> None:
        """The ring heartbeat every second; idle rooms every second and membership every 5 s.

        Two loops: the heartbeat must never wait behind other maintenance that waits on
        Redis (an unsubscribe while pub/sub reconnects), or a live worker's slot would
        lapse and leave every ring view.
        """
        self._tasks.spawn(self._rooms_forever())
        failures = Repeats(log, "ring heartbeat")
        while True:
            await asyncio.sleep(MAINTAIN_EVERY)
            try:
                await self.membership.heartbeat()  # bounded by HEARTBEAT_TIMEOUT
            except Exception as exc:  # Redis failed or stalled: the next tick tries again
                failures.failed(exc)
            else:
                failures.succeeded()

    async def _rooms_forever(self) -> None:
        tick = 0
        failures = Repeats(log, "room maintenance")
        while True:
            await asyncio.sleep(MAINTAIN_EVERY)
            tick += 1
            try:
                async with asyncio.timeout(MAINTENANCE_TIMEOUT):
                    await self.rooms.close_idle(time.monotonic())
                    if tick % REFRESH_EVERY == 0:
                        await self.presence.refresh(self.rooms.member_rooms())
            except Exception as exc:  # Redis failed or stalled: the next tick tries again
                failures.failed(exc)
            else:
                failures.succeeded()

    async def checkpoint_forever(self) -> None:
        await self.sessions.checkpoint_forever()

    async def save_final(self, conns: Iterable[Connection]) -> None:
        """Checkpoint connections that are closing in order (what was queued is written first)."""
        self.rooms.flush()
        await self.sessions.save(conns, final=True)

    # -- connections ------------------------------------------------------------------------

    async def open_inbox(self, conn: Connection) -> None:
        """Subscribe to a new connection's inbox, so that `attach` need not wait."""
        await self.rooms.open(inbox(conn.user))

    async def attach(self, conn: Connection, *, held: bool = False) -> None:
        """A new connection: listen to its inbox. A resumed session's inbox stays `held`
        (its live frames wait) until the rejoin has replayed it."""
        self.connections.add(conn)
        self.sessions.track(conn)
        name = inbox(conn.user)
        await self.rooms.open(name)
        conn.checkpoint.start(name, self.rooms.hold(name, conn))
        if not held:
            self.rooms.release(name, conn)
        conn.rooms.add(name)

    async def detach(self, conn: Connection) -> None:
        """A closed connection: leave its rooms (its session stays resumable)."""
        self.connections.discard(conn)
        self.sessions.untrack(conn)
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
        await self.rooms.open(name)
        if conn.closing:
            return
        self.rooms.stop_replay(conn, name)  # a join again supersedes a replay in progress
        last = self.rooms.hold(name, conn)
        conn.rooms.add(name)
        greeted = False
        try:
            start = await self.rooms.start_replay(name, cmd.since, cmd.epoch, last)
            conn.send(
                encode("joined", cmd.id, room=name, seq=last, epoch=start.epoch, recovered=start.recovered)
            )
            greeted = True
            await self.sessions.joined(conn, name, start.after, start.epoch)
        except BaseException:
            if greeted:  # `joined` promised its replay: releasing at the cursor would skip it
                self.rooms.replay(conn, name, start)
            elif not already:  # no `joined` went out: not a member after all
                self.rooms.drop(name, conn)
                conn.rooms.discard(name)
                conn.checkpoint.forget(name)
            else:  # its earlier replay was stopped: only a resume can deliver the rest
                conn.close_soon(CloseCode.TRY_AGAIN, "join interrupted")
            raise
        self.rooms.replay(conn, name, start)  # in the background, paced by the socket
        if not already and name[0] != "@":
            await self.presence.join(name, conn.user)

    async def leave(self, conn: Connection, name: str, request_id: RequestId) -> None:
        if name not in conn.rooms or name == inbox(conn.user):
            raise ProtocolError(ErrorCode.NOT_JOINED, f"not joined to {name!r}")
        await self._drop_member(conn, name)
        conn.send(encode("left", request_id, room=name))
        await self.sessions.left(conn, name)

    async def members(self, conn: Connection, name: str, request_id: RequestId) -> None:
        if name not in conn.rooms or name[0] == "@":
            raise ProtocolError(ErrorCode.NOT_JOINED, f"not joined to {name!r}")
        count, users = await self.presence.members(name, MEMBERS_LIMIT)
        conn.send(encode("members", request_id, room=name, users=users, count=count))

    def publish(self, conn: Connection, cmd: Publish) -> None:
        if cmd.room not in conn.rooms or cmd.room[0] == "@":
            raise ProtocolError(ErrorCode.NOT_JOINED, f"not joined to {cmd.room!r}")
        if not conn.principal.may_join(cmd.room):
            raise ProtocolError(ErrorCode.FORBIDDEN, f"not allowed to publish to {cmd.room!r}")
        ts = int(time.time() * 1000)
        head, tail = message_halves(cmd.room, conn.user, cmd.data, ts)
        item = self._unsequenced(conn, head, tail, ts, cmd.id)
        self.forwarder.route(conn.id, cmd.room, item, _ack(conn, cmd.id, room=cmd.room))

    def direct(self, conn: Connection, cmd: Direct) -> None:
        ts = int(time.time() * 1000)
        head, tail = direct_halves(conn.user, cmd.data, ts)
        item = self._unsequenced(conn, head, tail, ts, cmd.id)
        self.forwarder.route(conn.id, inbox(cmd.to), item, _ack(conn, cmd.id, to=cmd.to))

    def submit(
        self, key: str, head: bytes, tail: bytes, ts: int, dedup: str | None
    ) -> asyncio.Future[int | None]:
        """Sequence a frame for a room or inbox on behalf of no connection (the server API).

        Resolves to the seq, or None when it could not be sequenced in time.
        """
        item = self._item(head, tail, ts, dedup)
        future: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()

        def reply(stamp: Stamp | None) -> None:
            if not future.done():
                future.set_result(None if stamp is None else stamp.seq)

        self.forwarder.route(None, key, item, reply)  # one lane per key: kept in order
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

    async def _drop_member(self, conn: Connection, name: str) -> None:
        conn.rooms.discard(name)
        self.rooms.stop_replay(conn, name)
        if self.rooms.drop(name, conn) and name[0] != "@":
            await self.presence.leave(name, conn.user)


def _ack(conn: Connection, request_id: RequestId, **target: str) -> Reply:
    """The reply to a publish or direct: `ack` with its seq and epoch, or `unavailable`."""

    def reply(stamp: Stamp | None) -> None:
        if stamp is None:
            conn.send_error(ErrorCode.UNAVAILABLE, "could not sequence the message in time", request_id)
        else:
            conn.send(encode("ack", request_id, **target, seq=stamp.seq, epoch=stamp.epoch))

    return reply
