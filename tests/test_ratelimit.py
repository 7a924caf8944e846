"""rtc.ratelimit with the time passed in: bursts, refill, and the abuse window."""

from __future__ import annotations

from rtc.ratelimit import AbuseWindow, TokenBucket


def takes(bucket: TokenBucket, now: float, count: int) -> list[bool]:
    return [bucket.take(now) for _ in range(count)]


def test_burst_then_empty() -> None:
    bucket = TokenBucket(rate=2.0, burst=3, now=100.0)
    assert takes(bucket, 100.0, 4) == [True, True, True, False]


def test_refill_at_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3, now=0.0)
    takes(bucket, 0.0, 3)
    assert bucket.take(0.25) is False  # half a token
    assert bucket.take(0.5) is True  # the halves add up
    assert bucket.take(0.5) is False
    assert takes(bucket, 1.5, 3) == [True, True, False]


def test_refill_is_capped_at_burst() -> None:
    bucket = TokenBucket(rate=20.0, burst=40, now=0.0)
    takes(bucket, 0.0, 40)
    assert takes(bucket, 3600.0, 41) == [True] * 40 + [False]


def test_sustained_rate() -> None:
    bucket = TokenBucket(rate=20.0, burst=40, now=0.0)
    takes(bucket, 0.0, 40)
    granted = sum(bucket.take(i / 100) for i in range(1, 1001))  # 100 attempts/s for 10 s
    assert 199 <= granted <= 200  # float steps may leave the last token a hair short


def test_clock_going_back_refills_nothing() -> None:
    bucket = TokenBucket(rate=1.0, burst=1, now=10.0)
    assert bucket.take(10.0) is True
    assert bucket.take(5.0) is False
    assert bucket.take(10.5) is False  # the stamp stayed at 10.0
    assert bucket.take(11.0) is True


def test_abuse_window_closes_only_past_the_limit() -> None:
    window = AbuseWindow(limit=3, window=10.0)
    assert [window.deny(t) for t in (0.0, 1.0, 2.0)] == [False, False, False]
    assert window.deny(3.0) is True


def test_abuse_window_forgets_old_denials() -> None:
    window = AbuseWindow(limit=3, window=10.0)
    for t in (0.0, 1.0, 2.0):
        window.deny(t)
    assert window.deny(10.0) is False  # the denial at 0.0 is a full window old
    assert window.deny(10.5) is True  # 1, 2, 10, 10.5
    assert window.deny(100.0) is False


def test_abuse_window_spread_out_never_closes() -> None:
    window = AbuseWindow(limit=100, window=10.0)
    assert not any(window.deny(i * 0.11) for i in range(10_000))  # 9 a second, for ever


def test_abuse_window_default_is_100_in_10_seconds() -> None:
    window = AbuseWindow()
    assert not any(window.deny(i * 0.09) for i in range(100))
    assert window.deny(9.5) is True
