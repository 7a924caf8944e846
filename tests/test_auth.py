"""rtc.auth fed tokens and a fixed clock: principals out, AuthError for every bad token."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable
from typing import Any

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from rtc.auth import LEEWAY_SECONDS, Principal, Verifier, mint, token_from_request
from rtc.config import Settings
from rtc.errors import AuthError

NOW = 1_800_000_000.0
SECRET = "test-secret-" + "0123456789abcdef" * 4  # 75 bytes: long enough for HS512
SETTINGS = Settings(jwt_secret=SECRET, node_id="test", workers=1)


def clock() -> float:
    return NOW


def verifier(**changes: Any) -> Verifier:
    return Verifier(SETTINGS.with_changes(**changes), clock)


def claims(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": "alice", "exp": int(NOW) + 600, "iat": int(NOW)}
    base.update(changes)
    return {name: value for name, value in base.items() if value is not None}


def hs256(**changes: Any) -> str:
    return jwt.encode(claims(**changes), SECRET, algorithm="HS256")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def handmade(header: dict[str, Any], payload: dict[str, Any], sign: Callable[[bytes], bytes]) -> str:
    """A token PyJWT would refuse to write (alg none, a PEM used as HMAC secret)."""
    signing_input = b64(orjson.dumps(header)) + "." + b64(orjson.dumps(payload))
    return signing_input + "." + b64(sign(signing_input.encode()))


def public_pem(private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return (
        private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def rejected(check: Verifier, token: str) -> AuthError:
    with pytest.raises(AuthError) as caught:
        check.verify(token)
    return caught.value


# -- HS256 ----------------------------------------------------------------------------------


def test_valid_hs256() -> None:
    principal = verifier().verify(hs256(rooms=["chat.*"], admin=True))
    assert principal == Principal("alice", int(NOW) + 600, ("chat.*",), True)


def test_defaults_of_a_plain_token() -> None:
    principal = verifier().verify(hs256())
    assert principal.rooms is None
    assert principal.admin is False


@pytest.mark.parametrize("admin", ["true", 1, "yes", None])
def test_admin_only_when_exactly_true(admin: Any) -> None:
    assert verifier().verify(hs256(admin=admin)).admin is False


def test_wrong_secret() -> None:
    rejected(verifier(), jwt.encode(claims(), SECRET[::-1], algorithm="HS256"))


def test_garbage() -> None:
    for token in ("", "abc", "a.b.c", "a.b"):
        rejected(verifier(), token)


def test_flipped_signature_byte() -> None:
    token = hs256()
    head, _, signature = token.rpartition(".")
    raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
    raw[0] ^= 0x01
    rejected(verifier(), head + "." + b64(bytes(raw)))


def test_flipped_payload_byte() -> None:
    header, payload, signature = hs256().split(".")
    tampered = b64(orjson.dumps(claims(sub="mallory")))
    assert tampered != payload
    rejected(verifier(), f"{header}.{tampered}.{signature}")


def test_other_pinned_hmac_algorithm_refuses_hs256() -> None:
    rejected(verifier(jwt_algorithms=("HS512",)), hs256())
    token = jwt.encode(claims(), SECRET, algorithm="HS512")
    assert verifier(jwt_algorithms=("HS512",)).verify(token).user == "alice"


# -- time claims ----------------------------------------------------------------------------


def test_missing_exp() -> None:
    assert "exp" in str(rejected(verifier(), hs256(exp=None)))


@pytest.mark.parametrize("exp", ["soon", True, [1]])
def test_exp_not_a_number(exp: Any) -> None:
    rejected(verifier(), hs256(exp=exp))


@pytest.mark.parametrize(
    "payload",
    [
        b'{"sub":"alice","exp":Infinity}',
        b'{"sub":"alice","exp":NaN}',
        b'{"sub":"alice","exp":1e400}',
        b'{"sub":"alice","exp":1' + b"0" * 400 + b"}",
        b'{"sub":"alice","exp":1900000000,"nbf":NaN}',
        b'{"sub":"alice","exp":1900000000,"iat":NaN}',
    ],
    ids=["exp-Infinity", "exp-NaN", "exp-1e400", "exp-huge-int", "nbf-NaN", "iat-NaN"],
)
def test_non_finite_time_claims(payload: bytes) -> None:
    """PyJWT reads JSON with Python's json, which takes NaN, Infinity and huge integers."""
    header = b64(b'{"alg":"HS256","typ":"JWT"}')
    signing_input = header + "." + b64(payload)
    signature = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    rejected(verifier(), signing_input + "." + b64(signature))


