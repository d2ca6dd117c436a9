"""The model's streamed tool calls, put together (pure).

An OpenAI-compatible stream sends each call in fragments, in the `tool_calls` of its chunks'
deltas: `{index, id, function: {name, arguments}}`, where `index` says which call a fragment
belongs to (several calls stream in parallel, interleaved), the id and name usually come whole
in a call's first fragment and the arguments — JSON text — in pieces across many chunks.
`Calls` takes the fragments in order and gives the complete calls at the end.

What servers differ in is absorbed here: an id or name repeated on every fragment is taken
once (a different one is a continuation, as the `openai` client's own accumulator reads it);
a fragment without `index` continues the latest call, unless it brings a new id; a call
without an id gets `call_<index>`. Every size is bounded: a call's arguments past
`max_argument_chars` are dropped and the call carries a `problem` instead (the runner answers
it with an error result the model sees), and calls past `max_calls` are not kept at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

MAX_CALLS: Final = 32
MAX_ARGUMENT_CHARS: Final = 262_144
MAX_NAME_CHARS: Final = 256
"""Ids and names longer than this are cut (a real one is at most 64 characters)."""


class FunctionFragment(msgspec.Struct, frozen=True):
    name: str | None = None
    arguments: str | None = None


class Fragment(msgspec.Struct, frozen=True):
    """One element of a chunk delta's `tool_calls`, as the wire has it."""

    index: int | None = None
    id: str | None = None
    function: FunctionFragment | None = None


class BadFragment(ValueError):
    """A `tool_calls` element that is not shaped like one (the model's reply is malformed)."""


def read_fragment(value: object) -> Fragment:
    """One `tool_calls` element (a dict, or an object such as the `openai` client builds
    without validating it) as a checked Fragment, or BadFragment."""
    try:
        return msgspec.convert(value, Fragment, from_attributes=True)
    except (msgspec.ValidationError, RecursionError, UnicodeError) as exc:
        # msgspec encodes a string found where a number or an object belongs, so a lone
        # surrogate there is a UnicodeEncodeError rather than a ValidationError
        raise BadFragment(f"a malformed tool call: {exc}") from None


@dataclass(frozen=True, slots=True)
class Progress:
    """What one fragment added to a call: for streaming the call to the tabs as it grows."""

    index: int
    id: str
    name: str
    arguments: str
    """This fragment's piece of the arguments (the whole text is in the finished call)."""


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A complete call: `arguments` is the model's JSON text, not yet parsed or checked."""

    index: int
    id: str
    name: str
    arguments: str
    problem: str | None = None
    """Why the call cannot run as it came (too long, no tool named); None when it can."""


@dataclass(slots=True)
class _Growing:
    index: int
    id: str = ""
    name: str = ""
    pieces: list[str] = field(default_factory=list)
    size: int = 0
    overflow: bool = False


@dataclass
class Calls:
    """The calls of one model response, growing fragment by fragment."""

    max_calls: int = MAX_CALLS
    max_argument_chars: int = MAX_ARGUMENT_CHARS
    dropped: int = 0
    """Fragments of calls past `max_calls`, ignored."""
    _calls: dict[int, _Growing] = field(default_factory=dict)
    _latest: int | None = None

    def add(self, fragment: Fragment) -> Progress | None:
        """Take one fragment; what it added, or None when it was ignored."""
        index = self._index_of(fragment)
        call = self._calls.get(index)
        if call is None:
            if len(self._calls) >= self.max_calls:
                self.dropped += 1
                return None
            call = self._calls[index] = _Growing(index)
        self._latest = index
        call.id = _joined(call.id, fragment.id)
        function = fragment.function or FunctionFragment()
        call.name = _joined(call.name, function.name)
        piece = self._grow(call, function.arguments or "")
        return Progress(index, call.id or _default_id(index), call.name, piece)

    def finish(self) -> list[ToolCall]:
        """The complete calls, in index order."""
        return [_complete(self._calls[index]) for index in sorted(self._calls)]

    def __bool__(self) -> bool:
        return bool(self._calls)

    def _index_of(self, fragment: Fragment) -> int:
        if fragment.index is not None:
            return fragment.index
        latest = self._latest
        if latest is None:
            return 0
        if fragment.id and self._calls[latest].id and fragment.id != self._calls[latest].id:
            return max(self._calls) + 1
        return latest

    def _grow(self, call: _Growing, piece: str) -> str:
        if call.overflow or not piece:
            return ""
        call.size += len(piece)
        if call.size > self.max_argument_chars:
            call.overflow = True
            call.pieces.clear()
            return ""
        call.pieces.append(piece)
        return piece


def _joined(current: str, piece: str | None) -> str:
    """An id or name after one more fragment: taken once when repeated, else continued."""
    if not piece or piece == current:
        return current
    return (current + piece)[:MAX_NAME_CHARS]


def _default_id(index: int) -> str:
    return f"call_{index}"


def _complete(call: _Growing) -> ToolCall:
    problem = None
    if call.overflow:
        problem = "the arguments are too long"
    elif not call.name:
        problem = "the call names no tool"
    arguments = "" if call.overflow else "".join(call.pieces)
    return ToolCall(call.index, call.id or _default_id(call.index), call.name, arguments, problem)


def assistant_message(text: str, calls: list[ToolCall]) -> dict[str, Any]:
    """The model's step as the next request's history: its text and the calls it made."""
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    message["tool_calls"] = [
        {
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments},
        }
        for call in calls
    ]
    return message


def tool_message(call_id: str, content: str) -> dict[str, Any]:
    """One call's result as the next request's history."""
    return {"role": "tool", "tool_call_id": call_id, "content": content}
