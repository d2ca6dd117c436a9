"""The model, reached only through the `openai` client against an OpenAI-compatible endpoint.

With no endpoint configured the base URL is Parley's own simulated model (server/dev/simulator.py),
served over real HTTP, so the same code path runs in development, tests and production.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Final, cast

import httpx2
import msgspec
import openai

from protocol.frames import Count, DoneReason, PartKind, Usage
from protocol.jsondepth import too_deep
from protocol.text import scrub
from protocol.think import ThinkSplitter
from protocol.toolcalls import Calls, Fragment, Progress, ToolCall
from server.app.config import LLMSettings
from server.generation.chatclient import ChatClient

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
    calls: tuple[ToolCall, ...] = ()
    """The tools the model called, complete, in the order of their index."""


class MalformedReply(Exception):
    """The model's stream held a chunk that is not JSON or not shaped like a chat chunk."""


class Stalled(TimeoutError):
    """The model sent nothing for too long: before its first chunk, or between two."""


class _Delta(msgspec.Struct, frozen=True):
    content: str | None = None
    reasoning_content: str | None = None
    """DeepSeek's name for the reasoning, used by llama.cpp, LM Studio, SGLang and vLLM
    before 0.10."""
    reasoning: str | None = None
    """vLLM 0.10 on, Ollama, OpenRouter."""
    tool_calls: list[Fragment] | None = None
    """Fragments of the calls the model makes (protocol/toolcalls.py)."""

    def thought(self) -> str | None:
        """The delta's reasoning, under either name."""
        return self.reasoning_content or self.reasoning


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
    """The parts of a streamed chat completion chunk Parley reads, with their types checked;
    every other field is skipped unread."""

    choices: list[_Choice] | None = None
    usage: _Usage | None = None
    model: object = None
    """Only for traces: anything but a string is ignored, never a malformed reply."""
    error: object = None
    """An error the server reports inside the stream, after its 200 (any shape)."""


_decoder: Final = msgspec.json.Decoder(Chunk)

MAX_EVENT_BYTES: Final = 1 << 20
"""The longest line (and `data:` event) read from the model's stream: a chunk is a few
hundred bytes, so a longer one is a broken or hostile server, refused before it fills memory."""


def read_chunk(data: bytes) -> Chunk:
    """One `data:` payload as a Chunk, or MalformedReply. Refused unread when it nests deeper
    than a chunk can (a decoder recurses once per bracket)."""
    if too_deep(data):
        raise MalformedReply("the model sent a malformed chunk: nested too deeply")
    try:
        return _decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise MalformedReply(f"the model sent a malformed chunk: {exc}") from None
    except msgspec.DecodeError:
        return _read_leniently(data)


def _read_leniently(data: bytes) -> Chunk:
    """A payload msgspec cannot decode, read as the `openai` client read every chunk: bytes
    that are not UTF-8 replaced, and the lone surrogates `json` lets through kept (the text
    is scrubbed later). Only the rare odd chunk takes this slower way."""
    try:
        value = json.loads(data.decode("utf-8", "replace"))
    except ValueError as exc:
        raise MalformedReply(f"the model sent an unreadable event: {exc}") from None
    try:
        return msgspec.convert(value, Chunk)
    except (msgspec.ValidationError, UnicodeError) as exc:
        # a string with a lone surrogate where a list or number belongs: msgspec encodes it
        raise MalformedReply(f"the model sent a malformed chunk: {exc}") from None


