"""One conversation end to end against a real `parley serve` process: WebSocket, Redis fan-out,
the simulated model over HTTP through the openai client, PostgreSQL."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from typing import Any

import asyncpg
import pytest

from protocol import frames as f
from server.dev.client import Client, ProtocolError
from tests.helpers.auth import mint, new_user
from tests.helpers.conversations import (
    assert_contiguous,
    event_frames,
    say_and_finish,
    start_conversation,
    transcript,
    wait_persisted,
)
from tests.helpers.processes import BACKENDS, Cluster, Db, ParleyProcess, clusters_for, redis_db

SLOW = "[sim:tokens=60][sim:tps=120]"


@pytest.fixture(scope="module", params=BACKENDS)
def parley(
    request: pytest.FixtureRequest, parley: ParleyProcess, cluster: Cluster
) -> ParleyProcess:
    """The session's `parley serve` on a single Redis, and one on a Redis Cluster of its own:
    every test here runs against both."""
    clusters = clusters_for(request)
    if clusters is None:
        return parley
    return cluster.process("serve", **clusters.backend().env())


# --------------------------------------------------------------------------- fan-out


async def test_two_tabs_see_byte_identical_events(connect: Any, user: str) -> None:
    a: Client = await connect(user)
    b: Client = await connect(user)
    conversation = await start_conversation(a, title="two tabs")
    await b.request(f.Join(conversation=conversation))
    done = await say_and_finish(a, conversation, "Tell me about fan-out")
    await b.wait_for(lambda fr: isinstance(fr, f.Done) and fr.message_id == done.message_id)
    assert done.reason == "stop" and done.usage and done.usage.completion_tokens > 0
    assert event_frames(a, conversation) == event_frames(b, conversation)
    assert_contiguous(a, conversation, 1)
    kinds = [type(fr).__name__ for fr in a.events(conversation)]
    assert kinds[:2] == ["MessageEvent", "Start"] and kinds[-1] == "Done"


async def test_chunks_faster_than_redis_round_trips_become_fewer_identical_events(
    connect: Any, user: str, db: asyncpg.Pool
) -> None:
    """A model sending its chunks back to back: the worker joins the chunks that arrive
    while its previous appends are on their way to Redis, so the tabs get fewer token
    events, byte-identical on each tab, holding exactly the text PostgreSQL keeps."""
    a: Client = await connect(user)
    b: Client = await connect(user)
    conversation = await start_conversation(a, title="fast model")
    await b.request(f.Join(conversation=conversation))
    done = await say_and_finish(a, conversation, "fast [sim:tokens=400][sim:tps=0]")
    await b.wait_for(lambda fr: isinstance(fr, f.Done) and fr.message_id == done.message_id)
    assert done.usage is not None and done.usage.completion_tokens == 400
    assert event_frames(a, conversation) == event_frames(b, conversation)
    assert_contiguous(a, conversation, 1)
    tokens = [fr for fr in a.events(conversation) if isinstance(fr, f.Token)]
    assert 0 < len(tokens) < 400
    rows = await wait_persisted(db, conversation, 2)
    assert rows[-1][1] == "".join(token.text for token in tokens)


async def test_third_tab_joining_mid_stream_ends_identical(connect: Any, user: str) -> None:
    a: Client = await connect(user)
    conversation = await start_conversation(a)
    await a.request(f.Say(conversation=conversation, text=f"stream slowly {SLOW}"))
    await asyncio.sleep(random.uniform(0.05, 0.4))
    c: Client = await connect(user)
    joined = await c.request(f.Join(conversation=conversation))
    assert joined.history is not None
    await a.wait_for(lambda fr: isinstance(fr, f.Done))
    await c.wait_for(lambda fr: isinstance(fr, f.Done))
    assert transcript(c, conversation) == transcript(a, conversation)
    assert_contiguous(c, conversation, joined.last_seq + 1)


async def test_rejoin_with_after_fills_exactly_the_gap(connect: Any, user: str) -> None:
    a: Client = await connect(user)
    conversation = await start_conversation(a)
    b: Client = await connect(user)
    await b.request(f.Join(conversation=conversation))
    await a.request(f.Say(conversation=conversation, text=f"gap test {SLOW}"))
    await b.wait_for(lambda fr: isinstance(fr, f.Token))
    last = max(fr.seq for fr in b.events(conversation))
    await b.close()
    await asyncio.sleep(0.15)
    b2: Client = await connect(user)
    joined = await b2.request(f.Join(conversation=conversation, after=last))
    assert joined.history is None and joined.last_seq == last and not joined.reset
    await a.wait_for(lambda fr: isinstance(fr, f.Done))
    await b2.wait_for(lambda fr: isinstance(fr, f.Done))
    a_after = [raw for raw in event_frames(a, conversation) if f.seq_of(raw.encode()) > last]
    assert event_frames(b2, conversation) == a_after
    assert_contiguous(b2, conversation, last + 1)


async def test_every_socket_of_the_user_hears_of_a_new_conversation(
    connect: Any, user: str
) -> None:
    a: Client = await connect(user)
    b: Client = await connect(user)
    stranger: Client = await connect()
    created = await a.request(f.Create(title="announced"))
    changed = await b.wait_for(lambda fr: isinstance(fr, f.ConversationChanged))
    assert changed.conversation == created.conversation and changed.meta.title == "announced"
    await asyncio.sleep(0.1)
    assert not [fr for fr in stranger.frames if isinstance(fr, f.ConversationChanged)]


# --------------------------------------------------------------------------- turns


async def test_cancel_from_another_tab(connect: Any, user: str, db: asyncpg.Pool) -> None:
    a: Client = await connect(user)
    b: Client = await connect(user)
    conversation = await start_conversation(a)
    await b.request(f.Join(conversation=conversation))
    await a.request(f.Say(conversation=conversation, text="[sim:tokens=400][sim:tps=50] go"))
    await a.wait_for(lambda fr: isinstance(fr, f.Token))
    sent = time.monotonic()
    await b.request(f.Cancel(conversation=conversation))
    done = await a.wait_for(lambda fr: isinstance(fr, f.Done))
    assert done.reason == "cancelled"
    assert time.monotonic() - sent < 0.5
    rows = await wait_persisted(db, conversation, 2)
    assert rows[1][0] == "assistant" and rows[1][2] == "cancelled"
    partial = "".join(fr.text for fr in a.events(conversation) if isinstance(fr, f.Token))
    assert rows[1][1] == partial and partial


async def test_a_cancel_right_after_say_ends_the_turn_cancelled(connect: Any, user: str) -> None:
    """Sent as soon as `say` is acknowledged, a cancel reaches the turn wherever it is then:
    not claimed yet (the cancel mark that `begin` reads), claimed and starting (the claim
    step registered it), or streaming."""
    a: Client = await connect(user)
    conversation = await start_conversation(a)
    for _ in range(3):
        start = len(a.frames)
        await a.request(f.Say(conversation=conversation, text="[sim:tokens=400][sim:tps=50] go"))
        await a.request(f.Cancel(conversation=conversation))
        done = await a.wait_for(lambda fr: isinstance(fr, f.Done), start=start)
        assert done.reason == "cancelled"


async def test_same_say_id_twice_is_one_turn(connect: Any, user: str, db: asyncpg.Pool) -> None:
    a: Client = await connect(user)
    conversation = await start_conversation(a)
    message_id = uuid.uuid4()
    first = await a.request(f.Say(conversation=conversation, text="once", id=message_id))
    second = await a.request(f.Say(conversation=conversation, text="once", id=message_id))
    assert first.message_id == second.message_id == message_id
    assert not first.duplicate and second.duplicate
    await a.wait_for(lambda fr: isinstance(fr, f.Done))
    await asyncio.sleep(0.2)
    assert sum(isinstance(fr, f.MessageEvent) for fr in a.events(conversation)) == 1
    rows = await wait_persisted(db, conversation, 2)
    assert [r[0] for r in rows] == ["user", "assistant"]


async def test_busy_while_generating(connect: Any, user: str) -> None:
    a: Client = await connect(user)
    conversation = await start_conversation(a)
    await a.request(f.Say(conversation=conversation, text=f"first {SLOW}"))
    with pytest.raises(ProtocolError) as refused:
        await a.request(f.Say(conversation=conversation, text="second"))
    assert refused.value.error.code == "busy"
    await a.wait_for(lambda fr: isinstance(fr, f.Done))


async def test_regenerate_replaces_the_last_reply(
    connect: Any, user: str, db: asyncpg.Pool
) -> None:
    a: Client = await connect(user)
    conversation = await start_conversation(a)
    first = await say_and_finish(a, conversation, "Write me a haiku")
    start = len(a.frames)
    await a.request(f.Regenerate(conversation=conversation))
    started = await a.wait_for(lambda fr: isinstance(fr, f.Start), start=start)
    assert started.replaces == first.message_id and started.message_id != first.message_id
    await a.wait_for(lambda fr: isinstance(fr, f.Done), start=start)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        ids = [
            r["id"]
            for r in await db.fetch(
                "SELECT id FROM messages WHERE conversation_id = $1 ORDER BY seq", conversation
            )
        ]
        if started.message_id in ids:
            break
        await asyncio.sleep(0.05)
    assert first.message_id not in ids and started.message_id in ids and len(ids) == 2


async def test_context_carries_the_system_prompt_and_earlier_turns(connect: Any, user: str) -> None:
    """The simulated model's reply is a function of the whole prompt: the same last message
    after different histories gets different replies."""
    a: Client = await connect(user)
    one = await start_conversation(a, system="You are terse.")
    two = await start_conversation(a, system="You are verbose.")
    await say_and_finish(a, one, "hello")
    await say_and_finish(a, two, "hello")
    assert transcript(a, one)[1][1] != transcript(a, two)[1][1]


# --------------------------------------------------------------------------- persistence


async def test_finished_turn_is_in_postgres_once_and_survives_restart(
    cluster: Cluster, db: asyncpg.Pool
) -> None:
    server = cluster.process("serve", REDIS_URL=redis_db(cluster.services.redis_url, Db.RESTART))
    user = new_user()
    async with await Client.connect(server.ws_url, mint(user)) as a:
        conversation = await start_conversation(a, title="durable")
        done = await say_and_finish(a, conversation, "remember this")
    rows = await wait_persisted(db, conversation, 2)
    count = await db.fetchval("SELECT count(*) FROM messages WHERE id = $1", done.message_id)
    assert count == 1 and rows[0] == ("user", "remember this", "complete")
    server.stop()
    server = ParleyProcess(server.role, server.env, server.port, server.log_path).start()
    cluster.started.append(server)
    async with await Client.connect(server.ws_url, mint(user)) as b:
        joined = await b.request(f.Join(conversation=conversation))
    assert [(m.role, m.content) for m in joined.history] == [(r[0], r[1]) for r in rows]
    assert joined.meta.title == "durable"
    server.stop()


async def test_rest_api_lists_and_hides_other_users(parley: ParleyProcess, connect: Any) -> None:
    import json
    import urllib.error
    import urllib.request

    user = new_user()
    a: Client = await connect(user)
    conversation = await start_conversation(a, title="mine")
    await say_and_finish(a, conversation, "hi")

    def get(path: str, who: str) -> tuple[int, Any]:
        request = urllib.request.Request(
            parley.url + path, headers={"Authorization": f"Bearer {mint(who)}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, None

    status, listed = await asyncio.to_thread(get, "/api/conversations", user)
    assert status == 200 and [c["id"] for c in listed] == [str(conversation)]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status, detail = await asyncio.to_thread(get, f"/api/conversations/{conversation}", user)
        if len(detail["messages"]) == 2:
            break
        await asyncio.sleep(0.1)
    assert status == 200 and detail["meta"]["title"] == "mine"
    assert [m["role"] for m in detail["messages"]] == ["user", "assistant"]
    other, _ = await asyncio.to_thread(get, f"/api/conversations/{conversation}", new_user())
    missing, _ = await asyncio.to_thread(get, f"/api/conversations/{uuid.uuid4()}", user)
    assert other == missing == 404
    stranger: Client = await connect()
    with pytest.raises(ProtocolError) as refused:
        await stranger.request(f.Join(conversation=conversation))
    assert refused.value.error.code == "not_found"


# --------------------------------------------------------------------------- auth


async def expect_close(client: Client, timeout: float = 5) -> int | None:
    code, _ = await asyncio.wait_for(client.closed, timeout)
    return code


@pytest.mark.parametrize(
    "token",
    [
        pytest.param(
            lambda: mint(new_user(), secret="wrong-secret-0123456789abcdef012345"),
            id="bad-signature",
        ),
        pytest.param(lambda: mint(new_user(), ttl=-60), id="expired"),
        pytest.param(lambda: _unsigned(new_user()), id="alg-none"),
        pytest.param(lambda: "not-a-jwt", id="garbage"),
    ],
)
@pytest.mark.parametrize("via", ["header", "frame"])
async def test_bad_tokens_get_4401(parley: ParleyProcess, token: Any, via: str) -> None:
    client = await Client.connect(parley.ws_url, token(), via=via, wait_ready=False)
    assert await expect_close(client) == 4401


async def test_no_token_gets_4401(parley: ParleyProcess) -> None:
    client = await Client.connect(parley.ws_url, None)
    await client.send(f.Ping())
    assert await expect_close(client) == 4401


def _unsigned(user: str) -> str:
    import base64
    import json

    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    claims = {"sub": user, "exp": int(time.time()) + 600}
    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


async def test_foreign_origin_gets_403(parley: ParleyProcess) -> None:
    import websockets

    with pytest.raises(websockets.InvalidStatus) as refused:
        await Client.connect(parley.ws_url, mint(new_user()), origin="https://evil.example")
    assert refused.value.response.status_code == 403
    same = await Client.connect(parley.ws_url, mint(new_user()), origin=parley.url)
    await same.close()


async def test_token_expiry_closes_and_reauth_extends(parley: ParleyProcess) -> None:
    user = new_user()
    short = await Client.connect(parley.ws_url, mint(user, ttl=-8))  # inside the 10 s leeway
    # Closed at the end of auth.refresh_grace (25 s after expiry), after a `refresh` hint.
    assert await expect_close(short, timeout=20) == 4401
    assert any(isinstance(frame, f.Refresh) for frame in short.frames)
    kept = await Client.connect(parley.ws_url, mint(user, ttl=-8))
    await kept.request(f.Auth(token=mint(user, ttl=600)))
    await asyncio.sleep(3)
    assert not kept.closed.done()
    other = await kept.request(f.Ping())
    assert isinstance(other, f.Pong)
    kept.frames.clear()
    await kept.send(f.Auth(token=mint(new_user(), ttl=600)))
    assert await expect_close(kept) == 4401
