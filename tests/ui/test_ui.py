"""The browser chat UI in real Chromium against real `parley serve` processes.

The shared server has development sign-in off (its Redis and PostgreSQL are configured), so
these pages are opened with a token in `?token=`; the tests that need development sign-in
start their own server with it on.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, BrowserContext

from tests.helpers.auth import mint, new_user
from tests.helpers.browser import (
    PHONE,
    WIDE,
    BrowserTab,
    new_tab,
    open_signed_in,
    open_tab,
    reload_mid_reply,
    settled_reply,
)
from tests.helpers.processes import Cluster, Db, ParleyProcess, redis_db

pytestmark = pytest.mark.ui

# The simulated model's reply to this first turn has a list and a Python code block.
CODE_PROMPT = "Explain WebSockets in two short paragraphs [sim:tokens=80]"


async def assert_shows(tab: BrowserTab, reply: dict[str, Any]) -> None:
    """The tab holds exactly the persisted text and shows it rendered."""
    assert await tab.raw(reply["id"]) == reply["content"]
    assert await tab.shown(reply["id"]) == await tab.rendered(reply["content"])


async def test_sign_in_send_and_stream(
    context: BrowserContext, parley: ParleyProcess, artifacts: Path
) -> None:
    user, tab = await open_signed_in(context, parley)
    page = tab.page
    assert "token=" not in page.url, "the token must leave the address bar"
    assert await page.evaluate("sessionStorage.getItem('parley.token')")
    assert await page.locator("#sim-badge").is_visible()
    assert await page.locator("#user-name").inner_text() == user
    assert await page.evaluate("window.parley") is None, "the page keeps its state off window"

    conversation = await tab.new_conversation()
    await tab.send(CODE_PROMPT)
    await page.locator(".msg-user .msg-content").get_by_text("Explain WebSockets").wait_for()
    await tab.wait_replies(1)
    assert await page.locator("#input").input_value() == ""
    reply = await settled_reply(parley, user, conversation)
    await assert_shows(tab, reply)
    # Markdown: this simulated reply has a list and a highlighted code block with a copy button
    code = page.locator(".msg-assistant .code-block")
    await code.first.wait_for()
    await code.locator("code.language-python .hljs-keyword").first.wait_for()
    await code.locator("[data-copy-code]").first.click()
    # the label turns "Copied" once the clipboard write resolves, and back 1.5 s later
    await code.locator("[data-copy-code]", has_text="Copied").first.wait_for(timeout=5000)
    assert await page.locator(".msg-assistant li").count() >= 2
    # the sidebar lists it under a title taken from the first turn
    item = page.locator(f'.conv[data-id="{conversation}"]')
    await item.get_by_text("Explain WebSockets").wait_for()

    # a slower reply streams in: its text grows while it is being generated
    await tab.send("[sim:tps=40] [sim:tokens=40] Now a reply to watch streaming")
    await page.locator(".msg-assistant[data-status=streaming]").wait_for()
    assert await page.locator("#stop").is_visible()
    lengths: set[int] = set()
    while True:
        status, chars = await page.evaluate(
            """() => { const m = [...document.querySelectorAll('.msg-assistant')].at(-1);
                       return [m.dataset.status, Number(m.dataset.chars)] }"""
        )
        lengths.add(chars)
        if status != "streaming":
            break
        await asyncio.sleep(0.03)
    assert status == "complete"
    assert len(lengths) >= 4, f"the reply did not stream token by token: {sorted(lengths)}"
    await assert_shows(tab, await settled_reply(parley, user, conversation, 2))
    assert await page.locator("#send").is_visible()
    # Shift+Enter makes a new line, it does not send
    await page.fill("#input", "one")
    await page.press("#input", "Shift+Enter")
    await page.keyboard.type("two")
    assert await page.locator("#input").input_value() == "one\ntwo"
    await page.fill("#input", "")
    await page.screenshot(path=str(artifacts / "chat-wide.png"))
    tab.check()

    # a token the server refuses (4401): back to the sign-in page, saying why
    refused = await open_tab(
        context, parley, token=mint(user, secret="not-the-server-secret-0123456789abcdef")
    )
    await refused.page.locator("#signin-error").get_by_text("sign in again").wait_for()
    assert await refused.page.locator("#token-form").is_visible()
    assert await refused.page.evaluate("sessionStorage.getItem('parley.token')") is None
    refused.check()


async def test_two_tabs_see_the_same_reply(context: BrowserContext, parley: ParleyProcess) -> None:
    user, first = await open_signed_in(context, parley)
    second = await open_tab(context, parley, user)
    conversation = await first.new_conversation()
    # the other tab learns about the new conversation from `conversation_changed`
    link = second.page.locator(f'.conv[data-id="{conversation}"]')
    await link.wait_for()
    await link.click()
    await second.page.wait_for_selector("#welcome:visible")

    await first.send("[sim:tps=80] [sim:tokens=40] Hello from the first tab")
    for tab in (first, second):
        await tab.page.locator(".msg-user").get_by_text("Hello from the first tab").wait_for()
        await tab.wait_replies(1)
    reply = await settled_reply(parley, user, conversation)
    for tab in (first, second):
        await assert_shows(tab, reply)

    # a rename in one tab shows in the other; so does a delete
    await first.click("#rename")
    await first.page.fill("#rename-title", "Renamed in the first tab")
    await first.page.press("#rename-title", "Enter")
    await second.page.locator("#title").get_by_text("Renamed in the first tab").wait_for()
    await link.get_by_text("Renamed in the first tab").wait_for()
    await first.click("#delete")
    await first.click("#delete-form button[value=delete]")
    await link.wait_for(state="detached")
    await second.notice("This conversation was deleted.")
    assert second.page.url.endswith("#/")
    for tab in (first, second):
        tab.check()


async def test_reload_mid_reply_continues_without_gap_or_repeat(
    context: BrowserContext, parley: ParleyProcess
) -> None:
    user, tab = await open_signed_in(context, parley)
    await reload_mid_reply(tab, parley, user, tab.signed_in)
    tab.check()


async def test_stop_in_one_tab_stops_the_reply_in_both(
    context: BrowserContext, parley: ParleyProcess
) -> None:
    user, first = await open_signed_in(context, parley)
    conversation = await first.new_conversation()
    second = await open_tab(context, parley, user, conversation)
    await first.send("[sim:tps=15] [sim:tokens=200] Talk for a long time")
    for tab in (first, second):
        await tab.page.locator(".msg-assistant[data-status=streaming]").wait_for()
    # a second turn while the reply is being written is not sent, and the page says why
    await first.send("Another question")
    await first.notice("A reply is still being written")
    assert await first.page.locator(".msg-user").count() == 1
    await second.click("#stop")
    for tab in (first, second):
        stopped = tab.page.locator(".msg-assistant[data-status=cancelled] .msg-status")
        await stopped.wait_for(timeout=5000)
        assert await stopped.inner_text() == "Stopped"
        assert await tab.page.locator("#send").is_visible()
    reply = await settled_reply(parley, user, conversation)
    assert reply["status"] == "cancelled"
    # too long for the server: said at once, with the limit
    await first.page.fill("#input", "x" * 32_001)
    assert "32,001 / 32,000" in await first.page.locator("#count").inner_text()
    await first.page.press("#input", "Enter")
    await first.notice("That message is too long")
    await first.page.fill("#input", "")
    await assert_shows(first, reply)
    # Regenerate on the last reply writes it again in place of the old one; Esc stops it
    await first.click(".msg-assistant.is-last [data-action=regenerate]")
    for tab in (first, second):
        again = tab.page.locator(".msg-assistant[data-status=streaming]")
        await again.wait_for()
        assert await again.get_attribute("data-id") != reply["id"]
        assert await tab.page.locator(".msg-assistant").count() == 1
    await first.page.bring_to_front()
    await first.page.focus("#input")
    await first.page.keyboard.press("Escape")
    for tab in (first, second):
        await tab.page.locator(".msg-assistant[data-status=cancelled]").wait_for(timeout=5000)
    first.check()
    second.check()


XSS = (
    "<script>window.__xss = 'script'</script> "
    "<img src=x onerror=\"window.__xss = 'img'\"> "
    "[click me](javascript:window.__xss='link') "
    "<a href=\"javascript:window.__xss='a'\">and me</a> "
    "<svg onload=\"window.__xss='svg'\"></svg> "
    "<iframe src=\"javascript:parent.__xss='iframe'\"></iframe> "
    "<script>alert('xss')</script>"
)


async def test_html_in_turns_and_replies_is_shown_as_text(
    context: BrowserContext, parley: ParleyProcess
) -> None:
    user, tab = await open_signed_in(context, parley)
    page = tab.page
    conversation = await tab.new_conversation()

    # a user turn: shown as text, in this tab and in another one
    await tab.send(f"[sim:tokens=5] {XSS}")
    await tab.wait_replies(1)
    other = await open_tab(context, parley, user, conversation)
    await other.wait_replies(1)
    for t in (tab, other):
        bubble = t.page.locator(".msg-user .msg-content")
        assert "<script>window.__xss = 'script'</script>" in await bubble.inner_text()
        assert await bubble.locator("script, img, a, svg, iframe").count() == 0

    # a reply: fed through the page's real event path as if the model had written it
    await page.evaluate(
        """async (payload) => {
            const { store } = await import("/store.js");
            const t = store.transcript(location.hash.slice(4));
            const id = crypto.randomUUID();
            let seq = t.lastSeq;
            const c = t.id;
            const frames = [
                { type: "start", conversation: c, seq: ++seq, message_id: id, model: "evil" },
                { type: "token", conversation: c, seq: ++seq, message_id: id, text: payload },
                { type: "token", conversation: c, seq: ++seq, message_id: id,
                  text: "\\n\\n<img src=x onerror=\\"window.__xss='block'\\">\\n" },
                { type: "done", conversation: c, seq: ++seq, message_id: id, reason: "stop" },
            ];
            for (const frame of frames) {
                store.connection.dispatchEvent(new CustomEvent("frame", { detail: { frame } }));
            }
        }""",
        XSS,
    )
    reply = page.locator('.msg-assistant:has-text("click me") .msg-content')
    await reply.wait_for()
    text = await reply.inner_text()
    assert "<script>window.__xss = 'script'</script>" in text
    assert "<img src=x onerror=\"window.__xss='block'\">" in text
    assert await reply.locator("script, img, svg, iframe, [onerror], [onload]").count() == 0
    assert await reply.locator("a[href^='javascript']").count() == 0
    for link in await reply.locator("a").all():
        await link.click()
    await page.wait_for_timeout(300)
    for t in (tab, other):
        assert await t.page.evaluate("window.__xss") is None, "a payload ran"
        t.check()


async def watch_joins(tab: BrowserTab) -> list[str]:
    """The frames the page sends on sockets it opens from now on."""
    sent: list[str] = []
    tab.page.on("websocket", lambda ws: ws.on("framesent", lambda data: sent.append(str(data))))
    return sent


async def rejoined(sent: list[str], after: int) -> None:
    deadline = time.monotonic() + 5
    wanted = f'"after":{after}'
    while not any('"type":"join"' in frame and wanted in frame for frame in sent):
        assert time.monotonic() < deadline, f"no join with {wanted}: {sent}"
        await asyncio.sleep(0.05)


# The page's store, imported as its modules import it (see Tab.raw).
HELD = """async () => {
    const { store } = await import("/store.js");
    return store.activeTranscript().lastSeq;
}"""
GAP = """async () => {
    const { store } = await import("/store.js");
    const t = store.activeTranscript();
    const frame = { type: "token", conversation: t.id, seq: t.lastSeq + 2,
                    message_id: crypto.randomUUID(), text: "from further on" };
    store.connection.dispatchEvent(new CustomEvent("frame", { detail: { frame } }));
}"""
# For wait_for_function, whose predicate cannot await: the test (not the page) keeps the
# imported store on `window.parleyStore`.
HOLD_STORE = """async () => { window.parleyStore = (await import("/store.js")).store; }"""


async def test_network_loss_then_rejoin_with_after(
    context: BrowserContext, parley: ParleyProcess
) -> None:
    user, tab = await open_signed_in(context, parley)
    page = tab.page
    await tab.send("[sim:tokens=10] Before the network goes")
    conversation = await tab.conversation_id()
    await tab.wait_replies(1)
    sent = await watch_joins(tab)

    # the network goes: the page finds out (a ping goes unanswered) and says so
    await context.set_offline(True)
    await page.wait_for_selector("#status[data-state=offline]", timeout=10_000)
    assert "offline" in await page.locator("#banner").inner_text()
    last = await page.evaluate(HELD)
    await context.set_offline(False)
    await tab.signed_in()
    await rejoined(sent, last)

    await tab.send("[sim:tokens=10] After the network is back")
    await tab.wait_replies(2)
    await assert_shows(tab, await settled_reply(parley, user, conversation, 2))

    # a gap in seq (an event from further on): the page rejoins with after = what it holds
    held = await page.evaluate(HELD)
    sent.clear()
    await page.evaluate(GAP)
    await rejoined(sent, held)
    assert await page.evaluate(HELD) == held
    assert "from further on" not in await page.locator("#messages").inner_text()
    tab.check()


async def test_chat_goes_on_after_a_gap_rejoin(
    context: BrowserContext, parley: ParleyProcess
) -> None:
    _, tab = await open_signed_in(context, parley)
    await tab.send("[sim:tokens=5] One")
    await tab.wait_replies(1)
    await tab.page.evaluate(HOLD_STORE)
    await tab.page.evaluate(GAP)
    await tab.page.wait_for_function("window.parleyStore.activeTranscript().joined === 'yes'")
    await tab.send("[sim:tokens=5] Two")
    await tab.wait_replies(2, timeout=1000)


@pytest.fixture(scope="module", autouse=True)
def dev_server_starting(cluster: Cluster) -> ParleyProcess:
    """A server of its own with development sign-in on (the restart test restarts it),
    started with the module so that it is up by the time its tests come."""
    server = cluster.process(
        "serve",
        start=False,
        PARLEY_AUTH_DEV_LOGIN="true",
        REDIS_URL=redis_db(cluster.services.redis_url, Db.DEV_LOGIN_UI),
    )
    return server.start(wait=False)


@pytest.fixture
def dev_server(dev_server_starting: ParleyProcess) -> ParleyProcess:
    dev_server_starting.wait_ready()
    return dev_server_starting


async def test_dev_token_is_renewed_before_it_expires(
    context: BrowserContext, dev_server: ParleyProcess
) -> None:
    """With development sign-in the page renews a token near its end and extends the
    socket's session with an `auth` frame, without reconnecting."""
    user = new_user()
    tab = await new_tab(context)
    page = tab.page
    sockets: list[str] = []
    sent: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    page.on("websocket", lambda ws: ws.on("framesent", lambda data: sent.append(str(data))))
    short = mint(user, ttl=5)
    await open_tab(context, dev_server, token=short, tab=tab)
    await tab.signed_in()
    await page.wait_for_function(
        "(old) => sessionStorage.getItem('parley.token') !== old", arg=short, timeout=10_000
    )
    deadline = time.monotonic() + 5
    while not any('"type":"auth"' in frame for frame in sent):
        assert time.monotonic() < deadline, f"no auth frame sent: {sent}"
        await asyncio.sleep(0.05)
    assert not any(short in frame for frame in sent), "the old token went in a frame"
    assert all("token" not in url for url in sockets), "a token went in the socket URL"
    assert len(sockets) == 1, "the page reconnected instead of extending its session"
    assert await page.locator("#status").get_attribute("data-state") == "online"
    tab.check()
    await page.close()


