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
