"""The browser UI keeps its socket past its token's expiry when the host application gives it
`?token_url=`: on the server's `refresh` hint it fetches a fresh token there and sends it in
an `auth` frame. Without `token_url` (and without development sign-in) the socket is closed
with 4401 once the grace after the expiry is over.

The UI accepts only a same-origin `token_url` (a page must not send its cookies elsewhere),
and Parley has no route that plays the host application's, so the test answers that one path
itself through Chromium's request interception, with a token minted for each request.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import jwt
import pytest
from playwright.async_api import BrowserContext, Page, Route, WebSocket

from tests.helpers.auth import mint, new_user
from tests.helpers.browser import BrowserTab, new_tab, open_tab
from tests.helpers.processes import Cluster, Db, ParleyProcess, redis_db

pytestmark = pytest.mark.ui

TOKEN_TTL = 25
"""Well above the 15 s ahead of expiry at which the page renews on its own timer, so that the
server's `refresh` hint, REFRESH_HINT before expiry (5 s after the token is minted: time
enough for the page to load and sign in), comes first and is what renews."""
REFRESH_HINT = 20.0
REFRESH_GRACE = 1.0
TOKEN_PATH = "/app/parley-token"

UNAUTHORIZED_CLOSE = """async () => {
    const { store } = await import("/store.js");
    return new Promise((resolve) =>
        store.connection.addEventListener("unauthorized", (e) => resolve(e.detail.code), {
            once: true,
        }),
    );
}"""
"""Resolves to the close code when the page's socket is closed as unauthorized (4401)."""


@pytest.fixture(scope="module")
def refreshing(cluster: Cluster) -> Iterator[ParleyProcess]:
    """A server (development sign-in off) that hints `refresh` REFRESH_HINT before a token's
    expiry (5 s after a TOKEN_TTL token is minted) and closes a socket REFRESH_GRACE after."""
    server = cluster.process(
        "serve",
        PARLEY_AUTH_REFRESH_HINT=str(REFRESH_HINT),
        PARLEY_AUTH_REFRESH_GRACE=str(REFRESH_GRACE),
        REDIS_URL=redis_db(cluster.services.redis_url, Db.TOKEN_RENEWAL),
    )
    yield server
    server.stop()


def watch_socket(page: Page) -> tuple[list[str], list[tuple[float, str]]]:
    """The page's socket URLs and the frames it received, each with its wall time."""
    sockets: list[str] = []
    received: list[tuple[float, str]] = []

    def on_socket(ws: WebSocket) -> None:
        sockets.append(ws.url)
        ws.on("framereceived", lambda data: received.append((time.time(), str(data))))

    page.on("websocket", on_socket)
    return sockets, received


async def wait_until(wall: float) -> None:
    await asyncio.sleep(max(0.0, wall - time.time()))


async def open_renewing(
    context: BrowserContext, server: ParleyProcess, token: str
) -> tuple[BrowserTab, list[str], list[tuple[float, str]]]:
    """A page opened with `?token=` and `&token_url=`, its socket watched from the start."""
    tab = await new_tab(context)
    sockets, received = watch_socket(tab.page)
    await open_tab(context, server, token=token, query=f"token_url={TOKEN_PATH}", tab=tab)
    await tab.signed_in()
    return tab, sockets, received


async def test_token_url_keeps_the_socket_past_expiry(
    context: BrowserContext, refreshing: ParleyProcess
) -> None:
    user = new_user()
    minted: list[float] = []

    async def app_token(route: Route) -> None:
        minted.append(time.time())
        body = json.dumps({"token": mint(user, ttl=TOKEN_TTL)})
        await route.fulfill(status=200, content_type="application/json", body=body)

    # by path: a glob would match the page's own address too, whose query names this path
    await context.route(lambda url: urlsplit(url).path == TOKEN_PATH, app_token)
    first = mint(user, ttl=TOKEN_TTL)
    expiry = jwt.decode(first, options={"verify_signature": False})["exp"]
    renewing, sockets, received = await open_renewing(context, refreshing, first)
    plain = await open_tab(context, refreshing, token=mint(user, ttl=TOKEN_TTL))
    await plain.signed_in()
    closed = asyncio.create_task(plain.page.evaluate(UNAUTHORIZED_CLOSE))

    conversation = await renewing.new_conversation()
    await renewing.send("[sim:tokens=4] Before the first token expires")
    await renewing.wait_replies(1)
    # the `refresh` hint made the page fetch a token, before its own timer would have
    deadline = time.monotonic() + TOKEN_TTL
    while not minted:
        assert time.monotonic() < deadline, f"the page fetched no token: {received}"
        await asyncio.sleep(0.1)
    hinted = next(at for at, frame in received if '"type":"refresh"' in frame)
    assert minted and minted[0] >= hinted, (minted, hinted)
    assert minted[0] < expiry - 16, (
        f"renewed {expiry - minted[0]:.1f} s before expiry, hinted {expiry - hinted:.1f} s "
        "before: on the page's own timer, not on the hint"
    )

    # without token_url: closed 4401, and only once the grace after the expiry is over
    assert await asyncio.wait_for(closed, TOKEN_TTL + 10) == 4401
    assert time.time() >= expiry + REFRESH_GRACE - 0.5
    await plain.page.locator("#signin").wait_for(timeout=5000)

    # with token_url: the same socket goes on past the first token's expiry and its grace
    await wait_until(expiry + REFRESH_GRACE + 1)
    page = renewing.page
    assert len(sockets) == 1, f"the page reconnected: {sockets}"
    assert await page.locator("#status").get_attribute("data-state") == "online"
    assert await page.locator("#signin").is_hidden()
    await renewing.send("[sim:tokens=6] After the first token expired")
    await renewing.wait_replies(2)
    assert await renewing.conversation_id() == conversation
    assert len(sockets) == 1, f"the page reconnected: {sockets}"
    assert any('"type":"ack"' in frame and "expires_at" in frame for _, frame in received)
    renewing.check()
    plain.check()