@pytest.mark.parametrize("age", [LEEWAY_SECONDS + 1, 3600])
def test_expired_beyond_leeway(age: int) -> None:
    assert "expired" in str(rejected(verifier(), hs256(exp=int(NOW) - age, iat=int(NOW) - 7200)))


@pytest.mark.parametrize("age", [0, 1, LEEWAY_SECONDS - 1, LEEWAY_SECONDS])
def test_expired_within_leeway(age: int) -> None:
    assert verifier().verify(hs256(exp=int(NOW) - age)).exp == int(NOW) - age


def test_the_clock_is_the_injected_one() -> None:
    token = hs256(exp=int(NOW) + 10)
    assert Verifier(SETTINGS, lambda: NOW).verify(token).user == "alice"
    with pytest.raises(AuthError):
        Verifier(SETTINGS, lambda: NOW + 10 + LEEWAY_SECONDS + 1).verify(token)


def test_a_token_verified_before_is_still_checked_against_the_clock() -> None:
    """Signatures are remembered (a resume storm reuses tokens); expiry never is."""
    now = [NOW]
    check = Verifier(SETTINGS, lambda: now[0])
    token = hs256(exp=int(NOW) + 10, nbf=int(NOW) + 5 + LEEWAY_SECONDS)
    assert "nbf" in str(rejected(check, token))  # not yet valid: refused, though remembered
    now[0] = NOW + 5
    assert check.verify(token).user == "alice"
    assert check.verify(token).user == "alice"
    now[0] = NOW + 10 + LEEWAY_SECONDS + 1
    assert "expired" in str(rejected(check, token))


def test_a_bad_signature_is_refused_every_time() -> None:
    check = verifier()
    forged = jwt.encode(claims(), "another-secret-" + "0" * 40, algorithm="HS256")
    for _ in range(2):
        rejected(check, forged)
    assert check.verify(hs256()).user == "alice"


@pytest.mark.parametrize("claim", ["nbf", "iat"])
def test_not_yet_valid_beyond_leeway(claim: str) -> None:
    error = rejected(verifier(), hs256(**{claim: int(NOW) + LEEWAY_SECONDS + 1}))
    assert claim in str(error)


@pytest.mark.parametrize("claim", ["nbf", "iat"])
@pytest.mark.parametrize("ahead", [1, LEEWAY_SECONDS])
def test_not_yet_valid_within_leeway(claim: str, ahead: int) -> None:
    assert verifier().verify(hs256(**{claim: int(NOW) + ahead})).user == "alice"


@pytest.mark.parametrize("claim", ["nbf", "iat"])
def test_past_nbf_and_iat(claim: str) -> None:
    assert verifier().verify(hs256(**{claim: int(NOW) - 86400})).user == "alice"


@pytest.mark.parametrize("claim", ["nbf", "iat"])
def test_non_numeric_nbf_iat(claim: str) -> None:
    rejected(verifier(), hs256(**{claim: "now"}))


# -- audience and issuer --------------------------------------------------------------------


def test_aud_and_iss_ignored_when_not_configured() -> None:
    assert verifier().verify(hs256(aud="anything", iss="anyone")).user == "alice"


def test_audience_checked_when_configured() -> None:
    check = verifier(jwt_audience="rtc")
    assert check.verify(hs256(aud="rtc")).user == "alice"
    assert check.verify(hs256(aud=["other", "rtc"])).user == "alice"
    rejected(check, hs256(aud="other"))
    rejected(check, hs256())


def test_issuer_checked_when_configured() -> None:
    check = verifier(jwt_issuer="https://idp.example")
    assert check.verify(hs256(iss="https://idp.example")).user == "alice"
    rejected(check, hs256(iss="https://evil.example"))
    rejected(check, hs256())


# -- algorithm pinning ----------------------------------------------------------------------


def test_alg_none() -> None:
    for alg in ("none", "None", "NONE"):
        token = handmade({"alg": alg, "typ": "JWT"}, claims(), lambda _: b"")
        rejected(verifier(), token)
        rejected(verifier(), token.rstrip("."))


def test_a_critical_header_extension_is_refused() -> None:
    token = handmade(
        {"alg": "HS256", "crit": ["b64"], "b64": False},
        claims(),
        lambda data: hmac.new(SECRET.encode(), data, hashlib.sha256).digest(),
    )
    assert "critical" in str(rejected(verifier(), token))


