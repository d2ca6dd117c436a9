"""Parley's simulated model: an OpenAI-compatible chat completions endpoint.

It stands in for a real LLM when no API key / base URL is configured, and is always reached
through the real ``openai`` client over real HTTP, so Parley exercises exactly the code path it
uses in production: ``POST /v1/chat/completions`` (streaming SSE or plain JSON) and
``GET /v1/models``.  ``GET /v1/sim/stats`` exposes :class:`SimulatorStats` as JSON.

Replies are deterministic pseudo-prose: the random generator is seeded with the SHA-256 of the
request's messages, so the same conversation always gets the same reply and a different last
user message gets a different one.  The natural length varies between 20 and 80 tokens; a token
is one word (or a piece of markdown) with its leading whitespace, so the pieces join to the
text.  A reply cut short by ``max_tokens`` / ``max_completion_tokens`` (default
``SimulatorSettings.max_tokens``) is a prefix of the full reply and ends with
``finish_reason="length"``; otherwise ``"stop"``.

Prompt controls, read from the last user message (for tests):

``[sim:tokens=N]``
    The natural reply is exactly N tokens long (still capped by max tokens).
``[sim:delay=S]``
    Wait S seconds before the first content token (overrides ``first_token_delay``).
``[sim:tps=R]``
    Emit R tokens per second (overrides ``tokens_per_second``; 0 = as fast as possible).
``[sim:error]``
    A stream breaks after a few tokens: the server raises, so the connection is dropped
    without the end of the chunked body and the client sees a broken stream.  Without
    ``stream`` the request gets an HTTP 500 error body instead.
``[sim:status=CODE]``
    Answer with HTTP status CODE (400-599) and an OpenAI-style error body, before any
    generation starts.  Note that the openai client retries 408/409/429/5xx by default.
``[sim:malformed]``
    A stream sends a few tokens, then an event whose JSON nests 50,000 levels deep, then
    ends normally: what a broken or hostile upstream could send.
``[sim:tool=NAME {"json": "arguments"}]``
    Call the tool NAME with those arguments (a JSON object; none: ``{}``) instead of
    answering; several controls are parallel calls.  A stream sends each call's id and name
    first, then its arguments in fragments of a few characters, the calls interleaved, and
    ends with ``finish_reason="tool_calls"``.  Once the request holds the results (``tool``
    messages after the user's message), the reply answers with them: ``NAME answered:
    RESULT`` for each.  ``[sim:tool_repeat]`` calls the tools again even then (a model that
    never stops calling tools).
``[sim:reasoning=N]``
    Stream N tokens of reasoning before the reply (paced like it), in the delta field
    ``[sim:reasoning_field=reasoning_content|reasoning|think]`` names: ``reasoning_content``
    (the default; DeepSeek, llama.cpp, LM Studio, older vLLM), ``reasoning`` (vLLM 0.10 on,
    Ollama, OpenRouter) or ``think``: inline in ``content`` between ``<think>`` and
    ``</think>``, each tag cut across two chunks.
``[sim:finish=content_filter]``, ``[sim:finish=length]``, ``[sim:finish=tool_calls]``
    End with that ``finish_reason`` (``content_filter`` after half the reply).
``[sim:usage=details]``, ``[sim:usage=none]``
    The usage chunk (sent when the request asks with ``stream_options.include_usage``) also
    reports ``completion_tokens_details.reasoning_tokens`` and
    ``prompt_tokens_details.cached_tokens`` (every message but the last, as if a prefix cache
    held them); or no usage chunk at all.

``GET /v1/sim/stats`` also shows the messages of the last few requests, newest last
(``recent_messages``), so tests can see what a model was sent.

Controls are bounded: at most ``MAX_CONTROL_TOKENS`` tokens and ``MAX_CONTROL_DELAY`` seconds.
A request body that is not a chat completion request, or nests deeper than
``protocol.jsondepth.MAX_DEPTH``, gets HTTP 400.
"""

import asyncio
import hashlib
import itertools
import json
import logging
import random
import re
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec
from litestar import Litestar, Request, Response, Router, get, post
from litestar.response import Stream

