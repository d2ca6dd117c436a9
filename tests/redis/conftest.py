"""The Lua scripts against the real embedded Redis, without a Parley process.

These tests use their own database number of the session's Redis, so that the jobs and
finished turns they queue are never seen by a Parley process running in the same session.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest_asyncio
from redis.asyncio import Redis

from protocol.frames import Conversation
from server.redis.eventlog import EventLog
from tests.conftest import Services

SCRIPTS_DB = 9
MAX_EVENTS = 5
TTL = 600


@pytest_asyncio.fixture(loop_scope="session")
async def redis(services: Services) -> AsyncIterator[Redis]:
    client = Redis.from_url(f"{services.redis_url.rsplit('/', 1)[0]}/{SCRIPTS_DB}")
    try:
        yield client
    finally:
        await client.aclose()


@pytest_asyncio.fixture(loop_scope="session")
async def events(redis: Redis) -> EventLog:
    return EventLog(redis, MAX_EVENTS, TTL)


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
