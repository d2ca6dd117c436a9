"""admit, leave and beat (sockets per user across web processes) against the real Redis."""

from __future__ import annotations

import asyncio
import uuid

from redis.asyncio import Redis

from server.redis import keys, presence
from server.redis.presence import Presence


def new_user() -> str:
    return f"user-{uuid.uuid4().hex[:8]}"


async def counts(redis: Redis, user: str) -> dict[bytes, bytes]:
    return await redis.hgetall(keys.connections(user))  # type: ignore[no-any-return]


async def test_admit_counts_a_batch_of_users_up_to_the_limit(redis: Redis) -> None:
    admit = presence.ADMIT.register(redis)
    beat = presence.BEAT.register(redis)
    await beat(processes_key=keys.PROCESSES, process="proc-a", ttl_ms=30_000)
    alice, bob = new_user(), new_user()
    admitted = await admit(
        processes_key=keys.PROCESSES,
        user_keys=[keys.connections(u) for u in (alice, bob, alice, alice)],
        process="proc-a",
        limit=2,
    )
    assert admitted == [1, 1, 1, 0]
    assert await counts(redis, alice) == {b"proc-a": b"2"}
    assert await counts(redis, bob) == {b"proc-a": b"1"}


async def test_counts_of_a_process_that_stopped_beating_are_dropped(redis: Redis) -> None:
    admit = presence.ADMIT.register(redis)
    beat = presence.BEAT.register(redis)
    user = new_user()
    for process in ("proc-alive", "proc-new"):
        await beat(processes_key=keys.PROCESSES, process=process, ttl_ms=30_000)
    await redis.zadd(keys.PROCESSES, {"proc-dead": 1})  # its deadline passed long ago
    await redis.hset(keys.connections(user), mapping={"proc-dead": 5, "proc-alive": 1})
    admitted = await admit(
        processes_key=keys.PROCESSES,
        user_keys=[keys.connections(user), keys.connections(user)],
        process="proc-new",
        limit=2,
    )
    assert admitted == [1, 0]  # proc-alive's one counts, proc-dead's five do not
    assert await counts(redis, user) == {b"proc-alive": b"1", b"proc-new": b"1"}


async def test_beat_renews_its_process_and_drops_expired_ones(redis: Redis) -> None:
    beat = presence.BEAT.register(redis)
    await redis.zadd(keys.PROCESSES, {"proc-gone": 1})
    await beat(processes_key=keys.PROCESSES, process="proc-b", ttl_ms=30_000)
    first = await redis.zscore(keys.PROCESSES, "proc-b")
    await asyncio.sleep(0.01)
    await beat(processes_key=keys.PROCESSES, process="proc-b", ttl_ms=30_000)
    assert await redis.zscore(keys.PROCESSES, "proc-gone") is None
    renewed = await redis.zscore(keys.PROCESSES, "proc-b")
    assert first is not None and renewed is not None and renewed > first


async def test_leave_takes_each_users_count_down_in_one_call(redis: Redis) -> None:
    leave = presence.LEAVE.register(redis)
    alice, bob = new_user(), new_user()
    await redis.hset(keys.connections(alice), "proc-c", 3)
    await redis.hset(keys.connections(bob), "proc-c", 1)
    left = await leave(
        user_keys=[keys.connections(alice), keys.connections(bob)],
        process="proc-c",
        counts=[2, 1],
    )
    assert left == 2
    assert await counts(redis, alice) == {b"proc-c": b"1"}
    assert await counts(redis, bob) == {b"proc-c": b"0"}


async def test_presence_admits_concurrent_sockets_up_to_the_limit_and_frees_on_leave(
    redis: Redis,
) -> None:
    web = Presence(redis, limit=2)
    await web.start()
    try:
        user = new_user()
        admitted = await asyncio.gather(*(web.admit(user) for _ in range(3)))
        assert sorted(admitted) == [False, True, True]
        web.leave(user)
        for _ in range(100):
            if await counts(redis, user) == {web.process.encode(): b"1"}:
                break
            await asyncio.sleep(0.02)
        assert await web.admit(user)
    finally:
        await web.stop()
    assert await redis.zscore(keys.PROCESSES, web.process) is None
