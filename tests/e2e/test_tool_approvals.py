"""Tool calls a person approves, end to end: two web processes and two workers, the simulated
model and a real HTTP tool receiver on 127.0.0.1. The turn waits at the call until a tab of
the user answers (or the call expires); every tab sees the request and the one outcome; a
reloaded tab, another web process and another worker (the first one killed) all pick the
waiting call up where it is; the tool runs once, after the approval, and never after a
denial. The stored reply says how each approval ended. The approval from another tab and the
worker killed while waiting run on a single Redis and on a Redis Cluster."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec
import pytest

from protocol import frames as f
from protocol.parts import parts_of
from server.dev import embedded
from server.dev.client import Client, ProtocolError
from server.redis.approvals import POLL_MAX
from tests.helpers.approvals import (
    PATH,
    TOOL,
    answer_deleted,
    approval_config,
    bad_delete_call,
    delete_call,
)
from tests.helpers.conversations import folded, start_conversation, wait_persisted
from tests.helpers.processes import (
    BACKENDS,
    Cluster,
    Db,
    ParleyProcess,
    RedisBackend,
    clusters_for,
    model_stats,
    redis_db,
    start_all,
    stop_together,
    worker_of,
)
from tests.helpers.receiver import Receiver

pytestmark = pytest.mark.e2e

EXPIRY = 1.5
SHUTDOWN_DEADLINE = 25.0
"""`worker.shutdown_deadline`'s default: how long a stopping worker lets a turn run."""


@dataclass
class Approving:
    webs: list[ParleyProcess]
    workers: list[ParleyProcess]
    model: ParleyProcess
    receiver: Receiver
    backend: RedisBackend


def env_for(
    cluster: Cluster, db: int, receiver: Receiver, model: ParleyProcess, timeout: float = 600.0
) -> dict[str, str]:
    return {
        "REDIS_URL": redis_db(cluster.services.redis_url, db),
        "OPENAI_BASE_URL": f"{model.url}/v1",
        "OPENAI_API_KEY": "sim",
        "PARLEY_CONFIG": str(approval_config(cluster.tmp, receiver, timeout)),
        "PARLEY_WORKER_LEASE_SECONDS": "2",
    }


@pytest.fixture(scope="module")
def approving(cluster: Cluster) -> Iterator[Approving]:
    receiver = Receiver(embedded.free_port())
    receiver.start()
    model = cluster.model()
    env = env_for(cluster, Db.APPROVALS, receiver, model)
    webs = [cluster.process("web", start=False, **env) for _ in range(2)]
    workers = [cluster.process("worker", start=False, **env) for _ in range(2)]
    start_all([model, *webs, *workers])
    try:
        yield Approving(webs, workers, model, receiver, RedisBackend(env["REDIS_URL"]))
    finally:
        stop_together([*webs, *workers, model])
        receiver.stop()


@pytest.fixture(scope="module", params=BACKENDS)
def on_each_backend(
    request: pytest.FixtureRequest, cluster: Cluster, approving: Approving
) -> Iterator[Approving]:
    """`approving` on the single Redis; on a Redis Cluster, 2 web + 2 worker processes of
    their own (the same model and tool receiver)."""
    clusters = clusters_for(request)
    if clusters is None:
        yield approving
        return
    backend = clusters.backend()
    env = {
        **env_for(cluster, Db.APPROVALS, approving.receiver, approving.model),
        **backend.env(),
    }
    webs = [cluster.process("web", start=False, **env) for _ in range(2)]
    workers = [cluster.process("worker", start=False, **env) for _ in range(2)]
    start_all([*webs, *workers])
    try:
        yield Approving(webs, workers, approving.model, approving.receiver, backend)
    finally:
        stop_together([*webs, *workers])


@pytest.fixture
def receiver(approving: Approving) -> Receiver:
    approving.receiver.reset()
    approving.receiver.answers[PATH] = answer_deleted
    return approving.receiver


async def two_tabs(
    connect: Any, user: str, webs: list[ParleyProcess]
) -> tuple[Client, Client, uuid.UUID]:
    """Tab a on the first web process (it creates the conversation), tab b on the second."""
    a: Client = await connect(user, server=webs[0])
    conversation = await start_conversation(a)
    b: Client = await connect(user, server=webs[-1])
    await b.request(f.Join(conversation=conversation))
    return a, b, conversation


