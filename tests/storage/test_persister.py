"""The persister against the real embedded Redis and PostgreSQL: a read of finished turns is
written to PostgreSQL together, then marked persisted and acknowledged in one round trip;
and against a real primary with a replica (a one-shard Redis Cluster, reached with the
cluster client and, as a single Redis, with the plain one, and a three-primary cluster whose
conversation and persist stream live on different nodes): a batch is written only once the
replicas hold it, or after the wait's timeout."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec
import pytest
import pytest_asyncio
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from protocol.frames import utcnow
from server.app import tracing
from server.app.config import RedisSettings
from server.generation.persister import Persister
from server.redis import keys
from server.redis.client import opened
from server.redis.eventlog import EventLog
from storage import conversations, db, messages
from storage.messages import FinishedTurn
from tests.helpers import redis_cluster
from tests.helpers.processes import Db, Services, redis_db
from tests.helpers.redis_cluster import Node, SixNodes
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


def next_turn(finished: FinishedTurn) -> FinishedTurn:
    """The turn after `finished` in its conversation (its `done` four seqs on)."""
    return FinishedTurn(
        conversation=finished.conversation,
        user_message=message("user"),
        user_seq=finished.done_seq + 1,
        reply=message("assistant"),
        replaces=None,
        finished_at=utcnow(),
        done_seq=finished.done_seq + 4,
    )


def entry(finished: FinishedTurn) -> dict[str, bytes | int]:
    """`finished` as a persist stream entry."""
    return {"turn": msgspec.json.encode(finished), "done_seq": finished.done_seq}


async def queued(redis: Redis, finished: FinishedTurn) -> None:
    """A finished turn on the persist stream as `finish` leaves it, its events in the log."""
    c = finished.conversation
    await redis.set(keys.seq(c), finished.done_seq)
    await redis.set(keys.persisted(c), 0)
    await redis.set(keys.history(c), b"a transcript copy")
    for seq in range(1, finished.done_seq + 1):
        await redis.xadd(keys.log(c), {"e": b"x"}, id=f"{seq}-0")
    await redis.xadd(keys.persist(0), entry(finished))  # type: ignore[arg-type]


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


async def test_a_read_of_several_conversations_is_written_in_one_transaction(
    pool: asyncpg.Pool, redis: Redis, persister: Persister
) -> None:
    """Two turns in each of three conversations and one entry delivered twice: one
    connection, one transaction, a statement per kind of row, not seven statements a turn."""
    firsts = [await finished_turn(pool) for _ in range(3)]
    seconds = [next_turn(first) for first in firsts]
    for first in firsts:
        await queued(redis, first)
    for second in [*seconds, seconds[0]]:
        await redis.xadd(keys.persist(0), entry(second))  # type: ignore[arg-type]
    before = db.QUERIES.sent
    await persist_one_batch(persister)
    assert db.QUERIES.sent - before <= 12  # at most 8, and asyncpg's look at the array types
    assert await redis.xlen(keys.persist(0)) == 0
    assert (await redis.xpending(keys.persist(0), keys.PERSISTERS))["pending"] == 0
    assert await marked(redis, seconds)
    for first, second in zip(firsts, seconds, strict=True):
        saved = await messages.history(pool, first.conversation)
        assert [m.id for m in saved] == [
            m.id for t in (first, second) for m in (t.user_message, t.reply) if m is not None
        ]


async def test_a_turn_postgresql_cannot_take_is_dead_lettered_and_the_rest_of_its_read_written(
    pool: asyncpg.Pool, redis: Redis, persister: Persister
) -> None:
    kept = [await finished_turn(pool) for _ in range(2)]
    await queued(redis, kept[0])
    poisoned = next_turn(kept[0])  # a seq no bigint holds: the batch fails, then this turn alone
    await redis.xadd(keys.persist(0), {**entry(poisoned), "done_seq": str(10**20)})
    await queued(redis, kept[1])
    await persist_one_batch(persister)
    assert await marked(redis, kept)
    for finished in kept:
        assert len(await messages.history(pool, finished.conversation)) == 2
    assert await redis.xlen(keys.persist(0)) == 0
    [(_, letter)] = await redis.xrange(keys.DEADLETTER)
    assert b"int64" in letter[b"error"] and letter[b"attempts"] == b"3"


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> InMemorySpanExporter:
    """Tracing on in this process, its spans kept in memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "_tracer", provider.get_tracer("parley"))
    return exporter


