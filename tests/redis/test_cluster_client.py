"""The process's Redis Cluster client against a real six-node cluster: what a process does
with it as it starts (many loops' first commands at once) and while the cluster cannot
answer."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest
from redis.asyncio import Redis

from server.app.config import RedisSettings
from server.redis import eventlog, generations, keys
from server.redis.client import opened
from server.redis.eventlog import EventLog, Pipeliner, event_keys
from server.redis.streams import ConsumerGroup, Shards
from tests.helpers.processes import RedisBackend, RedisClusters
from tests.helpers.scripts import TTL, loaded

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


async def test_a_node_that_forgot_the_scripts_runs_a_batchs_calls_in_their_order(
    backend: RedisBackend,
) -> None:
    """A node forgets its scripts (a restart, a replica promoted, `SCRIPT FLUSH`, a new node
    given a slot), and before this process's next batch another process may have loaded
    again just what its own calls needed: a batch's calls of one conversation still run in
    the order queued, each event once (a call the node did not know used to run again after
    the batch's others, its events after theirs)."""
    assert backend.nodes is not None
    redis = await opened(RedisSettings(url=backend.url, cluster=True))
    events = EventLog(redis, 1000, TTL)
    pipeliner = Pipeliner(redis)
    pipeliner.start()
    conversation = await loaded(events)
    message_id = uuid.uuid4()
    async with redis.pipeline(transaction=False) as pipe:
        generations.claim(pipe, conversation, message_id, "test", TTL)
        await pipe.execute()
    node = backend.nodes.owner(keys.seq(conversation))
    another_process = Redis.from_url(f"redis://{node.address}")
    append = eventlog.APPEND.register(redis)
    queued: list[str] = []
    index = 0
    try:
        for knows in ("nothing", "the later call's script"):
            node.cli("SCRIPT", "FLUSH")
            titled = append.bind(
                **event_keys(conversation),
                frame=b'{"type":"t","n":"%d"}' % index,
                maxlen=1000,
                ttl=TTL,
            )
            if knows != "nothing":
                await another_process.script_load(titled.script.script)
            pending = []
            for _ in range(3):
                index += 1
                frame = b'{"type":"p","n":"%d"}' % index
                pending.append(
                    events.append_piece(pipeliner, conversation, frame, message_id, index)
                )
                queued.append(f"p{index}")
            pending.append(pipeliner.call(titled))  # in the same batch, after the pieces
            queued.append(f"t{index - 3}")
            assert all(seq > 0 for seq in await asyncio.gather(*pending))
        logged = await redis.xrange(keys.log(conversation))
    finally:
        await pipeliner.stop()
        await another_process.aclose()
        await redis.aclose()
    seqs = [int(entry_id.split(b"-")[0]) for entry_id, _ in logged]
    assert seqs == sorted(set(seqs))
    order = [
        ("p" if b'"type":"p"' in fields[b"f"] else "t")
        + fields[b"f"].split(b'"n":"')[1][:-2].decode()
        for _, fields in logged
    ]
    assert order == queued
