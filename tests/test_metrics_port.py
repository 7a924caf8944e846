"""rtc.metrics_port: scrapes served through a selector, never blocking it, with an injected clock."""

from __future__ import annotations

import selectors
import socket
from collections.abc import Iterator

import pytest

from rtc.metrics_port import MAX_SCRAPES, SCRAPE_DEADLINE, MetricsPort

BODY = b"# TYPE up gauge\nup 1\n"
TEXT = "text/plain; version=0.0.4; charset=utf-8"


class Port:
    def __init__(self) -> None:
        self.now = 0.0
        self.selector = selectors.DefaultSelector()
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        self.address = listener.getsockname()
        self.accepts: list[str] = []
        self.port = MetricsPort(listener, self.selector, self.render, lambda: self.now)

    def render(self, accept: str) -> tuple[bytes, str]:
        self.accepts.append(accept)
        return BODY, TEXT

    def turn(self) -> None:
        """One loop turn of the supervisor: whatever is ready, then deadlines."""
        for key, mask in self.selector.select(timeout=0.05):
            key.data(mask)
        self.port.expire()

    def client(self) -> socket.socket:
        sock = socket.create_connection(self.address, timeout=2)
        self.turn()  # accepted
        return sock

    def exchange(self, sock: socket.socket, request: bytes) -> bytes:
        sock.sendall(request)
        reply = b""
        while True:
            self.turn()
            sock.settimeout(0.05)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                return reply
            reply += chunk


@pytest.fixture
def port() -> Iterator[Port]:
    served = Port()
    yield served
    served.port.close()
    served.selector.close()


def test_scrape_is_served(port: Port) -> None:
    with port.client() as sock:
        reply = port.exchange(sock, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and reply.endswith(b"\r\n\r\n" + BODY)
    assert b"Content-Length: %d\r\n" % len(BODY) in reply


def test_the_accept_header_chooses_the_format(port: Port) -> None:
    with port.client() as sock:
        reply = port.exchange(
            sock, b"GET /metrics?x=1 HTTP/1.1\r\nAccept: application/openmetrics-text\r\n\r\n"
        )
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and f"Content-Type: {TEXT}\r\n".encode() in reply
    assert port.accepts == ["application/openmetrics-text"]


@pytest.mark.parametrize("path", [b"/", b"/health", b"/metrics/x", b"/metricsx"])
def test_other_paths_get_404(port: Port, path: bytes) -> None:
    with port.client() as sock:
        assert port.exchange(sock, b"GET " + path + b" HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404")
    assert port.accepts == []


def test_other_methods_get_405(port: Port) -> None:
    with port.client() as sock:
        assert port.exchange(sock, b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405")


def test_endless_request_gets_431(port: Port) -> None:
    with port.client() as sock:
        assert port.exchange(sock, b"GET /" + b"a" * (8192 - 5)).startswith(b"HTTP/1.1 431")


def test_silent_client_is_dropped_at_its_deadline_while_others_are_served(port: Port) -> None:
    with port.client() as silent, port.client() as other:
        reply = port.exchange(other, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 200")
        port.now += SCRAPE_DEADLINE + 0.1
        port.turn()
        silent.settimeout(2)
        assert silent.recv(1) == b""  # closed by the port, without an answer


def test_too_many_clients_evict_the_oldest(port: Port) -> None:
    clients = [port.client() for _ in range(MAX_SCRAPES + 1)]
    try:
        clients[0].settimeout(2)
        assert clients[0].recv(1) == b""
        assert port.exchange(clients[-1], b"GET /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 200")
    finally:
        for sock in clients:
            sock.close()
