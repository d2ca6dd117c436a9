"""What the Lua script tests share: a conversation row and a conversation loaded into Redis
as if from PostgreSQL."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from protocol.frames import Conversation
from server.redis.eventlog import EventLog

MAX_EVENTS = 5
TTL = 600


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


async def loaded(events: EventLog, owner: str = "alice", last_seq: int = 0) -> uuid.UUID:
    """A conversation whose Redis state is seeded as if from PostgreSQL (all persisted)."""
    meta = conversation_row(last_seq=last_seq)
    await events.load(owner, meta, last_seq, last_seq, [])
    return meta.id
