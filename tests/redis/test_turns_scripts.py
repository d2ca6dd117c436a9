"""say, regenerate and finish against the real Redis."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import msgspec
import pytest_asyncio
from redis.asyncio import Redis

from protocol import frames as f
from server.redis import generations, keys
from server.redis.eventlog import TAKEN_OVER, UNLOADED, EventLog
from server.redis.scripts import Call
from server.redis.turns import Admission, Job, Turns
from tests.helpers.scripts import MAX_EVENTS, TTL, UNLIMITED, budgeted, loaded, message, row_sha

LIMIT = 100


@pytest_asyncio.fixture(loop_scope="session")
async def turns(redis: Redis) -> Turns:
    return Turns(redis, MAX_EVENTS, TTL, lease=10.0)


def new_user() -> str:
    return f"user-{uuid.uuid4().hex[:8]}"


async def say(
    turns: Turns,
    conversation: uuid.UUID,
    user: str,
    said: f.Message | None = None,
    limit: int = LIMIT,
) -> tuple[Admission, int, Job]:
    said = said or message()
    await budgeted(turns.redis, user)
    job = Job(conversation=conversation, user=user, message_id=uuid.uuid4(), model="m")
    event = f.encode(f.MessageEvent(conversation=conversation, message=said))
    sha = await row_sha(turns.redis, conversation)
    accepted = await turns.accept(event, said, job, limit, UNLIMITED, sha)
    return accepted.admission, accepted.seq, job


async def queued_job(redis: Redis, job: Job) -> Job:
    entries = await redis.xrange(keys.TURNS)
    jobs = [msgspec.json.decode(fields[b"job"], type=Job) for _, fields in entries]
    return next(j for j in jobs if j.message_id == job.message_id)


async def test_say_appends_the_message_marks_busy_and_queues_the_job(
    events: EventLog, turns: Turns, redis: Redis
) -> None:
    conversation = await loaded(events, last_seq=4)
    outcome, seq, job = await say(turns, conversation, new_user())
    assert (outcome, seq) == (Admission.OK, 5)
    _, logged = await events.read(conversation, after=0)
    assert [s for s, _ in logged] == [5] and logged[0][1].startswith(b'{"seq":5,"type":"message"')
    assert (await queued_job(redis, job)).user_seq == 5
    assert await generations.message_id(redis, conversation) == str(job.message_id)
    recent = await events.recent(conversation)
    assert recent is not None and len(recent) == 1


async def test_say_with_an_id_already_seen_is_a_duplicate(
    events: EventLog, turns: Turns, redis: Redis
) -> None:
    conversation = await loaded(events)
    user, said = new_user(), message()
    assert (await say(turns, conversation, user, said))[0] is Admission.OK
    pipe = redis.pipeline(transaction=False)
    generations.clear(pipe, conversation)  # the turn finished
    await pipe.execute()
    assert (await say(turns, conversation, user, said))[0] is Admission.DUPLICATE
    assert await events.head(conversation) == 1


async def test_say_while_generating_is_busy(events: EventLog, turns: Turns) -> None:
    conversation = await loaded(events)
    user = new_user()
    assert (await say(turns, conversation, user))[0] is Admission.OK
    assert (await say(turns, conversation, user))[0] is Admission.BUSY
    assert await events.head(conversation) == 1


async def test_say_over_the_turn_rate_is_refused_with_the_wait(
    events: EventLog, turns: Turns
) -> None:
    user = new_user()
    first, second = await loaded(events), await loaded(events)
    assert (await say(turns, first, user, limit=1))[0] is Admission.OK
    said = message()
    job = Job(conversation=second, user=user, message_id=uuid.uuid4(), model="m")
    event = f.encode(f.MessageEvent(conversation=second, message=said))
    sha = await row_sha(turns.redis, second)
    refused = await turns.accept(event, said, job, 1, UNLIMITED, sha)
    assert refused.admission is Admission.RATE_LIMITED and 1 <= refused.retry_after <= 61
    assert await events.head(second) == 0


async def test_say_in_an_unloaded_conversation_asks_for_a_load(turns: Turns) -> None:
    assert (await say(turns, uuid.uuid4(), new_user()))[0] is Admission.UNLOADED


def finish(turns: Turns, job: Job, reply: f.Message) -> Call:
    """The finish call of `job`; the queued turn is the reply's id, to find it again."""
    done = f.Done(conversation=job.conversation, message_id=job.message_id, reason="stop")
    return turns.finish_call(job, f.encode(done), reply, str(reply.id).encode(), 0)


async def test_finish_appends_done_once_queues_the_turn_and_clears_busy(
    events: EventLog, turns: Turns, redis: Redis
) -> None:
    conversation = await loaded(events)
    _, _, job = await say(turns, conversation, new_user())
    reply = message("assistant", job.message_id)
    call = finish(turns, job, reply)
    assert await call.run() == 2
    assert await call.run() == 2  # a retry appends nothing
    assert await events.head(conversation) == 2
    assert not await redis.exists(keys.generation(conversation))
    queued = await redis.xrange(keys.PERSIST)
    assert [
        fields[b"done_seq"] for _, fields in queued if fields[b"turn"] == str(reply.id).encode()
    ] == [b"2"]
    recent = await events.recent(conversation)
    assert recent is not None and [m.id for m in recent][-1] == job.message_id


async def taken_over(
    events: EventLog, turns: Turns, redis: Redis
) -> tuple[uuid.UUID, Callable[[str], Call]]:
    """A turn said by worker-a's user and taken over by worker-b; each worker's finish."""
    conversation = await loaded(events)
    _, _, job = await say(turns, conversation, new_user())
    pipe = redis.pipeline(transaction=False)
    generations.claim(pipe, conversation, job.message_id, "worker-b", lease=60)
    await pipe.execute()
    reply = message("assistant", job.message_id)
    done = f.encode(f.Done(conversation=conversation, message_id=job.message_id, reason="stop"))
    return conversation, lambda worker: turns.finish_call(
        job, done, reply, b"turn", 0, worker=worker
    )


