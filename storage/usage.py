"""The usage ledger (one row per finished turn) and the budgets set per user.

The ledger is the truth about spending: Redis holds each user's budget as a cache rebuilt
from `spent_by_bucket` whenever Redis has lost it.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

import asyncpg
import msgspec

from storage.db import columns, structs

GroupBy = Literal["day", "model"]


class UsageEntry(msgspec.Struct, frozen=True, kw_only=True):
    """What a finished turn spent, as the worker saw it; carried with the turn to the
    persister, which writes it in the turn's transaction."""

    owner: str
    model: str
    status: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cached_tokens: int = 0
    estimated: bool = False
    cost: float = 0.0
    bucket: int = 0
    started_at: datetime

    @property
    def tokens(self) -> int:
        """What counts against a budget: the prompt and the completion."""
        return self.prompt_tokens + self.completion_tokens


class UsageRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One ledger row, as the server API's export gives it."""

    owner: str
    conversation_id: uuid.UUID
    message_id: uuid.UUID
    model: str
    status: str
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cached_tokens: int
    estimated: bool
    cost: float
    started_at: datetime
    finished_at: datetime


class UsageTotal(msgspec.Struct, frozen=True, kw_only=True):
    """The ledger summed over a day or a model."""

    key: str
    turns: int
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cached_tokens: int
    cost: float


RECORD_COLUMNS = (
    "owner, conversation_id, message_id, model, status, prompt_tokens, completion_tokens,"
    " reasoning_tokens, cached_tokens, estimated, cost, started_at, finished_at"
)


_RECORD = (
    "INSERT INTO usage (conversation_id, message_id, owner, model, status, prompt_tokens,"
    " completion_tokens, reasoning_tokens, cached_tokens, estimated, cost, bucket,"
    " started_at, finished_at)"
    " SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[],"
    " $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[], $10::boolean[],"
    " $11::float8[], $12::bigint[], $13::timestamptz[], $14::timestamptz[])"
    " ON CONFLICT (conversation_id, message_id) DO NOTHING"
)


async def record(
    conn: asyncpg.Connection, spent: list[tuple[uuid.UUID, uuid.UUID, UsageEntry, datetime]]
) -> None:
    """Add the turns' rows (conversation, message, entry, finished at) in one statement; a
    second write of the same turn changes nothing. In the order of their keys: an insert
    waits for another transaction's uncommitted row of the same key, so two batches holding
    the same turns (a replay) insert them in the same order and never wait in a cycle."""
    rows = [
        (
            conversation,
            message_id,
            entry.owner,
            entry.model,
            entry.status,
            entry.prompt_tokens,
            entry.completion_tokens,
            entry.reasoning_tokens,
            entry.cached_tokens,
            entry.estimated,
            entry.cost,
            entry.bucket,
            entry.started_at,
            finished_at,
        )
        for conversation, message_id, entry, finished_at in sorted(spent, key=_key)
    ]
    await conn.execute(_RECORD, *columns(rows, 14))


def _key(spent: tuple[uuid.UUID, uuid.UUID, UsageEntry, datetime]) -> tuple[uuid.UUID, uuid.UUID]:
    return spent[0], spent[1]


async def spent_by_bucket(pool: asyncpg.Pool, owner: str, since: int) -> dict[int, int]:
    """The user's budgeted tokens (prompt + completion) per bucket from `since` on."""
    rows = await pool.fetch(
        "SELECT bucket, sum(prompt_tokens + completion_tokens)::bigint AS spent FROM usage"
        " WHERE owner = $1 AND bucket >= $2 GROUP BY bucket",
        owner,
        since,
    )
    return {int(r["bucket"]): int(r["spent"]) for r in rows}


_TOTALS = (
    "SELECT {key} AS key, count(*) AS turns, sum(prompt_tokens)::bigint AS prompt_tokens,"
    " sum(completion_tokens)::bigint AS completion_tokens,"
    " sum(reasoning_tokens)::bigint AS reasoning_tokens,"
    " sum(cached_tokens)::bigint AS cached_tokens, sum(cost) AS cost FROM usage"
    " WHERE owner = $1 AND finished_at >= $2 AND finished_at < $3 GROUP BY 1 ORDER BY 1"
)
_KEYS: dict[GroupBy, str] = {
    "day": "to_char(finished_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
    "model": "model",
}


async def totals(
    pool: asyncpg.Pool, owner: str, start: datetime, end: datetime, group_by: GroupBy
) -> list[UsageTotal]:
    """The user's ledger in [start, end), summed per UTC day or per model."""
    rows = await pool.fetch(_TOTALS.format(key=_KEYS[group_by]), owner, start, end)
    return structs(rows, UsageTotal)


async def records(
    pool: asyncpg.Pool, owner: str | None, start: datetime, end: datetime, limit: int
) -> list[UsageRecord]:
    """Ledger rows finished in [start, end), oldest first, of one user or (None) everyone."""
    rows = await pool.fetch(
        f"SELECT {RECORD_COLUMNS} FROM usage WHERE ($1::text IS NULL OR owner = $1)"
        " AND finished_at >= $2 AND finished_at < $3 ORDER BY finished_at, message_id"
        " LIMIT $4",
        owner,
        start,
        end,
        limit,
    )
    return structs(rows, UsageRecord)


async def override(pool: asyncpg.Pool, owner: str) -> int | None:
    """The budget set for this user through the server API, if any."""
    tokens = await pool.fetchval("SELECT tokens FROM budget_overrides WHERE owner = $1", owner)
    return None if tokens is None else int(tokens)


async def set_override(pool: asyncpg.Pool, owner: str, tokens: int | None, now: datetime) -> None:
    """Set (or, with None, remove) the user's own budget."""
    if tokens is None:
        await pool.execute("DELETE FROM budget_overrides WHERE owner = $1", owner)
        return
    await pool.execute(
        "INSERT INTO budget_overrides (owner, tokens, updated_at) VALUES ($1, $2, $3)"
        " ON CONFLICT (owner) DO UPDATE SET tokens = $2, updated_at = $3",
        owner,
        tokens,
        now,
    )
