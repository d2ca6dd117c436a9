"""Stopping a web process while replies stream: every tab gets the close frame (1012) after
the frames queued before it, and nothing dies with an unretrieved exception on the way out.
A `parley web` and a `parley worker`, as deployed, on a Redis database of their own, with
pings every second as in test_resilience.py; one tab reads late (a small receive window,
reading paused for 3 s), so the close frame waits behind its backlog in the server."""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import Iterator

import pytest

from protocol import frames as f
from server.dev.client import Client
from tests.helpers.auth import mint, new_user
from tests.helpers.processes import Cluster, Db, ParleyProcess, redis_db, start_all, stop_together
from tests.helpers.tabs import until

SHUTDOWN_DB = Db.SHUTDOWN
RUNS = 3
TABS = 6
ENV = {
    "PARLEY_SIMULATOR_TOKENS_PER_SECOND": "1000",
    "PARLEY_SERVER_WS_PING_INTERVAL": "1",
    "PARLEY_SERVER_WS_PING_TIMEOUT": "1",
}
SLOW_TAB_PAUSE = 3.0
"""Longer than a ping interval and timeout (1 s + 1 s), shorter than the close timeout."""
BAD_LOG_LINES = ("Traceback", "Task exception was never retrieved", " ERROR ")


@pytest.fixture(scope="module")
def redis_url(cluster: Cluster) -> str:
    return redis_db(cluster.services.redis_url, SHUTDOWN_DB)


@pytest.fixture(scope="module")
def worker(cluster: Cluster, redis_url: str) -> Iterator[ParleyProcess]:
    proc = cluster.process("worker", start=False, REDIS_URL=redis_url, **ENV)
    start_all([proc])
    yield proc
    stop_together([proc])


def tokens(tab: Client) -> int:
    return sum(isinstance(fr, f.Token) for fr in tab.frames)


async def small_window(web: ParleyProcess) -> socket.socket:
    """A connected socket with a small receive buffer: what the client does not read soon
    stays in the server's buffers."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", web.port))
    return sock


async def stream_then_stop(web: ParleyProcess) -> list[int | None]:
    """Tabs of one user watch a 2,000-token reply; SIGTERM once it flows; their close codes."""
    user = new_user()
    tabs = [await Client.connect(web.ws_url, mint(user)) for _ in range(TABS - 1)]
    tabs.append(await Client.connect(web.ws_url, mint(user), sock=await small_window(web)))
    try:
        created = await tabs[0].request(f.Create(title="shutdown"))
        for tab in tabs:
            await tab.request(f.Join(conversation=created.conversation))
        await tabs[0].request(f.Say(conversation=created.conversation, text="[sim:tokens=2000]"))
        await until(lambda: all(tokens(t) >= 50 for t in tabs), 15, "the reply to flow")
        slow = tabs[-1].ws.transport
        slow.pause_reading()  # a tab that reads late: it answers the close after seconds
        web.send_signal(signal.SIGTERM)
        await asyncio.sleep(SLOW_TAB_PAUSE)
        slow.resume_reading()
        closed = await asyncio.wait_for(asyncio.gather(*(t.closed for t in tabs)), 15)
        assert all(tokens(t) < 2000 for t in tabs), "the reply ended before the signal"
        for tab in tabs:  # what was queued before the close frame arrived, whole
            seqs = [fr.seq for fr in tab.frames if isinstance(fr, f.ConversationEvent)]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        return [code for code, _ in closed]
    finally:
        await asyncio.gather(*(t.close() for t in tabs), return_exceptions=True)


async def test_sigterm_while_a_reply_streams_closes_every_tab_1012(
    cluster: Cluster, worker: ParleyProcess, redis_url: str
) -> None:
    for run in range(RUNS):
        web = cluster.process("web", REDIS_URL=redis_url, **ENV)
        try:
            codes = await stream_then_stop(web)
            assert web.proc is not None
            await asyncio.to_thread(web.proc.wait, 15)
        finally:
            await asyncio.to_thread(web.stop)
        log = web.log()
        assert codes == [1012] * TABS, f"run {run}: {codes}\n{log[-3000:]}"
        assert not [line for line in BAD_LOG_LINES if line in log], log[-3000:]
