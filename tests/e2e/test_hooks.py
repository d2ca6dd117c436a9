"""The host application's hooks against a real receiver on 127.0.0.1 and real Parley processes
(each on its own Redis DB), driven by the websockets client."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import msgspec
import pytest
from redis.asyncio import Redis

from protocol import frames as f
from server.dev import embedded
from server.dev.client import Client
from server.redis import keys
from tests.helpers.auth import mint, new_user
from tests.helpers.conversations import (
    assert_contiguous,
    say_and_finish,
    start_conversation,
    wait_persisted,
)
from tests.helpers.processes import BACKENDS, Cluster, Db, ParleyProcess, clusters_for, redis_db
from tests.helpers.receiver import SECRET, Answer, Receiver, Slowly


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver(embedded.free_port())
    r.start()
    yield r
    r.stop()


@pytest.fixture(scope="module", params=BACKENDS)
def hooked(
    request: pytest.FixtureRequest, cluster: Cluster, receiver: Receiver
) -> Iterator[ParleyProcess]:
    """`parley serve` calling the hooks, on a database of the session's Redis and on a Redis
    Cluster of its own (where a refused turn's `finish` is a cluster's steps)."""
    clusters = clusters_for(request)
    redis = {"REDIS_URL": redis_db(cluster.services.redis_url, Db.HOOKS)}
    server = cluster.process(
        "serve",
        **(redis if clusters is None else clusters.backend().env()),
        PARLEY_HOOKS_CONNECT_URL=receiver.url("/connect"),
        PARLEY_HOOKS_TURN_URL=receiver.url("/turn"),
        PARLEY_HOOKS_FINISH_URL=receiver.url("/finish"),
        PARLEY_HOOKS_SECRET=SECRET,
        PARLEY_HOOKS_TURN_TIMEOUT="0.5",
        PARLEY_SIMULATOR_FIRST_TOKEN_DELAY="0.01",
        PARLEY_SIMULATOR_TOKENS_PER_SECOND="0",
    )
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def fresh(receiver: Receiver) -> None:
    receiver.reset()


def reply(**fields: Any) -> Answer:
    return lambda path, body: (200, json.dumps(fields).encode())


async def wait_calls(receiver: Receiver, path: str, count: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while len(receiver.of(path)) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert len(receiver.of(path)) >= count, receiver.calls


def log_clean(server: ParleyProcess) -> None:
    text = server.log_path.read_text()
    assert "Traceback" not in text and "1011" not in text


async def test_connect_refused_closes_4403(hooked: ParleyProcess, receiver: Receiver) -> None:
    receiver.answers["/connect"] = reply(allow=False, message="banned")
    client = await Client.connect(hooked.ws_url, mint(new_user()), wait_ready=False)
    code, reason = await asyncio.wait_for(client.closed, 10)
    assert (code, reason) == (4403, "banned")
    (called,) = receiver.of("/connect")
    assert called["claims"]["sub"] == called["user"] and called["claims"]["exp"]
    assert receiver.bad_signatures == 0


async def test_connect_data_reaches_turn_and_finish(
    hooked: ParleyProcess, receiver: Receiver
) -> None:
    receiver.answers["/connect"] = reply(allow=True, data={"plan": "pro"})
    async with await Client.connect(hooked.ws_url, mint(new_user())) as client:
        conversation = await start_conversation(client)
        done = await say_and_finish(client, conversation, "hello")
    assert done.reason == "stop"
    turn = receiver.of("/turn")[-1]
    assert turn["data"] == {"plan": "pro"}
    assert turn["message"]["content"] == "hello"
    assert turn["messages"][-1] == {"role": "user", "content": "hello"}
    await wait_calls(receiver, "/finish", 1)
    finish = receiver.of("/finish")[0]
    assert finish["data"] == {"plan": "pro"} and finish["status"] == "complete"
    assert finish["message_id"] == str(done.message_id)
    assert finish["watchers"] == "delivered" and finish["usage"] == msgspec.to_builtins(done.usage)
    assert receiver.bad_signatures == 0


async def test_turn_refused(hooked: ParleyProcess, receiver: Receiver, db: asyncpg.Pool) -> None:
    """Every tab watching gets `error {code: "refused"}` with the application's message as a
    conversation event (a rejoin replays it); no reply begins, the user's message is kept and
    the conversation is free for the next turn."""
    receiver.answers["/turn"] = reply(allow=False, message="not on your plan")
    user = new_user()
    async with (
        await Client.connect(hooked.ws_url, mint(user)) as client,
        await Client.connect(hooked.ws_url, mint(user)) as other,
    ):
        conversation = await start_conversation(client)
        await other.request(f.Join(conversation=conversation))
        ack = await client.request(f.Say(conversation=conversation, text="hello"))
        refusals = [
            await tab.wait_for(lambda fr: isinstance(fr, f.Error) and fr.code == "refused")
            for tab in (client, other)
        ]
        for tab, refusal in zip((client, other), refusals, strict=True):
            assert (refusal.message, refusal.conversation) == ("not on your plan", conversation)
            assert refusal.ref is None and refusal.message_id is not None
            assert not any(isinstance(fr, f.Start | f.Done) for fr in tab.frames)
            assert_contiguous(tab, conversation, 1)
        receiver.answers.pop("/turn")
        again = await say_and_finish(client, conversation, "and now?")  # not busy
        assert again.reason == "stop"
    async with await Client.connect(hooked.ws_url, mint(user)) as late:
        replay = await late.request(f.Join(conversation=conversation, after=0))
        assert replay.last_seq == 0
        refusal = await late.wait_for(lambda fr: isinstance(fr, f.Error))
        assert refusal == refusals[0]
    rows = await wait_persisted(db, conversation, 3)
    assert rows[:2] == [("user", "hello", "complete"), ("user", "and now?", "complete")]
    assert rows[2][0] == "assistant" and len(rows) == 3
    assert str(ack.message_id) == receiver.of("/turn")[0]["message"]["id"]
    await wait_calls(receiver, "/finish", 2)
    finishes = receiver.of("/finish")
    assert [(b["status"], b["code"]) for b in finishes] == [
        ("error", "refused"),
        ("complete", None),
    ]
    assert finishes[0]["message_id"] == str(refusals[0].message_id)


async def test_turn_replaces_messages_and_model(hooked: ParleyProcess, receiver: Receiver) -> None:
    replaced = [{"role": "user", "content": "alpha beta [sim:tokens=3]"}]
    receiver.answers["/turn"] = reply(messages=replaced, model="chosen-model")
    async with await Client.connect(hooked.ws_url, mint(new_user())) as client:
        conversation = await start_conversation(client)
        start = len(client.frames)
        done = await say_and_finish(client, conversation, "a long question that is replaced")
        began = next(fr for fr in client.frames[start:] if isinstance(fr, f.Start))
    assert began.model == "chosen-model"
    # the simulator counts each prompt message's words + 4 and obeys the replaced control
    assert done.usage is not None
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (3 + 4, 3)


@pytest.mark.parametrize("policy", ["allow", "refuse"])
async def test_turn_timeout_policy(cluster: Cluster, receiver: Receiver, policy: str) -> None:
    server = cluster.process(
        "serve",
        REDIS_URL=redis_db(cluster.services.redis_url, Db.HOOKS_TIMEOUT),
        PARLEY_HOOKS_CONNECT_URL=receiver.url("/connect"),
        PARLEY_HOOKS_TURN_URL=receiver.url("/turn"),
        PARLEY_HOOKS_SECRET=SECRET,
        PARLEY_HOOKS_TURN_TIMEOUT="0.3",
        PARLEY_HOOKS_TURN_FAILURE=policy,
    )
    receiver.answers["/turn"] = lambda p, b: None  # hangs
    try:
        async with await Client.connect(server.ws_url, mint(new_user())) as client:
            conversation = await start_conversation(client)
            await client.request(f.Say(conversation=conversation, text="hi"))
            end = await client.wait_for(
                lambda fr: isinstance(fr, f.Done | f.Error) and fr.conversation == conversation
            )
        receiver.answers["/connect"] = lambda p, b: (500, b"")
        late = await Client.connect(server.ws_url, mint(new_user()), wait_ready=False)
        if policy == "allow":
            assert isinstance(end, f.Done) and end.reason == "stop"
            async with late:
                await late.wait_for(lambda fr: isinstance(fr, f.Ready))
        else:
            assert isinstance(end, f.Error)
            assert (end.code, end.message) == ("refused", "the application is unavailable")
            closed = await asyncio.wait_for(late.closed, 10)
            assert closed == (4403, "the application is unavailable")
        log_clean(server)
    finally:
        server.stop()


HOSTILE: dict[str, Answer] = {
    "hangs": lambda p, b: None,
    "500": lambda p, b: (500, b"oops"),
    "garbage": lambda p, b: (200, b"\x00not json{"),
    "huge": lambda p, b: (200, b'{"message": "' + b"x" * 1_000_000 + b'"}'),
    "deep": lambda p, b: (200, b"[" * 10_000),
    "wrong types": lambda p, b: (200, b'{"allow": "yes", "messages": 3}'),
    "bad role": lambda p, b: (200, b'{"messages": [{"role": "tool", "content": "x"}]}'),
    "redirect": lambda p, b: (307, b""),
    "trickles": lambda p, b: Slowly(b'{"allow": false, "message": "too late"}' + b" " * 60, 0.1),
}


@pytest.mark.parametrize("kind", HOSTILE)
async def test_hostile_receivers(hooked: ParleyProcess, receiver: Receiver, kind: str) -> None:
    """Every failure of a hook is the failure policy (allow), nothing else."""
    receiver.answers["/connect"] = HOSTILE[kind]
    receiver.answers["/turn"] = HOSTILE[kind]
    async with await Client.connect(hooked.ws_url, mint(new_user())) as client:
        conversation = await start_conversation(client)
        done = await say_and_finish(client, conversation, "hi")
    assert done.reason == "stop"
    assert receiver.of("/connect") and receiver.of("/turn")
    assert not receiver.of("/followed")  # a redirect is a failure, never followed
    log_clean(hooked)


async def test_finish_retried_until_the_receiver_answers(
    hooked: ParleyProcess, receiver: Receiver
) -> None:
    receiver.answers["/finish"] = lambda p, b: (503, b"down")
    async with await Client.connect(hooked.ws_url, mint(new_user())) as client:
        conversation = await start_conversation(client)
        done = await say_and_finish(client, conversation, "hi")
        mine = str(conversation)
        await wait_finishes(receiver, mine, 2)  # tried, failed, tried again
        receiver.answers.pop("/finish")
        finishes = await wait_finishes(receiver, mine, 3)
    ids = {h["webhook-id"] for _, h in finishes}
    assert ids == {str(done.message_id)}  # the same id on every try: the receiver dedupes
    assert finishes[-1][0]["watchers"] == "delivered"
    await asyncio.sleep(3)
    assert len(await wait_finishes(receiver, mine, 3)) == 3  # delivered: not sent again
    log_clean(hooked)


async def wait_finishes(
    receiver: Receiver, conversation: str, count: int, timeout: float = 20
) -> list[tuple[dict[str, Any], dict[str, str]]]:
    deadline = time.monotonic() + timeout
    while True:
        finishes = [
            (b, h)
            for p, b, h in receiver.calls
            if p == "/finish" and b["conversation"] == conversation
        ]
        if len(finishes) >= count or time.monotonic() > deadline:
            assert len(finishes) >= count
            return finishes
        await asyncio.sleep(0.05)


@pytest.mark.parametrize(
    ("control", "status", "reason"),
    [
        ("[sim:tokens=5][sim:finish=length]", "length", "length"),
        ("[sim:tokens=5][sim:finish=content_filter]", "complete", "content_filter"),
        ("[sim:tokens=5][sim:finish=tool_calls]", "complete", "tool_calls"),
        ("[sim:error]", "error", "error"),
        ("[sim:delay=5]", "cancelled", "cancelled"),
    ],
)
async def test_finish_reports_how_the_turn_ended(
    hooked: ParleyProcess, receiver: Receiver, control: str, status: str, reason: str
) -> None:
    async with await Client.connect(hooked.ws_url, mint(new_user())) as client:
        conversation = await start_conversation(client)
        start = len(client.frames)
        await client.request(f.Say(conversation=conversation, text=f"end as told {control}"))
        if status == "cancelled":
            await client.wait_for(lambda fr: isinstance(fr, f.Start), start=start)
            await client.request(f.Cancel(conversation=conversation))
        done = await client.wait_for(lambda fr: isinstance(fr, f.Done), start=start)
        ((body, _),) = await wait_finishes(receiver, str(conversation), 1)
    assert done.reason == reason
    assert (body["status"], body["reason"], body["message_id"]) == (
        status,
        reason,
        str(done.message_id),
    )
    assert (body["error"] is not None) == (status == "error")
    assert body["watchers"] == "delivered" and body["timings"]["duration_ms"] >= 0
    log_clean(hooked)


async def test_finish_when_every_tab_left_during_the_turn(
    hooked: ParleyProcess, receiver: Receiver
) -> None:
    async with await Client.connect(hooked.ws_url, mint(new_user())) as client:
        conversation = await start_conversation(client)
        start = len(client.frames)
        await client.request(f.Say(conversation=conversation, text="[sim:delay=1] hi"))
        await client.wait_for(lambda fr: isinstance(fr, f.Start), start=start)
        await client.request(f.Leave(conversation=conversation))
        ((body, _),) = await wait_finishes(receiver, str(conversation), 1)
    assert (body["status"], body["watchers"]) == ("complete", "watchers_left_during")


async def test_finish_without_watchers(hooked: ParleyProcess, receiver: Receiver) -> None:
    async with await Client.connect(hooked.ws_url, mint(new_user())) as client:
        created = await client.request(f.Create())
        await client.request(f.Say(conversation=created.conversation, text="[sim:delay=0.5]"))
    await wait_calls(receiver, "/finish", 1)
    assert receiver.of("/finish")[0]["watchers"] == "no_watchers"


async def test_finish_survives_a_killed_process(cluster: Cluster, receiver: Receiver) -> None:
    """Queued while the receiver is down, the call outlives the process that queued it: the
    next process on the same Redis delivers it."""
    env = {
        "REDIS_URL": redis_db(cluster.services.redis_url, Db.HOOKS_PROCESS_KILLED),
        "PARLEY_HOOKS_FINISH_URL": receiver.url("/finish"),
        "PARLEY_HOOKS_SECRET": SECRET,
    }
    receiver.answers["/finish"] = lambda p, b: (502, b"")
    first = cluster.process("serve", **env)
    try:
        async with await Client.connect(first.ws_url, mint(new_user())) as client:
            conversation = await start_conversation(client)
            done = await say_and_finish(client, conversation, "hi")
        await wait_calls(receiver, "/finish", 1)
    finally:
        first.kill()
    receiver.answers.pop("/finish")
    second = cluster.process("serve", **env)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if any(h["webhook-id"] == str(done.message_id) and p == "/finish"
                   for p, _, h in receiver.calls[1:]):  # fmt: skip
                break
            await asyncio.sleep(0.2)
        delivered = [
            b for b in receiver.of("/finish")[1:] if b["conversation"] == str(conversation)
        ]
        assert delivered and delivered[0]["status"] == "complete"
        log_clean(second)
    finally:
        second.stop()


async def test_finish_dead_lettered_after_giving_up(cluster: Cluster, receiver: Receiver) -> None:
    url = redis_db(cluster.services.redis_url, Db.HOOKS_GIVE_UP)
    receiver.answers["/finish"] = lambda p, b: (500, b"")
    server = cluster.process(
        "serve",
        REDIS_URL=url,
        PARLEY_HOOKS_FINISH_URL=receiver.url("/finish"),
        PARLEY_HOOKS_FINISH_GIVE_UP="2",
        PARLEY_HOOKS_SECRET=SECRET,
    )
    redis = Redis.from_url(url)
    try:
        async with await Client.connect(server.ws_url, mint(new_user())) as client:
            conversation = await start_conversation(client)
            await say_and_finish(client, conversation, "hi")
        deadline = time.monotonic() + 20
        dead: list[Any] = []
        while not dead and time.monotonic() < deadline:
            dead = await redis.xrange(keys.DEADLETTER)
            await asyncio.sleep(0.2)
        assert dead and dead[0][1][b"source"] == keys.FINISH_HOOKS.encode()
        assert await redis.xlen(keys.FINISH_HOOKS) == 0
        assert len(receiver.of("/finish")) >= 2
    finally:
        await redis.aclose()
        server.stop()
