"""Both SDKs publish and receive while the servers are disrupted; the ledger must hold.

Two real hosts (two workers each) on one Redis, behind the shipped HAProxy config (as in
production: clients know one URL, a drained host's clients come back through the proxy
to the other host). While four SDK clients publish and receive in three rooms, the host
of the first publisher is disrupted once per test: a drain (`POST /admin/drain`), a
SIGKILL of one of its workers, or a SIGHUP rolling restart. Then the ledger
(tests/sdk_ledger.py) must show every acked publish delivered exactly once to every
client, in seq order, nothing published while disconnected lost, no publish sequenced
twice, no gap. The counts are printed (`pytest -s` shows them).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.proxies import RunningProxy, require_program, run_haproxy
from tests.rtcproc import SECRET, Host, settle_ring, start_host, start_redis, token, wait_for
from tests.sdk_ledger import FLOW, Ledger, PythonWorkload, check

pytestmark = pytest.mark.timeout(180)

HOST_ARGS = (
    "--rate",
    "1000",
    "--rate-burst",
    "1000",
    "--ws-heartbeat",
    "1",
    "--trusted-proxies",
    "127.0.0.1/32",
)
JS = Path(__file__).parent.parent / "clients" / "js"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, Host], RunningProxy]]:
    require_program("haproxy")
    redis = start_redis()
    with ExitStack() as stack:
        stack.callback(redis.stop)
        started: dict[str, Host] = {}
        for node_id, address in (("a", "127.0.0.2"), ("b", "127.0.0.3")):
            host = start_host(node_id, redis.url, host=address, args=HOST_ARGS)
            stack.callback(shutil.rmtree, host.runtime_dir, True)
            stack.callback(host.stop)
            started[node_id] = host
        settle_ring(list(started.values()))
        proxy = stack.enter_context(run_haproxy(tmp_path_factory.mktemp("haproxy"), list(started.values())))
        yield started, proxy


def _serving(cluster: dict[str, Host]) -> None:
    wait_for(lambda: all(h.healthy() for h in cluster.values()), 30, "both hosts serving")


def drain(host: Host) -> None:
    status, _ = host.request("POST", "/admin/drain")
    assert status == 202
    wait_for(lambda: host.drain_report()["done"], 30, "drain done")
    assert host.request("DELETE", "/admin/drain")[0] == 200


def kill_worker(host: Host) -> None:
    """SIGKILL the worker holding the most client sockets (SO_REUSEPORT spreads them unevenly)."""
    import psutil

    def sockets(pid: int) -> int:
        return sum(
            1
            for c in psutil.Process(pid).net_connections(kind="tcp")
            if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == host.port
        )

    before = host.worker_pids()
    victim = max(before, key=sockets)
    os.kill(victim, signal.SIGKILL)
    wait_for(
        lambda: len(host.worker_pids()) == len(before) and victim not in host.worker_pids(), 30, "respawn"
    )


def rolling_restart(host: Host) -> None:
    before = set(host.worker_pids())
    host.signal(signal.SIGHUP)
    wait_for(
        lambda: not before & set(host.worker_pids()) and len(host.worker_pids()) == len(before), 60, "SIGHUP"
    )


DISRUPTIONS: dict[str, Callable[[Host], None]] = {
    "drain": drain,
    "sigkill-worker": kill_worker,
    "sighup-rolling-restart": rolling_restart,
}


def _flowing(tool: subprocess.Popen[str]) -> None:
    """The JavaScript tool's `flow N`: it answers once traffic reaches every client (or 30 s)."""
    assert tool.stdout is not None and tool.stdin is not None
    tool.stdin.write(f"flow {FLOW}\n")
    tool.stdin.flush()
    answer = tool.stdout.readline().strip()
    assert answer == "flowed", f"the JavaScript clients: {answer or 'no answer'}"


def _report(sdk: str, disruption: str, counts: dict[str, int]) -> None:
    print(f"\nledger {sdk} {disruption}: " + " ".join(f"{k}={v}" for k, v in counts.items()))


@pytest.mark.parametrize("disruption", list(DISRUPTIONS))
async def test_python_sdk_ledger_holds_through(
    disruption: str, cluster: tuple[dict[str, Host], RunningProxy]
) -> None:
    hosts, proxy = cluster
    await asyncio.to_thread(_serving, hosts)
    workload = PythonWorkload(f"{proxy.ws_url}/ws", token, f"py-{disruption}-{uuid.uuid4().hex[:6]}")
    await workload.start()
    target = hosts[workload.clients[0].node or ""]
    await workload.flowing(FLOW)  # traffic before the disruption
    await asyncio.to_thread(DISRUPTIONS[disruption], target)
    await asyncio.to_thread(_serving, hosts)
    await workload.flowing(FLOW)  # and after it, to every client
    counts = check(await workload.finish())
    _report("python", disruption, counts)
    assert counts["reconnects"] > 0, "the disruption reached no client"
    assert counts["resumed"] == counts["resumed_with_positions"] == counts["reconnects"], counts


@pytest.mark.parametrize("disruption", list(DISRUPTIONS))
def test_js_sdk_ledger_holds_through(disruption: str, cluster: tuple[dict[str, Host], RunningProxy]) -> None:
    hosts, proxy = cluster
    _serving(hosts)
    env = {
        **os.environ,
        "RTC_WS": f"{proxy.ws_url}/ws",
        "RTC_JWT_SECRET": SECRET,
        "LEDGER_PREFIX": f"js-{disruption}-{uuid.uuid4().hex[:6]}",
    }
    tool = subprocess.Popen(
        ["node", "--experimental-websocket", str(JS / "tools" / "ledger.mjs")],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert tool.stdout is not None and tool.stdin is not None
        ready = tool.stdout.readline().split()
        assert ready and ready[0] == "ready", ready
        _flowing(tool)  # traffic before the disruption
        DISRUPTIONS[disruption](hosts[ready[1]])
        _serving(hosts)
        _flowing(tool)  # and after it, to every client
        out, _ = tool.communicate("stop\n", timeout=120)
    finally:
        if tool.poll() is None:
            tool.kill()
            tool.wait()
    assert tool.returncode == 0, out[-2000:]
    counts = check(Ledger.from_json(json.loads(out.strip().splitlines()[-1])))
    _report("js", disruption, counts)
    assert counts["reconnects"] > 0, "the disruption reached no client"
    assert counts["resumed"] == counts["resumed_with_positions"] == counts["reconnects"], counts
