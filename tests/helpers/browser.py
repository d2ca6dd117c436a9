"""The browser UI's tests' page: real headless Chromium (Debian's `chromium` package), driven
by Playwright's async API.

`open_tab` opens the page the way people do: with a token handed over in `?token=`, or
through the development sign-in form.
"""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from playwright.async_api import BrowserContext, Dialog, Page

from tests.helpers.auth import mint
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


async def open_tab(
    context: BrowserContext,
    server: ParleyProcess,
    user: str | None = None,
    conversation: str | None = None,
    *,
    token: str | None = None,
) -> BrowserTab:
    """A new page on `server`, opened with `?token=` when a user or token is given (and
    waited for until signed in when a user is)."""
    page = await context.new_page()
    tab = BrowserTab(page)
    page.on("pageerror", lambda exc: tab.errors.append(str(exc)))

    async def on_dialog(dialog: Dialog) -> None:
        tab.dialogs.append(f"{dialog.type}: {dialog.message}")
        await dialog.dismiss()

    page.on("dialog", on_dialog)
    url = f"{server.url}/"
    if user or token:
        url += f"?token={token or mint(user or '')}"
    if conversation:
        url += f"#/c/{conversation}"
    await page.goto(url)
    if user:
        await tab.signed_in()
    return tab


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
