"""rtc.hashring: spread, minimal movement on a slot change, equality, the lookup cache."""

from __future__ import annotations

from collections import Counter

import pytest

from rtc.hashring import Ring

SLOTS = [f"node{n}:{i}" for n in range(8) for i in range(8)]  # 64 slots, 8 hosts x 8 workers
KEYS = [f"room-{i}" for i in range(65536 - 1024)] + [f"@user{i}" for i in range(1024)]


@pytest.fixture(scope="module")
def owners() -> dict[str, str | None]:
    ring = Ring(SLOTS)
    return {key: ring.owner(key) for key in KEYS}


def test_keys_spread_evenly(owners: dict[str, str | None]) -> None:
    counts = Counter(owners.values())
    mean = len(KEYS) / len(SLOTS)
    assert set(counts) == set(SLOTS)  # every slot owns something, nothing else does
    assert all(0.5 * mean <= count <= 1.6 * mean for count in counts.values()), counts


def test_removing_a_slot_moves_only_its_keys(owners: dict[str, str | None]) -> None:
    gone = SLOTS[17]
    ring = Ring(s for s in SLOTS if s != gone)
    moved = [key for key in KEYS if ring.owner(key) != owners[key]]
    assert all(owners[key] == gone for key in moved)
    assert len(moved) == sum(1 for owner in owners.values() if owner == gone)
    assert 0.5 / 64 <= len(moved) / len(KEYS) <= 1.6 / 64
    assert gone not in {ring.owner(key) for key in moved}


def test_adding_a_slot_moves_keys_only_to_it(owners: dict[str, str | None]) -> None:
    new = "node8:0"
    ring = Ring([*SLOTS, new])
    moved = [key for key in KEYS if ring.owner(key) != owners[key]]
    assert moved
    assert all(ring.owner(key) == new for key in moved)
    assert 0.5 / 65 <= len(moved) / len(KEYS) <= 1.6 / 65


def test_every_view_of_the_same_slots_agrees(owners: dict[str, str | None]) -> None:
    shuffled = Ring(reversed(SLOTS + SLOTS[:5]))  # order and duplicates do not matter
    assert all(shuffled.owner(key) == owners[key] for key in KEYS[:4096])


def test_empty_ring() -> None:
    ring = Ring([])
    assert ring.owner("room") is None
    assert ring.owner("@alice") is None
    assert len(ring) == 0
    assert ring.slots == ()


def test_single_slot_owns_everything() -> None:
    ring = Ring(["solo:0"])
    assert {ring.owner(key) for key in KEYS[:1000]} == {"solo:0"}


def test_equality_and_hash_by_slot_set() -> None:
    a = Ring(["h1:0", "h1:1", "h2:0"])
    b = Ring(["h2:0", "h1:1", "h1:0", "h1:0"])
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b}) == 1
    assert a != Ring(["h1:0", "h1:1"])
    assert a != ("h1:0", "h1:1", "h2:0")
    assert Ring([]) == Ring([])
    assert len(a) == 3
    assert a.slots == ("h1:0", "h1:1", "h2:0")


def test_the_cache_returns_the_same_owner() -> None:
    ring = Ring(SLOTS)
    first = [ring.owner(key) for key in KEYS[:2048]]
    assert [ring.owner(key) for key in KEYS[:2048]] == first
    uncached = Ring(SLOTS)
    assert [uncached.owner(key) for key in reversed(KEYS[:2048])] == first[::-1]


def test_the_cache_stays_correct_past_its_limit(owners: dict[str, str | None]) -> None:
    ring = Ring(SLOTS)
    keys = KEYS + [f"extra-{i}" for i in range(16)]  # one more than the cache holds, and then some
    fresh = Ring(SLOTS)
    assert [ring.owner(key) for key in keys] == [fresh.owner(key) for key in keys]
    assert all(ring.owner(key) == owners[key] for key in KEYS[:256])
