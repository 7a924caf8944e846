"""Fixtures that start real servers on free loopback ports and stop them afterwards."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.rtcproc import Host, RedisServer, hosts, settle_ring, start_redis


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = start_redis()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    """A Redis of the module's own: its tests fill it, or read back the keys they made."""
    server = start_redis()
    yield server
    server.stop()


@pytest.fixture
def fresh_redis() -> Iterator[RedisServer]:
    """A Redis of the test's own, for tests that break or flush it."""
    server = start_redis()
    yield server
    server.stop()


@pytest.fixture
def host_and_redis(fresh_redis: RedisServer) -> Iterator[tuple[RedisServer, Host]]:
    """A one-worker host on a Redis of the test's own, for tests that break or pause it."""
    with hosts(("solo", fresh_redis.url), workers=1) as (host,):
        yield fresh_redis, host


@pytest.fixture(scope="module")
def cluster() -> Iterator[list[Host]]:
    """Two hosts (two workers each) sharing one Redis: the smallest real cluster."""
    redis = start_redis()
    try:
        with hosts(("alpha", redis.url), ("beta", redis.url)) as started:
            settle_ring(started)
            yield started
    finally:
        redis.stop()
