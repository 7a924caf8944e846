"""The broker for Redis Cluster: the shared core, with sharded pub/sub read from every node.

Keys of a room share its hash tag, so the scripts run unchanged on the room's node and
fan out with SPUBLISH to the room's channel, which carries the same tag (same slot, so it
is legal inside the script). Every channel rtc uses is a shard channel with its own tag:
SSUBSCRIBE on the primary that serves its slot, SPUBLISH to it (the receiver count is
that shard's subscribers, all of them, since every subscriber sits on the primary).

redis-py's `ClusterPubSub.get_sharded_message` polls its node connections one after
another, so a message on one node waits behind idle reads of the others (or the reader
spins with a zero timeout). Here each node gets its own pub/sub connection and reader
(`_Shard`), and the broker keeps the channel -> node routing itself. When a reader loses
its node, or Redis ends a subscription because the slot moved (failover, resharding),
the topology is refreshed and each channel whose slot has a new owner is subscribed
there; that second confirmation tells the handler to fill the hole from history.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Collection, Coroutine, Sequence
from typing import Any
from urllib.parse import unquote, urlparse

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.exceptions import SlotNotCoveredError

from rtc import keys
from rtc.broker.base import BrokerHandler
from rtc.broker.lanes import Subscriptions, stop_task
from rtc.broker.redis import LOST, RedisCore, client_options

__all__ = ["ClusterBroker"]

log = logging.getLogger("rtc.broker")

_RETRY_MOVE = 1.0  # seconds before subscribing again a channel whose move failed
_WATCH_EVERY = 5.0  # seconds between checks that every node we listen on is still a primary


class _Shard:
    """One cluster node's pub/sub connection, the channels subscribed on it, its reader."""

    __slots__ = ("channels", "client", "pubsub", "reader", "subscriptions")

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self.pubsub = client.pubsub()
        self.channels: set[bytes] = set()
        self.reader: asyncio.Task[None] | None = None
        self.subscriptions = Subscriptions(self._ssubscribe, self._sunsubscribe)

    async def _ssubscribe(self, names: list[bytes]) -> None:
        for group in _by_slot(names):
            await self.pubsub.ssubscribe(*group)

    async def _sunsubscribe(self, names: list[bytes]) -> None:
        for group in _by_slot(names):
            await self.pubsub.sunsubscribe(*group)


def _by_slot(names: list[bytes]) -> list[list[bytes]]:
    """Channels grouped by hash slot: Redis refuses an SSUBSCRIBE naming channels of several."""
    by_slot: dict[int, list[bytes]] = {}
    for name in names:
        by_slot.setdefault(key_slot(name), []).append(name)
    return list(by_slot.values())


