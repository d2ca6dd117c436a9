"""Revoked tokens, per user, in one hash (`keys.revoked`): checked with one HMGET when a
token is verified (`server.edge.auth.Verifier`), written by the server API's disconnects.

A revocation names every token of the user issued before a time (`before`, compared with
the token's `iat`; a token without `iat` counts as issued before), or one token by its
`jti`, its session (`sid`) or, lacking both, its digest. The hash expires
`server_api.revocation_ttl` after the last revocation, or when the token a revocation names
expires if that is later (its holder knows its `exp`): a token revoked by name is refused
until it expires; a token older than a user-wide revocation and living longer than the TTL
is honoured again once the hash is gone."""

from __future__ import annotations

import math
import time
from typing import Final

from redis.asyncio import Redis

from server.edge.auth import Principal
from server.redis import keys, scripts

BEFORE = "before"
LONGEST: Final = 10 * 365 * 24 * 3600
"""The longest a revocation is kept (seconds): a token claiming to live longer is refused
for this long (EXPIRE refuses a TTL out of its range)."""

REVOKE: Final = scripts.load("revoke")


class Revocations:
    def __init__(self, redis: Redis, ttl: float) -> None:
        self.redis = redis
        self.ttl = min(max(int(ttl), 1), LONGEST)
        self._revoke_script = REVOKE.register(redis)

    async def revoked(self, principal: Principal) -> bool:
        before, token = await self.redis.hmget(
            keys.revoked(principal.user), [BEFORE, principal.token_id]
        )
        if token is not None:
            return True
        if before is None:
            return False
        return principal.issued_at is None or principal.issued_at < float(before)

    async def revoke_before(self, user: str, at: float) -> None:
        """Every token of `user` issued before `at` (Unix seconds)."""
        await self._revoke(user, BEFORE, repr(at))

    async def revoke_token(self, user: str, token_id: str, expires_at: float | None) -> None:
        """One token, refused until it expires (`expires_at`, its `exp`) or for the TTL,
        whichever is later."""
        left = 0 if expires_at is None else math.ceil(expires_at - time.time()) + 1
        await self._revoke(user, token_id, "1", left)

    async def _revoke(self, user: str, field: str, value: str, keep_for: int = 0) -> None:
        """Write the revocation; the hash then lives at least `keep_for` seconds (at least
        the TTL, at most LONGEST), never shortened (scripts/revoke.lua)."""
        keep_for = min(max(keep_for, self.ttl), LONGEST)
        await self._revoke_script(
            revoked_key=keys.revoked(user), field=field, value=value, keep_for=keep_for
        )
