"""The demo and dashboard pages in a real browser (Playwright with Debian's chromium).

Two real hosts of one cluster (``rtc serve --demo``, one Redis) serve ``/demo``: a
message typed on one host's page appears on the other's, and both pages list both users.
``#reconnect`` resumes the session: what was published while the page was away is
replayed, each seq once. A host's ``/dashboard`` follows its ``active_connections`` as
WebSocket clients come and go. Screenshots land in ``tests/artifacts/`` (git-ignored);
their paths are printed. A missing playwright or chromium fails the run, never skips it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

try:
    from playwright.async_api import (
        Browser,
        ConsoleMessage,
        Page,
        WebSocketRoute,
        async_playwright,
        expect,
    )
except ImportError as exc:  # a missing browser stack fails the run, it is never skipped
    raise ImportError(
        "playwright is not installed: pip install -e '.[dev]' (the dev extra needs playwright)"
    ) from exc

from tests.rtcproc import hosts, settle_ring, start_redis, until

ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Presence and fan-out cross Redis and two hosts: allow more than Playwright's 5 s default.
expect.set_options(timeout=15_000)


@pytest.fixture(scope="module")
def two_hosts() -> Iterator[list[str]]:
    """Base URLs of two real rtc hosts of one cluster (``rtc serve --demo``, node ids
    ``a`` and ``b``, two workers each, one shared Redis), stopped afterwards."""
    redis = start_redis()
    try:
        with hosts(("a", redis.url), ("b", redis.url), args=("--demo",)) as started:
            settle_ring(started)
            yield [host.http for host in started]
    finally:
        redis.stop()


@pytest.fixture
def admin_token() -> str | None:
    """Token for /dashboard; None relies on the loopback exemption (no proxy headers)."""
    return os.environ.get("RTC_BROWSER_ADMIN_TOKEN") or None


def chromium_path() -> str:
    path = os.environ.get("RTC_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path:
        return path
    pytest.fail("no chromium on PATH (apt-get install chromium, or set RTC_CHROMIUM)")


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    executable = chromium_path()
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


class PageErrors:
    """Collects uncaught exceptions and console errors of the pages it watches."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def watch(self, page: Page, name: str) -> Page:
        page.on("pageerror", lambda exc: self.errors.append(f"{name}: {exc}"))

        def console(msg: ConsoleMessage) -> None:
            if msg.type == "error":
                self.errors.append(f"{name}: console: {msg.text}")

        page.on("console", console)
        return page


async def screenshot(page: Page, artifacts: Path, name: str) -> Path:
    path = artifacts / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


async def test_demo_chat_between_two_hosts(two_hosts: list[str], browser: Browser, artifacts: Path) -> None:
    room = f"demo.browser-{uuid.uuid4().hex[:8]}"
    errors = PageErrors()
    context = await browser.new_context(viewport={"width": 1200, "height": 760})
    try:
        alice = errors.watch(await context.new_page(), "alice")
        bob = errors.watch(await context.new_page(), "bob")

        await alice.goto(f"{two_hosts[0]}/demo?name=alice&room={room}&autoconnect=1")
        await expect(alice.locator("#status")).to_have_attribute("data-state", "open")
        await expect(alice.locator("#status")).to_contain_text("connected")
        await expect(alice.locator("#members .member")).to_have_text(["alice"])

        await bob.goto(f"{two_hosts[1]}/demo?name=bob&room={room}&autoconnect=1")
        await expect(bob.locator("#status")).to_have_attribute("data-state", "open")
        await expect(bob.locator("#status")).to_contain_text("connected")

        # Presence: bob from the members reply; alice from bob's presence join event.
        for page in (alice, bob):
            await expect(page.locator("#members .member")).to_have_text(["alice", "bob"])
        node_a = await alice.locator("#s-node").inner_text()
        node_b = await bob.locator("#s-node").inner_text()
        assert node_a != node_b, f"both pages reached node {node_a!r}: the hosts are not distinct"

        hello = f"hello bob, this is alice on {node_a} ({uuid.uuid4().hex[:6]})"
        await alice.locator("#message").fill(hello)
        await alice.locator("#send").click()
        await expect(bob.locator("#messages .msg").filter(has_text=hello)).to_have_count(1)
        await expect(alice.locator("#messages .msg").filter(has_text=hello)).to_have_count(1)

        reply = f"hi alice, bob here on {node_b} ({uuid.uuid4().hex[:6]})"
        await bob.locator("#message").fill(reply)
        await bob.locator("#message").press("Enter")
        await expect(alice.locator("#messages .msg").filter(has_text=reply)).to_have_count(1)

        # Both pages saw the same two messages in the same order, with the same seqs.
        seqs_a = await alice.locator("#messages .msg").evaluate_all("els => els.map(e => e.dataset.seq)")
        seqs_b = await bob.locator("#messages .msg").evaluate_all("els => els.map(e => e.dataset.seq)")
        assert seqs_a == seqs_b and len(seqs_a) == 2, (seqs_a, seqs_b)

        await screenshot(alice, artifacts, "demo-alice")
        await screenshot(bob, artifacts, "demo-bob")
        assert not errors.errors, errors.errors
    finally:
        await context.close()


