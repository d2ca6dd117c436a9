"""storage/ against the real embedded PostgreSQL: migrations, conversations, and the one
transaction that records a finished turn (including a regenerate's replaced reply)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import msgspec
import pytest

from protocol.frames import Conversation, Message, Part, Usage
from storage import conversations, db, messages, usage
from storage.messages import FinishedTurn

T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


def conversation_meta(title: str = "a title", at: datetime = T0) -> Conversation:
    return Conversation(
        id=uuid.uuid4(), title=title, system="be brief", model="sim", created_at=at, updated_at=at
    )


def message(role: str, content: str, status: str = "complete", at: datetime = T0) -> Message:
    usage = Usage(prompt_tokens=7, completion_tokens=3) if role == "assistant" else None
    model = "sim" if role == "assistant" else None
    return Message(
        id=uuid.uuid4(),
        role=role,  # type: ignore[arg-type]
        content=content,
        status=status,  # type: ignore[arg-type]
        created_at=at,
        model=model,
        usage=usage,
    )


def turn(
    conversation: uuid.UUID,
    user_seq: int,
    *,
    user: Message | None = None,
    reply: Message | None = None,
    replaces: uuid.UUID | None = None,
) -> FinishedTurn:
    """A finished turn whose `start` is user_seq + 1, one token, `done` at user_seq + 3."""
    return FinishedTurn(
        conversation=conversation,
        user_message=user,
        user_seq=user_seq,
        reply=reply or message("assistant", f"reply after seq {user_seq}"),
        replaces=replaces,
        finished_at=T0 + timedelta(seconds=user_seq),
        done_seq=user_seq + 3,
    )


async def new_conversation(pool: asyncpg.Pool, owner: str = "alice") -> Conversation:
    meta = conversation_meta()
    await conversations.insert(pool, owner, meta)
    return meta


async def table_names(pool: asyncpg.Pool) -> set[str]:
    rows = await pool.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {r["tablename"] for r in rows}


# --------------------------------------------------------------------------- migrations


async def test_migrations_apply_once_then_apply_nothing(empty_pool: asyncpg.Pool) -> None:
    every = [name for _, name, _ in db.migrations()]
    assert every and every[0] == "001_init.sql"
    assert await db.migrate(empty_pool) == every
    assert await db.migrate(empty_pool) == []
    recorded = await empty_pool.fetch("SELECT version, name FROM schema_migrations ORDER BY 1")
    assert [(r["version"], r["name"]) for r in recorded] == [
        (version, name) for version, name, _ in db.migrations()
    ]
    assert {"conversations", "messages", "replaced_messages"} <= await table_names(empty_pool)


async def test_processes_migrating_at_once_apply_each_migration_once(
    empty_pool: asyncpg.Pool,
) -> None:
    """Web and worker processes start together: the advisory lock lets one apply."""
    results = await asyncio.gather(*(db.migrate(empty_pool) for _ in range(3)))
    applied = [name for names in results for name in names]
    assert sorted(applied) == sorted(name for _, name, _ in db.migrations())


# --------------------------------------------------------------------------- conversations


async def test_conversation_is_inserted_and_read_back(pool: asyncpg.Pool) -> None:
    meta = conversation_meta("hello")
    await conversations.insert(pool, "alice", meta)
    stored = await conversations.get(pool, meta.id)
    assert stored is not None
    assert stored.owner == "alice" and stored.meta == meta and stored.history_seq == 0
    assert await conversations.get(pool, uuid.uuid4()) is None


async def test_list_holds_only_the_owners_conversations_latest_first(pool: asyncpg.Pool) -> None:
    older = conversation_meta("older", T0)
    newer = conversation_meta("newer", T0 + timedelta(minutes=1))
    for meta in (older, newer):
        await conversations.insert(pool, "alice", meta)
    await conversations.insert(pool, "bob", conversation_meta("bob's"))
    listed = await conversations.list_for(pool, "alice")
    assert [c.meta.title for c in listed] == ["newer", "older"]
    assert [c.meta.title for c in await conversations.list_for(pool, "alice", limit=1)] == ["newer"]
    assert await conversations.list_for(pool, "carol") == []


async def test_update_changes_only_given_fields_and_only_for_the_owner(pool: asyncpg.Pool) -> None:
    meta = await new_conversation(pool)
    later = T0 + timedelta(hours=1)
    kw = {"system": None, "model": None, "now": later}
    assert await conversations.update(pool, meta.id, "bob", title="mine", seq=0, **kw) is None
    updated = await conversations.update(pool, meta.id, "alice", title="renamed", seq=5, **kw)
    assert updated is not None
    assert updated.meta.title == "renamed" and updated.meta.system == meta.system
    assert updated.meta.updated_at == later and updated.meta.last_seq == 5
    again = await conversations.update(pool, meta.id, "alice", title=None, seq=2, **kw)
    assert again is not None
    assert again.meta.title == "renamed" and again.meta.last_seq == 5, "last_seq went back"


async def test_delete_is_for_the_owner_and_takes_the_messages_along(pool: asyncpg.Pool) -> None:
    meta = await new_conversation(pool)
    assert await messages.save_turn(pool, turn(meta.id, 1, user=message("user", "hi")))
    assert not await conversations.delete(pool, meta.id, "bob")
    assert await conversations.get(pool, meta.id) is not None
    assert await conversations.delete(pool, meta.id, "alice")
    assert await conversations.get(pool, meta.id) is None
    assert await messages.history(pool, meta.id) == []
    assert not await conversations.delete(pool, meta.id, "alice")


async def test_erasing_a_user_locks_their_conversations_in_the_order_a_batch_does(
    pool: asyncpg.Pool,
) -> None:
    """A batch of turns locks its conversations in the order of their ids; erasing a user
    locks theirs in that order too (not in the order a scan finds them: here, the largest id
    first), so the two never wait for each other in a cycle, which PostgreSQL would end by
    aborting one of them."""
    ids = sorted((uuid.uuid4() for _ in range(3)), reverse=True)
    for n, conversation in enumerate(ids):  # stored, and latest first, the largest id first
        meta = conversation_meta(at=T0 - timedelta(seconds=n))
        await conversations.insert(pool, "alice", msgspec.structs.replace(meta, id=conversation))
    lock = "SELECT 1 FROM conversations WHERE id = $1 FOR UPDATE"
    async with asyncio.timeout(20), pool.acquire() as batch:
        async with batch.transaction():
            await batch.execute(lock, ids[-1])  # the batch's first lock, the smallest id
            erasing = asyncio.create_task(conversations.delete_all_for(pool, "alice"))
            await waiting_for_a_lock(pool)
            await batch.execute(lock, ids[0])  # its next
        assert sorted(await erasing) == sorted(ids)


async def waiting_for_a_lock(pool: asyncpg.Pool) -> None:
    """Until a statement on this database waits for a lock another transaction holds."""
    while not await pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
    ):
        await asyncio.sleep(0.02)


# --------------------------------------------------------------------------- finished turns


async def test_finished_turn_is_saved_with_its_seqs(pool: asyncpg.Pool) -> None:
    meta = await new_conversation(pool)
    user = message("user", "hello")
    reply = message("assistant", "hi there", at=T0 + timedelta(seconds=1))
    assert await messages.save_turn(pool, turn(meta.id, 1, user=user, reply=reply))
    assert await messages.history(pool, meta.id) == [user, reply]
    stored = await conversations.get(pool, meta.id)
    assert stored is not None
    assert stored.history_seq == 4 and stored.meta.last_seq == 4
    assert stored.meta.updated_at == T0 + timedelta(seconds=1)


async def test_a_row_and_its_messages_are_read_as_of_one_moment(pool: asyncpg.Pool) -> None:
    meta = await new_conversation(pool)
    user, reply = message("user", "hello"), message("assistant", "hi", at=T0 + timedelta(1))
    assert await messages.save_turn(pool, turn(meta.id, 1, user=user, reply=reply))
    row, transcript = await conversations.with_history(pool, meta.id)
    assert row is not None and (row.history_seq, transcript) == (4, [user, reply])
    assert await conversations.with_history(pool, uuid.uuid4()) == (None, [])


async def test_saving_the_same_turn_again_changes_nothing(pool: asyncpg.Pool) -> None:
    """The persister may deliver a turn twice (a claimed entry after a crash before its ack)."""
    meta = await new_conversation(pool)
    finished = turn(meta.id, 1, user=message("user", "once"))
    assert await messages.save_turn(pool, finished)
    assert await messages.save_turn(pool, finished)
    history = await messages.history(pool, meta.id)
    assert [m.content for m in history] == ["once", finished.reply.content]
    count = await pool.fetchval("SELECT count(*) FROM messages WHERE conversation_id = $1", meta.id)
    assert count == 2


async def test_turn_of_a_deleted_conversation_is_dropped(pool: asyncpg.Pool) -> None:
    gone = uuid.uuid4()
    assert not await messages.save_turn(pool, turn(gone, 1, user=message("user", "anyone?")))
    assert await pool.fetchval("SELECT count(*) FROM messages") == 0


async def test_turn_is_saved_whole_or_not_at_all(pool: asyncpg.Pool) -> None:
    """The user message and the reply are one transaction: a reply the database refuses
    takes the user message and the conversation's seqs back with it."""
    meta = await new_conversation(pool)
    refused = message("assistant", "half", status="unknown-status")
    with pytest.raises(asyncpg.CheckViolationError):
        await messages.save_turn(pool, turn(meta.id, 1, user=message("user", "q"), reply=refused))
    assert await messages.history(pool, meta.id) == []
    stored = await conversations.get(pool, meta.id)
    assert stored is not None and stored.history_seq == 0 and stored.meta.last_seq == 0