async def test_a_batch_postgresql_refuses_leaves_one_clean_span_per_turn_written_alone(
    pool: asyncpg.Pool, redis: Redis, persister: Persister, spans: InMemorySpanExporter
) -> None:
    """The refused batch marks no turn's span; each turn then written alone has one span,
    its own, and only the bad turn's spans show its error."""
    traced = f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"
    kept = [
        msgspec.structs.replace(await finished_turn(pool), traceparent=traced) for _ in range(2)
    ]
    poisoned = msgspec.structs.replace(next_turn(kept[0]), traceparent=traced)
    await queued(redis, kept[0])
    await redis.xadd(keys.persist(0), {**entry(poisoned), "done_seq": str(10**20)})
    await queued(redis, kept[1])
    await persist_one_batch(persister)
    assert await marked(redis, kept)
    by_message: dict[str, list[ReadableSpan]] = {}
    for span in spans.get_finished_spans():
        assert span.name == "persist turn" and span.attributes is not None
        by_message.setdefault(str(span.attributes["parley.message.id"]), []).append(span)
    for finished in kept:
        [span] = by_message[str(finished.reply_id)]
        assert span.status.status_code != StatusCode.ERROR
    bad = by_message[str(poisoned.reply_id)]
    assert len(bad) == 3 and all(s.status.status_code == StatusCode.ERROR for s in bad)


def persister_retries() -> list[float]:
    """The persister's PostgreSQL errors and retries counted so far."""
    return [
        REGISTRY.get_sample_value(name, {"component": "persister"}) or 0.0
        for name in ("parley_postgres_errors_total", "parley_retries_total")
    ]


async def test_a_batch_whose_connection_drops_is_written_again_together_and_counted(
    pool: asyncpg.Pool, redis: Redis, persister: Persister, caplog: pytest.LogCaptureFixture
) -> None:
    """A transient failure (here the batch's connection ended by the server while it waits
    for a conversation's lock) is retried as a batch, counted, not written turn by turn."""
    turns = [await finished_turn(pool) for _ in range(2)]
    for finished in turns:
        await queued(redis, finished)
    counted = persister_retries()
    async with asyncio.timeout(20), pool.acquire() as holder:
        async with holder.transaction():
            await holder.execute(
                "SELECT 1 FROM conversations WHERE id = $1 FOR UPDATE", turns[0].conversation
            )
            writing = asyncio.create_task(persist_one_batch(persister))
            while not await pool.fetchval(  # out of the transaction, for a fresh view
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            ):
                await asyncio.sleep(0.02)
        await writing
    assert await marked(redis, turns)
    for finished in turns:
        assert len(await messages.history(pool, finished.conversation)) == 2
    assert all(now > then for now, then in zip(persister_retries(), counted, strict=True))
    assert "one by one" not in caplog.text


async def test_an_entry_that_does_not_decode_at_all_is_dead_lettered_and_its_read_written(
    pool: asyncpg.Pool, redis: Redis, persister: Persister
) -> None:
    """Whatever stops an entry decoding (here no fields, as XAUTOCLAIM may give for an entry
    deleted meanwhile) sends it to the dead letters, never out of the shard's loop."""
    kept = await finished_turn(pool)
    await queued(redis, kept)
    await redis.xadd(keys.persist(0), entry(await finished_turn(pool)))  # type: ignore[arg-type]
    group = persister.groups[0]
    (kept_id, kept_fields), (gone_id, _) = await group.read(10, 100)
    await persister._persist_all(group, [(kept_id, kept_fields), (gone_id, None)])  # type: ignore[list-item]
    assert await marked(redis, [kept])
    assert len(await messages.history(pool, kept.conversation)) == 2
    assert await redis.xlen(keys.persist(0)) == 0
    assert (await redis.xpending(keys.persist(0), keys.PERSISTERS))["pending"] == 0
    [(_, letter)] = await redis.xrange(keys.DEADLETTER)
    assert letter[b"entry"] == gone_id and b"TypeError" in letter[b"error"]


