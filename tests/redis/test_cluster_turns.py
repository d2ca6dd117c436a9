"""A turn on a Redis Cluster, in single-slot steps (turn_check, turn_budget, turn_rate,
say_commit / regenerate_commit, the job's XADD; finish_commit, the persist XADD, then
finish_budget), against a real six-node cluster: the same answers and guarantees as the
one-script path on a single Redis, the user's token budget included; and the turns queue's
shards, each on its own slot, read by one loop."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
import pytest_asyncio
from redis.crc import key_slot

from protocol import frames as f
from server.app.config import BudgetsSettings, RedisSettings
from server.redis import generations, keys
from server.redis.approvals import Approvals
from server.redis.budgets import Budgets
from server.redis.client import opened
from server.redis.eventlog import TAKEN_OVER, EventLog, Pipeliner
from server.redis.queue import FairQueue
from server.redis.streams import ConsumerGroup, Shards
from server.redis.turns import Accepted, Admission, Budgeting, Job, Turns
from tests.helpers.processes import RedisClusters
from tests.helpers.redis_cluster import SixNodes
from tests.helpers.scripts import MAX_EVENTS, TTL, UNLIMITED, budgeted, loaded, message, row_sha

SHARDS = 4
MIGRATION_SECONDS = 1.5
HOLD_SECONDS = 1.0


@pytest.fixture(scope="module")
def cluster_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SixNodes]:
    """A cluster of this module's own, stopped after it (six nodes gossiping would tax the
    timing-sensitive tests that follow in the fast tier)."""
    clusters = RedisClusters(tmp_path_factory.mktemp("turns-cluster"))
    try:
        nodes = clusters.backend().nodes
        assert nodes is not None
        yield nodes
    finally:
        clusters.stop()


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def cluster_redis(cluster_nodes: SixNodes) -> AsyncIterator[Any]:
    client = await opened(RedisSettings(url=cluster_nodes.url, cluster=True))
    try:
        yield client
    finally:
        await client.aclose()


@pytest_asyncio.fixture(loop_scope="session")
async def events(cluster_redis: Any) -> EventLog:
    return EventLog(cluster_redis, MAX_EVENTS, TTL)


@pytest_asyncio.fixture(loop_scope="session")
async def turns(cluster_redis: Any) -> Turns:
    return Turns(cluster_redis, MAX_EVENTS, TTL, lease=10.0, shards=SHARDS)


@pytest.fixture
def redis(cluster_redis: Any) -> Any:
    """The cluster, for the fixtures of tests/redis/conftest.py that take `redis`."""
    return cluster_redis


@pytest_asyncio.fixture(loop_scope="session")
async def pipeliner(cluster_redis: Any) -> AsyncIterator[Pipeliner]:
    """The worker's pipeliner on the cluster, through Parley's own client there."""
    pipeliner = Pipeliner(cluster_redis)
    pipeliner.start()
    yield pipeliner
    await pipeliner.stop()


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
    sha = await row_sha(turns.redis, conversation)
    return await turns.accept(event, said, job, limit, budgeting, sha), job


async def queued(redis: Any, stream: str, field: bytes) -> list[bytes]:
    return [fields[field] for _, fields in await redis.xrange(stream)]


async def persist_seqs(redis: Any, turns: Turns, conversation: uuid.UUID) -> list[bytes]:
    """The `done_seq` of each of this conversation's entries on its persist stream, which
    other tests' conversations may share (`finish_turn` queues the conversation's id as the
    turn)."""
    entries = await redis.xrange(turns.persist_key(conversation))
    mine = str(conversation).encode()
    return [fields[b"done_seq"] for _, fields in entries if fields[b"turn"] == mine]


async def free(redis: Any, conversation: uuid.UUID) -> None:
    """The generation is over (as `finish` would leave it), without a `done`."""
    pipe = redis.pipeline(transaction=False)
    generations.clear(pipe, conversation)
    await pipe.execute()


async def finish_turn(pipeliner: Pipeliner, turns: Turns, job: Job, spent: int) -> int:
    """`finish` the turn with a reply, `spent` tokens counted; the seq of its `done`."""
    reply = message("assistant", job.message_id)
    c = job.conversation
    done = f.encode(f.Done(conversation=c, message_id=job.message_id, reason="stop"))
    return await turns.finish(pipeliner, job, done, reply, str(c).encode(), spent)


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


async def test_a_copy_of_a_changed_row_is_stale_before_the_budget_or_the_rate(
    events: EventLog, turns: Turns, cluster_redis: Any
) -> None:
    """In steps as in one script: turn_check refuses a web process's copy of a row that
    changed since (`stale`) before anything is counted; the copy of the current row passes
    every step."""
    conversation = await loaded(events)
    copy = await events.stamped(conversation)
    assert copy is not None
    await events.set_meta("alice", msgspec.structs.replace(copy.cached.meta, model="another"))
    said, user = message(), "u-stale"
    await budgeted(cluster_redis, user)
    job = Job(conversation=conversation, user=user, message_id=uuid.uuid4(), model="m")
    event = f.encode(f.MessageEvent(conversation=conversation, message=said))
    stale = await turns.accept(event, said, job, 1, UNLIMITED, copy.sha)
    assert stale.admission is Admission.STALE
    assert await cluster_redis.get(keys.turn_rate(user)) is None
    assert await events.head(conversation) == 0
    now = await events.stamped(conversation)
    assert now is not None
    accepted = await turns.accept(event, said, job, 1, UNLIMITED, now.sha)
    assert accepted.admission is Admission.OK and await events.head(conversation) == 1


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
    events: EventLog, turns: Turns, cluster_redis: Any, pipeliner: Pipeliner
) -> None:
    conversation = await loaded(events)
    _, job = await say(turns, conversation, "u4", message())
    assert await finish_turn(pipeliner, turns, job, 0) == 2
    assert await finish_turn(pipeliner, turns, job, 0) == 2  # a retry
    assert await events.head(conversation) == 2
    assert not await cluster_redis.exists(keys.generation(conversation))
    seqs = await persist_seqs(cluster_redis, turns, conversation)
    assert set(seqs) == {b"2"}  # queued again by the retry: written once by the persister
    await turns.queue_finished_again(job)
    assert len(await persist_seqs(cluster_redis, turns, conversation)) == 3


async def test_a_stale_finish_after_the_takeover_finished_queues_nothing_again(
    events: EventLog, turns: Turns, cluster_redis: Any
) -> None:
    """In steps: the turn finished by worker-b (which took it over), worker-a's late
    `finish` is told TAKEN_OVER and neither queues the turn again nor settles its budget."""
    conversation = await loaded(events)
    _, job = await say(turns, conversation, "u6", message())
    pipe = cluster_redis.pipeline(transaction=False)
    generations.claim(pipe, conversation, job.message_id, "worker-b", lease=60)
    await pipe.execute()
    taking = Pipeliner(cluster_redis, worker="worker-b")
    stale = Pipeliner(cluster_redis, worker="worker-a")
    taking.start(), stale.start()
    try:
        assert await finish_turn(taking, turns, job, 0) == 2
        assert await finish_turn(stale, turns, job, 0) == TAKEN_OVER
    finally:
        await taking.stop()
        await stale.stop()
    assert await persist_seqs(cluster_redis, turns, conversation) == [b"2"]
    await turns.queue_finished_again(job)  # a takeover that found it finished
    assert await persist_seqs(cluster_redis, turns, conversation) == [
        b"2",
        b"2",
    ]


async def test_regenerate_in_steps_replaces_the_last_reply(
    events: EventLog, turns: Turns, cluster_redis: Any, pipeliner: Pipeliner
) -> None:
    conversation = await loaded(events)
    _, job = await say(turns, conversation, "u5", message())
    again = Job(conversation=conversation, user="u5", message_id=uuid.uuid4(), model="m")
    await free(cluster_redis, conversation)
    sha = await row_sha(turns.redis, conversation)
    assert (await turns.regenerate(again, 100, UNLIMITED, sha)).admission is Admission.NOTHING
    await finish_turn(pipeliner, turns, job, 0)
    accepted = await turns.regenerate(again, 100, UNLIMITED, sha)
    assert accepted.admission is Admission.OK and accepted.replaces == job.message_id
    jobs = [
        msgspec.json.decode(raw, type=Job)
        for raw in await queued(cluster_redis, turns.turns_key(conversation), b"job")
    ]
    assert any(j.message_id == again.message_id and j.replaces == job.message_id for j in jobs)


@dataclass(frozen=True, slots=True)
class BudgetedUser:
    """A new user with a token budget (which Redis does not hold until a test seeds it)."""

    name: str
    budgets: Budgets
    budgeting: Budgeting

    async def used(self) -> int:
        state = await self.budgets.read(self.name, "")
        assert state is not None
        return state.used


@pytest.fixture
def limit() -> int:
    """The `user` fixture's budget in tokens (a test parametrizes it to change it)."""
    return 10_000


