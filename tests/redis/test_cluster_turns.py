"""A turn on a Redis Cluster, in single-slot steps (turn_check, turn_budget, turn_rate,
say_commit / regenerate_commit, the job's XADD; finish_commit, the persist XADD, then
finish_budget), against a real six-node cluster: the same answers and guarantees as the
one-script path on a single Redis, the user's token budget included."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
import pytest_asyncio

from protocol import frames as f
from server.app.config import BudgetsSettings
from server.redis import generations, keys
from server.redis.approvals import Approvals
from server.redis.budgets import Budgets
from server.redis.eventlog import EventLog, Pipeliner
from server.redis.turns import Accepted, Admission, Budgeting, Job, Turns
from tests.helpers.processes import RedisClusters
from tests.helpers.scripts import MAX_EVENTS, TTL, UNLIMITED, budgeted, loaded

SHARDS = 4


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def cluster_redis(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Any]:
    """A cluster of this module's own, stopped after it (six nodes gossiping would tax the
    timing-sensitive tests that follow in the fast tier)."""
    clusters = RedisClusters(tmp_path_factory.mktemp("turns-cluster"))
    client = clusters.backend().client()
    try:
        yield client
    finally:
        await client.aclose()
        clusters.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def events(cluster_redis: Any) -> EventLog:
    return EventLog(cluster_redis, MAX_EVENTS, TTL)


@pytest_asyncio.fixture(loop_scope="session")
async def turns(cluster_redis: Any) -> Turns:
    return Turns(cluster_redis, MAX_EVENTS, TTL, lease=10.0, shards=SHARDS)


def message(role: f.Role = "user", message_id: uuid.UUID | None = None) -> f.Message:
    return f.Message(
        id=message_id or uuid.uuid4(),
        role=role,
        content="hello",
        status="complete",
        created_at=datetime.now(UTC),
    )


async def say(
    turns: Turns,
    conversation: uuid.UUID,
    user: str,
    said: f.Message,
    limit: int = 100,
    budgeting: Budgeting = UNLIMITED,
) -> tuple[Admission, Job]:
    accepted, job = await say_budgeted(turns, conversation, user, said, limit, budgeting)
    return accepted.admission, job


async def say_budgeted(
    turns: Turns,
    conversation: uuid.UUID,
    user: str,
    said: f.Message,
    limit: int,
    budgeting: Budgeting,
) -> tuple[Accepted, Job]:
    if budgeting is UNLIMITED:
        await budgeted(turns.redis, user)
    job = Job(
        conversation=conversation,
        user=user,
        message_id=uuid.uuid4(),
        model="m",
        budget_bucket=budgeting.bucket,
    )
    event = f.encode(f.MessageEvent(conversation=conversation, message=said))
    return await turns.accept(event, said, job, limit, budgeting), job


async def queued(redis: Any, stream: str, field: bytes) -> list[bytes]:
    return [fields[field] for _, fields in await redis.xrange(stream)]


async def free(redis: Any, conversation: uuid.UUID) -> None:
    """The generation is over (as `finish` would leave it), without a `done`."""
    pipe = redis.pipeline(transaction=False)
    generations.clear(pipe, conversation)
    await pipe.execute()


async def test_say_appends_marks_busy_and_queues_on_the_conversations_shard(
    events: EventLog, turns: Turns, cluster_redis: Any
) -> None:
    conversation = await loaded(events, last_seq=4)
    admission, job = await say(turns, conversation, "u1", message())
    assert admission is Admission.OK
    assert await events.head(conversation) == 5
    assert await generations.message_id(cluster_redis, conversation) == str(job.message_id)
    jobs = [
        msgspec.json.decode(raw, type=Job)
        for raw in await queued(cluster_redis, turns.turns_key(conversation), b"job")
    ]
    assert [(j.message_id, j.user_seq) for j in jobs if j.conversation == conversation] == [
        (job.message_id, 5)
    ]


async def test_a_repeated_say_id_is_a_duplicate_and_costs_no_turn_of_the_rate(
    events: EventLog, turns: Turns, cluster_redis: Any
) -> None:
    conversation = await loaded(events)
    said = message()
    assert (await say(turns, conversation, "u2", said, limit=1))[0] is Admission.OK
    await free(cluster_redis, conversation)
    assert (await say(turns, conversation, "u2", said, limit=1))[0] is Admission.DUPLICATE
    assert int(await cluster_redis.get(keys.turn_rate("u2"))) == 1


async def test_a_busy_conversation_refuses_before_the_rate_counts(
    events: EventLog, turns: Turns, cluster_redis: Any
) -> None:
    conversation = await loaded(events)
    assert (await say(turns, conversation, "u3", message(), limit=2))[0] is Admission.OK
    assert (await say(turns, conversation, "u3", message(), limit=2))[0] is Admission.BUSY
    await free(cluster_redis, conversation)
    assert (await say(turns, conversation, "u3", message(), limit=2))[0] is Admission.OK
    await free(cluster_redis, conversation)
    assert (await say(turns, conversation, "u3", message(), limit=2))[0] is Admission.RATE_LIMITED


async def test_finish_appends_done_once_and_queues_the_turn_on_the_persist_shard(
    events: EventLog, turns: Turns, cluster_redis: Any
) -> None:
    conversation = await loaded(events)
    _, job = await say(turns, conversation, "u4", message())
    reply = message("assistant", job.message_id)
    pipeliner = Pipeliner(cluster_redis)
    pipeliner.start()
    try:
        done = f.encode(f.Done(conversation=conversation, message_id=job.message_id, reason="stop"))
        turn = str(reply.id).encode()
        assert await turns.finish(pipeliner, job, done, reply, turn, 0) == 2
        assert await turns.finish(pipeliner, job, done, reply, turn, 0) == 2  # a retry
    finally:
        await pipeliner.stop()
    assert await events.head(conversation) == 2
    assert not await cluster_redis.exists(keys.generation(conversation))
    seqs = await queued(cluster_redis, turns.persist_key(conversation), b"done_seq")
    assert set(seqs) == {b"2"}  # queued again by the retry: written once by the persister
    await turns.queue_finished_again(job)
    assert len(await queued(cluster_redis, turns.persist_key(conversation), b"done_seq")) == 3


async def test_regenerate_in_steps_replaces_the_last_reply(
    events: EventLog, turns: Turns, cluster_redis: Any
) -> None:
    conversation = await loaded(events)
    _, job = await say(turns, conversation, "u5", message())
    again = Job(conversation=conversation, user="u5", message_id=uuid.uuid4(), model="m")
    await free(cluster_redis, conversation)
    assert (await turns.regenerate(again, 100, UNLIMITED)).admission is Admission.NOTHING
    pipeliner = Pipeliner(cluster_redis)
    pipeliner.start()
    try:
        reply = message("assistant", job.message_id)
        done = f.encode(f.Done(conversation=conversation, message_id=job.message_id, reason="stop"))
        await turns.finish(pipeliner, job, done, reply, b"turn", 0)
    finally:
        await pipeliner.stop()
    accepted = await turns.regenerate(again, 100, UNLIMITED)
    assert accepted.admission is Admission.OK and accepted.replaces == job.message_id
    jobs = [
        msgspec.json.decode(raw, type=Job)
        for raw in await queued(cluster_redis, turns.turns_key(conversation), b"job")
    ]
    assert any(j.message_id == again.message_id and j.replaces == job.message_id for j in jobs)


def budgets_of(redis: Any, limit: int) -> Budgets:
    return Budgets(redis, BudgetsSettings(default_tokens=limit))


def budgeting_of(budgets: Budgets) -> Budgeting:
    return budgets.budgeting("", context_tokens=1000, max_tokens=100)


async def queued_job(redis: Any, turns: Turns, job: Job) -> Job:
    raw = await queued(redis, turns.turns_key(job.conversation), b"job")
    jobs = [msgspec.json.decode(item, type=Job) for item in raw]
    return next(j for j in jobs if j.message_id == job.message_id)


async def used(budgets: Budgets, user: str) -> int:
    state = await budgets.read(user, "")
    assert state is not None
    return state.used


async def test_the_budget_is_reserved_before_the_model_and_settled_once_at_finish(
    events: EventLog, turns: Turns, cluster_redis: Any
) -> None:
    budgets, user = budgets_of(cluster_redis, 10_000), f"b-{uuid.uuid4().hex[:8]}"
    conversation = await loaded(events, owner=user)
    budgeting = budgeting_of(budgets)
    refused, _ = await say_budgeted(turns, conversation, user, message(), 100, budgeting)
    assert refused.admission is Admission.NO_BUDGET  # rebuilt from the ledger, then again
    await budgets.seed(user, {}, None)
    accepted, job = await say_budgeted(turns, conversation, user, message(), 100, budgeting)
    assert accepted.admission is Admission.OK
    reserved = (await queued_job(cluster_redis, turns, job)).budget_reserved
    assert 100 < reserved < 200 and await used(budgets, user) == reserved
    pipeliner = Pipeliner(cluster_redis)
    pipeliner.start()
    try:
        queued_as = await queued_job(cluster_redis, turns, job)
        reply = message("assistant", job.message_id)
        done = f.encode(f.Done(conversation=conversation, message_id=job.message_id, reason="stop"))
        for _ in range(2):  # a retried finish settles nothing more
            assert await turns.finish(pipeliner, queued_as, done, reply, b"turn", 42) == 2
    finally:
        await pipeliner.stop()
    assert await used(budgets, user) == 42


async def test_over_budget_is_refused_before_the_rate_counts_and_reserves_nothing(
    events: EventLog, turns: Turns, cluster_redis: Any
) -> None:
    budgets, user = budgets_of(cluster_redis, 250), f"b-{uuid.uuid4().hex[:8]}"
    await budgets.seed(user, {}, None)
    budgeting = budgeting_of(budgets)
    first = await loaded(events, owner=user)
    assert (await say(turns, first, user, message(), 100, budgeting))[0] is Admission.OK
    before = await used(budgets, user)
    refused, _ = await say_budgeted(turns, await loaded(events), user, message(), 100, budgeting)
    assert refused.admission is Admission.OVER_BUDGET and refused.limit == 250
    assert await used(budgets, user) == before == refused.spent
    assert int(await cluster_redis.get(keys.turn_rate(user))) == 1


async def test_a_reservation_the_rate_refuses_is_given_back(
    events: EventLog, turns: Turns, cluster_redis: Any
) -> None:
    budgets, user = budgets_of(cluster_redis, 10_000), f"b-{uuid.uuid4().hex[:8]}"
    await budgets.seed(user, {}, None)
    budgeting = budgeting_of(budgets)
    first = await loaded(events, owner=user)
    assert (await say(turns, first, user, message(), 1, budgeting))[0] is Admission.OK
    before = await used(budgets, user)
    refused = await say(turns, await loaded(events), user, message(), 1, budgeting)
    assert refused[0] is Admission.RATE_LIMITED
    assert await used(budgets, user) == before


async def test_an_approval_on_a_cluster_appends_its_request_and_one_resolution(
    cluster_redis: Any, events: EventLog
) -> None:
    """The approval scripts take the call's key and the conversation's log in one slot, and
    publish with SPUBLISH: the request and the one winning answer are each logged once."""
    conversation, message_id = uuid.uuid4(), uuid.uuid4()
    await cluster_redis.set(keys.seq(conversation), 3, ex=60)
    store = Approvals(cluster_redis, timeout=60)
    await store.open(str(conversation), "call_1", "alice", "rm", "{}", str(message_id))
    answers = await asyncio.gather(
        store.answer(str(conversation), "call_1", "alice", "approve"),
        store.answer(str(conversation), "call_1", "alice", "deny"),
    )
    assert sorted(a.outcome for a in answers) == ["already", "settled"]
    head, entries = await events.read(conversation, 0)
    request, resolved = (f.decode_server(frame) for _, frame in entries)
    assert head == 5 and isinstance(request, f.ApprovalRequest) and request.seq == 4
    assert isinstance(resolved, f.ApprovalResolved) and resolved.seq == 5
    assert resolved.state == next(a for a in answers if a.outcome == "settled").approval.state  # type: ignore[union-attr]
