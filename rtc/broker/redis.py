"""The Redis brokers' shared core, and the broker for one Redis server.

`RedisCore` holds everything that is the same on one server and on Redis Cluster: the
scripts for seq/history/membership, ring, sessions and host control, and the pub/sub
reader. Subclasses say how to reach Redis, which command fans out (PUBLISH or SPUBLISH)
and how a channel is (un)subscribed.

A reader is the only consumer of its pub/sub connection. The core tracks which
subscriptions Redis has confirmed; a second confirmation of a channel means the
subscription was re-established (by redis-py, by the watchdog here, or on another
cluster node), so the handler is told that messages may have been missed and fills the
hole from history.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import redis.asyncio as aioredis
from redis.asyncio import BlockingConnectionPool
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import NoScriptError, RedisClusterException, RedisError
from redis.typing import EncodableT, FieldT

from rtc import keys, metrics
from rtc.broker import scripts
from rtc.broker.base import BrokerHandler, Sequenced, SlotTaken, Unsequenced
from rtc.log import describe

__all__ = ["LOST", "RedisBroker", "RedisCore", "client_options", "stop_task"]

log = logging.getLogger("rtc.broker")

_PING_EVERY = 5.0
_SILENCE_LIMIT = 15.0  # no reply to a PING this long: the pub/sub connection is dead
_TIMEOUT = 5.0
# What a lost or misrouted pub/sub connection raises (RedisClusterException is no RedisError).
LOST = (TimeoutError, RedisError, RedisClusterException, OSError, ConnectionError)
_MESSAGE = frozenset({"message", "smessage"})
_SUBSCRIBED = frozenset({"subscribe", "ssubscribe"})
_UNSUBSCRIBED = frozenset({"unsubscribe", "sunsubscribe"})


def client_options() -> dict[str, Any]:
    """Timeouts and retries every Redis connection of a worker uses."""
    return {
        "socket_timeout": _TIMEOUT,
        "socket_connect_timeout": _TIMEOUT,
        # Short waits between retries: a command retrying while Redis restarts notices it
        # is back within a quarter second (a publish must be answered within 2 s anyway).
        "retry": Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.25), 3),
    }


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
        if kind is not None and issubclass(kind, LOST):
            metrics.REDIS_ERRORS.labels(self._op).inc()


class RedisCore(ABC):
    """`Broker` over a Redis client, one server's or a cluster's; see the module docstring."""

    PUBLISH: ClassVar[str]  # the fan-out command, in `publish_many` and in the scripts
    RING_ATOMIC: ClassVar[bool]  # ring keys share a server: heartbeat in MULTI/EXEC

    def __init__(self, client: aioredis.Redis | RedisCluster, handler: BrokerHandler, worker: str) -> None:
        self._redis = client
        self._handler = handler
        self._worker = worker
        self._confirmed: set[bytes] = set()
        self._waiters: dict[bytes, asyncio.Future[None]] = {}
        self._leaving: dict[bytes, asyncio.Future[None]] = {}
        self._scripts = {
            name: client.register_script(text) for name, text in scripts.texts(self.PUBLISH).items()
        }

    @abstractmethod
    async def start(self) -> None:
        """Check Redis answers and start reading pub/sub."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def _listen(self, name: bytes) -> None:
        """Send the subscription of `name`; its confirmation arrives through a reader."""

    @abstractmethod
    async def _unlisten(self, name: bytes) -> None:
        """Send the end of the subscription of `name`."""

    @abstractmethod
    async def _lost(self) -> None:
        """A reader's connection failed (its next read reconnects and resubscribes)."""

    @abstractmethod
    def _dropped(self, channel: bytes) -> None:
        """Redis ended a subscription nobody asked to end (a cluster slot moved away)."""

    @abstractmethod
    async def _ping(self) -> bool:
        """PING what must answer for Redis to count as reachable; raises when it does not."""

    async def ping(self) -> bool:
        try:
            with _Timed("ping"):
                return await self._ping()
        except LOST:
            return False

    # -- ring ---------------------------------------------------------------------------

    async def heartbeat(self, slot: str, instance: str, ttl_ms: int) -> list[str]:
        """Renew this slot's lease and return the live slots. SlotTaken if another owns it."""
        now = int(time.time() * 1000)
        with _Timed("heartbeat"):
            async with self._redis.pipeline(transaction=self.RING_ATOMIC) as pipe:
                pipe.hget(keys.RING_OWNERS, slot)
                pipe.zscore(keys.RING, slot)
                holder, deadline = await pipe.execute()
            if holder not in (None, instance.encode()) and deadline is not None and deadline > now:
                raise SlotTaken(slot)
            async with self._redis.pipeline(transaction=self.RING_ATOMIC) as pipe:
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
            try:
                with _Timed("subscribe"):
                    await self._listen(name)
            except BaseException:
                del self._waiters[name]  # never sent: the next subscribe must send it again
                raise
        await asyncio.wait_for(asyncio.shield(waiter), _TIMEOUT)

    async def unsubscribe(self, channel: str) -> None:
        """Unsubscribe and wait for Redis to confirm: nothing more arrives on `channel`."""
        name = channel.encode()
        self._waiters.pop(name, None)
        self._confirmed.discard(name)
        waiter = self._leaving[name] = asyncio.get_running_loop().create_future()
        with _Timed("subscribe"):
            await self._unlisten(name)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(waiter, _TIMEOUT)

    async def publish_many(self, messages: Sequence[tuple[str, bytes]]) -> list[int]:
        """Publish in order (per channel); returns each message's receiver count."""
        with _Timed("publish"):
            async with self._redis.pipeline(transaction=False) as pipe:
                for channel, payload in messages:
                    pipe.execute_command(self.PUBLISH, channel, payload)
                return [int(n) for n in await pipe.execute()]

    async def _read(self, pubsub: PubSub, alive: Callable[[], bool]) -> None:
        """Dispatch what arrives on `pubsub` while `alive()`, with a PING watchdog."""
        backoff = 0.05
        last_heard = time.monotonic()
        next_ping = last_heard + _PING_EVERY
        while alive():
            if not pubsub.subscribed:
                await asyncio.sleep(0.05)  # nothing subscribed yet: nothing to read
                continue
            try:
                message = await pubsub.get_message(timeout=1.0)
                now = time.monotonic()
                if message is not None:
                    last_heard = now
                    self._dispatch(message)
                if now >= next_ping:
                    next_ping = now + _PING_EVERY
                    await pubsub.ping()
                if now - last_heard > _SILENCE_LIMIT:
                    raise ConnectionError("pub/sub connection silent")
                backoff = 0.05
            except asyncio.CancelledError:
                raise
            except LOST as exc:
                log.warning("pubsub connection lost: %s; reconnecting", describe(exc))
                metrics.PUBSUB_RECONNECTS.labels(self._worker).inc()
                metrics.REDIS_UP.labels(self._worker).set(0)
                if pubsub.connection is not None:
                    await pubsub.connection.disconnect()
                last_heard = time.monotonic()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                await self._lost()

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind in _MESSAGE:
            self._handler.on_channel_message(message["channel"], message["data"])
        elif kind in _SUBSCRIBED:
            channel = message["channel"]
            metrics.REDIS_UP.labels(self._worker).set(1)
            if channel in self._confirmed:
                self._handler.on_resubscribed(channel)
            self._confirmed.add(channel)
            waiter = self._waiters.get(channel)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        elif kind in _UNSUBSCRIBED:
            waiter = self._leaving.pop(message["channel"], None)
            if waiter is None:
                self._dropped(message["channel"])
            elif not waiter.done():
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
        script_keys, args = _sequence_call(room, batch, history_size, ttl)
        with _Timed("sequence"):
            reply = await self._scripts["SEQUENCE"](keys=script_keys, args=args)
        return _sequenced(reply)

    async def sequence_many(
        self, batches: Mapping[str, Sequence[Unsequenced]], history_size: int, ttl: int
    ) -> dict[str, Sequenced | Exception]:
        """`sequence` for several rooms in one round trip (a pipeline of EVALSHA)."""
        script = self._scripts["SEQUENCE"]
        calls = {room: _sequence_call(room, batch, history_size, ttl) for room, batch in batches.items()}
        results: dict[str, Sequenced | Exception] = {}
        for attempt in range(2):
            with _Timed("sequence"):
                async with self._redis.pipeline(transaction=False) as pipe:
                    for script_keys, args in calls.values():
                        pipe.evalsha(script.sha, len(script_keys), *script_keys, *args)
                    replies = await pipe.execute(raise_on_error=False)
            for room, reply in zip(calls, replies, strict=True):
                results[room] = reply if isinstance(reply, Exception) else _sequenced(reply)
            missing = [room for room in calls if isinstance(results[room], NoScriptError)]
            if not missing or attempt:
                break
            await self._redis.script_load(script.script)  # Redis restarted: it ran nothing
            calls = {room: calls[room] for room in missing}
        return results

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
        async with self._redis.pipeline(transaction=True) as pipe:  # one key: one slot
            pipe.hset(key, mapping=_fields(fields))
            pipe.expire(key, ttl)
            await pipe.execute()

    async def get_fields(self, key: str) -> dict[str, str]:
        raw = await self._redis.hgetall(key)
        return {_text(k): _text(v) for k, v in raw.items()}

    async def delete(self, key: str) -> None:
        await self._redis.delete(key)


