"""The conversation over Server-Sent Events (`GET /api/conversations/{id}/events`), sending over
REST, stream tickets, and the Vercel AI SDK backend (`/api/ai/chat`) driven by the real `ai`
package in Node."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shutil
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio import Redis

from protocol import frames as f
from server.dev.client import Client
from server.redis import keys
from tests.helpers.auth import mint, new_user
from tests.helpers.conversations import transcript, wait_persisted
from tests.helpers.processes import (
    Cluster,
    Db,
    ParleyProcess,
    redis_db,
    small_outbox_server,
    start_all,
    stop_together,
)
from tests.helpers.sse import Reader, SseTab, chunks
from tests.helpers.tabs import TabClient, check_tabs, close_all, end_to_end_examples, until

SSE_DB = Db.SSE
SLOW_SSE_DB = Db.SLOW_SSE
LOG_EVENTS = 200
REPLY_TOKENS = 60
FILLERS = 6
"""Replies of about 45 events each: more than the log's `LOG_EVENTS`."""
NODE_DIR = Path(__file__).resolve().parent.parent / "node"


class Sse:
    """Two web processes and a worker on their own Redis database, with a model slow enough
    (about 1.5 s a reply) for a stream to be dropped in the middle of one, a log of
    `LOG_EVENTS`, short stream lifetimes and heartbeats, and tickets that live 1 s."""

    def __init__(self, webs: list[ParleyProcess], worker: ParleyProcess) -> None:
        self.webs = webs
        self.worker = worker


@pytest.fixture(scope="module")
def sse(cluster: Cluster) -> Iterator[Sse]:
    model = cluster.model(
        PARLEY_SIMULATOR_TOKENS_PER_SECOND="40",
        PARLEY_SIMULATOR_MAX_TOKENS=str(REPLY_TOKENS),
    )
    env = {
        "REDIS_URL": redis_db(cluster.services.redis_url, SSE_DB),
        "OPENAI_BASE_URL": f"{model.url}/v1",
        "OPENAI_API_KEY": "sim",
        "PARLEY_REDIS_LOG_MAX_EVENTS": str(LOG_EVENTS),
        "PARLEY_SERVER_SSE_MAX_LIFETIME": "2.5",
        "PARLEY_SERVER_SSE_HEARTBEAT": "0.5",
        "PARLEY_SERVER_STREAM_TICKET_TTL": "1",
        "PARLEY_LLM_MAX_TOKENS": str(REPLY_TOKENS),
    }
    webs = [cluster.process("web", start=False, **env) for _ in range(2)]
    worker = cluster.process("worker", start=False, **env)
    start_all([model, *webs, worker])
    yield Sse(webs, worker)
    stop_together([*webs, worker, model])


def events_url(web: ParleyProcess, conversation: uuid.UUID) -> str:
    return f"{web.url}/api/conversations/{conversation}/events"


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def new_conversation(http: httpx.AsyncClient, web: ParleyProcess, token: str) -> uuid.UUID:
    response = await http.post(f"{web.url}/api/conversations", json={}, headers=bearer(token))
    assert response.status_code == 201, response.text
    return uuid.UUID(response.json()["id"])


async def say(
    http: httpx.AsyncClient, web: ParleyProcess, token: str, conversation: uuid.UUID, text: str
) -> uuid.UUID:
    """`say` over REST, retried while the previous reply still runs (409 busy)."""
    url = f"{web.url}/api/conversations/{conversation}/messages"
    body = {"id": str(uuid.uuid4()), "text": text}
    for _ in range(100):
        response = await http.post(url, json=body, headers=bearer(token))
        if response.status_code != 409:
            break
        await asyncio.sleep(0.1)
    assert response.status_code == 202, response.text
    again = await http.post(url, json=body, headers=bearer(token))
    assert again.status_code == 202 and again.json()["duplicate"] is True  # idempotent by id
    return uuid.UUID(response.json()["message_id"])


def finished(count: int) -> Any:
    """Stop reading once `count` replies are done."""
    dones = 0

    def stop(event: Any) -> bool:
        nonlocal dones
        if event.event == "done":
            dones += 1
        return dones >= count

    return stop


