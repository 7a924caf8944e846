"""Tokens to principals, and what a principal may do. Pure: the clock is injected."""

from __future__ import annotations

import base64
import binascii
import fnmatch
import hashlib
import hmac
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt
import orjson

from rtc.config import HMAC_ALGORITHMS, Settings
from rtc.errors import AuthError

__all__ = ["LEEWAY_SECONDS", "Principal", "Verifier", "mint", "token_from_request"]

LEEWAY_SECONDS = 30
_VERIFIED_MAX = 20_000  # tokens whose signature is remembered (a few MB)
_HMAC_HASHES = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a connection is, from a verified token."""

    user: str
    exp: int
    rooms: tuple[str, ...] | None = None  # glob patterns; None: any room
    admin: bool = False

    def may_join(self, room: str) -> bool:
        """Inboxes are private; other rooms follow the token's `rooms` patterns."""
        if room.startswith("@"):
            return room == "@" + self.user
        if self.rooms is None:
            return True
        return any(fnmatch.fnmatchcase(room, pattern) for pattern in self.rooms)


class Verifier:
    """Checks tokens against pinned algorithms, key, audience and issuer."""

    def __init__(self, settings: Settings, clock: Callable[[], float]) -> None:
        self._algorithms = list(settings.jwt_algorithms)
        self._hmac_only = set(self._algorithms) <= HMAC_ALGORITHMS
        key = settings.jwt_secret if self._hmac_only else settings.jwt_public_key
        assert key is not None, "Settings validation guarantees a key"
        self._key: str = key
        self._key_bytes = key.encode()
        self._audience = settings.jwt_audience
        self._issuer = settings.jwt_issuer
        self._clock = clock
        self._verified: dict[str, dict[str, Any]] = {}  # token -> claims, oldest first

    def verify(self, token: str) -> Principal:
        """A principal, or AuthError saying (to logs, never to clients) why not.

        A signature checked once stays checked: a resume storm (every client of a failed
        host reconnecting with the token it had) pays the decode once per token. The
        claims' times are checked against the clock on every use.
        """
        claims = self._verified.get(token)
        if claims is None:
            claims = self._decode(token)
            if len(self._verified) >= _VERIFIED_MAX:
                del self._verified[next(iter(self._verified))]
            self._verified[token] = claims
        return self._principal(claims)

    def _decode(self, token: str) -> dict[str, Any]:
        if self._hmac_only:
            return self._decode_hmac(token)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=self._issuer,
                options={
                    "require": ["exp"],
                    "verify_exp": False,  # checked below against the injected clock
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": self._audience is not None,
                    "verify_iss": self._issuer is not None,
                },
            )
        except jwt.PyJWTError as exc:
            raise AuthError(f"invalid token: {exc}") from None
        return claims

    def _decode_hmac(self, token: str) -> dict[str, Any]:
        """PyJWT's checks for pinned HMAC algorithms, at a tenth of its cost (~5 µs): a
        connect storm verifies a fresh token per handshake.

        The header's `alg` must be pinned, the signature must match in constant time, and
        `exp`, `aud` and `iss` are required as `_decode` requires them.
        """
        parts = token.split(".")
        if len(parts) != 3 or not token.isascii():
            raise AuthError("invalid token: not three ASCII segments")
        header_part, payload_part, signature_part = parts
        header = _segment(header_part)
        alg = header.get("alg")
        if alg not in self._algorithms:
            raise AuthError("invalid token: the algorithm is not allowed")
        if "crit" in header:
            raise AuthError("invalid token: critical header extensions are not supported")
        signing_input = f"{header_part}.{payload_part}".encode()
        expected = hmac.new(self._key_bytes, signing_input, _HMAC_HASHES[alg]).digest()
        if not hmac.compare_digest(expected, _b64decode(signature_part)):
            raise AuthError("invalid token: signature verification failed")
        claims = _segment(payload_part)
        if "exp" not in claims:
            raise AuthError('invalid token: the "exp" claim is required')
        if self._audience is not None:
            aud = claims.get("aud")
            audiences = [aud] if isinstance(aud, str) else aud
            if not isinstance(audiences, list) or self._audience not in audiences:
                raise AuthError("invalid token: audience")
        if self._issuer is not None and claims.get("iss") != self._issuer:
            raise AuthError("invalid token: issuer")
        return claims

    def _principal(self, claims: dict[str, Any]) -> Principal:
        now = self._clock()
        exp = _number(claims, "exp")
        if exp is None or exp + LEEWAY_SECONDS < now:
            raise AuthError("token expired")
        for claim in ("nbf", "iat"):
            value = _number(claims, claim)
            if claim in claims and (value is None or value - LEEWAY_SECONDS > now):
                raise AuthError(f"token not valid yet ({claim})")
        user = claims.get("sub", claims.get("user_id"))
        if not isinstance(user, str) or not user or len(user) > 128 or "@" in user:
            raise AuthError("token has no usable 'sub'")
        rooms = claims.get("rooms")
        if rooms is not None and not (isinstance(rooms, list) and all(isinstance(r, str) for r in rooms)):
            raise AuthError("claim 'rooms' must be a list of patterns")
        return Principal(
            user=user,
            exp=int(exp),
            rooms=None if rooms is None else tuple(rooms),
            admin=claims.get("admin") is True,
        )


def _b64decode(part: str) -> bytes:
    try:
        return base64.b64decode(part + "=" * (-len(part) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise AuthError("invalid token: bad base64") from None


def _segment(part: str) -> dict[str, Any]:
    """A header or payload: a JSON object (orjson refuses NaN, Infinity and huge integers)."""
    try:
        value = orjson.loads(_b64decode(part))
    except orjson.JSONDecodeError:
        raise AuthError("invalid token: not JSON") from None
    if not isinstance(value, dict):
        raise AuthError("invalid token: not a JSON object")
    return value


def _number(claims: dict[str, Any], name: str) -> float | None:
    """A finite number, else None: PyJWT parses with `json`, which also yields NaN,
    Infinity and integers too large for a float."""
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def token_from_request(query_token: str | None, authorization: str | None) -> str:
    """The one token of a request: `?token=` or `Authorization: Bearer`, never two that differ."""
    header_token = None
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise AuthError("Authorization header is not a Bearer token")
        header_token = value.strip()
    if query_token and header_token and query_token != header_token:
        raise AuthError("query and header tokens disagree")
    token = query_token or header_token
    if not token:
        raise AuthError("no token")
    return token


def mint(
    secret: str,
    user: str,
    *,
    now: float,
    ttl: int = 3600,
    rooms: list[str] | None = None,
    admin: bool = False,
    algorithm: str = "HS256",
) -> str:
    """A signed development token (`rtc token`, `/demo`)."""
    claims: dict[str, Any] = {"sub": user, "iat": int(now), "exp": int(now) + ttl}
    if rooms is not None:
        claims["rooms"] = rooms
    if admin:
        claims["admin"] = True
    return jwt.encode(claims, secret, algorithm=algorithm)
