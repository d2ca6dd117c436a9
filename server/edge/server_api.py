"""The server API (`/api/server/`): what the host application's backend asks of Parley, with
an API key of `server_api.keys` as `Authorization: Bearer`, never a user's token.

Disconnect a user's sockets (on every web process) and revoke their tokens, send a system
notice, see who has joined a conversation, and read, export or erase a user's data. With no
key configured the whole API answers 404, as if it did not exist. See docs/server-api.md."""

from __future__ import annotations

import hmac
import time
import uuid
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, delete, get, post
from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, NotFoundException
from litestar.handlers import BaseRouteHandler
from litestar.params import Parameter
from litestar.status_codes import HTTP_202_ACCEPTED, HTTP_204_NO_CONTENT

from protocol import frames as f
from server.app.runtime import Runtime
from server.edge.disconnects import Disconnect, publish
from server.edge.rest import ConversationDetail, answers, refuse_unstorable, shallow_body
from server.redis import rooms

User = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
SessionId = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
NoticeText = Annotated[str, msgspec.Meta(min_length=1, max_length=4000)]
UserParam = Annotated[str, Parameter(min_length=1, max_length=200)]


class DisconnectRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    user: User
    session: SessionId | None = None
    """The `ready` frame's `session`: only that socket; else every socket of the user."""


class Disconnected(msgspec.Struct, frozen=True):
    user: str
    session: str | None
    revoked_before: float | None
    """Every token of the user issued before this Unix time is refused (a user-wide
    disconnect); a session's token is revoked by the process holding that socket."""


class NoticeRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    user: User
    text: NoticeText
    conversation: uuid.UUID | None = None


class NoticeSent(msgspec.Struct, frozen=True):
    seq: int
    """The notice's seq in the conversation; 0 for a notice to the user's sockets."""


class Presence(msgspec.Struct, frozen=True):
    conversation: uuid.UUID
    sockets: int
    users: list[rooms.Present]


class Export(msgspec.Struct, frozen=True):
    user: str
    exported_at: str
    conversations: list[ConversationDetail]


class Erased(msgspec.Struct, frozen=True):
    user: str
    conversations: int


def runtime_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Runtime:
    runtime: Runtime = connection.app.state.runtime
    return runtime


async def server_key(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Guard: one of `server_api.keys` as the bearer (compared in constant time with each);
    404 when none is configured, 401 otherwise. Checked before the body is read."""
    configured = runtime_of(connection).settings.server_api.keys
    if not configured:
        raise NotFoundException("the server API is off (no server_api.keys)")
    scheme, _space, given = connection.headers.get("authorization", "").partition(" ")
    presented = given.strip().encode()
    matches = [hmac.compare_digest(presented, key.encode()) for key in configured]
    if scheme.lower() != "bearer" or not presented or not any(matches):
        raise NotAuthorizedException("a server API key is required")


class ServerAPI(Controller):
    path = "/api/server"
    guards = [server_key, shallow_body]  # noqa: RUF012 (litestar's Controller declares it)
    tags = ["server"]  # noqa: RUF012

    @post("/disconnect", status_code=HTTP_202_ACCEPTED)
    async def disconnect(
        self, request: Request[Any, Any, Any], data: DisconnectRequest
    ) -> Disconnected:
        """Close the user's sockets (or one session's) on every web process with 4401 and
        refuse their tokens from now on."""
        refuse_unstorable(data)
        runtime = runtime_of(request)
        revoked_before = None
        with answers("POST /api/server/disconnect"):
            if data.session is None:
                revoked_before = time.time()
                assert runtime.revocations is not None
                await runtime.revocations.revoke_before(data.user, revoked_before)
            message = Disconnect(user=data.user, session=data.session, before=revoked_before)
            await publish(runtime.redis, message)
        return Disconnected(user=data.user, session=data.session, revoked_before=revoked_before)

    @post("/notice", status_code=HTTP_202_ACCEPTED)
    async def notice(self, request: Request[Any, Any, Any], data: NoticeRequest) -> NoticeSent:
        """A `notice` frame: into the user's conversation (a conversation event with seq)
        or, without `conversation`, to every socket of the user."""
        refuse_unstorable(data)
        with answers("POST /api/server/notice"):
            seq = await runtime_of(request).conversations.notice(
                data.user, data.conversation, data.text
            )
        return NoticeSent(seq=seq)

    @get("/conversations/{conversation:uuid}/presence")
    async def presence(self, request: Request[Any, Any, Any], conversation: uuid.UUID) -> Presence:
        """Who has sockets joined to the conversation, on every live web process."""
        with answers("GET /api/server/conversations/{id}/presence"):
            users = await rooms.present(runtime_of(request).redis, conversation)
        return Presence(conversation, sum(u.sockets for u in users), users)

    @get("/users/{user:str}/conversations")
    async def list_conversations(
        self, request: Request[Any, Any, Any], user: UserParam
    ) -> list[f.Conversation]:
        with answers("GET /api/server/users/{user}/conversations"):
            return await runtime_of(request).conversations.list(user)

    @get("/users/{user:str}/conversations/{conversation:uuid}")
    async def read_conversation(
        self, request: Request[Any, Any, Any], user: UserParam, conversation: uuid.UUID
    ) -> ConversationDetail:
        with answers("GET /api/server/users/{user}/conversations/{id}"):
            return await _detail(runtime_of(request), user, conversation)

    @get("/users/{user:str}/export")
    async def export(self, request: Request[Any, Any, Any], user: UserParam) -> Export:
        """Every conversation of the user with its persisted messages (a GDPR export)."""
        runtime = runtime_of(request)
        with answers("GET /api/server/users/{user}/export"):
            details = []
            for meta in await runtime.conversations.everything(user):
                _, messages = await runtime.conversations.history(meta.id)
                details.append(ConversationDetail(meta=meta, messages=messages))
        return Export(user=user, exported_at=f.utcnow().isoformat(), conversations=details)

    @delete("/users/{user:str}", status_code=HTTP_204_NO_CONTENT)
    async def erase(self, request: Request[Any, Any, Any], user: UserParam) -> None:
        """Delete every conversation and message of the user, in PostgreSQL and Redis."""
        with answers("DELETE /api/server/users/{user}"):
            await runtime_of(request).conversations.erase_user(user)


async def _detail(runtime: Runtime, user: str, conversation: uuid.UUID) -> ConversationDetail:
    meta = await runtime.conversations.owned(user, conversation)
    _, messages = await runtime.conversations.history(conversation)
    return ConversationDetail(meta=meta, messages=messages)


ROUTES = [ServerAPI]
