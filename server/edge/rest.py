"""The HTTP API: conversations over REST (same JWT, as `Authorization: Bearer`), health,
readiness, and the development sign-in used by the browser UI."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, delete, get, patch, post
from litestar.connection import ASGIConnection
from litestar.exceptions import (
    HTTPException,
    NotAuthorizedException,
    NotFoundException,
    ValidationException,
)
from litestar.handlers import BaseRouteHandler
from litestar.status_codes import HTTP_201_CREATED, HTTP_204_NO_CONTENT

from protocol import frames as f
from protocol import text
from protocol.asyncapi import render
from protocol.jsondepth import MAX_DEPTH, too_deep
from server.app.runtime import Runtime
from server.edge.auth import AuthError
from server.edge.failures import HTTP_STATUS, Refused, refusal

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[\w.@-]+$")]


class ConversationDetail(msgspec.Struct, frozen=True):
    meta: f.Conversation
    messages: list[f.Message]


class NewConversation(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    title: f.Title | None = None
    system: f.SystemPrompt | None = None
    model: f.ModelName | None = None
    tools: f.ToolChoice | None = None


class ConversationChange(NewConversation, frozen=True):
    pass


class DevLogin(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    user: Name
    ttl: Annotated[int, msgspec.Meta(ge=60, le=86_400)] = 3600


class IssuedToken(msgspec.Struct, frozen=True):
    token: str
    user: str
    expires_in: int


class ServerInfo(msgspec.Struct, frozen=True):
    simulated: bool
    model: str
    dev_login: bool
    protocol: int
    limits: f.Limits


def runtime_of(request: ASGIConnection[Any, Any, Any, Any]) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def signed_in(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Guard: a valid bearer token (the user goes into `connection.state.user`), checked
    before anything reads the request's body."""
    header = connection.headers.get("authorization", "")
    scheme, _space, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise NotAuthorizedException("missing bearer token")
    try:
        principal = await runtime_of(connection).verifier.verify(token.strip())
    except AuthError as exc:
        raise NotAuthorizedException(str(exc)) from None
    connection.state.user = principal.user
    connection.state.group = principal.group


async def shallow_body(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Guard: a JSON body nests at most MAX_DEPTH levels, measured before litestar decodes it
    (a decoder recurses per level: thousands would end in RecursionError, a 500)."""
    if isinstance(connection, Request) and too_deep(await connection.body()):
        raise HTTPException(
            status_code=400, detail=f"the JSON body nests more than {MAX_DEPTH} levels deep"
        )


def user_of(request: Request[Any, Any, Any]) -> str:
    user: str = request.state.user
    return user


def group_of(request: Request[Any, Any, Any]) -> str:
    """The signed-in user's budget group (`budgets.group_claim`)."""
    group: str = request.state.get("group", "")
    return group


@contextlib.contextmanager
def answers(doing: str) -> Iterator[None]:
    """Turn whatever a request ended in into the HTTP error the classification says."""
    try:
        yield
    except HTTPException:
        raise
    except Exception as exc:
        raise _http(refusal(exc, doing)) from None


def refuse_unstorable(data: msgspec.Struct) -> None:
    """Refuse (400, naming the field) a body holding text PostgreSQL cannot store."""
    unstorable = text.unstorable_field(data)
    if unstorable is not None:
        raise ValidationException(text.describe(*unstorable))


def _http(exc: Refused) -> HTTPException:
    if exc.code == "not_found":
        return NotFoundException(exc.message)
    return HTTPException(status_code=HTTP_STATUS.get(exc.code, 500), detail=exc.message)


class ConversationsController(Controller):
    path = "/api/conversations"
    guards = [signed_in, shallow_body]  # noqa: RUF012 (litestar's Controller declares it)

    @get("/")
    async def list_conversations(self, request: Request[Any, Any, Any]) -> list[f.Conversation]:
        with answers("GET /api/conversations"):
            return await runtime_of(request).conversations.list(user_of(request))

    @post("/", status_code=HTTP_201_CREATED)
    async def create_conversation(
        self, request: Request[Any, Any, Any], data: NewConversation
    ) -> f.Conversation:
        refuse_unstorable(data)
        with answers("POST /api/conversations"):
            return await runtime_of(request).conversations.create(
                user_of(request),
                data.title,
                data.system,
                data.model,
                group_of(request),
                data.tools,
            )

    @get("/{conversation:uuid}")
    async def get_conversation(
        self, request: Request[Any, Any, Any], conversation: uuid.UUID
    ) -> ConversationDetail:
        conversations = runtime_of(request).conversations
        with answers("GET /api/conversations/{id}"):
            meta = await conversations.owned(user_of(request), conversation)
            _, messages = await conversations.history(conversation)
        return ConversationDetail(meta=meta, messages=messages)

    @patch("/{conversation:uuid}")
    async def change_conversation(
        self, request: Request[Any, Any, Any], conversation: uuid.UUID, data: ConversationChange
    ) -> f.Conversation:
        refuse_unstorable(data)
        with answers("PATCH /api/conversations/{id}"):
            return await runtime_of(request).conversations.update(
                user_of(request),
                conversation,
                title=data.title,
                system=data.system,
                model=data.model,
                group=group_of(request),
                tools=data.tools,
            )

    @delete("/{conversation:uuid}", status_code=HTTP_204_NO_CONTENT)
    async def delete_conversation(
        self, request: Request[Any, Any, Any], conversation: uuid.UUID
    ) -> None:
        with answers("DELETE /api/conversations/{id}"):
            await runtime_of(request).conversations.delete(user_of(request), conversation)


@get("/healthz")
async def healthz() -> dict[str, bool]:
    return {"ok": True}


@get("/readyz")
async def readyz(request: Request[Any, Any, Any]) -> Response[dict[str, bool]]:
    checks = await runtime_of(request).ready()
    ready = checks["redis"] and checks["database"] and not checks["draining"]
    return Response({"ready": ready, **checks}, status_code=200 if ready else 503)


@get("/api/info")
async def info(request: Request[Any, Any, Any]) -> ServerInfo:
    settings = runtime_of(request).settings
    return ServerInfo(
        simulated=settings.simulated,
        model=settings.llm.model,
        dev_login=dev_login_enabled(settings),
        protocol=f.PROTOCOL_VERSION,
        limits=settings.limits.wire(),
    )


@post("/api/dev/token", status_code=HTTP_201_CREATED, guards=[shallow_body])
async def dev_token(request: Request[Any, Any, Any], data: DevLogin) -> IssuedToken:
    runtime = runtime_of(request)
    if not dev_login_enabled(runtime.settings):
        raise NotFoundException("development sign-in is off")
    token = runtime.verifier.mint(data.user, data.ttl)
    return IssuedToken(token=token, user=data.user, expires_in=data.ttl)


def dev_login_enabled(settings: Any) -> bool:
    configured: bool | None = settings.auth.dev_login
    return settings.embedded if configured is None else configured


@get("/asyncapi.json", media_type="application/json")
async def asyncapi() -> bytes:
    return render().encode()


ROUTES = [ConversationsController, healthz, readyz, info, dev_token, asyncapi]
