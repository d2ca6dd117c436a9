"""The model, reached only through the `openai` client against an OpenAI-compatible endpoint.

With no endpoint configured the base URL is Parley's own simulated model (server/dev/simulator.py),
served over real HTTP, so the same code path runs in development, tests and production.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import importlib.util
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, cast

import httpx2
import msgspec
import openai

from protocol.frames import Count, DoneReason, PartKind, Usage
from protocol.jsondepth import too_deep
from protocol.sse_parse import Events, Oversized
from protocol.text import scrub
from protocol.think import ThinkSplitter
from protocol.toolcalls import Calls, Fragment, Progress, ToolCall
from server.app.config import LLMSettings
from server.generation.chatclient import ChatClient

if TYPE_CHECKING:
    from server.generation.body import Pushed

SIMULATED_KEY = "parley-simulated"

FINISH_REASONS: Final[dict[str, DoneReason]] = {
    "stop": "stop",
    "length": "length",
    "content_filter": "content_filter",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",  # the deprecated name of the same thing
}
"""The model's `finish_reason` as `done.reason`; one Parley does not know is `stop`."""


class Piece(msgspec.Struct, frozen=True, gc=False):
    """A piece of the reply's text or reasoning (a Struct: made per chunk, in C)."""

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


class _Delta(msgspec.Struct, frozen=True, gc=False):
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


class _Choice(msgspec.Struct, frozen=True, gc=False):
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


class Chunk(msgspec.Struct, frozen=True, gc=False):
    """The parts of a streamed chat completion chunk Parley reads, with their types checked;
    every other field is skipped unread. Decoded per chunk, untracked by the garbage
    collector (`gc=False`, as its parts: what JSON decodes holds no cycle)."""

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
DRAIN_SECONDS: Final = 0.1
"""How long what follows `[DONE]` is waited for (as the `openai` client waits), so that the
connection goes back to the pool, and never longer: a server that keeps the body open does
not delay `done`."""


def read_chunk(data: bytes) -> Chunk:
    """One `data:` payload as a Chunk, or MalformedReply.

    Depth: the decoder recurses once per bracket and refuses, with RecursionError, a payload
    nesting deeper than Python's recursion limit; below it, a deep value can only be where
    a chunk's fields take any value (`model`, `error`) or in a field skipped unread. Of
    those only `error` is kept beyond the chunk, so only a chunk with one is measured first
    (`too_deep`: measuring every chunk cost more than decoding it)."""
    try:
        chunk = _decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise MalformedReply(f"the model sent a malformed chunk: {exc}") from None
    except msgspec.DecodeError:
        chunk = _read_leniently(data)
    except RecursionError:
        chunk = None
    if chunk is None or (chunk.error is not None and too_deep(data)):
        raise MalformedReply(_TOO_DEEP)
    return chunk


_TOO_DEEP: Final = "the model sent a malformed chunk: nested too deeply"


