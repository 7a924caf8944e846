"""Clients of rtc's server API (`/api/*`): publish from a backend in two lines.

Each call is described once (`_Call`: method, path, body, what to return) and carried
out by one of two transports: `ServerAPI` (blocking, stdlib `urllib`, for a Django
view or a Celery task) and `AsyncServerAPI` (aiohttp, awaited).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

__all__ = ["ApiError", "AsyncServerAPI", "ServerAPI"]

RequestId = str | int


class ApiError(Exception):
    """The server refused a call: HTTP status, the error code and message it gave."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class _Call:
    method: str
    path: str
    body: dict[str, Any] | None
    pick: Callable[[dict[str, Any]], Any]


def _optional(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


def _quote(room: str) -> str:
    return urllib.parse.quote(room, safe="")


def _error(status: int, raw: bytes) -> ApiError:
    try:
        error = json.loads(raw)["error"]
        return ApiError(status, error["code"], error["message"])
    except (ValueError, KeyError, TypeError):
        return ApiError(status, "http", raw[:200].decode(errors="replace"))


class _Calls:
    """The calls of SPEC 8; subclasses run them (returning values, or awaitables)."""

    def __init__(self, url: str, api_key: str, *, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._headers = {"Authorization": f"apikey {api_key}", "Content-Type": "application/json"}

    def _run(self, call: _Call) -> Any:
        raise NotImplementedError

    def publish(self, room: str, data: Any, *, id: RequestId | None = None, sender: str | None = None) -> Any:
        """The message's seq. The same `id` within two minutes gives the same seq, sent once."""
        body = {"room": room, "data": data, **_optional(id=id, **{"from": sender})}
        return self._run(_Call("POST", "/api/publish", body, lambda r: r["seq"]))

    def broadcast(
        self, rooms: Sequence[str], data: Any, *, id: RequestId | None = None, sender: str | None = None
    ) -> Any:
        """One result per room: `{"room","seq"}` or `{"room","error"}`."""
        body = {"rooms": list(rooms), "data": data, **_optional(id=id, **{"from": sender})}
        return self._run(_Call("POST", "/api/broadcast", body, lambda r: r["results"]))

    def direct(self, user: str, data: Any, *, id: RequestId | None = None, sender: str | None = None) -> Any:
        """The seq in the user's inbox; every connection of the user gets a `direct` frame."""
        body = {"to": user, "data": data, **_optional(id=id, **{"from": sender})}
        return self._run(_Call("POST", "/api/direct", body, lambda r: r["seq"]))

    def disconnect(self, user: str, *, code: int | None = None, reason: str | None = None) -> Any:
        """How many connections of the user were closed, on every host."""
        body = {"user": user, **_optional(code=code, reason=reason)}
        return self._run(_Call("POST", "/api/disconnect", body, lambda r: r["closed"]))

    def members(self, room: str) -> Any:
        """`{"room","users","count"}`: users with a connection in the room, cluster-wide."""
        return self._run(_Call("GET", f"/api/rooms/{_quote(room)}/members", None, lambda r: r))

    def history(self, room: str, *, since: int | None = None, limit: int | None = None) -> Any:
        """`{"room","epoch","seq","messages"}`: seqs in (since, since+limit], newest page by default."""
        query = urllib.parse.urlencode(_optional(since=since, limit=limit))
        path = f"/api/rooms/{_quote(room)}/history" + (f"?{query}" if query else "")
        return self._run(_Call("GET", path, None, lambda r: r))

    def info(self) -> Any:
        """`{"hosts":[{"node","slots","connections"}],"slots"}`."""
        return self._run(_Call("GET", "/api/info", None, lambda r: r))


class ServerAPI(_Calls):
    """Blocking client (stdlib only): `ServerAPI(url, api_key=KEY).publish("news", {...})`."""

    def _run(self, call: _Call) -> Any:
        data = None if call.body is None else json.dumps(call.body).encode()
        request = urllib.request.Request(self.url + call.path, data, self._headers, method=call.method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return call.pick(json.loads(response.read()))
        except urllib.error.HTTPError as exc:
            raise _error(exc.code, exc.read()) from None


class AsyncServerAPI(_Calls):
    """The same calls, awaited: `await AsyncServerAPI(url, api_key=KEY).publish(...)`."""

    def __init__(self, url: str, api_key: str, *, timeout: float = 10.0) -> None:
        super().__init__(url, api_key, timeout=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def _run(self, call: _Call) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        async with self._session.request(
            call.method, self.url + call.path, json=call.body, headers=self._headers
        ) as response:
            raw = await response.read()
            if response.status >= 400:
                raise _error(response.status, raw)
            return call.pick(json.loads(raw))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> AsyncServerAPI:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()
