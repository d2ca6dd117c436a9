"""The persister against the real embedded Redis and PostgreSQL: a batch of finished turns is
written to PostgreSQL turn by turn, then marked persisted and acknowledged in one round trip."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import asyncpg
import msgspec
import pytest_asyncio
from redis.asyncio import Redis

from protocol.frames import utcnow
from server.generation.persister import Persister
from server.redis import keys
from server.redis.eventlog import EventLog
from storage import conversations, messages
from storage.messages import FinishedTurn
from tests.helpers.processes import Db, Services, redis_db
from tests.helpers.scripts import conversation_row, message

MAX_EVENTS, TTL = 1000, 3600


@pytest_asyncio.fixture
async def redis(services: Services) -> AsyncIterator[Redis]:
    async with Redis.from_url(redis_db(services.redis_url, Db.PERSISTER)) as client:
        await client.flushdb()
        yield client


@pytest_asyncio.fixture
async def persister(pool: asyncpg.Pool, redis: Redis) -> Persister:
    """A persister of the test's Redis database and PostgreSQL, its group made."""
    persister = Persister(redis, pool, EventLog(redis, MAX_EVENTS, TTL), name="p")
    await persister.groups[0].ensure()
    return persister


async def finished_turn(pool: asyncpg.Pool, conversation: uuid.UUID | None = None) -> FinishedTurn:
    """A first turn (its `done` at seq 4) of a conversation in PostgreSQL, or of
    `conversation` (not there)."""
    if conversation is None:
        meta = conversation_row()
        await conversations.insert(pool, "alice", meta)
        conversation = meta.id
    return FinishedTurn(
        conversation=conversation,
        user_message=message("user"),
        user_seq=1,
        reply=message("assistant"),
        replaces=None,
        finished_at=utcnow(),
        done_seq=4,
    )


async def queued(redis: Redis, finished: FinishedTurn) -> None:
    """A finished turn on the persist stream as `finish` leaves it, its events in the log."""
    c = finished.conversation
    await redis.set(keys.seq(c), finished.done_seq)
    await redis.set(keys.persisted(c), 0)
    await redis.set(keys.history(c), b"a transcript copy")
    for seq in range(1, finished.done_seq + 1):
        await redis.xadd(keys.log(c), {"e": b"x"}, id=f"{seq}-0")
    entry = {"turn": msgspec.json.encode(finished), "done_seq": finished.done_seq}
    await redis.xadd(keys.persist(0), entry)  # type: ignore[arg-type]


async def marked(redis: Redis, turns: list[FinishedTurn]) -> bool:
    """Whether Redis knows PostgreSQL holds each turn's events."""
    marks = [await redis.get(keys.persisted(t.conversation)) for t in turns]
    return marks == [str(t.done_seq).encode() for t in turns]


async def calls(redis: Redis, command: str) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def persist_one_batch(persister: Persister) -> None:
    group = persister.groups[0]
    await persister._persist_all(group, await group.read(10, 100))


async def test_a_batch_is_written_then_marked_and_acknowledged_at_once(
    pool: asyncpg.Pool, redis: Redis, persister: Persister
) -> None:
    turns = [await finished_turn(pool) for _ in range(3)]
    for finished in turns:
        await queued(redis, finished)
    acks = await calls(redis, "xack")
    task = asyncio.create_task(persister.run())
    try:
        async with asyncio.timeout(10):
            while await redis.xlen(keys.persist(0)) or not await marked(redis, turns):
                await asyncio.sleep(0.02)
    finally:
        persister.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert await calls(redis, "xack") == acks + 1  # one acknowledgement for the batch
    assert (await redis.xpending(keys.persist(0), keys.PERSISTERS))["pending"] == 0
    for finished in turns:
        c = finished.conversation
        saved = await messages.history(pool, c)
        assert [m.id for m in saved] == [finished.user_message.id, finished.reply.id]  # type: ignore[union-attr]
        assert await redis.get(keys.history(c)) is None  # the copy is no longer the latest


async def test_a_batch_whose_mark_script_redis_forgot_is_marked_all_the_same(
    pool: asyncpg.Pool, redis: Redis, persister: Persister
) -> None:
    finished = await finished_turn(pool)
    await queued(redis, finished)
    await redis.script_flush()  # as after Redis restarted
    await persist_one_batch(persister)
    assert await redis.get(keys.persisted(finished.conversation)) == b"4"
    assert await redis.xlen(keys.persist(0)) == 0


async def test_a_turn_of_a_gone_conversation_is_acknowledged_with_the_batch(
    pool: asyncpg.Pool, redis: Redis, persister: Persister
) -> None:
    kept, gone = await finished_turn(pool), await finished_turn(pool, uuid.uuid4())
    for finished in (gone, kept):
        await queued(redis, finished)
    await persist_one_batch(persister)
    assert len(await messages.history(pool, kept.conversation)) == 2
    assert await redis.xlen(keys.persist(0)) == 0