async def test_regenerate_replaces_the_reply_for_good(pool: asyncpg.Pool) -> None:
    """A regenerated reply takes its predecessor's place; the predecessor is recorded in
    replaced_messages, so a late second delivery of the original turn cannot bring it back."""
    meta = await new_conversation(pool)
    user = message("user", "a haiku please")
    first = turn(meta.id, 1, user=user)
    assert await messages.save_turn(pool, first)
    second = turn(meta.id, 4, reply=message("assistant", "another haiku"), replaces=first.reply.id)
    assert await messages.save_turn(pool, second)
    assert await messages.history(pool, meta.id) == [user, second.reply]
    replaced = "SELECT count(*) FROM replaced_messages WHERE id = $1"
    assert await pool.fetchval(replaced, first.reply.id) == 1
    assert await messages.save_turn(pool, first)  # delivered again
    assert await messages.history(pool, meta.id) == [user, second.reply]
    stored = await conversations.get(pool, meta.id)
    assert stored is not None and stored.history_seq == 7


async def test_regenerate_saved_before_the_turn_it_replaces(pool: asyncpg.Pool) -> None:
    """Turns may reach PostgreSQL out of order: the replaced reply never appears."""
    meta = await new_conversation(pool)
    user = message("user", "question")
    first = turn(meta.id, 1, user=user)
    second = turn(meta.id, 4, reply=message("assistant", "better"), replaces=first.reply.id)
    assert await messages.save_turn(pool, second)
    assert await messages.save_turn(pool, first)
    assert await messages.history(pool, meta.id) == [user, second.reply]


