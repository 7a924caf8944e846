"""A bare WebSocket client on asyncio streams, for tests that need control over the socket.

aiohttp's client reads ahead and closes politely; these tests need to read at their own pace
(so frames pile up in the kernel's buffers, "in flight"), and to vanish with a TCP reset
(no close frame, no FIN) at a chosen moment. Frames are JSON text, as the protocol is.
`tests/rawws.py` is the blocking twin for attacks (any bytes, one socket at a time); this
one runs dozens of well-behaved clients at once on the test's event loop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import struct
from typing import Any
from urllib.parse import urlencode

import orjson

__all__ = ["RawSocket", "Refused"]


class Refused(Exception):
    """The upgrade was answered with something other than 101."""


class RawSocket:
    """One client WebSocket: send JSON frames, receive them one by one, reset or close."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.close_code: int | None = None

    @classmethod
    async def open(cls, host: str, port: int, *, rcvbuf: int = 0, **query: str) -> RawSocket:
        """Upgrade `/ws?<query>`; `rcvbuf` fixes the receive buffer (no autotuning), so
        what can be in flight towards this client is known."""
        sock = socket.socket()
        sock.setblocking(False)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(sock=sock)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET /ws?{urlencode(query)} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            writer.close()
            raise Refused(head.split(b"\r\n", 1)[0].decode())
        return cls(reader, writer)

    async def send(self, **frame: Any) -> None:
        self._write(0x1, orjson.dumps(frame))
        await self.writer.drain()

    def _write(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        size = len(payload)
        if size < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | size)
        elif size < 1 << 16:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, size)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, size)
        word = int.from_bytes(mask * (size // 4 + 1), "big") >> (8 * (4 - size % 4))
        masked = (int.from_bytes(payload, "big") ^ word).to_bytes(size, "big") if size else b""
        self.writer.write(head + mask + masked)

    async def recv(self) -> dict[str, Any] | None:
        """The next JSON frame; None once the server closed (its code in `close_code`)."""
        while True:
            try:
                b0, b1 = await self.reader.readexactly(2)
                size = b1 & 0x7F
                if size == 126:
                    (size,) = struct.unpack("!H", await self.reader.readexactly(2))
                elif size == 127:
                    (size,) = struct.unpack("!Q", await self.reader.readexactly(8))
                payload = await self.reader.readexactly(size)
            except (asyncio.IncompleteReadError, ConnectionError):
                return None
            opcode = b0 & 0x0F
            if opcode == 0x1:
                frame: dict[str, Any] = orjson.loads(payload)
                return frame
            if opcode == 0x8:
                self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                return None
            if opcode == 0x9:  # the server's heartbeat: answer, or it closes us
                self._write(0xA, payload)

    async def expect(self, kind: str, timeout: float = 10.0) -> dict[str, Any]:
        """The next frame of `kind`; anything else first is a test failure."""
        async with asyncio.timeout(timeout):
            frame = await self.recv()
        assert frame is not None and frame["type"] == kind, f"expected {kind}, got {frame}"
        return frame

    def abandon(self) -> None:
        """Drop the connection if still open (test teardown)."""
        if not self.writer.is_closing():
            self.writer.transport.abort()

    async def closed(self) -> None:
        """Until the transport finished closing (after `abandon`, say), however it ended."""
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()

    def reset(self) -> None:
        """Vanish: a TCP reset, whatever the buffers still hold."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def close(self) -> None:
        """An orderly close: close frame, then read until the server's close."""
        if self.writer.is_closing():
            return
        self._write(0x8, struct.pack("!H", 1000))
        try:
            async with asyncio.timeout(10):
                while await self.recv() is not None:
                    pass
        finally:
            self.writer.close()
