"""The HTTP API: conversations over REST (same JWT, as `Authorization: Bearer`), health,
readiness, and the development sign-in used by the browser UI."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, delete, get, patch, post
from litestar.exceptions import HTTPException, NotAuthorizedException, NotFoundException
from litestar.status_codes import HTTP_201_CREATED, HTTP_204_NO_CONTENT

from protocol import frames as f
from protocol.asyncapi import render
from server.app.runtime import Runtime
from server.edge.auth import AuthError
from server.edge.conversations import Refused

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[\w.@-]+$")]


class ConversationDetail(msgspec.Struct, frozen=True):
    meta: f.Conversation
    messages: list[f.Message]


class NewConversation(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    title: Annotated[str, msgspec.Meta(max_length=200)] | None = None
    system: str | None = None
    model: Annotated[str, msgspec.Meta(max_length=200)] | None = None


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


def _runtime(request: Request[Any, Any, Any]) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def _user(request: Request[Any, Any, Any]) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise NotAuthorizedException("missing bearer token")
    try:
        return (await _runtime(request).verifier.verify(token.strip())).user
    except AuthError as exc:
        raise NotAuthorizedException(str(exc)) from None


def _http(exc: Refused) -> HTTPException:
    if exc.code == "not_found":
        return NotFoundException(exc.message)
    status = {"busy": 409, "rate_limited": 429, "unavailable": 503, "invalid": 400}.get(
        exc.code, 500
    )
    return HTTPException(status_code=status, detail=exc.message)


class ConversationsController(Controller):
    path = "/api/conversations"

    @get("/")
    async def list_conversations(self, request: Request[Any, Any, Any]) -> list[f.Conversation]:
        return await _runtime(request).chat.list(await _user(request))

    @post("/", status_code=HTTP_201_CREATED)
    async def create_conversation(
        self, request: Request[Any, Any, Any], data: NewConversation
    ) -> f.Conversation:
        try:
            return await _runtime(request).chat.create(
                await _user(request), data.title, data.system, data.model
            )
        except Refused as exc:
            raise _http(exc) from None

    @get("/{conversation:uuid}")
    async def get_conversation(
        self, request: Request[Any, Any, Any], conversation: uuid.UUID
    ) -> ConversationDetail:
        chat = _runtime(request).chat
        try:
            meta = await chat.owned(await _user(request), conversation)
            _, messages = await chat.history(conversation)
        except Refused as exc:
            raise _http(exc) from None
        return ConversationDetail(meta=meta, messages=messages)

    @patch("/{conversation:uuid}")
    async def change_conversation(
        self, request: Request[Any, Any, Any], conversation: uuid.UUID, data: ConversationChange
    ) -> f.Conversation:
        try:
            return await _runtime(request).chat.update(
                await _user(request),
                conversation,
                title=data.title,
                system=data.system,
                model=data.model,
            )
        except Refused as exc:
            raise _http(exc) from None

    @delete("/{conversation:uuid}", status_code=HTTP_204_NO_CONTENT)
    async def delete_conversation(
        self, request: Request[Any, Any, Any], conversation: uuid.UUID
    ) -> None:
        try:
            await _runtime(request).chat.delete(await _user(request), conversation)
        except Refused as exc:
            raise _http(exc) from None


@get("/healthz")
async def healthz() -> dict[str, bool]:
    return {"ok": True}


@get("/readyz")
async def readyz(request: Request[Any, Any, Any]) -> Response[dict[str, bool]]:
    checks = await _runtime(request).ready()
    ready = checks["redis"] and checks["database"] and not checks["draining"]
    return Response({"ready": ready, **checks}, status_code=200 if ready else 503)


@get("/api/info")
async def info(request: Request[Any, Any, Any]) -> ServerInfo:
    settings = _runtime(request).settings
    return ServerInfo(
        simulated=settings.simulated,
        model=settings.llm.model,
        dev_login=dev_login_enabled(settings),
        protocol=f.PROTOCOL_VERSION,
        limits=settings.limits.wire(),
    )


@post("/api/dev/token", status_code=HTTP_201_CREATED)
async def dev_token(request: Request[Any, Any, Any], data: DevLogin) -> IssuedToken:
    runtime = _runtime(request)
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
