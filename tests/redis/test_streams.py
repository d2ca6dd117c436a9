"""ConsumerGroup (the turns and persist streams' mechanics) against the real Redis."""

from __future__ import annotations

import asyncio
import uuid

from redis.asyncio import Redis

from server.redis.streams import ConsumerGroup


def group_on(redis: Redis, consumer: str, stream: str | None = None) -> ConsumerGroup:
    return ConsumerGroup(redis, stream or f"test:stream:{uuid.uuid4().hex}", "g", consumer)


async def test_each_entry_goes_to_one_consumer_and_ack_deletes_it(redis: Redis) -> None:
    first = group_on(redis, "first")
    second = group_on(redis, "second", first.stream)
    await first.ensure()
    await second.ensure()  # already there: fine
    entry_id = await redis.xadd(first.stream, {"job": "1"})
    assert await first.read(10, 100) == [(entry_id, {b"job": b"1"})]
    assert await second.read(10, 100) == []
    await first.ack(entry_id)
    assert await redis.xlen(first.stream) == 0
    assert await first.pending() == []


async def test_a_group_redis_lost_is_created_again_by_the_next_read(redis: Redis) -> None:
    group = group_on(redis, "c")
    await group.ensure()
    await redis.delete(group.stream)  # Redis restarted empty
    assert await group.read(10, 100) == []
    entry_id = await redis.xadd(group.stream, {"job": "2"})
    assert await group.read(10, 100) == [(entry_id, {b"job": b"2"})]


async def test_entries_of_a_dead_consumer_are_claimed_by_id_or_by_idle_time(
    redis: Redis,
) -> None:
    dead = group_on(redis, "dead")
    await dead.ensure()
    first = await redis.xadd(dead.stream, {"n": "1"})
    second = await redis.xadd(dead.stream, {"n": "2"})
    assert len(await dead.read(10, 100)) == 2
    await asyncio.sleep(0.3)

    heir = group_on(redis, "heir", dead.stream)
    pending = await heir.pending()
    assert [(p.entry_id, p.consumer) for p in pending] == [(first, "dead"), (second, "dead")]
    assert all(p.idle_ms >= 250 for p in pending)
    assert await heir.claim([first], min_idle_ms=10_000) == []  # not idle long enough
    assert await heir.claim([first], min_idle_ms=20) == [(first, {b"n": b"1"})]
    assert await heir.autoclaim(min_idle_ms=200) == [(second, {b"n": b"2"})]
    assert {p.consumer for p in await heir.pending()} == {"heir"}