def seqs(reader: Reader) -> list[int]:
    """The seq of every conversation event the reader got, a merged token counting for its
    range, from its last `joined` on."""
    out: list[int] = []
    for frame in reader.frames:
        if isinstance(frame, f.Joined):
            out = [frame.last_seq] if frame.history is not None else out
        elif isinstance(frame, f.Token) and frame.first_seq:
            out.extend(range(frame.first_seq, frame.seq + 1))
        elif hasattr(frame, "seq"):
            out.append(frame.seq)
    return out


class Tab:
    """`transcript` reads `.frames`; an SSE reader's frames are the same JSON."""

    def __init__(self, frames: list[f.ServerFrame]) -> None:
        self.frames = frames


async def test_sse_and_websocket_tabs_on_two_processes_get_identical_transcripts(
    sse: Sse, db: asyncpg.Pool
) -> None:
    """An SSE tab on one web process, dropped at random points and ended by the server's
    lifetime, resumes with Last-Event-ID and ends with every seq once, in order, and the
    transcript a WebSocket tab on the other process and PostgreSQL have."""
    token = mint(new_user())
    rng = random.Random(7)
    web_a, web_b = sse.webs
    async with httpx.AsyncClient() as http, await Client.connect(web_a.ws_url, token) as ws:
        conversation = await new_conversation(http, web_a, token)
        await ws.request(f.Join(conversation=conversation))
        reader = Reader()
        url = events_url(web_b, conversation)
        first = await reader.read(http, url, bearer(token), stop=lambda e: e.event == "joined")
        assert first and reader.last_id == "0"

        replies = 3

        async def talk() -> None:
            for n in range(replies):
                await say(http, web_a, token, conversation, f"question {n}")

        talking = asyncio.create_task(talk())
        done_seen = 0
        for _ in range(60):  # each read ends by a random drop, the lifetime or the last done
            budget = rng.randint(3, 40)
            got = 0

            def stop(event: Any, budget: int = budget) -> bool:
                nonlocal got, done_seen
                got += 1
                done_seen += event.event == "done"
                return done_seen >= replies or got >= budget

            await reader.read(http, url, bearer(token), stop=stop)
            if done_seen >= replies:
                break
        await talking
        assert done_seen == replies
        await ws.wait_for(
            lambda fr: (
                isinstance(fr, f.Done)
                and len(ws.events(conversation)) > 0
                and sum(isinstance(e, f.Done) for e in ws.events(conversation)) == replies
            ),
            timeout=20,
        )
        rows = await wait_persisted(db, conversation, 2 * replies)
        ended = await reader.read(http, url, bearer(token))  # silent: heartbeats, lifetime
        assert ended is False and reader.ends == 1
    got = seqs(reader)
    assert got == list(range(got[0], got[0] + len(got))), "a seq missing, twice or out of order"
    assert reader.comments >= 3  # a heartbeat every 0.5 s of the 2.5 s lifetime
    sse_transcript = transcript(Tab(reader.frames), conversation)  # type: ignore[arg-type]
    assert sse_transcript == transcript(ws, conversation)
    assert sse_transcript == [(role, text) for role, text, _status in rows]


MIXED_REPLY = "[sim:tokens=30][sim:tps=100]"
WS_TABS, SSE_TABS = 2, 2
drops = st.tuples(
    st.integers(0, WS_TABS + SSE_TABS - 1),  # which tab: the WebSocket ones first
    st.floats(0.0, 0.3),  # delay before the drop: before, during or after the reply
    st.integers(0, 1),  # the web process it comes back on
)
mixed_schedules = st.lists(st.lists(drops, min_size=1, max_size=4), min_size=2, max_size=3)