@pytest.fixture
def user(cluster_redis: Any, limit: int) -> BudgetedUser:
    budgets = Budgets(cluster_redis, BudgetsSettings(default_tokens=limit))
    budgeting = budgets.budgeting("", context_tokens=1000, max_tokens=100)
    return BudgetedUser(f"b-{uuid.uuid4().hex[:8]}", budgets, budgeting)


async def queued_job(redis: Any, turns: Turns, job: Job) -> Job:
    raw = await queued(redis, turns.turns_key(job.conversation), b"job")
    jobs = [msgspec.json.decode(item, type=Job) for item in raw]
    return next(j for j in jobs if j.message_id == job.message_id)


async def test_the_budget_is_reserved_before_the_model_and_settled_once_at_finish(
    events: EventLog, turns: Turns, cluster_redis: Any, user: BudgetedUser, pipeliner: Pipeliner
) -> None:
    conversation = await loaded(events, owner=user.name)
    budgeting = user.budgeting
    refused, _ = await say_budgeted(turns, conversation, user.name, message(), 100, budgeting)
    assert refused.admission is Admission.NO_BUDGET  # rebuilt from the ledger, then again
    await user.budgets.seed(user.name, {}, None)
    accepted, job = await say_budgeted(turns, conversation, user.name, message(), 100, budgeting)
    assert accepted.admission is Admission.OK
    reserved = (await queued_job(cluster_redis, turns, job)).budget_reserved
    assert 100 < reserved < 200 and await user.used() == reserved
    queued_as = await queued_job(cluster_redis, turns, job)
    for _ in range(2):  # a retried finish settles nothing more
        assert await finish_turn(pipeliner, turns, queued_as, 42) == 2
    assert await user.used() == 42


