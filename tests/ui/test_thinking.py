"""The reply's "Thinking" block, finish reason and usage in real Chromium, with the simulated
model reasoning, including a reload in the middle of the reasoning."""

from __future__ import annotations

from typing import Any

import pytest
from playwright.async_api import BrowserContext

from tests.helpers.browser import open_signed_in, settled_reply
from tests.helpers.processes import ParleyProcess

pytestmark = pytest.mark.ui

THINK = "[sim:reasoning=50][sim:tps=20][sim:tokens=15][sim:finish=length][sim:usage=details]"
BLOCK = ".msg-assistant .msg-thinking"


async def thinking_chars(page: Any) -> int:
    text: str = await page.locator(f"{BLOCK} .msg-thinking-text").text_content() or ""
    return len(text)


async def test_thinking_block_streams_survives_a_reload_and_collapses_for_the_answer(
    context: BrowserContext, parley: ParleyProcess
) -> None:
    user, tab = await open_signed_in(context, parley)
    page = tab.page
    conversation = await tab.new_conversation()
    await tab.send(f"{THINK} Think it over")
    thinking = page.locator(f"{BLOCK}[data-state=thinking][open]")
    await thinking.wait_for()
    assert await page.locator(f"{BLOCK} summary").inner_text() == "Thinking…"
    await page.wait_for_function(
        "(s) => document.querySelector(s)?.textContent.length > 40",
        arg=f"{BLOCK} .msg-thinking-text",
    )
    before = await thinking_chars(page)

    await page.reload()  # in the middle of the reasoning: it is shown again, still open
    await tab.signed_in()
    await thinking.wait_for(timeout=5000)
    assert await thinking_chars(page) >= before
    assert await page.locator(".msg-assistant[data-status=streaming]").count() == 1

    # the answer starts: the block closes and says how long the model thought
    done = page.locator(f"{BLOCK}[data-state=done]:not([open])")
    await done.wait_for(timeout=10_000)
    await tab.wait_replies(1)
    assert (await page.locator(f"{BLOCK} summary").inner_text()).startswith("Thought for ")
    status = page.locator(".msg-assistant .msg-status")
    assert await status.inner_text() == "stopped: length"
    usage = await page.locator(".msg-assistant .msg-usage").get_attribute("title") or ""
    assert "50 of them reasoning" in usage and "first token after" in usage

    reply = await settled_reply(parley, user, conversation)
    reasoning = reply["parts"][0]
    assert reasoning["kind"] == "reasoning" and reply["reason"] == "length"
    # after a reload the finished reply shows the same, from the history alone
    await page.reload()
    await tab.signed_in()
    await done.wait_for(timeout=5000)
    assert await page.locator(f"{BLOCK} .msg-thinking-text").text_content() == reasoning["text"]
    summary = await page.locator(f"{BLOCK} summary").inner_text()
    assert summary.startswith("Thought for ")
    assert await page.locator(".msg-assistant .msg-status").inner_text() == "stopped: length"
    await page.locator(f"{BLOCK} summary").click()  # the reader can open it
    await page.locator(f"{BLOCK}[open]").wait_for()
    tab.check()
