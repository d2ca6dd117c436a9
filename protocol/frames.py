"""Every frame of the Parley WebSocket protocol, version 1, as msgspec Structs.

Client frames form the tagged union `ClientFrame`, server frames `ServerFrame`; both are
tagged by the `type` field. Server frames omit fields left at their default, so optional
fields are absent rather than `null`.

Conversation events (`message`, `start`, `token`, `done`, `queued`, `updated`) are encoded
*without* their `seq`: the Redis append script assigns the seq and splices it in front of the
encoded bytes (`{"seq":N,...`), so every process forwards one encoding unchanged.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta, Struct

PROTOCOL_VERSION: Final = 1
SUBPROTOCOL: Final = "parley.v1"
BEARER_PREFIX: Final = "bearer."

Ref = Annotated[str, Meta(max_length=64)]
Seq = Annotated[int, Meta(ge=0)]
ErrorCode = Literal[
    "bad_frame",
    "invalid",
    "too_large",
    "unauthorized",
    "not_found",
    "busy",
    "rate_limited",
    "unavailable",
    "internal",
]
DoneReason = Literal["stop", "length", "cancelled", "error"]
Role = Literal["user", "assistant"]
MessageStatus = Literal["complete", "cancelled", "error"]


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> uuid.UUID:
    return uuid.uuid4()


# --------------------------------------------------------------------------- shapes


class Usage(Struct, frozen=True):
    prompt_tokens: int
    completion_tokens: int


class Conversation(Struct, frozen=True, omit_defaults=True):
    id: uuid.UUID
    title: str
    system: str
    model: str
    created_at: datetime
    updated_at: datetime
    last_seq: int = 0


class Message(Struct, frozen=True, omit_defaults=True):
    id: uuid.UUID
    role: Role
    content: str
    status: MessageStatus
    created_at: datetime
    model: str | None = None
    usage: Usage | None = None


class Limits(Struct, frozen=True):
    max_frame_bytes: int
    max_text_chars: int
    max_joined: int
    frames_per_second: float
    turns_per_minute: int


# --------------------------------------------------------------------------- client frames


class _Client(Struct, frozen=True, tag_field="type", forbid_unknown_fields=True):
    ref: Ref | None = None


class Auth(_Client, tag="auth", kw_only=True, frozen=True):
    token: str


class Create(_Client, tag="create", kw_only=True, frozen=True):
    title: Annotated[str, Meta(max_length=200)] | None = None
    system: str | None = None
    model: Annotated[str, Meta(max_length=200)] | None = None


class Join(_Client, tag="join", kw_only=True, frozen=True):
    conversation: uuid.UUID
    after: Seq | None = None


class Leave(_Client, tag="leave", kw_only=True, frozen=True):
    conversation: uuid.UUID


class Say(_Client, tag="say", kw_only=True, frozen=True):
    conversation: uuid.UUID
    text: str
    id: uuid.UUID | None = None


class Cancel(_Client, tag="cancel", kw_only=True, frozen=True):
    conversation: uuid.UUID


class Regenerate(_Client, tag="regenerate", kw_only=True, frozen=True):
    conversation: uuid.UUID


class Ping(_Client, tag="ping", kw_only=True, frozen=True):
    pass


ClientFrame = Auth | Create | Join | Leave | Say | Cancel | Regenerate | Ping
CLIENT_TYPES: Final = frozenset(
    t.__struct_config__.tag for t in (Auth, Create, Join, Leave, Say, Cancel, Regenerate, Ping)
)


# --------------------------------------------------------------------------- server replies


class _Server(Struct, frozen=True, tag_field="type", omit_defaults=True):
    pass


class Ready(_Server, tag="ready", kw_only=True, frozen=True):
    user: str
    session: str
    limits: Limits
    protocol: int = PROTOCOL_VERSION
    model: str = ""
    simulated: bool = False
    expires_at: int | None = None
    ref: str | None = None


class Created(_Server, tag="created", kw_only=True, frozen=True):
    conversation: uuid.UUID
    meta: Conversation
    ref: str | None = None


class Joined(_Server, tag="joined", kw_only=True, frozen=True):
    """`last_seq` is the seq the client is now at: the next event it gets is `last_seq + 1`."""

    conversation: uuid.UUID
    meta: Conversation
    last_seq: int
    history: list[Message] | None = None
    reset: bool = False
    ref: str | None = None


class Ack(_Server, tag="ack", kw_only=True, frozen=True):
    message_id: uuid.UUID | None = None
    duplicate: bool = False
    expires_at: int | None = None
    ref: str | None = None


class Pong(_Server, tag="pong", kw_only=True, frozen=True):
    ref: str | None = None


class Error(_Server, tag="error", kw_only=True, frozen=True):
    code: ErrorCode
    message: str
    retry_after: float | None = None
    ref: str | None = None


# --------------------------------------------------------------------------- conversation events


class MessageEvent(_Server, tag="message", kw_only=True, frozen=True):
    conversation: uuid.UUID
    message: Message
    seq: int = 0


class Start(_Server, tag="start", kw_only=True, frozen=True):
    """`replaces` names the assistant message a `regenerate` replaces. A `start` for a
    message id the client already holds restarts that message: discard its text.
    `accepted_at` (Unix seconds) is when the turn was accepted: web processes measure the
    time to first token from it."""

    conversation: uuid.UUID
    message_id: uuid.UUID
    model: str
    replaces: uuid.UUID | None = None
    accepted_at: float | None = None
    seq: int = 0


class Token(_Server, tag="token", kw_only=True, frozen=True):
    """`first_seq`, when present, says this frame stands for the events `first_seq..seq`:
    consecutive pieces of one message merged for a socket that lags behind."""

    conversation: uuid.UUID
    message_id: uuid.UUID
    text: str
    first_seq: int = 0
    seq: int = 0


class Done(_Server, tag="done", kw_only=True, frozen=True):
    conversation: uuid.UUID
    message_id: uuid.UUID
    reason: DoneReason
    usage: Usage | None = None
    error: str | None = None
    seq: int = 0


class Queued(_Server, tag="queued", kw_only=True, frozen=True):
    conversation: uuid.UUID
    message_id: uuid.UUID
    position: int
    seq: int = 0


class Updated(_Server, tag="updated", kw_only=True, frozen=True):
    conversation: uuid.UUID
    meta: Conversation
    seq: int = 0


class ConversationChanged(_Server, tag="conversation_changed", kw_only=True, frozen=True):
    conversation: uuid.UUID
    meta: Conversation | None = None
    deleted: bool = False


ConversationEvent = MessageEvent | Start | Token | Done | Queued | Updated
ServerFrame = (
    Ready
    | Created
    | Joined
    | Ack
    | Pong
    | Error
    | MessageEvent
    | Start
    | Token
    | Done
    | Queued
    | Updated
    | ConversationChanged
)


# --------------------------------------------------------------------------- codecs

_encoder: Final = msgspec.json.Encoder()
_client_decoder: Final = msgspec.json.Decoder(ClientFrame)
_server_decoder: Final = msgspec.json.Decoder(ServerFrame)
_any_decoder: Final = msgspec.json.Decoder()


def encode(obj: Any) -> bytes:
    return _encoder.encode(obj)


def decode_server(data: bytes | str) -> ServerFrame:
    frame: ServerFrame = _server_decoder.decode(data)
    return frame


class FrameError(Exception):
    """A client frame that cannot be used; `code` and `message` go into the `error` frame."""

    def __init__(self, code: ErrorCode, message: str, ref: str | None = None) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message
        self.ref = ref


def decode_client(data: bytes | str) -> ClientFrame:
    """Decode one client frame or raise FrameError saying what is wrong with it.

    The fast path is a single typed decode; only a failing frame is decoded a second time,
    untyped, to tell a malformed frame (`bad_frame`) from a wrong field (`invalid`) and to
    recover its `ref`.
    """
    try:
        frame: ClientFrame = _client_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise _explain(data, exc) from None
    except UnicodeDecodeError:  # a text frame that is not UTF-8 (msgspec raises this too)
        raise FrameError("bad_frame", "a text frame must be UTF-8 JSON") from None
    return frame


def _explain(data: bytes | str, exc: msgspec.DecodeError) -> FrameError:
    try:
        raw = _any_decoder.decode(data)
    except msgspec.DecodeError:
        return FrameError("bad_frame", "frame is not valid JSON")
    if not isinstance(raw, dict):
        return FrameError("bad_frame", "frame must be a JSON object")
    ref = raw.get("ref")
    ref = ref if isinstance(ref, str) and len(ref) <= 64 else None
    kind = raw.get("type")
    if not isinstance(kind, str):
        return FrameError("bad_frame", "frame has no string field `type`", ref)
    if kind not in CLIENT_TYPES:
        return FrameError("bad_frame", f"unknown frame type {kind[:40]!r}", ref)
    return FrameError("invalid", str(exc), ref)


def splice_seq(encoded_event: bytes, seq: int) -> bytes:
    """What the append script does in Lua, for code that builds an event frame by hand."""
    return b'{"seq":%d,%s' % (seq, encoded_event[1:])


def seq_of(frame: bytes) -> int:
    """The seq of an event frame produced by the append script (`{"seq":N,...`)."""
    return int(frame[7 : frame.index(b",", 7)])
