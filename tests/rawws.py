"""A WebSocket client written by hand on a plain TCP socket, for attacks no library makes."""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import struct
import urllib.parse
from typing import Any

import orjson

from tests.rtcproc import Host

__all__ = ["OP_BINARY", "OP_CLOSE", "OP_CONT", "OP_PING", "OP_PONG", "OP_TEXT", "RawWS"]


def _mask(payload: bytes, key: bytes) -> bytes:
    if not payload:
        return payload
    n = len(payload)
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class RawWS:
    """An HTTP upgrade and WebSocket frames written by hand on a plain TCP socket (RFC 6455).

    No client library stands between the test and the wire: the status line is what the
    server answered, and every frame is the bytes the test chose (FIN, RSV1, lengths).
    """

    def __init__(
        self, sock: socket.socket, status: int, headers: dict[str, str], body: bytes, buffer: bytes
    ) -> None:
        self.sock = sock
        self.status = status
        self.headers = headers
        self.body = body
        self.buf = bytearray(buffer)

    @classmethod
    def open(
        cls,
        host: Host,
        *,
        token: str | None = None,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        path: str = "/ws",
        source: str | None = None,
        rcvbuf: int | None = None,
        timeout: float = 5.0,
    ) -> RawWS:
        query = dict(params or {})
        if token is not None:
            query["token"] = token
        target = path + ("?" + urllib.parse.urlencode(query) if query else "")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if rcvbuf is not None:  # before connect, so the advertised window is small
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            if source is not None:
                sock.bind((source, 0))
            sock.settimeout(timeout)
            sock.connect((host.host, host.port))
            key = base64.b64encode(os.urandom(16)).decode()
            lines = [
                f"GET {target} HTTP/1.1",
                f"Host: {host.host}:{host.port}",
                "Upgrade: websocket",
                "Connection: Upgrade",
                f"Sec-WebSocket-Key: {key}",
                "Sec-WebSocket-Version: 13",
            ]
            lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"closed during the handshake: {data!r}")
                data += chunk
            head, _, rest = data.partition(b"\r\n\r\n")
            status_line, *header_lines = head.decode("latin-1").split("\r\n")
            status = int(status_line.split()[1])
            found: dict[str, str] = {}
            for line in header_lines:
                name, _, value = line.partition(":")
                found[name.strip().lower()] = value.strip()
            body = b""
            if status == 101:
                accept = base64.b64encode(
                    hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
                ).decode()
                assert found.get("sec-websocket-accept") == accept, found
            else:
                length = int(found.get("content-length", "0"))
                while len(rest) < length:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    rest += chunk
                body, rest = rest[:length], rest[length:]
            return cls(sock, status, found, body, rest)
        except BaseException:
            sock.close()
            raise

    def close(self) -> None:
        self.sock.close()

    # -- frames out ----------------------------------------------------------------------

    def send_frame(
        self,
        opcode: int,
        payload: bytes = b"",
        *,
        fin: bool = True,
        rsv1: bool = False,
        declared_length: int | None = None,
    ) -> None:
        length = len(payload) if declared_length is None else declared_length
        first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
        if length < 126:
            header = struct.pack("!BB", first, 0x80 | length)
        elif length < 65536:
            header = struct.pack("!BBH", first, 0x80 | 126, length)
        else:
            header = struct.pack("!BBQ", first, 0x80 | 127, length)
        key = os.urandom(4)
        self.sock.sendall(header + key + _mask(payload, key))

    def send_json(self, **frame: Any) -> None:
        self.send_frame(OP_TEXT, orjson.dumps(frame))

    # -- frames in ---------------------------------------------------------------------------

    def _need(self, count: int) -> None:
        while len(self.buf) < count:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("server closed the connection")
            self.buf += chunk

    def recv_frame(self) -> tuple[int, bytes]:
        self._need(2)
        first, second = self.buf[0], self.buf[1]
        length, offset = second & 0x7F, 2
        if length == 126:
            self._need(4)
            (length,) = struct.unpack("!H", self.buf[2:4])
            offset = 4
        elif length == 127:
            self._need(10)
            (length,) = struct.unpack("!Q", self.buf[2:10])
            offset = 10
        self._need(offset + length)
        payload = bytes(self.buf[offset : offset + length])
        del self.buf[: offset + length]
        return first & 0x0F, payload

    def frames_until(self, kind: str) -> list[dict[str, Any]]:
        """JSON frames up to and including the first of `kind`."""
        seen: list[dict[str, Any]] = []
        while True:
            opcode, payload = self.recv_frame()
            if opcode == OP_CLOSE:
                raise AssertionError(f"closed while waiting for {kind}: {payload!r} after {seen}")
            if opcode == OP_TEXT:
                seen.append(orjson.loads(payload))
                if seen[-1].get("type") == kind:
                    return seen

    def close_outcome(self, timeout: float = 10.0) -> tuple[int | str, list[dict[str, Any]]]:
        """How the server ended the connection: its close code, or 'eof'/'reset'; and the
        JSON frames it sent before."""
        self.sock.settimeout(timeout)
        frames: list[dict[str, Any]] = []
        try:
            while True:
                opcode, payload = self.recv_frame()
                if opcode == OP_CLOSE:
                    return (struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005), frames
                if opcode == OP_TEXT:
                    frames.append(orjson.loads(payload))
        except EOFError:
            return "eof", frames
        except ConnectionResetError:
            return "reset", frames
        except TimeoutError:
            return "still open", frames

    def no_frame_follows(self) -> bool:
        """After a refusal: nothing but EOF or silence (never a WebSocket frame)."""
        self.sock.settimeout(0.05)
        try:
            return self.sock.recv(1) == b""
        except TimeoutError:
            return not self.buf
        except ConnectionResetError:
            return True
