"""Messages, and the one transaction that records a finished turn."""

from __future__ import annotations

import uuid
from datetime import datetime

import asyncpg
import msgspec

from protocol.frames import Message
from protocol.text import scrub
from storage import usage as ledger
from storage.db import structs


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


_INSERT = (
    "INSERT INTO messages (id, conversation_id, role, content, status, model, usage, seq,"
    " created_at, parts, reason) SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11"
    " WHERE EXISTS (SELECT 1 FROM conversations WHERE id = $2){also}"
    " ON CONFLICT (conversation_id, id) DO NOTHING"
)
_INSERT_USER_MESSAGE = _INSERT.format(also="")
# Only a reply can have been replaced (by a `regenerate`); rows from before replaced replies
# were scoped to their conversation carry none and match in any.
_INSERT_REPLY = _INSERT.format(
    also=" AND NOT EXISTS (SELECT 1 FROM replaced_messages WHERE id = $1"
    " AND (conversation_id = $2 OR conversation_id IS NULL))"
)


def _row(conversation: uuid.UUID, message: Message, seq: int) -> tuple[object, ...]:
    usage = msgspec.to_builtins(message.usage) if message.usage else None
    parts = msgspec.to_builtins(message.parts) if message.parts is not None else None
    return (
        message.id,
        conversation,
        message.role,
        message.content,
        message.status,
        message.model,
        usage,
        seq,
        message.created_at,
        parts,
        message.reason,
    )


async def save_turn(pool: asyncpg.Pool, turn: FinishedTurn) -> bool:
    """Record a finished turn in one transaction; idempotent by (conversation, message id).

    Returns False when the conversation no longer exists (it was deleted meanwhile); the
    turn's usage is recorded all the same: its tokens were spent.
    """
    async with pool.acquire() as conn, conn.transaction():
        if turn.spent is not None:
            await ledger.record(
                conn, turn.conversation, turn.reply_id, turn.spent, turn.finished_at
            )
        # moving the conversation's seqs first also locks its row (turns of one conversation
        # are written one after the other), in the same statement
        exists = await conn.fetchval(
            "UPDATE conversations SET history_seq = GREATEST(history_seq, $2),"
            " last_seq = GREATEST(last_seq, $2), updated_at = GREATEST(updated_at, $3)"
            " WHERE id = $1 RETURNING 1",
            turn.conversation,
            turn.done_seq,
            turn.finished_at,
        )
        if not exists:
            return False
        if turn.user_message is not None:
            await conn.execute(
                _INSERT_USER_MESSAGE, *_row(turn.conversation, turn.user_message, turn.user_seq)
            )
        if turn.replaces is not None:
            await conn.execute(
                "INSERT INTO replaced_messages (conversation_id, id) VALUES ($1, $2)"
                " ON CONFLICT DO NOTHING",
                turn.conversation,
                turn.replaces,
            )
            await conn.execute(
                "DELETE FROM messages WHERE conversation_id = $1 AND id = $2",
                turn.conversation,
                turn.replaces,
            )
        if turn.reply is not None:
            await conn.execute(_INSERT_REPLY, *_row(turn.conversation, turn.reply, turn.done_seq))
    return True


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