async def test_finish_by_a_worker_whose_generation_was_taken_over_appends_nothing(
    events: EventLog, turns: Turns, redis: Redis
) -> None:
    conversation, finish_by = await taken_over(events, turns, redis)
    stale = finish_by("worker-a")
    assert await stale.run() == TAKEN_OVER
    assert await events.head(conversation) == 1  # the user's message only
    assert await generations.worker(redis, conversation) == "worker-b"
    assert await finish_by("worker-b").run() == 2


async def test_a_stale_finish_after_the_takeover_finished_is_taken_over_not_a_retry(
    events: EventLog, turns: Turns, redis: Redis
) -> None:
    """worker-b took the turn over and finished it; worker-a's `finish`, sent before it
    froze, arrives after: it is told TAKEN_OVER (not the seq of worker-b's `done`, as a
    retry of its own would be), and worker-b's retry still gets its seq."""
    conversation, finish_by = await taken_over(events, turns, redis)
    ours = finish_by("worker-b")
    assert await ours.run() == 2
    assert await finish_by("worker-a").run() == TAKEN_OVER
    assert await ours.run() == 2
    assert await events.head(conversation) == 2


async def test_finish_of_an_unloaded_conversation_appends_nothing(
    turns: Turns, redis: Redis
) -> None:
    conversation = uuid.uuid4()
    job = Job(conversation=conversation, user="u", message_id=uuid.uuid4(), model="m")
    assert await finish(turns, job, message("assistant", job.message_id)).run() == UNLOADED
    assert not await redis.exists(keys.seq(conversation))


async def test_regenerate_replaces_the_last_reply(
    events: EventLog, turns: Turns, redis: Redis
) -> None:
    conversation = await loaded(events)
    user = new_user()
    _, _, job = await say(turns, conversation, user)
    nothing = Job(conversation=conversation, user=user, message_id=uuid.uuid4(), model="m")
    pipe = redis.pipeline(transaction=False)
    generations.clear(pipe, conversation)
    await pipe.execute()
    assert (
        await turns.regenerate(nothing, LIMIT, UNLIMITED, await row_sha(redis, conversation))
    ).admission is Admission.NOTHING  # last is user's

    reply = message("assistant", job.message_id)
    await finish(turns, job, reply).run()
    again = Job(conversation=conversation, user=user, message_id=uuid.uuid4(), model="m")
    sha = await row_sha(redis, conversation)
    accepted = await turns.regenerate(again, LIMIT, UNLIMITED, sha)
    assert accepted.admission is Admission.OK and accepted.replaces == job.message_id
    assert (await queued_job(redis, again)).replaces == job.message_id
    assert (await turns.regenerate(again, LIMIT, UNLIMITED, sha)).admission is Admission.BUSY

    second = message("assistant", again.message_id)
    replaced = Job(
        conversation=conversation,
        user=user,
        message_id=again.message_id,
        model="m",
        replaces=job.message_id,
    )
    await finish(turns, replaced, second).run()
    recent = await events.recent(conversation)
    assert recent is not None and [m.id for m in recent][-1] == again.message_id
    assert job.message_id not in [m.id for m in recent]


async def test_say_goes_ahead_only_on_the_row_redis_holds(
    events: EventLog, turns: Turns, redis: Redis
) -> None:
    """A web process's copy of the row proves itself by its SHA-1: a copy of another row (the
    row changed since, or another user's bytes) is `stale` and changes nothing, not even the
    user's turn rate; the copy of Redis's row is accepted."""
    conversation = await loaded(events, owner="alice")
    stamped = await events.stamped(conversation)
    assert stamped is not None
    row = stamped.cached.meta
    await events.set_meta("alice", msgspec.structs.replace(row, model="other-model"))
    user, said = new_user(), message()
    await budgeted(redis, user)
    job = Job(conversation=conversation, user=user, message_id=uuid.uuid4(), model="m")
    event = f.encode(f.MessageEvent(conversation=conversation, message=said))
    stale = await turns.accept(event, said, job, 1, UNLIMITED, stamped.sha)
    assert stale.admission is Admission.STALE
    assert await events.head(conversation) == 0 and await redis.get(keys.turn_rate(user)) is None
    assert await generations.message_id(redis, conversation) is None
    now = await events.stamped(conversation)
    assert now is not None and now.sha != stamped.sha
    assert (await turns.accept(event, said, job, 1, UNLIMITED, now.sha)).admission is Admission.OK


async def test_a_turn_on_a_forgotten_conversation_is_unloaded_whatever_the_copy(
    events: EventLog, turns: Turns
) -> None:
    """A deleted conversation's row is gone from Redis: the copy cannot prove it; `say` and
    `regenerate` answer `unloaded` (the web process then asks PostgreSQL, which has no row)."""
    conversation = await loaded(events)
    stamped = await events.stamped(conversation)
    assert stamped is not None
    await events.forget(conversation)
    said, user = message(), new_user()
    job = Job(conversation=conversation, user=user, message_id=uuid.uuid4(), model="m")
    event = f.encode(f.MessageEvent(conversation=conversation, message=said))
    said_then = await turns.accept(event, said, job, LIMIT, UNLIMITED, stamped.sha)
    again = await turns.regenerate(job, LIMIT, UNLIMITED, stamped.sha)
    assert (said_then.admission, again.admission) == (Admission.UNLOADED, Admission.UNLOADED)
    assert await generations.message_id(turns.redis, conversation) is None
