"""The model, reached only through the `openai` client against an OpenAI-compatible endpoint.

With no endpoint configured the base URL is Parley's own simulated model (server/simulator.py),
served over real HTTP, so the same code path runs in development, tests and production.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import openai

from protocol.frames import DoneReason, Usage
from protocol.text import scrub
from server.config import LLMSettings

SIMULATED_KEY = "parley-simulated"


@dataclass(frozen=True, slots=True)
class Piece:
    text: str


@dataclass(frozen=True, slots=True)
class Finished:
    reason: DoneReason
    usage: Usage | None


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
        async with stream:
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = Usage(chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
                for choice in chunk.choices:
                    if choice.delta.content:
                        yield Piece(scrub(choice.delta.content))
                    if choice.finish_reason == "length":
                        reason = "length"
        yield Finished(reason, usage)

    async def close(self) -> None:
        await self.client.close()
