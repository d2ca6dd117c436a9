"""Message parts end to end against real `parley serve` processes: reasoning streamed, resumed
and persisted, never sent back to the model; every finish reason; usage reported or counted."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest

from protocol import frames as f
from server.dev.client import Client
from tests.helpers.auth import mint, new_user
from tests.helpers.conversations import (
    assert_contiguous,
    folded,
    say_and_finish,
    start_conversation,
    stored_reply,
    transcript,
    wait_persisted,
)
from tests.helpers.processes import Cluster, Db, ParleyProcess, model_stats, redis_db

THINKING = "[sim:reasoning=12][sim:tokens=10][sim:tps=60]"


async def history(client: Client, conversation: uuid.UUID) -> list[f.Message]:
    """The persisted transcript as a fresh tab's `joined` gets it."""
    joined = await client.request(f.Join(conversation=conversation))
    assert joined.history is not None
    return list(joined.history)


def encoded(parts: list[f.Part]) -> bytes:
    return msgspec.json.encode(parts)


async def test_reasoning_streams_resumes_and_persists_byte_for_byte(
    connect: Any, user: str, db: asyncpg.Pool, parley: ParleyProcess
) -> None:
    a: Client = await connect(user)
    conversation = await start_conversation(a)
    c: Client = await connect(user)  # there from the start, then leaves and rejoins
    await c.request(f.Join(conversation=conversation))
    said = len(a.frames)
    await a.request(f.Say(conversation=conversation, text=f"think first {THINKING}"))
    await a.wait_for(lambda fr: isinstance(fr, f.PartDelta), start=said)
    b: Client = await connect(user)  # joins in the middle of the reasoning
    joined = await b.request(f.Join(conversation=conversation))
    held = await c.wait_for(lambda fr: isinstance(fr, f.PartDelta))
    await c.request(f.Leave(conversation=conversation))
    await c.request(f.Join(conversation=conversation, after=held.seq))
    done = await a.wait_for(lambda fr: isinstance(fr, f.Done), start=said)
    for tab in (b, c):
        await tab.wait_for(lambda fr: isinstance(fr, f.Done))
    message_id = done.message_id
    await wait_persisted(db, conversation, 2)
    reader: Client = await connect(user)
    stored = (await history(reader, conversation))[-1]
    assert stored.parts is not None and [p.kind for p in stored.parts] == ["reasoning", "text"]
    assert stored.parts[0].text.strip() and stored.parts[0].duration_ms
    for tab in (a, b, c):
        assert encoded(folded(tab, message_id)) == encoded(stored.parts)
    row = await stored_reply(db, conversation, message_id)  # PostgreSQL's own row
    assert row.parts is not None and encoded(row.parts) == encoded(stored.parts)
    assert (row.content, row.usage) == (stored.content, done.usage) and done.usage is not None
    assert_contiguous(b, conversation, joined.last_seq + 1)
    # a client that knows only `token` sees the answer's text, and nothing of the reasoning
    assert transcript(a, conversation)[-1] == ("assistant", stored.content)
    assert stored.content == stored.parts[1].text
    async with httpx.AsyncClient(base_url=parley.url) as http:
        got = await http.get(
            f"/api/conversations/{conversation}", headers={"Authorization": f"Bearer {mint(user)}"}
        )
    rest = msgspec.convert(got.json()["messages"][-1], f.Message)
    assert encoded(rest.parts or []) == encoded(stored.parts)
    # the next turn's prompt holds the answer but not the reasoning
    await say_and_finish(a, conversation, "and then? [sim:tokens=3]")
    asked = (await model_stats(parley))["recent_messages"]
    ours = [m for m in asked if m[-1]["content"] == "and then? [sim:tokens=3]"]
    assert ours, f"not among the model's last {len(asked)} requests"
    sent = ours[-1]
    assert {"role": "assistant", "content": stored.content} in sent
    assert not any(stored.parts[0].text in m["content"] for m in sent)


async def test_a_rejoin_with_after_mid_reasoning_continues_the_part(
    connect: Any, user: str
) -> None:
    a: Client = await connect(user)
    conversation = await start_conversation(a)
    await a.request(f.Say(conversation=conversation, text=f"slow {THINKING}"))
    delta = await a.wait_for(lambda fr: isinstance(fr, f.PartDelta))
    await a.request(f.Leave(conversation=conversation))
    await asyncio.sleep(0.05)
    mark = len(a.frames)
    await a.request(f.Join(conversation=conversation, after=delta.seq))
    done = await a.wait_for(lambda fr: isinstance(fr, f.Done), start=mark)
    parts = folded(a, done.message_id)
    assert [p.kind for p in parts] == ["reasoning", "text"]
    assert len(parts[0].text.split()) == 12


