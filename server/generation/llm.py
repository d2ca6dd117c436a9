"""The model, reached only through the `openai` client against an OpenAI-compatible endpoint.

With no endpoint configured the base URL is Parley's own simulated model (server/dev/simulator.py),
served over real HTTP, so the same code path runs in development, tests and production.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Final

import msgspec
import openai

from protocol.frames import Count, DoneReason, PartKind, Usage
from protocol.text import scrub
from protocol.think import ThinkSplitter
from server.app.config import LLMSettings

SIMULATED_KEY = "parley-simulated"

FINISH_REASONS: Final[dict[str, DoneReason]] = {
    "stop": "stop",
    "length": "length",
    "content_filter": "content_filter",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",  # the deprecated name of the same thing
}
"""The model's `finish_reason` as `done.reason`; one Parley does not know is `stop`."""


@dataclass(frozen=True, slots=True)
class Piece:
    text: str
    kind: PartKind = "text"


@dataclass(frozen=True, slots=True)
class Finished:
    reason: DoneReason
    usage: Usage | None
    model: str | None = None
    """The model that answered, as its stream named it."""


class MalformedReply(Exception):
    """The model's stream held a chunk that is not JSON or not shaped like a chat chunk."""


class Stalled(TimeoutError):
    """The model sent nothing for too long: before its first chunk, or between two."""


class _Delta(msgspec.Struct, frozen=True):
    content: str | None = None
    model_extra: dict[str, object] | None = None
    """The delta's fields the `openai` client does not know, reasoning among them: read from
    this dict, because asking the client's object for a field it lacks raises (and catches)
    an AttributeError per chunk, which would cost more than the rest of a chunk's reading."""

    def reasoning(self) -> str | None:
        """`reasoning_content` (DeepSeek's name, used by llama.cpp, LM Studio, SGLang and vLLM
        before 0.10) or `reasoning` (vLLM 0.10 on, Ollama, OpenRouter)."""
        extra = self.model_extra
        if not extra:
            return None
        found = extra.get("reasoning_content") or extra.get("reasoning")
        if found is None or isinstance(found, str):
            return found
        raise MalformedReply("the model sent reasoning that is not text")


class _Choice(msgspec.Struct, frozen=True):
    delta: _Delta | None = None
    finish_reason: str | None = None


class _CompletionDetails(msgspec.Struct, frozen=True):
    reasoning_tokens: Count | None = None


class _PromptDetails(msgspec.Struct, frozen=True):
    cached_tokens: Count | None = None


class _Usage(msgspec.Struct, frozen=True):
    prompt_tokens: Count
    completion_tokens: Count
    completion_tokens_details: _CompletionDetails | None = None
    prompt_tokens_details: _PromptDetails | None = None

    def usage(self) -> Usage:
        completion, prompt = self.completion_tokens_details, self.prompt_tokens_details
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            reasoning_tokens=None if completion is None else completion.reasoning_tokens,
            cached_prompt_tokens=None if prompt is None else prompt.cached_tokens,
        )


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
            timeout=openai.Timeout(
                max(settings.first_chunk_timeout, settings.stall_timeout),
                connect=settings.request_timeout,
            ),
            max_retries=1,
        )

    async def stream(
        self, model: str, messages: list[dict[str, str]]
    ) -> AsyncIterator[Piece | Finished]:
        """Yield the reply's pieces (reasoning and text), then one Finished. Closing the
        iterator early closes the HTTP response, which is how the upstream model learns of a
        cancel. Stalled when the first piece takes longer than `llm.first_chunk_timeout` or
        a later one longer than `llm.stall_timeout` (reasoning counts as much as text).

        The model's text is kept whatever it holds: a NUL or a lone surrogate (which the
        JSON decoder lets through) becomes U+FFFD, so that it can be sent and stored."""
        watchdog = _Watchdog(self.settings.first_chunk_timeout, self.settings.stall_timeout)
        reason: DoneReason = "stop"
        usage: Usage | None = None
        answered: str | None = None
        think = ThinkSplitter() if self.settings.think_tags else None
        try:
            stream = await self.client.chat.completions.create(  # type: ignore[call-overload]
                model=model,
                messages=messages,
                stream=True,
                stream_options={"include_usage": True},
                max_tokens=self.settings.max_tokens,
            )
            async with stream:
                async for raw in _parsed(stream):
                    chunk = read_chunk(raw)
                    if isinstance(chunk.model, str) and chunk.model:
                        answered = chunk.model
                    if chunk.usage is not None:
                        usage = chunk.usage.usage()
                    for choice in chunk.choices or ():
                        delta = choice.delta
                        if delta is None:
                            pass
                        elif think is None and not delta.model_extra:
                            if delta.content:  # the hot path: plain text
                                watchdog.progress()
                                yield Piece(scrub(delta.content))
                        else:
                            watchdog.progress()
                            for piece in _pieces(delta, think):
                                yield piece
                        if choice.finish_reason:
                            reason = FINISH_REASONS.get(choice.finish_reason, "stop")
        except asyncio.CancelledError:
            if not watchdog.fired:
                raise  # a `cancel`, or the worker stopping
            raise watchdog.stalled() from None
        finally:
            watchdog.stop()
        for kind, text in think.finish() if think is not None else ():
            yield Piece(text, kind)
        yield Finished(reason, usage, answered)

    async def close(self) -> None:
        await self.client.close()


def _pieces(delta: _Delta, think: ThinkSplitter | None) -> list[Piece]:
    """A delta's reasoning, then its content (split at `<think>` tags when `think`)."""
    out: list[Piece] = []
    reasoning = delta.reasoning()
    if reasoning:
        out.append(Piece(scrub(reasoning), "reasoning"))
    if delta.content:
        if think is None:
            out.append(Piece(scrub(delta.content)))
        else:
            out += (Piece(scrub(text), kind) for kind, text in think.feed(delta.content))
    return out


class _Watchdog:
    """Cancels the task reading the stream when the model sends nothing for too long: first
    `first` seconds for the first piece of reasoning or text (servers send a chunk naming the
    role at once, then think), then `stall` between two. One timer, moved only when
    it fires early; a chunk costs one clock read (an `asyncio.timeout` per chunk would cost
    a timer each)."""

    __slots__ = ("_handle", "_loop", "_task", "fired", "last", "limit", "stall", "started")

    def __init__(self, first: float, stall: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self.limit, self.stall = first, stall
        self.last = self._loop.time()
        self.fired = self.started = False
        self._handle = self._loop.call_at(self.last + first, self._check)

    def progress(self) -> None:
        self.last = self._loop.time()
        if self.started:
            return
        self.started = True  # from now on the shorter wait between two pieces
        self.limit = self.stall
        self._handle.cancel()
        self._handle = self._loop.call_at(self.last + self.stall, self._check)

    def stalled(self) -> Stalled:
        """Once this watchdog cancelled the reading task: the cancel taken back, and why."""
        if self._task is not None:
            self._task.uncancel()
        when = "between two chunks" if self.started else "before its first chunk"
        return Stalled(f"the model sent nothing for {self.limit:g} s {when}")

    def _check(self) -> None:
        due = self.last + self.limit
        if self._loop.time() < due:
            self._handle = self._loop.call_at(due, self._check)
        elif self._task is not None:
            self.fired = True
            self._task.cancel()

    def stop(self) -> None:
        self._handle.cancel()


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
