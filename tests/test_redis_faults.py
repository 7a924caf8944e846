"""Redis faults against two real hosts: nothing acked is lost, every publish is answered in time.

Short runs of the ledger in `tests/faultledger.py` (the full matrix with its figures is
`python -m tests.faultledger`, see docs/reliability.md). Each asserts SPEC's contracts:
no acked message missing at any subscriber (an epoch change included), no duplicate, no
reorder, an answer to every publish within 2 s and `/health` within 1 s (asserted with
slack for a loaded 2-core test machine: 4 s and 3 s, still well under the faults' length,
which is what they took before), and no host leaving its load balancer over a Redis stall.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.faultledger import (
    KILL_NO_PERSISTENCE,
    RedisBox,
    client_pause,
    debug_sleep,
    fault_cluster,
    run_fault,
    sigstop,
)
from tests.rtcproc import Host

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def faulty() -> Iterator[tuple[list[Host], RedisBox]]:
    with fault_cluster() as started:
        yield started


async def test_redis_stalled_past_the_ring_lease(faulty: tuple[list[Host], RedisBox]) -> None:
    """SIGSTOP for 6 s (longer than the 3 s lease): answers in time, no loss, no flap."""
    report = await run_fault(*faulty, sigstop(6), after=4.0)
    print(report)
    assert report.invariant_failures() == []
    assert report.unavailable > 0, "the stall must have refused some publishes"


async def test_client_pause(faulty: tuple[list[Host], RedisBox]) -> None:
    report = await run_fault(*faulty, client_pause(5), after=3.0)
    print(report)
    assert report.invariant_failures() == []


async def test_debug_sleep(faulty: tuple[list[Host], RedisBox]) -> None:
    report = await run_fault(*faulty, debug_sleep(5), after=3.0)
    print(report)
    assert report.invariant_failures() == []


async def test_restart_without_persistence_delivers_the_new_epoch(
    faulty: tuple[list[Host], RedisBox],
) -> None:
    """Redis loses everything: members get the new epoch from its first seq, announced and counted."""
    cluster, box = faulty
    report = await run_fault(cluster, box, KILL_NO_PERSISTENCE, after=4.0)
    print(report)
    assert report.epoch_changes >= 1
    assert report.invariant_failures() == []
    assert all("history epoch of" in host.log() for host in cluster)
    text = cluster[0].get("/metrics", {"Accept": "text/plain"})[1].decode()
    changes = [line for line in text.splitlines() if line.startswith("rtc_epoch_changes_total")]
    assert changes and sum(float(line.split()[-1]) for line in changes) > 0
