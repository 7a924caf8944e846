"""Dead peers, found by one sweep per worker instead of a timer per socket.

A connection is alive while frames arrive from it; `Connection.quiet` counts the sweeps
since the last one (`app` zeroes it on every frame). Every half `--ws-heartbeat` the sweep
looks at each connection: one silent for a whole half interval gets a WebSocket ping,
which every client answers (browsers too); one still silent half an interval after its
ping is cut. An idle, live socket so sees a ping once per interval. While one of its
commands runs (`Connection.busy`: a join waiting on a stalled Redis, say) its frames are
not read, so its silence is not counted: the server's slowness never cuts a client.

aiohttp's own heartbeat does the same with a timer per socket, re-armed on every frame
received: a callback and a deadline computed per frame (about 2 % of a worker relaying
direct messages), and a timer and its handles per socket, made by the thousand in a
reconnect storm.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection

from rtc.connection import Connection

__all__ = ["keep_alive", "sweep"]

log = logging.getLogger("rtc.keepalive")

_PING = b"\x89\x00"  # a WebSocket ping frame with no payload (a server's frames are unmasked)
_PING_AT = 2  # sweeps of silence: a whole half interval since the first sweep found none
_CUT_AT = 3  # one sweep after the ping: no pong within half an interval


async def keep_alive(connections: Collection[Connection], interval: float) -> None:
    """Sweep `connections` every half `interval`, for as long as the worker runs."""
    while True:
        await asyncio.sleep(interval / 2)
        sweep(connections)


def sweep(connections: Collection[Connection]) -> None:
    """Ping the connections silent since the last sweep but one; cut those that stayed so."""
    for conn in list(connections):  # a cut connection leaves the set
        if conn.closing or conn.busy:
            continue
        conn.quiet += 1
        if conn.quiet == _PING_AT:
            conn.send_wire(_PING)
        elif conn.quiet >= _CUT_AT:
            log.info("silent peer cut: no pong", extra={"conn": conn.id, "user": conn.user})
            conn.closing = True
            conn.transport.abort()  # a dead peer reads no close frame: its handler ends at once