from protocol.jsondepth import MAX_DEPTH, too_deep
from server.app.config import SimulatorSettings

__all__ = [
    "SimulatedStreamError",
    "SimulatorStats",
    "decode_request",
    "simulator_app",
    "simulator_router",
]


@dataclass
class SimulatorStats:
    """Counters proving what happened to generations (streaming or not).

    ``aborted`` counts streams whose client hung up mid-way, ``failed`` streams broken on
    purpose by ``[sim:error]``; ``requests`` counts every chat completion request, including
    rejected ones.
    """

    requests: int = 0
    started: int = 0
    completed: int = 0
    aborted: int = 0
    failed: int = 0
    active: int = 0
    last_aborted_at: float | None = None
    """``time.monotonic()`` of the latest abort."""
    recent_messages: list[list[dict[str, str]]] = field(default_factory=list)
    """The messages of the latest `RECENT_REQUESTS` requests, newest last: a test finds its
    own request there even when other conversations ask the model meanwhile."""


class SimulatedStreamError(RuntimeError):
    """Raised inside a stream on ``[sim:error]`` so the server drops the connection mid-body."""


class _QuietSimulatedFailures(logging.Filter):
    """uvicorn logs the exception that ends a response mid-body with its traceback, as it
    would a bug; a ``[sim:error]`` stream is the simulator doing what it was asked (counted in
    ``SimulatorStats.failed``), so its record is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and _simulated(record.exc_info[1]))


def _simulated(error: BaseException | None) -> bool:
    """Whether `error` is, or was raised from, a `SimulatedStreamError`."""
    if error is None:
        return False
    if isinstance(error, SimulatedStreamError):
        return True
    if isinstance(error, BaseExceptionGroup) and any(_simulated(e) for e in error.exceptions):
        return True
    return _simulated(error.__cause__ or error.__context__)


def _quiet_simulated_failures() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _QuietSimulatedFailures) for f in logger.filters):
        logger.addFilter(_QuietSimulatedFailures())


# --- request wire types ------------------------------------------------------------------------

_PositiveInt = Annotated[int, msgspec.Meta(ge=1)]


class _ContentPart(msgspec.Struct, frozen=True):
    type: str
    text: str | None = None


class _FunctionCall(msgspec.Struct, frozen=True, omit_defaults=True):
    name: str | None = None
    arguments: str = ""


class _ToolCall(msgspec.Struct, frozen=True, omit_defaults=True):
    """A call in a request's history, a response's message, or a stream's fragment of one
    (only the first fragment has the id, type and name)."""

    function: _FunctionCall
    id: str | None = None
    type: str | None = None
    index: int | None = None


class _Message(msgspec.Struct, frozen=True):
    role: str
    content: str | list[_ContentPart] | None = None
    tool_calls: list[_ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "\n".join(part.text for part in self.content if part.text)


class _StreamOptions(msgspec.Struct, frozen=True):
    include_usage: bool | None = None


class _ChatRequest(msgspec.Struct, frozen=True):
    model: str
    messages: Annotated[list[_Message], msgspec.Meta(min_length=1)]
    stream: bool | None = None
    stream_options: _StreamOptions | None = None
    max_tokens: _PositiveInt | None = None
    max_completion_tokens: _PositiveInt | None = None
    temperature: float | None = None


# --- response wire types -----------------------------------------------------------------------


class _CompletionDetails(msgspec.Struct, frozen=True):
    reasoning_tokens: int


class _PromptDetails(msgspec.Struct, frozen=True):
    cached_tokens: int


class _Usage(msgspec.Struct, frozen=True, omit_defaults=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    completion_tokens_details: _CompletionDetails | None = None
    prompt_tokens_details: _PromptDetails | None = None


class _Delta(msgspec.Struct, frozen=True, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    tool_calls: list[_ToolCall] | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None


class _ChunkChoice(msgspec.Struct, frozen=True):
    index: int
    delta: _Delta
    finish_reason: str | None = None
    logprobs: None = None


class _Chunk(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[_ChunkChoice]
    usage: _Usage | None = None


class _AssistantMessage(msgspec.Struct, frozen=True, omit_defaults=True):
    content: str | None
    role: str = "assistant"
    tool_calls: list[_ToolCall] | None = None


class _Choice(msgspec.Struct, frozen=True):
    index: int
    message: _AssistantMessage
    finish_reason: str
    logprobs: None = None


class _Completion(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[_Choice]
    usage: _Usage


class _ModelCard(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "parley"


class _ModelList(msgspec.Struct, frozen=True, kw_only=True):
    object: str = "list"
    data: list[_ModelCard]


class _ErrorBody(msgspec.Struct, frozen=True):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class _ErrorResponse(msgspec.Struct, frozen=True):
    error: _ErrorBody


_encoder = msgspec.json.Encoder()
_request_decoder = msgspec.json.Decoder(_ChatRequest)
_DONE = b"data: [DONE]\n\n"


def decode_request(body: bytes) -> _ChatRequest:
    """A chat completion request, or ValueError saying what is wrong with `body`."""
    if too_deep(body):
        raise ValueError(f"the JSON nests more than {MAX_DEPTH} levels deep")
    try:
        return _request_decoder.decode(body)
    except msgspec.DecodeError as exc:  # ValidationError is a subclass
        raise ValueError(str(exc)) from None
    except (UnicodeError, RecursionError):
        raise ValueError("not UTF-8 JSON") from None


# --- prompt controls ---------------------------------------------------------------------------

_CONTROL = re.compile(r"\[sim:(tokens|delay|tps|status|reasoning)=(\d+(?:\.\d+)?)\]")
_REASONING_FIELD = re.compile(r"\[sim:reasoning_field=(reasoning_content|reasoning|think)\]")
_FINISH = re.compile(r"\[sim:finish=(content_filter|length|tool_calls)\]")
_USAGE = re.compile(r"\[sim:usage=(details|none)\]")
_ERROR_CONTROL = "[sim:error]"
_MALFORMED_CONTROL = "[sim:malformed]"
MAX_CONTROL_TOKENS = 100_000
RECENT_REQUESTS = 200
MAX_CONTROL_DELAY = 3600.0
_MALFORMED_EVENT = b"data: " + b"[" * 50_000 + b"\n\n"


_TOOL_CONTROL = re.compile(r"\[sim:tool=([A-Za-z0-9_-]{1,64})")
_TOOL_REPEAT_CONTROL = "[sim:tool_repeat]"
MAX_CONTROL_TOOLS = 16
_json_decoder = json.JSONDecoder()


def _tool_controls(text: str) -> list[tuple[str, str]]:
    """Each `[sim:tool=NAME {args}]` as the name and its arguments' JSON text."""
    calls: list[tuple[str, str]] = []
    for match in _TOOL_CONTROL.finditer(text):
        rest = text[match.end() :]
        arguments, end = "{}", len(rest) - len(rest.lstrip())
        if rest[end : end + 1] == "{":
            try:
                value, stop = _json_decoder.raw_decode(rest, end)
            except (ValueError, RecursionError):
                continue
            arguments, end = json.dumps(value), stop
        if rest[end : end + 1] == "]":
            calls.append((match.group(1), arguments))
        if len(calls) == MAX_CONTROL_TOOLS:
            break
    return calls


