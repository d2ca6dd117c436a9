"""What the Lua script tests share: a conversation row, a conversation loaded into Redis as
if from PostgreSQL, and a message in it."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import cast

from redis.asyncio import Redis

from protocol.frames import Conversation, Message, Role
from server.app.config import BudgetsSettings
from server.redis import keys
from server.redis.budgets import Budgets
from server.redis.eventlog import EventLog, meta_sha
from server.redis.turns import Budgeting

MAX_EVENTS = 5
TTL = 600
UNLIMITED = Budgeting(
    group="", limit=0, oldest=0, bucket=0, ttl=TTL, context_tokens=1000, max_tokens=100
)
"""No budget to stay within (the turn's worst case is still reserved and settled)."""


async def budgeted(redis: Redis, user: str) -> None:
    """Give the user a budget in Redis as if rebuilt from an empty ledger."""
    await Budgets(redis, BudgetsSettings()).seed(user, {}, None)


def conversation_row(conversation: uuid.UUID | None = None, last_seq: int = 0) -> Conversation:
    now = datetime.now(UTC)
    return Conversation(
        id=conversation or uuid.uuid4(),
        title="t",
        system="",
        model="m",
        created_at=now,
        updated_at=now,
        last_seq=last_seq,
    )


async def loaded(
    events: EventLog,
    owner: str = "alice",
    last_seq: int = 0,
    conversation: uuid.UUID | None = None,
) -> uuid.UUID:
    """A conversation (a new one, or `conversation`) whose Redis state is seeded as if from
    PostgreSQL (all persisted)."""
    meta = conversation_row(conversation, last_seq=last_seq)
    await events.load(owner, meta, last_seq, last_seq, [])
    return meta.id


def message(role: Role = "user", message_id: uuid.UUID | None = None) -> Message:
    return Message(
        id=message_id or uuid.uuid4(),
        role=role,
        content="hello",
        status="complete",
        created_at=datetime.now(UTC),
    )


async def row_sha(redis: Redis, conversation: uuid.UUID) -> str:
    """The SHA-1 of the conversation's row as Redis holds it: what a web process's copy of
    the row proves to the turn scripts (any value for a conversation Redis does not hold)."""
    raw = cast(bytes | None, await redis.get(keys.meta(conversation)))
    return meta_sha(raw or b"")