async def test_a_settlement_waits_out_a_slot_migration_it_finds_half_done(
    events: EventLog,
    turns: Turns,
    cluster_redis: Any,
    cluster_nodes: SixNodes,
    user: BudgetedUser,
    pipeliner: Pipeliner,
) -> None:
    """The user's budget has moved to the slot's new node and its settlement marker cannot
    be made beside it until the migration ends: Redis answers TRYAGAIN until redis-py gives
    up ("TTL exhausted"). The settlement, which must not be lost, is tried again until the
    slot has its owner."""
    conversation = await loaded(events, owner=user.name)
    await user.budgets.seed(user.name, {}, None)
    _, job = await say_budgeted(turns, conversation, user.name, message(), 100, user.budgeting)
    queued_as = await queued_job(cluster_redis, turns, job)
    budget = keys.budget(user.name)
    source = cluster_nodes.owner(budget)
    target = next(n for n in cluster_nodes.primaries() if n is not source)
    slot = cluster_nodes.begin_move(budget, target)
    cluster_nodes.migrate(budget, source, target)
    try:
        finishing = asyncio.create_task(finish_turn(pipeliner, turns, queued_as, 42))
        await asyncio.sleep(MIGRATION_SECONDS)
        assert not finishing.done()
        await asyncio.to_thread(cluster_nodes.end_move, slot, target, source)
        assert await asyncio.wait_for(finishing, 15) == 2
    finally:
        await asyncio.to_thread(cluster_nodes.end_move, slot, target, source)  # (again)
    assert await user.used() == 42


