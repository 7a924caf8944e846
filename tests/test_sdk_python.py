"""The Python SDK (clients/python, `rtc_client.Client`) against a real rtc host.

Its reconnect schedule and state machine are tested without a server in
clients/python/tests/test_state.py; here the same client talks to a real host with two
workers (so rooms are owned by one worker and forwarded from the other).
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from rtc_client import AsyncServerAPI, Client, RtcError

from tests.rtcproc import Host, RedisServer, start_host, token

pytestmark = pytest.mark.timeout(60)

API_KEY = "sdk-py-key-0123456789abcdef"


@pytest.fixture(scope="module")
def host(redis_server: RedisServer) -> Iterator[Host]:
    started = start_host("sdkpy", redis_server.url, args=("--api-keys", f"py:{API_KEY}", "--rate", "1000"))
    yield started
    started.stop()
    shutil.rmtree(started.runtime_dir, ignore_errors=True)


@pytest.fixture
async def clients(host: Host) -> AsyncIterator[list[Client]]:
    made: list[Client] = []
    for user in ("ann", "bob"):
        client = Client(host.ws, token=token(user), backoff_base=0.05, backoff_cap=0.5)
        await client.connect()
        made.append(client)
    yield made
    for client in made:
        await client.close()


async def take(room: Any, count: int) -> list[dict[str, Any]]:
    got = []
    async with asyncio.timeout(10):
        async for msg in room:
            got.append(msg)
            if len(got) == count:
                return got
    return got


async def test_publish_reaches_every_member_once_in_order(clients: list[Client]) -> None:
    ann, bob = clients
    room_a, room_b = await ann.join("py-order"), await bob.join("py-order")
    seqs = await asyncio.gather(*((room_a if i % 2 else room_b).publish({"i": i}) for i in range(20)))
    for room in (room_a, room_b):
        got = await take(room, 20)
        assert [m["seq"] for m in got] == sorted(seqs)


async def test_members_direct_and_presence(clients: list[Client]) -> None:
    ann, bob = clients
    room_a = await ann.join("py-members")
    presence: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    room_a.on("presence", presence.put_nowait)
    await bob.join("py-members")
    assert await asyncio.wait_for(presence.get(), 5) == {
        "type": "presence",
        "room": "py-members",
        "user": "bob",
        "event": "join",
    }
    assert await room_a.members() == {"users": ["ann", "bob"], "count": 2}
    seq = await ann.direct("bob", {"hi": 1})
    got = await anext(bob.inbox.__aiter__())
    assert (got["seq"], got["from"], got["data"]) == (seq, "ann", {"hi": 1})


async def test_dropped_socket_resumes_without_loss_and_queued_publishes_go_once(
    clients: list[Client],
) -> None:
    ann, bob = clients
    room_a, room_b = await ann.join("py-resume"), await bob.join("py-resume")
    resumed = asyncio.Event()
    welcomes: list[dict[str, Any]] = []
    ann.on("resumed", lambda welcome: (welcomes.append(welcome), resumed.set()))
    await room_b.publish("before")
    session = ann.session
    await ann.reconnect()
    meanwhile = [asyncio.ensure_future(room_a.publish(f"queued-{i}")) for i in range(2)]
    for i in range(8):
        await room_b.publish(f"while-{i}")
    await asyncio.wait_for(resumed.wait(), 10)
    assert ann.session == session
    assert "py-resume" in welcomes[0]["rooms"]  # resumed from the client's own positions
    queued = await asyncio.gather(*meanwhile)
    await room_b.publish("after")
    got = await take(room_a, 12)
    seqs = [m["seq"] for m in got]
    assert seqs == sorted(set(seqs)) and len(seqs) == 12
    assert set(queued) <= set(seqs)
    assert [m["data"] for m in got].count("queued-0") == 1


async def test_a_publish_on_a_closing_socket_is_sent_again_after_the_resume(clients: list[Client]) -> None:
    """A worker killed mid-send leaves the transport closing before the reader sees it:
    the write fails there, and the publish must wait for the resume, not fail."""
    ann, bob = clients
    room_a, room_b = await ann.join("py-closing"), await bob.join("py-closing")
    resumed = asyncio.Event()
    ann.on("resumed", lambda _: resumed.set())
    transport = ann._ws._response.connection.transport  # type: ignore[union-attr]
    transport.abort()  # closing now; aiohttp's reader learns of it a loop turn later
    publish = asyncio.ensure_future(room_a.publish("while-closing"))
    await asyncio.wait_for(resumed.wait(), 10)
    seq = await asyncio.wait_for(publish, 10)
    got = await take(room_b, 1)
    assert (got[0]["seq"], got[0]["data"]) == (seq, "while-closing")


async def test_server_api_disconnect_is_final_and_get_token_refreshes(host: Host) -> None:
    minted = 0

    async def get_token() -> str:
        nonlocal minted
        minted += 1
        return token("eve", ttl=6)

    errors: list[Any] = []
    eve = Client(host.ws, get_token=get_token, backoff_base=0.05)
    eve.on("error", errors.append)
    closed: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
    eve.on("closed", lambda event: closed.done() or closed.set_result(event))
    await eve.connect()
    await asyncio.sleep(5.5)  # the refresh is due 1.2 s before the 6 s token expires
    assert minted >= 2 and errors == []
    async with AsyncServerAPI(host.http, api_key=API_KEY) as api:
        assert await api.disconnect("eve") == 1
    assert (await asyncio.wait_for(closed, 5))["code"] == 4003
    assert eve.state == "closed"
    with pytest.raises(RtcError):
        await eve.join("anything")
    await eve.close()


def _doc_block(heading: str) -> str:
    text = (Path(__file__).parent.parent / "docs" / "clients.md").read_text()
    section = text.split(heading, 1)[1]
    block = section.split("```python", 1)[1].split("\n", 1)[1]  # after the fence's info string
    return block.split("```", 1)[0]


async def test_docs_backend_example_reaches_a_subscriber(host: Host) -> None:
    """docs/clients.md's backend example, run as written (only the address and key differ)."""
    listener = Client(host.ws, token=token("ann"))
    await listener.connect()
    try:
        room = await listener.join("news")
        code = _doc_block("## A backend publishing to a browser")
        code = code.replace("http://127.0.0.1:8081", host.http).replace("dev-api-key-0123456789", API_KEY)
        scope: dict[str, Any] = {}
        await asyncio.to_thread(exec, code, scope)
        got = await take(room, 1)
        assert (got[0]["seq"], got[0]["from"], got[0]["data"]) == (
            scope["seq"],
            "server",
            {"text": "deploy finished"},
        )
        again = await asyncio.to_thread(
            scope["api"].publish, "news", {"text": "deploy finished"}, id="deploy-4711"
        )
        assert again == scope["seq"]
    finally:
        await listener.close()
