"""Fuzz the reading of a model's streamed chunks: whatever JSON the upstream sends, built into
chunk objects the way the `openai` client builds them (without validation), `read_chunk`
returns a checked Chunk or raises MalformedReply, which ends the turn with `done` `error`."""

from __future__ import annotations

import contextlib
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st
from openai.types.chat import ChatCompletionChunk

from server.generation.llm import Chunk, MalformedReply, read_chunk
from tests.protocol.fuzzing import HUGE_INTEGERS, JSON_VALUES

VALUES = JSON_VALUES | HUGE_INTEGERS
DELTAS = st.dictionaries(st.sampled_from(["content", "role", "refusal"]), VALUES, max_size=3)
CHOICES = st.lists(
    st.fixed_dictionaries(
        {}, optional={"delta": DELTAS | VALUES, "finish_reason": VALUES, "index": VALUES}
    )
    | VALUES,
    max_size=3,
)
USAGE = st.dictionaries(st.sampled_from(["prompt_tokens", "completion_tokens"]), VALUES)
CHUNKS = st.fixed_dictionaries(
    {}, optional={"choices": CHOICES | VALUES, "usage": USAGE | VALUES, "id": VALUES}
)


def _nested(levels: int) -> Any:
    value: Any = "x"
    for _ in range(levels):
        value = [value]
    return value


@settings(max_examples=200, deadline=None)
@given(CHUNKS)
@example({"choices": "\ud800"})  # a lone surrogate where a list belongs
def test_any_chunk_is_read_or_malformed(data: dict[str, Any]) -> None:
    try:
        chunk = read_chunk(ChatCompletionChunk.construct(**data))
    except MalformedReply as exc:
        assert "malformed" in str(exc)
    else:
        assert isinstance(chunk, Chunk)
        for choice in chunk.choices or ():
            assert (
                choice.delta is None
                or choice.delta.content is None
                or isinstance(choice.delta.content, str)
            )
        if chunk.usage is not None:
            assert 0 <= chunk.usage.prompt_tokens <= 2**53


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 5_000), st.sampled_from(["choices", "usage", "delta"]))
def test_deeply_nested_chunk_is_malformed(levels: int, where: str) -> None:
    nested = _nested(levels)
    data = {"choices": [{"delta": nested}]} if where == "delta" else {where: nested}
    with contextlib.suppress(MalformedReply):
        read_chunk(ChatCompletionChunk.construct(**data))
