"""Messages, and the one transaction that records a finished turn."""

from __future__ import annotations

import uuid
from datetime import datetime

import asyncpg
import msgspec

from protocol.frames import Message
from protocol.text import scrub
from storage import usage as ledger
from storage.db import columns, json_text, structs


class FinishedTurn(msgspec.Struct, frozen=True, kw_only=True):
    """A user turn (absent for a regenerate) and the assistant reply it got (none when the
    host application's turn hook refused the turn: the user's message is kept alone).

    `done_seq` is the seq of the reply's `done` event (of the refusal's `error`): the
    transcript covers events up to it.
    """

    conversation: uuid.UUID
    user_message: Message | None
    user_seq: int
    reply: Message | None
    replaces: uuid.UUID | None
    finished_at: datetime
    done_seq: int = 0
    traceparent: str | None = None
    """The generation's trace context, for the persister's span (server/app/tracing.py)."""
    spent: ledger.UsageEntry | None = None
    """The reply's row in the usage ledger (absent in turns queued by older versions)."""
    refused_reply: uuid.UUID | None = None
    """Without a `reply`: the id the refused turn's reply would have had."""

    def __post_init__(self) -> None:
        if self.reply is None and self.refused_reply is None:
            raise ValueError("a turn without a reply names its refused reply")

    @property
    def reply_id(self) -> uuid.UUID:
        """The reply's id, or the one the refused turn's reply would have had."""
        return self.reply.id if self.reply is not None else self.refused_reply  # type: ignore[return-value]

    def storable(self) -> FinishedTurn:
        """This turn with text PostgreSQL cannot hold (NUL, lone surrogates) replaced by
        U+FFFD: the text was checked when it came in, but a queued turn is kept, not refused."""
        user = self.user_message
        return msgspec.structs.replace(
            self,
            user_message=None if user is None else _storable(user),
            reply=None if self.reply is None else _storable(self.reply),
        )


def _storable(message: Message) -> Message:
    model = None if message.model is None else scrub(message.model)
    parts = message.parts
    if parts is not None:
        parts = [msgspec.structs.replace(p, text=scrub(p.text)) for p in parts]
    return msgspec.structs.replace(
        message, content=scrub(message.content), model=model, parts=parts
    )


_MOVE_SEQS = (
    "WITH moved AS (SELECT id, max(seq) AS seq, max(at) AS at"
    " FROM unnest($1::uuid[], $2::bigint[], $3::timestamptz[]) AS t (id, seq, at) GROUP BY id),"
    " locked AS MATERIALIZED (SELECT id FROM conversations"
    " WHERE id IN (SELECT id FROM moved) ORDER BY id FOR UPDATE)"
    " UPDATE conversations c SET history_seq = GREATEST(c.history_seq, m.seq),"
    " last_seq = GREATEST(c.last_seq, m.seq), updated_at = GREATEST(c.updated_at, m.at)"
    " FROM locked l JOIN moved m ON m.id = l.id WHERE c.id = l.id RETURNING c.id"
)
_REPLACE = (
    "INSERT INTO replaced_messages (conversation_id, id)"
    " SELECT * FROM unnest($1::uuid[], $2::uuid[]) ON CONFLICT DO NOTHING"
)
_DELETE_REPLACED = (
    "DELETE FROM messages WHERE (conversation_id, id) IN"
    " (SELECT * FROM unnest($1::uuid[], $2::uuid[]))"
)
# Only a reply can have been replaced (by a `regenerate`); rows from before replaced replies
# were scoped to their conversation carry none and match in any.
_INSERT = (
    "INSERT INTO messages (id, conversation_id, role, content, status, model, usage, seq,"
    " created_at, parts, reason)"
    " SELECT id, conversation_id, role, content, status, model, usage::jsonb, seq, created_at,"
    " parts::jsonb, reason FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[],"
    " $5::text[], $6::text[], $7::text[], $8::bigint[], $9::timestamptz[], $10::text[],"
    " $11::text[], $12::boolean[]) AS t (id, conversation_id, role, content, status, model,"
    " usage, seq, created_at, parts, reason, reply)"
    " WHERE NOT (reply AND EXISTS (SELECT 1 FROM replaced_messages r WHERE r.id = t.id"
    " AND (r.conversation_id = t.conversation_id OR r.conversation_id IS NULL)))"
    " ON CONFLICT (conversation_id, id) DO NOTHING"
)


def _row(conversation: uuid.UUID, message: Message, seq: int, reply: bool) -> tuple[object, ...]:
    """A message's row as `_INSERT` takes it (the jsonb columns as text)."""
    return (
        message.id,
        conversation,
        message.role,
        message.content,
        message.status,
        message.model,
        json_text(message.usage) if message.usage else None,
        seq,
        message.created_at,
        json_text(message.parts) if message.parts is not None else None,
        message.reason,
        reply,
    )


async def save_turn(pool: asyncpg.Pool, turn: FinishedTurn) -> bool:
    """Record a finished turn in one transaction; idempotent by (conversation, message id).

    Returns False when the conversation no longer exists (it was deleted meanwhile); the
    turn's usage is recorded all the same: its tokens were spent.
    """
    return (await save_turns(pool, [turn]))[0]


async def save_turns(pool: asyncpg.Pool, turns: list[FinishedTurn]) -> list[bool]:
    """Record finished turns in one transaction on one connection, as `save_turn` records
    each (whatever order they come in, and however often: a turn written twice, or a
    regenerated reply before the turn it replaces, leaves what one write in order leaves),
    in one statement per kind of row for all of them. Whether each turn's conversation
    still exists, in order. One turn PostgreSQL refuses rolls back them all.

    No two batches wait for each other in a cycle: the usage rows (the only rows written
    before any lock) go in the order of their keys, then the statement that moves the seqs
    locks the conversations' rows in the order of their ids, and the turns' messages are
    written under those locks. Nor does a batch with any other statement that locks several
    conversations: the only one, the erasure of a user's (storage/conversations.py
    `delete_all_for`), locks them in the order of their ids too; every other one locks a
    single conversation.
    """
    async with pool.acquire() as conn, conn.transaction():
        spent = [
            (t.conversation, t.reply_id, t.spent, t.finished_at)
            for t in turns
            if t.spent is not None
        ]
        if spent:
            await ledger.record(conn, spent)
        moved = await conn.fetch(
            _MOVE_SEQS,
            [t.conversation for t in turns],
            [t.done_seq for t in turns],
            [t.finished_at for t in turns],
        )
        existing = {row[0] for row in moved}
        kept = [t for t in turns if t.conversation in existing]
        replaced = [(t.conversation, t.replaces) for t in kept if t.replaces is not None]
        if replaced:
            pairs = columns(replaced, 2)
            await conn.execute(_REPLACE, *pairs)
            await conn.execute(_DELETE_REPLACED, *pairs)
        rows = [
            _row(t.conversation, message, seq, reply)
            for t in kept
            for message, seq, reply in (
                (t.user_message, t.user_seq, False),
                (t.reply, t.done_seq, True),
            )
            if message is not None
        ]
        if rows:
            await conn.execute(_INSERT, *columns(rows, 12))
    return [t.conversation in existing for t in turns]


async def history(
    pool: asyncpg.Pool | asyncpg.Connection, conversation: uuid.UUID
) -> list[Message]:
    rows = await pool.fetch(
        "SELECT id, role, content, status, model, usage, created_at, parts, reason"
        " FROM messages"
        " WHERE conversation_id = $1 ORDER BY seq, created_at",
        conversation,
    )
    return structs(rows, Message)
