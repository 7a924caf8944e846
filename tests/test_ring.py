"""The ring view after a heartbeat: it never shrinks while leases may have lapsed together."""

from __future__ import annotations

from rtc.hashring import Ring
from rtc.routing.ring import next_view

SLOTS = ["a:0", "a:1", "b:0", "b:1"]


def test_a_settled_view_follows_the_live_slots() -> None:
    assert next_view(Ring(SLOTS), ["a:0", "a:1", "b:0"], settled=True) == Ring(["a:0", "a:1", "b:0"])


def test_after_a_redis_stall_the_view_keeps_slots_that_have_not_renewed_yet() -> None:
    """The first heartbeat back sees only itself: hosts must not leave their load balancer."""
    assert next_view(Ring(SLOTS), ["a:0"], settled=False) == Ring(SLOTS)


def test_while_unsettled_the_view_still_grows() -> None:
    assert next_view(Ring(SLOTS), [*SLOTS, "c:0"], settled=False) == Ring([*SLOTS, "c:0"])


def test_the_first_view_is_taken_as_it_is() -> None:
    assert next_view(Ring(()), ["a:0"], settled=False) == Ring(["a:0"])
