"""Single-use tickets for SSE streams: `EventSource` cannot send an `Authorization` header, and
a long-lived token in a URL ends up in logs and histories. A ticket stands for one user, lives
`server.stream_ticket_ttl` seconds and is taken with GETDEL, so it opens one stream at most."""

from __future__ import annotations

import secrets
import time

from redis.asyncio import Redis

from server.redis import keys


class Tickets:
    def __init__(self, redis: Redis, ttl: float) -> None:
        self.redis = redis
        self.ttl_ms = max(int(ttl * 1000), 1)

    async def issue(self, user: str) -> tuple[str, float]:
        """A new ticket for `user` and when it expires (Unix seconds)."""
        ticket = secrets.token_urlsafe(24)
        await self.redis.set(keys.stream_ticket(ticket), user, px=self.ttl_ms)
        return ticket, time.time() + self.ttl_ms / 1000

    async def redeem(self, ticket: str) -> str | None:
        """The user a ticket stands for, once; None when unknown, used or expired."""
        if not ticket or len(ticket) > 64:
            return None
        user = await self.redis.getdel(keys.stream_ticket(ticket))
        if user is None:
            return None
        return user.decode() if isinstance(user, bytes) else str(user)