async def test_reconnects_after_a_server_restart(
    context: BrowserContext, cluster: Cluster, dev_server: ParleyProcess, artifacts: Path
) -> None:
    """Development sign-in, then the server restarts on the same port: the page says it is
    reconnecting, comes back by itself, and the chat goes on."""
    user = new_user()
    tab = await open_tab(context, dev_server)
    page = tab.page
    await page.locator("#dev-form").wait_for()
    await page.fill("#dev-name", user)
    await page.press("#dev-name", "Enter")
    await tab.signed_in()
    assert await page.locator("#user-name").inner_text() == user
    # the composer works without creating a conversation first
    await tab.send("[sim:tokens=12] First, before the restart")
    conversation = await tab.conversation_id()
    await tab.wait_replies(1)

    await asyncio.to_thread(dev_server.stop)
    await page.wait_for_selector("#status[data-state=waiting]", timeout=5000)
    banner = await page.locator("#banner").inner_text()
    assert "Reconnecting" in banner, banner
    assert any(why in banner for why in ("going away", "restarting")), banner
    await page.screenshot(path=str(artifacts / "chat-reconnecting.png"))

    again = ParleyProcess("serve", dev_server.env, dev_server.port, dev_server.log_path)
    cluster.started.append(again)
    await asyncio.to_thread(again.start)
    await page.wait_for_selector("#status[data-state=online]", timeout=20_000)
    assert await page.locator("#banner").is_hidden()

    await tab.send("[sim:tokens=12] Second, after the restart")
    await tab.wait_replies(2)
    first = await settled_reply(again, user, conversation, 1)
    second = await settled_reply(again, user, conversation, 2)
    await assert_shows(tab, first)
    await assert_shows(tab, second)
    tab.check()


