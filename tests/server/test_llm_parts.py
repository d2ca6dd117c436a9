"""`server.generation.llm.LLM` against the simulated model over real HTTP: reasoning from
every delta field and from inline tags, every finish reason, usage details and the
first-chunk and between-chunks timeouts."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from protocol.toolcalls import Progress
from server.app.config import LLMSettings
from server.generation.llm import LLM, Finished, Piece, Stalled
from tests.helpers.replies import Way, reply_of
from tests.helpers.simulated import Sim, serving


@pytest_asyncio.fixture(scope="module")
async def sim() -> AsyncIterator[Sim]:
    async with serving() as served:
        yield served


async def run(sim: Sim, way: Way, text: str, **settings: object) -> tuple[list[Piece], Finished]:
    llm = LLM(LLMSettings(**settings), sim.base_url)  # type: ignore[arg-type]
    try:
        items, finished = await reply_of(llm, way, text)
    finally:
        await llm.close()
    return [item for item in items if isinstance(item, Piece)], finished


def joined(pieces: list[Piece], kind: str) -> str:
    return "".join(p.text for p in pieces if p.kind == kind)


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning", "think"])
async def test_reasoning_from_every_field_comes_first(sim: Sim, way: Way, field: str) -> None:
    text = f"[sim:tokens=8][sim:reasoning=6][sim:reasoning_field={field}] hi"
    pieces, finished = await run(sim, way, text, think_tags=True)
    kinds = [p.kind for p in pieces]
    assert kinds == sorted(kinds) and "reasoning" in kinds  # reasoning first
    assert len(joined(pieces, "reasoning").split()) == 6
    assert "<" not in joined(pieces, "reasoning") + joined(pieces, "text")
    assert joined(pieces, "text").strip() and finished.reason == "stop"
    assert finished.usage is not None and finished.usage.completion_tokens == 8 + 6


async def test_think_tags_stay_text_unless_configured(sim: Sim, way: Way) -> None:
    pieces, _ = await run(sim, way, "[sim:tokens=3][sim:reasoning=2][sim:reasoning_field=think] x")
    assert {p.kind for p in pieces} == {"text"}
    assert joined(pieces, "text").startswith("<think>")


@pytest.mark.parametrize(
    ("control", "reason"),
    [("[sim:tokens=5]", "stop"), ("[sim:tokens=5][sim:finish=length]", "length"),
     ("[sim:tokens=5][sim:finish=content_filter]", "content_filter"),
     ("[sim:tokens=50]", "length")],
)  # fmt: skip
async def test_the_finish_reason_is_the_models(
    sim: Sim, way: Way, control: str, reason: str
) -> None:
    _, finished = await run(sim, way, f"{control} hello", max_tokens=20)
    assert finished.reason == reason


async def test_usage_details_and_no_usage(sim: Sim, way: Way) -> None:
    history = "[sim:reasoning=5][sim:usage=details][sim:tokens=4] q"
    _, finished = await run(sim, way, history)
    usage = finished.usage
    assert usage is not None
    assert (usage.reasoning_tokens, usage.completion_tokens) == (5, 9)
    assert usage.cached_prompt_tokens == 0 and not usage.estimated
    _, bare = await run(sim, way, "[sim:usage=none] q")
    assert bare.usage is None


async def test_first_chunk_timeout(sim: Sim, way: Way) -> None:
    began = time.monotonic()
    with pytest.raises(Stalled, match="before its first chunk"):
        await run(sim, way, "[sim:delay=5] q", first_chunk_timeout=0.3)
    assert time.monotonic() - began < 3


async def test_between_chunks_timeout_and_reasoning_counts_as_progress(sim: Sim, way: Way) -> None:
    # 4 tokens per second: a chunk every 0.25 s, reasoning or not, never stalls at 0.6 s...
    pieces, _ = await run(
        sim, way, "[sim:tps=4][sim:reasoning=4][sim:tokens=2][sim:delay=1] q",
        first_chunk_timeout=2.0, stall_timeout=0.6,
    )  # fmt: skip
    assert [p.kind for p in pieces].count("reasoning") == 4
    # ... while one every 2 s does
    with pytest.raises(Stalled, match="between two chunks"):
        await run(sim, way, "[sim:tps=0.5][sim:tokens=3][sim:delay=0] q", stall_timeout=0.6)


async def test_parallel_tool_calls_stream_in_fragments_and_finish_complete(
    sim: Sim, way: Way
) -> None:
    llm = LLM(LLMSettings(), sim.base_url)
    text = '[sim:tool=weather {"city": "Oslo"}][sim:tool=clock {"zone": "Europe/Oslo"}]'
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]
    try:
        items, item = await reply_of(llm, way, text, tools)
    finally:
        await llm.close()
    progress = [i for i in items if isinstance(i, Progress)]
    assert progress == items  # no text while it calls tools
    assert item.reason == "tool_calls"
    weather, clock = item.calls
    assert (weather.name, json.loads(weather.arguments)) == ("weather", {"city": "Oslo"})
    assert (clock.name, json.loads(clock.arguments)) == ("clock", {"zone": "Europe/Oslo"})
    assert len(progress) > 6 and [p.index for p in progress] != sorted(p.index for p in progress)
    for call in (weather, clock):
        pieces = [p.arguments for p in progress if p.index == call.index]
        assert "".join(pieces) == call.arguments and all(p.id == call.id for p in progress
                                                          if p.index == call.index)  # fmt: skip