@pytest.mark.parametrize("bad", ["é", "\udcff", "\x00", "!!!!", "*"])
def test_a_token_with_characters_outside_base64url_is_refused(bad: str) -> None:
    header, payload, signature = hs256().split(".")
    for token in (f"{header}.{payload}{bad}.{signature}", f"{header}.{payload}.{signature}{bad}"):
        rejected(verifier(), token)


def test_key_confusion_rsa_public_key_as_hmac_secret(rsa_key: rsa.RSAPrivateKey) -> None:
    pem = public_pem(rsa_key)
    check = verifier(jwt_algorithms=("RS256",), jwt_public_key=pem, jwt_secret=None)
    forged = handmade(
        {"alg": "HS256", "typ": "JWT"},
        claims(),
        lambda data: hmac.new(pem.encode(), data, hashlib.sha256).digest(),
    )
    rejected(check, forged)


def test_rs256_token_refused_by_an_hmac_verifier(rsa_key: rsa.RSAPrivateKey) -> None:
    rejected(verifier(), jwt.encode(claims(), rsa_key, algorithm="RS256"))


def test_rs256(rsa_key: rsa.RSAPrivateKey) -> None:
    check = verifier(jwt_algorithms=("RS256",), jwt_public_key=public_pem(rsa_key), jwt_secret=None)
    assert check.verify(jwt.encode(claims(rooms=["a"]), rsa_key, algorithm="RS256")).rooms == ("a",)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rejected(check, jwt.encode(claims(), other, algorithm="RS256"))


def test_es256(ec_key: ec.EllipticCurvePrivateKey, rsa_key: rsa.RSAPrivateKey) -> None:
    pem = public_pem(ec_key)
    check = verifier(jwt_algorithms=("ES256",), jwt_public_key=pem, jwt_secret=None)
    token = jwt.encode(claims(), ec_key, algorithm="ES256")
    assert check.verify(token).user == "alice"
    rejected(check, jwt.encode(claims(), ec.generate_private_key(ec.SECP256R1()), algorithm="ES256"))
    # ES256 is not accepted where only RS256 is pinned, whatever the token says.
    rejected(verifier(jwt_algorithms=("RS256",), jwt_public_key=public_pem(rsa_key)), token)


def test_flipped_rs256_signature(rsa_key: rsa.RSAPrivateKey) -> None:
    check = verifier(jwt_algorithms=("RS256",), jwt_public_key=public_pem(rsa_key), jwt_secret=None)
    token = jwt.encode(claims(), rsa_key, algorithm="RS256")
    head, _, signature = token.rpartition(".")
    raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
    raw[-1] ^= 0x80
    rejected(check, head + "." + b64(bytes(raw)))


# -- subject and rooms ----------------------------------------------------------------------


def test_seed_claim_user_id() -> None:
    assert verifier().verify(hs256(sub=None, user_id="bob")).user == "bob"


def test_sub_wins_over_user_id() -> None:
    assert verifier().verify(hs256(user_id="bob")).user == "alice"


@pytest.mark.parametrize(
    "changes",
    [
        {"sub": None},
        {"sub": ""},
        {"sub": "a@b"},
        {"sub": "@alice"},
        {"sub": "x" * 129},
        {"sub": 42},
        {"sub": None, "user_id": 42},
        {"sub": None, "user_id": "a@b"},
    ],
)
def test_unusable_subject(changes: dict[str, Any]) -> None:
    rejected(verifier(), hs256(**changes))


def test_subject_at_the_length_limit() -> None:
    assert verifier().verify(hs256(sub="x" * 128)).user == "x" * 128


@pytest.mark.parametrize("rooms", ["chat.*", {"chat.*": True}, [1], ["a", None], 7])
def test_rooms_claim_must_be_a_list_of_strings(rooms: Any) -> None:
    assert "rooms" in str(rejected(verifier(), hs256(rooms=rooms)))


def test_empty_rooms_claim_allows_only_the_inbox() -> None:
    principal = verifier().verify(hs256(rooms=[]))
    assert principal.rooms == ()
    assert not principal.may_join("lobby")
    assert principal.may_join("@alice")


# -- Principal.may_join ---------------------------------------------------------------------


def test_may_join_globs() -> None:
    principal = Principal("alice", 0, ("chat.*", "lobby", "team-[ab]", "room?"))
    assert principal.may_join("chat.general")
    assert principal.may_join("chat.")
    assert not principal.may_join("chat")
    assert not principal.may_join("Chat.general")  # case-sensitive
    assert principal.may_join("lobby")
    assert not principal.may_join("lobby2")
    assert principal.may_join("team-a") and not principal.may_join("team-c")
    assert principal.may_join("room1") and not principal.may_join("room12")


