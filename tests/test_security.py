"""The attack suite, end to end: real `rtc serve` hosts, real Redis, real sockets.

Every attack of issue 4 is tried against a running host the way an attacker would try it
(hand-made tokens, hand-made WebSocket frames on a raw TCP socket, floods of sockets), and
its outcome is asserted from the outside: HTTP status before the upgrade, close codes,
frames received, `/metrics`, worker PIDs and RSS, host logs. Each observed outcome is also
appended to `tests/artifacts/security-outcomes.md` (git-ignored), the evidence behind the
table in `docs/security.md`.

Hosts (each with a Redis of its own, so rings and counters never mix between tests):
- `edge`: 2 workers, `--jwt-audience/--jwt-issuer`, `--allowed-origins`, default limits,
  `--log-level debug` (so the access log is on, and must still not leak a token);
- `rsa`: 1 worker, `--jwt-algorithms RS256 --jwt-public-key FILE`;
- `flood`: 2 workers, `--max-connections-per-ip 20 --max-connections 30`;
- the leak test's own cluster (two hosts x two workers) and the slow-consumer test's host.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import json
import shutil
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
import orjson
import psutil
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client.parser import text_string_to_metric_families

from tests import rawws
from tests.client import Client
from tests.rawws import OP_CONT, OP_TEXT
from tests.rtcproc import (
    SECRET,
    Host,
    metrics_written,
    settle_ring,
    start_host,
    start_redis,
    until,
    wait_for,
)

pytestmark = pytest.mark.timeout(120)

ARTIFACT = Path(__file__).resolve().parent / "artifacts" / "security-outcomes.md"

ORIGIN = "https://app.example"
AUDIENCE = "rtc"
ISSUER = "https://issuer.example"
HANDSHAKE_TIMEOUT = 2.0
EDGE_ARGS = (
    "--jwt-audience",
    AUDIENCE,
    "--jwt-issuer",
    ISSUER,
    "--allowed-origins",
    ORIGIN,
    "--log-level",
    "debug",
    "--handshake-timeout",
    str(HANDSHAKE_TIMEOUT),
)
FAST = ("--rate", "100000", "--rate-burst", "100000")
MAX_MESSAGE_BYTES = 65536  # rtc's default --max-message-bytes
RSS_BOUND_MB = 300

# Every token this module sends anywhere: none may appear in any host's log.
USED_TOKENS: set[str] = set()
# Every host this module started: their logs outlive them (tests/rtcproc.py keeps the file).
STARTED: list[Host] = []


# ============================================================================ evidence


@pytest.fixture(scope="module", autouse=True)
def _outcomes_header() -> Iterator[None]:
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    with ARTIFACT.open("a") as out:
        out.write(
            f"\n## Run {datetime.now(UTC).isoformat(timespec='seconds')}\n\n"
            "| attack | expected | observed | test |\n| --- | --- | --- | --- |\n"
        )
    yield


Record = Callable[[str, str, str], None]


@pytest.fixture
def record(request: pytest.FixtureRequest) -> Record:
    """Append one observed outcome (before it is asserted: a failure leaves evidence too)."""

    def append(attack: str, expected: str, observed: str) -> None:
        cells = [c.replace("|", "\\|").replace("\n", " ") for c in (attack, expected, observed)]
        with ARTIFACT.open("a") as out:
            out.write(f"| {cells[0]} | {cells[1]} | {cells[2]} | `{request.node.name}` |\n")

    return append


# ============================================================================ tokens


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def remember(value: str) -> str:
    USED_TOKENS.add(value)
    return value


def claims(user: str, ttl: int = 3600, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": user, "iat": now, "exp": now + ttl, **extra}


def edge_claims(user: str, **extra: Any) -> dict[str, Any]:
    return claims(user, **{"aud": AUDIENCE, "iss": ISSUER, **extra})


def without(values: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: v for k, v in values.items() if k not in names}


def forge(
    header: dict[str, Any],
    payload: dict[str, Any],
    key: bytes | None,
    digest: Callable[..., Any] = hashlib.sha256,
) -> str:
    """A JWT built by hand: HMAC-signed with `key`, or unsigned when `key` is None."""
    signing_input = _b64(orjson.dumps(header)) + "." + _b64(orjson.dumps(payload))
    signature = "" if key is None else _b64(hmac.new(key, signing_input.encode(), digest).digest())
    return remember(signing_input + "." + signature)


def hs256(payload: dict[str, Any], key: bytes = SECRET.encode()) -> str:
    return forge({"alg": "HS256", "typ": "JWT"}, payload, key)


def edge_token(user: str, **extra: Any) -> str:
    return hs256(edge_claims(user, **extra))


def plain_token(user: str, **extra: Any) -> str:
    return hs256(claims(user, **extra))


def flip_signature(value: str) -> str:
    """Change one character in the middle of the signature (never only its padding bits)."""
    head, payload, signature = value.split(".")
    middle = len(signature) // 2
    swapped = "A" if signature[middle] != "A" else "B"
    return remember(f"{head}.{payload}.{signature[:middle]}{swapped}{signature[middle + 1 :]}")


def tamper_payload(value: str, **changes: Any) -> str:
    """Keep the header and signature, rewrite the claims."""
    head, payload, signature = value.split(".")
    decoded = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return remember(f"{head}.{_b64(orjson.dumps({**decoded, **changes}))}.{signature}")


# ============================================================================ hosts


@contextlib.contextmanager
def running(
    *node_ids: str, workers: int = 2, args: tuple[str, ...] = (), env: dict[str, str] | None = None
) -> Iterator[list[Host]]:
    """Hosts sharing a Redis of their own; everything stopped afterwards."""
    redis = start_redis()
    started: list[Host] = []
    try:
        for node_id in node_ids:
            host = start_host(node_id, redis.url, workers=workers, args=args, env=env)
            started.append(host)
            STARTED.append(host)
        yield started
    finally:
        for host in started:
            host.stop()
            shutil.rmtree(host.runtime_dir, ignore_errors=True)
        redis.stop()


@pytest.fixture(scope="module")
def edge() -> Iterator[Host]:
    with running("edge", args=EDGE_ARGS) as (host,):
        yield host


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_host(rsa_key: rsa.RSAPrivateKey, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    key_file = tmp_path_factory.mktemp("rsa") / "public.pem"
    key_file.write_bytes(pem)
    with running("rsa", workers=1, args=("--jwt-algorithms", "RS256", "--jwt-public-key", str(key_file))) as (
        host,
    ):
        yield host


@pytest.fixture(scope="module")
def flood() -> Iterator[Host]:
    with running("flood", args=("--max-connections-per-ip", "20", "--max-connections", "30")) as (host,):
        yield host


# ============================================================================ metrics


def prom(host: Host) -> dict[str, list[tuple[dict[str, str], float]]]:
    """The host aggregate (`/metrics` with `Accept: text/plain`) by sample name."""
    status, text = host.get("/metrics", {"Accept": "text/plain"})
    assert status == 200
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def metric(snapshot: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    return sum(
        value for found, value in snapshot.get(name, []) if all(found.get(k) == v for k, v in labels.items())
    )


def rejected(snapshot: dict[str, list[tuple[dict[str, str], float]]], reason: str) -> float:
    return metric(snapshot, "rtc_handshake_rejected_total", reason=reason)


def worker_connections(host: Host) -> dict[str, int]:
    return {labels["worker"]: int(value) for labels, value in prom(host).get("rtc_connections", [])}


# ============================================================================ a raw WebSocket client


class RawWS(rawws.RawWS):
    """The raw client, remembering every token it sends (none may reach a log)."""

    @classmethod
    def open(cls, host: Host, *, token: str | None = None, **kwargs: Any) -> RawWS:
        if token is not None:
            remember(token)
        raw = super().open(host, token=token, **kwargs)
        assert isinstance(raw, RawWS)
        return raw


def refused(host: Host, **kwargs: Any) -> tuple[int, str, bool]:
    """Try an upgrade that should be refused: (status, reason in the body, socket stayed shut)."""
    raw = RawWS.open(host, **kwargs)
    try:
        if raw.status == 101:
            return 101, "", False
        reason = json.loads(raw.body).get("error", "?") if raw.body.startswith(b"{") else "?"
        return raw.status, reason, "upgrade" not in raw.headers and raw.no_frame_follows()
    finally:
        raw.close()


def upgraded(host: Host, **kwargs: Any) -> tuple[int, dict[str, Any] | None]:
    """Try an upgrade that should work: (status, the welcome frame)."""
    raw = RawWS.open(host, **kwargs)
    try:
        if raw.status != 101:
            return raw.status, None
        return 101, raw.frames_until("welcome")[-1]
    finally:
        raw.close()


def edge_raw(edge: Host, user: str = "raw", **kwargs: Any) -> RawWS:
    """An upgraded raw socket on the edge host, past its `welcome`."""
    raw = RawWS.open(edge, token=edge_token(user), headers={"Origin": ORIGIN}, **kwargs)
    assert raw.status == 101, (raw.status, raw.body)
    raw.frames_until("welcome")
    return raw


async def edge_client(edge: Host, user: str, **extra: Any) -> Client:
    return await Client.connect(edge.ws, user, token=edge_token(user, **extra), headers={"Origin": ORIGIN})


def padded_ping(size: int) -> str:
    """A valid `ping` frame of exactly `size` bytes."""
    shell = '{"type":"ping","pad":""}'
    return shell[:-2] + "x" * (size - len(shell)) + shell[-2:]


# ============================================================================ 1. tokens before the upgrade


def test_bad_tokens_get_401_before_the_upgrade(edge: Host, record: Record) -> None:
    """Every way a token can be wrong: 401, no upgrade, counted as `auth`."""
    now = int(time.time())
    good = edge_claims("victim")
    other_secret = b"attacker-secret-0123456789abcdef-0123"
    valid = edge_token("victim")
    cases: list[tuple[str, dict[str, Any]]] = [
        ("missing token", {}),
        ("expired 120 s ago (leeway 30 s)", {"token": hs256({**good, "exp": now - 120})}),
        ("no `exp` claim", {"token": hs256(without(good, "exp"))}),
        ("`nbf` 120 s in the future", {"token": hs256({**good, "nbf": now + 120})}),
        ("`iat` 120 s in the future", {"token": hs256({**good, "iat": now + 120})}),
        ("wrong `aud`", {"token": hs256({**good, "aud": "other-service"})}),
        ("no `aud`", {"token": hs256(without(good, "aud"))}),
        ("wrong `iss`", {"token": hs256({**good, "iss": "https://evil.example"})}),
        ("no `iss`", {"token": hs256(without(good, "iss"))}),
        ("alg=none, unsigned", {"token": forge({"alg": "none", "typ": "JWT"}, good, None)}),
        ("alg=None, unsigned", {"token": forge({"alg": "None", "typ": "JWT"}, good, None)}),
        (
            "HS512 with the right secret (algorithm not pinned)",
            {"token": forge({"alg": "HS512", "typ": "JWT"}, good, SECRET.encode(), hashlib.sha512)},
        ),
        ("HS256 signed with another secret", {"token": hs256(good, other_secret)}),
        ("flipped signature", {"token": flip_signature(valid)}),
        ("payload rewritten (sub), signature kept", {"token": tamper_payload(valid, sub="admin")}),
        ("no `sub`", {"token": hs256(without(good, "sub"))}),
        ("garbage", {"token": "not.a.jwt"}),
        (
            "query and Authorization tokens disagree",
            {
                "token": edge_token("alice"),
                "headers": {"Authorization": "Bearer " + remember(edge_token("bob"))},
            },
        ),
        ("Authorization: Basic", {"headers": {"Authorization": "Basic dXNlcjpwYXNz"}}),
    ]
    before = prom(edge)
    failures: list[tuple[Any, ...]] = []
    for name, kwargs in cases:
        headers = {"Origin": ORIGIN, **kwargs.get("headers", {})}
        status, reason, shut = refused(edge, token=kwargs.get("token"), headers=headers)
        record(
            f"token: {name}", "401 before the upgrade", f"{status} ({reason}), socket never opened: {shut}"
        )
        if (status, reason, shut) != (401, "auth", True):
            failures.append((name, status, reason, shut))
    after = prom(edge)

    controls: list[tuple[str, dict[str, Any]]] = [
        ("valid token", {"token": valid}),
        (
            "same token in query and Authorization",
            {"token": valid, "headers": {"Authorization": "Bearer " + valid}},
        ),
        ("token only in Authorization", {"headers": {"Authorization": "Bearer " + valid}}),
        ("expired 10 s ago (inside the 30 s leeway)", {"token": hs256({**good, "exp": now - 10})}),
    ]
    for name, kwargs in controls:
        status, welcome = upgraded(
            edge, token=kwargs.get("token"), headers={"Origin": ORIGIN, **kwargs.get("headers", {})}
        )
        record(f"control: {name}", "101 + welcome", f"{status}, welcome user {welcome and welcome['user']}")
        if status != 101 or not welcome or welcome["user"] != "victim":
            failures.append((name, status, welcome))

    assert not failures, failures
    assert rejected(after, "auth") - rejected(before, "auth") == len(cases)
    assert metric(after, "errors_total") - metric(before, "errors_total") == len(cases)


def test_rs256_host_takes_rs256_and_refuses_key_confusion(
    rsa_host: Host, rsa_key: rsa.RSAPrivateKey, record: Record
) -> None:
    pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    der = rsa_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    good = claims("rs-user")
    attacker_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    attacker_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(attacker_key.public_key()))
    cases = [
        ("key confusion: HS256 with the PEM public key (as stored) as HMAC secret", hs256(good, pem.strip())),
        ("key confusion: HS256 with the PEM public key file bytes", hs256(good, pem)),
        ("key confusion: HS256 with the DER public key", hs256(good, der)),
        ("HS256 with the JWT_SECRET still in the host's environment", hs256(good)),
        ("alg=none", forge({"alg": "none", "typ": "JWT"}, good, None)),
        ("RS256 signed by another private key", remember(jwt.encode(good, attacker_key, "RS256"))),
        (
            "RS256 by another key, its public key embedded as `jwk` header",
            remember(jwt.encode(good, attacker_key, "RS256", headers={"jwk": attacker_jwk})),
        ),
        ("RS256, flipped signature", flip_signature(remember(jwt.encode(good, rsa_key, "RS256")))),
        ("RS256 without `exp`", remember(jwt.encode(without(good, "exp"), rsa_key, "RS256"))),
    ]
    before = prom(rsa_host)
    failures: list[tuple[Any, ...]] = []
    for name, value in cases:
        status, reason, shut = refused(rsa_host, token=value)
        record(f"RS256 host: {name}", "401 before the upgrade", f"{status} ({reason}), never opened: {shut}")
        if (status, reason, shut) != (401, "auth", True):
            failures.append((name, status, reason, shut))
    status, welcome = upgraded(rsa_host, token=remember(jwt.encode(good, rsa_key, "RS256")))
    record("RS256 host: valid RS256 token", "101 + welcome", f"{status}, user {welcome and welcome['user']}")
    after = prom(rsa_host)
    assert not failures, failures
    assert status == 101 and welcome is not None and welcome["user"] == "rs-user"
    assert rejected(after, "auth") - rejected(before, "auth") == len(cases)


# ============================================================================ 2. Origin (CSWSH)


def test_foreign_origin_gets_403_before_the_upgrade(edge: Host, record: Record) -> None:
    valid = edge_token("browser-user")
    foreign = [
        ("https://evil.example", valid),
        ("https://app.example.evil.example", valid),
        ("http://app.example", valid),
        ("https://APP.example", valid),
        ("https://app.example/", valid),
        ("null", valid),
        (None, valid),  # no Origin at all (a non-browser client)
        ("https://evil.example", None),  # checked before the token: 403, not 401
    ]
    before = prom(edge)
    failures: list[tuple[Any, ...]] = []
    for origin, value in foreign:
        headers = {} if origin is None else {"Origin": origin}
        status, reason, shut = refused(edge, token=value, headers=headers)
        label = "no Origin header" if origin is None else f"Origin {origin}"
        record(
            f"{label}{'' if value else ', no token'}",
            "403 before the upgrade",
            f"{status} ({reason}), never opened: {shut}",
        )
        if (status, reason, shut) != (403, "origin", True):
            failures.append((origin, status, reason))
    status, welcome = upgraded(edge, token=valid, headers={"Origin": ORIGIN})
    record(f"allowed Origin {ORIGIN}", "101 + welcome", str(status))
    after = prom(edge)
    assert not failures, failures
    assert status == 101 and welcome is not None
    assert rejected(after, "origin") - rejected(before, "origin") == len(foreign)
    assert metric(after, "errors_total") - metric(before, "errors_total") == len(foreign)


# ======================================================================= 3. room permissions across hosts


SECRET_ROOM = "secret.room"
PUBLIC_ROOM = "public.lobby"
MARK = "S3CR3T-PAYLOAD"
PUBLISHERS = 4
PER_PUBLISHER = 2600  # 10,400 publishes in all
WINDOW = 250


class Tally:
    """Counts a client's frames incrementally (Client.seen only grows)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self._index = 0
        self.acks = 0
        self.errors: list[dict[str, Any]] = []

    def update(self) -> int:
        seen = self.client.seen
        while self._index < len(seen):
            frame = seen[self._index]
            self._index += 1
            if frame["type"] == "ack":
                self.acks += 1
            elif frame["type"] == "error":
                self.errors.append(frame)
        return self.acks + len(self.errors)

    def reached(self, replies: int) -> bool:
        return self.update() >= replies


