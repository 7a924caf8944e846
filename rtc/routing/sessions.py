"""Sessions in Redis: which rooms a connection joined, and its checkpoint per room.

What a checkpoint may claim is decided by `rtc.routing.checkpoint` (frames that left the
user-space buffer); this module collects those claims and writes them: at least every
second, and on an orderly close before the close handshake completes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from rtc.broker.base import SessionStore
from rtc.connection import Connection
from rtc.log import Repeats
from rtc.protocol import inbox

__all__ = ["CHECKPOINT_EVERY", "CHECKPOINT_SLICES", "Rejoin", "Sessions"]

log = logging.getLogger("rtc.sessions")

CHECKPOINT_EVERY = 1.0  # SPEC: a session's checkpoint is written at least every second
# A second's checkpoints go out in slices, one every CHECKPOINT_EVERY / CHECKPOINT_SLICES:
# writing 10,000 sessions at once stalled the worker's loop for tens of milliseconds.
CHECKPOINT_SLICES = 10

Rejoin = tuple[str, int | None, str | None]  # room, checkpointed seq, epoch (None: not saved)


class Sessions:
    """Loads, creates and checkpoints the sessions of this worker's connections."""

    def __init__(self, store: SessionStore, epoch: Callable[[str], str | None], ttl: int) -> None:
        self._store = store
        self._epoch = epoch  # a room's current epoch, None when it is not open here
        self._ttl = ttl
        self._slices: list[set[Connection]] = [set() for _ in range(CHECKPOINT_SLICES)]
        self._slice_of: dict[Connection, int] = {}
        self._next_slice = 0
        # A resuming connection's room fields as read from Redis, until its rejoin is over
        # (each dropped once anything else writes it): a rejoin that starts where the
        # session says need not write it again.
        self._loaded: dict[Connection, dict[str, str]] = {}

    def track(self, conn: Connection) -> None:
        """Checkpoint `conn` from now on; slices are dealt round robin, so they stay even."""
        index = self._next_slice
        self._next_slice = (index + 1) % CHECKPOINT_SLICES
        self._slice_of[conn] = index
        self._slices[index].add(conn)

    def untrack(self, conn: Connection) -> None:
        self._loaded.pop(conn, None)
        index = self._slice_of.pop(conn, None)
        if index is not None:
            self._slices[index].discard(conn)

    async def open(self, conn: Connection, sid: str | None) -> list[Rejoin] | None:
        """Resume session `sid` when it is this user's (the rooms to rejoin), else start one.

        The inbox comes first, and always: it is replayed before its live frames flow, even
        when the session lost it (a connection that dropped before its first checkpoint).
        """
        rejoin: list[Rejoin] | None = None
        if sid:
            saved = await self._store.load_session(sid)
            if saved.get("user") == conn.user:
                conn.session = sid
                own = inbox(conn.user)
                rooms: dict[str, Rejoin] = {own: (own, None, None)}
                for name, value in saved.items():
                    if name.startswith("r:"):
                        seq, _, epoch = value.partition(":")
                        rooms[name[2:]] = (name[2:], int(seq), epoch)
                rejoin = list(rooms.values())  # the inbox first: it was inserted first
                self._loaded[conn] = {name: value for name, value in saved.items() if name.startswith("r:")}
        await self._store.save_sessions({conn.session: {"user": conn.user}}, self._ttl)
        return rejoin

    async def joined(self, conn: Connection, room: str, seq: int, epoch: str) -> None:
        """The session knows the room at once, with `seq` as its checkpoint (a rejoin
        from where the session already says writes nothing)."""
        conn.checkpoint.start(room, seq)
        field, value = f"r:{room}", f"{seq}:{epoch}"
        loaded = self._loaded.get(conn)
        if loaded is None or loaded.pop(field, None) != value:
            await self._store.save_sessions({conn.session: {field: value}}, self._ttl)
        conn.checkpoint.stored(room, seq)  # the next periodic checkpoint need not repeat it

    def rejoined(self, conn: Connection) -> None:
        """The resumed session's rooms are rejoined: what was read is no longer needed."""
        self._loaded.pop(conn, None)

    async def left(self, conn: Connection, room: str) -> None:
        conn.checkpoint.forget(room)
        self._forget_loaded(conn, [f"r:{room}"])
        await self._store.drop_session_rooms(conn.session, [room])

    def _forget_loaded(self, conn: Connection, fields: Iterable[str]) -> None:
        loaded = self._loaded.get(conn)
        if loaded is not None:
            for field in fields:
                loaded.pop(field, None)

    def changes(self, conns: Iterable[Connection], *, final: bool = False) -> dict[str, dict[str, str]]:
        """Session fields that changed: `r:<room>` -> `<seq>:<epoch>` per connection."""
        sessions: dict[str, dict[str, str]] = {}
        for conn in conns:
            buffered = conn.transport.get_write_buffer_size()
            changed: dict[str, str] = {}
            for room, seq in conn.checkpoint.changes(buffered, final=final).items():
                epoch = self._epoch(room)
                if epoch is not None:
                    changed[f"r:{room}"] = f"{seq}:{epoch}"
            if changed:
                sessions[conn.session] = {"user": conn.user, **changed}
                self._forget_loaded(conn, changed)
        return sessions

    async def save(self, conns: Iterable[Connection], *, final: bool = False) -> None:
        await self._store.save_sessions(self.changes(conns, final=final), self._ttl)

    async def save_slice(self, index: int) -> None:
        """The changes of one slice of the tracked connections."""
        await self.save(list(self._slices[index]))

    async def checkpoint_forever(self) -> None:
        """Every tracked connection's changes once a second, one slice at a time."""
        failures = Repeats(log, "session checkpoint")
        index = 0
        while True:
            await asyncio.sleep(CHECKPOINT_EVERY / CHECKPOINT_SLICES)
            try:
                await self.save_slice(index)
            except Exception as exc:
                failures.failed(exc)
            else:
                failures.succeeded()
            index = (index + 1) % CHECKPOINT_SLICES