async def asked(a: Client, b: Client, conversation: uuid.UUID, text: str) -> f.ApprovalRequest:
    """Say `text`; the approval request, once both tabs have it."""
    await a.request(f.Say(conversation=conversation, text=text))
    requests = [
        await tab.wait_for(lambda fr: isinstance(fr, f.ApprovalRequest), timeout=20)
        for tab in (a, b)
    ]
    assert requests[0] == requests[1]
    return requests[0]


async def waiting_on_a_new_file(
    connect: Any, user: str, approving: Approving
) -> tuple[Client, Client, uuid.UUID, str, f.ApprovalRequest]:
    """Two tabs of a new conversation whose turn waits to delete a file named only there:
    the tabs, the conversation, the turn's text (to find its model calls) and the request."""
    a, b, conversation = await two_tabs(connect, user, approving.webs)
    text = delete_call(f"/tmp/{uuid.uuid4().hex}")
    return a, b, conversation, text, await asked(a, b, conversation, text)


def of_type(client: Client, conversation: uuid.UUID, kind: type) -> list[Any]:
    return [e for e in client.events(conversation) if isinstance(e, kind)]


async def finished(tab: Client, conversation: uuid.UUID, timeout: float = 30) -> f.Done:
    done: f.Done = await tab.wait_for(
        lambda fr: isinstance(fr, f.Done) and fr.conversation == conversation, timeout=timeout
    )
    return done


async def reply_of(db: asyncpg.Pool, reader: Client, conversation: uuid.UUID) -> f.Message:
    """The reply as PostgreSQL holds it (through a fresh join's history). Redis learns that
    the turn is persisted just after PostgreSQL has it: until then a join's history is the
    transcript before the turn, and the turn comes as events."""
    await wait_persisted(db, conversation, 2)
    deadline = time.monotonic() + 10
    while True:
        joined = await reader.request(f.Join(conversation=conversation))
        assert joined.history is not None
        if len(joined.history) >= 2 or time.monotonic() > deadline:
            return joined.history[-1]
        await asyncio.sleep(0.1)


def assert_tabs_match(reply: f.Message, *tabs: Client) -> None:
    stored = msgspec.json.encode(parts_of(reply))
    for tab in tabs:
        assert msgspec.json.encode(folded(tab, reply.id)) == stored


def result_of(reply: f.Message) -> f.Part:
    (result,) = [p for p in reply.parts or [] if p.kind == "tool_result"]
    return result


def model_calls(stats: dict[str, Any], text: str) -> int:
    """How many of the simulator's recent requests were for the turn that said `text`."""
    return sum(
        1
        for messages in stats["recent_messages"]
        if any(m["role"] == "user" and m.get("content") == text for m in messages)
    )


async def test_approved_from_the_second_tab_while_the_first_reloads(
    connect: Any, user: str, db: asyncpg.Pool, on_each_backend: Approving, receiver: Receiver
) -> None:
    approving = on_each_backend
    a, b, conversation = await two_tabs(connect, user, approving.webs)
    request = await asked(a, b, conversation, delete_call("/tmp/reloaded"))
    assert (request.tool, request.arguments) == (TOOL, '{"path": "/tmp/reloaded"}')
    await asyncio.sleep(2)  # long enough for the worker to read the record only every 0.5 s
    assert receiver.of(PATH) == [] and not of_type(b, conversation, f.Done)  # suspended
    await a.close()  # the first tab reloads: closed, answered elsewhere, opened again
    ack = await b.request(f.Approve(conversation=conversation, call_id=request.call_id))
    answered = time.monotonic()
    assert (ack.approval.first, ack.approval.state) == (True, "approved")
    await b.wait_for(lambda fr: isinstance(fr, f.PartStart) and fr.kind == "tool_result")
    resumed = time.monotonic() - answered
    print(f"approve -> the tool's result on the tab: {resumed * 1000:.0f} ms")
    assert resumed < POLL_MAX  # woken by the resolution it publishes, not by reading again
    again: Client = await connect(user, server=approving.webs[0])
    joined = await again.request(f.Join(conversation=conversation))
    assert joined.history is not None
    done = await finished(again, conversation)
    assert done.reason == "stop"
    for tab in (again, b):
        assert [r.call_id for r in of_type(tab, conversation, f.ApprovalRequest)] == [
            request.call_id
        ]
        resolved = of_type(tab, conversation, f.ApprovalResolved)
        assert [(r.state, r.by) for r in resolved] == [("approved", user)]
    assert [body["arguments"] for body in receiver.of(PATH)] == [{"path": "/tmp/reloaded"}]
    reply = await reply_of(db, again, conversation)
    assert result_of(reply).status == "ok" and f"{TOOL} answered" in reply.content
    assert result_of(reply).approval == f.ToolApproval(state="approved", by=user)
    assert_tabs_match(reply, b)