def secret_seqs(client: Client) -> list[int]:
    return [f["seq"] for f in client.seen if f["type"] == "message" and f["room"] == SECRET_ROOM]


async def connect_placed(
    host: Host, user: str, value: str, count_by_worker: dict[str, list[Client]], want: int, limit: int = 40
) -> None:
    """Connect until every worker of `host` holds `want` of these clients (the kernel spreads
    connections by hash; the worker of each is read from `rtc_connections{worker}`)."""
    for _ in range(limit):
        if len(count_by_worker) == host.workers and all(len(v) >= want for v in count_by_worker.values()):
            return
        before = worker_connections(host)
        client = await Client.connect(host.ws, user, token=value)
        after = worker_connections(host)
        (worker,) = [w for w in after if after[w] != before.get(w, 0)]
        count_by_worker.setdefault(worker, []).append(client)
    raise AssertionError(f"could not place {user} on every worker of {host.node_id}: {count_by_worker}")


async def test_no_message_leaks_outside_the_rooms_claim_across_hosts(record: Record) -> None:
    # Members read 10k+ frames in one test process: a roomy send queue keeps this test about
    # permissions, not backpressure (that is the slow-consumer test's).
    with running("alpha", "beta", args=(*FAST, "--send-queue-bytes", str(16 << 20))) as cluster:
        settle_ring(cluster)
        outsider = plain_token("mallory", rooms=["public.*"])
        insider = plain_token("alice", rooms=["secret.*", "public.*"])
        mallory: dict[str, dict[str, list[Client]]] = {}
        readers: dict[str, dict[str, list[Client]]] = {}
        publishers: list[Client] = []
        everyone: list[Client] = []
        try:
            for host in cluster:  # the outsiders first: every worker of every host has two
                mallory[host.node_id] = {}
                await connect_placed(host, "mallory", outsider, mallory[host.node_id], want=2)
            for host in cluster:  # and an authorized reader on every worker, next to them
                readers[host.node_id] = {}
                await connect_placed(host, "alice", insider, readers[host.node_id], want=1)
            for index in range(PUBLISHERS):
                host = cluster[index % 2]
                value = plain_token(f"pub{index}")
                publishers.append(await Client.connect(host.ws, f"pub{index}", token=value))
            outsiders = [c for by_worker in mallory.values() for cs in by_worker.values() for c in cs]
            members = [c for by_worker in readers.values() for cs in by_worker.values() for c in cs]
            members += publishers
            everyone = outsiders + members
            placement = {h: {w: len(cs) for w, cs in by_worker.items()} for h, by_worker in mallory.items()}

            # -- what the outsider may not do, on every socket of it
            refusals: list[tuple[str, str | None]] = []
            attempts: list[tuple[str, dict[str, Any], str]] = [
                ("join", {"room": SECRET_ROOM}, "forbidden"),
                ("join", {"room": "@alice"}, "forbidden"),
                ("publish", {"room": SECRET_ROOM, "data": "spoof"}, "not_joined"),
                ("members", {"room": SECRET_ROOM}, "not_joined"),
                ("publish", {"room": "@alice", "data": "spoof"}, "not_joined"),
            ]
            for client in outsiders:
                for kind, fields, reply in attempts:
                    error = await client.request(kind, "error", **fields)
                    refusals.append((f"{kind} {fields['room']}", error["code"]))
                    assert error["code"] == reply, (kind, fields, error)
                assert (await client.join(PUBLIC_ROOM))["room"] == PUBLIC_ROOM  # what it may do
            record(
                "outsider (rooms: public.*) joins secret.room / @alice, publishes to secret.room, "
                "asks its members",
                "forbidden / forbidden / not_joined / not_joined",
                f"{len(outsiders)} sockets on workers {placement}: {sorted(set(refusals))}",
            )

            # -- escalation attempts through `refresh` and a stolen session id
            probe = outsiders[0]
            forged = hs256(claims("mallory", rooms=["*"]), b"attacker-secret-0123456789abcdef-01")
            answer = await probe.request("refresh", "error", token=forged)
            assert answer["code"] == "forbidden"
            answer2 = await probe.request("refresh", "error", token=insider)
            assert answer2["code"] == "forbidden"
            still = await probe.request("join", "error", room=SECRET_ROOM)
            assert still["code"] == "forbidden"
            record(
                "outsider refreshes with a forged token (rooms: *) / with alice's token",
                "forbidden, old rights kept",
                f"{answer['code']} / {answer2['code']}, then join {SECRET_ROOM}: {still['code']}",
            )

            # -- the authorized side joins, then publishes 10,400 messages from both hosts
            for client in members:
                joined = await client.join(SECRET_ROOM)
                assert joined["seq"] == 0
            alice_sid = readers[cluster[0].node_id]["0"][0].welcome["session"]
            hijack = await Client.connect(cluster[1].ws, "mallory", token=outsider, session=alice_sid)
            everyone.append(hijack)
            outsiders.append(hijack)
            record(
                "outsider connects with alice's session id (`?session=`)",
                "fresh session, resumed false",
                f"resumed {hijack.welcome['resumed']}, "
                f"same session: {hijack.welcome['session'] == alice_sid}",
            )
            assert hijack.welcome["resumed"] is False and hijack.welcome["session"] != alice_sid
            await hijack.join(PUBLIC_ROOM)

            total = PUBLISHERS * PER_PUBLISHER
            await metrics_written()  # the joins' counts are in `fanout_before`
            fanout_before = {h.node_id: prom(h) for h in cluster}
            started = time.monotonic()

            async def pump(client: Client, index: int) -> Tally:
                tally = Tally(client)
                sent = 0
                while sent < PER_PUBLISHER:
                    batch = min(WINDOW, PER_PUBLISHER - sent)
                    for n in range(sent, sent + batch):
                        await client.ws.send_str(
                            orjson.dumps(
                                {
                                    "type": "publish",
                                    "room": SECRET_ROOM,
                                    "data": {"m": MARK, "p": index, "n": n},
                                }
                            ).decode()
                        )
                    sent += batch
                    await until(functools.partial(tally.reached, sent - WINDOW), 30, f"pub{index} acks", 0.01)
                await until(functools.partial(tally.reached, PER_PUBLISHER), 30, f"pub{index} acks", 0.01)
                return tally

            tallies = await asyncio.wait_for(
                asyncio.gather(*(pump(c, i) for i, c in enumerate(publishers))), 60
            )
            errors = [e for t in tallies for e in t.errors]
            assert not errors, errors[:5]
            await until(
                lambda: all(len(secret_seqs(c)) >= total for c in members),
                30,
                "every member to receive every message",
                0.1,
            )
            seconds = time.monotonic() - started

            # -- proof the outsiders were alive and listening the whole time
            await publishers[0].join(PUBLIC_ROOM)
            await publishers[0].request("publish", "ack", room=PUBLIC_ROOM, data="after the flood")
            await until(
                lambda: all(
                    any(f["type"] == "message" and f["room"] == PUBLIC_ROOM for f in c.seen)
                    for c in outsiders
                ),
                10,
                "outsiders to get the public message",
            )
            # That message is the barrier: every member had every secret one before it was
            # published, so a secret frame written to an outsider's socket came before it.

            leaked = []
            kinds: set[str] = set()
            for client in outsiders:
                for frame in client.seen:
                    kinds.add(f"{frame['type']}:{frame.get('room', frame.get('code', ''))}")
                    text = orjson.dumps(frame).decode()
                    if MARK in text or (frame.get("room") == SECRET_ROOM and frame["type"] != "error"):
                        leaked.append(frame)
            frames_seen = sum(len(c.seen) for c in outsiders)

            # Every worker that holds outsiders wrote every secret message to its local sockets
            # (its authorized reader sits next to them): the filter is per socket, not per worker.
            def deliveries() -> dict[str, float]:
                return {
                    f"{h.node_id}:{w}": metric(prom(h), "rtc_deliveries_total", worker=w)
                    - metric(fanout_before[h.node_id], "rtc_deliveries_total", worker=w)
                    for h in cluster
                    for w in ("0", "1")
                }

            with contextlib.suppress(TimeoutError):  # the assertion below says what was short
                await until(  # the workers' batched metrics written: the event awaited
                    lambda: all(n >= total for n in deliveries().values()), 5, "deliveries counted"
                )
            fanout = deliveries()
            complete = all(secret_seqs(c) == list(range(1, total + 1)) for c in members)
            record(
                f"{total} publishes to {SECRET_ROOM} from 2 hosts x 2 workers "
                f"({seconds:.1f} s) while outsiders sit on every worker",
                "0 delivered to outsiders; members get all, in order",
                f"{len(leaked)} of {frames_seen} outsider frames carried it (kinds {sorted(kinds)}); "
                f"{len(members)} members complete 1..{total}: {complete}; secret frames each worker "
                f"wrote to its authorized sockets (rtc_deliveries_total): {fanout}",
            )
            assert not leaked, leaked[:5]
            assert complete
            assert all(n >= total for n in fanout.values()), fanout
        finally:
            await asyncio.gather(*(c.close() for c in everyone), return_exceptions=True)