class LLM:
    def __init__(self, settings: LLMSettings, base_url: str) -> None:
        self.settings = settings
        self.base_url = base_url
        self.client = ChatClient(
            base_url=base_url,
            api_key=settings.api_key or SIMULATED_KEY,
            timeout=openai.Timeout(
                max(settings.first_chunk_timeout, settings.stall_timeout),
                connect=settings.request_timeout,
            ),
            max_retries=1,
            http_client=_http_client(),
        )

    async def stream(
        self,
        model: str,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
    ) -> AsyncIterator[Piece | Progress | Finished]:
        """Yield the reply's pieces (reasoning and text) and the progress of the tool calls it
        makes (each fragment's piece of arguments; `tools`, in OpenAI's format, are offered
        when there are any), then one Finished with the complete calls. Closing the
        iterator early closes the HTTP response, which is how the upstream model learns of a
        cancel. Stalled when the first piece takes longer than `llm.first_chunk_timeout` or
        a later one longer than `llm.stall_timeout` (reasoning and calls count as much as
        text).

        The model's text is kept whatever it holds: a NUL or a lone surrogate (which the
        JSON decoder lets through) becomes U+FFFD, so that it can be sent and stored."""
        watchdog = _Watchdog(self.settings.first_chunk_timeout, self.settings.stall_timeout)
        reason: DoneReason = "stop"
        usage: Usage | None = None
        answered: str | None = None
        think = ThinkSplitter() if self.settings.think_tags else None
        calls = Calls()
        offered = {"tools": tools} if tools else {}
        try:
            async with self._request(model, messages, **offered) as http:
                async for data in _events(_blocks(http), http.request):
                    chunk = read_chunk(data)
                    if chunk.error:
                        raise _streamed_error(chunk.error, http.request)
                    if isinstance(chunk.model, str) and chunk.model:
                        answered = chunk.model
                    if chunk.usage is not None:
                        usage = chunk.usage.usage()
                    for choice in chunk.choices or ():
                        delta = choice.delta
                        if delta is None:
                            pass
                        elif think is None and delta.reasoning_content is delta.reasoning is None:
                            if delta.content:  # the hot path: plain text
                                watchdog.progress()
                                yield Piece(scrub(delta.content))
                        else:
                            watchdog.progress()
                            for piece in _pieces(delta, think):
                                yield piece
                        if delta is not None and delta.tool_calls:
                            watchdog.progress()
                            for fragment in delta.tool_calls:
                                if (progress := calls.add(fragment)) is not None:
                                    yield progress
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
        yield Finished(reason, usage, answered, tuple(calls.finish()))

    @contextlib.asynccontextmanager
    async def _request(
        self, model: str, messages: list[dict[str, Any]], **extra: object
    ) -> AsyncIterator[httpx2.Response]:
        """The streamed chat completion's HTTP response, unread, closed on the way out.

        Sent by the `openai` client (its base URL, key, headers, retries, status errors),
        through its generic `post` (`ChatClient.post_bytes`) with the body encoded here,
        once: the typed `chat.completions.create` walks every message against its
        TypedDicts first, which cost the worker more per request than reading a hundred
        tokens of the reply (docs/benchmarks.md). The body holds what `create` would send."""
        body = {
            "model": model,
            "stream": True,
            "messages": messages,
            "max_tokens": self.settings.max_tokens,
            "stream_options": {"include_usage": True},
            **extra,
        }
        content = _body_encoder.encode(body)
        response = await self.client.post_bytes("/chat/completions", content, _STREAMED)
        try:
            yield response
        finally:
            await response.aclose()

    async def close(self) -> None:
        await self.client.close()


_STREAMED: Final[openai.RequestOptions] = {
    "headers": {"X-Stainless-Raw-Response": "stream"},  # the body is left unread
    "security": {"bearer_auth": True},  # the API key, as `create` sends it
}
_body_encoder: Final = msgspec.json.Encoder()


def _http_client() -> openai.DefaultAsyncHttpxClient | None:
    """The `openai` client's aiohttp transport where the `openai[aiohttp]` extra is installed
    (it reads a stream for less than half the CPU of httpx's: docs/benchmarks.md), else
    None: the client's own httpx."""
    aiohttp_client = getattr(openai, "DefaultAioHttpClient", None)  # openai 1.9x on
    if aiohttp_client is None or importlib.util.find_spec("aiohttp") is None:
        return None
    return cast(openai.DefaultAsyncHttpxClient, aiohttp_client())


def _vendored_aiohttp() -> Any:
    """The `openai` client's own aiohttp transport module (openai 2.x on), or None."""
    try:
        return importlib.import_module("openai._vendor.httpx_aiohttp.transport")
    except ImportError:
        return None


_AIOHTTP: Final = _vendored_aiohttp()