@dataclass(frozen=True)
class _Controls:
    tokens: int | None = None
    delay: float | None = None
    tps: float | None = None
    status: int | None = None
    error: bool = False
    malformed: bool = False
    tools: tuple[tuple[str, str], ...] = ()
    tool_repeat: bool = False
    reasoning: int = 0
    reasoning_field: str = "reasoning_content"
    finish: str | None = None
    usage: str = "plain"

    @classmethod
    def parse(cls, messages: Sequence[_Message]) -> "_Controls":
        text = next((m.text() for m in reversed(messages) if m.role == "user"), "")
        found = {name: float(value) for name, value in _CONTROL.findall(text)}
        status = found.get("status")
        return cls(
            tokens=int(min(max(1, found["tokens"]), MAX_CONTROL_TOKENS))
            if "tokens" in found
            else None,
            delay=min(found["delay"], MAX_CONTROL_DELAY) if "delay" in found else None,
            tps=found.get("tps"),
            status=int(status) if status is not None and 400 <= status <= 599 else None,
            error=_ERROR_CONTROL in text,
            malformed=_MALFORMED_CONTROL in text,
            tools=tuple(_tool_controls(text)),
            tool_repeat=_TOOL_REPEAT_CONTROL in text,
            reasoning=int(min(found.get("reasoning", 0), MAX_CONTROL_TOKENS)),
            reasoning_field=_named(_REASONING_FIELD, text) or "reasoning_content",
            finish=_named(_FINISH, text),
            usage=_named(_USAGE, text) or "plain",
        )