# The examples of docs/security.md ("The `rooms` claim: how a pattern matches"), verbatim.
DOCUMENTED = [
    ("chat.*", "chat.general", True),
    ("chat.*", "chat.eu.paris", True),  # `*` crosses `.`: there is no one-level wildcard
    ("chat.*", "chat.", True),  # `*` matches nothing too
    ("chat.*", "chat", False),
    ("chat.*", "Chat.general", False),  # case-sensitive
    ("chat.*", "xchat.general", False),  # anchored: the whole id must match
    ("*.public", "a.b.public", True),
    ("team-?", "team-a", True),
    ("team-?", "team-ab", False),
    ("news.[abc]*", "news.b1", True),
    ("news.[abc]*", "news.d1", False),
    ("[!_]*", "_internal", False),
    ("a[*]b", "a*b", True),  # a literal `*`: no backslash escapes
    ("a[*]b", "axb", False),
    ("*", "@bob", False),  # no pattern ever opens another user's inbox
]


@pytest.mark.parametrize("pattern,room,allowed", DOCUMENTED)
def test_rooms_patterns_match_as_documented(pattern: str, room: str, allowed: bool) -> None:
    assert Principal("alice", 0, (pattern,)).may_join(room) is allowed


def test_empty_rooms_claim_allows_only_the_own_inbox() -> None:
    principal = Principal("alice", 0, ())
    assert not principal.may_join("lobby") and principal.may_join("@alice")


def test_no_rooms_claim_allows_every_room() -> None:
    assert Principal("alice", 0).may_join("anything/at:all")


@pytest.mark.parametrize("rooms", [None, ("*",), ("@*",)])
def test_inboxes_only_own(rooms: tuple[str, ...] | None) -> None:
    principal = Principal("alice", 0, rooms)
    assert principal.may_join("@alice")
    assert not principal.may_join("@bob")
    assert not principal.may_join("@alice2")
    assert not principal.may_join("@")


# -- token_from_request ---------------------------------------------------------------------


def test_token_from_query_only() -> None:
    assert token_from_request("t1", None) == "t1"


@pytest.mark.parametrize("header", ["Bearer t1", "bearer t1", "BEARER   t1  "])
def test_token_from_header_only(header: str) -> None:
    assert token_from_request(None, header) == "t1"


def test_token_in_both_places_equal() -> None:
    assert token_from_request("t1", "Bearer t1") == "t1"


def test_token_in_both_places_differ() -> None:
    with pytest.raises(AuthError):
        token_from_request("t1", "Bearer t2")


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Token t1", "Bearer", "Bearer   ", "t1"])
def test_non_bearer_header(header: str) -> None:
    with pytest.raises(AuthError):
        token_from_request(None, header)


def test_non_bearer_header_even_with_a_query_token() -> None:
    with pytest.raises(AuthError):
        token_from_request("t1", "Basic dXNlcjpwYXNz")


@pytest.mark.parametrize("query,header", [(None, None), ("", None), (None, ""), ("", "")])
def test_no_token(query: str | None, header: str | None) -> None:
    with pytest.raises(AuthError):
        token_from_request(query, header)


# -- mint -----------------------------------------------------------------------------------


def test_mint_is_accepted_by_the_verifier() -> None:
    token = mint(SECRET, "carol", now=NOW, ttl=120, rooms=["a.*", "b"], admin=True)
    assert verifier().verify(token) == Principal("carol", int(NOW) + 120, ("a.*", "b"), True)


def test_mint_defaults() -> None:
    token = mint(SECRET, "carol", now=NOW)
    decoded = jwt.decode(
        token, SECRET, algorithms=["HS256"], options={"verify_exp": False, "verify_iat": False}
    )
    assert decoded == {"sub": "carol", "iat": int(NOW), "exp": int(NOW) + 3600}
    assert verifier().verify(token) == Principal("carol", int(NOW) + 3600)


def test_mint_with_another_hmac_algorithm() -> None:
    token = mint(SECRET, "carol", now=NOW, algorithm="HS384")
    assert verifier(jwt_algorithms=("HS384",)).verify(token).user == "carol"
    rejected(verifier(), token)


def test_minted_token_expires() -> None:
    token = mint(SECRET, "carol", now=NOW - 3600 - LEEWAY_SECONDS - 1)
    rejected(verifier(), token)
