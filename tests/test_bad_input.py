"""Malformed frames get an `error` reply; the socket stays open and the worker stays up."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.client import Client
from tests.rtcproc import Host

pytestmark = pytest.mark.timeout(60)

BAD_FRAMES = [
    ("{not json", "bad_request"),
    ("[1, 2]", "bad_request"),
    ('"just a string"', "bad_request"),
    ('{"room": "x"}', "bad_request"),
    ('{"type": 5}', "bad_request"),
    ('{"type": "teleport"}', "unknown_type"),
    ('{"type": "join"}', "bad_request"),
    ('{"type": "join", "room": 42}', "bad_request"),
    ('{"type": "join", "room": "has space"}', "bad_request"),
    ('{"type": "join", "room": "r", "since": -1}', "bad_request"),
    ('{"type": "join", "room": "r", "since": "3"}', "bad_request"),
    ('{"type": "publish", "room": "r"}', "bad_request"),
    ('{"type": "publish", "room": "never-joined", "data": 1}', "not_joined"),
    ('{"type": "members", "room": "never-joined"}', "not_joined"),
    ('{"type": "leave", "room": "never-joined"}', "not_joined"),
    ('{"type": "join", "room": "@someone-else"}', "forbidden"),
    ('{"type": "ping", "id": [1]}', "bad_request"),
    ('{"type": "refresh", "token": "garbage"}', "forbidden"),
]


@pytest.mark.parametrize(("frame", "code"), BAD_FRAMES)
async def test_bad_frame_gets_an_error_and_the_socket_survives(
    cluster: list[Host], frame: str, code: str
) -> None:
    client = await Client.connect(cluster[0].ws, "prober")
    try:
        await client.send_raw(frame)
        error = await client.expect("error")
        assert error["code"] == code, error
        assert "Traceback" not in error["message"]
        pong = await client.request("ping", "pong", id="still-there")
        assert pong["id"] == "still-there"
    finally:
        await client.close()


async def test_error_echoes_the_request_id(cluster: list[Host]) -> None:
    client = await Client.connect(cluster[0].ws, "prober")
    try:
        await client.send(type="publish", room="nowhere", data=1, id="req-9")
        error = await client.expect("error")
        assert error == {"type": "error", "code": "not_joined", "message": error["message"], "id": "req-9"}
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ('{"type": "teleport", "id": "t-1"}', "unknown_type"),
        ('{"type": "publish", "room": "r", "id": "t-1"}', "bad_request"),
        ('{"type": 5, "id": "t-1"}', "bad_request"),
    ],
)
async def test_refused_frame_echoes_its_id(cluster: list[Host], frame: str, code: str) -> None:
    client = await Client.connect(cluster[0].ws, "prober")
    try:
        await client.send_raw(frame)
        error = await client.expect("error")
        assert (error["code"], error.get("id")) == (code, "t-1")
    finally:
        await client.close()


async def test_rate_limited_frames_echo_their_id(cluster: list[Host]) -> None:
    """Frames over the burst are refused one by one, each refusal naming its frame."""
    client = await Client.connect(cluster[0].ws, "prober")
    try:
        for n in range(60):  # more than the default burst of 40, sent at once
            await client.send(type="ping", id=n)
        pongs = await client.wait_frames("pong", 1)
        async with asyncio.timeout(10):
            while len(replies := [f for f in client.seen if f["type"] in ("pong", "error")]) < 60:
                await client.frames.get()
        assert sorted(f["id"] for f in replies) == list(range(60)), "every frame answered once, by id"
        refused = [f for f in replies if f["type"] == "error"]
        assert refused and all(f["code"] == "rate_limited" for f in refused), (len(pongs), refused[:3])
    finally:
        await client.close()


async def test_binary_frame_is_refused_politely(cluster: list[Host]) -> None:
    client = await Client.connect(cluster[0].ws, "prober")
    try:
        await client.ws.send_bytes(b"\x00\x01")
        assert (await client.expect("error"))["code"] == "bad_request"
        await client.request("ping", "pong")
    finally:
        await client.close()


async def test_workers_survive_a_barrage(cluster: list[Host]) -> None:
    pids = cluster[0].worker_pids()
    clients = [await Client.connect(cluster[0].ws, f"p{i}") for i in range(8)]
    try:
        for client in clients:
            for frame, _ in BAD_FRAMES[:10]:
                await client.send_raw(frame)
        for client in clients:
            await client.wait_frames("error", 10)
    finally:
        for client in clients:
            await client.close()
    assert cluster[0].worker_pids() == pids
    assert cluster[0].healthy()
    status = json.loads(cluster[0].get("/metrics")[1])
    assert status["errors_total"] >= 80


async def test_bad_token_is_refused_before_the_upgrade(cluster: list[Host]) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        for params in ({}, {"token": "nope"}):
            async with http.get(
                cluster[0].http + "/ws",
                params=params,
                headers={
                    "Upgrade": "websocket",
                    "Connection": "Upgrade",
                    "Sec-WebSocket-Version": "13",
                    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                },
            ) as response:
                assert response.status == 401
