"""Locust users for rtc (and the baselines that speak its protocol).

Each user connects with a token it mints, joins one of ``--rooms`` rooms and publishes
about once a second. Results reach Locust as request events (``request_type="WS"``):

- ``connect``: upgrade to ``joined`` (ms);
- ``publish``: publish to its ``ack`` (ms), matched by ``id``;
- ``deliver``: message ``ts`` (server clock) to arrival (ms, same machine); a seq that
  is not the room's previous seq + 1 is reported as a failed ``deliver``.

It runs under gevent with the blocking ``websocket-client``, so it stays
self-contained: a few lines (loopback check, token) are repeated from
``bench.loadgen`` rather than imported, as Locust loads this file outside the repo's
import path. For 10k+ sockets use ``python -m bench.loadgen`` instead.

    locust -f bench/locustfile.py --headless -u 100 -r 20 -t 60s \\
        --host ws://127.0.0.1:8081 --csv results/locust
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import random
import time
from typing import Any
from urllib.parse import quote, urlsplit

import gevent
import jwt
import websocket
from locust import User, events, task
from locust.argument_parser import LocustArgumentParser

__all__ = ["RtcUser"]

_users = itertools.count()


class SeqError(Exception):
    """A delivery whose seq is not the room's previous seq + 1."""


@events.init_command_line_parser.add_listener  # type: ignore[untyped-decorator]
def _options(parser: LocustArgumentParser) -> None:
    parser.add_argument(
        "--jwt-secret",
        env_var="JWT_SECRET",
        default="bench-secret-for-loopback-load-tests",
        help="HS256 secret of the server",
    )
    parser.add_argument("--rooms", type=int, default=10, help="users are spread over N rooms")
    parser.add_argument("--payload-bytes", type=int, default=64)
    parser.add_argument(
        "--publish-every", type=float, default=1.0, help="mean seconds between a user's publishes"
    )
    parser.add_argument(
        "--spread-hosts",
        default="",
        help="comma list of ws:// roots that users alternate over (a cluster); default: --host",
    )


def _ws_root(host: str) -> str:
    """``host`` as ``ws://127.x.x.x:port``; anything off the loopback is refused."""
    parts = urlsplit(host)
    if parts.scheme not in ("ws", "http") or not ipaddress.ip_address(parts.hostname or "").is_loopback:
        raise ValueError(f"--host {host}: only ws://127.x.x.x targets are allowed")
    return f"ws://{parts.netloc}"


class RtcUser(User):
    """One socket: joins a room, publishes, checks and times every delivery."""

    def wait_time(self) -> float:
        """About ``--publish-every`` seconds, jittered so users do not publish in step."""
        return float(self.environment.parsed_options.publish_every) * random.uniform(0.5, 1.5)

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        number = next(_users)
        roots = [r for r in opts.spread_hosts.split(",") if r] or [self.host or ""]
        self.user_id = f"locust-{os.getpid()}-{number}"
        self.room = f"locust-{number % max(opts.rooms, 1)}"
        self.pad = "x" * opts.payload_bytes
        self.ids = itertools.count(1)
        self.pending: dict[int, float] = {}
        token = jwt.encode({"sub": self.user_id, "exp": int(time.time()) + 3600}, opts.jwt_secret, "HS256")
        started = time.perf_counter()
        self.ws = websocket.create_connection(
            f"{_ws_root(roots[number % len(roots)])}/ws?token={quote(token)}", timeout=10
        )
        self._await("welcome")
        self.ws.send(json.dumps({"type": "join", "room": self.room}))
        self.last_seq = int(self._await("joined")["seq"])
        self._fire("connect", (time.perf_counter() - started) * 1000.0, 0)
        self.ws.settimeout(None)
        self.reader = gevent.spawn(self._read)

    def on_stop(self) -> None:
        self.ws.close()
        self.reader.kill(block=True, timeout=5)

    def _await(self, kind: str) -> dict[str, Any]:
        """Frames until one of type ``kind``; the socket's timeout bounds each read."""
        while True:
            msg: dict[str, Any] = json.loads(self.ws.recv())
            if msg.get("type") == kind:
                return msg
            if msg.get("type") == "error":
                raise RuntimeError(f"{kind}: {msg}")

    def _fire(self, name: str, ms: float, length: int, exc: Exception | None = None) -> None:
        self.environment.events.request.fire(
            request_type="WS", name=name, response_time=ms, response_length=length, exception=exc, context={}
        )

    @task
    def publish(self) -> None:
        """One message to the user's room, timed until its ack."""
        msg_id = next(self.ids)
        self.pending[msg_id] = time.perf_counter()
        data = {"t": time.time() * 1000.0, "pad": self.pad}
        self.ws.send(json.dumps({"type": "publish", "room": self.room, "id": msg_id, "data": data}))

    def _read(self) -> None:
        """Until the socket closes: time deliveries, check seqs, match acks."""
        while True:
            try:
                text = self.ws.recv()
            except (websocket.WebSocketException, OSError):
                return
            if not text:  # closed
                return
            msg = json.loads(text)
            kind = msg.get("type")
            if kind == "message":
                seq, expected = int(msg["seq"]), self.last_seq + 1
                self.last_seq = max(self.last_seq, seq)
                error = SeqError(f"seq {seq}, expected {expected}") if seq != expected else None
                latency = max(time.time() * 1000.0 - msg["ts"], 0.0)
                self._fire("deliver", latency, len(text), error)
            elif kind == "ack" and msg.get("id") in self.pending:
                sent = self.pending.pop(msg["id"])
                self._fire("publish", (time.perf_counter() - sent) * 1000.0, len(text))
            elif kind == "error":
                sent = self.pending.pop(msg.get("id"), time.perf_counter())
                failure = RuntimeError(msg.get("code"))
                self._fire("publish", (time.perf_counter() - sent) * 1000.0, len(text), failure)