def _named(control: re.Pattern[str], text: str) -> str | None:
    found = control.search(text)
    return found.group(1) if found else None


# --- text generation ---------------------------------------------------------------------------

_DETERMINERS = ("the", "each", "every", "this", "our", "their", "one")
_ADJECTIVES = (
    "quiet", "bright", "careful", "steady", "simple", "patient", "gentle", "small", "busy",
    "remote", "local", "early", "late", "clever", "shared", "brief", "narrow", "silent", "clear",
)  # fmt: skip
_NOUNS = (
    "server", "client", "message", "channel", "room", "stream", "token", "reply", "window",
    "garden", "river", "signal", "queue", "thread", "model", "answer", "question", "network",
    "record", "story", "lantern", "harbor", "letter", "bridge",
)  # fmt: skip
_VERBS = (
    "carries", "answers", "follows", "sends", "holds", "watches", "finds", "shapes", "joins",
    "keeps", "reads", "writes", "opens", "remembers", "greets", "measures",
)  # fmt: skip
_INTRANSITIVE = ("waits", "listens", "settles", "returns", "rests", "wanders", "agrees")
_ADVERBS = ("quietly", "slowly", "always", "often", "soon", "gently", "again", "carefully")
_PREPOSITIONS = ("across", "beside", "under", "within", "toward", "through", "after", "near")


def _clause(rng: random.Random) -> list[str]:
    """One "the [adj] noun [adv] verbs the [adj] noun [prep the noun]" clause."""
    words = [rng.choice(_DETERMINERS)]
    if rng.random() < 0.6:
        words.append(rng.choice(_ADJECTIVES))
    words.append(rng.choice(_NOUNS))
    if rng.random() < 0.25:
        words.append(rng.choice(_ADVERBS))
    words += [rng.choice(_VERBS), rng.choice(_DETERMINERS)]
    if rng.random() < 0.4:
        words.append(rng.choice(_ADJECTIVES))
    words.append(rng.choice(_NOUNS))
    if rng.random() < 0.3:
        words += [rng.choice(_PREPOSITIONS), "the", rng.choice(_NOUNS)]
    return words


def _short_sentence(rng: random.Random, length: int) -> list[str]:
    """A complete sentence of 1 to 3 words, to fill the end of a reply exactly."""
    if length == 1:
        return [rng.choice(("Indeed", "Exactly", "Agreed", "Certainly"))]
    subject = [rng.choice(("everything", "nothing", "something", "someone"))]
    if length == 3:
        subject = [rng.choice(_DETERMINERS), rng.choice(_NOUNS)]
    return [*subject, rng.choice(_INTRANSITIVE)]


def _sentence(rng: random.Random, budget: int) -> list[str]:
    """A capitalised sentence ending in a full stop, at most ``budget`` words long."""
    words = _clause(rng)
    if rng.random() < 0.2:
        second = _clause(rng)
        if len(words) + 1 + len(second) <= budget:
            words = [*words[:-1], words[-1] + ",", rng.choice(("and", "while", "so")), *second]
    if len(words) > budget:
        words = _short_sentence(rng, min(budget, 3))
    words[0] = words[0].capitalize()
    words[-1] += "."
    return words


def _list_block(rng: random.Random) -> list[str]:
    """A short markdown list; the first word of each item carries the line break."""
    tokens: list[str] = []
    for _ in range(rng.randint(2, 4)):
        item = [rng.choice(_ADJECTIVES).capitalize(), rng.choice(_NOUNS)]
        tokens += ["\n- " + item[0], " " + item[1]]
    tokens[0] = "\n" + tokens[0]
    return tokens


