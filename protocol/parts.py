"""An assistant message as an ordered list of parts, built from its pieces and rebuilt from
its events.

The worker feeds each piece of the reply (its kind and text) to a `PartsBuilder`, which says
which events carry it: a piece of a `text` part is a `token` event, as in protocol version 1,
so a client that knows only `token` sees the answer unchanged; any other part opens with
`part_start`, grows with `part_delta` and closes with `part_end`. A `token` when the message's
last part is not text begins a text part (no `part_start`: the hot path of a plain answer is
the one of version 1).

A reply that calls tools holds every step: a `tool_call` part per call (opened when the call's
name arrives, its arguments streamed into it as `part_delta`s; calls streamed in parallel are
open together), then a `tool_result` part per call (start, the result whole, end with its
`status` and, for a call that waited for a person, the `approval`'s outcome), then the next
step's parts.

A client folds the events back with `MessageParts`; the builder's `parts()` are what is
persisted, so the two must agree byte for byte (tests/protocol/test_parts.py).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from protocol import frames as f


def round_ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


@dataclass(slots=True)
class _Building:
    kind: f.PartKind
    began: float
    texts: list[str] = field(default_factory=list)
    duration_ms: float | None = None
    call_id: str | None = None
    name: str | None = None
    status: f.ToolStatus | None = None
    open: bool = True
    approval: f.ToolApproval | None = None

    def part(self) -> f.Part:
        return f.Part(
            kind=self.kind,
            text="".join(self.texts),
            duration_ms=self.duration_ms,
            call_id=self.call_id,
            name=self.name,
            status=self.status,
            approval=self.approval,
        )


class PartsBuilder:
    """The parts of one reply as its pieces arrive. Times are the caller's clock (seconds)."""

    __slots__ = ("_parts", "conversation", "kind", "message_id")

    def __init__(self, conversation: uuid.UUID, message_id: uuid.UUID) -> None:
        self.conversation = conversation
        self.message_id = message_id
        self.kind: f.PartKind | None = None
        """The kind of the part pieces go to now; None before the first and after `close`."""
        self._parts: list[_Building] = []

    def switch(self, kind: f.PartKind, now: float) -> list[f.ServerFrame]:
        """Close the current part and open one of `kind`: the events that say so. Tool calls
        still streaming stay open (they close with the model's response)."""
        events = self._end_current(now)
        self.kind = kind
        if kind == "text" and self._parts and self._parts[-1].kind == "text":
            self._parts[-1].open = True  # a `token` continues the last part when it is text
            return events
        self._parts.append(_Building(kind, now))
        if kind != "text":
            events.append(self._start(len(self._parts) - 1))
        return events

    def open_call(self, call_id: str, name: str, now: float) -> tuple[int, list[f.ServerFrame]]:
        """A `tool_call` part for a call the model began: its index and the events."""
        events = self._end_current(now)
        self._parts.append(_Building("tool_call", now, call_id=call_id, name=name))
        self.kind = "tool_call"
        index = len(self._parts) - 1
        events.append(self._start(index))
        return index, events

    def add_to(self, index: int, text: str) -> f.ServerFrame:
        """A piece of part `index` (a tool call's arguments), and the event that carries it."""
        self._parts[index].texts.append(text)
        return self.piece(index, text)

    def result(
        self,
        call_id: str,
        name: str,
        status: f.ToolStatus,
        text: str,
        duration_ms: float,
        approval: f.ToolApproval | None = None,
    ) -> list[f.ServerFrame]:
        """A call's whole `tool_result` part: its start, its text and its end (after the
        model response that made the call was closed); the end says how a person's approval
        of the call ended, when it waited for one."""
        events: list[f.ServerFrame] = []
        self._parts.append(
            _Building(
                "tool_result", 0.0, [text], duration_ms, call_id, name, status, False, approval
            )
        )
        index = len(self._parts) - 1
        events.append(self._start(index))
        if text:
            events.append(self.piece(index, text))
        events.append(self._end(index))
        return events

    def _end_current(self, now: float) -> list[f.ServerFrame]:
        """End the last part when it is open and not a tool call."""
        if self.kind is None or self.kind == "tool_call":
            return []
        self.kind = None
        return self._end_part(len(self._parts) - 1, now)

    def _end_part(self, index: int, now: float) -> list[f.ServerFrame]:
        part = self._parts[index]
        part.open = False
        if part.kind == "text":
            return []
        if part.kind == "reasoning":
            part.duration_ms = round_ms(now - part.began)
        return [self._end(index)]

    @property
    def current(self) -> int:
        """The index of the part pieces go to now."""
        return len(self._parts) - 1

    def extend(self, text: str) -> int:
        """Add a piece to the current part and give the part's index, without making the
        piece's event (`piece` makes it: the worker joins pieces into one event first)."""
        self._parts[-1].texts.append(text)
        return len(self._parts) - 1

    def add(self, text: str) -> f.ServerFrame:
        """A piece of the current part, and the event that carries it."""
        self._parts[-1].texts.append(text)
        return self.piece(len(self._parts) - 1, text)

    def close(self, now: float) -> list[f.ServerFrame]:
        """End every part still open: the current one and the tool calls streaming (at the
        end of a model response)."""
        self.kind = None
        events: list[f.ServerFrame] = []
        for index, part in enumerate(self._parts):
            if part.open:
                events += self._end_part(index, now)
        return events

    def parts(self) -> list[f.Part]:
        return [p.part() for p in self._parts]

    def restore(self, parts: list[f.Part]) -> None:
        """Continue from parts recorded earlier (a turn taken over after completed steps);
        all of them are closed."""
        self.kind = None
        self._parts = [_restored(part) for part in parts]

    def replay(self) -> list[f.ServerFrame]:
        """The events of the reply so far, one piece per part: to publish it again after
        Redis lost the conversation (the open part stays open)."""
        events: list[f.ServerFrame] = []
        for index, building in enumerate(self._parts):
            text = "".join(building.texts)
            if building.kind != "text":
                events.append(self._start(index))
            if text:
                events.append(self.piece(index, text))
            if building.kind != "text" and not building.open:
                events.append(self._end(index))
        return events

    def _start(self, index: int) -> f.PartStart:
        part = self._parts[index]
        return f.PartStart(
            conversation=self.conversation,
            message_id=self.message_id,
            index=index,
            kind=part.kind,
            call_id=part.call_id,
            name=part.name,
        )

    def piece(self, index: int, text: str) -> f.ServerFrame:
        """The event carrying `text` of part `index` (a `token` for a text part)."""
        if self._parts[index].kind == "text":
            return f.Token(conversation=self.conversation, message_id=self.message_id, text=text)
        return f.PartDelta(
            conversation=self.conversation, message_id=self.message_id, index=index, text=text
        )

    def _end(self, index: int) -> f.PartEnd:
        part = self._parts[index]
        return f.PartEnd(
            conversation=self.conversation,
            message_id=self.message_id,
            index=index,
            duration_ms=part.duration_ms,
            status=part.status,
            approval=part.approval,
        )