async def test_a_reply_keeps_its_parts_reason_and_full_usage(pool: asyncpg.Pool) -> None:
    meta = await new_conversation(pool)
    usage = Usage(
        prompt_tokens=20, completion_tokens=9, reasoning_tokens=5, cached_prompt_tokens=12,
        first_token_ms=12.5, duration_ms=300.0, estimated=True,
    )  # fmt: skip
    parts = [
        Part(kind="reasoning", text="let me think\x00", duration_ms=250.0),
        Part(kind="text", text="the answer"),
    ]
    reply = msgspec.structs.replace(
        message("assistant", "the answer"), usage=usage, parts=parts, reason="content_filter"
    )
    finished = turn(meta.id, 1, user=message("user", "q"), reply=reply)
    await messages.save_turn(pool, finished.storable())
    stored = (await messages.history(pool, meta.id))[-1]
    assert stored.parts is not None and stored.parts[0].text == "let me think\ufffd"
    assert stored.parts[1:] == parts[1:] and stored.parts[0].duration_ms == 250.0
    assert (stored.usage, stored.reason, stored.content) == (usage, "content_filter", "the answer")


# --------------------------------------------------------------------------- the usage ledger


def spending(turn: FinishedTurn, owner: str = "alice") -> FinishedTurn:
    entry = usage.UsageEntry(
        owner=owner,
        model="m",
        status="complete",
        prompt_tokens=12,
        completion_tokens=30,
        cost=0.5,
        bucket=int(T0.timestamp()),
        started_at=T0,
    )
    return msgspec.structs.replace(turn, spent=entry)


