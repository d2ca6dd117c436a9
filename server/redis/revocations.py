"""Revoked tokens, per user, in one hash (`keys.revoked`): checked with one HMGET when a
token is verified (`server.edge.auth.Verifier`), written by the server API's disconnects.

A revocation names every token of the user issued before a time (`before`, compared with
the token's `iat`; a token without `iat` counts as issued before), or one token by its
`jti`, its session (`sid`) or, lacking both, its digest. The hash expires
`server_api.revocation_ttl` after the last revocation: a token living longer than that is
honoured again once it is gone."""

from __future__ import annotations

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

    async def revoke_token(self, user: str, token_id: str) -> None:
        await self._revoke(user, token_id, "1")

    async def _revoke(self, user: str, field: str, value: str) -> None:
        key = keys.revoked(user)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, field, value)
            pipe.expire(key, self.ttl)
            await pipe.execute()