# ============================================================================ 4. admin surface


ADMIN_PATHS = [
    ("GET", "/admin/ring"),
    ("GET", "/admin/drain"),
    ("GET", "/dashboard"),
    ("GET", "/dashboard/data"),
    ("POST", "/admin/drain"),
    ("DELETE", "/admin/drain"),
]
READ_ONLY = [p for p in ADMIN_PATHS if p[0] == "GET"]


def http(host: Host, method: str, path: str, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(host.http + path, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as exc:
        exc.read()
        exc.close()
        return int(exc.code)


def test_admin_endpoints_refuse_proxied_and_non_admin_requests(edge: Host, record: Record) -> None:
    admin = edge_token("ops", admin=True)
    user = edge_token("user")
    refusals: list[tuple[str, dict[str, str], str]] = [
        ("loopback + X-Forwarded-For: 127.0.0.1", {"X-Forwarded-For": "127.0.0.1"}, ""),
        ("loopback + X-Forwarded-For: 203.0.113.9", {"X-Forwarded-For": "203.0.113.9"}, ""),
        ("loopback + Forwarded: for=127.0.0.1", {"Forwarded": "for=127.0.0.1"}, ""),
        ("loopback + X-Real-IP: 127.0.0.1", {"X-Real-IP": "127.0.0.1"}, ""),
        (
            "non-admin token (Bearer) via a proxy",
            {"X-Forwarded-For": "203.0.113.9", "Authorization": f"Bearer {user}"},
            "",
        ),
        ("non-admin token (?token=) via a proxy", {"X-Forwarded-For": "203.0.113.9"}, user),
        (
            'token with admin: "true" (a string) via a proxy',
            {"X-Forwarded-For": "203.0.113.9"},
            edge_token("ops", admin="true"),
        ),
        (
            "expired admin token via a proxy",
            {"X-Forwarded-For": "203.0.113.9"},
            hs256(edge_claims("ops", admin=True, exp=int(time.time()) - 120)),
        ),
        (
            "admin token for another audience via a proxy",
            {"X-Forwarded-For": "203.0.113.9"},
            hs256(edge_claims("ops", admin=True, aud="other-service")),
        ),
        (
            "admin token signed with another secret via a proxy",
            {"X-Forwarded-For": "203.0.113.9"},
            hs256(edge_claims("ops", admin=True), b"attacker-secret-0123456789abcdef-01"),
        ),
        (
            "admin token with alg=none via a proxy",
            {"X-Forwarded-For": "203.0.113.9"},
            forge({"alg": "none"}, edge_claims("ops", admin=True), None),
        ),
    ]
    failures: list[tuple[Any, ...]] = []
    for name, headers, value in refusals:
        statuses = {
            f"{m} {p}": http(edge, m, p + (f"?token={value}" if value else ""), headers)
            for m, p in ADMIN_PATHS
        }
        record(f"admin: {name}", "403 on every admin path", json.dumps(statuses))
        if set(statuses.values()) != {403}:
            failures.append((name, statuses))
    allowed = [
        ("plain loopback (no forwarding header)", {}, ""),
        (
            "admin token (Bearer) via a proxy",
            {"X-Forwarded-For": "203.0.113.9", "Authorization": f"Bearer {admin}"},
            "",
        ),
        ("admin token (?token=) via a proxy", {"Forwarded": "for=203.0.113.9"}, admin),
    ]
    for name, headers, value in allowed:
        statuses = {
            f"{m} {p}": http(edge, m, p + (f"?token={value}" if value else ""), headers) for m, p in READ_ONLY
        }
        record(f"admin: {name}", "200 on the read-only admin paths", json.dumps(statuses))
        if set(statuses.values()) != {200}:
            failures.append((name, statuses))
    assert not failures, failures
    assert edge.healthy(), "a refused POST /admin/drain drained the host"


# ================================================================ 5. frames: size, compression, fragments


async def test_oversized_frame_is_closed_1009_and_exact_max_is_served(edge: Host, record: Record) -> None:
    client = await edge_client(edge, "big")
    try:
        await client.send_raw(padded_ping(MAX_MESSAGE_BYTES))
        pong = await client.expect("pong")
        await client.send_raw(padded_ping(MAX_MESSAGE_BYTES + 1))
        await asyncio.wait_for(client.closed.wait(), 5)
    finally:
        await client.close()
    record(f"text frame of exactly --max-message-bytes ({MAX_MESSAGE_BYTES})", "served", pong["type"])
    record(
        f"text frame of --max-message-bytes + 1 ({MAX_MESSAGE_BYTES + 1})",
        "close 1009",
        f"close {client.close_code}",
    )
    assert client.close_code == 1009

    raw = edge_raw(edge, "liar")
    try:
        raw.send_frame(OP_TEXT, b"", declared_length=1 << 40)  # a header promising 1 TiB, no body
        code, _ = raw.close_outcome(5)
    finally:
        raw.close()
    record(
        "frame header declaring a 1 TiB payload (nothing sent after it)",
        "close 1009 at once",
        f"close {code}",
    )
    assert code == 1009


async def test_no_compression_is_negotiated_so_no_bomb_can_be_inflated(edge: Host, record: Record) -> None:
    offer = {"Origin": ORIGIN, "Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits"}
    raw = RawWS.open(edge, token=edge_token("zip"), headers=offer)
    try:
        assert raw.status == 101
        extensions = raw.headers.get("sec-websocket-extensions")
        raw.frames_until("welcome")
        pids = edge.worker_pids()
        rss_before = max(psutil.Process(p).memory_info().rss for p in pids)
        bomb = zlib.compressobj(9, zlib.DEFLATED, -15)
        body = bomb.compress(b'{"type":"ping","pad":"' + b"A" * (32 << 20)) + bomb.flush(zlib.Z_SYNC_FLUSH)
        raw.send_frame(OP_TEXT, body[:-4], rsv1=True)  # 32 MiB inflated, ~32 KiB on the wire
        code, _ = raw.close_outcome(5)
    finally:
        raw.close()
    rss_after = max(psutil.Process(p).memory_info().rss for p in pids)
    record(
        "client offers permessage-deflate",
        "no Sec-WebSocket-Extensions in the 101",
        f"Sec-WebSocket-Extensions: {extensions!r}",
    )
    record(
        f"compressed (RSV1) frame inflating to 32 MiB ({len(body)} bytes on the wire)",
        "close 1002 (RSV1 not negotiated), nothing inflated",
        f"close {code}; worker RSS {rss_before >> 20} -> {rss_after >> 20} MiB",
    )
    assert extensions is None
    assert code == 1002
    assert rss_after - rss_before < 16 << 20
    assert edge.worker_pids() == pids


async def test_fragment_flood_is_closed_1009_and_the_worker_survives(edge: Host, record: Record) -> None:
    pids = edge.worker_pids()
    raw = edge_raw(edge, "fragments")
    sent = 0
    try:
        chunk = b"x" * 1000
        with contextlib.suppress(OSError):  # the server may close while we still send
            for index in range(400):  # 400 kB in 1 kB fragments, none final
                raw.send_frame(OP_TEXT if index == 0 else OP_CONT, chunk, fin=False)
                sent += len(chunk)
        code, _ = raw.close_outcome(5)
    finally:
        raw.close()
    record(
        f"continuation fragments (FIN=0) of 1 kB adding up past {MAX_MESSAGE_BYTES} bytes",
        "close 1009",
        f"close {code} after {sent} bytes sent",
    )
    assert code == 1009

    # Many tiny fragments under the limit are reassembled and served (the count is not a weapon).
    raw = edge_raw(edge, "tiny-fragments")
    try:
        text = padded_ping(4000).encode()
        for index, byte in enumerate(text):
            last = index == len(text) - 1
            raw.send_frame(OP_TEXT if index == 0 else OP_CONT, bytes([byte]), fin=last)
        reply = raw.frames_until("pong")[-1]
        raw.send_frame(OP_CONT, b"orphan")  # a continuation with no message started
        orphan, _ = raw.close_outcome(5)
    finally:
        raw.close()
    record("4000 one-byte fragments of a valid ping", "served", reply["type"])
    record("continuation frame with no message started", "close 1002", f"close {orphan}")
    assert orphan == 1002
    assert edge.worker_pids() == pids, "a worker died"
    status, welcome = upgraded(edge, token=edge_token("after"), headers={"Origin": ORIGIN})
    assert status == 101 and welcome is not None


async def test_frame_level_rejections_are_counted(edge: Host, record: Record) -> None:
    before = metric(prom(edge), "errors_total")
    raw = edge_raw(edge, "counted")
    try:
        raw.send_frame(OP_TEXT, b"", declared_length=MAX_MESSAGE_BYTES + 1)
        code, _ = raw.close_outcome(5)
    finally:
        raw.close()
    after = await until(
        lambda: (n := metric(prom(edge), "errors_total")) > before and n, 5, "errors_total to count the frame"
    )
    record(
        "oversized frame (close 1009): counted in errors_total", "+1", f"close {code}, +{after - before:g}"
    )
    assert code == 1009
    assert after - before >= 1


# ============================================================================ 6. rate flood


async def test_rate_flood_gets_rate_limited_then_1008(edge: Host, record: Record) -> None:
    before = prom(edge)
    flooder = await edge_client(edge, "flooder")
    neighbour = await edge_client(edge, "neighbour")
    try:
        for n in range(400):  # far above --rate 20/s (burst 40), as fast as the socket takes it
            if flooder.closed.is_set():
                break
            with contextlib.suppress(ConnectionError):
                await flooder.send(type="ping", id=n)
        await asyncio.wait_for(flooder.closed.wait(), 10)
        for n in range(5):  # another connection from the same address is not punished
            await neighbour.request("ping", "pong", id=n)
    finally:
        await flooder.close()
        await neighbour.close()
    after = prom(edge)
    pongs = sum(1 for f in flooder.seen if f["type"] == "pong")
    limited = sum(1 for f in flooder.seen if f["type"] == "error" and f["code"] == "rate_limited")
    denied = metric(after, "rate_limit_denied_total") - metric(before, "rate_limit_denied_total")
    errors = metric(after, "errors_total") - metric(before, "errors_total")
    frames = metric(after, "rtc_errors_total", code="rate_limited") - metric(
        before, "rtc_errors_total", code="rate_limited"
    )
    record(
        "400 pings as fast as possible (--rate 20, --rate-burst 40)",
        "rate_limited errors, then close 1008 after >100 denials in 10 s",
        f"{pongs} pongs, {limited} rate_limited, close {flooder.close_code}; "
        f"rate_limit_denied_total +{denied:g}, errors_total +{errors:g}",
    )
    assert 40 <= pongs <= 60
    assert limited == 101  # the 101st denial within 10 s closes
    assert flooder.close_code == 1008
    assert denied >= 101 and frames >= 101 and errors >= 101


# ============================================================================ 7. slow consumers


SLOW_SOCKETS = 100
SLOW_ROOM = "firehose"
PUBLISH_RATE = 1000  # messages per second
PUBLISH_SECONDS = 4.0
SEND_QUEUE = 262144
# ~1.6 kB frames: at 1k msg/s a socket that never reads passes the 256 KiB queue after the
# kernel's own send buffer (autotuned to ~2.6 MB on loopback) is full, about 2 s in.
PAD = 1536


class RssSampler(threading.Thread):
    """The workers' RSS every 50 ms; `peak` is the largest single worker seen."""

    def __init__(self, pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.processes = [psutil.Process(p) for p in pids]
        self.peak = 0
        self.baseline = max(p.memory_info().rss for p in self.processes)
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            for process in self.processes:
                with contextlib.suppress(psutil.Error):
                    self.peak = max(self.peak, process.memory_info().rss)
            self._stop_event.wait(0.05)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)


def open_never_reading(host: Host, count: int, value: str) -> list[RawWS]:
    """Sockets with a tiny receive buffer that upgrade, join, then never read again."""
    sockets: list[RawWS] = []
    try:
        for _ in range(count):
            raw = RawWS.open(host, token=value, rcvbuf=4096)
            sockets.append(raw)
            assert raw.status == 101
            raw.frames_until("welcome")
            raw.send_json(type="join", room=SLOW_ROOM)
            raw.frames_until("joined")
    except BaseException:
        for raw in sockets:
            raw.close()
        raise
    return sockets


async def test_slow_consumers_are_closed_and_memory_stays_bounded(record: Record) -> None:
    with running("slow", args=(*FAST, "--send-queue-bytes", str(SEND_QUEUE))) as (host,):
        healthy: list[Client] = []
        slow: list[RawWS] = []
        sampler: RssSampler | None = None
        try:
            for index in range(4):
                healthy.append(await Client.connect(host.ws, f"reader{index}"))
            publisher = await Client.connect(host.ws, "producer")
            healthy.append(publisher)
            for client in healthy:
                await client.join(SLOW_ROOM)
            slow = await asyncio.to_thread(open_never_reading, host, SLOW_SOCKETS, plain_token("sloth"))
            assert host.active_connections() == len(healthy) + SLOW_SOCKETS
            per_worker = worker_connections(host)
            sampler = RssSampler(host.worker_pids())
            sampler.start()
            before = prom(host)

            payload = "x" * PAD
            tally = Tally(publisher)
            sent = 0
            started = time.monotonic()
            while (elapsed := time.monotonic() - started) < PUBLISH_SECONDS:
                for _ in range(int(elapsed * PUBLISH_RATE) - sent):
                    await publisher.ws.send_str(
                        orjson.dumps(
                            {"type": "publish", "room": SLOW_ROOM, "data": {"n": sent, "pad": payload}}
                        ).decode()
                    )
                    sent += 1
                await asyncio.sleep(0.005)  # the publishing pace, not a wait
            rate = sent / (time.monotonic() - started)
            await until(lambda: tally.update() >= sent, 15, "every publish acked")
            assert not tally.errors, tally.errors[:5]
            await until(
                lambda: all(sum(f["type"] == "message" for f in c.seen) >= sent for c in healthy),
                15,
                "healthy members to receive everything",
            )
            # The slow ones were told 1013; their close cannot be flushed, so they are aborted <= 5 s later.
            await until(
                lambda: host.active_connections() == len(healthy), 15, "slow consumers to be gone", 0.2
            )
            sampler.stop()
            after = prom(host)
            outcomes = await asyncio.to_thread(lambda: [r.close_outcome(2)[0] for r in slow])

            cut = metric(after, "rtc_slow_consumer_disconnects_total") - metric(
                before, "rtc_slow_consumer_disconnects_total"
            )
            complete = [
                sorted(f["seq"] for f in c.seen if f["type"] == "message") == list(range(1, sent + 1))
                for c in healthy
            ]
            peak_mb = sampler.peak / 2**20
            summary = {str(o): outcomes.count(o) for o in set(outcomes)}
            print(
                f"\nslow consumers: max worker RSS {peak_mb:.1f} MiB "
                f"(baseline {sampler.baseline / 2**20:.1f} MiB, bound {RSS_BOUND_MB} MiB); "
                f"{sent} publishes at {rate:.0f}/s; disconnects +{cut:g}; "
                f"client side {summary}; per worker {per_worker}"
            )
            record(
                f"{SLOW_SOCKETS} sockets that never read (SO_RCVBUF 4 KiB) in a room getting "
                f"{rate:.0f} msg/s x {PUBLISH_SECONDS:g} s, --send-queue-bytes {SEND_QUEUE}",
                f"all closed (1013/abort), healthy lose nothing, worker RSS < {RSS_BOUND_MB} MiB",
                f"rtc_slow_consumer_disconnects_total +{cut:g}, "
                f"active_connections -> {host.active_connections()}, "
                f"client side {summary}; healthy complete {complete}; max worker RSS {peak_mb:.1f} MiB "
                f"(baseline {sampler.baseline / 2**20:.1f} MiB)",
            )
            assert cut == SLOW_SOCKETS
            assert all(complete)
            assert peak_mb < RSS_BOUND_MB
            assert all(o in (1013, "eof", "reset") for o in outcomes), summary
        finally:
            if sampler is not None and sampler.is_alive():
                sampler.stop()
            for raw in slow:
                raw.close()
            await asyncio.gather(*(c.close() for c in healthy), return_exceptions=True)


# ============================================================================ 8. connection floods


def _open_many(host: Host, count: int, source: str, *, spoof: bool = False) -> list[RawWS]:
    """`count` upgrades from `source`, one after another; the admitted ones stay open.
    With `spoof`, each claims another client address in `X-Forwarded-For`."""
    sockets: list[RawWS] = []
    try:
        for index in range(count):
            headers = {"X-Forwarded-For": f"198.51.100.{index + 1}"} if spoof else {}
            raw = RawWS.open(host, token=plain_token(f"c{source}-{index}"), source=source, headers=headers)
            sockets.append(raw)
            if raw.status == 101:
                raw.frames_until("welcome")
    except BaseException:
        for raw in sockets:
            raw.close()
        raise
    return sockets


def _close_all(host: Host, sockets: list[RawWS]) -> None:
    for raw in sockets:
        raw.close()
    wait_for(lambda: host.active_connections() == 0, 10, "connections to be released")


def test_connection_flood_from_one_ip_gets_429(flood: Host, record: Record) -> None:
    before = prom(flood)
    sockets = _open_many(flood, 20, "127.0.0.1")
    try:
        assert [r.status for r in sockets] == [101] * 20
        spread = worker_connections(flood)
        extra = _open_many(flood, 1, "127.0.0.1")
        sockets += extra
        status = extra[0].status
        other = _open_many(flood, 1, "127.0.0.2")  # another address is not affected
        sockets += other
    finally:
        _close_all(flood, sockets)
    after = prom(flood)
    record(
        "21st concurrent connection from 127.0.0.1 (--max-connections-per-ip 20, 2 workers)",
        "429 before the upgrade",
        f"{status} (20 spread over workers as {spread}); another address: {other[0].status}",
    )
    assert status == 429
    assert other[0].status == 101
    assert rejected(after, "per_ip") - rejected(before, "per_ip") == 1


def test_per_ip_cap_on_a_one_worker_host_gets_429(record: Record) -> None:
    """Where one worker holds every connection the cap is exact: the 21st gets 429, counted."""
    with running("perip", workers=1, args=("--max-connections-per-ip", "20")) as (host,):
        before = prom(host)
        sockets: list[RawWS] = []
        try:
            sockets = _open_many(host, 20, "127.0.0.1")
            sockets += _open_many(host, 3, "127.0.0.1", spoof=True)  # no --trusted-proxies: ignored
            statuses = [r.status for r in sockets]
            other = _open_many(host, 1, "127.0.0.2")
            sockets += other
        finally:
            _close_all(host, sockets)
        after = prom(host)
        denied = rejected(after, "per_ip") - rejected(before, "per_ip")
        record(
            "21st-23rd concurrent connections from 127.0.0.1, spoofing X-Forwarded-For "
            "(--max-connections-per-ip 20, 1 worker, no --trusted-proxies)",
            "429 before the upgrade, counted",
            f"statuses 1-20: {sorted(set(statuses[:20]))}, "
            f"21st-23rd (each with another X-Forwarded-For): {statuses[20:]}; another address: "
            f"{other[0].status}; per_ip +{denied:g}",
        )
        assert statuses == [101] * 20 + [429] * 3
        assert other[0].status == 101
        assert denied == 3
        assert metric(after, "errors_total") - metric(before, "errors_total") == 3


def test_connection_flood_beyond_the_host_cap_gets_503(flood: Host, record: Record) -> None:
    before = prom(flood)
    sockets: list[RawWS] = []
    try:
        for source in ("127.0.0.4", "127.0.0.5", "127.0.0.6"):
            sockets += _open_many(flood, 10, source)
        statuses = [r.status for r in sockets]
        spread = worker_connections(flood)
        beyond = _open_many(flood, 3, "127.0.0.7")
        sockets += beyond
        beyond_statuses = [r.status for r in beyond]
        sockets[0].close()  # one leaves: room for one more
        wait_for(lambda: flood.active_connections() == 29, 5, "one connection to be released")
        again = _open_many(flood, 1, "127.0.0.7")
        sockets += again
    finally:
        _close_all(flood, sockets)
    after = prom(flood)
    record(
        "31st-33rd concurrent connections (--max-connections 30 over 2 workers)",
        "503 before the upgrade",
        f"first 30: {sorted(set(statuses))} as {spread}; "
        f"then {beyond_statuses}; after one left: {again[0].status}",
    )
    assert statuses == [101] * 30
    assert beyond_statuses == [503, 503, 503]
    assert again[0].status == 101
    assert rejected(after, "full") - rejected(before, "full") == 3
    assert metric(after, "errors_total") - metric(before, "errors_total") == 3


# ============================================================================ 9. slow handshakes


def test_slow_handshake_is_cut_at_the_handshake_timeout(edge: Host, record: Record) -> None:
    silent = socket.create_connection((edge.host, edge.port))
    partial = socket.create_connection((edge.host, edge.port))
    try:
        partial.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\n")  # and never the rest (slowloris)
        outcome = {}
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT + 3
        for name, sock in (("silent", silent), ("partial", partial)):
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                outcome[name] = "closed" if sock.recv(1024) == b"" else "answered"
            except TimeoutError:
                outcome[name] = "still open"
            except ConnectionResetError:
                outcome[name] = "closed"
    finally:
        silent.close()
        partial.close()
    record(
        "TCP connection that sends nothing / half a request line "
        f"(--handshake-timeout {HANDSHAKE_TIMEOUT:g})",
        f"closed within {HANDSHAKE_TIMEOUT:g} s",
        f"after {HANDSHAKE_TIMEOUT + 3:g} s: {outcome}",
    )
    assert outcome == {"silent": "closed", "partial": "closed"}


# ============================================================================ 10. token hygiene in logs


def test_tokens_never_appear_in_logs(edge: Host, record: Record) -> None:
    """Runs last: every token this module sent (query, header, refresh, admin) is checked against
    every host log, at --log-level debug on the edge host (access log on)."""
    query_token = edge_token("logged-query")
    header_token = edge_token("logged-header")
    logged = edge.log().count("aiohttp.access")
    for params, headers in (
        ({"token": query_token}, {}),
        ({}, {"Authorization": f"Bearer {header_token}"}),
        ({"token": hs256(edge_claims("expired", exp=1))}, {}),
        ({"token": query_token}, {"Authorization": f"Bearer {header_token}"}),
    ):
        raw = RawWS.open(edge, params=params, headers={"Origin": ORIGIN, **headers})
        raw.close()
        USED_TOKENS.update(params.values())
    http(edge, "GET", f"/admin/ring?token={query_token}", {"X-Forwarded-For": "203.0.113.9"})
    # Access log lines are written after the response: wait for those of these 5 requests.
    wait_for(lambda: edge.log().count("aiohttp.access") >= logged + 5, 5, "5 more access log lines")
    leaks = []
    for host in STARTED:
        text = host.log()
        for value in USED_TOKENS:
            signature = value.rsplit(".", 1)[-1]
            if value in text or (len(signature) >= 16 and signature in text):
                leaks.append((host.node_id, value[:24] + "..."))
    edge_log = edge.log()
    access_lines = edge_log.count("aiohttp.access")
    record(
        f"{len(USED_TOKENS)} distinct tokens sent to {len(STARTED)} hosts (query, Bearer, refresh, admin)",
        "no token (nor its signature) in any log",
        f"{len(leaks)} found; edge access log lines: {access_lines}, redacted `token=***`: "
        f"{edge_log.count('token=***')}",
    )
    assert access_lines > 0 and "token=***" in edge_log  # the access log was on and redacted
    assert not leaks, leaks
