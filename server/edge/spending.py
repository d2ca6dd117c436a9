"""Spending: users' budgets (Redis, rebuilt from the ledger) and the usage ledger itself
(PostgreSQL), for the say path, `ready`, `GET /api/usage` and the server API."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisError

from protocol import budget
from protocol import frames as f
from server.app.config import BudgetsSettings
from server.edge.failures import Refused, refusal
from server.redis.budgets import Budgets, Clock
from storage import usage as ledger


class Spending:
    def __init__(
        self, redis: Redis, pool: asyncpg.Pool, settings: BudgetsSettings, clock: Clock = f.utcnow
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.budgets = Budgets(redis, settings, clock)

    async def rebuild(self, user: str) -> None:
        """Seed the user's budget in Redis from the ledger (if Redis has none)."""
        try:
            spent = await ledger.spent_by_bucket(self.pool, user, self.budgets.oldest())
            own = await ledger.override(self.pool, user)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise refusal(exc, "the database") from None
        await self.budgets.seed(user, spent, own)

    async def state(self, user: str, group: str) -> budget.State:
        """The user's budget now, rebuilt from the ledger if Redis lost it."""
        try:
            state = await self.budgets.read(user, group)
            if state is None:
                await self.rebuild(user)
                state = await self.budgets.read(user, group)
        except RedisError as exc:
            raise refusal(exc, "Redis") from None
        if state is None:
            raise Refused("unavailable", "Redis is unavailable; try again shortly")
        return state

    async def over_budget(self, user: str, group: str) -> Refused:
        """The refusal of a turn the budget has no room for."""
        state = await self.state(user, group)
        return Refused(
            "quota_exceeded",
            f"the token budget ({state.limit}) is spent until {state.resets_at.isoformat()}",
            resets_at=state.resets_at,
            remaining=0,
        )

    def budget_frame(self, state: budget.State) -> f.Budget:
        return f.Budget(
            limit=state.limit,
            used=state.used,
            remaining=state.remaining,
            resets_at=state.resets_at,
            window=self.settings.window,
        )

    async def set_limit(self, user: str, tokens: int | None) -> None:
        """The user's own budget (None: the group's again): the ledger's side, then Redis."""
        await ledger.set_override(self.pool, user, tokens, f.utcnow())
        await self.budgets.set_limit(user, tokens)

    def allows(self, group: str, model: str) -> None:
        """Refuse a model the user's group may not pick."""
        if not self.settings.allows(group, model):
            raise Refused("forbidden_model", f"the model {model!r} is not available to you")


def day_start(value: datetime) -> datetime:
    return value.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
