"""Presence pacing, fed times: events go at once after a quiet window, else once a window."""

from __future__ import annotations

from rtc.routing.pacing import EventPacer

WINDOW = 0.5


def test_the_first_events_of_a_room_go_at_once() -> None:
    assert EventPacer(WINDOW).due("r", 100.0) == 100.0


def test_events_soon_after_a_write_wait_for_the_window_to_end() -> None:
    pacer = EventPacer(WINDOW)
    pacer.written("r", 100.0)
    assert pacer.due("r", 100.1) == 100.5
    assert pacer.due("r", 100.5) == 100.5
    assert pacer.due("other", 100.1) == 100.1  # rooms are paced apart


def test_events_after_a_quiet_window_go_at_once() -> None:
    pacer = EventPacer(WINDOW)
    pacer.written("r", 100.0)
    assert pacer.due("r", 101.0) == 101.0


def test_a_forgotten_room_starts_quiet() -> None:
    pacer = EventPacer(WINDOW)
    pacer.written("r", 100.0)
    pacer.forget("r")
    assert pacer.due("r", 100.1) == 100.1