async def open_demo(page: Page, base: str, name: str, room: str) -> None:
    await page.goto(f"{base}/demo?name={name}&room={room}&autoconnect=1")
    await expect(page.locator("#status")).to_have_attribute("data-state", "open")
    await expect(page.locator("#s-seq")).not_to_have_text("—")  # joined


async def say(page: Page, text: str) -> None:
    await page.locator("#message").fill(text)
    await page.locator("#send").click()


async def rendered_seqs(page: Page) -> list[int]:
    seqs: list[str] = await page.locator("#messages .msg").evaluate_all("els => els.map(e => e.dataset.seq)")
    return [int(s) for s in seqs]


async def test_demo_reconnect_resumes_without_loss(
    two_hosts: list[str], browser: Browser, artifacts: Path
) -> None:
    """``#reconnect`` closes the socket and reconnects with ``?session=``. The new socket
    is held back (routed through Playwright) while the other host's user publishes; once
    it reaches the server the session is resumed and exactly the missed messages are
    replayed: every seq once, in order, none lost, none rendered twice."""
    room = f"demo.resume-{uuid.uuid4().hex[:8]}"
    errors = PageErrors()
    context = await browser.new_context(viewport={"width": 1200, "height": 760})
    try:
        carol = errors.watch(await context.new_page(), "carol")
        dave = errors.watch(await context.new_page(), "dave")
        await open_demo(carol, two_hosts[0], "carol", room)
        await open_demo(dave, two_hosts[1], "dave", room)
        for page in (carol, dave):
            await expect(page.locator("#members .member")).to_have_text(["carol", "dave"])
        session = await carol.evaluate("window.rtcDemo.state.session")

        before = [f"before reconnect {i} ({uuid.uuid4().hex[:6]})" for i in range(2)]
        for text in before:
            await say(dave, text)
        for text in before:
            await expect(carol.locator("#messages .msg").filter(has_text=text)).to_have_count(1)
        assert await rendered_seqs(carol) == [1, 2]

        # From now on carol's new sockets wait for `release` before reaching the server.
        requested = asyncio.Event()
        release = asyncio.Event()
        routed: list[str] = []

        async def hold(ws: WebSocketRoute) -> None:
            routed.append(ws.url)
            requested.set()
            await release.wait()
            ws.connect_to_server()

        await carol.route_web_socket(lambda url: "/ws?" in url, hold)
        await carol.locator("#reconnect").click()
        await asyncio.wait_for(requested.wait(), 10)  # the old socket is closed
        assert len(routed) == 1 and f"session={session}" in routed[0], routed
        await expect(carol.locator("#status")).not_to_have_attribute("data-state", "open")

        missed = [f"while carol reconnects {i} ({uuid.uuid4().hex[:6]})" for i in range(3)]
        for text in missed:
            await say(dave, text)
        await expect(dave.locator("#s-seq")).to_have_text("5")
        assert await carol.locator("#messages .msg").count() == 2  # nothing arrived yet

        release.set()
        await expect(carol.locator("#status")).to_have_attribute("data-state", "open")
        await expect(carol.locator("#s-resumed")).to_have_text("yes")
        await expect(carol.locator("#s-recovered")).to_have_text("yes")
        assert await carol.evaluate("window.rtcDemo.state.session") == session
        for text in missed:
            await expect(carol.locator("#messages .msg.replayed").filter(has_text=text)).to_have_count(1)
        await expect(carol.locator("#s-seq")).to_have_text("5")

        # Live delivery goes on after the resume, both ways.
        after = f"carol is back ({uuid.uuid4().hex[:6]})"
        await say(carol, after)
        for page in (carol, dave):
            await expect(page.locator("#messages .msg").filter(has_text=after)).to_have_count(1)
        assert await rendered_seqs(carol) == [1, 2, 3, 4, 5, 6]
        assert await rendered_seqs(dave) == [1, 2, 3, 4, 5, 6]
        # A resume is not a leave: dave still lists carol, and saw no leave event.
        await expect(dave.locator("#members .member")).to_have_text(["carol", "dave"])
        assert await dave.locator("#messages .note").filter(has_text="carol left.").count() == 0
        assert len(routed) == 1, routed  # one reconnect, no retry loop

        await screenshot(carol, artifacts, "demo-resumed-carol")
        await screenshot(dave, artifacts, "demo-resumed-dave")
        assert not errors.errors, errors.errors
    finally:
        await context.close()