def _restored(part: f.Part) -> _Building:
    texts = [part.text] if part.text else []
    return _Building(
        part.kind,
        0.0,
        texts,
        part.duration_ms,
        part.call_id,
        part.name,
        part.status,
        False,
        part.approval,
    )


def content_of(parts: list[f.Part]) -> str:
    """A message's `content`: its text parts, joined."""
    return "".join(p.text for p in parts if p.kind == "text")


def stored_parts(parts: list[f.Part]) -> list[f.Part] | None:
    """What a message keeps in `parts`: nothing when its text says it all."""
    if all(p.kind == "text" for p in parts):
        return None
    return parts


def parts_of(message: f.Message) -> list[f.Part]:
    """A message's parts, for one written before parts existed or holding only text too."""
    if message.parts is not None:
        return message.parts
    return [f.Part(kind="text", text=message.content)] if message.content else []


class MessageParts:
    """One assistant message's parts, rebuilt from its events in seq order (a client's view)."""

    __slots__ = ("_parts", "message_id", "reason")

    def __init__(self, message_id: uuid.UUID) -> None:
        self.message_id = message_id
        self._parts: list[_Building] = []
        self.reason: f.DoneReason | None = None

    def apply(self, event: f.ServerFrame) -> None:
        if getattr(event, "message_id", None) != self.message_id:
            return
        if isinstance(event, f.Start):
            self._parts.clear()  # a restarted message: discard what it had
            self.reason = None
        elif isinstance(event, f.PartStart):
            while len(self._parts) <= event.index:
                self._parts.append(_Building(event.kind, 0.0))
            self._parts[event.index].call_id = event.call_id
            self._parts[event.index].name = event.name
        elif isinstance(event, f.PartDelta) and event.index < len(self._parts):
            self._parts[event.index].texts.append(event.text)
        elif isinstance(event, f.Token):
            if not self._parts or self._parts[-1].kind != "text":
                self._parts.append(_Building("text", 0.0))
            self._parts[-1].texts.append(event.text)
        elif isinstance(event, f.PartEnd) and event.index < len(self._parts):
            self._parts[event.index].duration_ms = event.duration_ms
            self._parts[event.index].status = event.status
            self._parts[event.index].approval = event.approval
        elif isinstance(event, f.Done):
            self.reason = event.reason

    def parts(self) -> list[f.Part]:
        return [p.part() for p in self._parts]
