"""The browser UI's side of token budgets, in real Chromium against a `parley serve` with a
small budget: what remains and when it resets in the sidebar, the warning and the refusal
as messages a person reads."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.async_api import BrowserContext

from tests.helpers.browser import open_signed_in
from tests.helpers.processes import Cluster, Db, ParleyProcess, redis_db

pytestmark = pytest.mark.ui

LIMIT = 250
"""Room for one short turn's worst case (`llm.max_tokens` 100), not for a second one."""


@pytest.fixture(scope="module")
def budget_server(cluster: Cluster) -> Iterator[ParleyProcess]:
    server = cluster.process(
        "serve",
        REDIS_URL=redis_db(cluster.services.redis_url, Db.BUDGETS_UI),
        PARLEY_BUDGETS_DEFAULT_TOKENS=str(LIMIT),
        PARLEY_BUDGETS_WARN_AT="0.1",
        PARLEY_LLM_MAX_TOKENS="100",
    )
    yield server
    server.stop()


def tokens_left(text: str) -> int:
    match = re.match(r"([\d,. ]+) of ", text)
    assert match, text
    return int(re.sub(r"\D", "", match.group(1)))


async def test_the_sidebar_shows_the_budget_and_the_warning_and_refusal_are_readable(
    context: BrowserContext, budget_server: ParleyProcess, artifacts: Path
) -> None:
    _, tab = await open_signed_in(context, budget_server)
    page = tab.page
    budget = page.locator("#budget")
    await budget.wait_for()
    shown = await budget.inner_text()
    assert tokens_left(shown) == LIMIT and "resets" in shown, shown

    await tab.new_conversation()
    await tab.send("[sim:tokens=20] Hello")
    await tab.wait_replies(1)
    await tab.notice("of your token budget")  # usage_warning: past 10%
    await page.wait_for_function(
        f"Number(document.querySelector('#budget').dataset.remaining) < {LIMIT}"
    )
    left = tokens_left(await budget.inner_text())
    assert 0 < left < LIMIT - 20

    await tab.send("[sim:tokens=20] And again")  # its worst case no longer fits
    await tab.notice("Your token budget has no room left for another reply")
    assert tokens_left(await budget.inner_text()) == left  # nothing was spent or reserved
    await page.screenshot(path=str(artifacts / "chat-budget.png"))
    tab.check()