@pytest_asyncio.fixture(loop_scope="session")
async def holding_briefly(cluster_redis: Any) -> Turns:
    """Turns whose reservations wait HOLD_SECONDS for their commit."""
    return Turns(cluster_redis, MAX_EVENTS, TTL, lease=10.0, shards=SHARDS, hold=HOLD_SECONDS)


async def reserve_then_die(
    turns: Turns, user: BudgetedUser, conversation: uuid.UUID
) -> tuple[Job, f.Message]:
    """What a web process does before it dies (or stalls) between the budget step and the
    commit: the turn checked, its worst case reserved, the rate counted; not committed. The
    job and the user's message."""
    said = message()
    job = Job(
        conversation=conversation,
        user=user.name,
        message_id=uuid.uuid4(),
        model="m",
        budget_bucket=user.budgeting.bucket,
    )
    said_as = msgspec.json.encode(said)
    sha = await row_sha(turns.redis, conversation)
    reserved = await turns._reserve(job, 100, user.budgeting, said_as, str(said.id), sha)
    assert isinstance(reserved, Job)
    return reserved, said


@pytest.mark.parametrize("limit", [250])
async def test_a_reservation_left_by_a_dead_web_process_is_given_back_after_its_hold(
    events: EventLog, holding_briefly: Turns, cluster_redis: Any, user: BudgetedUser
) -> None:
    turns = holding_briefly
    await user.budgets.seed(user.name, {}, None)
    abandoned, said = await reserve_then_die(turns, user, await loaded(events, owner=user.name))
    assert await user.used() == abandoned.budget_reserved
    other = await loaded(events, owner=user.name)
    refused, _ = await say_budgeted(turns, other, user.name, message(), 100, user.budgeting)
    assert refused.admission is Admission.OVER_BUDGET  # within its hold it may still commit
    await asyncio.sleep(HOLD_SECONDS + 0.2)
    accepted, job = await say_budgeted(turns, other, user.name, message(), 100, user.budgeting)
    assert accepted.admission is Admission.OK
    assert await user.used() == (await queued_job(cluster_redis, turns, job)).budget_reserved
    used = await user.used()
    c = abandoned.conversation
    sha = await row_sha(turns.redis, c)
    stalled = turns._say_inputs(
        f.encode(f.MessageEvent(conversation=c, message=said)), said, abandoned, sha
    )
    late = await turns._say_commit(**stalled, fate_key=keys.turn_fate(c, abandoned.message_id))
    assert late == [b"late"]  # the stalled web process's commit, its reservation given back
    assert await events.head(c) == 0 and await user.used() == used


