"""Every frame of the Parley WebSocket protocol, version 1, as msgspec Structs.

Client frames form the tagged union `ClientFrame`, server frames `ServerFrame`; both are
tagged by the `type` field. Server frames omit fields left at their default, so optional
fields are absent rather than `null`.

Conversation events (`message`, `start`, `token`, `part_*`, `done`, `queued`, `updated`,
`approval_*`) are encoded
*without* their `seq`: the Redis append script assigns the seq and splices it in front of the
encoded bytes (`{"seq":N,...`), so every process forwards one encoding unchanged.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal, get_args

import msgspec
from msgspec import Meta, Struct

from protocol import text
from protocol.jsondepth import MAX_DEPTH, too_deep

PROTOCOL_VERSION: Final = 1
SUBPROTOCOL: Final = "parley.v1"
BEARER_PREFIX: Final = "bearer."

MAX_SEQ: Final = 2**53
"""Seqs and `after` stay within the integers a JavaScript number holds exactly."""
MAX_TOKEN_CHARS: Final = 8192
MAX_NAME_CHARS: Final = 200
MAX_SYSTEM_CHARS: Final = 32_000

Ref = Annotated[str, Meta(max_length=64)]
Seq = Annotated[int, Meta(ge=0, le=MAX_SEQ)]
Count = Annotated[int, Meta(ge=0, le=MAX_SEQ)]
JwtText = Annotated[str, Meta(min_length=1, max_length=MAX_TOKEN_CHARS)]
Title = Annotated[str, Meta(max_length=MAX_NAME_CHARS)]
ModelName = Annotated[str, Meta(max_length=MAX_NAME_CHARS)]
SystemPrompt = Annotated[str, Meta(max_length=MAX_SYSTEM_CHARS)]
ToolChoice = Annotated[
    list[Annotated[str, Meta(min_length=1, max_length=64)]],
    Meta(max_length=128, description="Names of configured tools; `[]`: none."),
]
Text = Annotated[
    str, Meta(description="At most `limits.max_text_chars` characters (sent in `ready`).")
]
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
    "refused",
    "quota_exceeded",
    "forbidden_model",
]
DoneReason = Literal["stop", "length", "content_filter", "tool_calls", "cancelled", "error"]
PartKind = Literal["text", "reasoning", "tool_call", "tool_result"]
"""What a part of an assistant message holds: the answer's text, the model's reasoning, a tool
call the model made (its text: the arguments, JSON, as the model wrote them) and a call's
result (its text: what the model read back)."""
ToolStatus = Literal["ok", "error", "timeout", "cancelled"]
"""How a tool call ended (a `tool_result` part's `status`)."""
ToolCallId = Annotated[str, Meta(max_length=256)]
ToolName = Annotated[str, Meta(max_length=256)]
Role = Literal["user", "assistant"]
MessageStatus = Literal["complete", "cancelled", "error"]
ApprovalState = Literal["approved", "denied", "expired", "cancelled"]
MAX_CALL_ID_CHARS: Final = 256
CallId = Annotated[str, Meta(min_length=1, max_length=MAX_CALL_ID_CHARS)]
"""A tool call's id as the model gave it (`call_...`)."""
Reason = Annotated[str, Meta(max_length=500)]


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> uuid.UUID:
    return uuid.uuid4()


# --------------------------------------------------------------------------- shapes


class Usage(Struct, frozen=True, omit_defaults=True, kw_only=True):
    """What one generation cost and how long it took.

    Token counts are the endpoint's when it reported them; otherwise Parley counted them with
    a tokenizer and `estimated` is true. `reasoning_tokens` (part of `completion_tokens`) and
    `cached_prompt_tokens` (part of `prompt_tokens`) come only from endpoints that report
    them. `first_token_ms` is the time from the request to the first piece of the reply
    (reasoning or text), `duration_ms` the whole generation."""

    prompt_tokens: Count
    completion_tokens: Count
    reasoning_tokens: Count | None = None
    cached_prompt_tokens: Count | None = None
    first_token_ms: float | None = None
    duration_ms: float | None = None
    estimated: bool = False


class ToolApproval(Struct, frozen=True, omit_defaults=True, kw_only=True):
    """(addition) How a person's approval of a tool call ended: `approved` or `denied` (by
    `by`, with `reason`), `expired` unanswered, or `cancelled` with its turn."""

    state: ApprovalState
    by: str | None = None
    reason: Reason | None = None


class Part(Struct, frozen=True, omit_defaults=True, kw_only=True):
    """One part of an assistant message; its index is its position in `parts`.

    `duration_ms` is how long a `reasoning` part lasted, from its first piece to the end of
    it, or how long a tool call ran (`tool_result`). `call_id` and `name` (the tool) belong to
    `tool_call` and `tool_result` parts, `status` to a `tool_result`, and (addition)
    `approval` to the `tool_result` of a call that waited for a person's answer."""

    kind: PartKind
    text: str = ""
    duration_ms: float | None = None
    call_id: ToolCallId | None = None
    name: ToolName | None = None
    status: ToolStatus | None = None
    approval: ToolApproval | None = None


class Conversation(Struct, frozen=True, omit_defaults=True):
    id: uuid.UUID
    title: str
    system: str
    model: str
    created_at: datetime
    updated_at: datetime
    last_seq: Seq = 0
    tools: list[str] | None = None
    """(addition) The tools the model is offered in this conversation, by name; absent: every
    configured tool."""


class Message(Struct, frozen=True, omit_defaults=True):
    id: uuid.UUID
    role: Role
    content: str
    status: MessageStatus
    created_at: datetime
    model: str | None = None
    usage: Usage | None = None
    parts: list[Part] | None = None
    """(addition) An assistant message's parts in order, when it has more than its text (a
    reasoning part, say); `content` is always the text of its `text` parts, joined."""
    reason: DoneReason | None = None
    """(addition) How an assistant message ended, when it was not `stop`."""


class Limits(Struct, frozen=True):
    max_frame_bytes: int
    max_text_chars: int
    max_joined: int
    frames_per_second: float
    turns_per_minute: int


class Budget(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A user's token budget now: `limit` 0 is unlimited (then `remaining` is absent);
    `used` counts finished turns and the worst case of running ones; `resets_at` is when
    spending next goes down (the window's end; for `rolling24h`, when the oldest hour with
    spending leaves the window)."""

    limit: int
    used: int
    resets_at: datetime
    window: str
    remaining: int | None = None


# --------------------------------------------------------------------------- client frames


class _Client(Struct, frozen=True, tag_field="type", forbid_unknown_fields=True):
    ref: Ref | None = None


class Auth(_Client, tag="auth", kw_only=True, frozen=True):
    """Authenticate with a JWT: the first frame when the token is not offered in
    `Sec-WebSocket-Protocol`, or later, with a fresh token for the same user, to extend the
    session.

    Answered with `ready` the first time, then with `ack {expires_at}`. An invalid token, or
    one for another user, closes the socket with 4401."""

    token: JwtText


class Create(_Client, tag="create", kw_only=True, frozen=True):
    """Create a conversation owned by the user; answered with `created`.

    Without `title` it is "New conversation", without `model` the default model.
    (addition) `tools` names the configured tools the model may call in it (`[]`: none);
    without it, every configured tool. An unknown name is `invalid`."""

    title: Title | None = None
    system: SystemPrompt | None = None
    model: ModelName | None = None
    tools: ToolChoice | None = None


class Update(_Client, tag="update", kw_only=True, frozen=True):
    """(addition) Change a conversation's title, system prompt, model or tools (the fields
    given; the others stay); answered with `ack`. Sockets that joined it get `updated`, every
    socket of the user `conversation_changed`. The same as the REST API's `PATCH`."""

    conversation: uuid.UUID
    title: Title | None = None
    system: SystemPrompt | None = None
    model: ModelName | None = None
    tools: ToolChoice | None = None


class Join(_Client, tag="join", kw_only=True, frozen=True):
    """Watch a conversation: answered with `joined`, then the events after it, then
    live events.

    With `after` (the last seq the client holds) only the events with `seq > after` follow;
    when those are no longer retained, `joined` has `reset: true` and the full history."""

    conversation: uuid.UUID
    after: Seq | None = None


class Leave(_Client, tag="leave", kw_only=True, frozen=True):
    """Stop watching a conversation; answered with `ack`."""

    conversation: uuid.UUID


class Say(_Client, tag="say", kw_only=True, frozen=True):
    """A user turn; answered with `ack {message_id}`.

    The `message` event and the reply's events follow to every socket that joined the
    conversation. A turn whose `id` the conversation already has is not taken twice: the
    answer is `ack {message_id: id, duplicate: true}`. While a reply is being generated the
    answer is `busy`; over the turn rate, `rate_limited`."""

    conversation: uuid.UUID
    text: Text
    id: uuid.UUID | None = None


class Cancel(_Client, tag="cancel", kw_only=True, frozen=True):
    """Stop the conversation's running generation; answered with `ack`.

    The generation ends with `done` reason `cancelled`."""

    conversation: uuid.UUID


class Regenerate(_Client, tag="regenerate", kw_only=True, frozen=True):
    """Generate the conversation's last assistant message again; answered with
    `ack {message_id}`.

    The new message's `start` names the one it replaces in `replaces`."""

    conversation: uuid.UUID


class Approve(_Client, tag="approve", kw_only=True, frozen=True):
    """(addition) Let the tool call `call_id`, waiting for the user's approval, run;
    answered with `ack {approval}`.

    The first answer wins, from whichever tab: the reply's `approval.first` says whether
    this one settled the call, and `approval.state` how it stands (an answer after the
    expiry finds it `expired`). Every tab sees the outcome as `approval_resolved`. Only the
    conversation's owner may answer: to anyone else, like a call that waits for no answer,
    it is `not_found` (another user's conversation looks like one that does not exist)."""

    conversation: uuid.UUID
    call_id: CallId
    reason: Reason | None = None


class Deny(_Client, tag="deny", kw_only=True, frozen=True):
    """(addition) Refuse the tool call `call_id`; answered like `approve`. The model gets
    the refusal (with `reason`, when given) as the tool's result."""

    conversation: uuid.UUID
    call_id: CallId
    reason: Reason | None = None


class Ping(_Client, tag="ping", kw_only=True, frozen=True):
    """An application-level ping for clients that cannot send WebSocket pings
    (browsers); answered with `pong`."""


ClientFrame = (
    Auth | Create | Join | Leave | Say | Cancel | Regenerate | Ping | Update | Approve | Deny
)
CLIENT_FRAMES: Final[tuple[type[_Client], ...]] = get_args(ClientFrame)
"""The client frames in protocol order: the one list is the union above."""
CLIENT_TYPES: Final = frozenset(t.__struct_config__.tag for t in CLIENT_FRAMES)


# --------------------------------------------------------------------------- server replies


class _Server(Struct, frozen=True, tag_field="type", omit_defaults=True):
    pass


class Ready(_Server, tag="ready", kw_only=True, frozen=True):
    """Sent once, when the socket's first valid token is accepted: the session is open.

    `user` is the token's subject, `limits` the limits in force, `model` the default model,
    `simulated` says the simulated model is in use, `expires_at` is the token's expiry in
    Unix seconds. `ref` is the `auth` frame's, when the token came in one."""

    user: str
    session: str
    limits: Limits
    protocol: int = PROTOCOL_VERSION
    model: str = ""
    simulated: bool = False
    expires_at: int | None = None
    ref: str | None = None
    budget: Budget | None = None
    """(addition) The user's token budget when budgets are configured (`[budgets]`)."""


class Created(_Server, tag="created", kw_only=True, frozen=True):
    """The answer to `create`: the new conversation's id and meta.

    Every socket of the user also gets `conversation_changed`."""

    conversation: uuid.UUID
    meta: Conversation
    ref: str | None = None


class Joined(_Server, tag="joined", kw_only=True, frozen=True):
    """The answer to `join`, before the events that follow it.

    `last_seq` is the seq the client is now at: the next event it gets is `last_seq + 1`."""

    conversation: uuid.UUID
    meta: Conversation
    last_seq: Seq
    history: list[Message] | None = None
    reset: bool = False
    ref: str | None = None


class Answer(Struct, frozen=True, omit_defaults=True, kw_only=True):
    """How a tool call's approval stands after an `approve` or `deny`: `first` when this
    answer settled it, false when it had been settled before (by another tab, or by the
    expiry: `state` says which); `by` is who answered, `reason` the denial's reason."""

    call_id: str
    state: ApprovalState
    first: bool
    by: str | None = None
    reason: str | None = None


class Ack(_Server, tag="ack", kw_only=True, frozen=True):
    """The answer to `leave`, `cancel`, `say` (with `message_id` and `duplicate`),
    `regenerate` (with `message_id`), a repeated `auth` (with `expires_at`) and
    (addition) `approve` / `deny` (with `approval`)."""

    message_id: uuid.UUID | None = None
    duplicate: bool = False
    expires_at: int | None = None
    ref: str | None = None
    approval: Answer | None = None


class Pong(_Server, tag="pong", kw_only=True, frozen=True):
    """The answer to `ping`."""

    ref: str | None = None


class Refresh(_Server, tag="refresh", kw_only=True, frozen=True):
    """(addition) The token in force expires at `expires_at` (Unix seconds): send a fresh
    one in an `auth` frame. Sent once per token, `auth.refresh_hint` seconds before its
    expiry; the socket is closed with 4401 `auth.refresh_grace` seconds after it unless a
    fresh token came. A hint only: a client that ignores it is closed as before."""

    expires_at: int


class Error(_Server, tag="error", kw_only=True, frozen=True):
    """A frame that could not be used or a request that could not be carried out; the
    socket stays open.

    `ref` is the request's, when it had one; `retry_after` (seconds) comes with
    `rate_limited`. A turn the host application's turn hook refused (`code: "refused"`) is a
    conversation event instead, to every socket that joined: it carries `conversation`,
    `seq` and `message_id` (the reply the turn would have had)."""

    code: ErrorCode
    message: str
    retry_after: float | None = None
    ref: str | None = None
    conversation: uuid.UUID | None = None
    message_id: uuid.UUID | None = None
    seq: Seq = 0
    resets_at: datetime | None = None
    """(addition) With `quota_exceeded`: when the user's token budget resets."""
    remaining: int | None = None
    """(addition) With `quota_exceeded`: the tokens left in the budget (0)."""


# --------------------------------------------------------------------------- conversation events


class MessageEvent(_Server, tag="message", kw_only=True, frozen=True):
    """Conversation event, to every socket that joined: a user turn was accepted."""

    conversation: uuid.UUID
    message: Message
    seq: Seq = 0


class Start(_Server, tag="start", kw_only=True, frozen=True):
    """Conversation event, to every socket that joined: an assistant message begins,
    generated by `model`.

    `replaces` names the assistant message a `regenerate` replaces. A `start` for a
    message id the client already holds restarts that message: discard its text.
    `accepted_at` (Unix seconds) is when the turn was accepted: web processes measure the
    time to first token from it."""

    conversation: uuid.UUID
    message_id: uuid.UUID
    model: str
    replaces: uuid.UUID | None = None
    accepted_at: float | None = None
    seq: Seq = 0


class Token(_Server, tag="token", kw_only=True, frozen=True):
    """Conversation event, to every socket that joined: the next piece of an assistant
    message's text.

    `first_seq`, when present, says this frame stands for the events `first_seq..seq`:
    consecutive pieces of one message merged for a socket that lags behind."""

    conversation: uuid.UUID
    message_id: uuid.UUID
    text: str
    first_seq: Seq = 0
    seq: Seq = 0


class PartStart(_Server, tag="part_start", kw_only=True, frozen=True):
    """(addition) Conversation event: part `index` of an assistant message begins, holding
    `kind`. A `text` part needs no `part_start`: a `token` when the message has no open
    text part opens one at the next index. Added after version 1: a client that does not
    know it ignores it (and still sees the answer's text in `token` events). A `tool_call`
    or `tool_result` part names its call (`call_id`) and tool (`name`)."""

    conversation: uuid.UUID
    message_id: uuid.UUID
    index: Count
    kind: PartKind
    call_id: ToolCallId | None = None
    name: ToolName | None = None
    seq: Seq = 0


class PartDelta(_Server, tag="part_delta", kw_only=True, frozen=True):
    """(addition) Conversation event: the next piece of part `index` of an assistant message
    (a part other than `text`, whose pieces are `token` events).

    `first_seq`, when present, says this frame stands for the events `first_seq..seq`:
    consecutive pieces of one part merged for a socket that lags behind, as for `token`."""

    conversation: uuid.UUID
    message_id: uuid.UUID
    index: Count
    text: str
    first_seq: Seq = 0
    seq: Seq = 0


class PartEnd(_Server, tag="part_end", kw_only=True, frozen=True):
    """(addition) Conversation event: part `index` of an assistant message is complete;
    `duration_ms` is how long a `reasoning` part took (a `tool_result`: how long the call
    ran), `status` how a `tool_result` ended and (addition) `approval` how a person's
    approval of its call ended. A part left open ends with the message's `done`."""

    conversation: uuid.UUID
    message_id: uuid.UUID
    index: Count
    duration_ms: float | None = None
    status: ToolStatus | None = None
    approval: ToolApproval | None = None
    seq: Seq = 0


class Done(_Server, tag="done", kw_only=True, frozen=True):
    """Conversation event, to every socket that joined: an assistant message ended.

    `reason` is `stop`, `length`, `cancelled` or `error` (then with a readable `error`), and
    (additions) `content_filter` or `tool_calls` when the model ended so; `usage` is the
    token count and timing (counted by Parley, `estimated`, when the model reported none)."""

    conversation: uuid.UUID
    message_id: uuid.UUID
    reason: DoneReason
    usage: Usage | None = None
    error: str | None = None
    seq: Seq = 0


class Queued(_Server, tag="queued", kw_only=True, frozen=True):
    """Conversation event: the assistant message waits for a worker, at `position`.

    Sent when a turn enters the fair queue (every worker slot, or the user's share of them,
    busy) and whenever its position changes, at most once a second except that position 0
    (the next turn to start) is sent at once; `start` follows when it runs."""

    conversation: uuid.UUID
    message_id: uuid.UUID
    position: Count
    seq: Seq = 0


class Updated(_Server, tag="updated", kw_only=True, frozen=True):
    """Conversation event, to every socket that joined: the conversation's title,
    system prompt or model changed; `meta` is the new meta."""

    conversation: uuid.UUID
    meta: Conversation
    seq: Seq = 0


class ApprovalRequest(_Server, tag="approval_request", kw_only=True, frozen=True):
    """(addition) Conversation event: the tool call `call_id` of assistant message
    `message_id` waits for the user's `approve` or `deny` (until `expires_at`, Unix seconds
    of Redis's clock; then it counts as denied). `arguments` is the call's JSON text as the
    model wrote it. The turn is suspended meanwhile; `approval_resolved` ends the wait."""

    conversation: uuid.UUID
    message_id: uuid.UUID
    call_id: str
    tool: str
    arguments: str
    expires_at: float = 0.0
    seq: Seq = 0


class ApprovalResolved(_Server, tag="approval_resolved", kw_only=True, frozen=True):
    """(addition) Conversation event: the tool call `call_id` was `approved` or `denied`
    (by `by`, with `reason`), `expired` unanswered, or `cancelled` with its turn; sent once,
    whichever tab answered."""

    conversation: uuid.UUID
    call_id: str
    state: ApprovalState
    by: str | None = None
    reason: str | None = None
    seq: Seq = 0


class ConversationChanged(_Server, tag="conversation_changed", kw_only=True, frozen=True):
    """User event, to every socket of the user: a conversation was created or
    changed (`meta`) or deleted (`deleted: true`). It carries no `seq`."""

    conversation: uuid.UUID
    meta: Conversation | None = None
    deleted: bool = False


class Notice(_Server, tag="notice", kw_only=True, frozen=True):
    """A system notice from the application's backend (the server API), not a message of
    the transcript: a conversation event with `seq` when it names a `conversation` (kept in
    the event log, so a rejoin with `after` gets it; not stored in PostgreSQL), else a user
    event to every socket of the user, without `seq`. Added after version 1: a client that
    does not know it ignores it."""

    text: str
    at: datetime
    conversation: uuid.UUID | None = None
    seq: Seq = 0


class UsageWarning(_Server, tag="usage_warning", kw_only=True, frozen=True):
    """(addition) User event, to every socket of the user, once per budget window: the
    user's spending reached `budgets.warn_at` of `limit` tokens. It carries no `seq`."""

    used: int
    limit: int
    resets_at: datetime


ConversationEvent = (
    MessageEvent
    | Start
    | Token
    | PartStart
    | PartDelta
    | PartEnd
    | Done
    | Queued
    | Updated
    | Notice
    | ApprovalRequest
    | ApprovalResolved
)
ServerFrame = (
    Ready
    | Created
    | Joined
    | Ack
    | Pong
    | Error
    | Refresh
    | ConversationEvent
    | ConversationChanged
    | UsageWarning
)
SERVER_FRAMES: Final[tuple[type[_Server], ...]] = get_args(ServerFrame)
"""The server frames in protocol order, conversation events flattened in."""


# --------------------------------------------------------------------------- codecs

_encoder: Final = msgspec.json.Encoder()
_client_decoder: Final = msgspec.json.Decoder(ClientFrame)
_server_decoder: Final = msgspec.json.Decoder(ServerFrame)
_any_decoder: Final = msgspec.json.Decoder()


def encode(obj: Any) -> bytes:
    return _encoder.encode(obj)


def decode_server(data: bytes | str) -> ServerFrame:
    """Decode one server frame; raises msgspec.DecodeError for anything else."""
    try:
        frame: ServerFrame = _server_decoder.decode(data)
    except (UnicodeError, RecursionError) as exc:
        raise msgspec.DecodeError(f"not a server frame: {exc}") from None
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

    The fast path is a single typed decode, which stops at the first field that does not
    fit (no client frame has a field that nests). Only a failing frame is decoded a second
    time, untyped, to tell a malformed frame (`bad_frame`) from a wrong field (`invalid`) and
    to recover its `ref`; that decode follows every nesting, so its depth is measured first.
    """
    try:
        frame: ClientFrame = _client_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise _explain(data, exc) from None
    except UnicodeError:  # not UTF-8, or a str holding a lone surrogate
        raise FrameError("bad_frame", "a text frame must be UTF-8 JSON") from None
    except RecursionError:
        raise _too_deep() from None
    return frame


def _too_deep() -> FrameError:
    return FrameError("bad_frame", f"frame nests more than {MAX_DEPTH} levels deep")


def _explain(data: bytes | str, exc: msgspec.DecodeError) -> FrameError:
    if too_deep(data):
        return _too_deep()
    try:
        raw = _any_decoder.decode(data)
    except (msgspec.DecodeError, UnicodeError, RecursionError):
        if (unstorable := text.surrogate_field(data)) is not None:
            return FrameError("invalid", text.describe(*unstorable))
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
