"""The model, reached only through the `openai` client against an OpenAI-compatible endpoint.

With no endpoint configured the base URL is Parley's own simulated model (server/dev/simulator.py),
served over real HTTP, so the same code path runs in development, tests and production.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import msgspec
import openai

from protocol.frames import Count, DoneReason, Usage
from protocol.text import scrub
from server.app.config import LLMSettings

SIMULATED_KEY = "parley-simulated"


@dataclass(frozen=True, slots=True)
class Piece:
    text: str


@dataclass(frozen=True, slots=True)
class Finished:
    reason: DoneReason
    usage: Usage | None
    model: str | None = None
    """The model that answered, as its stream named it."""


class MalformedReply(Exception):
    """The model's stream held a chunk that is not JSON or not shaped like a chat chunk."""


class _Delta(msgspec.Struct, frozen=True):
    content: str | None = None


class _Choice(msgspec.Struct, frozen=True):
    delta: _Delta | None = None
    finish_reason: str | None = None


class _Usage(msgspec.Struct, frozen=True):
    prompt_tokens: Count
    completion_tokens: Count


class Chunk(msgspec.Struct, frozen=True):
    """The parts of a streamed chat completion chunk Parley reads, with their types checked
    (the `openai` client builds its chunk objects without validating them)."""

    choices: list[_Choice] | None = None
    usage: _Usage | None = None
    model: object = None
    """Only for traces: anything but a string is ignored, never a malformed reply."""


def read_chunk(chunk: object) -> Chunk:
    """The chunk's text pieces, finish reason and usage, or MalformedReply."""
    try:
        return msgspec.convert(chunk, Chunk, from_attributes=True)
    except (msgspec.ValidationError, RecursionError, UnicodeError) as exc:
        # a string with a lone surrogate where a list or number belongs: msgspec encodes it
        raise MalformedReply(f"the model sent a malformed chunk: {exc}") from None


class LLM:
    def __init__(self, settings: LLMSettings, base_url: str) -> None:
        self.settings = settings
        self.base_url = base_url
        self.client = openai.AsyncOpenAI(
            base_url=base_url,
            api_key=settings.api_key or SIMULATED_KEY,
            timeout=openai.Timeout(settings.stall_timeout, connect=settings.request_timeout),
            max_retries=1,
        )

    async def stream(
        self, model: str, messages: list[dict[str, str]]
    ) -> AsyncIterator[Piece | Finished]:
        """Yield the reply's text pieces, then one Finished. Closing the iterator early
        closes the HTTP response, which is how the upstream model learns of a cancel.

        The model's text is kept whatever it holds: a NUL or a lone surrogate (which the
        JSON decoder lets through) becomes U+FFFD, so that it can be sent and stored."""
        stream = await self.client.chat.completions.create(  # type: ignore[call-overload]
            model=model,
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
            max_tokens=self.settings.max_tokens,
        )
        reason: DoneReason = "stop"
        usage: Usage | None = None
        answered: str | None = None
        async with stream:
            async for raw in _parsed(stream):
                chunk = read_chunk(raw)
                if isinstance(chunk.model, str) and chunk.model:
                    answered = chunk.model
                if chunk.usage is not None:
                    usage = Usage(chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
                for choice in chunk.choices or ():
                    if choice.delta is not None and choice.delta.content:
                        yield Piece(scrub(choice.delta.content))
                    if choice.finish_reason == "length":
                        reason = "length"
        yield Finished(reason, usage, answered)

    async def close(self) -> None:
        await self.client.close()


async def _parsed(stream: AsyncIterator[object]) -> AsyncIterator[object]:
    """The stream's chunks; an event the client cannot parse as JSON (it raises what
    `json.loads` raises, RecursionError for deep nesting) is a MalformedReply."""
    iterator = aiter(stream)
    while True:
        try:
            chunk = await anext(iterator)
        except StopAsyncIteration:
            return
        except (ValueError, TypeError, AttributeError, KeyError, RecursionError) as exc:
            raise MalformedReply(f"the model sent an unreadable event: {exc}") from None
        yield chunk
