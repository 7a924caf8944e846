"""The supervisor's metrics port (`--metrics-port`, :9090) without blocking its loop.

Every accepted socket is non-blocking and registered in the supervisor's selector: the
request is read and the response written only as far as the socket allows, each scrape
has a deadline, and the number of scrapes at once is bounded. A client that connects and
says nothing therefore costs a descriptor for a few seconds, never the supervisor's time:
signals, reaping and other scrapes go on.
"""

from __future__ import annotations

import contextlib
import functools
import selectors
import socket
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["MetricsPort"]

SCRAPE_DEADLINE = 5.0  # from accept to the last byte written
MAX_SCRAPES = 32  # at once; a new one evicts the oldest
_MAX_REQUEST = 8192
_ACCEPTS_PER_TURN = 64

_OK = "HTTP/1.1 200 OK\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n"
_NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_NOT_GET = b"HTTP/1.1 405 Method Not Allowed\r\nAllow: GET\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_TOO_LARGE = b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


@dataclass(slots=True)
class _Scrape:
    sock: socket.socket
    deadline: float
    request: bytes = b""
    response: memoryview | None = None


class MetricsPort:
    """Serves `GET /metrics` over HTTP/1.1, one response per connection: `render(accept)`
    gives the body and its Content-Type for the request's `Accept` header."""

    def __init__(
        self,
        listener: socket.socket,
        selector: selectors.BaseSelector,
        render: Callable[[str], tuple[bytes, str]],
        clock: Callable[[], float],
    ) -> None:
        listener.setblocking(False)
        self._listener = listener
        self._selector = selector
        self._render = render
        self._clock = clock
        self._scrapes: dict[socket.socket, _Scrape] = {}
        selector.register(listener, selectors.EVENT_READ, self._accept)

    def _accept(self, _mask: int) -> None:
        for _ in range(_ACCEPTS_PER_TURN):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # EMFILE and the like: the client is refused, the loop goes on
            sock.setblocking(False)
            if len(self._scrapes) >= MAX_SCRAPES:
                self._close(next(iter(self._scrapes.values())))
            scrape = _Scrape(sock, self._clock() + SCRAPE_DEADLINE)
            self._scrapes[sock] = scrape
            self._selector.register(sock, selectors.EVENT_READ, functools.partial(self._on_ready, scrape))

    def _on_ready(self, scrape: _Scrape, mask: int) -> None:
        try:
            if mask & selectors.EVENT_READ and scrape.response is None:
                self._read(scrape)
            if mask & selectors.EVENT_WRITE and scrape.response is not None:
                self._write(scrape)
        except OSError:
            self._close(scrape)

    def _read(self, scrape: _Scrape) -> None:
        chunk = scrape.sock.recv(_MAX_REQUEST)
        if not chunk:
            self._close(scrape)
            return
        scrape.request += chunk
        if not scrape.request.startswith(b"GET "[: len(scrape.request)]):
            self._respond(scrape, _NOT_GET)
        elif b"\r\n\r\n" in scrape.request:
            self._respond(scrape, self._response(scrape.request))
        elif len(scrape.request) >= _MAX_REQUEST:
            self._respond(scrape, _TOO_LARGE)

    def _response(self, request: bytes) -> bytes:
        """The metrics for `GET /metrics` (any query), 404 for any other path."""
        line, *fields = request.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        target = line.split(" ")[1] if line.count(" ") >= 1 else ""
        if target.partition("?")[0] != "/metrics":
            return _NOT_FOUND
        accept = next((f.partition(":")[2].strip() for f in fields if f.lower().startswith("accept:")), "")
        body, content_type = self._render(accept)
        return _OK.format(content_type, len(body)).encode() + body

    def _respond(self, scrape: _Scrape, response: bytes) -> None:
        scrape.response = memoryview(response)
        self._selector.modify(scrape.sock, selectors.EVENT_WRITE, self._selector.get_key(scrape.sock).data)
        self._write(scrape)

    def _write(self, scrape: _Scrape) -> None:
        assert scrape.response is not None
        try:
            sent = scrape.sock.send(scrape.response)
        except BlockingIOError:
            return
        scrape.response = scrape.response[sent:]
        if not scrape.response:
            self._close(scrape)

    def expire(self) -> None:
        """Drop scrapes past their deadline (called once per loop turn)."""
        now = self._clock()
        for scrape in [s for s in self._scrapes.values() if now > s.deadline]:
            self._close(scrape)

    def _close(self, scrape: _Scrape) -> None:
        if self._scrapes.pop(scrape.sock, None) is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(scrape.sock)
            scrape.sock.close()

    def close(self) -> None:
        for scrape in list(self._scrapes.values()):
            self._close(scrape)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(self._listener)
        self._listener.close()

    def forget(self) -> None:
        """In a forked worker: close the inherited sockets, never touch the shared selector."""
        for sock in (self._listener, *self._scrapes):
            sock.close()
