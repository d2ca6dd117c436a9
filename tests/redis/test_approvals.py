"""Pending approvals in the real embedded Redis: the settle script against the rules of
protocol/approvals.py, answers racing, expiry, reading them from another client, and the
`approval_request` / `approval_resolved` events the scripts append to the conversation."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid

from redis.asyncio import Redis

from protocol import approvals as rules
from protocol import frames as f
from server.redis import keys
from server.redis.approvals import Approvals
from server.redis.eventlog import EventLog

MESSAGE = str(uuid.uuid4())


def ids() -> tuple[str, str]:
    return str(uuid.uuid4()), f"call_{uuid.uuid4().hex[:8]}"


async def opened(store: Approvals, owner: str = "alice") -> tuple[str, str]:
    conversation, call_id = ids()
    await store.open(conversation, call_id, owner, "delete_file", '{"path": "x"}', MESSAGE)
    return conversation, call_id


async def test_the_owners_first_answer_wins_and_later_ones_learn_it(redis: Redis) -> None:
    store = Approvals(redis, timeout=60)
    conversation, call_id = await opened(store)
    pending = await store.get(conversation, call_id)
    assert pending is not None and pending.state == "pending" and pending.tool == "delete_file"
    first = await store.answer(conversation, call_id, "alice", "deny", "not that one")
    assert first.outcome == "settled" and first.approval is not None
    assert (first.approval.state, first.approval.by, first.approval.reason) == (
        "denied",
        "alice",
        "not that one",
    )
    later = await store.answer(conversation, call_id, "alice", "approve")
    assert later.outcome == "already" and later.approval is not None
    assert later.approval.state == "denied"


async def test_only_the_owner_and_only_known_calls(redis: Redis) -> None:
    store = Approvals(redis, timeout=60)
    conversation, call_id = await opened(store)
    assert (await store.answer(conversation, call_id, "mallory", "approve")).outcome == "forbidden"
    assert (await store.answer(conversation, "call_nope", "alice", "approve")).outcome == "unknown"
    still = await store.get(conversation, call_id)
    assert still is not None and still.state == "pending"


async def test_two_tabs_answering_at_the_same_instant_exactly_one_wins(
    redis: Redis, second_redis: Redis
) -> None:
    a, b = Approvals(redis, timeout=60), Approvals(second_redis, timeout=60)
    for _ in range(30):
        conversation, call_id = await opened(a)
        approve, deny = await asyncio.gather(
            a.answer(conversation, call_id, "alice", "approve"),
            b.answer(conversation, call_id, "alice", "deny"),
        )
        assert sorted([approve.outcome, deny.outcome]) == ["already", "settled"]
        winner = approve if approve.outcome == "settled" else deny
        assert winner.approval is not None
        assert approve.approval is not None and deny.approval is not None
        assert approve.approval.state == deny.approval.state == winner.approval.state


async def test_expiry_counts_as_no_and_opening_again_keeps_the_first_expiry(
    redis: Redis,
) -> None:
    store = Approvals(redis, timeout=0.3, retain=60)
    conversation, call_id = await opened(store)
    first = await store.get(conversation, call_id)
    assert first is not None
    assert (await store.expire(conversation, call_id)).outcome == "pending"
    await asyncio.sleep(0.1)
    again = await store.open(conversation, call_id, "alice", "delete_file", "{}", MESSAGE)
    assert again == first.expires_at  # a resumed worker does not restart the clock
    await asyncio.sleep(0.3)
    late = await store.answer(conversation, call_id, "alice", "approve")
    assert late.outcome == "already" and late.approval is not None
    assert late.approval.state == "expired"
    assert rules.model_result(late.approval) is not None
    ttl_ms = await redis.pttl(keys.approval(conversation, call_id))
    assert 55_000 < ttl_ms <= 60_000


async def test_wait_returns_the_answer_from_another_client_or_the_expiry(
    redis: Redis, second_redis: Redis
) -> None:
    other = second_redis
    store = Approvals(redis, timeout=30)
    conversation, call_id = await opened(store)
    waiting = asyncio.create_task(store.wait(conversation, call_id))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    answered_at = time.monotonic()
    await Approvals(other, timeout=30).answer(conversation, call_id, "alice", "approve")
    approval = await asyncio.wait_for(waiting, 5)
    assert approval is not None and approval.state == "approved"
    assert time.monotonic() - answered_at < 0.8
    short = Approvals(redis, timeout=0.4)
    conversation, call_id = await opened(short)
    started = time.monotonic()
    expired = await asyncio.wait_for(short.wait(conversation, call_id), 5)
    assert expired is not None and expired.state == "expired"
    assert 0.35 < time.monotonic() - started < 1.5
    assert await short.wait(conversation, "call_nope") is None


async def test_the_script_follows_the_pure_rules_for_every_answer_sequence(redis: Redis) -> None:
    store = Approvals(redis, timeout=60)
    answers = [("alice", "approve"), ("alice", "deny"), ("mallory", "approve")]
    for sequence in itertools.product(answers, repeat=3):
        conversation, call_id = await opened(store)
        model = await store.get(conversation, call_id)
        for user, decision in sequence:
            stored = await store.answer(conversation, call_id, user, decision)  # type: ignore[arg-type]
            expected = rules.answer(model, user, decision, now=time.time())  # type: ignore[arg-type]
            assert stored.outcome == expected.outcome, sequence
            model = expected.approval
            assert stored.approval is not None and model is not None
            assert stored.approval.state == model.state, sequence


async def events_of(redis: Redis, conversation: str) -> list[f.ServerFrame]:
    _, entries = await EventLog(redis, 100, 60).read(uuid.UUID(conversation), 0)
    return [f.decode_server(frame) for _, frame in entries]


async def test_the_request_and_the_resolution_are_each_appended_once(redis: Redis) -> None:
    store = Approvals(redis, timeout=60)
    conversation, call_id = ids()
    await redis.set(keys.seq(conversation), 7, ex=60)  # a loaded conversation, at seq 7
    expires_at = await store.open(conversation, call_id, "alice", "rm", '{"p": 1}', MESSAGE)
    assert await store.open(conversation, call_id, "alice", "rm", '{"p": 1}', MESSAGE) == expires_at
    await asyncio.gather(
        store.answer(conversation, call_id, "alice", "deny", "no"),
        store.answer(conversation, call_id, "alice", "approve"),
        store.answer(conversation, call_id, "mallory", "approve"),
    )
    request, resolved = await events_of(redis, conversation)
    assert isinstance(request, f.ApprovalRequest) and request.seq == 8
    assert (request.call_id, request.tool, request.arguments) == (call_id, "rm", '{"p": 1}')
    assert str(request.message_id) == MESSAGE and request.expires_at == expires_at
    assert abs(expires_at - 60 - time.time()) < 5  # Redis's clock, in Unix seconds
    assert isinstance(resolved, f.ApprovalResolved) and resolved.seq == 9
    settled = await store.get(conversation, call_id)
    assert settled is not None and resolved.state == settled.state and resolved.by == "alice"


async def test_an_expiry_found_by_a_late_answer_is_appended_once(redis: Redis) -> None:
    store = Approvals(redis, timeout=0.2)
    conversation, call_id = ids()
    await redis.set(keys.seq(conversation), 1, ex=60)
    await store.open(conversation, call_id, "alice", "rm", "{}", MESSAGE)
    await asyncio.sleep(0.3)
    late = await store.answer(conversation, call_id, "alice", "approve")
    assert (await store.expire(conversation, call_id)).outcome == "already"
    assert late.outcome == "already"
    _, resolved = await events_of(redis, conversation)
    assert isinstance(resolved, f.ApprovalResolved)
    assert (resolved.state, resolved.by, resolved.seq) == ("expired", None, 3)


async def test_no_event_without_the_conversations_seq(redis: Redis) -> None:
    """A conversation whose Redis state is gone gets no event at seq 1 (which would restart
    its numbering); the record is kept and answered all the same."""
    store = Approvals(redis, timeout=60)
    conversation, call_id = await opened(store)
    assert (await store.answer(conversation, call_id, "alice", "approve")).outcome == "settled"
    assert await redis.get(keys.seq(conversation)) is None
    assert await events_of(redis, conversation) == []


async def test_a_wake_ends_the_wait_at_once_however_long_it_has_waited(
    redis: Redis, second_redis: Redis
) -> None:
    """Past the first second the record is read only every 0.5 s; the worker's wake (the
    `approval_resolved` it hears on the conversation's channel) does not wait for that."""
    store = Approvals(redis, timeout=30)
    conversation, call_id = await opened(store)
    wake = asyncio.Event()
    waiting = asyncio.create_task(store.wait(conversation, call_id, wake))
    await asyncio.sleep(1.5)
    await Approvals(second_redis, timeout=30).answer(conversation, call_id, "alice", "deny")
    answered = time.monotonic()
    wake.set()
    denied = await asyncio.wait_for(waiting, 5)
    assert denied is not None and denied.state == "denied"
    assert time.monotonic() - answered < 0.1
