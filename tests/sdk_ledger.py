"""The application-level ledger both SDK disruption tests keep, and its check.

Every client joins every room and a few of them publish `{"p": publisher, "n": k}` without
waiting for acks (so publishes pile up in the SDK's queue while it is disconnected). The
ledger records, per room, the seq each publish was acked with, and per client, the
(seq, publish) pairs the application was handed. `check` asserts the SDK contract:
each acked publish delivered exactly once to every client, in seq order, nothing that was
published while disconnected lost, no publish sequenced twice, no gap.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from rtc_client import Client

from tests.rtcproc import until

ROOMS = 3
CLIENTS = 4
PUBLISHERS = 4  # every client publishes, so whichever one a disruption hits had publishes queued
INTERVAL = 0.02  # seconds between one publisher's publishes (about 50/s each)
FLOW = 20  # messages of each room every client receives before a disruption, and after it
IN_FLIGHT = 200  # unacked publishes a publisher keeps at most (the SDK queue bound is 1000)


@dataclass
class Ledger:
    """Raw records, in the same shape the JavaScript ledger tool prints."""

    acked: dict[str, dict[int, str]] = field(default_factory=dict)  # room -> seq -> "p:n"
    received: dict[str, dict[str, list[tuple[int, str]]]] = field(default_factory=dict)
    start: dict[str, dict[str, int]] = field(default_factory=dict)  # client -> room -> seq at join
    published: int = 0
    offline: int = 0  # publishes made while the publisher was not connected
    disconnects: int = 0
    resumed: int = 0  # reconnects that resumed the session
    positions: int = 0  # of those, resumed from the client's own positions (`resume` frame)
    gaps: list[Any] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Ledger:
        ledger = cls(**{k: v for k, v in raw.items() if k not in ("acked", "received")})
        ledger.acked = {room: {int(s): w for s, w in seqs.items()} for room, seqs in raw["acked"].items()}
        ledger.received = {
            c: {room: [(int(s), w) for s, w in got] for room, got in rooms.items()}
            for c, rooms in raw["received"].items()
        }
        return ledger


def check(ledger: Ledger) -> dict[str, int]:
    """Assert the delivery contract; the counts to print."""
    assert not ledger.failed, ledger.failed[:5]
    assert not ledger.gaps, ledger.gaps[:5]
    acked_total = sum(len(seqs) for seqs in ledger.acked.values())
    assert acked_total == ledger.published, f"{ledger.published} published, {acked_total} acked"
    for room, seqs in ledger.acked.items():
        publishes = Counter(seqs.values())
        twice = [p for p, n in publishes.items() if n > 1]
        assert not twice, f"{room}: sequenced more than once: {twice[:5]}"
    deliveries = 0
    for client, rooms in ledger.received.items():
        for room, acked in ledger.acked.items():
            got = rooms.get(room, [])
            seqs = [s for s, _ in got]
            assert seqs == sorted(set(seqs)), f"{client} {room}: out of order or twice"
            first = ledger.start[client][room]
            expected = {s: w for s, w in acked.items() if s > first}
            delivered = dict(got)
            missing = sorted(set(expected) - set(delivered))
            assert not missing, f"{client} {room}: {len(missing)} acked seqs never delivered: {missing[:10]}"
            wrong = [s for s in expected if delivered[s] != expected[s]]
            assert not wrong, f"{client} {room}: other data at seqs {wrong[:10]}"
            deliveries += len(expected)
    return {
        "published": ledger.published,
        "acked": acked_total,
        "published_while_disconnected": ledger.offline,
        "deliveries_checked": deliveries,
        "reconnects": ledger.disconnects,
        "resumed": ledger.resumed,
        "resumed_with_positions": ledger.positions,
        "delivered_twice": 0,
        "gaps": 0,
    }


class PythonWorkload:
    """The ledger workload on the Python SDK, run in the test's event loop."""

    def __init__(self, url: str, token_for: Any, prefix: str) -> None:
        self.url = url
        self.token_for = token_for
        self.rooms = [f"{prefix}-{i}" for i in range(ROOMS)]
        self.ledger = Ledger(acked={room: {} for room in self.rooms})
        self.clients: list[Client] = []
        self.stop = asyncio.Event()
        self.caught_up = asyncio.Event()
        self._publishers: list[asyncio.Task[None]] = []
        self._acks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        for i in range(CLIENTS):
            name = f"c{i}"
            client = Client(self.url, token=self.token_for(name), backoff_base=0.1, backoff_cap=2.0)
            client.on("disconnected", self._count_disconnect)
            client.on("resumed", self._count_resume)
            await client.connect()
            self.clients.append(client)
            self.ledger.received[name] = {room: [] for room in self.rooms}
            self.ledger.start[name] = {}
            for room_name in self.rooms:
                room = await client.join(room_name)
                self.ledger.start[name][room_name] = room.seq or 0
                room.on("message", self._recorder(name, room_name))
                room.on("gap", self.ledger.gaps.append)
        self._publishers = [asyncio.create_task(self._publish(i)) for i in range(PUBLISHERS)]

    def _count_disconnect(self, _: Any) -> None:
        self.ledger.disconnects += 1

    def _count_resume(self, welcome: dict[str, Any]) -> None:
        self.ledger.resumed += 1
        self.ledger.positions += isinstance(welcome.get("rooms"), list)

    def _recorder(self, name: str, room: str) -> Any:
        got = self.ledger.received[name][room]

        def record(msg: dict[str, Any]) -> None:
            data = msg["data"]
            got.append((msg["seq"], f"{data['p']}:{data['n']}"))
            if self.stop.is_set() and self._caught_up():
                self.caught_up.set()

        return record

    async def _publish(self, index: int) -> None:
        client = self.clients[index]
        rooms = [client.rooms[name] for name in self.rooms]
        n = 0
        while not self.stop.is_set():
            if client.queued < IN_FLIGHT:
                room = rooms[n % len(rooms)]
                if client.state != "connected":
                    self.ledger.offline += 1
                task = asyncio.create_task(self._one(room, f"p{index}", n))
                self._acks.add(task)
                n += 1
            await asyncio.sleep(INTERVAL)  # the publishing pace, not a wait

    async def _one(self, room: Any, publisher: str, n: int) -> None:
        self.ledger.published += 1
        try:
            seq = await room.publish({"p": publisher, "n": n})
        except Exception as exc:
            self.ledger.failed.append(f"{publisher}:{n}: {exc!r}")
            return
        self.ledger.acked[room.name][seq] = f"{publisher}:{n}"

    async def finish(self, timeout: float = 60) -> Ledger:
        """Stop publishing, wait for every ack and for every client to have caught up."""
        self.stop.set()
        await asyncio.gather(*self._publishers)
        async with asyncio.timeout(timeout):
            await asyncio.gather(*self._acks)
            if not self._caught_up():
                await self.caught_up.wait()
        for client in self.clients:
            with contextlib.suppress(Exception):
                await client.close()
        return self.ledger

    async def flowing(self, more: int, timeout: float = 30) -> None:
        """Until every client has received every room up to `more` past what is acked now:
        the traffic reaches everyone (the JavaScript tool's `flow N`)."""
        target = {room: max(acked, default=0) + more for room, acked in self.ledger.acked.items()}
        await until(
            lambda: not self._behind(target), timeout, lambda: f"traffic to reach {self._behind(target)}"
        )

    def _behind(self, target: dict[str, int]) -> list[str]:
        """The clients and rooms not yet received up to `target[room]`, as `client/room@last seq`."""
        return [
            f"{name}/{room}@{got[-1][0] if got else 0}"
            for name, rooms in self.ledger.received.items()
            for room, got in rooms.items()
            if (got[-1][0] if got else 0) < target[room]
        ]

    def _caught_up(self) -> bool:
        return not self._behind({room: max(acked, default=0) for room, acked in self.ledger.acked.items()})
