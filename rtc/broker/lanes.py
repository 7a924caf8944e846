"""How a worker's commands reach Redis: in batches, one batch in flight per lane.

A lane (`Pipeliner`) sends what its callers issued while the previous batch was in
flight as one pipeline, keeping their order; a round trip (`RoundTrip`) is how a batch
travels: through redis-py's pipeline (which routes by key on a cluster), or over a
connection of the lane's own (`OwnConnection`, one server). `Subscriptions` batches
SUBSCRIBE and UNSUBSCRIBE the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from itertools import groupby
from operator import itemgetter
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis._parsers.hiredis import NOT_ENOUGH_DATA  # hiredis's "no complete reply yet"
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

__all__ = [
    "OwnConnection",
    "Pipeliner",
    "RoundTrip",
    "Subscriptions",
    "checked",
    "evalsha",
    "pipeline_round_trip",
    "stop_task",
]


RoundTrip = Callable[[list[tuple[Any, ...]]], Awaitable[list[Any]]]
"""Sends commands as one pipeline; answers each one's reply, or the error Redis gave for it."""


def pipeline_round_trip(client: aioredis.Redis | RedisCluster) -> RoundTrip:
    """A round trip through redis-py's pipeline (on a cluster it routes each command by key)."""

    async def round_trip(commands: list[tuple[Any, ...]]) -> list[Any]:
        async with client.pipeline(transaction=False) as pipe:
            for args in commands:
                pipe.execute_command(*args)
            return list(await pipe.execute(raise_on_error=False))

    return round_trip


