"""Token counts for a generation whose stream reported no usage (cancelled, cut off, or an
endpoint that never sends a usage chunk), marked `estimated`.

The counts come from a real BPE tokenizer: OpenAI's `o200k_base`, through `bpe-openai`,
which implements tiktoken's encodings (the same token ids) and ships their data inside its
wheel. `tiktoken` itself, the better-known choice, downloads its BPE files from the network
on first use, which a server without outbound access (or a test here) cannot do. For models
with another tokenizer the count is an approximation, which is what `estimated` says.

Loading the tokenizer takes a second or two and about 140 MB, so a worker loads it once, in a
thread, before it claims its first turn (`warm`): a cancelled turn's `done` never waits for it.
Counting runs off the event loop too.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any, Protocol

from protocol.frames import Part, Usage

ENCODING = "o200k_base"
PER_MESSAGE = 4
"""Tokens a chat template adds around each message (role and separators), as OpenAI counts."""


class _Encoding(Protocol):
    def encode(self, text: str) -> list[int]: ...


@functools.cache
def _encoding() -> _Encoding:
    import bpe_openai

    encoding: _Encoding = bpe_openai.get_encoding(ENCODING)
    return encoding


def warm() -> None:
    _encoding()


def count(text: str) -> int:
    return len(_encoding().encode(text)) if text else 0


def estimate(prompt: list[dict[str, Any]], parts: list[Part]) -> Usage:
    """The usage of a generation that sent `prompt` and got `parts` back, counted here (a
    tool's result is not the model's output)."""
    prompt_tokens = sum(count(m.get("content") or "") + PER_MESSAGE for m in prompt)
    reasoning = sum(count(p.text) for p in parts if p.kind == "reasoning")
    completion = sum(count(p.text) for p in parts if p.kind != "tool_result")
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion,
        reasoning_tokens=reasoning or None,
        estimated=True,
    )


async def estimate_off_loop(prompt: list[dict[str, Any]], parts: list[Part]) -> Usage:
    return await asyncio.to_thread(estimate, prompt, parts)