def _code_block(rng: random.Random) -> list[str]:
    verb, noun, arg = rng.choice(_VERBS), rng.choice(_NOUNS), rng.choice(_NOUNS)
    return [
        "\n\n```python",
        "\ndef",
        f" {verb}_{noun}({arg}):",
        "\n    return",
        f" {arg}.{rng.choice(_VERBS)}()",
        "\n```",
    ]


def _compose(rng: random.Random, length: int) -> list[str]:
    """Exactly ``length`` tokens of prose, ending on a full stop or a complete block."""
    tokens: list[str] = []
    after_block = False
    while len(tokens) < length:
        remaining = length - len(tokens)
        roll = rng.random()
        block: list[str] = []
        if tokens and roll < 0.1:
            block = _list_block(rng)
        elif tokens and roll < 0.16:
            block = _code_block(rng)
        if block and len(block) <= remaining:
            tokens += block
            after_block = True
            continue
        words = _sentence(rng, remaining)
        if not tokens:
            separator = ""
        elif after_block or rng.random() < 0.2:
            separator = "\n\n"
        else:
            separator = " "
        tokens += [separator + words[0], *(" " + word for word in words[1:])]
        after_block = False
    return tokens


# --- planning ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Reply:
    """Everything decided up front about one generation."""

    model: str
    tokens: list[str]
    finish_reason: str
    prompt_tokens: int
    first_delay: float
    tps: float
    fail: bool
    include_usage: bool
    malformed: bool = False
    tool_calls: tuple[_ToolCall, ...] = ()
    reasoning: tuple[str, ...] = ()
    reasoning_field: str = "reasoning_content"
    usage_mode: str = "plain"
    cached_tokens: int = 0

    @property
    def usage(self) -> _Usage:
        completion = len(self.tokens) + len(self.reasoning)
        total = self.prompt_tokens + completion
        if self.usage_mode != "details":
            return _Usage(self.prompt_tokens, completion, total)
        return _Usage(
            self.prompt_tokens,
            completion,
            total,
            _CompletionDetails(len(self.reasoning)),
            _PromptDetails(self.cached_tokens),
        )

    def deltas(self) -> list[_Delta]:
        """The reasoning, then the reply, one delta per token."""
        if self.reasoning and self.reasoning_field == "think":
            inline = ["<thi", "nk>" + self.reasoning[0], *self.reasoning[1:], "</th", "ink>\n\n"]
            thinking = [_Delta(content=piece) for piece in inline]
        elif self.reasoning_field == "reasoning":
            thinking = [_Delta(reasoning=piece) for piece in self.reasoning]
        else:
            thinking = [_Delta(reasoning_content=piece) for piece in self.reasoning]
        return thinking + [_Delta(content=token) for token in self.tokens]

    def due(self, index: int) -> float:
        """Seconds after the start at which token ``index`` is due."""
        return self.first_delay + (index / self.tps if self.tps > 0 else 0.0)


