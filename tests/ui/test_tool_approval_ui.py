"""The tool call's card and its approval in real Chromium, two pages of one user: both show
the call waiting with Approve / Deny, one approves, both show it approved at once and the
answer streams; a reload rebuilds the card from the history, its result folded."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.async_api import BrowserContext

from server.dev import embedded
from tests.helpers.approvals import PATH, TOOL, answer_deleted, approval_config, delete_call
from tests.helpers.auth import new_user
from tests.helpers.browser import open_tab, settled_reply
from tests.helpers.processes import Cluster, Db, ParleyProcess, redis_db
from tests.helpers.receiver import Receiver

pytestmark = pytest.mark.ui

CARD = ".msg-assistant .tool-card"


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    receiver = Receiver(embedded.free_port())
    receiver.answers[PATH] = answer_deleted
    receiver.start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="module")
def tool_server(cluster: Cluster, receiver: Receiver) -> Iterator[ParleyProcess]:
    server = cluster.process(
        "serve",
        REDIS_URL=redis_db(cluster.services.redis_url, Db.APPROVALS_UI),
        PARLEY_CONFIG=str(approval_config(cluster.tmp, receiver)),
    )
    yield server
    server.stop()


async def test_approve_in_one_page_and_both_show_it_and_the_answer(
    context: BrowserContext, tool_server: ParleyProcess, receiver: Receiver, artifacts: Path
) -> None:
    user = new_user()
    first = await open_tab(context, tool_server, user)
    conversation = await first.new_conversation()
    second = await open_tab(context, tool_server, user, conversation)
    await first.send(delete_call("/tmp/ui"))
    for tab in (first, second):
        card = tab.page.locator(f"{CARD}[data-state=pending]")
        await card.wait_for(timeout=15_000)
        assert await card.locator(".tool-name").inner_text() == TOOL
        assert '"/tmp/ui"' in await card.locator(".tool-args").inner_text()
        assert await card.locator("button[data-action=approve]").is_enabled()
        assert await card.locator("button[data-action=deny]").is_enabled()
    assert receiver.of(PATH) == []  # nothing runs before the answer
    await second.page.screenshot(path=artifacts / "tool-approval-pending.png")

    await second.click(f"{CARD} button[data-action=approve]")
    for tab in (first, second):
        decision = tab.page.locator(f"{CARD} .tool-decision")
        await decision.wait_for(timeout=5000)
        assert await decision.inner_text() == f"approved by {user}"
        assert await tab.page.locator(f"{CARD} button").count() == 0
        await tab.wait_replies(1)
        assert await tab.page.locator(f"{CARD}[data-state=ok]").count() == 1
        shown = await tab.page.locator(".msg-assistant .msg-content").inner_text()
        assert f"{TOOL} answered" in shown
    assert len(receiver.of(PATH)) == 1
    await first.page.screenshot(path=artifacts / "tool-approval-approved.png")
    reply = await settled_reply(tool_server, user, conversation)
    result = next(p for p in reply["parts"] if p["kind"] == "tool_result")
    assert result["approval"] == {"state": "approved", "by": user}

    await first.page.reload()  # from the history alone: the card, its result folded
    await first.signed_in()
    done = first.page.locator(f"{CARD}[data-state=ok]")
    await done.wait_for(timeout=5000)
    assert await done.locator(".tool-decision").inner_text() == f"approved by {user}"
    folded = done.locator("details.tool-result")
    assert await folded.get_attribute("open") is None
    await folded.locator("summary").click()
    await first.page.locator(f"{CARD} details.tool-result[open]").wait_for()
    assert await done.locator(".tool-result-text").inner_text() == result["text"]
    first.check()
    second.check()


async def test_deny_in_one_page_and_both_show_the_call_denied_and_not_run(
    context: BrowserContext, tool_server: ParleyProcess, receiver: Receiver
) -> None:
    user = new_user()
    first = await open_tab(context, tool_server, user)
    conversation = await first.new_conversation()
    second = await open_tab(context, tool_server, user, conversation)
    await first.send(delete_call("/tmp/denied"))
    await second.page.locator(f"{CARD}[data-state=pending]").wait_for(timeout=15_000)
    await first.page.locator(f"{CARD}[data-state=pending]").wait_for(timeout=5000)
    calls = len(receiver.of(PATH))
    await first.click(f"{CARD} button[data-action=deny]")
    for tab in (first, second):
        denied = tab.page.locator(f"{CARD}[data-state=denied]")
        await denied.wait_for(timeout=5000)
        assert await denied.locator(".tool-status").inner_text() == f"denied by {user}"
        await tab.wait_replies(1)
        shown = await tab.page.locator(".msg-assistant .msg-content").inner_text()
        assert "The user denied this call" in shown  # the model read the denial
    assert len(receiver.of(PATH)) == calls  # the tool never ran
    await second.page.reload()  # the history alone still says who denied it
    await second.signed_in()
    denied = second.page.locator(f"{CARD}[data-state=denied]")
    await denied.wait_for(timeout=5000)
    assert await denied.locator(".tool-status").inner_text() == f"denied by {user}"
    first.check()
    second.check()
