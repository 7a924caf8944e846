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
from rtc.errors import CloseCode, ErrorCode, ProtocolError
from rtc.log import describe
from rtc.protocol import encode
from rtc.routing import hub as h
from rtc.routing.channels import Channels, Listener
from rtc.routing.pacing import EventPacer
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
    """Where a join's replay starts: its `joined` fields, the checkpoint it starts from
    (`after`: the seq before the first frame to send), and the first page of history."""

    epoch: str
    recovered: bool
    after: int
    page: list[tuple[int, bytes]] = field(default_factory=list)


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
        replay_page: int,
        replay_window: int,
    ) -> None:
        self.hub: h.Hub[Connection] = h.Hub()
        self._replay_page = replay_page  # messages per history read of a replay
        self._replay_window = replay_window  # send-buffer bytes below which the next page goes
        self._channels = channels
        self._subscriber = subscriber
        self._log = room_log
        self._tasks = tasks
        self._history_ttl = history_ttl
        self._subscriptions: dict[str, _Subscription] = {}
        self._dirty: list[str] = []  # rooms with frames queued this loop turn
        self._pacer = EventPacer()
        self._deferred: dict[str, asyncio.TimerHandle] = {}  # rooms whose events wait
        self._worker = worker
        # Per message: written to the metrics files together (`metrics.FLUSH_EVERY`).
        self._fanout_received = metrics.BatchedCounter(metrics.FANOUT_RECEIVED.labels(worker))
        self._deliveries = metrics.BatchedCounter(metrics.DELIVERIES.labels(worker))
        self._sent = metrics.BatchedCounter(metrics.MESSAGES_SENT)
        self._fanout_size = metrics.BatchedHistogram(metrics.FANOUT_SIZE)
        self._publish_to_deliver = metrics.BatchedHistogram(metrics.PUBLISH_TO_DELIVER)
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
        self._cancel_deferred(name)
        self._pacer.forget(name)
        self._subscriptions.pop(name, None)
        self.hub.forget(name)
        self._channels.forget(keys.room_channel(name))
        self._rooms_gauge.set(len(self._subscriptions))

    async def close_idle(self, now: float) -> None:
        """Unsubscribe from rooms that had no member for `IDLE_SECONDS`, all at once (after
        a mass disconnect, thousands of inboxes: the broker batches them)."""
        idle: list[str] = []
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
                idle.append(keys.room_channel(name))
        if idle:
            await self._subscriber.unsubscribe(*idle)

    def member_rooms(self) -> list[str]:
        """Rooms (not inboxes) with local members: their membership keys need refreshing."""
        return [name for name, room in self.hub.rooms.items() if room.members and name[0] != "@"]

    # -- joining ------------------------------------------------------------------------------------

    def hold(self, name: str, conn: Connection) -> int:
        """`conn` becomes a member whose live frames wait for its replay; returns the cursor."""
        self.apply(self.hub.hold(name, conn))
        return self.hub.rooms[name].cursor

    async def start_replay(self, name: str, since: int | None, epoch: str | None, last: int) -> Replay:
        """What a join with `since` (or none) gets: `joined` fields and the first page.

        `recovered` is false when the epoch differs, `since` is ahead of the room, or
        history no longer reaches since + 1; the replay then starts at what history has.
        """
        room_epoch = self.hub.rooms[name].epoch
        if since is None:
            return Replay(room_epoch, True, last)
        recovered, after = True, since
        if epoch is not None and epoch != room_epoch:
            recovered, after = False, 0
        if after >= last:
            return Replay(room_epoch, recovered and after == last, last)
        page = await self._log.history(name, after, last, self._replay_page)
        if not page or page[0][0] != after + 1:
            recovered, after = False, page[0][0] - 1 if page else last
        return Replay(room_epoch, recovered, after, page)

    def replay(self, conn: Connection, name: str, start: Replay) -> None:
        """Send the replay in the background, a page at a time, then deliver live."""
        if start.after >= self.hub.rooms[name].cursor and not start.page:
            self.release(name, conn)
            return
        task = asyncio.get_running_loop().create_task(self._replay(conn, name, start))
        conn.replays[name] = task
        task.add_done_callback(partial(_forget_replay, conn, name))

    def stop_replay(self, conn: Connection, name: str) -> None:
        task = conn.replays.pop(name, None)
        if task is not None:
            task.cancel()

    async def _replay(self, conn: Connection, name: str, start: Replay) -> None:
        """Pages of history after `start.after`, each once the socket took the previous one
        (its buffer below the window), until the room's cursor; then `release`, in the same
        loop turn as the last check, so no message falls between the replay and live."""
        position, page = start.after, start.page
        try:
            while True:
                for seq, frame in page:
                    if seq <= position:
                        continue
                    if seq > position + 1:  # trimmed from history while the replay ran
                        self._replay_gap(conn, name, position + 1, seq - 1)
                    conn.send(frame)
                    position = seq
                conn.reached(name, position)
                if not self._replaying(conn, name, start.epoch):
                    return
                if position >= self.hub.rooms[name].cursor:
                    break
                await conn.drained(self._replay_window)
                if (
                    conn.closing
                    or conn.transport.is_closing()
                    or not self._replaying(conn, name, start.epoch)
                ):
                    return
                target = self.hub.rooms[name].cursor
                page = await self._log.history(name, position, target, self._replay_page)
                if not self._replaying(conn, name, start.epoch):
                    return  # never a page of the old epoch after the new one's `joined`
                if not page:
                    self._replay_gap(conn, name, position + 1, target)
                    position = target
        except Exception as exc:  # Redis failed mid-replay: the client resumes later
            log.warning("replay of %s failed: %s", name, exc)
            conn.close_soon(CloseCode.TRY_AGAIN, "replay interrupted")
            return
        self.release(name, conn)

    def _replaying(self, conn: Connection, name: str, epoch: str) -> bool:
        """Still `conn`'s replay of `epoch`: not left, and history not lost meanwhile (the
        hub's `Restart` told the members and released them into the new epoch)."""
        room = self.hub.rooms.get(name)
        return room is not None and room.epoch == epoch and self.hub.holding(name, conn)

    def _replay_gap(self, conn: Connection, name: str, first: int, last: int) -> None:
        metrics.GAPS_REPORTED.labels(self._worker).inc()
        conn.send(encode("gap", room=name, **{"from": first, "to": last}))

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
                case h.Flush(room=name, messages=messages):
                    self._schedule(name, messages)
                case h.Write():
                    self._write(effect)
                case h.Delivered(members=count, ts=ts):
                    self._deliveries.inc(count)
                    self._sent.inc(count)
                    self._fanout_size.observe(count)
                    if ts:
                        self._publish_to_deliver.observe(max(0.0, time.time() - ts / 1000))
                case h.Fill():
                    self._tasks.spawn(self._fill(effect))
                case h.Resync():
                    self._tasks.spawn(self._resync(effect))
                case h.Restart(room=name, members=members, seq=seq, epoch=epoch):
                    metrics.EPOCH_CHANGES.labels(self._worker).inc()
                    log.warning(
                        "history epoch of %s changed (Redis lost it): now %s, replaying its %d messages",
                        name,
                        epoch,
                        seq,
                    )
                    for conn in members:
                        conn.checkpoint.start(name, 0)  # the new epoch's seqs follow from 1
                        conn.send(encode("joined", room=name, seq=seq, epoch=epoch, recovered=False))
                case h.Gap(room=name, first=first, last=last):
                    metrics.GAPS_REPORTED.labels(self._worker).inc()
                    log.warning("gap in %s: %d..%d not in history", name, first, last)

    def _schedule(self, name: str, messages: bool) -> None:
        """Flush at the end of this turn; events alone when the room's pacing allows."""
        if not messages:
            loop = asyncio.get_running_loop()
            now = loop.time()
            due = self._pacer.due(name, now)
            if due > now:
                if name not in self._deferred:
                    self._deferred[name] = loop.call_at(due, self._flush_deferred, name)
                return
        self._dirty.append(name)
        if len(self._dirty) == 1:
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Write what the rooms queued this turn (also before anything that reads cursors)."""
        dirty, self._dirty = self._dirty, []
        now = asyncio.get_running_loop().time()
        for name in dirty:
            self._flush_room(name, now)

    def _flush_deferred(self, name: str) -> None:
        self._flush_room(name, asyncio.get_running_loop().time())

    def _flush_room(self, name: str, now: float) -> None:
        """Write the room's queue (waiting events too, before any message behind them)."""
        self._cancel_deferred(name)
        write = self.hub.flush(name)
        if write is not None:
            self._write(write)
            self._pacer.written(name, now)

    def _cancel_deferred(self, name: str) -> None:
        """The room's waiting events go out now, or never: drop their timer."""
        timer = self._deferred.pop(name, None)
        if timer is not None:
            timer.cancel()

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
            log.warning("history read for %s failed: %s", fill.room, describe(exc))
            self.apply(self.hub.fill_failed(fill.room))
            return
        self.apply(self.hub.filled(fill.room, entries))

    async def _resync(self, resync: h.Resync) -> None:
        if resync.delay:
            await asyncio.sleep(resync.delay)
        try:
            seq, epoch = await self._log.open_room(resync.room, self._history_ttl)
        except Exception as exc:
            log.warning("resync of %s failed: %s", resync.room, describe(exc))
            self.apply(self.hub.resync_failed(resync.room))
            return
        self.apply(self.hub.resynced(resync.room, seq, epoch))


def _forget_replay(conn: Connection, name: str, task: asyncio.Task[None]) -> None:
    if conn.replays.get(name) is task:
        del conn.replays[name]