class OwnConnection:
    """Round trips over one connection of the lane's own, packed and parsed by hiredis.

    redis-py's pipeline costs a pool checkout, a retry wrapper and Python packing per
    batch, and a timeout and a call chain per reply: a fifth of a worker's time routing
    directs. Here a batch is one hiredis-packed write, and its replies are taken from
    hiredis's buffer, reading the socket only when the buffer runs out, all within one
    timeout (the connection's socket timeout). Replies get redis-py's response callbacks,
    so they read the same as through its pipeline. A lost connection is reconnected and
    the batch sent again, as redis-py's retry does for its pipeline.
    """

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self._connection: Connection | None = None

    async def __call__(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        if self._connection is None:
            self._connection = await self._client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
        connection = self._connection
        return await connection.retry.call_with_retry(
            lambda: self._round_trip(connection, commands), lambda _: connection.disconnect()
        )

    async def _round_trip(self, connection: Connection, commands: list[tuple[Any, ...]]) -> list[Any]:
        if not connection.is_connected:
            await connection.connect()  # type: ignore[no-untyped-call]
        writer = connection._writer
        assert writer is not None  # connected
        parser = connection._parser
        reader = parser._reader  # type: ignore[attr-defined]  # hiredis's: a dependency
        callbacks = self._client.response_callbacks
        replies: list[Any] = []
        try:
            async with asyncio.timeout(connection.socket_timeout):
                writer.write(b"".join(map(hiredis.pack_command, commands)))
                await writer.drain()
                for args in commands:
                    while (reply := reader.gets()) is NOT_ENOUGH_DATA:
                        await parser.read_from_socket()  # type: ignore[attr-defined]
                    if args[0] in callbacks and not isinstance(reply, Exception):
                        reply = callbacks[args[0]](reply)
                    replies.append(reply)
        except OSError as exc:  # reset, refused, timed out: retried as redis-py retries them
            await connection.disconnect()
            raise RedisConnectionError(f"Redis connection lost: {exc}") from exc
        except BaseException:  # replies may be half read: the next round trip reconnects
            await connection.disconnect()
            raise
        return replies


class Pipeliner:
    """Sends the commands issued while the previous batch was in flight as one pipeline.

    A connect storm issues a handful of small commands per connection (room opens,
    session writes, joins); one at a time, each pays redis-py's per-call cost (pool
    checkout, retry wrapper, its own round trip) and the pool runs dry. Batched, a busy
    worker pays it once per round trip. One batch in flight at a time keeps commands in
    the order they were issued, as on one connection.
    """

    def __init__(
        self, client: aioredis.Redis | RedisCluster, round_trip: RoundTrip, scripts: Mapping[str, AsyncScript]
    ) -> None:
        self._redis = client
        self._round_trip = round_trip
        self._scripts = scripts
        # Groups of commands, each with the future of its replies; `call` is a group of one.
        self._queue: list[tuple[list[tuple[Any, ...]], asyncio.Future[Any], bool]] = []
        self._task: asyncio.Task[None] | None = None

    def call(self, *args: Any) -> asyncio.Future[Any]:
        """Queue one command for the next batch: its reply, or what Redis raised for it."""
        return self._enqueue([args], single=True)

    def call_many(self, commands: list[tuple[Any, ...]]) -> asyncio.Future[list[Any]]:
        """Queue commands for the next batch, answered together: each one's reply, or the
        error Redis gave for it (returned, not raised; `checked` raises it)."""
        return self._enqueue(commands, single=False)

    def script(
        self, script: AsyncScript, script_keys: Sequence[str], args: Sequence[Any]
    ) -> asyncio.Future[Any]:
        """Queue a script call (EVALSHA; a Redis that lost its scripts gets them again)."""
        return self.call(*evalsha(script, script_keys, args))

    def _enqueue(self, commands: list[tuple[Any, ...]], *, single: bool) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((commands, future, single))
        if self._task is None:
            self._task = loop.create_task(self._run())
        return future

    async def _run(self) -> None:
        try:  # started after this loop turn (a task's first step): its commands are queued
            while self._queue:
                batch, self._queue = self._queue, []
                commands = [args for group, _, _ in batch for args in group]
                try:
                    replies = await self._execute(commands)
                except Exception as exc:
                    replies = [exc] * len(commands)
                start = 0
                for group, future, single in batch:
                    answers, start = replies[start : start + len(group)], start + len(group)
                    if future.done():  # its caller was cancelled
                        continue
                    if not single:
                        future.set_result(answers)
                    elif isinstance(answers[0], Exception):
                        future.set_exception(answers[0])
                    else:
                        future.set_result(answers[0])
        finally:
            self._task = None

    async def _execute(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        replies = await self._round_trip(commands)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:  # Redis restarted: load the scripts and run what it refused again
            for script in self._scripts.values():
                await self._redis.script_load(script.script)
            again = await self._round_trip([commands[i] for i in missing])
            for index, reply in zip(missing, again, strict=True):
                replies[index] = reply
        return replies

    async def close(self) -> None:
        """Stop; callers still waiting get an error instead of waiting forever."""
        await stop_task(self._task)
        queue, self._queue = self._queue, []
        for _, future, _ in queue:
            if not future.done():
                future.set_exception(ConnectionError("broker closed"))


def evalsha(script: AsyncScript, script_keys: Sequence[str], args: Sequence[Any]) -> tuple[Any, ...]:
    """The command that runs a registered script."""
    return ("EVALSHA", script.sha, len(script_keys), *script_keys, *args)


def checked(replies: list[Any]) -> list[Any]:
    """`call_many`'s replies, or the first error among them raised."""
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


class Subscriptions:
    """Channels to (un)subscribe, sent in batches in the order asked, one batch at a time.

    A connect storm subscribes an inbox per connection, and the idle sweep after a mass
    disconnect unsubscribes thousands: one SUBSCRIBE (or UNSUBSCRIBE) for all the channels
    of a loop turn is one write instead of thousands. One queue for both keeps a channel
    unsubscribed and subscribed again in that order. One batch at a time also keeps a
    fresh pub/sub connection from being opened twice by concurrent first subscriptions
    (redis-py's PubSub would keep only the second, and the first's confirmations would
    never be read).
    """

    def __init__(
        self,
        subscribe: Callable[[list[bytes]], Awaitable[Any]],
        unsubscribe: Callable[[list[bytes]], Awaitable[Any]],
    ) -> None:
        self._send = {True: subscribe, False: unsubscribe}
        self._pending: list[tuple[bool, bytes]] = []  # (subscribe?, channel), in the order asked
        self._next: asyncio.Future[None] | None = None  # done when `_pending` was sent
        self._task: asyncio.Task[None] | None = None

    async def add(self, name: bytes) -> None:
        """Send the subscription of `name` (with others of this turn); raises if sending failed."""
        await self._queue(True, [name])

    async def remove(self, names: list[bytes]) -> None:
        """Send the end of the subscriptions of `names` (with others of this turn)."""
        await self._queue(False, names)

    async def _queue(self, subscribe: bool, names: list[bytes]) -> None:
        loop = asyncio.get_running_loop()
        if self._next is None:
            self._next = loop.create_future()
            if self._task is None:
                self._task = loop.create_task(self._run())
        self._pending.extend((subscribe, name) for name in names)
        await asyncio.shield(self._next)

    async def _run(self) -> None:
        try:
            await asyncio.sleep(0)  # let this loop turn's subscriptions join
            while self._next is not None:
                pending, sent = self._pending, self._next
                self._pending, self._next = [], None
                try:
                    for subscribe, run in groupby(pending, key=itemgetter(0)):
                        await self._send[subscribe]([name for _, name in run])
                except Exception as exc:
                    sent.set_exception(exc)
                    sent.exception()  # retrieved: its callers may all have given up
                else:
                    sent.set_result(None)
        finally:
            self._task = None

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()


async def stop_task(task: asyncio.Task[None] | None) -> None:
    """Cancel a background task and wait until it has finished."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