@end_to_end_examples(6)
@given(schedule=mixed_schedules)
async def test_mixed_sse_and_websocket_tabs_under_random_drops_end_identical(
    sse: Sse, db: asyncpg.Pool, schedule: list[list[tuple[int, float, int]]]
) -> None:
    """WebSocket and SSE tabs of one conversation on both web processes, each dropped at
    random points of the replies (a socket aborted, a response cut mid-stream) and back on
    a random process with `after` / `Last-Event-ID`: every tab ends with every seq once, in
    order, and the transcript PostgreSQL holds."""
    webs = sse.webs
    user = new_user()
    token = mint(user)
    driver = TabClient(user, None, webs, "driver")
    await driver.create(webs[0], title="mixed")
    conversation = driver.conversation
    assert conversation is not None
    ws_tabs = [TabClient(user, conversation, webs, f"ws{i}") for i in range(WS_TABS)]
    async with httpx.AsyncClient(timeout=20) as http:
        sse_tabs = [SseTab(http, token, f"sse{i}") for i in range(SSE_TABS)]
        try:
            await driver.join()
            for i, tab in enumerate(ws_tabs):
                await tab.join(None, webs[i % 2])
            for i, sse_tab in enumerate(sse_tabs):
                sse_tab.open(events_url(webs[(i + 1) % 2], conversation))
            for turn, steps in enumerate(schedule):
                await driver.say(f"turn {turn} {MIXED_REPLY}")
                for index, delay, web in steps:
                    await asyncio.sleep(delay)
                    if index < WS_TABS:
                        ws_tabs[index].drop()
                        await ws_tabs[index].rejoin(webs[web])
                    else:
                        await sse_tabs[index - WS_TABS].drop(events_url(webs[web], conversation))
                await until(lambda n=turn: driver.settled(2 * (n + 1)), 15, f"turn {turn}", ws_tabs)
            head = driver.last_seq or 0
            everyone = [driver, *ws_tabs]

            def at_head() -> bool:
                for sse_tab in sse_tabs:
                    if (failure := sse_tab.failed()) is not None:
                        raise AssertionError(f"{sse_tab.name} stopped reading") from failure
                return all(t.last_seq >= head for t in sse_tabs) and all(
                    (t.last_seq or 0) >= head for t in everyone
                )

            await until(at_head, 10, "every tab to reach the head", everyone)
            rows = await wait_persisted(db, conversation, 2 * len(schedule))
        finally:
            await close_all([driver, *ws_tabs])
            for sse_tab in sse_tabs:
                await sse_tab.close()
    expected = [(role, text) for role, text, _status in rows]
    check_tabs([driver, *ws_tabs], expected, schedule)
    for sse_tab in sse_tabs:
        got = seqs(sse_tab.reader)
        assert got == list(range(got[0], got[0] + len(got))), (sse_tab.name, got, schedule)
        sse_transcript = transcript(Tab(sse_tab.reader.frames), conversation)  # type: ignore[arg-type]
        assert sse_transcript == expected, (sse_tab.name, schedule)


async def test_last_event_id_older_than_the_log_gets_reset_with_history(sse: Sse) -> None:
    token = mint(new_user())
    web = sse.webs[0]
    async with httpx.AsyncClient() as http:
        conversation = await new_conversation(http, web, token)
        url = events_url(web, conversation)
        reader = Reader()
        for n in range(FILLERS):  # more events than the log keeps
            await say(http, web, token, conversation, f"filler {n}")
            await reader.read(http, url, bearer(token), stop=finished(1))
        # every reply persisted (and marked so in Redis), so the history holds them all
        redis = Redis.from_url(web.env["REDIS_URL"])
        try:
            head = int(await redis.get(keys.seq(conversation)))
            deadline = time.monotonic() + 10
            while int(await redis.get(keys.persisted(conversation)) or 0) < head:
                assert time.monotonic() < deadline, "the replies were never persisted"
                await asyncio.sleep(0.05)
        finally:
            await redis.aclose()
        reader = Reader(last_id="1")
        await reader.read(http, url, bearer(token), stop=lambda e: e.event == "joined")
        joined = reader.frames[-1]
    assert isinstance(joined, f.Joined)
    assert joined.reset is True and joined.history is not None
    assert len(joined.history) == 2 * FILLERS
    assert reader.events[-1].id == str(joined.last_seq)