async def test_no_wait_is_sent_where_redis_has_no_replica(pool: asyncpg.Pool, redis: Redis) -> None:
    persister = Persister(redis, pool, EventLog(redis, MAX_EVENTS, TTL), name="p", wait_ms=500)
    await persister.groups[0].ensure()
    finished = await finished_turn(pool)
    await queued(redis, finished)
    waits = await calls(redis, "wait")
    await persist_one_batch(persister)
    assert len(await messages.history(pool, finished.conversation)) == 2
    assert await calls(redis, "wait") == waits


WAIT_MS = 700
"""The persister's wait in the tests with a replica: shorter than the cluster's node timeout
(2 s), so a paused replica is never marked failing."""


@pytest.fixture(scope="module")
def primary_and_replica(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SixNodes]:
    nodes = redis_cluster.start_one_shard(tmp_path_factory.mktemp("replicated"), replicas=1)
    try:
        yield nodes
    finally:
        nodes.stop()


@contextlib.contextmanager
def paused(node: Node) -> Iterator[None]:
    """The node stopped (SIGSTOP by its PID), continued on leaving."""
    node.proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        node.proc.send_signal(signal.SIGCONT)


def replica_of(nodes: SixNodes) -> Node:
    primary = nodes.primaries()[0]
    return next(node for node in nodes.nodes if node is not primary)


@dataclass
class Replicated:
    persister: Any
    """The persister's client of the primary."""
    worker: Any
    """Another client of the primary, queueing the finished turns as a worker would."""
    replica: Node


@pytest_asyncio.fixture(params=["redis", "redis-cluster"])
async def replicated(
    request: pytest.FixtureRequest, primary_and_replica: SixNodes
) -> AsyncIterator[Replicated]:
    """Clients of the primary — the plain one (as of a single Redis with a replica; the
    one shard serves every slot) or the cluster client — and the replica."""
    primary = primary_and_replica.primaries()[0]
    settings = RedisSettings(
        url=f"redis://{primary.address}", cluster=request.param == "redis-cluster"
    )
    persister, worker = await opened(settings), await opened(settings)
    try:
        await worker.delete(keys.persist(0))
        yield Replicated(persister, worker, replica_of(primary_and_replica))
    finally:
        await persister.aclose()
        await worker.aclose()


async def replicated_persister(pool: asyncpg.Pool, client: Any) -> Persister:
    persister = Persister(
        client, pool, EventLog(client, MAX_EVENTS, TTL), name="p", wait_ms=WAIT_MS
    )
    await persister.groups[0].ensure()
    return persister


def unreplicated() -> float:
    return REGISTRY.get_sample_value("parley_persist_unreplicated_total") or 0.0


