"""Token budgets in the say/regenerate/finish scripts against the real Redis, with a clock
the test moves: reservation, refusal, settlement, a rebuilt budget and window rollover."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import msgspec
from redis.asyncio import Redis

from protocol import frames as f
from server.app.config import BudgetsSettings
from server.redis import keys
from server.redis.budgets import Budgets
from server.redis.eventlog import EventLog
from server.redis.turns import Accepted, Admission, Job, Turns
from tests.helpers.scripts import MAX_EVENTS, TTL, loaded, row_sha

MAX_TOKENS = 100
START = datetime(2026, 3, 10, 23, 30, tzinfo=UTC)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def said() -> f.Message:
    return f.Message(
        id=uuid.uuid4(), role="user", content="hi", status="complete", created_at=START
    )


def new_user() -> str:
    return f"budget-{uuid.uuid4().hex[:8]}"


async def say(turns: Turns, budgets: Budgets, events: EventLog, user: str) -> tuple[Accepted, Job]:
    conversation = await loaded(events, owner=user)
    message = said()
    job = Job(
        conversation=conversation,
        user=user,
        message_id=uuid.uuid4(),
        model="m",
        budget_bucket=budgets.bucket(),
    )
    event = f.encode(f.MessageEvent(conversation=conversation, message=message))
    budgeting = budgets.budgeting("", context_tokens=1000, max_tokens=MAX_TOKENS)
    sha = await row_sha(turns.redis, conversation)
    return await turns.accept(event, message, job, 100, budgeting, sha), job


async def queued(redis: Redis, job: Job) -> Job:
    for _, fields in await redis.xrange(keys.TURNS):
        queued_job = msgspec.json.decode(fields[b"job"], type=Job)
        if queued_job.message_id == job.message_id:
            return queued_job
    raise AssertionError("job not queued")


async def finish(turns: Turns, job: Job, spent: int) -> None:
    done = f.Done(conversation=job.conversation, message_id=job.message_id, reason="stop")
    reply = f.Message(
        id=job.message_id, role="assistant", content="x", status="complete", created_at=START
    )
    assert await turns.finish_call(job, f.encode(done), reply, b"turn", spent).run() > 0


def budgets_for(redis: Redis, limit: int, clock: Clock, window: str = "day") -> Budgets:
    settings = BudgetsSettings(default_tokens=limit, window=window)  # type: ignore[arg-type]
    return Budgets(redis, settings, clock)


async def test_a_turn_reserves_its_worst_case_and_finish_settles_what_it_spent(
    redis: Redis, events: EventLog
) -> None:
    turns, user = Turns(redis, MAX_EVENTS, TTL, lease=10.0), new_user()
    budgets = budgets_for(redis, 10_000, Clock(START))
    first, job = await say(turns, budgets, events, user)
    assert first.admission is Admission.NO_BUDGET  # nothing in Redis: rebuild from the ledger
    await budgets.seed(user, {}, None)
    accepted, job = await say(turns, budgets, events, user)
    assert accepted.admission is Admission.OK
    reserved = (await queued(redis, job)).budget_reserved
    assert MAX_TOKENS < reserved < MAX_TOKENS + 100
    state = await budgets.read(user, "")
    assert state is not None and state.used == reserved
    await finish(turns, await queued(redis, job), spent=42)
    state = await budgets.read(user, "")
    assert state is not None and state.used == 42 and state.remaining == 10_000 - 42


async def test_a_turn_past_the_limit_is_refused_and_reserves_nothing(
    redis: Redis, events: EventLog
) -> None:
    turns, user = Turns(redis, MAX_EVENTS, TTL, lease=10.0), new_user()
    budgets = budgets_for(redis, 250, Clock(START))
    await budgets.seed(user, {}, None)
    assert (await say(turns, budgets, events, user))[0].admission is Admission.OK
    refused, _ = await say(turns, budgets, events, user)
    assert refused.admission is Admission.OVER_BUDGET and refused.limit == 250
    state = await budgets.read(user, "")
    assert state is not None and state.used == refused.spent < 250


async def test_the_window_rolls_over_at_midnight_and_the_old_bucket_stops_counting(
    redis: Redis, events: EventLog
) -> None:
    turns, user, clock = Turns(redis, MAX_EVENTS, TTL, lease=10.0), new_user(), Clock(START)
    budgets = budgets_for(redis, 250, clock)
    await budgets.seed(user, {}, None)
    accepted, job = await say(turns, budgets, events, user)
    assert accepted.admission is Admission.OK
    assert (await say(turns, budgets, events, user))[0].admission is Admission.OVER_BUDGET
    state = await budgets.read(user, "")
    assert state is not None and state.resets_at == datetime(2026, 3, 11, tzinfo=UTC)
    clock.now = START + timedelta(minutes=31)  # 00:01 the next day
    assert (await say(turns, budgets, events, user))[0].admission is Admission.OK
    await finish(turns, await queued(redis, job), spent=10)  # settles in yesterday's bucket
    state = await budgets.read(user, "")
    assert state is not None and MAX_TOKENS < state.used < 250  # only today's reservation


async def test_a_rolling_window_frees_spending_an_hour_at_a_time(
    redis: Redis, events: EventLog
) -> None:
    turns, user, clock = Turns(redis, MAX_EVENTS, TTL, lease=10.0), new_user(), Clock(START)
    budgets = budgets_for(redis, 250, clock, window="rolling24h")
    await budgets.seed(user, {}, None)
    assert (await say(turns, budgets, events, user))[0].admission is Admission.OK
    clock.now = START + timedelta(hours=23)  # the first hour still counts
    assert (await say(turns, budgets, events, user))[0].admission is Admission.OVER_BUDGET
    state = await budgets.read(user, "")
    assert state is not None and state.resets_at == datetime(2026, 3, 11, 23, tzinfo=UTC)
    clock.now = START + timedelta(hours=24)
    assert (await say(turns, budgets, events, user))[0].admission is Admission.OK


async def test_a_budget_rebuilt_after_the_reservation_takes_the_whole_spending(
    redis: Redis, events: EventLog
) -> None:
    turns, user = Turns(redis, MAX_EVENTS, TTL, lease=10.0), new_user()
    budgets = budgets_for(redis, 10_000, Clock(START))
    await budgets.seed(user, {}, None)
    _, job = await say(turns, budgets, events, user)
    await redis.delete(keys.budget(user))  # Redis lost it
    await budgets.seed(user, {budgets.bucket(): 500}, None)  # what the ledger held
    await finish(turns, await queued(redis, job), spent=42)
    state = await budgets.read(user, "")
    assert state is not None and state.used == 542


async def test_the_users_own_limit_wins_over_the_groups(redis: Redis, events: EventLog) -> None:
    turns, user = Turns(redis, MAX_EVENTS, TTL, lease=10.0), new_user()
    budgets = budgets_for(redis, 10_000, Clock(START))
    await budgets.seed(user, {}, own_limit=50)
    refused, _ = await say(turns, budgets, events, user)
    assert refused.admission is Admission.OVER_BUDGET and refused.limit == 50
    await budgets.set_limit(user, None)
    assert (await say(turns, budgets, events, user))[0].admission is Admission.OK


async def test_the_warning_comes_once_per_window(redis: Redis, events: EventLog) -> None:
    turns, user, clock = Turns(redis, MAX_EVENTS, TTL, lease=10.0), new_user(), Clock(START)
    budgets = budgets_for(redis, 1000, clock)
    await budgets.seed(user, {budgets.bucket(): 700}, None)
    assert await budgets.warning(user, "") is None  # 70% < 80%
    await budgets.seed(user, {}, None)  # already there: seeds nothing
    assert (await say(turns, budgets, events, user))[0].admission is Admission.OK
    reached = await budgets.warning(user, "")
    assert reached is not None and reached[0] >= 800 and reached[1] == 1000
    assert await budgets.warning(user, "") is None
    clock.now = START + timedelta(days=1)
    await redis.hset(keys.budget(user), f"b:{budgets.bucket()}", 900)  # type: ignore[misc]
    assert await budgets.warning(user, "") is not None  # a new window warns again
