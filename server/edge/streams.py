"""The HTTP routes for clients without a WebSocket: SSE streams of a conversation's events and
of the user's (`server.edge.sse`), the stream tickets `EventSource` opens them with, the
WebSocket's commands over REST (say, cancel, regenerate), and a backend for the Vercel AI
SDK's `useChat` (its UI message stream protocol, v1). Errors are classified as everywhere
(`server.edge.failures`) and answered as HTTP status and JSON body."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Final, Literal

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.connection import ASGIConnection
from litestar.exceptions import HTTPException, NotAuthorizedException, ValidationException
from litestar.handlers import BaseRouteHandler
from litestar.params import Parameter
from litestar.response import Stream
from litestar.status_codes import (
    HTTP_200_OK,
    HTTP_201_CREATED,
    HTTP_202_ACCEPTED,
    HTTP_204_NO_CONTENT,
)

from protocol import frames as f
from protocol import sse, wsframe
from server.edge.failures import Refused
from server.edge.rest import (
    answers,
    group_of,
    refuse_unstorable,
    runtime_of,
    shallow_body,
    signed_in,
    user_of,
)
from server.edge.sse import Body, Opening
from server.redis.tickets import Tickets

SSE_HEADERS: Final = {"cache-control": "no-cache", "x-accel-buffering": "no"}
UI_NAMESPACE: Final = uuid.UUID("6f0b1a52-5e0c-4c2b-9a55-7a1d9c2f4e10")
"""Message ids of the AI SDK (not UUIDs) map to Parley ids in this namespace (uuid5), so that
a retried request says the same turn."""


class StreamTicket(msgspec.Struct, frozen=True):
    ticket: str
    expires_at: float


class NewMessage(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    text: f.Text
    id: uuid.UUID | None = None


class Decision(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A person's answer to a tool call waiting for approval (the `approve` / `deny` frames)."""

    decision: Literal["approve", "deny"]
    reason: f.Reason | None = None


class Accepted(msgspec.Struct, frozen=True, omit_defaults=True):
    message_id: uuid.UUID
    duplicate: bool = False


class UiPart(msgspec.Struct, frozen=True):
    type: Annotated[str, msgspec.Meta(max_length=64)]
    text: str | None = None


class UiMessage(msgspec.Struct, frozen=True):
    id: Annotated[str, msgspec.Meta(max_length=128)]
    role: Annotated[str, msgspec.Meta(max_length=16)]
    parts: list[UiPart] = []


class ChatRequest(msgspec.Struct, frozen=True):
    """The body `DefaultChatTransport` posts: the chat id (a Parley conversation id), the
    chat's messages (only the last, the new user message, is read: Parley holds the rest)
    and what triggered the request."""

    id: uuid.UUID
    messages: list[UiMessage] = []
    trigger: str = "submit-message"
    messageId: str | None = None


def _tickets(request: ASGIConnection[Any, Any, Any, Any]) -> Tickets:
    runtime = runtime_of(request)
    return Tickets(runtime.redis, runtime.settings.server.stream_ticket_ttl)


async def bearer_or_ticket(
    connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
) -> None:
    """Guard for SSE streams: a bearer token, or a ticket in `?ticket=` (used up here)."""
    ticket = connection.query_params.get("ticket")
    if ticket is None:
        await signed_in(connection, handler)
        return
    with answers("redeeming a stream ticket"):
        user = await _tickets(connection).redeem(ticket)
    if user is None:
        raise NotAuthorizedException("the stream ticket is unknown, used or expired")
    connection.state.user = user


def _event_stream(body: Body, *extra: tuple[str, str]) -> Stream:
    return Stream(body, media_type="text/event-stream", headers={**SSE_HEADERS, **dict(extra)})


def _opening(request: Request[Any, Any, Any]) -> Opening:
    hub = runtime_of(request).hub
    assert hub is not None
    return Opening(hub)


def _after(request: Request[Any, Any, Any], after: int | None) -> int | None:
    return sse.last_event_id(request.headers.get("last-event-id"), after)


Seq = Annotated[int | None, Parameter(ge=0, le=f.MAX_SEQ, required=False)]