@pytest.mark.parametrize("limit", [250])
async def test_a_committed_turns_reservation_outlives_its_hold_until_it_is_settled(
    events: EventLog,
    holding_briefly: Turns,
    cluster_redis: Any,
    user: BudgetedUser,
    pipeliner: Pipeliner,
) -> None:
    """Past its hold, a reservation whose turn committed (it runs, or waits for a worker) is
    kept: giving it back would let the user start turns past the limit."""
    turns = holding_briefly
    await user.budgets.seed(user.name, {}, None)
    conversation = await loaded(events, owner=user.name)
    _, job = await say_budgeted(turns, conversation, user.name, message(), 100, user.budgeting)
    running = await queued_job(cluster_redis, turns, job)
    await asyncio.sleep(HOLD_SECONDS + 0.2)
    other = await loaded(events, owner=user.name)
    for _ in range(2):  # the second finds it held, no longer overdue
        refused, _ = await say_budgeted(turns, other, user.name, message(), 100, user.budgeting)
        assert refused.admission is Admission.OVER_BUDGET
        assert await user.used() == running.budget_reserved
    await finish_turn(pipeliner, turns, running, 42)
    assert await user.used() == 42
    accepted, _ = await say_budgeted(turns, other, user.name, message(), 100, user.budgeting)
    assert accepted.admission is Admission.OK


@pytest.mark.parametrize(
    ("limit", "turn_limit", "refusal", "rate_counted"),
    [
        # over budget: refused before the rate counts the turn
        pytest.param(250, 100, Admission.OVER_BUDGET, 1, id="over-budget"),
        # over the rate: the reservation the budget step made is given back
        pytest.param(10_000, 1, Admission.RATE_LIMITED, 2, id="over-rate"),
    ],
)
async def test_a_refused_turn_keeps_no_reservation(
    events: EventLog,
    turns: Turns,
    cluster_redis: Any,
    user: BudgetedUser,
    limit: int,
    turn_limit: int,
    refusal: Admission,
    rate_counted: int,
) -> None:
    await user.budgets.seed(user.name, {}, None)
    first = await loaded(events, owner=user.name)
    said = await say(turns, first, user.name, message(), turn_limit, user.budgeting)
    assert said[0] is Admission.OK
    before = await user.used()
    second = await loaded(events)
    refused, _ = await say_budgeted(turns, second, user.name, message(), turn_limit, user.budgeting)
    assert refused.admission is refusal
    assert await user.used() == before
    if refusal is Admission.OVER_BUDGET:  # the refusal says what is spent of which limit
        assert (refused.spent, refused.limit) == (before, limit)
    assert int(await cluster_redis.get(keys.turn_rate(user.name))) == rate_counted


async def test_the_queue_shards_each_on_its_own_slot_are_read_together(
    cluster_redis: Any,
) -> None:
    """A read over shards of different slots (one XREADGROUP of them all would be CROSSSLOT):
    one pipeline of reads, at most the free slots in all; when every shard is empty, a short
    blocking read of one."""
    tag = uuid.uuid4().hex[:8]
    streams = [f"test:turns:{{{tag}:{i}}}" for i in range(SHARDS)]
    shards = Shards([ConsumerGroup(cluster_redis, s, "g", "w") for s in streams])
    await shards.ensure()
    assert await shards.read(SHARDS * 2, 1000) == []
    for stream in streams[1:3]:
        for n in range(3):
            await cluster_redis.xadd(stream, {"n": str(n)})
    taken = await shards.read(SHARDS * 2, 1000)
    assert sorted(group.stream for group, _ in taken) == sorted([*streams[1:3]] * 2)
    assert len(await shards.read(3, 1000)) <= 3


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


@pytest.fixture
def two_shared_slots() -> Iterator[None]:
    """Conversations share two hash tags (`redis.conversation_slots = 2`), for one test."""
    keys.share_slots(2)
    try:
        yield
    finally:
        keys.share_slots(0)


