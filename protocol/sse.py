"""Server-Sent Events framing (the WHATWG `text/event-stream` format), and the Vercel AI SDK's
UI message stream (protocol v1) made from a conversation's events.

A Parley event over SSE is `id: <seq>` (when the frame has one; for `joined`, its `last_seq`),
`event: <type>` and `data: <the JSON the WebSocket sends>`. `Last-Event-ID` then names the seq
the client holds, which is what `join`'s `after` means.

The AI SDK's stream is `data: <chunk JSON>` lines ending with `data: [DONE]`: `start`,
`text-start`, `text-delta` and `text-end` for the assistant message's text,
`reasoning-start`, `reasoning-delta` and `reasoning-end` for each reasoning part (id
`<message id>:<part index>`), and `finish` (after an `error` chunk when the model failed) at
its end; a cancelled reply finishes with `finishReason: "other"`.
"""

from __future__ import annotations

import uuid
from typing import Final, Literal

import msgspec

HEARTBEAT: Final = b": keep-alive\n\n"
"""A comment line: ignored by every SSE client, it keeps proxies from timing the stream out."""
DONE: Final = b"data: [DONE]\n\n"
UI_STREAM_HEADER: Final = ("x-vercel-ai-ui-message-stream", "v1")


class _Head(msgspec.Struct):
    """The fields of a server frame that SSE repeats in its own lines."""

    type: str = "message"
    seq: int = 0
    last_seq: int | None = None


_head_decoder: Final = msgspec.json.Decoder(_Head)


def retry(milliseconds: int) -> bytes:
    """How long an `EventSource` waits before it reconnects."""
    return b"retry: %d\n\n" % milliseconds


def event(payload: bytes) -> bytes:
    """One server frame (its JSON) as an SSE event."""
    head = _head_decoder.decode(payload)
    seq = head.last_seq if head.type == "joined" else head.seq or None
    lines = [] if seq is None else [b"id: %d\n" % seq]
    lines.append(b"event: " + head.type.encode() + b"\n")
    lines.append(_data(payload))
    return b"".join(lines)


def _data(payload: bytes) -> bytes:
    """`data:` lines and the blank line ending the event (JSON from msgspec has no newline;
    a payload with one is split as the format requires)."""
    if b"\n" not in payload:
        return b"data: " + payload + b"\n\n"
    return b"".join(b"data: " + line + b"\n" for line in payload.split(b"\n")) + b"\n"


def last_event_id(header: str | None, after: int | None) -> int | None:
    """The seq to resume after: the `Last-Event-ID` header wins over `?after=`; a header that
    is not a seq (an `EventSource` that never got an id sends none) counts as absent."""
    if header is not None and header.strip().isdigit():
        return int(header.strip())
    return after


# --------------------------------------------------------------------------- AI SDK stream

FinishReason = Literal["stop", "length", "content-filter", "tool-calls", "error", "other"]
FINISH_REASONS: Final[dict[str, FinishReason]] = {
    "stop": "stop",
    "length": "length",
    "content_filter": "content-filter",
    "tool_calls": "tool-calls",
    "error": "error",
    "cancelled": "other",
}


class _Event(msgspec.Struct):
    """The fields of a conversation event the AI SDK stream needs."""

    type: str
    message_id: uuid.UUID | None = None
    text: str = ""
    index: int = 0
    kind: str = ""
    reason: str = ""
    error: str | None = None
    code: str | None = None
    message: str | dict[str, object] | None = None
    """A refused turn's text (`error`); the user's message itself in a `message` event."""
    seq: int = 0


_event_decoder: Final = msgspec.json.Decoder(_Event)
_encoder: Final = msgspec.json.Encoder()


def chunk(obj: dict[str, object]) -> bytes:
    return b"data: " + _encoder.encode(obj) + b"\n\n"


class UiReply:
    """One assistant reply as UI message chunks, from the conversation's events in seq order.

    It follows the first `start` it sees (or the one for `message_id`, when given) and ends at
    that message's `done` (or at the `error` event of a turn the application refused, which
    has no `start`); other events are skipped. A second `start` for the same message
    (a generation retried by another worker) restarts its text: the AI SDK has no way to take
    text back, so the restart ends the stream with an `error` chunk naming it."""

    __slots__ = ("ended", "message_id", "reasoning", "started")

    def __init__(self, message_id: uuid.UUID | None = None) -> None:
        self.message_id = message_id
        self.started = False
        self.ended = False
        self.reasoning: set[int] = set()
        """The indices of the reasoning parts begun and not yet ended."""

    def feed(self, payload: bytes) -> list[bytes]:
        """The chunks one event (its JSON) stands for; `ended` once the reply is over."""
        if self.ended:
            return []
        ev = _event_decoder.decode(payload)
        if ev.message_id is None or (
            self.message_id is not None and ev.message_id != self.message_id
        ):
            return []
        if ev.type == "start":
            return self._start(ev.message_id)
        if ev.type == "error" and ev.code == "refused":
            self.ended = True
            text = ev.message if isinstance(ev.message, str) else "the turn was refused"
            return [chunk({"type": "error", "errorText": text}), DONE]
        if not self.started:
            return []
        text_id = str(ev.message_id)
        if ev.type == "token":
            return [chunk({"type": "text-delta", "id": text_id, "delta": ev.text})]
        if ev.type == "done":
            return self._done(ev, text_id)
        return self._reasoning(ev, text_id)

    def _reasoning(self, ev: _Event, text_id: str) -> list[bytes]:
        """A reasoning part's event as its chunk; other parts' events have none (yet)."""
        part_id = f"{text_id}:{ev.index}"
        if ev.type == "part_start" and ev.kind == "reasoning":
            self.reasoning.add(ev.index)
            return [chunk({"type": "reasoning-start", "id": part_id})]
        if ev.index not in self.reasoning:
            return []
        if ev.type == "part_delta":
            return [chunk({"type": "reasoning-delta", "id": part_id, "delta": ev.text})]
        if ev.type == "part_end":
            self.reasoning.discard(ev.index)
            return [chunk({"type": "reasoning-end", "id": part_id})]
        return []

    def _start(self, message_id: uuid.UUID) -> list[bytes]:
        if self.started:
            self.ended = True
            return [chunk({"type": "error", "errorText": "the reply restarted; reload it"}), DONE]
        self.started = True
        self.message_id = message_id
        text_id = str(message_id)
        return [
            chunk({"type": "start", "messageId": text_id}),
            chunk({"type": "text-start", "id": text_id}),
        ]

    def _done(self, ev: _Event, text_id: str) -> list[bytes]:
        self.ended = True
        left_open = sorted(self.reasoning)
        out = [chunk({"type": "reasoning-end", "id": f"{text_id}:{i}"}) for i in left_open]
        out.append(chunk({"type": "text-end", "id": text_id}))
        if ev.reason == "error":
            out.append(chunk({"type": "error", "errorText": ev.error or "the model failed"}))
        out.append(
            chunk({"type": "finish", "finishReason": FINISH_REASONS.get(ev.reason, "other")})
        )
        out.append(DONE)
        return out
