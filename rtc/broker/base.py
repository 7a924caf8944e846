"""What the routing layer needs from a broker, and what the broker pushes back."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple, Protocol

__all__ = [
    "Broker",
    "BrokerHandler",
    "HostState",
    "Membership",
    "Publisher",
    "RingStore",
    "RoomLog",
    "Sequenced",
    "SessionStore",
    "SlotTaken",
    "Subscriber",
    "Unsequenced",
]


class SlotTaken(Exception):
    """A live worker of another host instance already holds this slot id (duplicate --node-id)."""


class Unsequenced(NamedTuple):
    """One publish waiting for its seq: the frame halves around the seq, and its dedup key."""

    head: bytes
    tail: bytes
    ts: int
    dedup: str | None


class Sequenced(NamedTuple):
    epoch: str
    seqs: list[int]


class BrokerHandler(Protocol):
    """Receives what arrives over pub/sub; the broker never knows about clients."""

    def on_channel_message(self, channel: bytes, payload: bytes) -> None: ...

    def on_resubscribed(self, channel: bytes) -> None:
        """The subscription was re-established: messages may have been missed."""


class RingStore(Protocol):
    """The ring's membership: leases of worker slots."""

    async def heartbeat(self, slot: str, instance: str, ttl_ms: int) -> list[str]: ...

    async def live_slots(self) -> list[str]: ...

    async def leave_ring(self, slot: str) -> None: ...


class Subscriber(Protocol):
    async def subscribe(self, channel: str) -> None: ...

    async def unsubscribe(self, *channels: str) -> None: ...


class Publisher(Protocol):
    async def publish_many(self, messages: Sequence[tuple[str, bytes]]) -> list[int]: ...


class RoomLog(Protocol):
    """Seq, epoch and history of rooms: what sequencing and gap filling need."""

    async def open_room(self, room: str, ttl: int) -> tuple[int, str]: ...

    async def sequence_many(
        self, batches: Mapping[str, Sequence[Unsequenced]], history_size: int, ttl: int
    ) -> dict[str, Sequenced | Exception]: ...

    async def history(
        self, room: str, after: int, upto: int, limit: int | None = None
    ) -> list[tuple[int, bytes]]: ...


class Membership(Protocol):
    """Who is in a room, per (room, worker slot), and the presence events it causes."""

    async def join(
        self, room: str, slot: str, user: str, presence: bytes, presence_max: int, ttl: int
    ) -> int: ...

    async def leave(self, room: str, slot: str, user: str, delay_ms: int, ttl: int) -> bool: ...

    async def sweep(self, room: str, leave: tuple[bytes, bytes], presence_max: int) -> list[str]: ...

    async def members(self, room: str, limit: int) -> tuple[int, list[str]]: ...

    async def refresh_members(self, slot: str, rooms: Mapping[str, Mapping[str, int]], ttl: int) -> int: ...


class SessionStore(Protocol):
    async def save_sessions(self, sessions: Mapping[str, Mapping[str, str]], ttl: int) -> None: ...

    async def load_session(self, sid: str) -> dict[str, str]: ...

    async def drop_session_rooms(self, sid: str, rooms: Sequence[str]) -> None: ...


class HostState(Protocol):
    """Small hashes with a TTL: a host's drain state."""

    async def set_fields(self, key: str, fields: Mapping[str, str], ttl: int) -> None: ...

    async def get_fields(self, key: str) -> dict[str, str]: ...

    async def delete(self, key: str) -> None: ...


class Broker(RingStore, Subscriber, Publisher, RoomLog, Membership, SessionStore, HostState, Protocol):
    """Everything a worker asks of Redis; each routing piece is handed only its part."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def sequence(
        self, room: str, batch: Sequence[Unsequenced], history_size: int, ttl: int
    ) -> Sequenced: ...

    async def ping(self) -> bool: ...
