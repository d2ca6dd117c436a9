"""Poison: text PostgreSQL cannot store is refused at the edge; a client's message id is its
conversation's; one bad queue entry is dead-lettered and never holds up the entries behind it.

Against real Parley processes, Redis and PostgreSQL; the dead-letter cases run their own
`parley serve` on a Redis database of their own, so that they alone read its queues.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec
import pytest
import pytest_asyncio
from redis.asyncio import Redis

from protocol import frames as f
from server.dev.client import Client
from server.redis import keys
from storage.messages import FinishedTurn
from tests.helpers.auth import mint
from tests.helpers.conversations import say_and_finish, start_conversation, wait_persisted
from tests.helpers.processes import ROOT, Cluster, Db, ParleyProcess, redis_db

POISON_DB = Db.POISON


async def refused(client: Client, raw: str) -> f.Error:
    """Send a raw frame carrying `"ref": "bad"` and return the error answering it."""
    start = len(client.frames)
    await client.send(raw)
    return await client.wait_for(  # type: ignore[no-any-return]
        lambda fr: isinstance(fr, f.Error) and fr.ref in ("bad", None), start=start
    )


# --------------------------------------------------------------------------- text at the edge


@pytest.mark.parametrize(("escape", "words"), [("\\u0000", "NUL"), ("\\ud800", "surrogate")])
async def test_unstorable_say_text_is_invalid_and_others_turns_still_persist(
    connect: Any, db: asyncpg.Pool, escape: str, words: str
) -> None:
    attacker: Client = await connect()
    other: Client = await connect()
    poisoned = await start_conversation(attacker)
    error = await refused(
        attacker,
        f'{{"type":"say","ref":"bad","conversation":"{poisoned}","text":"hi{escape}there"}}',
    )
    assert error.code == "invalid" and "`text`" in error.message and words in error.message
    conversation = await start_conversation(other)
    for turn in range(2):
        assert (await say_and_finish(other, conversation, f"turn {turn}")).reason == "stop"
    rows = await wait_persisted(db, conversation, 4, timeout=5)
    assert [r[0] for r in rows] == ["user", "assistant"] * 2
    assert (await say_and_finish(attacker, poisoned, "a clean one")).reason == "stop"
    assert len(await wait_persisted(db, poisoned, 2, timeout=5)) == 2


@pytest.mark.parametrize("field", ["title", "system", "model"])
@pytest.mark.parametrize(("escape", "words"), [("\\u0000", "NUL"), ("\\ud800", "surrogate")])
async def test_unstorable_create_field_is_invalid_over_ws(
    connect: Any, field: str, escape: str, words: str
) -> None:
    client: Client = await connect()
    error = await refused(client, f'{{"type":"create","ref":"bad","{field}":"x{escape}"}}')
    assert error.code == "invalid" and f"`{field}`" in error.message and words in error.message
    assert isinstance(await client.request(f.Create(title="fine")), f.Created)


def rest(server: ParleyProcess, method: str, path: str, user: str, body: str) -> tuple[int, Any]:
    request = urllib.request.Request(
        server.url + path,
        data=body.encode(),
        method=method,
        headers={"Authorization": f"Bearer {mint(user)}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


@pytest.mark.parametrize("field", ["title", "system", "model"])
async def test_unstorable_field_over_rest_is_400_naming_it(
    parley: ParleyProcess, user: str, field: str
) -> None:
    body = f'{{"{field}": "x\\u0000"}}'
    status, answer = await asyncio.to_thread(rest, parley, "POST", "/api/conversations", user, body)
    assert status == 400 and f"`{field}`" in answer["detail"], answer
    status, created = await asyncio.to_thread(
        rest, parley, "POST", "/api/conversations", user, '{"title": "fine"}'
    )
    assert status == 201
    path = f"/api/conversations/{created['id']}"
    status, answer = await asyncio.to_thread(rest, parley, "PATCH", path, user, body)
    assert status == 400 and f"`{field}`" in answer["detail"], answer
    status, answer = await asyncio.to_thread(
        rest, parley, "PATCH", path, user, f'{{"{field}": "x\\ud800"}}'
    )
    assert status == 400, answer


# --------------------------------------------------------------------------- message ids


async def test_say_with_another_conversations_message_id_is_its_own_turn(
    connect: Any, db: asyncpg.Pool
) -> None:
    alice: Client = await connect()
    mallory: Client = await connect()
    first = await start_conversation(alice)
    await say_and_finish(alice, first, "mine")
    assert len(await wait_persisted(db, first, 2, timeout=5)) == 2
    taken = await db.fetchval(
        "SELECT id FROM messages WHERE conversation_id = $1 AND role = 'user'", first
    )
    second = await start_conversation(mallory)
    start = len(mallory.frames)
    ack = await mallory.request(f.Say(conversation=second, text="same id", id=taken))
    assert ack.message_id == taken and not ack.duplicate
    await mallory.wait_for(lambda fr: isinstance(fr, f.Done), start=start)
    rows = await wait_persisted(db, second, 2, timeout=5)
    assert (rows[0][0], rows[0][1]) == ("user", "same id")
    rows = await wait_persisted(db, first, 2)
    assert (rows[0][0], rows[0][1]) == ("user", "mine")


async def test_same_id_twice_is_one_turn_even_after_redis_forgot_the_conversation(
    connect: Any, db: asyncpg.Pool, services: Any
) -> None:
    client: Client = await connect()
    conversation = await start_conversation(client)
    said = uuid.uuid4()
    start = len(client.frames)
    await client.request(f.Say(conversation=conversation, text="once", id=said))
    await client.wait_for(lambda fr: isinstance(fr, f.Done), start=start)
    again = await client.request(f.Say(conversation=conversation, text="once", id=said))
    assert again.duplicate and again.message_id == said
    assert len(await wait_persisted(db, conversation, 2, timeout=5)) == 2
    redis = Redis.from_url(services.redis_url)
    try:  # what the conversation's Redis state expiring does
        stale = await redis.keys(f"{keys.PREFIX}:{{c:{conversation}}}:*")
        await redis.delete(*stale)
    finally:
        await redis.aclose()
    late = await client.request(f.Say(conversation=conversation, text="once", id=said))
    assert late.duplicate and late.message_id == said
    await asyncio.sleep(0.5)
    assert len(await wait_persisted(db, conversation, 2)) == 2


# --------------------------------------------------------------------------- dead letters


@pytest.fixture(scope="module")
def own(cluster: Cluster) -> Iterator[ParleyProcess]:
    server = cluster.process("serve", REDIS_URL=redis_db(cluster.services.redis_url, POISON_DB))
    yield server
    server.stop()


@pytest_asyncio.fixture
async def own_redis(own: ParleyProcess) -> AsyncIterator[Redis]:
    redis = Redis.from_url(own.env["REDIS_URL"])
    yield redis
    await redis.aclose()


def cli(server: ParleyProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server.app.cli", "deadletter", *args],
        cwd=ROOT,
        env=server.env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def listed(server: ParleyProcess) -> list[dict[str, Any]]:
    result = cli(server, "list", "--json")
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


async def wait_dead(redis: Redis, count: int, timeout: float = 10) -> list[Any]:
    """The dead letters, once there are `count` (read straight from Redis: the CLI is
    checked on its own below)."""
    deadline = time.monotonic() + timeout
    letters = await redis.xrange(keys.DEADLETTER)
    while len(letters) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        letters = await redis.xrange(keys.DEADLETTER)
    return [entry_id.decode() for entry_id, _ in letters]


def finished_turn(conversation: uuid.UUID, content: str) -> bytes:
    now = datetime.now(UTC)
    message = f.Message(
        id=uuid.uuid4(), role="assistant", content=content, status="complete", created_at=now
    )
    turn = FinishedTurn(
        conversation=conversation,
        user_message=None,
        user_seq=0,
        reply=message,
        replaces=None,
        finished_at=now,
    )
    return msgspec.json.encode(turn)


async def test_poisoned_persist_entries_are_dead_lettered_and_the_next_turn_persisted(
    own: ParleyProcess, own_redis: Redis, db: asyncpg.Pool
) -> None:
    assert await wait_dead(own_redis, 0, timeout=0) == []
    client = await Client.connect(own.ws_url, mint(f"dl-{uuid.uuid4().hex[:8]}"))
    try:
        conversation = await start_conversation(client)
        await own_redis.xadd(keys.PERSIST, {"turn": b"garbage", "done_seq": b"1"})
        too_big = {"turn": finished_turn(conversation, "overflow"), "done_seq": str(10**20)}
        await own_redis.xadd(keys.PERSIST, too_big)
        nul = {"turn": finished_turn(conversation, "kept\x00anyway"), "done_seq": b"1"}
        await own_redis.xadd(keys.PERSIST, nul)
        done = await say_and_finish(client, conversation, "after the poison")
        finished = time.monotonic()
        rows = await wait_persisted(db, conversation, 3, timeout=5)
        assert time.monotonic() - finished < 2.0, "the good turn waited behind the poison"
    finally:
        await client.close()
    assert ("assistant", "kept\ufffdanyway", "complete") in rows
    assert [r[1] for r in rows if r[0] == "user"] == ["after the poison"]
    assert done.reason == "stop"
    assert len(await wait_dead(own_redis, 2)) == 2
    letters = await asyncio.to_thread(listed, own)
    assert [(d["source"], d["fields"]["turn"][:7]) for d in letters] == [
        (keys.PERSIST, "garbage"),
        (keys.PERSIST, '{"conve'),
    ]
    assert "DecodeError" in letters[0]["error"] and letters[0]["attempts"] == 1
    assert "int64" in letters[1]["error"] and letters[1]["attempts"] == 3
    assert await own_redis.xlen(keys.PERSIST) == 0
    log = own.log()
    assert " ERROR " in log and "moved to parley:deadletter" in log

    dropped = await asyncio.to_thread(cli, own, "drop", letters[1]["id"])
    assert dropped.returncode == 0 and "dropped" in dropped.stdout
    assert [d["id"] for d in await asyncio.to_thread(listed, own)] == [letters[0]["id"]]
    retried = await asyncio.to_thread(cli, own, "retry", letters[0]["id"])
    assert retried.returncode == 0 and "put back" in retried.stdout
    deadline = time.monotonic() + 10  # back on its queue, it fails again: a new dead letter
    while await wait_dead(own_redis, 0, 0) == [letters[0]["id"]] and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    again = await asyncio.to_thread(listed, own)
    assert len(again) == 1 and again[0]["id"] != letters[0]["id"]
    assert again[0]["fields"] == letters[0]["fields"]
    missing = await asyncio.to_thread(cli, own, "drop", "1-1")
    assert missing.returncode == 1
    human = await asyncio.to_thread(cli, own, "list")
    assert again[0]["id"] in human.stdout and "error:" in human.stdout
    assert (await asyncio.to_thread(cli, own, "drop", again[0]["id"])).returncode == 0


async def test_poisoned_turns_entry_is_dead_lettered_and_the_worker_moves_on(
    own: ParleyProcess, own_redis: Redis
) -> None:
    await own_redis.xadd(keys.TURNS, {"job": b'{"conversation": "not a uuid"}'})
    await own_redis.xadd(keys.TURNS, {"nothing": b"here"})
    assert len(await wait_dead(own_redis, 2)) == 2
    letters = await asyncio.to_thread(listed, own)
    assert [d["source"] for d in letters] == [keys.TURNS, keys.TURNS]
    assert [(d["attempts"], d["error"].split(":")[0]) for d in letters] == [
        (1, "ValidationError"),
        (1, "KeyError"),
    ]
    assert await own_redis.xlen(keys.TURNS) == 0
    client = await Client.connect(own.ws_url, mint(f"dl-{uuid.uuid4().hex[:8]}"))
    try:
        conversation = await start_conversation(client)
        assert (await say_and_finish(client, conversation, "still served")).reason == "stop"
    finally:
        await client.close()
    for letter in letters:
        assert (await asyncio.to_thread(cli, own, "drop", letter["id"])).returncode == 0


@pytest.mark.parametrize("subject", ["eve\x00", "eve\ud800"])
async def test_unstorable_token_subject_gets_4401(parley: ParleyProcess, subject: str) -> None:
    client = await Client.connect(parley.ws_url, mint(subject), via="frame", wait_ready=False)
    code, reason = await asyncio.wait_for(client.closed, 5)
    assert code == 4401 and "`sub`" in reason
