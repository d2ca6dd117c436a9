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

from redis.asyncio import Redis

from server.edge.auth import Principal
from server.redis import keys

BEFORE = "before"


class Revocations:
    def __init__(self, redis: Redis, ttl: float) -> None:
        self.redis = redis
        self.ttl = max(int(ttl), 1)

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
        await self._revoke(user, token_id, "1", max(left, self.ttl))

    async def _revoke(self, user: str, field: str, value: str, keep_for: int = 0) -> None:
        """Write the revocation; the hash then lives at least `keep_for` seconds (at least
        the TTL), never shortened (EXPIRE's GT would need Redis 7: its TTL is read back)."""
        key = keys.revoked(user)
        keep_for = max(keep_for, self.ttl)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, field, value)
            pipe.ttl(key)
            _, left = await pipe.execute()
        if left < keep_for:
            await self.redis.expire(key, keep_for)
