"""Fuzz the reading of a model's streamed chunks: whatever bytes the upstream sends as an event's
`data`, JSON or not, `read_chunk` returns a checked Chunk or raises MalformedReply, which ends
the turn with `done` `error`."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from server.generation.llm import Chunk, MalformedReply, read_chunk
from tests.protocol.fuzzing import HUGE_INTEGERS, JSON_VALUES

VALUES = JSON_VALUES | HUGE_INTEGERS
DELTAS = st.dictionaries(
    st.sampled_from(["content", "reasoning_content", "reasoning", "role", "refusal"]),
    VALUES,
    max_size=4,
)
CHOICES = st.lists(
    st.fixed_dictionaries(
        {}, optional={"delta": DELTAS | VALUES, "finish_reason": VALUES, "index": VALUES}
    )
    | VALUES,
    max_size=3,
)
DETAILS = st.dictionaries(st.sampled_from(["reasoning_tokens", "cached_tokens"]), VALUES)
USAGE = st.dictionaries(
    st.sampled_from(
        ["prompt_tokens", "completion_tokens", "completion_tokens_details", "prompt_tokens_details"]
    ),
    VALUES | DETAILS,
)
CHUNKS = st.fixed_dictionaries(
    {}, optional={"choices": CHOICES | VALUES, "usage": USAGE | VALUES, "id": VALUES}
)


def _nested(levels: int) -> str:
    """`"x"` inside `levels` arrays, as JSON text (too deep for `json.dumps` to write)."""
    return "[" * levels + '"x"' + "]" * levels


@settings(max_examples=200, deadline=None)
@given(CHUNKS, st.booleans())
@example({"choices": "\ud800"}, True)  # a lone surrogate where a list belongs
@example({"choices": [{"delta": {"content": "a\ud800"}}]}, True)  # ... and in the text
@example({"choices": [{"delta": {"reasoning": "\ud800", "reasoning_content": 1}}]}, False)
@example(
    {"usage": {"prompt_tokens": 1, "completion_tokens": 2,
               "completion_tokens_details": {"reasoning_tokens": -1}}},
    True,
)  # fmt: skip
def test_any_chunk_is_read_or_malformed(data: dict[str, Any], ascii_only: bool) -> None:
    raw = json.dumps(data, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    try:
        chunk = read_chunk(raw)
    except MalformedReply as exc:
        assert "malformed" in str(exc) or "unreadable" in str(exc)
    else:
        assert isinstance(chunk, Chunk)
        for choice in chunk.choices or ():
            delta = choice.delta
            texts = (
                () if delta is None else (delta.content, delta.reasoning_content, delta.reasoning)
            )
            assert all(text is None or isinstance(text, str) for text in texts)
        if chunk.usage is not None:
            usage = chunk.usage.usage()
            counts = [usage.prompt_tokens, usage.completion_tokens]
            counts += [usage.reasoning_tokens or 0, usage.cached_prompt_tokens or 0]
            assert all(0 <= count <= 2**53 for count in counts)


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 5_000), st.sampled_from(["choices", "usage", "delta", "model", "error"]))
def test_deeply_nested_chunk_is_malformed(levels: int, where: str) -> None:
    nested = _nested(levels)
    text = (
        f'{{"choices": [{{"delta": {nested}}}]}}'
        if where == "delta"
        else f'{{"{where}": {nested}}}'
    )
    with contextlib.suppress(MalformedReply):
        read_chunk(text.encode())


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_are_read_or_malformed(raw: bytes) -> None:
    with contextlib.suppress(MalformedReply):
        assert isinstance(read_chunk(raw), Chunk)


def test_a_lone_surrogate_in_the_text_is_kept_for_scrubbing() -> None:
    chunk = read_chunk(b'{"choices": [{"delta": {"content": "a\\ud800"}}]}')
    assert chunk.choices and chunk.choices[0].delta
    assert chunk.choices[0].delta.content == "a\ud800"


@pytest.mark.parametrize("where", ["model", "error", "skipped"])
@pytest.mark.parametrize("prefix", [b"", b'"odd": "\xff", '])  # bytes msgspec refuses first
def test_nesting_past_the_recursion_limit_is_malformed(where: str, prefix: bytes) -> None:
    raw = b"{" + prefix + b'"' + where.encode() + b'": ' + _nested(100_000).encode() + b"}"
    with pytest.raises(MalformedReply, match="nested too deeply"):
        read_chunk(raw)


def test_a_deep_error_is_malformed_and_a_deep_model_is_read_and_ignored() -> None:
    with pytest.raises(MalformedReply, match="nested too deeply"):
        read_chunk(f'{{"error": {{"message": {_nested(40)}}}}}'.encode())
    chunk = read_chunk(f'{{"model": {_nested(40)}, "choices": []}}'.encode())
    assert chunk.choices == [] and not isinstance(chunk.model, str)
