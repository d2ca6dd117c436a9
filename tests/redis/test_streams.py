"""ConsumerGroup (the turns and persist streams' mechanics) against the real Redis."""

from __future__ import annotations

import asyncio
import time
import uuid

from redis.asyncio import Redis

from server.redis.streams import ConsumerGroup, Shards


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


async def shards_of(redis: Redis, count: int) -> Shards:
    stream = f"test:shards:{uuid.uuid4().hex}"
    shards = Shards([group_on(redis, "w", f"{stream}:{i}") for i in range(count)])
    await shards.ensure()
    return shards


async def test_one_read_over_the_shards_never_takes_more_than_the_free_slots(
    redis: Redis,
) -> None:
    shards = await shards_of(redis, 4)
    for group in shards.groups:
        for n in range(3):
            await redis.xadd(group.stream, {"n": str(n)})
    taken = await shards.read(8, 100)
    assert len(taken) == 8
    assert {group.stream for group, _ in taken} == {g.stream for g in shards.groups}
    assert len(await shards.read(3, 100)) == 3  # fewer slots than shards: one from each of 3
    assert len(await shards.read(5, 100)) == 1  # what is left: one entry on one shard


async def test_a_busy_shard_is_emptied_at_once_while_the_others_stay_empty(
    redis: Redis,
) -> None:
    """Two free slots, four shards, six entries on one: every pass takes what the slots
    allow; none waits for the empty shards' blocking reads (a second each)."""
    shards = await shards_of(redis, 4)
    busy = shards.groups[1]
    for n in range(6):
        await redis.xadd(busy.stream, {"n": str(n)})
    began = time.monotonic()
    taken = []
    for _ in range(20):
        got = await shards.read(2, 1000)
        assert len(got) <= 2
        taken += got
        if len(taken) == 6:
            break
    assert len(taken) == 6 and {group for group, _ in taken} == {busy}
    assert time.monotonic() - began < 0.8