async def test_stream_tickets_are_single_use_and_expire(sse: Sse) -> None:
    token = mint(new_user())
    web = sse.webs[1]
    async with httpx.AsyncClient() as http:
        url = events_url(web, await new_conversation(http, web, token))

        async def ticket() -> str:
            response = await http.post(f"{web.url}/api/stream-tickets", headers=bearer(token))
            assert response.status_code == 201, response.text
            body = response.json()
            assert body["expires_at"] > time.time()
            return str(body["ticket"])

        used = await ticket()
        reader = Reader()
        await reader.read(http, f"{url}?ticket={used}", {}, stop=lambda e: e.event == "joined")
        again = await http.get(f"{url}?ticket={used}")
        assert again.status_code == 401, "a ticket opened a second stream"
        stale = await ticket()
        await asyncio.sleep(1.3)
        expired = await http.get(f"{url}?ticket={stale}")
        assert expired.status_code == 401, "an expired ticket opened a stream"
        unticketed = await http.post(f"{web.url}/api/stream-tickets")
        assert unticketed.status_code == 401
        events = Reader()
        fresh = await ticket()
        await http.post(  # a conversation_changed for the user-events stream to carry
            f"{web.url}/api/conversations", json={"title": "later"}, headers=bearer(token)
        )
        task = asyncio.create_task(
            events.read(
                http,
                f"{web.url}/api/events?ticket={fresh}",
                {},
                stop=lambda e: e.event == "conversation_changed",
            )
        )
        await asyncio.sleep(0.3)
        created = await new_conversation(http, web, token)
        assert await asyncio.wait_for(task, 10)
    assert events.events[-1].json()["conversation"] == str(created)
    assert events.events[-1].id is None


async def test_bad_input_on_the_new_endpoints(sse: Sse) -> None:
    """Malformed bodies, wrong ids and another user's conversation: a 4xx with a JSON body,
    and nothing else."""
    token, other = mint(new_user()), mint(new_user())
    web = sse.webs[0]
    async with httpx.AsyncClient(base_url=web.url, timeout=10) as http:
        mine = await new_conversation(http, web, token)
        theirs = await new_conversation(http, web, other)
        missing = uuid.uuid4()
        base = f"/api/conversations/{mine}"
        cases: list[tuple[str, str, Any, int]] = [
            ("GET", f"/api/conversations/{theirs}/events", None, 404),
            ("GET", f"/api/conversations/{missing}/events", None, 404),
            ("GET", "/api/conversations/not-a-uuid/events", None, 404),
            ("GET", f"{base}/events?after=-1", None, 400),
            ("GET", f"{base}/events?after=abc", None, 400),
            ("POST", f"{base}/messages", b"{", 400),
            ("POST", f"{base}/messages", {"text": ""}, 400),
            ("POST", f"{base}/messages", {"text": "   "}, 400),
            ("POST", f"{base}/messages", {"text": "hi", "extra": 1}, 400),
            ("POST", f"{base}/messages", {"text": "hi", "id": "nope"}, 400),
            ("POST", f"{base}/messages", {"text": "nul \u0000"}, 400),
            ("POST", f"{base}/messages", {"text": "x" * 100_000}, 413),
            ("POST", f"/api/conversations/{theirs}/messages", {"text": "hi"}, 404),
            ("POST", f"/api/conversations/{theirs}/cancel", None, 404),
            ("POST", f"/api/conversations/{theirs}/regenerate", None, 404),
            ("POST", f"/api/conversations/{missing}/regenerate", None, 404),
            ("POST", "/api/ai/chat", b"[1,", 400),
            ("POST", "/api/ai/chat", {"id": "abc", "messages": []}, 400),
            ("POST", "/api/ai/chat", {"id": str(mine), "messages": []}, 400),
            ("POST", "/api/ai/chat", _chat(theirs, "hi"), 404),
            ("POST", "/api/ai/chat", _chat(missing, "hi"), 404),
            ("POST", "/api/ai/chat", {**_chat(mine, "hi"), "trigger": "other"}, 400),
            ("POST", "/api/ai/chat", _chat(mine, ""), 400),
            ("POST", "/api/ai/chat", {"id": str(mine), "messages": [[[[[]]]]] * 2}, 400),
            ("GET", f"/api/ai/chat/{theirs}/stream", None, 404),
            ("GET", f"/api/ai/chat/{mine}/stream", None, 204),
            ("GET", "/api/ai/chat/xyz/stream", None, 404),
            ("POST", f"/api/ai/chat/{theirs}/stop", None, 404),
            ("POST", f"/api/conversations/{missing}/cancel", None, 404),
            ("POST", f"{base}/messages", {"text": 5}, 400),
            ("POST", f"{base}/messages", b"", 400),
            ("GET", f"{base}/events?after=99999999999999999999", None, 400),
            ("POST", f"/api/ai/chat/{missing}/stop", None, 404),
            ("GET", f"/api/ai/chat/{missing}/stream", None, 404),
            ("POST", "/api/ai/chat", _chat(mine, "x" * 100_000), 413),
            ("POST", "/api/ai/chat", _chat(mine, "nul \u0000"), 400),
            ("POST", "/api/ai/chat", {**_chat(mine, "hi"), "messages": [_reply()]}, 400),
            ("POST", "/api/ai/chat", {"id": str(mine), "trigger": "regenerate-message"}, 400),
            ("GET", "/api/events?ticket=", None, 401),
        ]
        for method, path, body, status in cases:
            kwargs: dict[str, Any] = (
                {"content": body} if isinstance(body, bytes) else {"json": body}
            )
            response = await http.request(method, path, headers=bearer(token), **kwargs)
            assert response.status_code == status, (method, path, body, response.text)
            if status != 204:
                assert "detail" in response.json(), response.text
        for method, path in [("GET", f"{base}/events"), ("POST", "/api/ai/chat")]:
            response = await http.request(method, path, json={})
            assert response.status_code == 401, (method, path)
        bad = await http.get(f"{base}/events?ticket=" + "x" * 500)
        assert bad.status_code == 401
    log = web.log()
    assert "Traceback" not in log and " 500 " not in log


