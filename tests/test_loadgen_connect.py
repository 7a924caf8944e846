"""The load generator's own connect: bound to its source address, refused cleanly."""

from __future__ import annotations

import asyncio
import errno

import pytest

from bench.loadgen.worker import _connected_socket
from tests.rtcproc import free_port


async def test_a_connected_socket_comes_from_its_source_address_to_the_server() -> None:
    accepted: asyncio.Queue[tuple[str, int]] = asyncio.Queue()

    def on_connect(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.put_nowait(writer.get_extra_info("peername"))
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        sock = await _connected_socket("127.0.0.3", "127.0.0.1", port)
        try:
            assert sock.getpeername() == ("127.0.0.1", port)
            assert sock.getsockname()[0] == "127.0.0.3"
            peer = await asyncio.wait_for(accepted.get(), 5)
            assert peer == sock.getsockname()
        finally:
            sock.close()


async def test_a_refused_connect_raises_with_its_errno() -> None:
    with pytest.raises(OSError) as refused:
        await _connected_socket("127.0.0.2", "127.0.0.1", free_port())
    assert refused.value.errno == errno.ECONNREFUSED
