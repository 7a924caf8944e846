"""Tokens to principals, and what a principal may do. Pure: the clock is injected."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt

from rtc.config import HMAC_ALGORITHMS, Settings
from rtc.errors import AuthError

__all__ = ["LEEWAY_SECONDS", "Principal", "Verifier", "mint", "token_from_request"]

LEEWAY_SECONDS = 30
_VERIFIED_MAX = 20_000  # tokens whose signature is remembered (a few MB)


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
        hmac = set(self._algorithms) <= HMAC_ALGORITHMS
        key = settings.jwt_secret if hmac else settings.jwt_public_key
        assert key is not None, "Settings validation guarantees a key"
        self._key: str = key
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
