"""The Redis broker: scripts for seq/history/membership, one pub/sub connection per worker.

The pub/sub reader is the only consumer of subscribed channels. It tracks which
subscriptions Redis has confirmed; a second confirmation of a channel means the
connection was re-established (by redis-py or by the watchdog here), so the handler
is told that messages may have been missed and fills the hole from history.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT

from rtc import keys, metrics
from rtc.broker import scripts
from rtc.broker.base import BrokerHandler, Sequenced, SlotTaken, Unsequenced

__all__ = ["RedisBroker"]

log = logging.getLogger("rtc.broker")

_PING_EVERY = 5.0
_SILENCE_LIMIT = 15.0  # no reply to a PING this long: the pub/sub connection is dead
_TIMEOUT = 5.0


class _Timed:
    """Times a Redis round trip into `rtc_redis_command_seconds{op}`; counts failures."""

    __slots__ = ("_op", "_start")

    def __init__(self, op: str) -> None:
        self._op = op
        self._start = 0.0

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, kind: type[BaseException] | None, *_: Any) -> None:
        metrics.REDIS_SECONDS.labels(self._op).observe(time.perf_counter() - self._start)
        if kind is not None and issubclass(kind, (RedisError, OSError, asyncio.TimeoutError)):
            metrics.REDIS_ERRORS.labels(self._op).inc()


class RedisBroker:
    """`Broker` over one Redis server (`redis://`, `rediss://` or `unix://`)."""

    def __init__(self, url: str, handler: BrokerHandler, worker: str) -> None:
        self._handler = handler
        self._worker = worker
        self._redis = aioredis.Redis.from_url(
            url,
            socket_timeout=_TIMEOUT,
            socket_connect_timeout=_TIMEOUT,
            retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), 3),
            max_connections=64,
        )
        self._pubsub = self._redis.pubsub()
        self._confirmed: set[bytes] = set()
        self._waiters: dict[bytes, asyncio.Future[None]] = {}
        self._leaving: dict[bytes, asyncio.Future[None]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._last_heard = time.monotonic()
        self._scripts = {
            name: self._redis.register_script(getattr(scripts, name))
            for name in ("OPEN_ROOM", "SEQUENCE", "JOIN", "LEAVE", "PRESENCE_GONE", "MEMBERS")
        }

    async def start(self) -> None:
        """Check Redis answers and start the pub/sub reader."""
        await self._redis.ping()
        self._reader = asyncio.create_task(self._read_forever(), name="rtc-pubsub")

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        with contextlib.suppress(RedisError, OSError):
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        await self._redis.aclose()

    async def ping(self) -> bool:
        try:
            with _Timed("ping"):
                return bool(await self._redis.ping())
        except (RedisError, OSError):
            return False

    # -- ring ---------------------------------------------------------------------------

    async def heartbeat(self, slot: str, instance: str, ttl_ms: int) -> list[str]:
        """Renew this slot's lease and return the live slots. SlotTaken if another owns it."""
        now = int(time.time() * 1000)
        with _Timed("heartbeat"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hget(keys.RING_OWNERS, slot)
                pipe.zscore(keys.RING, slot)
                holder, deadline = await pipe.execute()
            if holder not in (None, instance.encode()) and deadline is not None and deadline > now:
                raise SlotTaken(slot)
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(keys.RING_OWNERS, slot, instance)
                pipe.zadd(keys.RING, {slot: now + ttl_ms})
                pipe.zremrangebyscore(keys.RING, "-inf", now)
                pipe.zrange(keys.RING, 0, -1)
                *_, live = await pipe.execute()
        return [s.decode() for s in live]

    async def live_slots(self) -> list[str]:
        now = int(time.time() * 1000)
        with _Timed("heartbeat"):
            live = await self._redis.zrangebyscore(keys.RING, now, "+inf")
        return [_text(s) for s in live]

    async def leave_ring(self, slot: str) -> None:
        with _Timed("heartbeat"):
            await self._redis.zrem(keys.RING, slot)

    # -- pub/sub ---------------------------------------------------------------------------

    async def subscribe(self, channel: str) -> None:
        """Subscribe and wait until Redis confirmed it: later publishes will reach us."""
        name = channel.encode()
        waiter = self._waiters.get(name)
        if waiter is None:
            waiter = self._waiters[name] = asyncio.get_running_loop().create_future()
            with _Timed("subscribe"):
                await self._pubsub.subscribe(name)
        await asyncio.wait_for(asyncio.shield(waiter), _TIMEOUT)

    async def unsubscribe(self, channel: str) -> None:
        """Unsubscribe and wait for Redis to confirm: nothing more arrives on `channel`."""
        name = channel.encode()
        self._waiters.pop(name, None)
        self._confirmed.discard(name)
        waiter = self._leaving[name] = asyncio.get_running_loop().create_future()
        with _Timed("subscribe"):
            await self._pubsub.unsubscribe(name)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(waiter, _TIMEOUT)

    async def publish_many(self, messages: Sequence[tuple[str, bytes]]) -> list[int]:
        """PUBLISH in order over one connection; returns each message's receiver count."""
        with _Timed("publish"):
            async with self._redis.pipeline(transaction=False) as pipe:
                for channel, payload in messages:
                    pipe.publish(channel, payload)
                return [int(n) for n in await pipe.execute()]

    async def _read_forever(self) -> None:
        backoff = 0.05
        next_ping = time.monotonic() + _PING_EVERY
        while True:
            if not self._pubsub.subscribed:
                await asyncio.sleep(0.05)  # nothing subscribed yet: nothing to read
                continue
            try:
                message = await self._pubsub.get_message(timeout=1.0)
                now = time.monotonic()
                if message is not None:
                    self._last_heard = now
                    self._dispatch(message)
                if now >= next_ping:
                    next_ping = now + _PING_EVERY
                    await self._pubsub.ping()
                if now - self._last_heard > _SILENCE_LIMIT:
                    raise ConnectionError("pub/sub connection silent")
                backoff = 0.05
            except asyncio.CancelledError:
                raise
            except (TimeoutError, RedisError, OSError, ConnectionError) as exc:
                log.warning("pubsub connection lost: %s; reconnecting", exc)
                metrics.PUBSUB_RECONNECTS.labels(self._worker).inc()
                metrics.REDIS_UP.labels(self._worker).set(0)
                if self._pubsub.connection is not None:
                    await self._pubsub.connection.disconnect()
                self._last_heard = time.monotonic()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "message":
            self._handler.on_channel_message(message["channel"], message["data"])
        elif kind == "subscribe":
            channel = message["channel"]
            metrics.REDIS_UP.labels(self._worker).set(1)
            if channel in self._confirmed:
                self._handler.on_resubscribed(channel)
            self._confirmed.add(channel)
            waiter = self._waiters.get(channel)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        elif kind == "unsubscribe":
            waiter = self._leaving.pop(message["channel"], None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    # -- rooms -----------------------------------------------------------------------------

    async def open_room(self, room: str, ttl: int) -> tuple[int, str]:
        """The room's last seq and epoch, creating the epoch if the room is new."""
        with _Timed("open_room"):
            seq, epoch = await self._scripts["OPEN_ROOM"](
                keys=[keys.room_meta(room), keys.room_history(room)], args=[ttl]
            )
        return int(seq), epoch.decode()

    async def sequence(
        self, room: str, batch: Sequence[Unsequenced], history_size: int, ttl: int
    ) -> Sequenced:
        """Give a batch of publishes their seqs, append them to history, fan them out."""
        script_keys = [keys.room_meta(room), keys.room_history(room)]
        args: list[Any] = [keys.room_channel(room), history_size, ttl, len(batch)]
        for item in batch:
            index = 0
            if item.dedup is not None:
                script_keys.append(keys.dedup(room, item.dedup))
                index = len(script_keys)
            args.extend((item.head, item.tail, item.ts, index))
        with _Timed("sequence"):
            epoch, *seqs = await self._scripts["SEQUENCE"](keys=script_keys, args=args)
        return Sequenced(epoch.decode(), [int(s) for s in seqs])

    async def history(self, room: str, after: int, upto: int) -> list[tuple[int, bytes]]:
        """Frames with seq in (after, upto], as far as history still has them."""
        if upto <= after:
            return []
        with _Timed("history"):
            entries = await self._redis.xrange(keys.room_history(room), f"{after + 1}-1", f"{upto}-1")
        frames: list[tuple[int, bytes]] = []
        for entry_id, fields in entries or ():
            frame = (fields or {}).get(b"f")
            if isinstance(frame, bytes):
                frames.append((int(_text(entry_id).split("-")[0]), frame))
        return frames

    # -- membership and presence -------------------------------------------------------------

    async def join(
        self, room: str, slot: str, user: str, presence: bytes, presence_max: int, ttl: int
    ) -> int:
        with _Timed("membership"):
            estimate = await self._scripts["JOIN"](
                keys=[keys.members(room, slot), keys.member_slots(room), keys.presence(room)],
                args=[
                    user,
                    slot,
                    ttl,
                    keys.members(room, ""),
                    keys.room_channel(room),
                    presence,
                    presence_max,
                ],
            )
        return int(estimate)

    async def leave(self, room: str, slot: str, user: str) -> bool:
        """True when this slot has no connection of `user` in `room` any more."""
        with _Timed("membership"):
            return bool(await self._scripts["LEAVE"](keys=[keys.members(room, slot)], args=[user]))

    async def presence_gone(self, room: str, user: str, presence: bytes, presence_max: int) -> bool:
        with _Timed("membership"):
            return bool(
                await self._scripts["PRESENCE_GONE"](
                    keys=[keys.member_slots(room), keys.presence(room)],
                    args=[user, keys.members(room, ""), keys.room_channel(room), presence, presence_max],
                )
            )

    async def members(self, room: str, limit: int) -> tuple[int, list[str]]:
        with _Timed("membership"):
            count, *users = await self._scripts["MEMBERS"](
                keys=[keys.member_slots(room)], args=[keys.members(room, ""), limit]
            )
        return int(count), [u.decode() for u in users]

    async def refresh_members(self, slot: str, rooms: Sequence[str], ttl: int) -> None:
        """Keep this slot's membership keys alive; a dead worker's expire on their own."""
        if not rooms:
            return
        with _Timed("membership"):
            async with self._redis.pipeline(transaction=False) as pipe:
                for room in rooms:
                    pipe.expire(keys.members(room, slot), ttl)
                await pipe.execute()

    # -- sessions ------------------------------------------------------------------------------

    async def save_sessions(self, sessions: Mapping[str, Mapping[str, str]], ttl: int) -> None:
        if not sessions:
            return
        with _Timed("session"):
            async with self._redis.pipeline(transaction=False) as pipe:
                for sid, fields in sessions.items():
                    pipe.hset(keys.session(sid), mapping=_fields(fields))
                    pipe.expire(keys.session(sid), ttl)
                await pipe.execute()

    async def drop_session_rooms(self, sid: str, rooms: Sequence[str]) -> None:
        with _Timed("session"):
            await self._redis.hdel(keys.session(sid), *(f"r:{room}" for room in rooms))

    async def load_session(self, sid: str) -> dict[str, str]:
        with _Timed("session"):
            raw = await self._redis.hgetall(keys.session(sid))
        return {_text(k): _text(v) for k, v in raw.items()}

    # -- host control --------------------------------------------------------------------------

    async def set_fields(self, key: str, fields: Mapping[str, str], ttl: int) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=_fields(fields))
            pipe.expire(key, ttl)
            await pipe.execute()

    async def get_fields(self, key: str) -> dict[str, str]:
        raw = await self._redis.hgetall(key)
        return {_text(k): _text(v) for k, v in raw.items()}

    async def delete(self, key: str) -> None:
        await self._redis.delete(key)



def _text(value: object) -> str:
    """redis-py answers bytes (decode_responses is off: frames stay bytes end to end)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _fields(fields: Mapping[str, str]) -> dict[FieldT, EncodableT]:
    return dict(fields.items())