def _read_leniently(data: bytes) -> Chunk:
    """A payload msgspec cannot decode, read as the `openai` client read every chunk: bytes
    that are not UTF-8 replaced, and the lone surrogates `json` lets through kept (the text
    is scrubbed later). Only the rare odd chunk takes this slower way."""
    try:
        value = json.loads(data.decode("utf-8", "replace"))
    except ValueError as exc:
        raise MalformedReply(f"the model sent an unreadable event: {exc}") from None
    except RecursionError:
        raise MalformedReply(_TOO_DEEP) from None
    try:
        return msgspec.convert(value, Chunk)
    except (msgspec.ValidationError, UnicodeError) as exc:
        # a string with a lone surrogate where a list or number belongs: msgspec encodes it
        raise MalformedReply(f"the model sent a malformed chunk: {exc}") from None
    except RecursionError:
        raise MalformedReply(_TOO_DEEP) from None


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
        cancel. The body is read block by block (the worker uses `relay`, which is cheaper);
        its pieces, errors and timeouts are those of `relay`."""
        given: list[Piece | Progress] = []
        reply = _Reply(self.settings, given.append)
        with reply.watched():
            async with self._request(model, messages, tools) as http:
                async for _ in _pulled(http, reply):
                    for item in given:
                        yield item
                    given.clear()
        finished = await reply.finish()
        for item in given:
            yield item
        yield finished

    async def relay(
        self,
        model: str,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        take: Take,
    ) -> Finished:
        """Hand the reply's pieces and the progress of its tool calls (as `stream` yields
        them) to `take` as the body brings them, then return how the reply finished.

        On the `openai` client's aiohttp transport the body is pushed: each block is read
        where the connection receives it (body.pushed), so this task sleeps until the body
        ends, fails or stalls (or the task is cancelled), not once per chunk. `take` runs in
        the connection's callback then: it must not block; where it has to wait it returns
        what to await, and the pieces that come meanwhile are held (the connection paused)
        and handed on after. Raises as `stream` does: MalformedReply, Stalled, the `openai`
        client's errors, CancelledError."""
        reply = _Reply(self.settings, take)
        with reply.watched():
            async with self._request(model, messages, tools) as http:
                push = _pushed(http, reply)
                if push is None:
                    async for _ in _pulled(http, reply):
                        await reply.settle()
                else:
                    await _pushing(push, http, reply)
        return await reply.finish()

    @contextlib.asynccontextmanager
    async def _request(
        self, model: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
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
        }
        if tools:
            body["tools"] = tools
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
_Mapping = Callable[[], contextlib.AbstractContextManager[None]]


def _reader(http: httpx2.Response) -> tuple[Callable[[], Awaitable[bytes]], _Mapping]:
    """How to read the body's next block of bytes (b"" at its end), and the context that
    makes the transport's errors httpx2's. On the `openai` client's aiohttp transport that is
    aiohttp's stream on the response itself, its errors mapped as the transport maps them:
    through httpx2's `aiter_bytes` each read passes five more iterators. Any other
    transport, or an encoded body (which httpx2 decodes), is read through `aiter_bytes`."""
    response = _aiohttp_response(http)
    if response is None:
        blocks = http.aiter_bytes()
        return functools.partial(anext, blocks, b""), contextlib.nullcontext
    assert _AIOHTTP is not None
    _no_read_timeout(response)
    return response.content.readany, _AIOHTTP.map_aiohttp_exceptions


def _aiohttp_response(http: httpx2.Response) -> Any:
    """The aiohttp response under `http` when it is on the `openai` client's aiohttp
    transport and its body is not encoded (httpx2 would decode it), else None."""
    inner = getattr(http.stream, "_stream", None)
    if (
        _AIOHTTP is None
        or not isinstance(inner, _AIOHTTP.AiohttpResponseStream)
        or http.headers.get("content-encoding", "identity") != "identity"
    ):
        return None
    return inner._aiohttp_response


def _no_read_timeout(response: Any) -> None:
    """The body's blocks are read without the client's socket read timeout: aiohttp moves it
    at every block it receives (a new loop timer each, 2 to 7 µs), and the reply's watchdog
    already ends a body that stalls, sooner (`llm.stall_timeout`; the timeout stays for
    the request and the response's head)."""
    if response.connection is not None and response.connection.protocol is not None:
        response.connection.protocol.read_timeout = None


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

    __slots__ = ("_handle", "_task", "fired", "last", "limit", "loop", "stall", "started")

    def __init__(self, first: float, stall: float) -> None:
        self.loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self.limit, self.stall = first, stall
        self.last = self.loop.time()
        self.fired = self.started = False
        self._handle = self.loop.call_at(self.last + first, self._check)

    def progress(self) -> None:
        self.last = self.loop.time()
        if self.started:
            return
        self.started = True  # from now on the shorter wait between two pieces
        self.limit = self.stall
        self._handle.cancel()
        self._handle = self.loop.call_at(self.last + self.stall, self._check)

    def stalled(self) -> Stalled:
        """Once this watchdog cancelled the reading task: the cancel taken back, and why."""
        if self._task is not None:
            self._task.uncancel()
        when = "between two chunks" if self.started else "before its first chunk"
        return Stalled(f"the model sent nothing for {self.limit:g} s {when}")

    def _check(self) -> None:
        due = self.last + self.limit
        if self.loop.time() < due:
            self._handle = self.loop.call_at(due, self._check)
        elif self._task is not None:
            self.fired = True
            self._task.cancel()

    def stop(self) -> None:
        self._handle.cancel()


