"""Local delivery: this worker's room subscriptions, driving the hub and carrying out its effects.

The hub decides (cursor, backlog, held replay, gaps); this module does what it asks:
subscribes and reads the room's seq, reads history for fills and resyncs (retrying
after the delay the hub gives), and writes frames to the members' sockets once per loop
turn.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from functools import partial

from rtc import keys, metrics
from rtc.broker.base import RoomLog, Subscriber
from rtc.connection import Connection
from rtc.errors import ErrorCode, ProtocolError
from rtc.protocol import encode
from rtc.routing import hub as h
from rtc.routing.channels import Channels, Listener
from rtc.routing.tasks import Tasks

__all__ = ["IDLE_SECONDS", "LocalRooms", "Replay"]

log = logging.getLogger("rtc.delivery")

IDLE_SECONDS = 5.0  # a room without members keeps its subscription this long


@dataclass(eq=False, slots=True)
class _Subscription:
    """The I/O side of a local room: its subscription's readiness and users."""

    ready: asyncio.Future[None]
    joining: int = 0
    idle_since: float = 0.0


@dataclass(frozen=True, slots=True)
class Replay:
    """What a join sends: `joined` fields, then `frames` in order."""

    seq: int
    epoch: str
    recovered: bool
    frames: list[bytes] = field(default_factory=list)


