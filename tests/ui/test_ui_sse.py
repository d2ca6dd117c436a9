"""The browser UI where the WebSocket cannot go: behind a proxy that refuses the upgrade (as
some corporate proxies do) the page falls back to Server-Sent Events plus REST, and with
`?transport=sse` it uses them from the start. Real Chromium, a real `parley serve`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.async_api import BrowserContext, Page

from tests.helpers.auth import mint, new_user
from tests.helpers.browser import (
    BrowserTab,
    open_signed_in,
    open_tab,
    reload_mid_reply,
    settled_reply,
)
from tests.helpers.faults import Proxy
from tests.helpers.processes import Cluster, Db, ParleyProcess, redis_db

pytestmark = pytest.mark.ui


@pytest.fixture
def no_websocket(parley: ParleyProcess) -> Iterator[Proxy]:
    """The shared server behind a proxy that answers every WebSocket upgrade with 403."""
    with Proxy.to_url(parley.url, refuse_upgrades=True) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def short_streams(cluster: Cluster) -> ParleyProcess:
    """A server that ends every SSE response after 1.5 s (`server.sse_max_lifetime`)."""
    return cluster.process(
        "serve",
        REDIS_URL=redis_db(cluster.services.redis_url, Db.UI_SHORT_STREAMS),
        PARLEY_SERVER_SSE_MAX_LIFETIME="1.5",
    )


def sockets_of(page: Page) -> list[str]:
    """The WebSockets the page opens from now on (their URLs)."""
    opened: list[str] = []
    page.on("websocket", lambda ws: opened.append(ws.url))
    return opened


def stream_requests(page: Page) -> list[str]:
    """The URLs of the SSE streams the page requests from now on."""
    urls: list[str] = []
    page.on(
        "request", lambda request: urls.append(request.url) if "/events" in request.url else None
    )
    return urls


async def on_sse(tab: BrowserTab) -> None:
    await tab.page.wait_for_selector(
        "#status[data-state=online][data-transport=sse]", timeout=15_000
    )


async def test_refused_websocket_falls_back_to_sse_for_the_whole_chat(
    context: BrowserContext, parley: ParleyProcess, no_websocket: Proxy
) -> None:
    user = new_user()
    base = no_websocket.url(parley.url)
    first = await open_tab(context, parley, base=base)  # on the sign-in page: no socket yet
    first_sockets = sockets_of(first.page)
    streams = stream_requests(first.page)
    token = mint(user)
    await open_tab(context, parley, token=token, base=base, tab=first)
    await on_sse(first)
    assert no_websocket.upgrades_refused >= 2, "the page never tried the WebSocket"
    assert first_sockets, "the page never tried the WebSocket"
    second = await open_tab(context, parley, user, base=base)
    await on_sse(second)

    # the live list: the other tab learns of a new conversation from GET /api/events
    conversation = await first.new_conversation()
    link = second.page.locator(f'.conv[data-id="{conversation}"]')
    await link.wait_for()
    await link.click()
    await second.page.wait_for_selector("#welcome:visible")

    # sending (POST …/messages) and the streamed reply, in both tabs
    await first.send("[sim:tps=12] [sim:tokens=48] Hello over server-sent events")
    streaming = first.page.locator(".msg-assistant[data-status=streaming]")
    await streaming.wait_for()
    message_id = await streaming.get_attribute("data-id")
    assert message_id
    lengths = await first.lengths_until_settled(message_id)
    assert len(set(lengths)) >= 4, f"the reply did not stream token by token: {lengths}"
    reply = await settled_reply(parley, user, conversation)
    assert reply["id"] == message_id and reply["status"] == "complete"
    for tab in (first, second):
        await tab.wait_replies(1)
        assert await tab.raw(reply["id"]) == reply["content"]
        assert await tab.page.locator(".msg-user").count() == 1

    # stop (POST …/cancel) in one tab stops the reply in both
    await first.send("[sim:tps=15] [sim:tokens=300] Talk for a long time")
    for tab in (first, second):
        await tab.page.locator(".msg-assistant[data-status=streaming]").wait_for()
    await second.click("#stop")
    for tab in (first, second):
        stopped = tab.page.locator(".msg-assistant[data-status=cancelled] .msg-status")
        await stopped.wait_for(timeout=5000)
    cancelled = await settled_reply(parley, user, conversation, 2)
    assert cancelled["status"] == "cancelled"
    for tab in (first, second):
        assert await tab.raw(cancelled["id"]) == cancelled["content"]

    # too long for the server: the REST refusal (413) is said like the socket's error
    await first.page.fill("#input", "x" * 32_001)
    await first.page.press("#input", "Enter")
    await first.notice("That message is too long")
    assert no_websocket.upgrades_refused >= 2
    # every stream (the list's and the conversation's) opened with a ticket, never the JWT
    assert any("/api/events" in url for url in streams), streams
    assert any(f"/api/conversations/{conversation}/events" in url for url in streams), streams
    for url in streams:
        assert "ticket=" in url and token not in url and "token=" not in url, url
    for tab in (first, second):
        tab.check()


async def test_a_reload_mid_reply_behind_the_refusing_proxy_falls_back_and_resumes_exactly(
    context: BrowserContext, parley: ParleyProcess, no_websocket: Proxy
) -> None:
    """With every WebSocket upgrade refused, a reload mid-reply tries the socket again,
    falls back to SSE again and shows the rest of the reply: exactly what was persisted."""
    user = new_user()
    tab = await open_tab(context, parley, user, base=no_websocket.url(parley.url))
    await on_sse(tab)
    refused = no_websocket.upgrades_refused
    await reload_mid_reply(tab, parley, user, lambda: on_sse(tab), tps=8)
    assert no_websocket.upgrades_refused >= refused + 2, "the reloaded page never tried a socket"
    tab.check()


async def test_forced_sse_resumes_exactly_after_a_reload_mid_reply(
    context: BrowserContext, parley: ParleyProcess
) -> None:
    user = new_user()
    tab = await open_tab(context, parley, query="transport=sse")  # on the sign-in page
    opened = sockets_of(tab.page)
    await open_tab(context, parley, token=mint(user), query="transport=sse", tab=tab)
    await on_sse(tab)
    # slower than over a socket: after a reload, two tickets and two streams come first
    await reload_mid_reply(tab, parley, user, lambda: on_sse(tab), tps=8)
    assert "transport=sse" in tab.page.url
    assert opened == [], f"?transport=sse opened a WebSocket: {opened}"
    tab.check()


async def test_streams_the_server_ends_mid_reply_resume_exactly(
    context: BrowserContext, short_streams: ParleyProcess
) -> None:
    """Every response ends after 1.5 s: the page opens each stream again with a new ticket
    and `?after=`, quietly (no reconnection banner), and the reply ends as persisted."""
    user, tab = await open_signed_in(context, short_streams, query="transport=sse")
    await on_sse(tab)
    page = tab.page
    conversation = await tab.new_conversation()
    await tab.send("[sim:tps=20] [sim:tokens=90] Tell me a long story")
    streaming = page.locator(".msg-assistant[data-status=streaming]")
    await streaming.wait_for()
    message_id = await streaming.get_attribute("data-id")
    assert message_id
    shown = await tab.lengths_until_settled(message_id)
    reply = await settled_reply(short_streams, user, conversation)
    assert reply["id"] == message_id and reply["status"] == "complete"
    assert shown == sorted(shown), f"the shown reply shrank: {shown}"
    assert await tab.raw(message_id) == reply["content"]
    assert await page.locator(".msg-assistant").count() == 1
    # the list's stream came back too: a conversation made elsewhere shows up
    other = await open_tab(context, short_streams, user, query="transport=sse")
    await on_sse(other)
    made = await other.new_conversation()
    await page.locator(f'.conv[data-id="{made}"]').wait_for(timeout=10_000)
    assert await page.locator("#banner").is_hidden(), "a server-ended stream is no outage"
    assert await page.locator("#status").get_attribute("data-state") == "online"
    for t in (tab, other):
        t.check()