Take = Callable[[Piece | Progress], Callable[[], Awaitable[None]] | None]
"""What `LLM.relay` hands each piece to: None, or what to await before the next piece."""


class _Reply:
    """A reply read as its body arrives: each block's server-sent events
    (protocol/sse_parse.Events, no line or event longer than MAX_EVENT_BYTES) decoded into
    pieces and tool-call progress, each handed to `take` at once. Made in the task that
    reads the reply (its watchdog cancels that task)."""

    __slots__ = (
        "answered", "calls", "events", "held", "later", "reason", "request", "take",
        "think", "usage", "watchdog",
    )  # fmt: skip

    def __init__(self, settings: LLMSettings, take: Take) -> None:
        self.take = take
        self.events = Events(MAX_EVENT_BYTES)
        self.watchdog = _Watchdog(settings.first_chunk_timeout, settings.stall_timeout)
        self.think = ThinkSplitter() if settings.think_tags else None
        self.calls = Calls()
        self.reason: DoneReason = "stop"
        self.usage: Usage | None = None
        self.answered: str | None = None
        """The model that answered, as its stream named it."""
        self.request: httpx2.Request | None = None
        self.later: Callable[[], Awaitable[None]] | None = None
        """What `take` asked to be awaited before it takes more (`settle`)."""
        self.held: collections.deque[Piece | Progress] | None = None
        """The pieces that came while `later` waits."""

    def feed(self, block: bytes) -> bool:
        """Take a block of the body; whether the reading task has something to do now (the
        stream's `[DONE]` came, or `take` asked to wait)."""
        try:
            for data in self.events.feed(block):
                self._take_chunk(read_chunk(data))
        except Oversized as exc:
            raise MalformedReply(str(exc)) from None
        return self.later is not None or self.events.done

    def _take_chunk(self, chunk: Chunk) -> None:
        if chunk.error:
            assert self.request is not None  # (set before the body is fed)
            raise _streamed_error(chunk.error, self.request)
        if isinstance(chunk.model, str) and chunk.model:
            self.answered = chunk.model
        if chunk.usage is not None:
            self.usage = chunk.usage.usage()
        watchdog, think = self.watchdog, self.think
        for choice in chunk.choices or ():
            delta = choice.delta
            if delta is None:
                pass
            elif think is None and delta.reasoning_content is delta.reasoning is None:
                if text := delta.content:  # the hot path: plain text, `_give` inlined
                    if watchdog.started:
                        watchdog.last = watchdog.loop.time()
                    else:
                        watchdog.progress()
                    if not text.isascii() or "\x00" in text:
                        text = scrub(text)
                    if self.held is not None:
                        self.held.append(Piece(text))
                    elif (later := self.take(Piece(text))) is not None:
                        self.later, self.held = later, collections.deque()
            else:
                watchdog.progress()
                for piece in _pieces(delta, think):
                    self._give(piece)
            if delta is not None and delta.tool_calls:
                watchdog.progress()
                for fragment in delta.tool_calls:
                    if (progress := self.calls.add(fragment)) is not None:
                        self._give(progress)
            if choice.finish_reason:
                self.reason = FINISH_REASONS.get(choice.finish_reason, "stop")

    def _give(self, item: Piece | Progress) -> None:
        if self.held is not None:
            self.held.append(item)
        elif (later := self.take(item)) is not None:
            self.later, self.held = later, collections.deque()

    async def settle(self) -> None:
        """Await what `take` asked to, then hand it the pieces held meanwhile (until it
        asks again)."""
        while (later := self.later) is not None:
            self.later = None
            await later()
            held, self.held = self.held or collections.deque(), None
            while held and self.held is None:
                self._give(held.popleft())
            if self.held is not None:
                self.held.extendleft(reversed(held))

    @contextlib.contextmanager
    def watched(self) -> Iterator[None]:
        """Around the body's reading: the reading task cancelled by the watchdog raises
        Stalled (any other cancel stays a cancel), and the watchdog stops at the end."""
        try:
            yield
        except asyncio.CancelledError:
            if not self.watchdog.fired:
                raise  # a `cancel`, or the worker stopping
            raise self.watchdog.stalled() from None
        finally:
            self.watchdog.stop()

    async def finish(self) -> Finished:
        """The body ended: the last event if it had no blank line after it, the text the
        think splitter still holds, and how the reply finished."""
        if (last := self.events.end()) is not None:
            self._take_chunk(read_chunk(last))
        for kind, text in self.think.finish() if self.think is not None else ():
            self._give(Piece(text, kind))
        await self.settle()
        return Finished(self.reason, self.usage, self.answered, tuple(self.calls.finish()))


