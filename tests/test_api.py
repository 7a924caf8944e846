"""The server API (SPEC 8) against two real hosts on one real Redis.

Every response a test receives is validated against the served OpenAPI 3.1 document
with openapi-core, so the document is held to what the server really answers.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from openapi_core import OpenAPI
from openapi_core.testing import MockRequest, MockResponse
from prometheus_client.parser import text_string_to_metric_families
from rtc_client import ApiError, AsyncServerAPI, ServerAPI

from rtc.metrics import API_ENDPOINTS
from tests.client import Client
from tests.rtcproc import Host, counter, hosts, settle_ring, start_host, start_redis

pytestmark = pytest.mark.timeout(60)

KEY = "key-main-0123456789abcdef"
OLD_KEY = "key-old-0123456789abcdef"
HOST_ARGS = ("--api-keys", f"main:{KEY},old:{OLD_KEY}", "--rate", "1000", "--rate-burst", "1000")
DOCUMENT = Path(__file__).parent.parent / "rtc" / "static" / "openapi.json"


@pytest.fixture(scope="module")
def api_cluster() -> Iterator[list[Host]]:
    redis = start_redis()
    try:
        with hosts(("alpha", redis.url), ("beta", redis.url), args=HOST_ARGS) as started:
            settle_ring(started)
            yield started
    finally:
        redis.stop()


@pytest.fixture(scope="module")
def openapi() -> OpenAPI:
    return OpenAPI.from_file_path(str(DOCUMENT))


class Api:
    """Raw HTTP calls whose every answer is checked against the OpenAPI document."""

    def __init__(self, http: aiohttp.ClientSession, openapi: OpenAPI) -> None:
        self.http = http
        self.openapi = openapi
        self.validated = 0

    async def call(
        self,
        host: Host,
        method: str,
        path: str,
        body: Any = None,
        *,
        key: str | None = KEY,
        headers: dict[str, str] | None = None,
        data: bytes | None = None,
        documented: bool = True,
    ) -> tuple[int, Any]:
        sent = {"Authorization": f"apikey {key}"} if key else {}
        sent.update(headers or {})
        if body is not None:
            data = json.dumps(body).encode()
            sent["Content-Type"] = "application/json"
        async with self.http.request(method, host.http + path, data=data, headers=sent) as response:
            raw = await response.read()
            status = response.status
            assert response.content_type == "application/json", raw
        if documented and status not in (404, 405):  # the document has no such path or method
            route, _, query = path.partition("?")
            args = dict(part.split("=", 1) for part in query.split("&") if part)
            request = MockRequest(host.http, method.lower(), route, args=args, data=data)
            self.openapi.validate_response(request, MockResponse(raw, status_code=status))
            self.validated += 1
        return status, json.loads(raw)


@pytest.fixture
async def api(openapi: OpenAPI) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession() as http:
        yield Api(http, openapi)


async def _member(host: Host, user: str, room: str) -> Client:
    client = await Client.connect(host.ws, user)
    await client.send(type="join", room=room)
    await client.expect("joined", room=room)
    return client


async def test_document_is_openapi_3_1_and_served_without_a_key(
    api_cluster: list[Host], api: Api, openapi: OpenAPI
) -> None:
    status, document = await api.call(api_cluster[0], "GET", "/api/openapi.json", key=None)
    assert status == 200
    assert document == json.loads(DOCUMENT.read_text())
    assert document["openapi"].startswith("3.1")
    served = {path for path in document["paths"]}
    assert served == {
        "/api/publish",
        "/api/broadcast",
        "/api/direct",
        "/api/disconnect",
        "/api/rooms/{room}/members",
        "/api/rooms/{room}/history",
        "/api/info",
        "/api/openapi.json",
    }


async def test_missing_or_wrong_key_gets_401(api_cluster: list[Host], api: Api) -> None:
    host = api_cluster[0]
    body = {"room": "keys", "data": 1}
    for key, headers in ((None, {}), ("wrong-0123456789abcdef", {}), (None, {"X-API-Key": "nope"})):
        status, answer = await api.call(host, "POST", "/api/publish", body, key=key, headers=headers)
        assert status == 401
        assert answer["error"]["code"] == "forbidden"
    status, _ = await api.call(host, "GET", "/api/info", key=None)
    assert status == 401
    # Unknown paths too: nothing under /api/ is told to a caller without a key.
    status, _ = await api.call(host, "GET", "/api/nothing-here", key=None, documented=False)
    assert status == 401
    # Both configured keys work (rotation), in either header.
    assert (await api.call(host, "POST", "/api/publish", body, key=OLD_KEY))[0] == 200
    assert (await api.call(host, "POST", "/api/publish", body, key=None, headers={"X-API-Key": KEY}))[
        0
    ] == 200


async def test_no_keys_configured_every_api_path_is_404(redis_server: Any) -> None:
    host = start_host("nokeys", redis_server.url, workers=1)
    try:
        for path in ("/api/publish", "/api/info", "/api/openapi.json", "/api/rooms/x/history"):
            status, _ = host.get(path, headers={"Authorization": f"apikey {KEY}"})
            assert status == 404, path
    finally:
        host.stop()


async def test_publish_reaches_members_on_both_hosts(api_cluster: list[Host], api: Api) -> None:
    alpha, beta = api_cluster
    members = [await _member(alpha, "ann", "both"), await _member(beta, "bob", "both")]
    try:
        status, answer = await api.call(beta, "POST", "/api/publish", {"room": "both", "data": {"n": 1}})
        assert status == 200
        assert answer == {"room": "both", "seq": answer["seq"]}
        status, named = await api.call(
            alpha, "POST", "/api/publish", {"room": "both", "data": 2, "from": "bot"}
        )
        assert status == 200 and named["seq"] == answer["seq"] + 1
        for member in members:
            first = await member.expect("message", room="both")
            assert (first["seq"], first["from"], first["data"]) == (answer["seq"], "server", {"n": 1})
            second = await member.expect("message", room="both")
            assert (second["seq"], second["from"], second["data"]) == (named["seq"], "bot", 2)
    finally:
        for member in members:
            await member.close()


async def test_repeated_id_gives_the_same_seq_and_one_message(api_cluster: list[Host], api: Api) -> None:
    alpha, beta = api_cluster
    member = await _member(alpha, "ann", "idem")
    try:
        body = {"room": "idem", "data": "once", "id": "evt-1"}
        answers = [await api.call(host, "POST", "/api/publish", body) for host in (alpha, beta, alpha)]
        assert {a[1]["seq"] for a in answers} == {answers[0][1]["seq"]}
        status, after = await api.call(alpha, "POST", "/api/publish", {"room": "idem", "data": "next"})
        assert status == 200 and after["seq"] == answers[0][1]["seq"] + 1
        got = [await member.expect("message", room="idem") for _ in range(2)]
        assert [m["data"] for m in got] == ["once", "next"]  # "once" came once
    finally:
        await member.close()


async def test_disconnect_closes_the_users_sockets_on_both_hosts(api_cluster: list[Host], api: Api) -> None:
    alpha, beta = api_cluster
    victims = [await Client.connect(h.ws, "mallory") for h in (alpha, alpha, beta)]
    bystander = await Client.connect(beta.ws, "alice")
    try:
        status, answer = await api.call(
            alpha, "POST", "/api/disconnect", {"user": "mallory", "reason": "bye"}
        )
        assert status == 200
        assert answer == {"user": "mallory", "closed": 3}
        for victim in victims:
            await asyncio.wait_for(victim.closed.wait(), 5)
            assert victim.close_code == 4003
        await bystander.send(type="ping")
        await bystander.expect("pong")
        status, again = await api.call(beta, "POST", "/api/disconnect", {"user": "mallory", "code": 4100})
        assert (status, again["closed"]) == (200, 0)
        status, bad = await api.call(beta, "POST", "/api/disconnect", {"user": "alice", "code": 1000})
        assert (status, bad["error"]["code"]) == (400, "bad_request")
    finally:
        for client in (*victims, bystander):
            await client.close()


async def test_history_pages_through_a_room(api_cluster: list[Host], api: Api) -> None:
    alpha, beta = api_cluster
    seqs = [
        (await api.call(alpha, "POST", "/api/publish", {"room": "pages", "data": i}))[1]["seq"]
        for i in range(25)
    ]
    assert seqs == list(range(seqs[0], seqs[0] + 25))
    pages: list[list[int]] = []
    since = seqs[0] - 1
    while True:
        status, page = await api.call(beta, "GET", f"/api/rooms/pages/history?since={since}&limit=10")
        assert status == 200 and page["seq"] == seqs[-1] and page["epoch"]
        if not page["messages"]:
            break
        pages.append([m["seq"] for m in page["messages"]])
        assert all(m["from"] == "server" and isinstance(m["ts"], int) for m in page["messages"])
        since = page["messages"][-1]["seq"]
    assert [len(p) for p in pages] == [10, 10, 5]
    assert [seq for page in pages for seq in page] == seqs
    status, newest = await api.call(alpha, "GET", "/api/rooms/pages/history?limit=3")
    assert [m["data"] for m in newest["messages"]] == [22, 23, 24]
    status, bad = await api.call(alpha, "GET", "/api/rooms/pages/history?limit=1001")
    assert status == 400 and bad["error"]["code"] == "bad_request"


async def test_bodies_over_the_limit_get_413(api_cluster: list[Host], api: Api) -> None:
    host = api_cluster[0]
    huge = {"room": "big", "data": "x" * 70000}
    status, answer = await api.call(host, "POST", "/api/publish", huge)
    assert status == 413 and answer["error"]["code"] == "too_large"

    # Chunked, with no Content-Length to refuse up front.
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"room":"big","data":"'
        for _ in range(10):
            yield b"y" * 8000
        yield b'"}'

    async with api.http.post(
        host.http + "/api/publish", data=chunks(), headers={"X-API-Key": KEY}
    ) as response:
        assert response.status == 413
        assert (await response.json())["error"]["code"] == "too_large"


async def test_bad_bodies_get_400_with_the_error_shape(api_cluster: list[Host], api: Api) -> None:
    host = api_cluster[0]
    for body in ({"room": "ok"}, {"room": "bad room!", "data": 1}, {"room": "@ann", "data": 1}, [1, 2]):
        status, answer = await api.call(host, "POST", "/api/publish", body)
        assert status == 400, body
        assert answer["error"]["code"] == "bad_request"
    status, answer = await api.call(host, "POST", "/api/publish", data=b"{not json")
    assert (status, answer["error"]["code"]) == (400, "bad_request")
    status, answer = await api.call(host, "GET", "/api/publish")
    assert status == 405 and answer["error"]["code"] == "bad_request"


async def test_broadcast_direct_members_and_info(api_cluster: list[Host], api: Api) -> None:
    alpha, beta = api_cluster
    ann = await _member(alpha, "ann", "b1")
    bob = await _member(beta, "bob", "b2")
    try:
        status, answer = await api.call(
            alpha, "POST", "/api/broadcast", {"rooms": ["b1", "b2", "no such!"], "data": "hi", "id": 7}
        )
        assert status == 200
        ok, also, bad = answer["results"]
        assert (ok["room"], also["room"], bad["error"]["code"]) == ("b1", "b2", "bad_request")
        assert (await ann.expect("message", room="b1"))["seq"] == ok["seq"]
        assert (await bob.expect("message", room="b2"))["seq"] == also["seq"]
        status, sent = await api.call(
            beta, "POST", "/api/direct", {"to": "ann", "data": {"x": 1}, "from": "billing"}
        )
        assert status == 200 and sent["to"] == "ann"
        got = await ann.expect("direct")
        assert (got["from"], got["seq"], got["data"]) == ("billing", sent["seq"], {"x": 1})
        status, members = await api.call(beta, "GET", "/api/rooms/b1/members")
        assert members == {"room": "b1", "users": ["ann"], "count": 1}
        status, info = await api.call(alpha, "GET", "/api/info")
        assert status == 200
        assert [h["node"] for h in info["hosts"]] == ["alpha", "beta"]
        assert info["slots"] == ["alpha:0", "alpha:1", "beta:0", "beta:1"]
        assert [h["connections"] for h in info["hosts"]] == [1, 1]
    finally:
        await ann.close()
        await bob.close()


async def test_every_response_was_checked_against_the_document(api_cluster: list[Host], api: Api) -> None:
    """A mismatch (a field the document lacks, a wrong type) fails validation."""
    status, _ = await api.call(api_cluster[0], "POST", "/api/publish", {"room": "doc", "data": None})
    assert status == 200 and api.validated == 1
    request = MockRequest(api_cluster[0].http, "post", "/api/publish")
    wrong = MockResponse(json.dumps({"room": "doc", "seq": "1"}).encode(), status_code=200)
    with pytest.raises(Exception, match=r"is not of type 'integer'"):
        api.openapi.validate_response(request, wrong)


async def test_python_server_api_clients(api_cluster: list[Host]) -> None:
    alpha, beta = api_cluster
    member = await _member(beta, "ann", "sdk-api")
    try:
        sync = ServerAPI(alpha.http, api_key=KEY)
        seq = await asyncio.to_thread(sync.publish, "sdk-api", {"n": 1}, id="py-1")
        assert await asyncio.to_thread(sync.publish, "sdk-api", {"n": 1}, id="py-1") == seq
        async with AsyncServerAPI(beta.http, api_key=OLD_KEY) as client:
            assert await client.publish("sdk-api", {"n": 2}) == seq + 1
            assert (await client.members("sdk-api"))["users"] == ["ann"]
            page = await client.history("sdk-api", since=seq - 1)
            assert [m["data"] for m in page["messages"]] == [{"n": 1}, {"n": 2}]
            assert await client.direct("ann", "psst") >= 1
            assert await client.disconnect("nobody") == 0
            with pytest.raises(ApiError) as refused:
                await client.publish("no such!", 1)
            assert (refused.value.status, refused.value.code) == (400, "bad_request")
        with pytest.raises(ApiError) as unauthorized:
            await asyncio.to_thread(ServerAPI(alpha.http, api_key="wrong-key-0123456789").info)
        assert unauthorized.value.status == 401
        assert [(await member.expect("message", room="sdk-api"))["data"] for _ in range(2)] == [
            {"n": 1},
            {"n": 2},
        ]
    finally:
        await member.close()


@pytest.fixture(scope="module")
def limited_host() -> Iterator[Host]:
    """Two workers, a bucket of 3 calls per key that refills once in 100 s."""
    redis = start_redis()
    try:
        args = ("--api-keys", f"main:{KEY},old:{OLD_KEY}", "--api-rate", "0.01", "--api-burst", "3")
        with hosts(("limited", redis.url), args=args) as (host,):
            yield host
    finally:
        redis.stop()


async def test_a_key_over_its_rate_gets_429_host_wide_and_every_call_is_counted(
    limited_host: Host, openapi: OpenAPI
) -> None:
    host = limited_host
    # A connection per call: SO_REUSEPORT spreads them over both workers, which share the bucket.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        api = Api(http, openapi)
        statuses = [
            (await api.call(host, "POST", "/api/publish", {"room": "rl", "data": i}))[0] for i in range(8)
        ]
        assert statuses == [200] * 3 + [429] * 5
        status, refused = await api.call(host, "GET", "/api/rooms/rl/members")
        assert (status, refused["error"]["code"]) == (429, "rate_limited")
        assert set(refused["error"]) == {"code", "message"}  # the one error shape
        async with http.post(
            host.http + "/api/publish", json={"room": "rl", "data": 0}, headers={"X-API-Key": KEY}
        ) as raw:
            assert raw.status == 429 and raw.headers["Retry-After"] == "100"
        # Buckets are per key; calls without a valid key and the document spend none.
        assert (await api.call(host, "GET", "/api/rooms/rl/members", key=OLD_KEY))[0] == 200
        assert (await api.call(host, "GET", "/api/info", key="wrong-0123456789abcdef"))[0] == 401
        assert (await api.call(host, "GET", "/api/openapi.json", key=None))[0] == 200
        assert (await api.call(host, "GET", "/api/nothing-here", key=OLD_KEY, documented=False))[0] == 404
    expected = {
        ("publish", "200"): 3,
        ("publish", "429"): 6,
        ("members", "429"): 1,
        ("members", "200"): 1,
        ("info", "401"): 1,
        ("openapi", "200"): 1,
        ("other", "404"): 1,
    }
    counted = {
        labels: counter(host, "rtc_api_requests_total", endpoint=labels[0], status=labels[1])
        for labels in expected
    }
    assert counted == expected
    # Endpoints are names, never paths (a path holds a room id).
    _, text = host.get("/metrics", {"Accept": "text/plain"})
    endpoints = {
        sample.labels["endpoint"]
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
        if sample.name == "rtc_api_requests_total"
    }
    assert endpoints == {*API_ENDPOINTS, "other"}