@pytest.mark.parametrize(
    ("control", "reason", "status"),
    [
        ("[sim:tokens=5]", "stop", "complete"),
        ("[sim:tokens=5][sim:finish=length]", "length", "complete"),
        ("[sim:tokens=6][sim:finish=content_filter]", "content_filter", "complete"),
        ("[sim:tokens=5][sim:finish=tool_calls]", "tool_calls", "complete"),
        ("[sim:error]", "error", "error"),
    ],
)
async def test_each_finish_reason_reaches_the_tab_and_the_transcript(
    connect: Any, user: str, db: asyncpg.Pool, control: str, reason: str, status: str
) -> None:
    a: Client = await connect(user)
    conversation = await start_conversation(a)
    done = await say_and_finish(a, conversation, f"end as told {control}")
    assert done.reason == reason
    await wait_persisted(db, conversation, 2)
    stored = (await history(a, conversation))[-1]
    assert (stored.status, stored.reason) == (status, None if reason == "stop" else reason)
    row = await stored_reply(db, conversation, done.message_id)
    assert (row.status, row.reason) == (stored.status, stored.reason)


async def test_cancelled_mid_reasoning_keeps_the_reasoning_and_counts_its_tokens(
    connect: Any, user: str, db: asyncpg.Pool
) -> None:
    a: Client = await connect(user)
    conversation = await start_conversation(a)
    await a.request(f.Say(conversation=conversation, text="[sim:reasoning=400][sim:tps=50] q"))
    await a.wait_for(lambda fr: isinstance(fr, f.PartDelta) and fr.seq > 6)
    await a.request(f.Cancel(conversation=conversation))
    done = await a.wait_for(lambda fr: isinstance(fr, f.Done))
    assert done.reason == "cancelled" and done.usage is not None and done.usage.estimated
    assert done.usage.completion_tokens == done.usage.reasoning_tokens
    assert done.usage.completion_tokens and done.usage.prompt_tokens
    await wait_persisted(db, conversation, 2)
    stored = (await history(a, conversation))[-1]
    assert stored.status == "cancelled" and stored.usage == done.usage
    assert stored.parts is not None and stored.parts[0].kind == "reasoning"
    row = await stored_reply(db, conversation, done.message_id)
    assert (row.status, row.reason, row.usage) == ("cancelled", "cancelled", done.usage)
    assert row.parts is not None and encoded(row.parts) == encoded(stored.parts)


async def test_usage_details_timing_and_estimates(
    connect: Any, user: str, db: asyncpg.Pool
) -> None:
    a: Client = await connect(user)
    conversation = await start_conversation(a)
    done = await say_and_finish(a, conversation, "[sim:reasoning=3][sim:tokens=4] one")
    assert done.usage is not None and not done.usage.estimated
    assert done.usage.reasoning_tokens is None  # not reported: not made up
    detailed = await say_and_finish(a, conversation, "[sim:reasoning=3][sim:usage=details] two")
    usage = detailed.usage
    assert usage is not None and usage.reasoning_tokens == 3 and usage.cached_prompt_tokens
    assert usage.first_token_ms is not None and usage.duration_ms is not None
    assert 0 < usage.first_token_ms <= usage.duration_ms
    bare = await say_and_finish(a, conversation, "[sim:usage=none][sim:tokens=7] three")
    assert bare.usage is not None and bare.usage.estimated
    assert 7 <= bare.usage.completion_tokens <= 30 and bare.usage.prompt_tokens > 10
    await wait_persisted(db, conversation, 6)  # each reply's usage, in its own row
    for reply in (done, detailed, bare):
        assert (await stored_reply(db, conversation, reply.message_id)).usage == reply.usage


@pytest.fixture(scope="module")
def think_server(cluster: Cluster) -> Iterator[ParleyProcess]:
    proc = cluster.process(
        "serve",
        REDIS_URL=redis_db(cluster.services.redis_url, Db.THINK_TAGS),
        PARLEY_LLM_THINK_TAGS="true",
    )
    yield proc
    proc.stop()


async def test_inline_think_tags_become_a_reasoning_part(think_server: ParleyProcess) -> None:
    async with await Client.connect(think_server.ws_url, mint(new_user())) as a:
        conversation = await start_conversation(a)
        text = "[sim:reasoning=5][sim:reasoning_field=think][sim:tokens=4] q"
        done = await say_and_finish(a, conversation, text)
        parts = folded(a, done.message_id)
    assert [p.kind for p in parts] == ["reasoning", "text"]
    assert len(parts[0].text.split()) == 5 and "<" not in parts[0].text + parts[1].text