@contextlib.contextmanager
def _mapped_errors(request: httpx2.Request) -> Iterator[None]:
    """The HTTP client's errors as the `openai` client's."""
    try:
        yield
    except httpx2.TimeoutException as exc:
        raise openai.APITimeoutError(request=request) from exc
    except httpx2.RequestError as exc:
        raise openai.APIConnectionError(request=request) from exc


async def _pulled(http: httpx2.Response, reply: _Reply) -> AsyncIterator[None]:
    """Feed `reply` the body a block at a time (yielding after each) up to `[DONE]` or
    the body's end."""
    reply.request = http.request
    read, mapped = _reader(http)
    with _mapped_errors(http.request), mapped():
        while block := await read():
            reply.feed(block)
            yield
            if reply.events.done:
                await _drain(read, mapped)
                return


async def _drain(read: Callable[[], Awaitable[bytes]], mapped: _Mapping) -> None:
    """Read what follows `[DONE]` (the end of the chunked body, as a rule), so that the
    connection goes back to the pool; at most DRAIN_SECONDS and MAX_EVENT_BYTES of it."""
    left = MAX_EVENT_BYTES
    with contextlib.suppress(TimeoutError, httpx2.RequestError), mapped():
        async with asyncio.timeout(DRAIN_SECONDS):
            while left >= 0 and (block := await read()):
                left -= len(block)


def _pushed(http: httpx2.Response, reply: _Reply) -> Pushed | None:
    """The body pushed to `reply` as it arrives, where it can be (the `openai` client's
    aiohttp transport, an unencoded body: `_reader`), else None."""
    response = _aiohttp_response(http)
    if response is None:
        return None
    reply.request = http.request
    _no_read_timeout(response)
    from server.generation.body import pushed  # aiohttp is there: its transport is

    return pushed(response.content, reply.feed)


async def _pushing(push: Pushed, http: httpx2.Response, reply: _Reply) -> None:
    """Wait while the body is pushed to `reply`, up to `[DONE]` or the body's end; await
    what `reply`'s taker asks for (the connection paused meanwhile)."""
    assert _AIOHTTP is not None  # (a body is pushed only on its transport)
    try:
        with _mapped_errors(http.request), _AIOHTTP.map_aiohttp_exceptions():
            while True:
                await push.wait()
                if reply.later is not None:
                    push.pause()
                    await reply.settle()
                    push.resume()
                if reply.events.done:
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(DRAIN_SECONDS):  # the rest of the body
                            while not push.ended:
                                await push.wait()
                    return
                if push.ended:
                    return
    finally:
        push.stop()


def _streamed_error(error: object, request: httpx2.Request) -> openai.APIError:
    """An `error` sent inside the stream, as the `openai` client raised it."""
    message = error.get("message") if isinstance(error, dict) else None
    if not message or not isinstance(message, str):
        message = "An error occurred during streaming"
    return openai.APIError(message, request, body=error)
