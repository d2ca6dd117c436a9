"""The server API's disconnects, on every web process: one subscription to `keys.SERVER`.

A message names a user and, optionally, one socket session (the `ready` frame's `session`).
Each process drops the user's verified tokens from its cache (so that their next use is
checked against the revocations) and closes the matching sockets with 4401. A user-wide
disconnect's revocation (`before`) was written by the API before it published; a session's
token is known only to the process holding that socket, which revokes it (by `jti`, `sid`
or digest) before closing the socket and then publishes a `forget` so that no other
process keeps the token cached. A socket whose token was being verified while the
revocation was written may be admitted just after the sweep: a second sweep `LATE_SWEEP`
later closes the user's sockets whose token was issued before the revocation."""

from __future__ import annotations

import asyncio
import logging
from typing import Final

import msgspec
from redis.asyncio import Redis
from redis.exceptions import RedisError

from protocol.session import CloseCode
from server.edge.auth import Verifier
from server.edge.commands import Commands
from server.edge.connection import Connection
from server.edge.hub import Hub
from server.redis import client, keys
from server.redis.revocations import Revocations

log = logging.getLogger("parley.disconnects")

REASON = "disconnected by the server"
LATE_SWEEP: Final = 1.0


class Disconnect(msgspec.Struct, frozen=True, kw_only=True):
    """What travels on `keys.SERVER`."""

    user: str
    session: str | None = None
    before: float | None = None
    """A user-wide disconnect's revocation time."""
    forget: bool = False
    """Only drop the user's cached tokens (a session's token was just revoked)."""


async def publish(redis: Redis, message: Disconnect) -> None:
    await client.publish(redis, keys.SERVER, msgspec.json.encode(message))


class Disconnects:
    def __init__(self, hub: Hub, verifier: Verifier, redis: Redis, revocations: Revocations):
        self.hub = hub
        self.verifier = verifier
        self.redis = redis
        self.revocations = revocations

    async def start(self) -> None:
        await self.hub.bus.subscribe(keys.SERVER, self, raw=True)

    def on_event(self, seq: int, frame: bytes) -> None:
        try:
            message = msgspec.json.decode(frame, type=Disconnect)
        except msgspec.DecodeError:
            log.warning("ignored a malformed message on %s", keys.SERVER)
            return
        self.verifier.forget(message.user)
        if message.forget:
            return
        sockets = self._sockets(message.user, message.session)
        if message.session is None:
            _close(sockets)
            if message.before is not None:
                loop = asyncio.get_running_loop()
                loop.call_later(LATE_SWEEP, self._sweep_late, message.user, message.before)
        elif sockets:
            self.hub.spawn(self._revoke_session(message.user, sockets))

    def resync(self) -> None:
        """A disconnect may have been missed: check every cached token again."""
        self.verifier.forget_all()

    def _sweep_late(self, user: str, before: float) -> None:
        _close(
            [
                (conn, commands)
                for conn, commands in self._sockets(user, None)
                if commands.principal is not None and (commands.principal.issued_at or 0.0) < before
            ]
        )

    def _sockets(self, user: str, session: str | None) -> list[tuple[Connection, Commands]]:
        found = []
        for conn in tuple(self.hub.users.get(user, ())):
            if not isinstance(conn, Connection) or not isinstance(conn.handler, Commands):
                continue
            if session is None or conn.handler.id == session:
                found.append((conn, conn.handler))
        return found

    async def _revoke_session(self, user: str, sockets: list[tuple[Connection, Commands]]) -> None:
        try:
            for _, commands in sockets:
                if commands.principal is not None:
                    principal = commands.principal
                    await self.revocations.revoke_token(
                        user, principal.token_id, principal.expires_at
                    )
            self.verifier.forget(user)
            await publish(self.redis, Disconnect(user=user, forget=True))
        except (RedisError, OSError) as exc:
            log.warning("cannot revoke a disconnected session's token: %s", exc)
        finally:
            _close(sockets)


def _close(sockets: list[tuple[Connection, Commands]]) -> None:
    for conn, _ in sockets:
        conn.close(CloseCode.UNAUTHORIZED, REASON)
