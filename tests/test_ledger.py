"""The ledger: a client cut again and again loses nothing, and its application sees nothing twice.

A publisher sends numbered room messages and directs; one member that never disconnects is
the ground truth; another connection of the same user reads slowly and is cut with a TCP
reset every second or two (some cuts held for seconds), reconnecting to either host with the
raw protocol exactly as docs/protocol.md describes: `?session=SID&positions=1`, a `resume`
frame with its own positions, de-duplication by seq. At the end its application has seen
exactly the ground truth's seqs, each once, in order, for the room and for the inbox.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from typing import Any

import pytest

from tests.client import Client
from tests.rawstream import RawSocket, Refused
from tests.rtcproc import Host, hosts, settle_ring, start_redis, token, until

ROOM = "ledger.room"
USER = "bob"
INBOX = "@" + USER
MESSAGES = 400
DIRECT_EVERY = 10  # one direct per ten room messages: 40 directs
PUBLISH_INTERVAL = 0.04
READ_DELAY = 0.01  # the cut client is a slow reader, and stalls before each cut


@pytest.fixture(scope="module")
def pair() -> Iterator[list[Host]]:
    redis = start_redis()
    try:
        args = ("--rate", "1000", "--rate-burst", "1000")
        with hosts(("ledger-a", redis.url), ("ledger-b", redis.url), workers=1, args=args) as started:
            settle_ring(started)
            yield started
    finally:
        redis.stop()


class Ledger:
    """What one client's application was shown, per room, after de-duplication by seq."""

    def __init__(self) -> None:
        self.shown: dict[str, list[int]] = {ROOM: [], INBOX: []}
        self.wire_duplicates = 0  # seqs the server sent again and the client dropped
        self.gaps: list[dict[str, Any]] = []
        self.not_recovered: list[dict[str, Any]] = []

    def position(self, room: str) -> int:
        shown = self.shown[room]
        return shown[-1] if shown else 0

    def offer(self, room: str, seq: int) -> None:
        if seq > self.position(room):
            self.shown[room].append(seq)
        else:
            self.wire_duplicates += 1


class CutClient:
    """A slow reader that is cut repeatedly and resumes with its own positions."""

    def __init__(self, cluster: list[Host], seed: int) -> None:
        self.cluster = cluster
        self.random = random.Random(seed)
        self.ledger = Ledger()
        self.epochs: dict[str, str] = {}
        self.session: str | None = None
        self.cuts = 0
        self.held = 0
        self.finishing = asyncio.Event()

    async def run(self, caught_up: asyncio.Event) -> None:
        attempt = 0
        while not caught_up.is_set():
            host = self.cluster[attempt % len(self.cluster)]
            attempt += 1
            query = {"token": token(USER)}
            if self.session:
                query |= {"session": self.session, "positions": "1"}
            try:
                sock = await RawSocket.open(host.host, host.port, **query)
            except (Refused, OSError):
                await asyncio.sleep(0.1)  # the host refused: try again, as a client library would
                continue
            try:
                await self._greet(sock)
                lifetime = self.random.uniform(0.5, 2.0)
                try:
                    async with asyncio.timeout(None if self.finishing.is_set() else lifetime):
                        await self._read(sock, caught_up)
                except TimeoutError:  # busy elsewhere, not reading: frames pile up, then the cut
                    await asyncio.sleep(self.random.uniform(0.2, 0.8))  # the busy reader under test
            finally:
                sock.reset()
            if caught_up.is_set():
                return
            self.cuts += 1
            if self.cuts % 3 == 0 and not self.finishing.is_set():  # held away for seconds
                self.held += 1
                await asyncio.sleep(self.random.uniform(2.0, 3.0))  # the held cut under test

    async def _greet(self, sock: RawSocket) -> None:
        welcome = await sock.expect("welcome")
        if welcome["resumed"]:
            positions = {room: self.ledger.position(room) for room in self.ledger.shown}
            await sock.send(type="resume", rooms=positions, epochs=self.epochs)
            missing = [room for room in self.ledger.shown if room not in welcome["rooms"]]
        else:
            self.session = welcome["session"]
            missing = list(self.ledger.shown)
        for room in missing:
            since = self.ledger.position(room)
            if since:
                await sock.send(type="join", room=room, since=since)
            elif room != INBOX:  # the inbox is listened to from the start
                await sock.send(type="join", room=room)

    async def _read(self, sock: RawSocket, caught_up: asyncio.Event) -> None:
        while (frame := await sock.recv()) is not None:
            kind = frame["type"]
            if kind == "message" and frame["room"] == ROOM:
                self.ledger.offer(ROOM, frame["seq"])
            elif kind == "direct":
                self.ledger.offer(INBOX, frame["seq"])
            elif kind == "joined":
                self.epochs[frame["room"]] = frame["epoch"]
                if not frame["recovered"]:
                    self.ledger.not_recovered.append(frame)
            elif kind == "gap":
                self.ledger.gaps.append(frame)
            if caught_up.is_set():
                return
            await asyncio.sleep(READ_DELAY)  # the slow reader under test, not a wait