async def test_phone_width_and_dark_mode(
    browser: Browser, parley: ParleyProcess, artifacts: Path
) -> None:
    phone = await browser.new_context(
        viewport=PHONE,  # type: ignore[arg-type]
        device_scale_factor=2,
        is_mobile=True,
        has_touch=True,
    )
    dark = await browser.new_context(viewport=WIDE, color_scheme="dark")  # type: ignore[arg-type]
    try:
        user, tab = await open_signed_in(phone, parley)
        page = tab.page
        box = await page.locator("#sidebar").bounding_box()
        assert box is not None and box["x"] + box["width"] <= 0, "the list hides at phone width"
        # the composer starts a conversation by itself
        await tab.send(CODE_PROMPT)
        conversation = await tab.conversation_id()
        await tab.wait_replies(1)
        width = await page.evaluate("document.documentElement.scrollWidth")
        assert width <= PHONE["width"], f"the page scrolls sideways at phone width ({width}px)"
        await page.screenshot(path=str(artifacts / "chat-phone.png"))
        await page.click("#open-sidebar")
        await page.locator(f'.conv[data-id="{conversation}"]').wait_for(state="visible")
        await page.wait_for_timeout(300)
        await page.screenshot(path=str(artifacts / "chat-phone-sidebar.png"))
        await page.keyboard.press("Escape")
        await page.wait_for_function("!document.querySelector('#app.sidebar-open')")
        tab.check()

        night = await open_tab(dark, parley, user, conversation)
        await night.wait_replies(1)
        await night.page.screenshot(path=str(artifacts / "chat-dark.png"))
        night.check()
    finally:
        await phone.close()
        await dark.close()
