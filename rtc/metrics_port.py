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

_OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nConnection: close\r\n"
_NOT_GET = b"HTTP/1.1 405 Method Not Allowed\r\nAllow: GET\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_TOO_LARGE = b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


@dataclass(slots=True)
class _Scrape:
    sock: socket.socket
    deadline: float
    request: bytes = b""
    response: memoryview | None = None


class MetricsPort:
    """Serves `render()` as Prometheus text over HTTP/1.1, one response per connection."""

    def __init__(
        self,
        listener: socket.socket,
        selector: selectors.BaseSelector,
        render: Callable[[], bytes],
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
            body = self._render()
            self._respond(scrape, _OK + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        elif len(scrape.request) >= _MAX_REQUEST:
            self._respond(scrape, _TOO_LARGE)

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
