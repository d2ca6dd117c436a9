"""Users' token budgets in Redis: a cache of the usage ledger (storage/usage.py).

Each user has one hash (`keys.budget`), holding per bucket (protocol/budget.py) the tokens
spent or reserved in it. `say`/`regenerate` reserve a turn's worst case in it atomically with
accepting the turn (scripts/lib_budget.lua), `finish` settles the reservation with what the
turn spent. When Redis lost the hash (a restart, a flush, its expiry) the scripts answer
`budget` and the hash is rebuilt from the ledger before anything is reserved again: losing
Redis never grants fresh budget. Each rebuild has its own `epoch`, so a turn reserved before
it is settled as a whole spending (the rebuilt hash never held its reservation).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from datetime import datetime
from typing import Final

import msgspec
from redis.asyncio import Redis
from redis.exceptions import WatchError

from protocol import budget
from protocol.frames import utcnow
from server.app.config import BudgetsSettings
from server.redis import keys, scripts
from server.redis.turns import Budgeting

LOAD: Final = scripts.load("budget_load")
WARN: Final = scripts.load("budget_warn", functions=["lib_budget"])

Clock = Callable[[], datetime]


class Budgets:
    def __init__(self, redis: Redis, settings: BudgetsSettings, clock: Clock = utcnow) -> None:
        self.redis = redis
        self.settings = settings
        self.clock = clock
        """The time the windows are reckoned by; tests pass their own."""
        self._load = LOAD.register(redis)
        self._warn = WARN.register(redis)

    @property
    def window(self) -> budget.Window:
        return self.settings.window

    def bucket(self) -> int:
        return budget.bucket(self.clock(), self.window)

    def oldest(self) -> int:
        return budget.oldest(self.clock(), self.window)

    def budgeting(self, group: str, context_tokens: int, max_tokens: int) -> Budgeting:
        """What the `say` and `regenerate` scripts need to check and reserve a budget."""
        now = self.clock()
        return Budgeting(
            group=group,
            limit=self.settings.limit_for(group),
            oldest=budget.oldest(now, self.window),
            bucket=budget.bucket(now, self.window),
            ttl=budget.ttl(self.window),
            context_tokens=context_tokens,
            max_tokens=max_tokens,
        )

    async def seed(self, user: str, spent: dict[int, int], own_limit: int | None) -> bool:
        """Seed the user's budget with the ledger's spending per bucket, unless Redis has
        one already; True if this call seeded it."""
        seeded = await self._load(
            budget_key=keys.budget(user),
            buckets=msgspec.json.encode({str(b): n for b, n in spent.items()}),
            limit="" if own_limit is None else own_limit,
            epoch=f"{time.time_ns():x}",
            ttl=budget.ttl(self.window),
        )
        return bool(seeded)

    async def read(self, user: str, group: str) -> budget.State | None:
        """The user's budget now, or None when Redis holds none (rebuild it first)."""
        fields: dict[bytes, bytes] = await self.redis.hgetall(keys.budget(user))  # type: ignore[misc,assignment]
        if not fields:
            return None
        now = self.clock()
        first = budget.oldest(now, self.window)
        spent = {
            int(name[2:]): int(value)
            for name, value in fields.items()
            if name.startswith(b"b:") and int(name[2:]) >= first
        }
        own = fields.get(b"limit")
        limit = int(own) if own is not None else self.settings.limit_for(group)
        resets = budget.resets_at(now, self.window, [b for b, n in spent.items() if n > 0])
        return budget.State(limit=limit, used=sum(spent.values()), resets_at=resets)

    async def warning(self, user: str, group: str) -> tuple[int, int] | None:
        """(spent, limit) the first time in the window the user's spending reaches
        `warn_at` of the limit, else None."""
        answer = await self._warn(
            budget_key=keys.budget(user),
            group_limit=self.settings.limit_for(group),
            oldest=self.oldest(),
            bucket=self.bucket(),
            warn_at=self.settings.warn_at,
        )
        return (int(answer[0]), int(answer[1])) if answer else None

    async def set_limit(self, user: str, tokens: int | None) -> None:
        """Apply the user's own budget to a cached hash (a missing one reads it when rebuilt)."""
        key = keys.budget(user)
        if tokens is None:
            await self.redis.hdel(key, "limit")  # type: ignore[misc]
            return
        for _ in range(10):  # the hash changes with every turn: try again if it did
            with contextlib.suppress(WatchError):
                await self._set_if_cached(key, tokens)
                return

    async def _set_if_cached(self, key: str, tokens: int) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            await pipe.watch(key)
            if not await pipe.exists(key):
                return  # a hash seeded later reads the ledger and the user's own budget
            pipe.multi()  # type: ignore[no-untyped-call]
            pipe.hset(key, "limit", tokens)
            await pipe.execute()