async def stalled_sse(web: ParleyProcess, token: str, conversation: uuid.UUID) -> Any:
    """A raw socket with a tiny receive buffer that opens the stream, reads up to its
    `joined`, then stops reading."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", web.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(
        f"GET /api/conversations/{conversation}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {token}\r\n\r\n".encode()
    )
    got = b""
    while b"event: joined" not in got:
        got += await asyncio.wait_for(reader.read(4096), 10)
    writer.transport.pause_reading()
    return writer


async def test_a_stream_that_stops_reading_gives_back_its_place(
    cluster: Cluster, db: asyncpg.Pool
) -> None:
    """An SSE client that stops reading is bounded like a socket: past the outbox's bound its
    stream lets go of the conversation and of the user's place in the per-user count, while
    its TCP connection is still open, and the reply is persisted whole."""
    tokens = 100_000  # ~20 MB of events: past the kernel's buffers and the 64 KiB outbox
    server = small_outbox_server(cluster, SLOW_SSE_DB, tokens)
    server.env["PARLEY_SERVER_SSE_MAX_LIFETIME"] = "120"
    server.env["PARLEY_WORKER_COALESCE"] = "false"  # one event per token: the ~20 MB
    start_all([server])
    user = new_user()
    token = mint(user)
    redis = Redis.from_url(redis_db(cluster.services.redis_url, SLOW_SSE_DB))
    try:
        async with httpx.AsyncClient() as http:
            conversation = await new_conversation(http, server, token)
            stalled = await stalled_sse(server, token, conversation)
            assert await places(redis, user) == 1
            await say(http, server, token, conversation, f"long [sim:tokens={tokens}][sim:tps=0]")
            rows = await wait_persisted(db, conversation, 2, timeout=90)
            held = await places(redis, user)
            still_open = not stalled.is_closing()
            stalled.close()
    finally:
        await redis.aclose()
        await asyncio.to_thread(server.stop)
    assert rows[1][2] == "complete"
    assert held == 0, "the stalled stream still holds its place"
    assert still_open
    log = server.log()
    assert "Traceback" not in log and " 500 " not in log


async def places(redis: Redis, user: str) -> int:
    counts = await redis.hvals(keys.connections(user))  # type: ignore[misc]
    return sum(int(v) for v in counts)


def _reply() -> dict[str, Any]:
    return {"id": "a1", "role": "assistant", "parts": [{"type": "text", "text": "hello"}]}


def _chat(conversation: uuid.UUID, text: str) -> dict[str, Any]:
    return {
        "id": str(conversation),
        "trigger": "submit-message",
        "messages": [{"id": "m1", "role": "user", "parts": [{"type": "text", "text": text}]}],
    }


async def persisted_message(
    web: ParleyProcess, token: str, conversation: uuid.UUID, message_id: str, status: str
) -> dict[str, Any]:
    """`message_id` from the REST transcript once it has `status` (within 10 s)."""
    async with httpx.AsyncClient() as http:
        for _ in range(100):
            detail = await http.get(
                f"{web.url}/api/conversations/{conversation}", headers=bearer(token)
            )
            found = [m for m in detail.json()["messages"] if m["id"] == message_id]
            if found and found[0]["status"] == status:
                return dict(found[0])
            await asyncio.sleep(0.1)
    raise AssertionError(f"{message_id} never became {status}: {detail.text}")


async def persisted_text(
    web: ParleyProcess, token: str, conversation: uuid.UUID, message_id: str
) -> str:
    """The text of `message_id` once the REST transcript has it complete (within 10 s)."""
    message = await persisted_message(web, token, conversation, message_id, "complete")
    return str(message["content"])


def npm_ci() -> None:
    """Install the pinned `ai` package (tests/node/package-lock.json) once."""
    if (NODE_DIR / "node_modules" / "ai" / "package.json").exists():
        return
    npm = shutil.which("npm")
    assert npm is not None, "npm is needed for the AI SDK test"
    subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, timeout=300)


async def test_ai_sdk_client_sends_drops_resumes_and_ends_with_the_persisted_text(
    sse: Sse, db: asyncpg.Pool
) -> None:
    """The real `ai` package (DefaultChatTransport, readUIMessageStream) in Node: send a
    message, drop the stream after a few deltas, resume it from Parley's log, and end with
    the text PostgreSQL holds; a resume after the reply finished gets nothing (204)."""
    await asyncio.to_thread(npm_ci)
    node = shutil.which("node")
    assert node is not None
    token = mint(new_user())
    web_a, web_b = sse.webs
    async with httpx.AsyncClient() as http:
        conversation = await new_conversation(http, web_a, token)
    result = await asyncio.to_thread(
        subprocess.run,
        [node, "ai_chat.mjs", web_a.url, web_b.url, token, str(conversation)],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["dropped_after_deltas"] >= 2
    assert out["chunk_types"][:2] == ["start", "text-start"]
    rows = await wait_persisted(db, conversation, 2)
    assert rows[0][:2] == ("user", "hello from node")
    assert rows[1][0] == "assistant" and rows[1][2] == "complete"
    assert out["text"] == rows[1][1] and out["text"]
    assert out["after_finish"] is None
    async with httpx.AsyncClient() as http:  # the UI stream's framing, read raw once more
        response = await http.post(
            f"{web_b.url}/api/ai/chat",
            json=_chat(conversation, "second question") | {"trigger": "submit-message"},
            headers=bearer(token),
            timeout=30,
        )
        regenerated = await http.post(
            f"{web_a.url}/api/ai/chat",
            json={"id": str(conversation), "messages": [], "trigger": "regenerate-message"},
            headers=bearer(token),
            timeout=30,
        )
    assert response.headers["x-vercel-ai-ui-message-stream"] == "v1"
    got = chunks(response.text)
    assert got[-1] == "[DONE]" and got[-2]["type"] == "finish"
    assert [c["type"] for c in got[:2]] == ["start", "text-start"]
    again = chunks(regenerated.text)
    assert again[-1] == "[DONE]" and again[0]["messageId"] != got[0]["messageId"]
    texts = "".join(c["delta"] for c in again if c != "[DONE]" and c["type"] == "text-delta")
    assert texts == await persisted_text(web_a, token, conversation, again[0]["messageId"])


async def test_ai_sdk_stream_carries_reasoning_as_reasoning_chunks(sse: Sse) -> None:
    """A reply that reasons first streams `reasoning-*` chunks before its text, and the
    reasoning they carry is the reasoning part Parley persisted."""
    token = mint(new_user())
    web = sse.webs[0]
    async with httpx.AsyncClient() as http:
        conversation = await new_conversation(http, web, token)
        response = await http.post(
            f"{web.url}/api/ai/chat",
            json=_chat(conversation, "think first [sim:reasoning=6] [sim:tokens=4]"),
            headers=bearer(token),
            timeout=30,
        )
    got = [c for c in chunks(response.text) if c != "[DONE]"]
    types = [c["type"] for c in got]
    assert types.index("reasoning-start") < types.index("reasoning-end") < types.index("text-delta")
    reasoning = "".join(c["delta"] for c in got if c["type"] == "reasoning-delta")
    message_id = got[0]["messageId"]
    assert await persisted_text(web, token, conversation, message_id) is not None
    async with httpx.AsyncClient() as http:
        detail = await http.get(
            f"{web.url}/api/conversations/{conversation}", headers=bearer(token)
        )
    stored = next(m for m in detail.json()["messages"] if m["id"] == message_id)
    assert stored["parts"][0] == {"kind": "reasoning", "text": reasoning} | {
        k: v for k, v in stored["parts"][0].items() if k == "duration_ms"
    }


def metric_now(web: ParleyProcess, name: str, label: str = "") -> float:
    """`name` from the process's GET /metrics, summed over its series that carry `label`
    (`outcome="ok"`; any when empty)."""
    with urllib.request.urlopen(f"{web.url}/metrics", timeout=5) as response:
        lines = response.read().decode().splitlines()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith((f"{name} ", f"{name}{{")) and label in line
    )


async def metric(web: ParleyProcess, name: str, label: str = "") -> float:
    return await asyncio.to_thread(metric_now, web, name, label)


async def read_until(
    reader: Reader, http: httpx.AsyncClient, url: str, token: str, wanted: Any
) -> Any:
    """Read (reopened with Last-Event-ID each time the server ends a response) until an
    event `wanted` accepts; that event."""
    for _ in range(20):
        if await reader.read(http, url, bearer(token), stop=wanted):
            return reader.events[-1]
    raise AssertionError("the event never came")


async def test_rest_cancel_and_regenerate_count_in_the_metrics_a_socket_moves(sse: Sse) -> None:
    """Over REST and SSE alone: a message while a reply runs is 409 `busy`, cancel stops
    it (its `done` says `cancelled`), regenerate then streams a new reply that ends as
    persisted; the turns, the cancel, the streams' resumes and the open streams show in
    the web process's metrics as a socket's would."""
    token = mint(new_user())
    web = sse.webs[0]
    names = {
        "parley_turns_total": 'outcome="ok"',
        "busy": 'outcome="busy"',
        "parley_cancels_total": "",
        "parley_rejoins_total": "",
    }

    async def now(name: str) -> float:
        counter = "parley_turns_total" if name == "busy" else name
        return await metric(web, counter, names[name])

    before = {name: await now(name) for name in names}
    async with httpx.AsyncClient(base_url=web.url, timeout=10) as http:
        conversation = await new_conversation(http, web, token)
        base = f"/api/conversations/{conversation}"
        url = events_url(web, conversation)
        reader = Reader()
        await read_until(reader, http, url, token, lambda e: e.event == "joined")
        await say(http, web, token, conversation, "a long answer [sim:tokens=60][sim:tps=20]")
        await read_until(reader, http, url, token, lambda e: e.event == "token")
        busy = await http.post(f"{base}/messages", json={"text": "and?"}, headers=bearer(token))
        assert busy.status_code == 409 and "detail" in busy.json(), busy.text
        cancelled = await http.post(f"{base}/cancel", headers=bearer(token))
        assert cancelled.status_code == 202, cancelled.text
        done = await read_until(reader, http, url, token, lambda e: e.event == "done")
        assert done.json()["reason"] == "cancelled"

        regenerated = await http.post(f"{base}/regenerate", headers=bearer(token))
        assert regenerated.status_code == 202, regenerated.text
        message_id = regenerated.json()["message_id"]
        done = await read_until(
            reader,
            http,
            url,
            token,
            lambda e: e.event == "done" and e.json()["message_id"] == message_id,
        )
        streamed = "".join(
            e.json()["text"]
            for e in reader.events
            if e.event == "token" and e.json()["message_id"] == message_id
        )
        assert streamed and streamed == await persisted_text(web, token, conversation, message_id)

        open_before = await metric(web, "parley_sse_streams_open")
        listening = asyncio.create_task(Reader().read(http, "/api/events", bearer(token)))
        for _ in range(100):
            if await metric(web, "parley_sse_streams_open") > open_before:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("an open stream is not in parley_sse_streams_open")
        listening.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listening
    gained = {name: await now(name) - before[name] for name in names}
    assert gained["parley_turns_total"] == 2  # the say and the regenerate
    assert gained["busy"] == 1
    assert gained["parley_cancels_total"] == 1
    assert gained["parley_rejoins_total"] >= 3  # each read after the first resumed
    for _ in range(100):
        if await metric(web, "parley_sse_streams_open") <= open_before:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("a closed stream stayed in parley_sse_streams_open")


async def test_ai_sdk_stop_endpoint_stops_the_running_reply(sse: Sse) -> None:
    """`POST /api/ai/chat/{id}/stop` on another web process stops the model: the open UI
    message stream ends with `finish {finishReason: "other"}` and `[DONE]`, its text is
    what Parley persisted as cancelled, and a stop with nothing running is a 204 too."""
    token = mint(new_user())
    web_a, web_b = sse.webs
    stop_url = ""
    got: list[Any] = []
    async with httpx.AsyncClient(timeout=30) as http:
        conversation = await new_conversation(http, web_a, token)
        stop_url = f"{web_b.url}/api/ai/chat/{conversation}/stop"
        body = _chat(conversation, "talk for long [sim:tokens=60][sim:tps=20]")
        async with http.stream(
            "POST", f"{web_a.url}/api/ai/chat", json=body, headers=bearer(token)
        ) as response:
            assert response.is_success, response.status_code
            stopped = False
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                got.append(data if data == "[DONE]" else json.loads(data))
                deltas = sum(c != "[DONE]" and c["type"] == "text-delta" for c in got)
                if deltas >= 3 and not stopped:
                    stop = await http.post(stop_url, headers=bearer(token))
                    assert stop.status_code == 204, stop.text
                    stopped = True
        idle_stop = await http.post(stop_url, headers=bearer(token))
    assert idle_stop.status_code == 204
    assert got[-1] == "[DONE]" and got[-2] == {"type": "finish", "finishReason": "other"}
    message_id = got[0]["messageId"]
    streamed = "".join(c["delta"] for c in got[:-1] if c["type"] == "text-delta")
    stored = await persisted_message(web_a, token, conversation, message_id, "cancelled")
    assert stored["content"] == streamed  # cancelled where the stream ended


async def test_a_refused_ai_chat_request_gives_back_the_stream_it_opened(sse: Sse) -> None:
    """`POST /api/ai/chat` opens its stream before it starts the turn (so no event is
    missed); a turn then refused (nothing to regenerate, busy) answers 4xx and gives back
    the stream's place in the user's count at once, so refusals never add up to a 429."""
    user = new_user()
    token = mint(user)
    web = sse.webs[0]
    redis = Redis.from_url(web.env["REDIS_URL"])
    try:
        async with httpx.AsyncClient(base_url=web.url, timeout=10) as http:
            conversation = await new_conversation(http, web, token)
            regenerate = {"id": str(conversation), "trigger": "regenerate-message"}
            for _ in range(3):
                refused = await http.post("/api/ai/chat", json=regenerate, headers=bearer(token))
                assert refused.status_code == 400, refused.text
            for _ in range(50):
                if await places(redis, user) == 0:
                    break
                await asyncio.sleep(0.02)
            held = await places(redis, user)
    finally:
        await redis.aclose()
    assert held == 0, f"{held} places still held by refused requests"
