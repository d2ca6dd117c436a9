"""The browser UI's tests' page: real headless Chromium (Debian's `chromium` package), driven
by Playwright's async API.

`open_signed_in` opens the page for a new user the way people do, with a token handed over in
`?token=`; `open_tab` also opens it for a given user or token, or on the sign-in form;
`new_tab` gives a blank page to watch from its first socket on before `open_tab` opens it.
"""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from playwright.async_api import BrowserContext, Dialog, Page

from tests.helpers.auth import mint, new_user
from tests.helpers.processes import ROOT, ParleyProcess

ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
WIDE = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


def chromium_path() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail(
            "The UI tests need Debian's Chromium and it is not installed: run "
            "`apt-get install chromium` (as root; CI installs it). "
            "Skipping is not an option: these tests are the UI's only check.",
            pytrace=False,
        )
    return path


@dataclass
class BrowserTab:
    """A page plus what it did that a test must not miss: script errors and dialogs."""

    page: Page
    errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    async def signed_in(self) -> None:
        await self.page.wait_for_selector("#status[data-state=online]", timeout=10_000)

    async def conversation_id(self) -> str:
        await self.page.wait_for_function("location.hash.startsWith('#/c/')")
        return str(uuid.UUID(self.page.url.split("#/c/")[1]))

    async def click(self, selector: str) -> None:
        """Click like a person: on the tab in front (Chromium throttles frames in the others,
        and a click waits for two frames)."""
        await self.page.bring_to_front()
        await self.page.click(selector)

    async def new_conversation(self) -> str:
        await self.click("#new-chat")
        await self.click("#new-form button[value=create]")
        await self.page.wait_for_function("location.hash.startsWith('#/c/')")
        return await self.conversation_id()

    async def send(self, text: str) -> None:
        await self.page.bring_to_front()
        await self.page.fill("#input", text)
        await self.page.press("#input", "Enter")

    async def assistant_count(self, status: str) -> int:
        return await self.page.locator(f".msg-assistant[data-status={status}]").count()

    async def wait_replies(
        self, count: int, status: str = "complete", timeout: float = 15_000
    ) -> None:
        await self.page.wait_for_function(
            "([n, s]) => document.querySelectorAll(`.msg-assistant[data-status=${s}]`).length >= n",
            arg=[count, status],
            timeout=timeout,
        )

    async def raw(self, message_id: str) -> str | None:
        """The text this tab holds for a message (the client's transcript, not the DOM).

        Tests read the page's state the way its own modules do, by importing store.js (the
        page puts nothing on `window`)."""
        result: str | None = await self.page.evaluate(
            """async (id) => {
                const { store } = await import("/store.js");
                for (const t of store.transcripts()) {
                    const m = t.find(id);
                    if (m) return m.content;
                }
                return null;
            }""",
            message_id,
        )
        return result

    async def shown(self, message_id: str) -> str:
        text: str = await self.page.locator(
            f'.msg[data-id="{message_id}"] .msg-content'
        ).inner_text()
        return text

    async def lengths_until_settled(self, message_id: str, timeout: float = 30) -> list[int]:
        """The lengths the tab shows for a reply, sampled until it stops streaming."""
        shown: list[int] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = await self.page.evaluate(
                """(id) => { const m = document.querySelector(`.msg[data-id='${id}']`);
                             return m && [m.dataset.status, Number(m.dataset.chars)] }""",
                message_id,
            )
            if found:
                shown.append(found[1])
                if found[0] != "streaming":
                    return shown
            await asyncio.sleep(0.03)
        raise AssertionError(f"the reply still streams after {timeout} s: {shown[-5:]}")

    async def rendered(self, markdown: str) -> str:
        """What the page's own Markdown renderer shows for `markdown`."""
        text: str = await self.page.evaluate(
            """async (source) => {
                const { renderMarkdown } = await import("/markdown.js");
                const box = document.createElement("div");
                box.className = "msg-content markdown";
                box.append(renderMarkdown(source));
                document.querySelector("#messages").append(box);
                const text = box.innerText;
                box.remove();
                return text;
            }""",
            markdown,
        )
        return text

    async def notice(self, text: str) -> None:
        await self.page.locator("#notices .notice").get_by_text(text).wait_for(timeout=5000)

    def check(self) -> None:
        assert not self.errors, f"script errors in the page: {self.errors}"
        assert not self.dialogs, f"the page opened dialogs: {self.dialogs}"