async def publish_all(host: Host) -> dict[str, int]:
    """Room messages and directs at a steady pace; returns the last seq of each once acked."""
    publisher = await Client.connect(host.ws, "publisher")
    try:
        await publisher.join(ROOM)
        for n in range(1, MESSAGES + 1):
            await publisher.send(type="publish", room=ROOM, data=n, id=f"r{n}")
            if n % DIRECT_EVERY == 0:
                await publisher.send(type="direct", to=USER, data=n, id=f"d{n}")
            await asyncio.sleep(PUBLISH_INTERVAL)  # the publishing pace, not a wait
        acks = await publisher.wait_frames("ack", MESSAGES + MESSAGES // DIRECT_EVERY, timeout=30)
        return {
            ROOM: max(a["seq"] for a in acks if a.get("room") == ROOM),
            INBOX: max(a["seq"] for a in acks if a.get("to") == USER),
        }
    finally:
        await publisher.close()


def steady_ledger(steady: Client) -> Ledger:
    ledger = Ledger()
    for frame in steady.seen:
        if frame["type"] == "message" and frame["room"] == ROOM:
            ledger.offer(ROOM, frame["seq"])
        elif frame["type"] == "direct":
            ledger.offer(INBOX, frame["seq"])
    return ledger


def report(truth: Ledger, cut: CutClient) -> dict[str, tuple[int, int]]:
    """Per room: (lost, duplicates shown to the application)."""
    counts = {}
    for room in (ROOM, INBOX):
        shown = cut.ledger.shown[room]
        lost = len(set(truth.shown[room]) - set(shown))
        counts[room] = (lost, len(shown) - len(set(shown)))
    print(
        f"\nledger: {len(truth.shown[ROOM])} room messages, {len(truth.shown[INBOX])} directs; "
        f"cut client: {cut.cuts} cuts ({cut.held} held for seconds), "
        f"room lost={counts[ROOM][0]} dup={counts[ROOM][1]}, "
        f"directs lost={counts[INBOX][0]} dup={counts[INBOX][1]}, "
        f"{cut.ledger.wire_duplicates} re-sent seqs dropped by the client, "
        f"gaps={len(cut.ledger.gaps)}, not recovered={len(cut.ledger.not_recovered)}"
    )
    return counts


@pytest.mark.timeout(180)
async def test_ledger_cut_client_loses_nothing_and_shows_nothing_twice(pair: list[Host]) -> None:
    steady = await Client.connect(pair[1].ws, USER)
    cut = CutClient(pair, seed=15)
    caught_up = asyncio.Event()
    try:
        await steady.join(ROOM)
        cutting = asyncio.create_task(cut.run(caught_up))
        last = await publish_all(pair[0])
        await steady.wait_messages(ROOM, last[ROOM], timeout=30)
        await steady.wait_frames("direct", last[INBOX], timeout=30)
        cut.finishing.set()  # no more cuts: let it catch up
        await until(
            lambda: all(cut.ledger.position(room) >= seq for room, seq in last.items()),
            30,
            lambda: f"the cut client to reach {last} (at { ({r: cut.ledger.position(r) for r in last}) })",
            0.1,
        )
        caught_up.set()
        await asyncio.wait_for(cutting, 15)
    finally:
        await steady.close()
    truth = steady_ledger(steady)
    assert truth.shown[ROOM] == list(range(1, MESSAGES + 1))
    assert truth.shown[INBOX] == list(range(1, MESSAGES // DIRECT_EVERY + 1))
    counts = report(truth, cut)
    assert cut.cuts >= 5 and cut.held >= 1, "the scenario did not cut the client"
    assert counts == {ROOM: (0, 0), INBOX: (0, 0)}
    assert cut.ledger.shown == truth.shown
    assert not cut.ledger.gaps and not cut.ledger.not_recovered