async def connect_clients(
    session: aiohttp.ClientSession, base: str, n: int
) -> list[aiohttp.ClientWebSocketResponse]:
    ws_base = "ws" + base.removeprefix("http")
    clients = []
    for i in range(n):
        async with session.post(f"{base}/demo/token", json={"user": f"dash-{i}"}) as resp:
            assert resp.status == 200, await resp.text()
            token = (await resp.json())["token"]
        ws = await session.ws_connect(f"{ws_base}/ws?token={token}")
        clients.append(ws)
        welcome: dict[str, Any] = await ws.receive_json(timeout=10)
        assert welcome["type"] == "welcome", welcome
    return clients


async def shown_connections(page: Page, session: aiohttp.ClientSession, base: str) -> int:
    """The dashboard's active connections once they are the host's own count (the page
    updates on its own schedule, and what an earlier test left may still be closing)."""

    async def agreed() -> tuple[int] | None:
        async with session.get(f"{base}/metrics") as resp:
            actual = int((await resp.json())["active_connections"])
        shown = (await page.locator("#active-connections").inner_text()).strip()
        return (actual,) if shown == str(actual) else None

    (count,) = await until(agreed, 30, "the dashboard to show the host's active connections", 0.2)
    return count


async def wait_number(page: Page, selector: str, predicate: str, n: int) -> None:
    await page.wait_for_function(
        "([sel, n]) => { const v = Number(document.querySelector(sel).textContent); "
        f"return v {predicate} n; }}",
        arg=[selector, n],
        timeout=15_000,
    )


async def test_dashboard_follows_connections(
    two_hosts: list[str], admin_token: str | None, browser: Browser, artifacts: Path
) -> None:
    base = two_hosts[0]
    errors = PageErrors()
    page = errors.watch(await browser.new_page(viewport={"width": 1200, "height": 800}), "dashboard")
    query = f"?token={admin_token}" if admin_token else ""
    resp = await page.goto(f"{base}/dashboard{query}")
    assert resp is not None and resp.status == 200, resp and resp.status

    await expect(page.locator("#workers .worker").first).to_be_visible()
    await expect(page.locator("#ring .slot").first).to_be_visible()
    extra = 3
    async with aiohttp.ClientSession() as session:
        before = await shown_connections(page, session, base)
        total_before = int(await page.locator("#total-connections").inner_text())
        clients = await connect_clients(session, base, extra)
        try:
            await expect(page.locator("#active-connections")).to_have_text(str(before + extra))
            await wait_number(page, "#total-connections", ">=", total_before + extra)
            await screenshot(page, artifacts, "dashboard-connected")
        finally:
            for ws in clients:
                await ws.close()
    await expect(page.locator("#active-connections")).to_have_text(str(before))
    await screenshot(page, artifacts, "dashboard-after")
    try:
        assert not errors.errors, errors.errors
    finally:
        await page.close()
