"""Fixtures for the browser UI tests: one headless Chromium per session, a fresh window per
test, and the directory for screenshots (helpers: tests/helpers/browser.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from playwright.async_api import Browser, BrowserContext, async_playwright

from tests.helpers.browser import ARTIFACTS, CHROMIUM_ARGS, WIDE, chromium_path


@pytest_asyncio.fixture(loop_scope="session", scope="session")
async def browser() -> AsyncIterator[Browser]:
    executable = chromium_path()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest_asyncio.fixture(loop_scope="session")
async def context(browser: Browser) -> AsyncIterator[BrowserContext]:
    """A fresh wide browser window (its own storage) per test."""
    context = await browser.new_context(viewport=WIDE)  # type: ignore[arg-type]
    try:
        yield context
    finally:
        await context.close()
