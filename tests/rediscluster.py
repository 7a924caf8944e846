"""A real Redis Cluster for tests: masters (and optional replicas) on free loopback ports."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.rtcproc import RedisServer, free_port, start_redis, wait_for

__all__ = ["RedisCluster", "redis_cluster", "start_cluster"]


@dataclass
class RedisCluster:
    """The nodes of one cluster; `nodes[:masters]` were created as masters."""

    nodes: list[RedisServer]
    masters: int
    dir: Path

    @property
    def seeds(self) -> str:
        """`--redis-cluster` value naming the first two nodes (a client finds the rest)."""
        return ",".join(f"redis://127.0.0.1:{n.port}" for n in self.nodes[:2])

    def node(self, port: int) -> RedisServer:
        return next(n for n in self.nodes if n.port == port)

    def replica_of(self, port: int) -> RedisServer:
        """A replica of the master on `port` (as the replica's own INFO says: gossip may lag)."""
        for node in self.nodes:
            if (
                node.process.poll() is None
                and f"master_port:{port}" in node.cli("INFO", "replication").split()
            ):
                return node
        raise LookupError(f"no replica of {port}")

    def healthy(self) -> bool:
        """Every node sees the cluster up and every other node; every replica is in sync."""
        for node in self.nodes:
            try:
                info = node.cli("CLUSTER", "INFO") + node.cli("INFO", "replication")
            except subprocess.CalledProcessError:
                return False
            fields = dict(line.split(":", 1) for line in info.split() if ":" in line)
            if fields.get("cluster_state") != "ok" or int(fields.get("cluster_known_nodes", 0)) < len(
                self.nodes
            ):
                return False
            if fields.get("role") == "slave" and fields.get("master_link_status") != "up":
                return False
            table = node.cli("CLUSTER", "NODES").splitlines()
            if sum("slave" in line.split()[2] for line in table) != len(self.nodes) - self.masters:
                return False  # gossip has not told this node every replica yet
        return True

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def start_cluster(masters: int = 3, replicas: int = 0) -> RedisCluster:
    """Start `masters * (1 + replicas)` cluster-enabled servers and join them into one cluster."""
    root = Path(tempfile.mkdtemp(prefix="rtc-cluster-"))
    cluster = RedisCluster([], masters, root)
    try:
        for _ in range(masters * (1 + replicas)):
            # the bus port defaults to port + 10000, which may be taken or past 65535: pick one
            node = start_redis(
                "--cluster-enabled", "yes", "--cluster-port", str(free_port()),
                "--cluster-config-file", "nodes.conf",  # in the node's own --dir
                "--cluster-node-timeout", "2000", "--repl-diskless-sync-delay", "0",
            )  # fmt: skip
            cluster.nodes.append(node)
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{n.port}" for n in cluster.nodes),
                "--cluster-replicas",
                str(replicas),
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        wait_for(cluster.healthy, 30, "cluster_state:ok on every node", interval=0.1)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@contextlib.contextmanager
def redis_cluster(masters: int = 3, replicas: int = 0) -> Iterator[RedisCluster]:
    cluster = start_cluster(masters, replicas)
    try:
        yield cluster
    finally:
        cluster.stop()