def _plan(chat: _ChatRequest, controls: _Controls, settings: SimulatorSettings) -> _Reply:
    seed = hashlib.sha256(_encoder.encode(chat.messages)).digest()
    rng = random.Random(seed)
    natural_length = controls.tokens or rng.randint(20, 80)
    text = _compose(rng, natural_length)
    results = _tool_results(chat.messages)
    calls = _planned_calls(controls, seed) if controls.tool_repeat or not results else ()
    if calls:
        text = []
    elif results:
        text = [
            ("\n" if index else "") + f"{name} answered: {content}"
            for index, (name, content) in enumerate(results)
        ]
    cap = chat.max_completion_tokens or chat.max_tokens or settings.max_tokens
    tokens = text[:cap]
    if controls.finish == "content_filter":
        tokens = tokens[: len(tokens) // 2]
    reasoning = _compose(random.Random(seed + b"reasoning"), controls.reasoning)
    prompt_sizes = [len(m.text().split()) + 4 for m in chat.messages]
    finish_reason = controls.finish or ("length" if len(text) > cap else "stop")
    return _Reply(
        model=chat.model,
        tokens=tokens,
        finish_reason="tool_calls" if calls else finish_reason,
        prompt_tokens=sum(prompt_sizes),
        cached_tokens=sum(prompt_sizes[:-1]),
        reasoning=tuple(reasoning) if controls.reasoning else (),
        reasoning_field=controls.reasoning_field,
        usage_mode=controls.usage,
        first_delay=settings.first_token_delay if controls.delay is None else controls.delay,
        tps=settings.tokens_per_second if controls.tps is None else controls.tps,
        fail=controls.error,
        include_usage=bool(chat.stream_options and chat.stream_options.include_usage)
        and controls.usage != "none",
        malformed=controls.malformed,
        tool_calls=calls,
    )


def _planned_calls(controls: _Controls, seed: bytes) -> tuple[_ToolCall, ...]:
    """The calls the controls ask for, with ids fixed by the conversation (like the text)."""
    return tuple(
        _ToolCall(
            _FunctionCall(name, arguments),
            id=f"call_{seed.hex()[:12]}_{index}",
            type="function",
            index=index,
        )
        for index, (name, arguments) in enumerate(controls.tools)
    )


def _tool_results(messages: Sequence[_Message]) -> list[tuple[str, str]]:
    """The tool results after the last user message: (tool name, content) each."""
    last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)
    names = {
        call.id: call.function.name or "the tool"
        for message in messages[last_user + 1 :]
        for call in message.tool_calls or ()
    }
    return [
        (names.get(message.tool_call_id or "", "the tool"), message.text())
        for message in messages[last_user + 1 :]
        if message.role == "tool"
    ]


FRAGMENT_CHARS = 4
"""A streamed call's arguments arrive in pieces this long."""


def _call_fragments(calls: Sequence[_ToolCall]) -> list[_ToolCall]:
    """Each call's head (id and name) then its arguments in pieces, the calls interleaved."""
    streams = [_fragments_of(call) for call in calls]
    return [f for group in itertools.zip_longest(*streams) for f in group if f is not None]


def _fragments_of(call: _ToolCall) -> list[_ToolCall]:
    text = call.function.arguments
    pieces = [text[i : i + FRAGMENT_CHARS] for i in range(0, len(text), FRAGMENT_CHARS)]
    head = _ToolCall(_FunctionCall(call.function.name), call.id, call.type, call.index)
    return [head, *(_ToolCall(_FunctionCall(None, p), index=call.index) for p in pieces)]


# --- responses ---------------------------------------------------------------------------------


def _json(payload: msgspec.Struct | SimulatorStats, status: int = 200) -> Response[bytes]:
    return Response(_encoder.encode(payload), status_code=status, media_type="application/json")


def _error(status: int, message: str) -> Response[bytes]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return _json(_ErrorResponse(_ErrorBody(message=message, type=kind)), status)


def _data(chunk: _Chunk) -> bytes:
    """One SSE event, framed exactly like OpenAI's."""
    return b"data: " + _encoder.encode(chunk) + b"\n\n"


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


async def _sleep_until(start: float, due: float, index: int) -> None:
    """Sleep until ``start + due`` (drift-free pacing); yield now and then when not sleeping."""
    pause = start + due - asyncio.get_running_loop().time()
    if pause > 0:
        await asyncio.sleep(pause)
    elif index % 64 == 0:
        await asyncio.sleep(0)