async def test_a_turns_spending_is_recorded_once_and_outlives_its_conversation(
    pool: asyncpg.Pool,
) -> None:
    meta = await new_conversation(pool)
    finished = spending(turn(meta.id, 1, user=message("user", "q")))
    assert await messages.save_turn(pool, finished)
    assert await messages.save_turn(pool, finished)  # delivered twice
    assert await usage.spent_by_bucket(pool, "alice", 0) == {int(T0.timestamp()): 42}
    assert await conversations.delete(pool, meta.id, "alice")
    gone = spending(turn(meta.id, 5, user=message("user", "late")))
    assert not await messages.save_turn(pool, gone)  # the conversation went meanwhile
    rows = await usage.records(pool, "alice", T0 - timedelta(days=1), T0 + timedelta(days=1), 10)
    assert [(r.message_id, r.prompt_tokens + r.completion_tokens) for r in rows] == [
        (finished.reply.id, 42),
        (gone.reply.id, 42),
    ]
    totals = await usage.totals(pool, "alice", T0, T0 + timedelta(days=1), "model")
    assert [(t.key, t.turns, t.completion_tokens, t.cost) for t in totals] == [("m", 2, 60, 1.0)]


async def test_a_users_own_budget_is_set_and_removed(pool: asyncpg.Pool) -> None:
    assert await usage.override(pool, "bob") is None
    await usage.set_override(pool, "bob", 500, T0)
    await usage.set_override(pool, "bob", 700, T0)
    assert await usage.override(pool, "bob") == 700
    await usage.set_override(pool, "bob", None, T0)
    assert await usage.override(pool, "bob") is None


async def test_turns_saved_together_leave_what_each_saved_alone_leaves(pool: asyncpg.Pool) -> None:
    """One batch of several conversations' turns, out of order, one delivered twice, a
    regenerated reply beside the turn it replaces, one of a deleted conversation: the same
    rows and seqs as the turns written one by one, in one transaction."""
    a, b = await new_conversation(pool), await new_conversation(pool)
    user_a, user_b = message("user", "a?"), message("user", "b?")
    first_a, first_b = turn(a.id, 1, user=user_a), spending(turn(b.id, 1, user=user_b))
    second_a = turn(a.id, 5, user=message("user", "a again?", at=T0 + timedelta(1)))
    regenerated_b = turn(
        b.id, 4, reply=message("assistant", "b, better"), replaces=first_b.reply.id
    )
    gone = spending(turn(uuid.uuid4(), 1, user=message("user", "anyone?")))
    batch = [second_a, regenerated_b, gone, first_a, first_b, first_b]
    assert await messages.save_turns(pool, batch) == [True, True, False, True, True, True]
    assert await messages.history(pool, a.id) == [
        user_a, first_a.reply, second_a.user_message, second_a.reply,
    ]  # fmt: skip
    assert await messages.history(pool, b.id) == [user_b, regenerated_b.reply]
    stored_a, stored_b = await conversations.get(pool, a.id), await conversations.get(pool, b.id)
    assert stored_a is not None and (stored_a.history_seq, stored_a.meta.last_seq) == (8, 8)
    assert stored_a.meta.updated_at == second_a.finished_at
    assert stored_b is not None and stored_b.history_seq == 7
    spent = await usage.records(pool, "alice", T0 - timedelta(days=1), T0 + timedelta(days=1), 9)
    assert sorted(r.message_id for r in spent) == sorted([first_b.reply.id, gone.reply.id])
    before = db.QUERIES.sent  # the array types are known now: statements alone are counted
    assert await messages.save_turns(pool, batch) == [True, True, False, True, True, True]
    # BEGIN, usage, seqs, replaced (2), messages, COMMIT, and the connection's one reset
    assert db.QUERIES.sent - before == 8
    assert len(await messages.history(pool, a.id)) == 4  # a replay changes nothing


async def test_turns_saved_together_are_refused_together(pool: asyncpg.Pool) -> None:
    """One turn PostgreSQL refuses takes the batch back (the persister then writes each)."""
    meta = await new_conversation(pool)
    good = turn(meta.id, 1, user=message("user", "q"))
    refused = turn(meta.id, 5, reply=message("assistant", "half", status="unknown-status"))
    with pytest.raises(asyncpg.CheckViolationError):
        await messages.save_turns(pool, [good, refused])
    assert await messages.history(pool, meta.id) == []
    stored = await conversations.get(pool, meta.id)
    assert stored is not None and stored.history_seq == 0
