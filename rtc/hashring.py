"""Key ownership: a consistent-hash ring with virtual nodes over live worker slots.

uhashring's ketama ring does the hashing (160 points per slot); this wrapper adds an
immutable view and a lookup cache, because the ring is consulted on every publish but
changes only when a slot joins or leaves.
"""

from __future__ import annotations

from collections.abc import Iterable

from uhashring import HashRing

__all__ = ["Ring"]

_CACHE_LIMIT = 65536


class Ring:
    """An immutable set of slot ids (`<node_id>:<index>`) and who owns which key."""

    __slots__ = ("_cache", "_ring", "slots")

    def __init__(self, slots: Iterable[str]) -> None:
        self.slots: tuple[str, ...] = tuple(sorted(set(slots)))
        self._ring = HashRing(nodes=list(self.slots), hash_fn="ketama") if self.slots else None
        self._cache: dict[str, str] = {}

    def owner(self, key: str) -> str | None:
        """The slot that owns `key` (a room id, or `@user` for an inbox); None if empty."""
        owner = self._cache.get(key)
        if owner is None and self._ring is not None:
            owner = self._ring.get_node(key)
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[key] = owner
        return owner

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Ring) and other.slots == self.slots

    def __hash__(self) -> int:
        return hash(self.slots)

    def __len__(self) -> int:
        return len(self.slots)
