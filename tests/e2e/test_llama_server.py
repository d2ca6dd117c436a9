"""Parley against an OpenAI-compatible server no one here wrote: llama.cpp's own
`llama-server`, started on 127.0.0.1 with a tiny model the test writes (tests/helpers/llama.py
says how its replies are known in advance). Parley's worker reaches it through the real
`openai` client exactly as it would reach a production endpoint.

What is proven: llama.cpp's streaming format, its usage chunk (`stream_options`), its finish
reasons `stop` and `length`, and that a cancelled turn closes the request so that the server
stops generating. The binary is built once by scripts/build-llama-server.sh (.ci/run does
it); without it these tests are skipped and say how to build it.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import openai
import pytest

from protocol import frames as f
from server.dev.client import Client
from tests.helpers import llama
from tests.helpers.auth import mint, new_user
from tests.helpers.conversations import say_and_finish, start_conversation, wait_persisted
from tests.helpers.processes import Cluster, Db, ParleyProcess, redis_db, start_all, stop_together

LONG = 16000
"""max_tokens of the Parley whose turns run long enough to be cancelled mid-stream."""
SHORT = 24
"""max_tokens of the Parley whose looping reply is cut at max_tokens."""

MISSING = llama.missing_reason()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=str(MISSING))


@dataclass
class Direct:
    """What llama-server streams to a plain `openai` client for one user message."""

    text: str
    pieces: int
    finish: str | None
    usage: tuple[int, int] | None


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[llama.LlamaServer]:
    binary = llama.cached_binary()
    assert binary is not None
    tmp = tmp_path_factory.mktemp("llama")
    model = llama.write_model(tmp / "bigram.gguf")
    started = llama.LlamaServer(binary, model, tmp / "llama-server.log").start()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def parleys(cluster: Cluster, server: llama.LlamaServer) -> Iterator[dict[int, ParleyProcess]]:
    """Two `parley serve` on llama-server, each on its own Redis database (a worker takes
    any turn of its database): max_tokens LONG and SHORT."""

    def serve(db: Db, max_tokens: int) -> ParleyProcess:
        return cluster.process(
            "serve",
            start=False,
            REDIS_URL=redis_db(cluster.services.redis_url, db),
            OPENAI_BASE_URL=f"{server.url}/v1",
            OPENAI_API_KEY="no-key-needed",
            PARLEY_LLM_MODEL="bigram",
            PARLEY_LLM_MAX_TOKENS=str(max_tokens),
        )

    found = {LONG: serve(Db.LLAMA, LONG), SHORT: serve(Db.LLAMA_SHORT, SHORT)}
    start_all(found.values())
    yield found
    stop_together(found.values())


async def direct(server: llama.LlamaServer, text: str, max_tokens: int) -> Direct:
    """Stream one reply from llama-server with the `openai` client, as Parley asks for it."""
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="no-key-needed")
    pieces: list[str] = []
    finish: str | None = None
    usage: tuple[int, int] | None = None
    try:
        stream = await client.chat.completions.create(
            model="bigram",
            messages=[{"role": "user", "content": text}],
            stream=True,
            stream_options={"include_usage": True},
            max_tokens=max_tokens,
        )
        async for chunk in stream:
            for choice in chunk.choices:
                if choice.delta.content:
                    pieces.append(choice.delta.content)
                finish = choice.finish_reason or finish
            if chunk.usage is not None:
                usage = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
    finally:
        await client.close()
    return Direct("".join(pieces), len(pieces), finish, usage)


def tokens(done: f.Done) -> tuple[int, int] | None:
    """The prompt and completion tokens `done` reports."""
    return None if done.usage is None else (done.usage.prompt_tokens, done.usage.completion_tokens)


def reply_text(client: Client, conversation: uuid.UUID) -> str:
    """The assistant's text as token frames carried it."""
    return "".join(fr.text for fr in client.events(conversation) if isinstance(fr, f.Token))


async def test_a_reply_streams_as_llama_server_sent_it(
    server: llama.LlamaServer, parleys: dict[int, ParleyProcess], db: asyncpg.Pool
) -> None:
    question = "Are you there?"
    expected = await direct(server, question, LONG)
    assert expected.text == llama.ANSWER and expected.pieces > 1 and expected.finish == "stop"
    assert expected.usage is not None and expected.usage[1] >= len(llama.ANSWER)

    async with await Client.connect(parleys[LONG].ws_url, mint(new_user())) as client:
        conversation = await start_conversation(client)
        done = await say_and_finish(client, conversation, question)
        text = reply_text(client, conversation)
    assert done.reason == "stop", done
    assert tokens(done) == expected.usage  # read from llama-server's usage chunk
    assert text == expected.text
    rows = await wait_persisted(db, conversation, 2)
    assert rows[1] == ("assistant", expected.text, "complete")


async def test_max_tokens_ends_the_reply_with_length(
    server: llama.LlamaServer, parleys: dict[int, ParleyProcess], db: asyncpg.Pool
) -> None:
    question = "Say z until you must stop " + llama.LOOP
    expected = await direct(server, question, SHORT)
    assert expected.text == llama.LOOPED * SHORT and expected.finish == "length"

    async with await Client.connect(parleys[SHORT].ws_url, mint(new_user())) as client:
        conversation = await start_conversation(client)
        done = await say_and_finish(client, conversation, question)
        text = reply_text(client, conversation)
    assert done.reason == "length", done
    assert expected.usage is not None and expected.usage[1] == SHORT
    assert tokens(done) == expected.usage
    assert text == expected.text
    rows = await wait_persisted(db, conversation, 2)
    assert rows[1][1] == text


async def slot_when_idle(server: llama.LlamaServer, seconds: float) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    slot = await asyncio.to_thread(server.slot)
    while slot["is_processing"] and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        slot = await asyncio.to_thread(server.slot)
    return slot


async def test_a_cancelled_turn_stops_llama_server_generating(
    server: llama.LlamaServer, parleys: dict[int, ParleyProcess], db: asyncpg.Pool
) -> None:
    async with await Client.connect(parleys[LONG].ws_url, mint(new_user())) as client:
        conversation = await start_conversation(client)
        await client.request(f.Say(conversation=conversation, text="Go on and on " + llama.LOOP))
        await client.wait_for(lambda fr: isinstance(fr, f.Token), timeout=60)
        generating = await asyncio.to_thread(server.slot)
        assert generating["is_processing"], generating
        await client.request(f.Cancel(conversation=conversation))
        done = await client.wait_for(lambda fr: isinstance(fr, f.Done), timeout=30)
        text = reply_text(client, conversation)
    assert done.reason == "cancelled"

    task = generating["id_task"]
    slot = await slot_when_idle(server, 15)
    assert not slot["is_processing"] and slot["id_task"] == task, slot
    log = server.log()
    assert f"cancel task, id_task = {task}" in log  # Parley closed the request
    released = re.search(rf"task {task} \| stop processing: n_tokens = (\d+)", log)
    assert released is not None, log[-3000:]
    assert len(text) < int(released[1]) < LONG  # prompt and reply: it stopped long before LONG
    rows = await wait_persisted(db, conversation, 2)
    assert rows[1] == ("assistant", text, "cancelled") and text == llama.LOOPED * len(text)
