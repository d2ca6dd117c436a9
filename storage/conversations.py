"""Conversations: one row each, owned by one user."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from protocol.frames import Conversation, Message
from storage import messages

_COLUMNS = "id, owner, title, system, model, created_at, updated_at, history_seq, last_seq, tools"


@dataclass(frozen=True, slots=True)
class StoredConversation:
    owner: str
    meta: Conversation
    history_seq: int


def _from_row(row: asyncpg.Record) -> StoredConversation:
    meta = Conversation(
        id=row["id"],
        title=row["title"],
        system=row["system"],
        model=row["model"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        last_seq=row["last_seq"],
        tools=row["tools"],
    )
    return StoredConversation(owner=row["owner"], meta=meta, history_seq=row["history_seq"])


async def insert(pool: asyncpg.Pool, owner: str, meta: Conversation) -> None:
    await pool.execute(
        "INSERT INTO conversations"
        " (id, owner, title, system, model, created_at, updated_at, tools)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        meta.id,
        owner,
        meta.title,
        meta.system,
        meta.model,
        meta.created_at,
        meta.updated_at,
        meta.tools,
    )


async def get(
    pool: asyncpg.Pool | asyncpg.Connection, conversation: uuid.UUID
) -> StoredConversation | None:
    row = await pool.fetchrow(f"SELECT {_COLUMNS} FROM conversations WHERE id = $1", conversation)
    return None if row is None else _from_row(row)


async def list_for(
    pool: asyncpg.Pool, owner: str, limit: int | None = 200
) -> list[StoredConversation]:
    """The owner's conversations, latest first; `limit` None: all of them."""
    rows = await pool.fetch(
        f"SELECT {_COLUMNS} FROM conversations WHERE owner = $1"
        " ORDER BY updated_at DESC, id LIMIT $2",
        owner,
        limit,
    )
    return [_from_row(row) for row in rows]


async def update(
    pool: asyncpg.Pool,
    conversation: uuid.UUID,
    owner: str,
    *,
    title: str | None,
    system: str | None,
    model: str | None,
    seq: int,
    now: datetime,
    tools: list[str] | None = None,
) -> StoredConversation | None:
    """Change the given fields of the owner's conversation; None when there is no such one."""
    row = await pool.fetchrow(
        "UPDATE conversations SET title = COALESCE($3, title), system = COALESCE($4, system),"
        " model = COALESCE($5, model), updated_at = $6, last_seq = GREATEST(last_seq, $7),"
        f" tools = COALESCE($8, tools) WHERE id = $1 AND owner = $2 RETURNING {_COLUMNS}",
        conversation,
        owner,
        title,
        system,
        model,
        now,
        seq,
        tools,
    )
    return None if row is None else _from_row(row)


async def delete(pool: asyncpg.Pool, conversation: uuid.UUID, owner: str) -> bool:
    status = await pool.execute(
        "DELETE FROM conversations WHERE id = $1 AND owner = $2", conversation, owner
    )
    return bool(status.endswith(" 1"))


async def delete_all_for(pool: asyncpg.Pool, owner: str) -> list[uuid.UUID]:
    """Delete every conversation of `owner` (their messages go with them); the ids deleted.

    The rows are locked in the order of their ids, as the persister's batch locks the
    conversations it writes (storage/messages.py `save_turns`): a delete in scan order could
    hold one of a batch's conversations while waiting for another the batch holds."""
    rows = await pool.fetch(
        "DELETE FROM conversations WHERE id IN (SELECT id FROM conversations"
        " WHERE owner = $1 ORDER BY id FOR UPDATE) RETURNING id",
        owner,
    )
    return [row["id"] for row in rows]


async def advance_seq(pool: asyncpg.Pool, conversation: uuid.UUID, seq: int) -> None:
    """Record that the conversation's events reached `seq` (an event PostgreSQL does not
    store, such as a notice), so that a reload from PostgreSQL never hands it out again."""
    await pool.execute(
        "UPDATE conversations SET last_seq = GREATEST(last_seq, $2) WHERE id = $1",
        conversation,
        seq,
    )


async def with_history(
    pool: asyncpg.Pool, conversation: uuid.UUID
) -> tuple[StoredConversation | None, list[Message]]:
    """The row and its persisted messages as of one moment (one repeatable-read
    transaction): a turn persisted between two separate reads would otherwise be in the
    messages but not in the row's `history_seq`, and a join would get its events twice."""
    async with (
        pool.acquire() as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
    ):
        row = await get(conn, conversation)
        return row, [] if row is None else await messages.history(conn, conversation)
