"""What a user can do to conversations, shared by the WebSocket and the REST API.

Ownership is checked here: a conversation that does not exist and one that belongs to
somebody else are the same `NotFound`, so nobody learns that another user's conversation
exists. A `say` or `regenerate` checks it without a round trip of its own when this process
has read the conversation's row before (`Copy`): the turn's script proves the copy current.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Final, cast

import asyncpg
import msgspec
from redis.asyncio import Redis
from redis.exceptions import RedisError

from protocol import frames as f
from protocol.approvals import Decision
from server.app import metrics, tracing
from server.app.config import Settings
from server.edge.failures import Refused as Refused
from server.edge.failures import refusal
from server.edge.spending import Spending
from server.redis import keys
from server.redis.approvals import Approvals
from server.redis.client import publish
from server.redis.eventlog import (
    UNLOADED,
    CachedHistory,
    CachedMeta,
    EventLog,
    Opening,
    Stamped,
    encode,
)
from server.redis.turns import Accepted, Admission, Budgeting, HookData, Job, Turns
from server.tools.definitions import known_tools, unknown_tools
from storage import conversations as stored_conversations

log = logging.getLogger("parley.conversations")


def not_found() -> Refused:
    return Refused("not_found", "no such conversation")


def unavailable(what: str) -> Refused:
    return Refused("unavailable", f"{what} is unavailable; try again shortly")


@dataclass(frozen=True, slots=True)
class Copy:
    """What a turn needs of a conversation's cached row, as this process last read it for the
    owner: the model (the spending check, the job) and the SHA-1 of the bytes read. The
    say/regenerate script goes ahead only while Redis holds those very bytes, so a copy never
    lets a turn past a changed model or system prompt, a deleted conversation or another
    user: those answer `stale` or `unloaded`, and the row is read again as `owned` reads it."""

    owner: str
    model: str
    sha: str


COPIES_KEPT: Final = 10_000
"""The conversations a web process keeps a `Copy` of (the oldest is dropped first)."""


class Conversations:
    """The conversation service: what a user may read and change, for sockets and REST alike."""

    def __init__(
        self, settings: Settings, redis: Redis, pool: asyncpg.Pool, events: EventLog, turns: Turns
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.pool = pool
        self.events = events
        self.turns = turns
        self.copies: dict[uuid.UUID, Copy] = {}
        self.spending = Spending(redis, pool, settings.budgets)
        self.approvals = Approvals(
            redis,
            settings.tools.approval_timeout,
            log_max_events=settings.redis.log_max_events,
            log_ttl=settings.redis.ttl_seconds,
        )

    # ------------------------------------------------------------------ reading

    async def owned(self, user: str, conversation: uuid.UUID) -> f.Conversation:
        """The conversation's meta if `user` owns it; loads its Redis state on first use."""
        stamped = await self._owned(user, conversation)
        self._keep(conversation, stamped)
        return stamped.cached.meta

    async def _owned(self, user: str, conversation: uuid.UUID) -> Stamped:
        """`owned`, with the SHA-1 of the row read."""
        try:
            stamped = await self.events.stamped(conversation)
        except RedisError as exc:
            raise refusal(exc, "Redis") from None
        if stamped is None:
            stamped = await self._seed(conversation)
        if stamped.cached.owner != user:
            raise not_found()
        return stamped

    def _keep(self, conversation: uuid.UUID, stamped: Stamped) -> Copy:
        """Keep the row its owner was just found to own as this process's `Copy`."""
        copy = Copy(stamped.cached.owner, stamped.cached.meta.model, stamped.sha)
        if conversation not in self.copies and len(self.copies) >= COPIES_KEPT:
            del self.copies[next(iter(self.copies))]
        self.copies[conversation] = copy
        return copy

    async def _copy(self, user: str, conversation: uuid.UUID) -> Copy:
        """This process's copy of the row for a turn of `user`'s; without one for them, the
        row read as `owned` reads it (`not_found` unless they own the conversation)."""
        copy = self.copies.get(conversation)
        if copy is not None and copy.owner == user:
            return copy
        return self._keep(conversation, await self._owned(user, conversation))

    async def load(self, conversation: uuid.UUID) -> CachedMeta:
        """Seed Redis with the conversation from PostgreSQL."""
        return (await self._seed(conversation)).cached

    async def _seed(self, conversation: uuid.UUID) -> Stamped:
        """`load`, with the SHA-1 of the row as this process encoded it."""
        row, recent = await self._stored(conversation)
        sha = await self.events.load(
            row.owner, row.meta, row.meta.last_seq, row.history_seq, recent
        )
        return Stamped(CachedMeta(row.owner, row.meta), sha)

    async def read_events(
        self, conversation: uuid.UUID, after: int
    ) -> tuple[int, list[tuple[int, bytes]]]:
        """The conversation's head seq and retained events after `after`, loading its Redis
        state from PostgreSQL first if Redis lost it."""
        head, events = await self.events.read(conversation, after)
        if head == UNLOADED:
            await self.load(conversation)
            head, events = await self.events.read(conversation, after)
        return head, events

    async def opening(self, user: str, conversation: uuid.UUID, after: int | None) -> Opening:
        """What a socket joining the conversation needs, once `user` is known to own it: the
        row and the events after `after`, or without `after` the persisted transcript and
        the events after it. One Redis round trip when Redis holds the conversation (and,
        without `after`, its transcript); PostgreSQL only for what Redis lacks."""
        try:
            opened = await self.events.opening(conversation, after)
            if opened.meta is None or opened.head == UNLOADED:
                await self.load(conversation)
                opened = await self.events.opening(conversation, after)
        except RedisError as exc:
            raise refusal(exc, "Redis") from None
        if opened.meta is None or opened.meta.owner != user:
            raise not_found()
        if after is not None or opened.history is not None:
            return opened
        start, messages = await self.history(conversation)
        head, events = await self.read_events(conversation, start)
        return Opening(opened.meta, head, events, CachedHistory(start, messages))

    async def history(
        self, conversation: uuid.UUID, cached: bool = True
    ) -> tuple[int, list[f.Message]]:
        """The persisted transcript and the seq it covers: from Redis when it keeps the
        latest (and `cached`), else from PostgreSQL (then kept in Redis for the next joins,
        and Redis's seq counter raised to PostgreSQL's where it lost events: a promoted
        replica's, `EventLog.cache_history`)."""
        if cached:
            with contextlib.suppress(RedisError):
                copy = await self.events.history(conversation)
                if copy is not None:
                    return copy.seq, copy.messages
        row, messages = await self._stored(conversation)
        with contextlib.suppress(RedisError):
            await self.events.cache_history(
                conversation, row.history_seq, messages, row.meta.last_seq
            )
        return row.history_seq, messages

    async def _stored(
        self, conversation: uuid.UUID
    ) -> tuple[stored_conversations.StoredConversation, list[f.Message]]:
        """The conversation's row and persisted messages from PostgreSQL."""
        try:
            row, messages = await stored_conversations.with_history(self.pool, conversation)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise refusal(exc, "the database") from None
        if row is None:
            raise not_found()
        return row, messages

    async def everything(self, user: str) -> list[f.Conversation]:
        """All of the user's conversations, however many (an export)."""
        rows = await stored_conversations.list_for(self.pool, user, limit=None)
        return [row.meta for row in rows]

    async def list(self, user: str) -> list[f.Conversation]:
        rows = await stored_conversations.list_for(self.pool, user)
        return [row.meta for row in rows]

    # ------------------------------------------------------------------ changing

    async def create(
        self,
        user: str,
        title: str | None,
        system: str | None,
        model: str | None,
        group: str = "",
        tools: builtins.list[str] | None = None,
    ) -> f.Conversation:
        """A new conversation; `group` is the user's budget group (the models it may pick),
        `tools` the configured tools offered in it (None: all)."""
        if model is not None:
            self.spending.allows(group, model)
        self._check_tools(tools)
        now = f.utcnow()
        meta = f.Conversation(
            id=f.new_id(),
            title=title or "New conversation",
            system=system or "",
            model=model or self.settings.llm.model,
            created_at=now,
            updated_at=now,
            tools=tools,
        )
        try:
            await stored_conversations.insert(self.pool, user, meta)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise refusal(exc, "the database") from None
        await self.events.load(user, meta, 0, 0, [])
        await self.tell(user, f.ConversationChanged(conversation=meta.id, meta=meta))
        return meta

    async def say(
        self,
        user: str,
        conversation: uuid.UUID,
        text: str,
        message_id: uuid.UUID | None,
        hook_data: HookData = None,
        group: str = "",
    ) -> tuple[uuid.UUID, bool]:
        """Accept a user turn; returns its message id and whether it was a duplicate.
        `hook_data` is what the socket's connect hook attached (docs/hooks.md), `group` the
        user's budget group. One Redis round trip (the say script) when this process has a
        current `Copy` of the conversation's row."""
        copy = await self._copy(user, conversation)
        self.spending.allows(group, copy.model)  # the group may have lost it since
        message = f.Message(
            id=message_id or f.new_id(),
            role="user",
            content=text,
            status="complete",
            created_at=f.utcnow(),
        )
        budgeting = self._budgeting(group)
        turn = self._turn("say", user, conversation, copy.model, hook_data, message.id, budgeting)
        with turn as (job, span):
            event = encode(f.MessageEvent(conversation=conversation, message=message))
            result = await self._admit(
                job,
                copy,
                lambda job, sha: self.turns.accept(
                    event, message, job, self._turn_limit, budgeting, sha
                ),
            )
            span.note("parley.admission", result.admission.value)
        return message.id, result.admission is Admission.DUPLICATE

    async def regenerate(
        self, user: str, conversation: uuid.UUID, hook_data: HookData = None, group: str = ""
    ) -> uuid.UUID:
        copy = await self._copy(user, conversation)
        self.spending.allows(group, copy.model)
        budgeting = self._budgeting(group)
        turn = self._turn("regenerate", user, conversation, copy.model, hook_data, None, budgeting)
        with turn as (job, span):
            result = await self._admit(
                job,
                copy,
                lambda job, sha: self.turns.regenerate(job, self._turn_limit, budgeting, sha),
            )
            span.note("parley.admission", result.admission.value)
        return job.message_id

    @staticmethod
    @contextlib.contextmanager
    def _turn(
        command: str,
        user: str,
        conversation: uuid.UUID,
        model: str,
        hook_data: HookData,
        user_message: uuid.UUID | None,
        budgeting: Budgeting,
    ) -> Iterator[tuple[Job, tracing.Traced]]:
        """The job for a new reply, within the span of accepting it (the trace's root)."""
        reply_id = f.new_id()
        with tracing.accepting(command, conversation, reply_id) as span:
            yield (
                Job(
                    conversation=conversation,
                    user=user,
                    message_id=reply_id,
                    model=model,
                    user_message=user_message,
                    accepted_at=time.time(),
                    traceparent=span.traceparent,
                    hook_data=hook_data,
                    group=budgeting.group,
                    budget_bucket=budgeting.bucket,
                ),
                span,
            )

    async def cancel(self, user: str, conversation: uuid.UUID) -> None:
        await self.owned(user, conversation)
        try:
            await self.turns.cancel(conversation, user)
        except RedisError as exc:
            raise refusal(exc, "Redis") from None
        metrics.CANCELS.inc()

    async def answer(
        self,
        user: str,
        conversation: uuid.UUID,
        call_id: str,
        decision: Decision,
        reason: str | None = None,
    ) -> f.Answer:
        """A person's `approve` or `deny` of a tool call waiting for it: the first answer
        settles it (and its `approval_resolved` event reaches every tab), a later one learns
        how it stands. Only the call's owner may answer: to anyone else the call is
        `not_found`, as another user's conversation is, so nobody learns it exists."""
        try:
            answered = await self.approvals.answer(
                str(conversation), call_id, user, decision, reason
            )
        except RedisError as exc:
            raise refusal(exc, "Redis") from None
        approval = answered.approval
        if approval is None or answered.outcome not in ("settled", "already"):
            raise Refused("not_found", f"no tool call {call_id!r} waits for an answer here")
        return f.Answer(
            call_id=call_id,
            state=cast(f.ApprovalState, approval.state),
            first=answered.outcome == "settled",
            by=approval.by,
            reason=approval.reason,
        )

    async def update(
        self,
        user: str,
        conversation: uuid.UUID,
        *,
        title: str | None = None,
        system: str | None = None,
        model: str | None = None,
        group: str = "",
        tools: builtins.list[str] | None = None,
    ) -> f.Conversation:
        await self.owned(user, conversation)
        if model is not None:
            self.spending.allows(group, model)
        self._check_tools(tools)
        head = await self.events.head(conversation)
        try:
            row = await stored_conversations.update(
                self.pool,
                conversation,
                user,
                title=title,
                system=system,
                model=model,
                seq=max(head, 0) + 1,
                now=f.utcnow(),
                tools=tools,
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise refusal(exc, "the database") from None
        if row is None:
            raise not_found()
        meta = msgspec.structs.replace(row.meta, last_seq=max(head, 0) + 1)
        await self.events.set_meta(user, meta)
        await self.events.append(
            conversation, encode(f.Updated(conversation=conversation, meta=meta))
        )
        await self.tell(user, f.ConversationChanged(conversation=conversation, meta=meta))
        return meta

    def _check_tools(self, tools: builtins.list[str] | None) -> None:
        """Refuse a choice of tools naming one that is not configured."""
        if tools is None:
            return
        unknown = unknown_tools(self.settings.tools, tools)
        if unknown:
            known = ", ".join(known_tools(self.settings.tools)) or "none"
            raise Refused("invalid", f"`tools`: unknown tool {unknown[0]!r} (tools: {known})")

    async def delete(self, user: str, conversation: uuid.UUID) -> None:
        await self.owned(user, conversation)
        if not await stored_conversations.delete(self.pool, conversation, user):
            raise not_found()
        await self.events.forget(conversation)
        await self.tell(user, f.ConversationChanged(conversation=conversation, deleted=True))

    # ------------------------------------------------------------------ the server API

    async def notice(self, user: str, conversation: uuid.UUID | None, text: str) -> int:
        """A system notice: into the user's conversation (its seq returned), or, without
        one, to every socket of the user (0 returned)."""
        if conversation is None:
            await self.tell(user, f.Notice(text=text, at=f.utcnow()))
            return 0
        await self.owned(user, conversation)
        event = encode(f.Notice(conversation=conversation, text=text, at=f.utcnow()))
        try:
            seq = await self.events.append(conversation, event)
            if seq == UNLOADED:
                await self.load(conversation)
                seq = await self.events.append(conversation, event)
            if seq == UNLOADED:
                raise unavailable("Redis")
            await stored_conversations.advance_seq(self.pool, conversation, seq)
        except (RedisError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise refusal(exc, "the notice") from None
        return seq

    async def erase_user(self, user: str) -> int:
        """Delete every conversation and message of the user, and their Redis state; the
        number of conversations deleted."""
        try:
            deleted = await stored_conversations.delete_all_for(self.pool, user)
            for conversation in deleted:
                await self.events.forget(conversation)
                await self.redis.delete(
                    keys.seq(conversation), keys.persisted(conversation), keys.present(conversation)
                )
            await self.redis.delete(keys.turn_rate(user))
        except (RedisError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise refusal(exc, "erasing the user") from None
        for conversation in deleted:
            await self.tell(user, f.ConversationChanged(conversation=conversation, deleted=True))
        return len(deleted)

    async def budget(self, user: str, group: str) -> f.Budget | None:
        """The user's budget for `ready`, when budgets are configured (else, or when it
        cannot be read now, None: `ready` goes without it)."""
        if not self.settings.budgets.enabled:
            return None
        try:
            state = await self.spending.state(user, group)
        except Refused as exc:
            log.warning("no budget in `ready`: %s", exc.message)
            return None
        return self.spending.budget_frame(state)

    async def tell(
        self, user: str, frame: f.ConversationChanged | f.Notice | f.UsageWarning
    ) -> None:
        """A user event to every socket of the user, on every web process."""
        try:
            await publish(self.redis, keys.USERS, keys.user_message(user, encode(frame)))
        except RedisError as exc:
            log.warning("could not publish a %s: %s", type(frame).__name__, exc)

    # ------------------------------------------------------------------ helpers

    @property
    def _turn_limit(self) -> int:
        return self.settings.limits.turns_per_minute

    def _budgeting(self, group: str) -> Budgeting:
        llm = self.settings.llm
        return self.spending.budgets.budgeting(group, llm.context_tokens, llm.max_tokens)

    async def _admit(
        self, job: Job, copy: Copy, attempt: Callable[[Job, str], Awaitable[Accepted]]
    ) -> Accepted:
        """Run a turn script (`attempt`, given the job and the SHA-1 of the copy of the row it
        was made from) and try again after mending what it lacked: the conversation not in
        Redis (loaded from PostgreSQL), a copy that is not Redis's row (read again, as `owned`
        does: `not_found` for a conversation deleted or not the user's; the job then names the
        model the row names now, which the user's group must allow), the user's budget not in
        Redis (rebuilt from the ledger)."""
        try:
            result = await attempt(job, copy.sha)
            for _ in range(3):  # each may be missing once, in this order
                if result.admission in (Admission.UNLOADED, Admission.STALE):
                    copy = self._keep(
                        job.conversation, await self._owned(job.user, job.conversation)
                    )
                elif result.admission is Admission.NO_BUDGET:
                    await self.spending.rebuild(job.user)
                    result = await attempt(job, copy.sha)
                    continue
                else:
                    break
                self.spending.allows(job.group, copy.model)
                job = msgspec.structs.replace(job, model=copy.model)
                result = await attempt(job, copy.sha)
        except RedisError as exc:
            raise refusal(exc, "Redis") from None
        metrics.TURNS.labels(result.admission.value).inc()
        if result.admission is Admission.OK and job.accepted_at:
            metrics.FIRST_TOKEN_STAGE.labels("accept").observe(
                max(time.time() - job.accepted_at, 0.0)
            )
        if result.admission is Admission.OVER_BUDGET:
            raise await self.spending.over_budget(job.user, job.group)
        return _check(result)


def _check(result: Accepted) -> Accepted:
    if result.admission is Admission.BUSY:
        raise Refused("busy", "a reply is already being generated in this conversation")
    if result.admission is Admission.RATE_LIMITED:
        raise Refused("rate_limited", "too many turns; wait a moment", result.retry_after)
    if result.admission is Admission.NOTHING:
        raise Refused("invalid", "there is no assistant reply to regenerate")
    if result.admission in (
        Admission.UNLOADED,
        Admission.STALE,
        Admission.NO_BUDGET,
        Admission.LATE,
    ):
        raise unavailable("Redis")
    return result