class RedisBroker(RedisCore):
    """`Broker` over one Redis server (`redis://`, `rediss://` or `unix://`): one pub/sub connection."""

    PUBLISH = "PUBLISH"
    RING_ATOMIC = True

    def __init__(self, url: str, handler: BrokerHandler, worker: str) -> None:
        # A blocking pool: a burst of handshakes waits for a connection instead of failing.
        pool = BlockingConnectionPool.from_url(url, max_connections=64, timeout=_TIMEOUT, **client_options())
        self._server = aioredis.Redis.from_pool(pool)  # closes the pool with the client
        super().__init__(self._server, handler, worker)
        self._pubsub = self._server.pubsub()
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._ping()
        self._reader = asyncio.create_task(self._read(self._pubsub, lambda: True), name="rtc-pubsub")

    async def close(self) -> None:
        await stop_task(self._reader)
        with contextlib.suppress(RedisError, OSError):
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        await self._server.aclose()

    async def _ping(self) -> bool:
        return bool(await self._server.ping())

    async def _listen(self, name: bytes) -> None:
        await self._pubsub.subscribe(name)

    async def _unlisten(self, name: bytes) -> None:
        await self._pubsub.unsubscribe(name)

    async def _lost(self) -> None:
        """Nothing to re-route: the one server's connection comes back on the next read."""

    def _dropped(self, channel: bytes) -> None:
        """One server ends a subscription only when asked to."""


async def stop_task(task: asyncio.Task[None] | None) -> None:
    """Cancel a background task and wait until it has finished."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _sequence_call(
    room: str, batch: Sequence[Unsequenced], history_size: int, ttl: int
) -> tuple[list[str], list[Any]]:
    """Keys and arguments of the SEQUENCE script for one room's batch."""
    script_keys = [keys.room_meta(room), keys.room_history(room)]
    args: list[Any] = [keys.room_channel(room), history_size, ttl, len(batch)]
    for item in batch:
        index = 0
        if item.dedup is not None:
            script_keys.append(keys.dedup(room, item.dedup))
            index = len(script_keys)
        args.extend((item.head, item.tail, item.ts, index))
    return script_keys, args


def _sequenced(reply: list[Any]) -> Sequenced:
    epoch, *seqs = reply
    return Sequenced(_text(epoch), [int(s) for s in seqs])


def _text(value: object) -> str:
    """redis-py answers bytes (decode_responses is off: frames stay bytes end to end)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _fields(fields: Mapping[str, str]) -> dict[FieldT, EncodableT]:
    return dict(fields.items())
