"""The simulated model, served by uvicorn and driven by the real openai client over HTTP."""

import logging
import time
from collections.abc import AsyncIterator

import httpx
import openai
import pytest
import pytest_asyncio
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

from tests.helpers.simulated import Sim, eventually, serving


@pytest_asyncio.fixture(scope="module")
async def sim() -> AsyncIterator[Sim]:
    async with serving() as served:
        yield served


@pytest_asyncio.fixture
async def client(sim: Sim) -> AsyncIterator[openai.AsyncOpenAI]:
    # No retries: the openai client retries 5xx responses and dropped connections by default.
    async with openai.AsyncOpenAI(base_url=sim.base_url, api_key="sim", max_retries=0) as c:
        yield c


def user(text: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": text}]


async def collect(
    client: openai.AsyncOpenAI,
    text: str,
    *,
    max_tokens: int | None = None,
    include_usage: bool = False,
) -> list[ChatCompletionChunk]:
    stream = await client.chat.completions.create(
        model="test-model",
        messages=user(text),
        stream=True,
        max_tokens=max_tokens,
        stream_options={"include_usage": True} if include_usage else None,
    )
    return [chunk async for chunk in stream]


def pieces(chunks: list[ChatCompletionChunk]) -> list[str]:
    return [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]


async def test_stream_matches_non_streaming_reply(client: openai.AsyncOpenAI) -> None:
    chunks = await collect(client, "Tell me about rivers.")
    completion = await client.chat.completions.create(
        model="test-model", messages=user("Tell me about rivers.")
    )
    text = completion.choices[0].message.content
    assert text and "".join(pieces(chunks)) == text
    assert text[0].isupper()
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    assert {c.model for c in chunks} == {"test-model"}
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "test-model"
    assert 20 <= len(pieces(chunks)) <= 80


async def test_deterministic_per_conversation(client: openai.AsyncOpenAI) -> None:
    first, again, other = [
        "".join(pieces(await collect(client, prompt))) for prompt in ("hello", "hello", "goodbye")
    ]
    assert first == again
    assert first != other


async def test_token_control_and_max_tokens(client: openai.AsyncOpenAI) -> None:
    five = await collect(client, "count [sim:tokens=5]")
    assert len(pieces(five)) == 5
    assert five[-1].choices[0].finish_reason == "stop"

    full = pieces(await collect(client, "long [sim:tokens=30]"))
    cut = await collect(client, "long [sim:tokens=30]", max_tokens=7)
    assert pieces(cut) == full[:7]
    assert cut[-1].choices[0].finish_reason == "length"

    completion = await client.chat.completions.create(
        model="m", messages=user("long [sim:tokens=30]"), max_completion_tokens=7
    )
    assert completion.choices[0].finish_reason == "length"
    assert completion.choices[0].message.content == "".join(full[:7])


async def test_include_usage(client: openai.AsyncOpenAI) -> None:
    chunks = await collect(client, "usage [sim:tokens=9]", include_usage=True)
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == 9
    assert last.usage.total_tokens == last.usage.prompt_tokens + 9 > 9
    assert chunks[-2].choices[0].finish_reason == "stop"


async def test_pacing(client: openai.AsyncOpenAI) -> None:
    started = time.monotonic()
    chunks = await collect(client, "pace [sim:tokens=10] [sim:tps=50]")
    assert len(pieces(chunks)) == 10
    assert time.monotonic() - started >= 0.15

    started = time.monotonic()
    stream = await client.chat.completions.create(
        model="m", messages=user("wait [sim:delay=0.2] [sim:tokens=3]"), stream=True
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    assert time.monotonic() - started >= 0.2
    await stream.close()


async def test_client_hang_up_counts_as_aborted(sim: Sim, client: openai.AsyncOpenAI) -> None:
    before = sim.stats.aborted
    stream = await client.chat.completions.create(
        model="m", messages=user("slow [sim:tokens=100] [sim:tps=20]"), stream=True
    )
    received = 0
    async for _chunk in stream:
        received += 1
        if received == 2:
            break
    assert sim.stats.active >= 1
    closed_at = time.monotonic()
    await stream.close()
    await eventually(lambda: sim.stats.aborted == before + 1, within=0.5)
    assert sim.stats.last_aborted_at is not None
    assert sim.stats.last_aborted_at >= closed_at
    await eventually(lambda: sim.stats.active == 0, within=0.5)


async def test_status_control(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as raised:
        await collect(client, "fail [sim:status=503]")
    assert raised.value.status_code == 503
    assert isinstance(raised.value.body, dict)
    assert raised.value.body["type"] == "server_error"


async def test_error_control_breaks_the_stream(
    sim: Sim, client: openai.AsyncOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    failed = sim.stats.failed
    received: list[str] = []
    caplog.set_level(logging.ERROR, logger="uvicorn.error")  # the fixture serves at critical
    uvicorn_log = logging.getLogger("uvicorn.error")  # it does not propagate to the root
    uvicorn_log.addHandler(caplog.handler)
    with pytest.raises(openai.APIConnectionError):
        stream = await client.chat.completions.create(
            model="m", messages=user("break [sim:error]"), stream=True
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk.choices[0].delta.content)
    assert len(received) == 3
    assert sim.stats.failed == failed + 1
    uvicorn_log.removeHandler(caplog.handler)
    assert not [r for r in caplog.records if r.exc_info], "a deliberate failure is no traceback"


async def test_invalid_request_is_openai_style_400(sim: Sim, client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        await client.chat.completions.create(model="m", messages=[])
    assert isinstance(raised.value.body, dict)
    assert raised.value.body["type"] == "invalid_request_error"
    async with httpx.AsyncClient() as http:
        response = await http.post(f"{sim.base_url}/chat/completions", content=b"{not json")
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


async def test_models_and_stats(sim: Sim, client: openai.AsyncOpenAI) -> None:
    models = await client.models.list()
    assert [m.id for m in models.data] == ["parley-sim"]
    async with httpx.AsyncClient() as http:
        stats = (await http.get(f"{sim.base_url}/sim/stats")).json()
    assert stats["started"] == sim.stats.started >= 1
    assert set(stats) >= {"started", "completed", "aborted", "active", "last_aborted_at"}
