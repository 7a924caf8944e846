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
from collections.abc import Callable, Iterator, Mapping, Sequence
from itertools import chain
from typing import Any, ClassVar

import redis.asyncio as aioredis
from redis._parsers.hiredis import NOT_ENOUGH_DATA  # hiredis's "no complete reply yet"
from redis.asyncio import BlockingConnectionPool
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisClusterException, RedisError
from redis.typing import EncodableT, FieldT

from rtc import keys, metrics
from rtc.broker import scripts
from rtc.broker.base import BrokerHandler, Sequenced, SlotTaken, Unsequenced
from rtc.broker.lanes import (
    OwnConnection,
    Pipeliner,
    RoundTrip,
    Subscriptions,
    checked,
    evalsha,
    pipeline_round_trip,
    stop_task,
)
from rtc.log import describe

__all__ = ["LOST", "RedisBroker", "RedisCore", "client_options"]

log = logging.getLogger("rtc.broker")

_PING_EVERY = 5.0
_SILENCE_LIMIT = 15.0  # no reply to a PING this long: the pub/sub connection is dead
_TIMEOUT = 5.0
_ROOMS_PER_CALL = 256  # rooms one SEQUENCE call takes: a few ms of Redis at most
# What a lost or misrouted pub/sub connection raises (RedisClusterException is no RedisError).
LOST = (TimeoutError, RedisError, RedisClusterException, OSError, ConnectionError)
_MESSAGE = frozenset({"message", "smessage"})
_MESSAGE_KINDS = frozenset({b"message", b"smessage"})
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
    """Times a Redis round trip into `rtc_redis_command_seconds{op}`; counts failures.

    Made from children labelled once (`_children`): `labels()` costs a lock and a dict
    lookup per call, too much for every command of a connect storm.
    """

    __slots__ = ("_errors", "_seconds", "_start")

    def __init__(self, children: tuple[Any, Any]) -> None:
        self._seconds, self._errors = children
        self._start = 0.0

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, kind: type[BaseException] | None, *_: Any) -> None:
        self._seconds.observe(time.perf_counter() - self._start)
        if kind is not None and issubclass(kind, LOST):
            self._errors.inc()


