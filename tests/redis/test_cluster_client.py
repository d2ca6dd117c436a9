"""The process's Redis Cluster client against a real six-node cluster: what a process does
with it as it starts (many loops' first commands at once) and while the cluster cannot
answer."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest

from server.app.config import RedisSettings
from server.redis import keys
from server.redis.client import opened
from server.redis.streams import ConsumerGroup, Shards
from tests.helpers.processes import RedisBackend, RedisClusters

STARTS = 10
SHARDS = 16


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisBackend]:
    """A cluster of this module's own, stopped after it."""
    clusters = RedisClusters(tmp_path_factory.mktemp("client-cluster"))
    try:
        yield clusters.backend()
    finally:
        clusters.stop()


async def start_like_a_worker(url: str) -> list[BaseException]:
    """What a worker process does first: a new client, then at once the worker's consumer
    groups (one after the other) and the persister's (one loop per shard, together)."""
    redis = await opened(RedisSettings(url=url, cluster=True))
    group = f"g-{uuid.uuid4().hex[:8]}"
    turns = Shards([ConsumerGroup(redis, keys.turns(s), group, "c") for s in range(SHARDS)])
    persist = [ConsumerGroup(redis, keys.persist(s), group, "c") for s in range(SHARDS)]
    try:
        done = await asyncio.gather(
            turns.ensure(), *(g.ensure() for g in persist), return_exceptions=True
        )
    finally:
        await redis.aclose()
    return [outcome for outcome in done if isinstance(outcome, BaseException)]


async def test_a_process_starting_many_loops_at_once_loses_none_of_their_first_commands(
    backend: RedisBackend,
) -> None:
    for _ in range(STARTS):
        assert await start_like_a_worker(backend.url) == []


async def test_more_commands_at_once_than_the_pool_holds_wait_for_a_connection(
    backend: RedisBackend,
) -> None:
    """A web process joining thousands of sockets sends more commands at once than
    `redis.pool_size`: they wait for a connection, as on one Redis, instead of failing with
    redis-py's MaxConnectionsError (answered to the tabs as Redis unavailable)."""
    redis = await opened(RedisSettings(url=backend.url, cluster=True, pool_size=2))
    key = f"parley:test:{{pool-{uuid.uuid4().hex[:8]}}}"
    try:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.rpush(key, *range(40))
            await pipe.execute()
        pipelines = []
        for _ in range(10):
            pipe = redis.pipeline(transaction=False)
            pipe.llen(key)
            pipelines.append(pipe.execute())
        done = await asyncio.gather(
            *(redis.lpop(key) for _ in range(40)), *pipelines, return_exceptions=True
        )
        assert [d for d in done if isinstance(d, BaseException)] == []
        assert sorted(int(d) for d in done[:40]) == list(range(40))
    finally:
        await redis.delete(key)
        await redis.aclose()
