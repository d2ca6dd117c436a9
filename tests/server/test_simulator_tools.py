"""The simulated model calling tools, read through the real openai client over HTTP: the
streamed fragments put together by protocol/toolcalls.py, then the answer from the results."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest_asyncio
from openai.types.chat import ChatCompletionChunk

from protocol.toolcalls import Calls, ToolCall, assistant_message, read_fragment, tool_message
from tests.helpers.simulated import serving

TOOLS = [
    {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "clock", "parameters": {"type": "object"}}},
]


@pytest_asyncio.fixture(scope="module")
async def client() -> AsyncIterator[openai.AsyncOpenAI]:
    async with (
        serving() as sim,
        openai.AsyncOpenAI(base_url=sim.base_url, api_key="sim", max_retries=0) as c,
    ):
        yield c


async def stream(client: openai.AsyncOpenAI, messages: list[Any]) -> list[ChatCompletionChunk]:
    chunks = await client.chat.completions.create(
        model="m", messages=messages, tools=TOOLS, stream=True
    )
    return [chunk async for chunk in chunks]


def calls_of(chunks: list[ChatCompletionChunk]) -> tuple[list[ToolCall], int, str | None]:
    """The complete calls, how many fragments carried them, and the finish reason."""
    calls, fragments, finish = Calls(), 0, None
    for chunk in chunks:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or ():
                fragments += 1
                calls.add(read_fragment(delta))
            finish = choice.finish_reason or finish
    return calls.finish(), fragments, finish


async def test_parallel_calls_stream_in_fragments_and_come_back_whole(
    client: openai.AsyncOpenAI,
) -> None:
    text = 'Plan [sim:tool=weather {"city": "Zürich", "days": 3}] and [sim:tool=clock]'
    chunks = await stream(client, [{"role": "user", "content": text}])
    calls, fragments, finish = calls_of(chunks)
    assert finish == "tool_calls"
    assert [(c.index, c.name, json.loads(c.arguments)) for c in calls] == [
        (0, "weather", {"city": "Zürich", "days": 3}),
        (1, "clock", {}),
    ]
    assert fragments > 10  # the arguments came in many pieces
    assert all(c.id.startswith("call_") and c.problem is None for c in calls)
    assert not any(ch.choices and ch.choices[0].delta.content for ch in chunks)


async def test_with_the_results_it_answers_from_them(client: openai.AsyncOpenAI) -> None:
    question = {"role": "user", "content": 'Weather? [sim:tool=weather {"city": "Oslo"}]'}
    calls, _, _ = calls_of(await stream(client, [question]))
    history = [
        question,
        assistant_message("", calls),
        tool_message(calls[0].id, '{"sky": "clear"}'),
    ]
    chunks = await stream(client, history)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == 'weather answered: {"sky": "clear"}'
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    plain = await client.chat.completions.create(model="m", messages=history, tools=TOOLS)
    assert plain.choices[0].message.content == text


async def test_repeat_calls_again_after_results(client: openai.AsyncOpenAI) -> None:
    question = {"role": "user", "content": "[sim:tool=clock] [sim:tool_repeat]"}
    calls, _, _ = calls_of(await stream(client, [question]))
    history = [question, assistant_message("", calls), tool_message(calls[0].id, "12:00")]
    again, _, finish = calls_of(await stream(client, history))
    assert finish == "tool_calls" and [c.name for c in again] == ["clock"]


async def test_the_non_streaming_reply_carries_the_calls(client: openai.AsyncOpenAI) -> None:
    reply = await client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": '[sim:tool=weather {"city": "Rome"}]'}],
        tools=TOOLS,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.type == "function"
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "weather",
        {"city": "Rome"},
    )


async def test_a_malformed_tool_control_is_plain_text(client: openai.AsyncOpenAI) -> None:
    for text in ['[sim:tool=weather {"city": ]', "[sim:tool=weather {}", "[sim:tool=bad name]"]:
        chunks = await stream(client, [{"role": "user", "content": text}])
        calls, _, finish = calls_of(chunks)
        assert calls == [] and finish == "stop", text
