"""The browser UI and a turn the host application's turn hook refuses: the page shows the
application's message, keeps the person's message, starts no reply, stays in step with the
conversation's seq (no rejoin) and takes the next turn.

The hook endpoint is a small HTTP server on 127.0.0.1 that this module starts: it refuses
every turn whose text holds REFUSE_MARK and allows the others (the requests are unsigned,
`hooks.secret` being empty).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from playwright.async_api import BrowserContext, WebSocket

from server.dev import embedded
from tests.helpers.browser import open_signed_in
from tests.helpers.processes import Cluster, Db, ParleyProcess, redis_db

pytestmark = pytest.mark.ui

REFUSE_MARK = "forbidden topic"
REFUSAL = "That is not something this assistant talks about."


class TurnHook(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        text = (body.get("message") or {}).get("content", "")
        answer = {"allow": False, "message": REFUSAL} if REFUSE_MARK in text else {}
        payload = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def hook_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", embedded.free_port()), TurnHook)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/turn"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def hooked(cluster: Cluster, hook_url: str) -> Iterator[ParleyProcess]:
    """A server whose worker asks `hook_url` before each turn (on a Redis DB of its own, so
    that no other server's worker takes its turns without asking)."""
    server = cluster.process(
        "serve",
        REDIS_URL=redis_db(cluster.services.redis_url, Db.HOOKS_UI),
        PARLEY_HOOKS_TURN_URL=hook_url,
    )
    yield server
    server.stop()


async def test_a_refused_turn_shows_the_applications_message(
    context: BrowserContext, hooked: ParleyProcess
) -> None:
    _, tab = await open_signed_in(context, hooked)
    page = tab.page
    joins: list[str] = []

    def on_socket(ws: WebSocket) -> None:
        ws.on("framesent", lambda data: joins.append(str(data)) if '"join"' in str(data) else None)

    page.on("websocket", on_socket)
    await page.reload()
    await tab.signed_in()
    await tab.new_conversation()
    await tab.send(f"Tell me about the {REFUSE_MARK}")
    await tab.notice(REFUSAL)
    await page.locator(".msg-user .msg-content").get_by_text(REFUSE_MARK).wait_for()
    assert await page.locator(".msg-assistant").count() == 0
    assert len(joins) == 1, f"the page rejoined (a seq gap): {joins}"

    await tab.send("[sim:tokens=5] Something else")
    await tab.wait_replies(1)
    assert await page.locator(".msg-user").count() == 2
    assert await page.locator(".msg-assistant").count() == 1
    assert len(joins) == 1, f"the page rejoined (a seq gap): {joins}"
    tab.check()