async def test_a_worker_killed_while_waiting_another_resumes_at_the_call(
    connect: Any, user: str, db: asyncpg.Pool, on_each_backend: Approving, receiver: Receiver
) -> None:
    approving = on_each_backend
    a, b, conversation, text, request = await waiting_on_a_new_file(connect, user, approving)
    redis = approving.backend.client()
    try:
        pid = await worker_of(redis, conversation)
    finally:
        await redis.aclose()
    (victim,) = [w for w in approving.workers if w.proc is not None and w.pid == pid]
    victim.kill()
    try:
        await asyncio.sleep(3)  # past the lease (2 s): the other worker has taken the turn
        ack = await a.request(f.Approve(conversation=conversation, call_id=request.call_id))
        assert ack.approval.first
        done = await finished(b, conversation)
        assert done.reason == "stop"
    finally:
        victim.start()
    assert len(receiver.of(PATH)) == 1  # the tool ran once
    # the survivor resumed at the waiting call: the model was called for the first step
    # (by the worker killed) and once more with the result, never again for the first step
    assert model_calls(await model_stats(approving.model), text) == 2
    for tab in (a, b):
        assert len(of_type(tab, conversation, f.ApprovalRequest)) == 1
        assert len(of_type(tab, conversation, f.ApprovalResolved)) == 1
        assert len(of_type(tab, conversation, f.Start)) == 2  # the takeover's start
    reply = await reply_of(db, b, conversation)
    assert result_of(reply).status == "ok"
    assert result_of(reply).approval == f.ToolApproval(state="approved", by=user)
    assert_tabs_match(reply, a, b)


async def test_a_denial_is_the_result_the_model_reads_and_the_tool_never_runs(
    connect: Any, user: str, db: asyncpg.Pool, approving: Approving, receiver: Receiver
) -> None:
    a, b, conversation = await two_tabs(connect, user, approving.webs)
    request = await asked(a, b, conversation, delete_call("/etc/passwd"))
    stranger: Client = await connect(server=approving.webs[1])
    with pytest.raises(ProtocolError) as strange:
        await stranger.request(f.Approve(conversation=conversation, call_id=request.call_id))
    assert strange.value.error.code == "not_found"
    with pytest.raises(ProtocolError) as unknown:
        await b.request(f.Approve(conversation=conversation, call_id="call_unknown"))
    assert unknown.value.error.code == "not_found"
    reason = "not that file"
    ack = await b.request(f.Deny(conversation=conversation, call_id=request.call_id, reason=reason))
    assert (ack.approval.state, ack.approval.reason) == ("denied", reason)
    assert (await finished(a, conversation)).reason == "stop"
    assert receiver.of(PATH) == []
    reply = await reply_of(db, b, conversation)
    result = result_of(reply)
    assert result.status == "error" and reason in result.text and "denied" in result.text
    assert f"{TOOL} answered: {result.text}" in reply.content  # the model read the denial
    assert result.approval == f.ToolApproval(state="denied", by=user, reason=reason)
    assert_tabs_match(reply, a, b)


async def test_two_tabs_approving_and_denying_at_once_get_one_outcome(
    connect: Any, user: str, db: asyncpg.Pool, approving: Approving, receiver: Receiver
) -> None:
    a, b, conversation = await two_tabs(connect, user, approving.webs)
    request = await asked(a, b, conversation, delete_call("/tmp/raced"))
    call = request.call_id
    yes, no = await asyncio.gather(
        a.request(f.Approve(conversation=conversation, call_id=call)),
        b.request(f.Deny(conversation=conversation, call_id=call)),
    )
    assert sorted([yes.approval.first, no.approval.first]) == [False, True]
    won = yes.approval.state
    assert no.approval.state == won
    await finished(a, conversation)
    await finished(b, conversation)
    for tab in (a, b):
        assert [r.state for r in of_type(tab, conversation, f.ApprovalResolved)] == [won]
    assert len(receiver.of(PATH)) == (1 if won == "approved" else 0)
    reply = await reply_of(db, a, conversation)
    assert result_of(reply).status == ("ok" if won == "approved" else "error")
    assert_tabs_match(reply, a, b)