async def _sse(reply: _Reply, stats: SimulatorStats) -> AsyncIterator[bytes]:
    """The OpenAI SSE stream for ``reply``, keeping ``stats`` honest.

    When the client hangs up, Litestar cancels the task iterating this generator (it listens for
    ``http.disconnect`` while streaming), so ``CancelledError`` lands at the pending sleep; if
    the generator was parked at a ``yield`` instead, it is closed later and sees
    ``GeneratorExit``.  Both count as aborted.
    """
    chunk_id, created = _completion_id(), int(time.time())

    def event(delta: _Delta, finish_reason: str | None = None) -> bytes:
        choice = _ChunkChoice(0, delta, finish_reason)
        return _data(_Chunk(id=chunk_id, created=created, model=reply.model, choices=[choice]))

    start = asyncio.get_running_loop().time()
    stats.started += 1
    stats.active += 1
    try:
        yield event(_Delta(role="assistant", content=""))
        broken = reply.fail or reply.malformed
        deltas = reply.deltas()
        for index, delta in enumerate(deltas[:3] if broken else deltas):
            await _sleep_until(start, reply.due(index), index)
            yield event(delta)
        for index, fragment in enumerate(_call_fragments(reply.tool_calls)):
            await _sleep_until(start, reply.due(index), index)
            yield event(_Delta(tool_calls=[fragment]))
        if reply.fail:
            raise SimulatedStreamError("simulated stream failure ([sim:error])")
        if reply.malformed:
            yield _MALFORMED_EVENT
        yield event(_Delta(), reply.finish_reason)
        if reply.include_usage:
            yield _data(
                _Chunk(
                    id=chunk_id, created=created, model=reply.model, choices=[], usage=reply.usage
                )
            )
        yield _DONE
    except (GeneratorExit, asyncio.CancelledError):
        stats.aborted += 1
        stats.last_aborted_at = time.monotonic()
        raise
    except BaseException:
        stats.failed += 1
        raise
    else:
        stats.completed += 1
    finally:
        stats.active -= 1


async def _complete(reply: _Reply, stats: SimulatorStats) -> Response[bytes]:
    """A non-streaming completion, delivered after the time the whole stream would take."""
    stats.started += 1
    stats.active += 1
    try:
        await asyncio.sleep(reply.due(max(len(reply.tokens) - 1, 0)))
        if reply.fail:
            stats.failed += 1
            return _error(500, "simulated failure ([sim:error])")
        calls = [_ToolCall(c.function, c.id, c.type) for c in reply.tool_calls] or None
        text = "".join(reply.tokens)
        message = _AssistantMessage((text or None) if calls else text, tool_calls=calls)
        choice = _Choice(0, message, reply.finish_reason)
        completion = _Completion(
            id=_completion_id(),
            created=int(time.time()),
            model=reply.model,
            choices=[choice],
            usage=reply.usage,
        )
        stats.completed += 1
        return _json(completion)
    finally:
        stats.active -= 1


def simulator_router(
    settings: SimulatorSettings,
    stats: SimulatorStats,
    *,
    model: str = "parley-sim",
    path: str = "/v1",
) -> Router:
    """``POST {path}/chat/completions``, ``GET {path}/models`` and ``GET {path}/sim/stats``.

    ``model`` is the id ``GET /v1/models`` lists; completions echo the requested model."""
    _quiet_simulated_failures()

    @post("/chat/completions", status_code=200)
    async def chat_completions(request: Request[Any, Any, Any]) -> Response[Any]:
        stats.requests += 1
        try:
            chat = decode_request(await request.body())
        except ValueError as exc:
            return _error(400, f"Invalid request body: {exc}")
        asked = [{"role": m.role, "content": m.text()} for m in chat.messages]
        stats.recent_messages = [*stats.recent_messages[1 - RECENT_REQUESTS :], asked]
        controls = _Controls.parse(chat.messages)
        if controls.status is not None:
            return _error(controls.status, f"simulated HTTP {controls.status} ([sim:status])")
        reply = _plan(chat, controls, settings)
        if not chat.stream:
            return await _complete(reply, stats)
        return Stream(
            _sse(reply, stats),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @get("/models")
    async def list_models() -> Response[bytes]:
        return _json(_ModelList(data=[_ModelCard(id=model)]))

    @get("/sim/stats")
    async def sim_stats() -> Response[bytes]:
        return _json(stats)

    return Router(path=path, route_handlers=[chat_completions, list_models, sim_stats])


def simulator_app(
    settings: SimulatorSettings | None = None,
    stats: SimulatorStats | None = None,
    *,
    model: str = "parley-sim",
) -> Litestar:
    """The simulator as a standalone app (``parley model --port N``)."""
    router = simulator_router(
        settings or SimulatorSettings(), stats or SimulatorStats(), model=model
    )
    return Litestar(route_handlers=[router], openapi_config=None)