def _children() -> dict[str, tuple[Any, Any]]:
    """Each operation's (seconds, errors) metric children."""
    seconds, errors = metrics.REDIS_SECONDS, metrics.REDIS_ERRORS
    return {op: (metrics.BatchedHistogram(seconds.labels(op)), errors.labels(op)) for op in metrics.REDIS_OPS}


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
        # Two ordered lanes: messages (sequencing, forwards) never wait behind a second's
        # session checkpoints or a connect storm's state writes, nor those behind messages.
        self._batch = Pipeliner(client, self._lane(), self._scripts)
        self._messages = Pipeliner(client, self._lane(), self._scripts)
        self._ops = _children()

    def _lane(self) -> RoundTrip:
        """How a lane sends its batches: through redis-py's pipeline, which routes on a cluster."""
        return pipeline_round_trip(self._redis)

    def _timed(self, op: str) -> _Timed:
        return _Timed(self._ops[op])

    @abstractmethod
    async def start(self) -> None:
        """Check Redis answers and start reading pub/sub."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def _listen(self, name: bytes) -> None:
        """Send the subscription of `name`; its confirmation arrives through a reader."""

    @abstractmethod
    async def _unlisten(self, names: list[bytes]) -> None:
        """Send the end of the subscriptions of `names`."""

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
            with self._timed("ping"):
                return await self._ping()
        except LOST:
            return False

    # -- ring ---------------------------------------------------------------------------

    async def heartbeat(self, slot: str, instance: str, ttl_ms: int) -> list[str]:
        """Renew this slot's lease and return the live slots. SlotTaken if another owns it."""
        now = int(time.time() * 1000)
        with self._timed("heartbeat"):
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
        with self._timed("heartbeat"):
            live = await self._redis.zrangebyscore(keys.RING, now, "+inf")
        return [_text(s) for s in live]

    async def leave_ring(self, slot: str) -> None:
        with self._timed("heartbeat"):
            await self._redis.zrem(keys.RING, slot)

    # -- pub/sub ---------------------------------------------------------------------------

    async def subscribe(self, channel: str) -> None:
        """Subscribe and wait until Redis confirmed it: later publishes will reach us."""
        name = channel.encode()
        waiter = self._waiters.get(name)
        if waiter is None:
            waiter = self._waiters[name] = asyncio.get_running_loop().create_future()
            try:
                with self._timed("subscribe"):
                    await self._listen(name)
            except BaseException:
                del self._waiters[name]  # never sent: the next subscribe must send it again
                raise
        await asyncio.wait_for(asyncio.shield(waiter), _TIMEOUT)

    async def unsubscribe(self, *channels: str) -> None:
        """Unsubscribe (in one command per node) and wait for Redis to confirm: nothing more
        arrives on `channels`."""
        names = [channel.encode() for channel in channels]
        loop = asyncio.get_running_loop()
        waiters: list[asyncio.Future[None]] = []
        for name in names:
            self._waiters.pop(name, None)
            self._confirmed.discard(name)
            waiters.append(loop.create_future())
            self._leaving[name] = waiters[-1]
        with self._timed("subscribe"):
            await self._unlisten(names)
        if waiters:
            await asyncio.wait(waiters, timeout=_TIMEOUT)

    async def publish_many(self, messages: Sequence[tuple[str, bytes]]) -> list[int]:
        """Publish in order (per channel); returns each message's receiver count."""
        replies = self._messages.call_many(
            [(self.PUBLISH, channel, payload) for channel, payload in messages]
        )
        with self._timed("publish"):
            return [int(n) for n in checked(await replies)]

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
                parser = _hiredis_parser(pubsub)
                if parser is None:  # (re)connecting: redis-py resubscribes what it knows
                    reply = await pubsub.parse_response(block=False, timeout=1.0)
                    if reply is not None:
                        last_heard = time.monotonic()
                        await self._on_reply(pubsub, reply)
                else:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(1.0):  # then PING, if it is time
                            await parser.read_from_socket()
                            last_heard = time.monotonic()
                for reply in _buffered(pubsub):
                    await self._on_reply(pubsub, reply)
                now = time.monotonic()
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

    async def _on_reply(self, pubsub: PubSub, reply: Any) -> None:
        """A channel message goes straight to the handler; the rest through redis-py,
        which keeps its subscription bookkeeping (what a reconnect resubscribes)."""
        if isinstance(reply, list) and len(reply) == 3 and reply[0] in _MESSAGE_KINDS:
            self._handler.on_channel_message(reply[1], reply[2])
            return
        message = await pubsub.handle_message(reply)  # type: ignore[no-untyped-call]
        if message is not None:
            self._dispatch(message)

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
        with self._timed("open_room"):
            seq, epoch = await self._batch.script(
                self._scripts["OPEN_ROOM"], [keys.room_meta(room), keys.room_history(room)], [ttl]
            )
        return int(seq), epoch.decode()

    async def sequence(
        self, room: str, batch: Sequence[Unsequenced], history_size: int, ttl: int
    ) -> Sequenced:
        """Give a batch of publishes their seqs, append them to history, fan them out."""
        script_keys, args = _sequence_call([(room, batch)], history_size, ttl)
        with self._timed("sequence"):
            (reply,) = await self._scripts["SEQUENCE"](keys=script_keys, args=args)
        return _sequenced(reply)

    async def sequence_many(
        self, batches: Mapping[str, Sequence[Unsequenced]], history_size: int, ttl: int
    ) -> dict[str, Sequenced | Exception]:
        """`sequence` for several rooms in one round trip: one script call per group of
        rooms (`_groups`), each sequencing all of its rooms' batches."""
        script = self._scripts["SEQUENCE"]
        groups = self._groups(list(batches))
        replies = self._messages.call_many(
            [
                evalsha(script, *_sequence_call([(room, batches[room]) for room in group], history_size, ttl))
                for group in groups
            ]
        )
        with self._timed("sequence"):
            answers = await replies
        results: dict[str, Sequenced | Exception] = {}
        for group, answer in zip(groups, answers, strict=True):
            for index, room in enumerate(group):
                results[room] = answer if isinstance(answer, Exception) else _sequenced(answer[index])
        return results

    def _groups(self, rooms: list[str]) -> list[list[str]]:
        """Rooms one script call may sequence together: on one server, all (in chunks that
        keep each call short, since Redis runs nothing else meanwhile)."""
        return [rooms[i : i + _ROOMS_PER_CALL] for i in range(0, len(rooms), _ROOMS_PER_CALL)]

    async def history(
        self, room: str, after: int, upto: int, limit: int | None = None
    ) -> list[tuple[int, bytes]]:
        """Frames with seq in (after, upto], as far as history still has them; the first
        `limit` of them when given (a page: Redis and the worker hold only that much)."""
        if upto <= after:
            return []
        page = () if limit is None else ("COUNT", limit)
        with self._timed("history"):
            entries = await self._batch.call(
                "XRANGE", keys.room_history(room), f"{after + 1}-1", f"{upto}-1", *page
            )
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
        with self._timed("membership"):
            estimate = await self._batch.script(
                self._scripts["JOIN"],
                [
                    keys.members(room, slot),
                    keys.member_slots(room),
                    keys.presence(room),
                    keys.pending_leaves(room),
                ],
                [
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

    async def leave(self, room: str, slot: str, user: str, delay_ms: int, ttl: int) -> bool:
        """True when this slot has no connection of `user` in `room` any more (a leave is pending)."""
        with self._timed("membership"):
            return bool(
                await self._batch.script(
                    self._scripts["LEAVE"],
                    [keys.members(room, slot), keys.pending_leaves(room)],
                    [user, delay_ms, ttl],
                )
            )

    async def sweep(self, room: str, leave: tuple[bytes, bytes], presence_max: int) -> list[str]:
        """Announce the due leaves of `room` (`leave` is the frame around the user's JSON)."""
        with self._timed("membership"):
            gone = await self._batch.script(
                self._scripts["SWEEP"],
                [keys.member_slots(room), keys.presence(room), keys.pending_leaves(room)],
                [keys.members(room, ""), keys.room_channel(room), presence_max, *leave],
            )
        return [_text(user) for user in gone]

    async def members(self, room: str, limit: int) -> tuple[int, list[str]]:
        with self._timed("membership"):
            count, *users = await self._batch.script(
                self._scripts["MEMBERS"], [keys.member_slots(room)], [keys.members(room, ""), limit]
            )
        return int(count), [u.decode() for u in users]

    async def refresh_members(self, slot: str, rooms: Mapping[str, Mapping[str, int]], ttl: int) -> int:
        """Keep this slot's membership (and its rooms' presence) alive; a dead worker's expires.

        `rooms` holds this slot's connection count per user: what Redis lost of it is put
        back. Queued at once, behind the joins and leaves already issued: a user that Redis
        lacks when it runs the script was lost, not left. Returns how many were put back.
        """
        if not rooms:
            return 0
        replies = self._batch.call_many(
            [
                evalsha(
                    self._scripts["RESTATE"],
                    [keys.members(room, slot), keys.member_slots(room), keys.presence(room)],
                    [slot, ttl, *chain.from_iterable(users.items())],
                )
                for room, users in rooms.items()
            ]
        )
        with self._timed("membership"):
            return sum(checked(await replies))

    # -- sessions ------------------------------------------------------------------------------

    async def save_sessions(self, sessions: Mapping[str, Mapping[str, str]], ttl: int) -> None:
        if not sessions:
            return
        commands: list[tuple[Any, ...]] = []
        for sid, fields in sessions.items():
            key = keys.session(sid)
            commands.append(("HSET", key, *chain.from_iterable(fields.items())))
            commands.append(("EXPIRE", key, ttl))
        replies = self._batch.call_many(commands)
        with self._timed("session"):
            checked(await replies)

    async def drop_session_rooms(self, sid: str, rooms: Sequence[str]) -> None:
        with self._timed("session"):
            await self._batch.call("HDEL", keys.session(sid), *(f"r:{room}" for room in rooms))

    async def load_session(self, sid: str) -> dict[str, str]:
        with self._timed("session"):
            raw = await self._batch.call("HGETALL", keys.session(sid))
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
        self._subscriptions = Subscriptions(
            lambda names: self._pubsub.subscribe(*names), lambda names: self._pubsub.unsubscribe(*names)
        )

    async def start(self) -> None:
        await self._ping()
        self._reader = asyncio.create_task(self._read(self._pubsub, lambda: True), name="rtc-pubsub")

    async def close(self) -> None:
        await stop_task(self._reader)
        self._subscriptions.close()
        await self._batch.close()
        await self._messages.close()
        with contextlib.suppress(RedisError, OSError):
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        await self._server.aclose()

    def _lane(self) -> RoundTrip:
        return OwnConnection(self._server)

    async def _ping(self) -> bool:
        return bool(await self._server.ping())

    async def _listen(self, name: bytes) -> None:
        await self._subscriptions.add(name)

    async def _unlisten(self, names: list[bytes]) -> None:
        await self._subscriptions.remove(names)

    async def _lost(self) -> None:
        """Nothing to re-route: the one server's connection comes back on the next read."""

    def _dropped(self, channel: bytes) -> None:
        """One server ends a subscription only when asked to."""


def _hiredis_parser(pubsub: PubSub) -> Any:
    """The hiredis parser of a connected pub/sub connection, else None.

    Reading a reply through redis-py costs ~25 µs (a health check, a retry wrapper, a
    timeout, push-message handling); a busy worker reads thousands of times a second. So
    the reader waits for the socket itself, through the parser, and takes every reply the
    read completed from hiredis's buffer (`_buffered`, ~1 µs each).
    """
    connection = pubsub.connection
    if connection is None or not connection.is_connected:
        return None
    parser = connection._parser
    return parser if getattr(parser, "_reader", None) is not None else None


def _buffered(pubsub: PubSub) -> Iterator[Any]:
    """Replies already read off the pub/sub socket, taken from hiredis without awaiting.
    Without hiredis (a dependency) it yields nothing."""
    parser = _hiredis_parser(pubsub)
    if parser is None:
        return
    reader = parser._reader
    while (reply := reader.gets()) is not NOT_ENOUGH_DATA:
        if isinstance(reply, Exception):
            raise reply
        yield reply


def _sequence_call(
    batches: Sequence[tuple[str, Sequence[Unsequenced]]], history_size: int, ttl: int
) -> tuple[list[str], list[Any]]:
    """Keys and arguments of the SEQUENCE script for some rooms' batches."""
    script_keys: list[str] = []
    args: list[Any] = [history_size, ttl, len(batches)]
    for room, batch in batches:
        room_keys = [keys.room_meta(room), keys.room_history(room)]
        items: list[Any] = []
        for item in batch:
            index = 0
            if item.dedup is not None:
                room_keys.append(keys.dedup(room, item.dedup))
                index = len(room_keys)
            items.extend((item.head, item.tail, item.ts, index))
        script_keys.extend(room_keys)
        args.extend((len(room_keys), keys.room_channel(room), len(batch), *items))
    return script_keys, args


def _sequenced(reply: list[Any]) -> Sequenced:
    epoch, *seqs = reply
    return Sequenced(_text(epoch), [int(s) for s in seqs])


def _text(value: object) -> str:
    """redis-py answers bytes (decode_responses is off: frames stay bytes end to end)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _fields(fields: Mapping[str, str]) -> dict[FieldT, EncodableT]:
    return dict(fields.items())