@post("/api/stream-tickets", status_code=HTTP_201_CREATED, guards=[signed_in])
async def issue_ticket(request: Request[Any, Any, Any]) -> StreamTicket:
    with answers("POST /api/stream-tickets"):
        ticket, expires_at = await _tickets(request).issue(user_of(request))
    return StreamTicket(ticket=ticket, expires_at=round(expires_at, 3))


@get("/api/events", guards=[bearer_or_ticket])
async def user_events(request: Request[Any, Any, Any]) -> Stream:
    with answers("GET /api/events"):
        body = await _opening(request).user_events(user_of(request))
    return _event_stream(body)


class ConversationStreams(Controller):
    path = "/api/conversations/{conversation:uuid}"

    @get("/events", guards=[bearer_or_ticket])
    async def events(
        self, request: Request[Any, Any, Any], conversation: uuid.UUID, after: Seq = None
    ) -> Stream:
        with answers("GET /api/conversations/{id}/events"):
            body = await _opening(request).conversation(
                user_of(request), conversation, _after(request, after)
            )
        return _event_stream(body)

    @post("/messages", status_code=HTTP_202_ACCEPTED, guards=[signed_in, shallow_body])
    async def say(
        self, request: Request[Any, Any, Any], conversation: uuid.UUID, data: NewMessage
    ) -> Accepted:
        _sayable(request, data.text)
        refuse_unstorable(data)
        with answers("POST /api/conversations/{id}/messages"):
            message_id, duplicate = await runtime_of(request).conversations.say(
                user_of(request), conversation, data.text, data.id, group=group_of(request)
            )
        return Accepted(message_id=message_id, duplicate=duplicate)

    @post("/cancel", status_code=HTTP_202_ACCEPTED, guards=[signed_in])
    async def cancel(self, request: Request[Any, Any, Any], conversation: uuid.UUID) -> None:
        with answers("POST /api/conversations/{id}/cancel"):
            await runtime_of(request).conversations.cancel(user_of(request), conversation)

    @post("/regenerate", status_code=HTTP_202_ACCEPTED, guards=[signed_in])
    async def regenerate(
        self, request: Request[Any, Any, Any], conversation: uuid.UUID
    ) -> Accepted:
        with answers("POST /api/conversations/{id}/regenerate"):
            message_id = await runtime_of(request).conversations.regenerate(
                user_of(request), conversation, group=group_of(request)
            )
        return Accepted(message_id=message_id)

    @post("/approvals/{call_id:str}", status_code=HTTP_200_OK, guards=[signed_in, shallow_body])
    async def answer(
        self, request: Request[Any, Any, Any], conversation: uuid.UUID, call_id: str, data: Decision
    ) -> f.Answer:
        """`approve` / `deny` over HTTP: 200 with how the call stands (`first`: this answer
        settled it), 403 for someone other than the owner, 404 for a call that waits for
        nothing."""
        if not 0 < len(call_id) <= f.MAX_CALL_ID_CHARS:
            raise HTTPException(status_code=400, detail="`call_id` must be 1 to 256 characters")
        refuse_unstorable(data)
        with answers("POST /api/conversations/{id}/approvals/{call_id}"):
            return await runtime_of(request).conversations.answer(
                user_of(request), conversation, call_id, data.decision, data.reason
            )


def _sayable(request: Request[Any, Any, Any], text: str) -> None:
    """The checks `say` gets on a socket (`protocol.session`): not empty, not too long."""
    limit = runtime_of(request).settings.limits.max_text_chars
    if len(text) > limit:
        raise HTTPException(
            status_code=413, detail=f"text is {len(text)} characters; the limit is {limit}"
        )
    if not text.strip():
        raise ValidationException("`text` is empty")


# --------------------------------------------------------------------------- AI SDK


def _ui_message_id(ui_id: str, conversation: uuid.UUID) -> uuid.UUID:
    try:
        return uuid.UUID(ui_id)
    except ValueError:
        return uuid.uuid5(UI_NAMESPACE, f"{conversation}:{ui_id}")


def _user_text(data: ChatRequest) -> tuple[str, str]:
    """The new user message's id and text: the last message, a user's, with text parts."""
    if not data.messages or data.messages[-1].role != "user":
        raise ValidationException("the last message must be the user's new message")
    last = data.messages[-1]
    text = "".join(part.text or "" for part in last.parts if part.type == "text")
    return last.id, text