class ClusterBroker(RedisCore):
    """`Broker` over Redis Cluster, from one or more `redis://` seed URLs."""

    PUBLISH = "SPUBLISH"
    RING_ATOMIC = False  # `rtc:ring` and `rtc:ring:owners` have no common tag

    def __init__(self, seeds: Sequence[str], handler: BrokerHandler, worker: str) -> None:
        urls = [urlparse(seed) for seed in seeds]
        credentials = next((u for u in urls if u.username or u.password), None)
        self._options = client_options()
        if credentials is not None:
            self._options["username"] = unquote(credentials.username) if credentials.username else None
            self._options["password"] = unquote(credentials.password) if credentials.password else None
        self._cluster = RedisCluster(
            startup_nodes=[ClusterNode(u.hostname or "localhost", u.port or 6379) for u in urls],
            max_connections=64,
            **self._options,
        )
        super().__init__(self._cluster, handler, worker)
        self._shards: dict[str, _Shard] = {}  # node name -> its pub/sub
        self._home: dict[bytes, str] = {}  # channel -> name of the node it is subscribed on
        self._rerouting = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Learn the topology from the seeds and check every node answers."""
        await self._cluster.initialize()
        await self._ping()
        self._spawn(self._watch())

    async def _ping(self) -> bool:
        """Every primary answers (a replica down does not make Redis unreachable)."""
        return bool(await self._cluster.ping(target_nodes=RedisCluster.PRIMARIES))

    async def close(self) -> None:
        for task in list(self._tasks):
            await stop_task(task)
        for shard in list(self._shards.values()):
            await stop_task(shard.reader)  # its reader closes its connection on the way out
        self._shards.clear()
        await self._batch.close()
        await self._messages.close()
        await self._cluster.aclose()

    def _groups(self, rooms: list[str]) -> list[list[str]]:
        """A script call's keys must share a hash slot: rooms are grouped by theirs."""
        by_slot: dict[int, list[str]] = {}
        for room in rooms:
            by_slot.setdefault(key_slot(keys.room_meta(room).encode()), []).append(room)
        return list(by_slot.values())

    # -- routing ----------------------------------------------------------------------------

    async def _listen(self, name: bytes) -> None:
        shard = self._move(name, self._owner(name))
        try:
            await shard.subscriptions.add(name)
        except BaseException:
            self._home.pop(name, None)
            shard.channels.discard(name)
            raise

    async def _unlisten(self, names: list[bytes]) -> None:
        by_shard: dict[_Shard, list[bytes]] = {}
        for name in names:
            shard = self._shards.get(self._home.pop(name, ""))
            if shard is None:  # not subscribed anywhere (its node is gone): nothing to confirm
                waiter = self._leaving.pop(name, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
                continue
            shard.channels.discard(name)
            by_shard.setdefault(shard, []).append(name)
        await asyncio.gather(*(shard.subscriptions.remove(group) for shard, group in by_shard.items()))

    def _owner(self, name: bytes) -> ClusterNode:
        """The primary serving the channel's slot, as the cached topology has it."""
        node = self._cluster.get_node_from_key(name.decode())
        if node is None:
            raise SlotNotCoveredError(f"no node serves {name!r}")
        return node

    def _move(self, name: bytes, node: ClusterNode) -> _Shard:
        """Home `name` on `node`; the old node's connection forgets it (the server already did)."""
        old = self._shards.get(self._home.get(name, ""))
        if old is not None:
            old.channels.discard(name)
            old.pubsub.shard_channels.pop(name, None)  # a reconnect must not subscribe it there
        shard = self._shards.get(node.name)
        if shard is None:
            shard = self._shards[node.name] = _Shard(
                aioredis.Redis(host=node.host, port=int(node.port), **self._options)
            )
            shard.reader = asyncio.create_task(self._serve(node.name, shard), name=f"rtc-pubsub-{node.name}")
        shard.channels.add(name)
        self._home[name] = node.name
        return shard

    async def _serve(self, node: str, shard: _Shard) -> None:
        """Read one node's pub/sub until the shard is retired, then close its connection."""
        try:
            await self._read(shard.pubsub, lambda: self._shards.get(node) is shard)
        finally:
            shard.subscriptions.close()
            with contextlib.suppress(*LOST):
                await shard.pubsub.aclose()  # type: ignore[no-untyped-call]
                await shard.client.aclose()

    async def _lost(self) -> None:
        await self._reroute()

    def _dropped(self, channel: bytes) -> None:
        if channel in self._home:
            self._spawn(self._reroute(moved={channel}))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reroute(self, moved: Collection[bytes] = (), delay: float = 0.0) -> None:
        """Refresh the topology; subscribe anew each channel in `moved` or whose slot changed node."""
        await asyncio.sleep(delay)
        async with self._rerouting:
            try:
                await self._cluster.nodes_manager.initialize()
            except LOST as exc:
                log.warning("cluster topology refresh failed: %s", exc)
                return
            failed: set[bytes] = set()
            primary: dict[str, bool] = {}
            for name, home in list(self._home.items()):
                try:
                    node = self._owner(name)
                    if node.name == home and name not in moved:
                        continue
                    shard = self._move(name, node)
                    if node.name not in primary:
                        primary[node.name] = await self._is_primary(shard)
                    if not primary[node.name]:  # a stale view named a demoted primary
                        failed.add(name)
                        continue
                    log.info("shard channel %s now on %s", name.decode(errors="replace"), node.name)
                    await shard.subscriptions.add(name)
                except LOST as exc:
                    log.warning("subscribing %s again failed: %s", name.decode(errors="replace"), exc)
                    failed.add(name)
            primaries = {node.name for node in self._cluster.get_primaries()}
            for node_name, shard in list(self._shards.items()):
                if not shard.channels and node_name not in primaries:
                    del self._shards[node_name]  # its reader stops and closes the connection
        if failed:
            self._spawn(self._reroute(failed, _RETRY_MOVE))

    async def _is_primary(self, shard: _Shard) -> bool:
        """Whether the node says it is a primary. A replica accepts SSUBSCRIBE too and gets the
        shard's messages, but SPUBLISH does not count it: a forward would look unheard."""
        try:
            role = await shard.client.role()
        except LOST:
            return True  # unreachable: the reader finds out and re-routes
        return bool(role) and role[0] in (b"master", "master")

    async def _watch(self) -> None:
        """Move the channels of a node that is no primary any more (demoted while a stale view
        sent a subscription there, say): Redis tells subscribers of nothing in that case."""
        while True:
            await asyncio.sleep(_WATCH_EVERY)
            for shard in list(self._shards.values()):
                if shard.channels and not await self._is_primary(shard):
                    await self._reroute(moved=set(shard.channels))