async def new_tab(context: BrowserContext) -> BrowserTab:
    """A blank page that records its script errors and its dialogs (dismissed): a test adds
    the listeners that must see the page's first socket, then opens it with `open_tab`."""
    page = await context.new_page()
    tab = BrowserTab(page)
    page.on("pageerror", lambda exc: tab.errors.append(str(exc)))

    async def on_dialog(dialog: Dialog) -> None:
        tab.dialogs.append(f"{dialog.type}: {dialog.message}")
        await dialog.dismiss()

    page.on("dialog", on_dialog)
    return tab


async def open_tab(
    context: BrowserContext,
    server: ParleyProcess,
    user: str | None = None,
    conversation: str | None = None,
    *,
    token: str | None = None,
    base: str | None = None,
    query: str = "",
    tab: BrowserTab | None = None,
) -> BrowserTab:
    """A page on `server` (or at `base`, a proxy in front of it), opened with `?token=`
    when a user or token is given (and waited for until signed in when a user is), plus
    `query` (`transport=sse`); in `tab` (from `new_tab`) when given, else in a new one."""
    tab = tab or await new_tab(context)
    params = [query] if query else []
    if user or token:
        params.append(f"token={token or mint(user or '')}")
    url = f"{base or server.url}/"
    if params:
        url += "?" + "&".join(params)
    if conversation:
        url += f"#/c/{conversation}"
    await tab.page.goto(url)
    if user:
        await tab.signed_in()
    return tab


async def open_signed_in(
    context: BrowserContext, server: ParleyProcess, *, query: str = ""
) -> tuple[str, BrowserTab]:
    """A new user and their page on `server` (plus `query`), signed in with a token in
    `?token=`: how most UI tests begin."""
    user = new_user()
    return user, await open_tab(context, server, user, query=query)


async def persisted(server: ParleyProcess, user: str, conversation: str) -> dict[str, Any]:
    """GET /api/conversations/{id}: what PostgreSQL holds."""
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        response = await http.get(
            f"/api/conversations/{conversation}",
            headers={"Authorization": f"Bearer {mint(user)}"},
        )
        response.raise_for_status()
        detail: dict[str, Any] = response.json()
        return detail


async def settled_reply(
    server: ParleyProcess, user: str, conversation: str, count: int = 1
) -> dict[str, Any]:
    """The `count`-th assistant message once the persister has stored it."""
    deadline = time.monotonic() + 10
    while True:
        detail = await persisted(server, user, conversation)
        replies = [m for m in detail["messages"] if m["role"] == "assistant"]
        if len(replies) >= count:
            reply: dict[str, Any] = replies[count - 1]
            return reply
        assert time.monotonic() < deadline, f"reply {count} not persisted: {detail}"
        await asyncio.sleep(0.05)


async def reload_mid_reply(
    tab: BrowserTab,
    server: ParleyProcess,
    user: str,
    ready: Callable[[], Awaitable[None]],
    tps: int = 15,
) -> None:
    """Reload the page while a reply of 120 tokens at `tps` streams (`ready` waits until it
    is signed in again): history plus the events after it, then the rest live. What is shown
    never goes back and ends exactly as persisted (no gap, no repeat)."""
    page = tab.page
    conversation = await tab.new_conversation()
    await tab.send(f"[sim:tps={tps}] [sim:tokens=120] Tell me a long story")
    streaming = page.locator(".msg-assistant[data-status=streaming]")
    await streaming.wait_for()
    message_id = await streaming.get_attribute("data-id")
    assert message_id
    await page.wait_for_function(
        "(id) => Number(document.querySelector(`.msg[data-id='${id}']`).dataset.chars) > 60",
        arg=message_id,
    )
    before = await tab.raw(message_id) or ""

    await page.reload()
    await ready()
    shown = await tab.lengths_until_settled(message_id)
    reply = await settled_reply(server, user, conversation)
    assert reply["id"] == message_id
    assert reply["content"].startswith(before)
    assert shown[0] >= len(before), "the reply jumped back after the reload"
    assert shown == sorted(shown), f"the shown reply shrank: {shown}"
    assert len(set(shown)) >= 2, "the reply did not keep streaming after the reload"
    assert shown[-1] == len(reply["content"])
    assert await tab.raw(message_id) == reply["content"]
    assert await tab.shown(message_id) == await tab.rendered(reply["content"])
    assert await page.locator(".msg-assistant").count() == 1