class LocalRooms:
    """The rooms with members on this worker."""

    def __init__(
        self,
        channels: Channels,
        subscriber: Subscriber,
        room_log: RoomLog,
        tasks: Tasks,
        history_ttl: int,
        worker: str,
    ) -> None:
        self.hub: h.Hub[Connection] = h.Hub()
        self._channels = channels
        self._subscriber = subscriber
        self._log = room_log
        self._tasks = tasks
        self._history_ttl = history_ttl
        self._subscriptions: dict[str, _Subscription] = {}
        self._dirty: list[str] = []  # rooms with frames queued this loop turn
        self._worker = worker
        self._fanout_received = metrics.FANOUT_RECEIVED.labels(worker)
        self._deliveries = metrics.DELIVERIES.labels(worker)
        self._rooms_gauge = metrics.ROOMS.labels(worker)

    def __contains__(self, name: str) -> bool:
        return name in self.hub.rooms

    def epoch(self, name: str) -> str:
        return self.hub.rooms[name].epoch

    # -- opening and closing ----------------------------------------------------------------

    async def open(self, name: str) -> h.Room[Connection]:
        """The local room, subscribed and live (records wait in the hub until it is)."""
        sub = self._subscriptions.get(name)
        if sub is not None:
            if not sub.ready.done():
                sub.joining += 1
                try:
                    await asyncio.shield(sub.ready)
                finally:
                    sub.joining -= 1
            return self.hub.rooms[name]
        sub = self._subscriptions[name] = _Subscription(asyncio.get_running_loop().create_future())
        room = self.hub.open(name)
        channel = keys.room_channel(name)
        self._channels.listen(
            channel, Listener(partial(self._on_message, name), partial(self._on_resubscribed, name))
        )
        self._rooms_gauge.set(len(self._subscriptions))
        sub.joining += 1
        try:
            await self._subscriber.subscribe(channel)
            seq, epoch = await self._log.open_room(name, self._history_ttl)
        except Exception as exc:
            self._forget(name)
            error = ProtocolError(ErrorCode.UNAVAILABLE, "Redis unavailable")
            sub.ready.set_exception(error)
            sub.ready.exception()  # mark retrieved; concurrent joiners re-raise it
            raise error from exc
        finally:
            sub.joining -= 1
        sub.ready.set_result(None)
        self.apply(self.hub.opened(name, seq, epoch))
        return room

    def _forget(self, name: str) -> None:
        self._subscriptions.pop(name, None)
        self.hub.forget(name)
        self._channels.forget(keys.room_channel(name))
        self._rooms_gauge.set(len(self._subscriptions))

    async def close_idle(self, now: float) -> None:
        """Unsubscribe from rooms that had no member for `IDLE_SECONDS`."""
        for name, sub in list(self._subscriptions.items()):
            room = self.hub.rooms.get(name)
            if room is None:
                continue
            if room.members or sub.joining or room.phase is not h.Phase.LIVE:
                sub.idle_since = 0.0
            elif not sub.idle_since:
                sub.idle_since = now
            elif now - sub.idle_since > IDLE_SECONDS:
                self._forget(name)
                await self._subscriber.unsubscribe(keys.room_channel(name))

    def member_rooms(self) -> list[str]:
        """Rooms (not inboxes) with local members: their membership keys need refreshing."""
        return [name for name, room in self.hub.rooms.items() if room.members and name[0] != "@"]

    # -- joining ------------------------------------------------------------------------------------

    def hold(self, name: str, conn: Connection) -> int:
        """`conn` becomes a member whose live frames wait for its replay; returns the cursor."""
        self.apply(self.hub.hold(name, conn))
        return self.hub.rooms[name].cursor

    async def replay(self, name: str, since: int | None, epoch: str | None, last: int) -> Replay:
        """`joined` fields and the frames (since, last] a join with `since` gets."""
        room_epoch = self.hub.rooms[name].epoch
        if since is None:
            return Replay(last, room_epoch, True)
        recovered, after = True, since
        if epoch is not None and epoch != room_epoch:
            recovered, after = False, 0
        if after > last:
            return Replay(last, room_epoch, False)
        entries = await self._log.history(name, after, last)
        contiguous = all(seq == after + 1 + i for i, (seq, _) in enumerate(entries))
        if len(entries) != last - after or not contiguous:
            recovered = False
        return Replay(last, room_epoch, recovered, [frame for _, frame in entries])

    def release(self, name: str, conn: Connection) -> None:
        self.apply(self.hub.release(name, conn))

    def drop(self, name: str, conn: Connection) -> bool:
        """`conn` leaves the room; False when it was no member here."""
        return self.hub.drop(name, conn)

    # -- what arrives --------------------------------------------------------------------------------

    def _on_message(self, name: str, payload: bytes) -> None:
        if not payload.startswith(b"0 "):  # presence events (`0 0 <frame>`) are no message
            self._fanout_received.inc(payload.count(b"\n") + 1)  # one record per message
        self.apply(self.hub.receive(name, payload))

    def _on_resubscribed(self, name: str) -> None:
        self.apply(self.hub.resubscribed(name))

    # -- effects --------------------------------------------------------------------------------------

    def apply(self, effects: list[h.Effect[Connection]]) -> None:
        for effect in effects:
            match effect:
                case h.Flush(room=name):
                    self._dirty.append(name)
                    if len(self._dirty) == 1:
                        asyncio.get_running_loop().call_soon(self.flush)
                case h.Write():
                    self._write(effect)
                case h.Delivered(members=count, ts=ts):
                    self._deliveries.inc(count)
                    metrics.MESSAGES_SENT.inc(count)
                    metrics.FANOUT_SIZE.observe(count)
                    if ts:
                        metrics.PUBLISH_TO_DELIVER.observe(max(0.0, time.time() - ts / 1000))
                case h.Fill():
                    self._tasks.spawn(self._fill(effect))
                case h.Resync():
                    self._tasks.spawn(self._resync(effect))
                case h.Restart(room=name, members=members, seq=seq, epoch=epoch):
                    for conn in members:
                        conn.checkpoint.start(name, seq)
                        conn.send(encode("joined", room=name, seq=seq, epoch=epoch, recovered=False))
                case h.Gap(room=name, first=first, last=last):
                    metrics.GAPS_REPORTED.labels(self._worker).inc()
                    log.warning("gap in %s: %d..%d not in history", name, first, last)

    def flush(self) -> None:
        """Write what the rooms queued this turn (also before anything that reads cursors)."""
        dirty, self._dirty = self._dirty, []
        for name in dirty:
            write = self.hub.flush(name)
            if write is not None:
                self._write(write)

    @staticmethod
    def _write(write: h.Write[Connection]) -> None:
        name, data, marks = write.room, write.data, write.marks
        if not write.variants:
            for conn in write.members:
                conn.deliver(name, data, marks)
            return
        for conn in write.members:
            mine, my_marks = write.for_member(conn)
            if mine:  # empty: the turn held nothing but this user's own presence events
                conn.deliver(name, mine, my_marks)

    async def _fill(self, fill: h.Fill) -> None:
        if fill.delay:
            await asyncio.sleep(fill.delay)
        else:
            metrics.GAPS_FILLED.labels(self._worker).inc()
        try:
            entries = await self._log.history(fill.room, fill.after, fill.upto)
        except Exception as exc:
            log.warning("history read for %s failed: %s", fill.room, exc)
            self.apply(self.hub.fill_failed(fill.room))
            return
        self.apply(self.hub.filled(fill.room, entries))

    async def _resync(self, resync: h.Resync) -> None:
        if resync.delay:
            await asyncio.sleep(resync.delay)
        try:
            seq, epoch = await self._log.open_room(resync.room, self._history_ttl)
        except Exception as exc:
            log.warning("resync of %s failed: %s", resync.room, exc)
            self.apply(self.hub.resync_failed(resync.room))
            return
        self.apply(self.hub.resynced(resync.room, seq, epoch))