async def written_after(pool: asyncpg.Pool, finished: FinishedTurn, seconds: float) -> bool:
    """Whether PostgreSQL holds the turn within `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await messages.history(pool, finished.conversation):
            return True
        await asyncio.sleep(0.02)
    return False


async def written_after_the_wait(
    pool: asyncpg.Pool, persister: Persister, finished: FinishedTurn, replica: Node
) -> None:
    """With `replica` paused, one batch holding `finished` is written only once the wait
    timed out, and counted as unreplicated."""
    before = unreplicated()
    with paused(replica):
        started = time.monotonic()
        task = asyncio.create_task(persist_one_batch(persister))
        assert not await written_after(pool, finished, WAIT_MS / 1000 * 0.6)
        async with asyncio.timeout(10):
            await task
    assert time.monotonic() - started >= WAIT_MS / 1000
    assert len(await messages.history(pool, finished.conversation)) == 2
    assert unreplicated() == before + 1


async def test_a_wait_on_a_connection_that_wrote_nothing_proves_nothing(
    primary_and_replica: SixNodes,
) -> None:
    """Why the persister's WAIT follows a write of its own on its connection."""
    primary = primary_and_replica.primaries()[0]
    async with (
        Redis.from_url(f"redis://{primary.address}") as redis,
        redis.client() as writer,
        redis.client() as idle,
    ):
        await idle.ping()
        with paused(replica_of(primary_and_replica)):
            await writer.set("{wait}probe", "x")
            started = time.monotonic()
            assert await idle.execute_command("WAIT", 1, 1500) == 1  # at once, and wrong
            assert time.monotonic() - started < 0.75
            assert await writer.execute_command("WAIT", 1, 300) == 0


async def test_a_batch_waits_for_a_paused_replica_then_is_written_and_counted(
    pool: asyncpg.Pool, replicated: Replicated
) -> None:
    persister = await replicated_persister(pool, replicated.persister)
    finished = await finished_turn(pool)
    await queued(replicated.worker, finished)
    await written_after_the_wait(pool, persister, finished, replicated.replica)
    assert await replicated.worker.xlen(keys.persist(0)) == 0


async def test_a_batch_is_written_once_the_replica_resumes(
    pool: asyncpg.Pool, replicated: Replicated
) -> None:
    persister = await replicated_persister(pool, replicated.persister)
    persister.replication.timeout_ms = 10_000
    finished = await finished_turn(pool)
    await queued(replicated.worker, finished)
    before = unreplicated()
    with paused(replicated.replica):
        task = asyncio.create_task(persist_one_batch(persister))
        assert not await written_after(pool, finished, 0.4)
    assert await written_after(pool, finished, 5.0)  # the replica caught up: no timeout
    async with asyncio.timeout(5):
        await task
    assert unreplicated() == before


@pytest.fixture(scope="module")
def three_shards(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SixNodes]:
    nodes = redis_cluster.start(tmp_path_factory.mktemp("three-shards"))
    try:
        yield nodes
    finally:
        nodes.stop()


def replica_serving(nodes: SixNodes, primary: Node) -> Node:
    """The node that replicates `primary` (its ROLE names the primary's port)."""
    for node in nodes.nodes:
        role = node.cli("ROLE").split()
        if role[0] == "slave" and int(role[2]) == primary.port:
            return node
    raise AssertionError(f"no replica of {primary.address}")


def row_away_from(nodes: SixNodes, key: str) -> Any:
    """A conversation row whose keys another primary than `key`'s serves."""
    away = nodes.owner(key).port
    for _ in range(50):
        meta = conversation_row()
        if nodes.owner(keys.replica_probe(meta.id)).port != away:
            return meta
    raise AssertionError("every conversation landed on one primary")


async def test_on_a_cluster_a_batch_waits_for_the_replica_of_its_conversations_node(
    pool: asyncpg.Pool, three_shards: SixNodes
) -> None:
    """The turn's events are on its conversation's node, not the persist stream's: with that
    node's replica paused, the batch waits (the stream's replica alone would let it pass)."""
    meta = row_away_from(three_shards, keys.persist(0))
    await conversations.insert(pool, "alice", meta)
    finished = await finished_turn(pool, meta.id)
    settings = RedisSettings(url=three_shards.url, cluster=True)
    client, worker = await opened(settings), await opened(settings)
    try:
        await worker.delete(keys.persist(0))
        persister = await replicated_persister(pool, client)
        await queued(worker, finished)
        replica = replica_serving(three_shards, three_shards.owner(keys.replica_probe(meta.id)))
        await written_after_the_wait(pool, persister, finished, replica)
    finally:
        await client.aclose()
        await worker.aclose()