def _blocks(http: httpx2.Response) -> AsyncIterator[bytes]:
    """The body's bytes as they arrive. On the `openai` client's aiohttp transport they are
    read from aiohttp's response itself, its errors mapped as the transport maps them: through
    httpx2's `aiter_bytes` each read passes four more async iterators, ≈ 5 % of a worker's
    CPU (docs/benchmarks.md). Any other transport, or an encoded body (which httpx2
    decodes), is read through `aiter_bytes`."""
    inner = getattr(http.stream, "_stream", None)
    if (
        _AIOHTTP is None
        or not isinstance(inner, _AIOHTTP.AiohttpResponseStream)
        or http.headers.get("content-encoding", "identity") != "identity"
    ):
        return http.aiter_bytes()
    return _aiohttp_blocks(inner)


async def _aiohttp_blocks(stream: Any) -> AsyncIterator[bytes]:
    """What the transport's `AiohttpResponseStream` yields, without httpx2's iterators."""
    with _AIOHTTP.map_aiohttp_exceptions():
        content = stream._aiohttp_response.content
        async for block in content.iter_chunked(stream.CHUNK_SIZE):
            yield block


def _pieces(delta: _Delta, think: ThinkSplitter | None) -> list[Piece]:
    """A delta's reasoning, then its content (split at `<think>` tags when `think`)."""
    out: list[Piece] = []
    reasoning = delta.thought()
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


async def _events(blocks: AsyncIterator[bytes], request: httpx2.Request) -> AsyncIterator[bytes]:
    """The `data` of each server-sent event in the body up to `[DONE]`, read as the `openai`
    client's SSE decoder reads it (lines end in LF, CRLF or CR; an event's `data:` lines are
    joined by LF; other fields and comments are skipped), with no line or event longer than
    MAX_EVENT_BYTES. The HTTP client's errors become the `openai` client's."""
    pending = b""
    data: list[bytes] = []
    size = 0
    after_cr = False  # the last block ended in CR: an LF opening the next ends the same line
    try:
        async for block in blocks:
            if after_cr and block.startswith(b"\n"):
                block = block[1:]
            if pending:
                block = pending + block
            lines = block.splitlines()
            after_cr = block.endswith(b"\r")
            pending = lines.pop() if lines and not block.endswith((b"\n", b"\r")) else b""
            if len(pending) > MAX_EVENT_BYTES:
                raise MalformedReply("the model sent a line longer than the limit")
            for line in lines:
                if not line:
                    if data:
                        yield data[0] if len(data) == 1 else b"\n".join(data)
                        data, size = [], 0
                elif line.startswith(b"data:"):
                    value = line[6:] if line.startswith(b"data: ") else line[5:]
                    if not data and value.startswith(b"[DONE]"):
                        await _drain(blocks)
                        return
                    size += len(value)
                    if size > MAX_EVENT_BYTES:
                        raise MalformedReply("the model sent an event longer than the limit")
                    data.append(value)
    except httpx2.TimeoutException as exc:
        raise openai.APITimeoutError(request=request) from exc
    except httpx2.RequestError as exc:
        raise openai.APIConnectionError(request=request) from exc
    if data:
        yield data[0] if len(data) == 1 else b"\n".join(data)


async def _drain(blocks: AsyncIterator[bytes]) -> None:
    """Read what follows `[DONE]` (the end of the chunked body, as a rule), so that the
    connection goes back to the pool; at most 0.1 s (as the `openai` client waits) and
    MAX_EVENT_BYTES of it, so a server that keeps the body open never delays `done`."""
    left = MAX_EVENT_BYTES
    with contextlib.suppress(TimeoutError, httpx2.RequestError):
        async with asyncio.timeout(0.1):
            async for block in blocks:
                left -= len(block)
                if left < 0:
                    return


def _streamed_error(error: object, request: httpx2.Request) -> openai.APIError:
    """An `error` sent inside the stream, as the `openai` client raised it."""
    message = error.get("message") if isinstance(error, dict) else None
    if not message or not isinstance(message, str):
        message = "An error occurred during streaming"
    return openai.APIError(message, request, body=error)