async def _running_reply(request: Request[Any, Any, Any], conversation: uuid.UUID) -> int | None:
    """The seq just before the `start` of the conversation's running reply, from its log;
    None when no reply runs (or its start is no longer in the log)."""
    _, logged = await runtime_of(request).conversations.read_events(conversation, -1)
    start: int | None = None
    for seq, payload in logged:
        kind = msgspec.json.decode(payload, type=_Kind).type
        if kind == "start":
            start = seq
        elif kind == "done":
            start = None
    return None if start is None else start - 1


class _Kind(msgspec.Struct):
    type: str


def _ui_stream(body: Body) -> Stream:
    return _event_stream(body, sse.UI_STREAM_HEADER)


class AiChat(Controller):
    """`useChat` with `DefaultChatTransport({api: "/api/ai/chat"})`; see docs/sse.md."""

    path = "/api/ai/chat"
    guards = [signed_in]  # noqa: RUF012 (litestar's Controller declares it)

    @post("/", guards=[shallow_body])
    async def chat(self, request: Request[Any, Any, Any], data: ChatRequest) -> Stream:
        runtime = runtime_of(request)
        user = user_of(request)
        conversation = data.id
        with answers("POST /api/ai/chat"):
            await runtime.conversations.owned(user, conversation)
            if data.trigger == "regenerate-message":
                head = await _head(request, conversation)
                body = await _follow(request, user, conversation, head)
                async with _given_back_if_refused(body):
                    await runtime.conversations.regenerate(
                        user, conversation, group=group_of(request)
                    )
                return _ui_stream(body)
            if data.trigger != "submit-message":
                raise Refused("invalid", f"unknown trigger {data.trigger!r}")
            ui_id, text = _user_text(data)
            _sayable(request, text)
            refuse_unstorable(NewMessage(text=text))
            head = await _head(request, conversation)
            body = await _follow(request, user, conversation, head)
            async with _given_back_if_refused(body):
                _, duplicate = await runtime.conversations.say(
                    user,
                    conversation,
                    text,
                    _ui_message_id(ui_id, conversation),
                    group=group_of(request),
                )
                if duplicate:
                    raise Refused("busy", "this message was already sent; resume its reply")
        return _ui_stream(body)

    @get("/{conversation:uuid}/stream")
    async def resume(
        self, request: Request[Any, Any, Any], conversation: uuid.UUID
    ) -> Response[Any]:
        user = user_of(request)
        with answers("GET /api/ai/chat/{id}/stream"):
            await runtime_of(request).conversations.owned(user, conversation)
            after = await _running_reply(request, conversation)
            if after is None:
                return Response(None, status_code=HTTP_204_NO_CONTENT)
            body = await _follow(request, user, conversation, after)
        return _ui_stream(body)

    @post("/{conversation:uuid}/stop", status_code=HTTP_204_NO_CONTENT)
    async def stop(self, request: Request[Any, Any, Any], conversation: uuid.UUID) -> None:
        with answers("POST /api/ai/chat/{id}/stop"):
            await runtime_of(request).conversations.cancel(user_of(request), conversation)


@contextlib.asynccontextmanager
async def _given_back_if_refused(body: Body) -> AsyncIterator[None]:
    """The stream is opened before the turn starts (so it misses none of the reply's events):
    when the turn is refused, close it at once, giving back its subscription and the user's
    place in the per-user count (left to the garbage collector they add up to a 429)."""
    try:
        yield
    except BaseException:
        await body.aclose()
        raise


async def _head(request: Request[Any, Any, Any], conversation: uuid.UUID) -> int:
    head, _ = await runtime_of(request).conversations.read_events(conversation, f.MAX_SEQ)
    return head


async def _follow(
    request: Request[Any, Any, Any], user: str, conversation: uuid.UUID, after: int
) -> Body:
    """The UI message stream of the first reply that starts after `after`, until its end."""
    reply = sse.UiReply()

    def render(frame: bytes) -> list[bytes]:
        return reply.feed(wsframe.payload_of(frame))

    return await _opening(request).conversation(
        user, conversation, after, render, done=lambda: reply.ended
    )


ROUTES = [issue_ticket, user_events, ConversationStreams, AiChat]