@pytest.mark.parametrize("tags", [6, 12, 48])
def test_shared_tags_land_evenly_on_primaries_serving_equal_runs_of_slots(tags: int) -> None:
    """`redis-cli --cluster create` gives P primaries equal runs of slots, in order: with
    `redis.conversation_slots` a multiple of P, each primary gets as many of the shared
    tags (and so of the appends), without the operator moving slots by hand."""
    keys.share_slots(tags)
    try:
        slots = [key_slot(keys.seq(uuid.UUID(int=tag)).encode()) for tag in range(tags)]
    finally:
        keys.share_slots(0)
    assert len(set(slots)) == tags
    for primaries in (2, 3):
        per_primary = [0] * primaries
        for slot in slots:
            per_primary[slot * primaries // keys.HASH_SLOTS] += 1
        assert per_primary == [tags // primaries] * primaries


def _evalsha_calls(nodes: SixNodes) -> int:
    total = 0
    for node in nodes.primaries():
        for line in node.cli("INFO", "commandstats").splitlines():
            if line.startswith("cmdstat_evalsha:"):
                total += int(line.split("calls=")[1].split(",")[0])
    return total


async def test_conversations_sharing_slots_share_the_pipeliners_script_calls(
    cluster_nodes: SixNodes, cluster_redis: Any, events: EventLog, two_shared_slots: None
) -> None:
    """With conversations on two slots, one token each of twelve conversations is appended
    in two `append_pieces` calls (one per slot), not twelve, each event in its own log."""
    made = [await loaded(events) for _ in range(12)]
    assert len({key_slot(keys.seq(c).encode()) for c in made}) <= 2
    reply = uuid.uuid4()
    async with cluster_redis.pipeline(transaction=False) as pipe:
        for conversation in made:
            generations.claim(pipe, conversation, reply, "w", 60)
        await pipe.execute()
    pipeliner = Pipeliner(cluster_redis)
    pipeliner.start()
    token = f.encode(f.Token(conversation=made[0], message_id=reply, text="hi"))
    try:
        for piece in (1, 2):  # the first loads the script on each node
            for node in cluster_nodes.primaries():
                node.cli("CONFIG", "RESETSTAT")
            seqs = await asyncio.gather(
                *(events.append_piece(pipeliner, c, token, reply, piece) for c in made)
            )
            assert seqs == [piece] * 12
    finally:
        await pipeliner.stop()
    assert _evalsha_calls(cluster_nodes) <= 2
    for conversation in made:
        assert await cluster_redis.xlen(keys.log(conversation)) == 2


async def test_joins_asked_together_are_one_script_call_per_slot(
    cluster_nodes: SixNodes, events: EventLog, two_shared_slots: None
) -> None:
    """Twenty-four joins of twelve conversations on two slots, asked at once: two `join`
    calls (one per slot), each join answered as it is alone."""
    made = [await loaded(events, last_seq=n) for n in range(12)]
    asked = [(c, after) for c in made for after in (None, 1)]
    alone = [await events.opening(c, after) for c, after in asked]  # each node learns it
    for node in cluster_nodes.primaries():
        node.cli("CONFIG", "RESETSTAT")
    together = await asyncio.gather(*(events.opening(c, after) for c, after in asked))
    assert _evalsha_calls(cluster_nodes) <= 2
    assert together == alone
    assert [o.head for o in alone[::2]] == list(range(12))


async def test_a_turn_entered_in_the_fair_queue_twice_is_entered_once(cluster_redis: Any) -> None:
    """In a cluster the fair queue's step follows the conversation's commit and is retried
    through a failover; a retry after a lost reply hands the turn over once, with the same
    answer (`enter.lua`'s mark)."""
    queue = FairQueue(cluster_redis, 2, MAX_EVENTS, TTL)
    user = f"u-{uuid.uuid4().hex[:8]}"
    async with cluster_redis.pipeline(transaction=False) as pipe:
        queue.beat(pipe, f"w-{user}", 1000, 30)
        await pipe.execute()
    job = Job(conversation=uuid.uuid4(), user=user, message_id=uuid.uuid4(), model="m")
    before = await cluster_redis.xlen(keys.TURNS)
    answers = [await queue.enter(msgspec.json.encode(job), job.message_id, user) for _ in "ab"]
    assert answers == [False, False]
    assert await cluster_redis.xlen(keys.TURNS) == before + 1
    assert await cluster_redis.get(keys.running(user)) == b"1"
    await FairQueue.leave(cluster_redis, f"w-{user}")
