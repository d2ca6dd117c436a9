"""The fair queue's scripts against the real Redis: turns wait per user, are handed to the
turns Stream round-robin within the workers' capacity and the per-user cap, and their tabs
are told their positions."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import msgspec
import pytest
import pytest_asyncio
from redis.asyncio import Redis

from protocol import frames as f
from server.redis import keys
from server.redis.eventlog import EventLog
from server.redis.queue import FairQueue
from server.redis.turns import Admission, Job, Turns
from tests.helpers.scripts import MAX_EVENTS, TTL, UNLIMITED, budgeted, loaded, row_sha

PER_USER = 2
GROUP = "workers"


@pytest_asyncio.fixture(loop_scope="session")
async def turns(redis: Redis) -> AsyncIterator[Turns]:
    await redis.delete(keys.TURNS, keys.QUEUE_RING, keys.QUEUE_TOLD, keys.SLOTS)
    await redis.xgroup_create(keys.TURNS, GROUP, id="0", mkstream=True)
    queue = FairQueue(redis, PER_USER, MAX_EVENTS, TTL)
    yield Turns(redis, MAX_EVENTS, TTL, lease=10.0, queue=queue)
    await redis.delete(keys.TURNS, keys.QUEUE_RING, keys.QUEUE_TOLD, keys.SLOTS)


async def say(
    turns: Turns, events: EventLog, user: str, conversation: uuid.UUID | None = None
) -> Job:
    if conversation is None:
        conversation = await loaded(events, user)
        await budgeted(turns.redis, user)
    said = f.Message(
        id=uuid.uuid4(), role="user", content="hi", status="complete", created_at=datetime.now(UTC)
    )
    job = Job(conversation=conversation, user=user, message_id=uuid.uuid4(), model="m")
    event = f.encode(f.MessageEvent(conversation=conversation, message=said))
    sha = await row_sha(turns.redis, conversation)
    accepted = await turns.accept(event, said, job, 100, UNLIMITED, sha)
    assert accepted.admission is Admission.OK
    return job


async def running_users(redis: Redis) -> list[str]:
    return [fields[b"user"].decode() for _, fields in await redis.xrange(keys.TURNS)]


async def slots(turns: Turns, n: int) -> None:
    pipe = turns.redis.pipeline(transaction=False)
    turns.queue.beat(pipe, "w1", n, 30)
    await pipe.execute()


async def told(events: EventLog, job: Job) -> list[int]:
    _, logged = await events.read(job.conversation, 0)
    frames = [msgspec.json.decode(frame) for _, frame in logged]
    return [fr["position"] for fr in frames if fr["type"] == "queued"]


def users() -> tuple[str, str]:
    tag = uuid.uuid4().hex[:6]
    return f"a-{tag}", f"b-{tag}"


async def test_without_capacity_turns_wait_and_are_told_their_places(
    turns: Turns, events: EventLog
) -> None:
    a, b = users()
    a_jobs = [await say(turns, events, a) for _ in range(3)]
    b_job = await say(turns, events, b)
    assert await turns.redis.xlen(keys.TURNS) == 0
    assert [await told(events, job) for job in a_jobs] == [[0], [1], [2]]
    assert await told(events, b_job) == [1]  # entered behind a's first, ahead of its others


async def test_a_redis_that_forgot_its_scripts_still_tells_waiting_turns_their_places(
    turns: Turns, events: EventLog
) -> None:
    a, _ = users()
    first = await say(turns, events, a)
    await turns.redis.script_flush()  # as after a restart of Redis
    second = await say(turns, events, a)
    assert [await told(events, job) for job in (first, second)] == [[0], [1]]


async def test_slots_go_round_robin_and_a_user_never_runs_more_than_the_cap(
    turns: Turns, events: EventLog
) -> None:
    a, b = users()
    for _ in range(6):
        await say(turns, events, a)
    await say(turns, events, b)
    await slots(turns, 4)
    await turns.queue.dispatch()
    assert await running_users(turns.redis) == [a, b, a]  # a's third waits for the cap


async def test_released_slots_alternate_between_the_waiting_users(
    turns: Turns, events: EventLog
) -> None:
    a, b = users()
    await slots(turns, 1)
    for _ in range(3):
        await say(turns, events, a)
    await say(turns, events, b)
    started = []
    for _ in range(3):
        ((entry_id, fields),) = await turns.redis.xrange(keys.TURNS)
        started.append(fields[b"user"].decode())
        assert await turns.queue.release(keys.TURNS, GROUP, entry_id, started[-1], buried=False)
        await turns.queue.dispatch()
    assert started == [a, a, b]  # b waited behind a's second turn only, not a's third
    assert await running_users(turns.redis) == [a]
    assert int(await turns.redis.get(keys.running(b)) or 0) == 0


async def test_a_cancelled_waiting_turn_leaves_the_queue_for_the_workers(
    turns: Turns, events: EventLog
) -> None:
    a, _ = users()
    jobs = [await say(turns, events, a) for _ in range(2)]
    await turns.cancel(jobs[1].conversation, a)
    assert await turns.redis.lrange(keys.queue(a), 0, -1) == [
        await turns.redis.lindex(keys.queue(a), 0)
    ]
    assert await running_users(turns.redis) == [a]
    assert (
        await turns.redis.get(keys.cancelled(jobs[1].conversation))
        == str(jobs[1].message_id).encode()
    )


SHARDS = 4


@pytest_asyncio.fixture(loop_scope="session")
async def sharded(redis: Redis) -> AsyncIterator[Turns]:
    streams = [keys.turns(shard) for shard in range(SHARDS)]
    await redis.delete(*streams, keys.QUEUE_RING, keys.QUEUE_TOLD, keys.SLOTS)
    queue = FairQueue(redis, 0, MAX_EVENTS, TTL, shards=SHARDS)
    yield Turns(redis, MAX_EVENTS, TTL, lease=10.0, shards=SHARDS, queue=queue)
    await redis.delete(*streams, keys.QUEUE_RING, keys.QUEUE_TOLD, keys.SLOTS)


async def test_dispatch_puts_each_turn_on_its_conversations_shard_within_the_capacity(
    sharded: Turns, events: EventLog
) -> None:
    a, b = users()
    jobs = [await say(sharded, events, user) for user in (a, b) * 6]
    await slots(sharded, 8)
    started = set(await sharded.queue.dispatch())
    assert len(started) == 8  # the capacity counts the turns on every shard
    for job in jobs:
        stream = keys.turns(keys.shard_of(job.conversation, SHARDS))
        on_stream = {
            msgspec.json.decode(fields[b"job"])["message_id"]
            for _, fields in await sharded.redis.xrange(stream)
        }
        assert (str(job.message_id) in on_stream) == (str(job.message_id) in started)


@pytest.mark.counts_commands
async def test_with_a_free_slot_and_nobody_waiting_say_starts_the_turn_in_its_one_call(
    turns: Turns, events: EventLog
) -> None:
    a, b = users()
    await slots(turns, 2)
    await say(turns, events, b)  # the script is loaded: no NOSCRIPT retry counted below
    conversation = await loaded(events, a)
    await budgeted(turns.redis, a)
    await turns.redis.config_resetstat()
    job = await say(turns, events, a, conversation)
    stats = await turns.redis.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 1  # say, and no dispatch script after it
    assert await running_users(turns.redis) == [b, a]
    assert await turns.redis.get(keys.running(a)) == b"1"
    assert await turns.redis.llen(keys.queue(a)) == 0
    assert not await turns.redis.hexists(keys.QUEUE_TOLD, str(job.message_id))
    assert await told(events, job) == []


async def test_a_full_house_or_a_user_at_the_cap_still_waits(
    turns: Turns, events: EventLog
) -> None:
    a, b = users()
    await slots(turns, 3)
    await say(turns, events, a)
    await say(turns, events, a)
    capped = await say(turns, events, a)  # a runs PER_USER already
    assert await told(events, capped) == [0]
    other = await say(turns, events, b)  # b is below the cap, but a waits: b queues behind
    assert await running_users(turns.redis) == [a, a, b]  # ... and the dispatch starts it
    assert await told(events, other) == []
    full = await say(turns, events, b)  # three slots, three running
    assert await told(events, full) == [1]
    assert await turns.redis.llen(keys.queue(b)) == 1


async def test_the_turn_next_in_line_hears_position_0_at_once(
    turns: Turns, events: EventLog
) -> None:
    a, _ = users()
    first, second = await say(turns, events, a), await say(turns, events, a)
    assert await told(events, second) == [1]
    await slots(turns, 1)
    assert await turns.queue.dispatch() == [str(first.message_id)]
    await turns.queue.announce()  # within the second after `1`: 0 is not held back
    assert await told(events, second) == [1, 0]


async def test_serve_tells_places_as_they_stand_after_its_hand_over(
    turns: Turns, events: EventLog
) -> None:
    a, b = users()
    a_first, b_first, a_second = (
        await say(turns, events, a),
        await say(turns, events, b),
        await say(turns, events, a),
    )
    assert [await told(events, job) for job in (a_first, b_first, a_second)] == [[0], [1], [2]]
    await slots(turns, 1)
    assert await turns.queue.serve() == [str(a_first.message_id)]
    assert await told(events, b_first) == [1, 0]  # next now, and told at once
    assert await told(events, a_second) == [2]  # 1 now, but told 2 less than a second ago