async def test_an_unanswered_call_expires_as_denied(
    cluster: Cluster,
    connect: Any,
    user: str,
    db: asyncpg.Pool,
    approving: Approving,
    receiver: Receiver,
) -> None:
    server = cluster.process(
        "serve",
        start=False,
        **env_for(cluster, Db.APPROVALS_EXPIRY, receiver, approving.model, timeout=EXPIRY),
    )
    start_all([server])
    try:
        a, b, conversation = await two_tabs(connect, user, [server])
        request = await asked(a, b, conversation, delete_call("/tmp/late"))
        resolved = await a.wait_for(
            lambda fr: isinstance(fr, f.ApprovalResolved), timeout=EXPIRY + 10
        )
        assert (resolved.state, resolved.by) == ("expired", None)
        assert resolved.seq > request.seq
        assert (await finished(b, conversation)).reason == "stop"
        late = await a.request(f.Approve(conversation=conversation, call_id=request.call_id))
        assert (late.approval.first, late.approval.state) == (False, "expired")
        assert receiver.of(PATH) == []
        reply = await reply_of(db, b, conversation)
        assert "did not approve" in result_of(reply).text
        assert result_of(reply).approval == f.ToolApproval(state="expired")
        assert len(of_type(a, conversation, f.ApprovalResolved)) == 1
    finally:
        stop_together([server])


async def test_a_call_waiting_through_a_restart_of_everything_is_answered_after(
    connect: Any, user: str, db: asyncpg.Pool, approving: Approving, receiver: Receiver
) -> None:
    _, _, conversation, text, request = await waiting_on_a_new_file(connect, user, approving)
    began = time.monotonic()
    await asyncio.to_thread(stop_together, approving.workers)
    # a turn waiting for a person is handed back at once, not held to the shutdown deadline
    assert time.monotonic() - began < SHUTDOWN_DEADLINE / 2
    assert "handing back a turn waiting for approval" in approving.workers[0].log() + (
        approving.workers[1].log()
    )
    await asyncio.to_thread(stop_together, approving.webs)
    await asyncio.to_thread(start_all, [*approving.webs, *approving.workers])
    again: Client = await connect(user, server=approving.webs[1])
    await again.request(f.Join(conversation=conversation))
    waiting = await again.wait_for(lambda fr: isinstance(fr, f.ApprovalRequest))
    assert waiting.call_id == request.call_id
    ack = await again.request(f.Approve(conversation=conversation, call_id=request.call_id))
    assert ack.approval.first
    assert (await finished(again, conversation)).reason == "stop"
    assert len(receiver.of(PATH)) == 1
    assert model_calls(await model_stats(approving.model), text) == 2
    assert len(of_type(again, conversation, f.ApprovalRequest)) == 1
    reply = await reply_of(db, again, conversation)
    assert result_of(reply).status == "ok"


async def test_a_cancel_ends_a_turn_waiting_for_a_person_at_once(
    connect: Any, user: str, db: asyncpg.Pool, approving: Approving, receiver: Receiver
) -> None:
    a, b, conversation, _, request = await waiting_on_a_new_file(connect, user, approving)
    began = time.monotonic()
    await b.request(f.Cancel(conversation=conversation))
    done = await finished(a, conversation, timeout=10)
    assert done.reason == "cancelled" and time.monotonic() - began < 5
    for tab in (a, b):
        resolved = await tab.wait_for(lambda fr: isinstance(fr, f.ApprovalResolved))
        assert (resolved.call_id, resolved.state, resolved.by) == (
            request.call_id,
            "cancelled",
            None,
        )
    late = await a.request(f.Approve(conversation=conversation, call_id=request.call_id))
    assert (late.approval.first, late.approval.state) == (False, "cancelled")
    reply = await reply_of(db, a, conversation)
    assert (result_of(reply).call_id, result_of(reply).status) == (request.call_id, "cancelled")
    assert result_of(reply).approval == f.ToolApproval(state="cancelled")
    assert receiver.of(PATH) == []
    assert_tabs_match(reply, a, b)


async def test_arguments_that_miss_the_schema_fail_without_asking_anyone(
    connect: Any, user: str, db: asyncpg.Pool, approving: Approving, receiver: Receiver
) -> None:
    a, b, conversation = await two_tabs(connect, user, approving.webs)
    await a.request(f.Say(conversation=conversation, text=bad_delete_call()))
    assert (await finished(b, conversation)).reason == "stop"
    for tab in (a, b):
        assert of_type(tab, conversation, f.ApprovalRequest) == []
    reply = await reply_of(db, a, conversation)
    result = result_of(reply)
    assert result.status == "error" and "schema" in result.text and result.approval is None
    assert f"{TOOL} answered: {result.text}" in reply.content  # the model read what is wrong
    assert receiver.of(PATH) == []
    assert_tabs_match(reply, a, b)
