"""Clients that vanish mid-stream (TCP reset, no close frame) while their room is busy.

Between a peer's reset and the handler noticing it, the connection is still a member of
its rooms: a fan-out in that window writes to a closed transport. That must be a no-op
for the vanished client and nothing else: the other members go on receiving, the worker
goes on accepting connections, and nothing is logged as an error.
"""

from __future__ import annotations

import asyncio

from tests.client import Client
from tests.rawstream import RawSocket
from tests.rtcproc import Host, hosts, start_redis, token

ROUNDS = 10
VICTIMS = 20


async def vanishing_member(host: Host, user: str, room: str) -> None:
    """Open a raw WebSocket, join `room`, wait for `joined`, then reset the connection."""
    sock = await RawSocket.open(host.host, host.port, token=token(user))
    await sock.expect("welcome")
    await sock.send(type="join", room=room)
    await sock.expect("joined")
    sock.reset()  # RST: no close frame, no FIN


async def scenario(host: Host) -> None:
    room = "hot"
    watcher = await Client.connect(host.ws, "watcher")
    publisher = await Client.connect(host.ws, "publisher")
    try:
        await watcher.join(room)
        await publisher.join(room)
        await churn_under_load(host, publisher, room)
        try:
            await publisher.send(type="publish", room=room, data="final")
            await watcher.expect("message", timeout=5, data="final")
            late = await Client.connect(host.ws, "late")
            await late.join(room)
            await late.close()
        except TimeoutError:
            raise AssertionError(f"the worker stopped delivering:\n{host.log()[-3000:]}") from None
    finally:
        await watcher.close()
        await publisher.close()


async def churn_under_load(host: Host, publisher: Client, room: str) -> None:
    """ROUNDS x VICTIMS members join and vanish while `publisher` floods the room."""
    stop = asyncio.Event()

    async def flood() -> None:
        n = 0
        while not stop.is_set():
            for _ in range(5):
                n += 1
                await publisher.send(type="publish", room=room, data=n)
            await asyncio.sleep(0.005)  # the flood's pace, not a wait

    flooding = asyncio.create_task(flood())
    try:
        for r in range(ROUNDS):
            await asyncio.wait_for(
                asyncio.gather(*(vanishing_member(host, f"v{r}-{i}", room) for i in range(VICTIMS))),
                10,
            )
            await asyncio.sleep(0.02)  # the churn's pace between rounds, not a wait
    except (TimeoutError, AssertionError) as exc:
        raise AssertionError(f"the host stopped serving joins ({exc!r}):\n{host.log()[-3000:]}") from None
    finally:
        stop.set()
        await flooding


def test_vanishing_clients_do_not_break_fan_out() -> None:
    redis = start_redis()
    try:
        # One worker: every member, the flood and every reset meet in one process.
        with hosts(("abrupt", redis.url), workers=1, args=("--rate", "100000", "--rate-burst", "100000")) as (
            host,
        ):
            asyncio.run(scenario(host))
            assert host.stop() == 0, host.log()[-3000:]
            log = host.log()
            assert "unable to perform operation" not in log, log[-3000:]
            assert " ERROR " not in log and "Traceback" not in log, log[-3000:]
    finally:
        redis.stop()
