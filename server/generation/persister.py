"""Finished turns, from the persist Streams (`keys.persist`: one per queue shard, each read
by its own loop) to PostgreSQL.

The entries of one read are written together — one connection, one transaction, one
statement per kind of row (`save_turns`) — or, when that fails, each in its own transaction;
idempotently (message ids were chosen before the write), and acknowledged only after the
commit (the entries of one read together, with their `mark_persisted` calls, in one round
trip): PostgreSQL being down delays persistence and loses nothing. Entries left pending by
a persister that died are claimed by another. Where the stream's node has replicas, a batch
is written only once they hold it (server/redis/replicas.py), or after
`redis.persist_wait_ms` without them (counted, `parley_persist_unreplicated_total`):
PostgreSQL is then not ahead of a replica that could be promoted. An entry that cannot be
written (malformed, or refused by PostgreSQL) goes to the dead-letter stream
after a few attempts (server/deadletter.py), so it never holds up the turns after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

import asyncpg
import msgspec
from redis.asyncio import Redis

from protocol import frames as f
from server.app import logs, metrics, tracing
from server.redis import keys, scripts
from server.redis.client import UNREACHABLE
from server.redis.deadletter import DeadLetters, Malformed, Poisoned, attempt
from server.redis.eventlog import EventLog
from server.redis.replicas import Replication
from server.redis.streams import ConsumerGroup, Entry, consumer_name
from storage.messages import FinishedTurn, save_turn, save_turns

log = logging.getLogger("parley.persister")

CLAIM_IDLE_MS = 10_000
CLAIM_EVERY = 5.0

_turn_decoder = msgspec.json.Decoder(FinishedTurn)


class _Owner(msgspec.Struct):
    """A finished turn's conversation alone (the rest of the entry is skipped unread)."""

    conversation: uuid.UUID


_owner_decoder = msgspec.json.Decoder(_Owner)


def _owners(entries: list[Entry]) -> list[uuid.UUID]:
    """The conversations of the entries that name one (a malformed entry is left for
    `_persist`, which sends it to the dead letters)."""
    owners = []
    for _, fields in entries:
        try:
            owners.append(_owner_decoder.decode(fields[b"turn"]).conversation)
        except (KeyError, msgspec.DecodeError):
            continue
    return owners


class Persister:
    def __init__(
        self,
        redis: Redis,
        pool: asyncpg.Pool,
        events: EventLog,
        name: str | None = None,
        shards: int = 1,
        wait_ms: int = 0,
    ) -> None:
        """`shards`: how many persist streams there are (`keys.persist`); all are read.
        `wait_ms`: how long a batch waits for the replicas of its stream's node (0: not)."""
        self.redis = redis
        self.events = events
        self.pool = pool
        self.name = name or consumer_name()
        self.groups = [
            ConsumerGroup(redis, keys.persist(shard), keys.PERSISTERS, self.name)
            for shard in range(shards)
        ]
        self.saved = 0
        self.dead_letters = DeadLetters(redis)
        self.replication = Replication(redis, wait_ms)
        self._unreplicated = False
        self._stopping = False

    async def run(self) -> None:
        """Read every persist shard, each in its own loop."""
        await asyncio.gather(*(self._run_shard(group) for group in self.groups))

    async def _run_shard(self, group: ConsumerGroup) -> None:
        await group.ensure()
        pending_checked = 0.0
        loop = asyncio.get_running_loop()
        while not self._stopping:
            try:
                if loop.time() - pending_checked > CLAIM_EVERY:
                    pending_checked = loop.time()
                    await self._claim_abandoned(group)
                entries = await group.read(100, 1000)
            except UNREACHABLE as exc:
                metrics.REDIS_ERRORS.labels("persister").inc()
                metrics.RETRIES.labels("persister").inc()
                log.warning("cannot read finished turns (%s); retrying", exc)
                await asyncio.sleep(1.0)
                continue
            await self._persist_all(group, entries)

    def stop(self) -> None:
        self._stopping = True

    async def _claim_abandoned(self, group: ConsumerGroup) -> None:
        await self._persist_all(group, await group.autoclaim(CLAIM_IDLE_MS))

    async def _persist_all(self, group: ConsumerGroup, entries: list[Entry]) -> None:
        """Write the entries together, or each alone if that fails, then mark and
        acknowledge those written, all in one round trip."""
        if entries:
            await self._replicated(group, entries)
        saved = await self._persist_together(entries)
        written = {entry_id for entry_id, _ in saved}
        for entry_id, fields in entries:
            if entry_id in written:
                continue
            turn = await self._persist(group, entry_id, fields)
            if turn is not None:
                saved.append((entry_id, turn))
        if saved:
            await self._done(group, saved)

    async def _persist_together(self, entries: list[Entry]) -> list[tuple[bytes, FinishedTurn]]:
        """The entries' turns written in one transaction (`save_turns`: one connection, one
        statement per kind of row), or none when that fails: one turn PostgreSQL refuses
        rolls the others back with it, so each is then written alone (`_persist`), where a
        bad one is retried, then dead-lettered, without holding up the rest. Entries that
        do not decode are left to `_persist` too."""
        turns: list[tuple[bytes, FinishedTurn]] = []
        for entry_id, fields in entries:
            with contextlib.suppress(Malformed):
                turns.append((entry_id, _decode(fields)))
        if not turns:
            return []
        try:
            with contextlib.ExitStack() as spans:
                for _, turn in turns:
                    spans.enter_context(_span(turn))
                kept = await save_turns(self.pool, [turn.storable() for _, turn in turns])
        except Exception as exc:  # whatever it is, each turn alone meets it again, or not
            log.warning(
                "cannot write %d finished turns together (%s); writing them one by one",
                len(turns),
                exc,
            )
            return []
        for (_, turn), exists in zip(turns, kept, strict=True):
            self._written(turn, exists)
        return turns

    async def _replicated(self, group: ConsumerGroup, entries: list[Entry]) -> None:
        """Wait (bounded) until the replicas of `group`'s node hold the entries, and on a
        cluster those of their conversations' nodes the turns' events. Without them — a
        replica down or lagging, or a node not answering — the batch is written all the same
        (availability first), counted, and logged once until a wait succeeds."""
        entry_ids = [entry_id for entry_id, _ in entries]
        owners = _owners(entries) if self.replication.clustered else []
        try:
            if await self.replication.settled(group, entry_ids, owners):
                self._unreplicated = False
                return
            reason = f"no replica acknowledged within {self.replication.timeout_ms} ms"
        except UNREACHABLE as exc:
            metrics.REDIS_ERRORS.labels("persister").inc()
            reason = f"cannot wait for replicas ({exc})"
        metrics.PERSIST_UNREPLICATED.inc(len(entry_ids))
        if not self._unreplicated:
            self._unreplicated = True
            log.warning("%s: finished turns persisted unreplicated", reason)

    async def _persist(
        self, group: ConsumerGroup, entry_id: bytes, fields: dict[bytes, bytes]
    ) -> FinishedTurn | None:
        """The turn once written to PostgreSQL; None when it went to the dead letters."""
        try:
            turn = await attempt(lambda: self._save(fields), f"finished turn {entry_id.decode()}")
        except Poisoned as failure:
            await self.dead_letters.bury(group.stream, keys.PERSISTERS, entry_id, fields, failure)
            return None
        return turn

    def _written(self, turn: FinishedTurn, exists: bool) -> None:
        """Count a turn PostgreSQL now holds (or dropped, its conversation gone)."""
        if not exists:
            log.info("conversation %s is gone; turn dropped", turn.conversation)
        self.saved += 1
        metrics.PERSISTED.inc()
        metrics.PERSIST_LAG.observe(max((f.utcnow() - turn.finished_at).total_seconds(), 0.0))

    async def _done(self, group: ConsumerGroup, saved: list[tuple[bytes, FinishedTurn]]) -> None:
        """Record that PostgreSQL holds each turn's events (the logs may trim them) and
        acknowledge the entries, in one pipeline. A mark that fails is left for the next turn
        of its conversation (marks only move forward), as a mark Redis could not take always
        was; the acknowledgement is retried until Redis takes it."""
        marks = [self.events.persisted_call(t.conversation, t.done_seq) for _, t in saved]
        entry_ids = [entry_id for entry_id, _ in saved]
        try:
            unknown = await group.ack_after(marks, entry_ids)
            if unknown:  # scripts Redis forgot (restarted, failed over): loaded and run again
                await scripts.pipelined(self.redis, unknown)
        except UNREACHABLE as exc:
            log.warning("cannot mark finished turns persisted (%s)", exc)
            await self._ack(group, entry_ids)

    async def _save(self, fields: dict[bytes, bytes]) -> FinishedTurn:
        turn = _decode(fields)
        logs.CONVERSATION.set(str(turn.conversation))
        logs.MESSAGE.set(str(turn.reply_id))
        try:
            with _span(turn):
                exists = await save_turn(self.pool, turn.storable())
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            metrics.POSTGRES_ERRORS.labels("persister").inc()
            metrics.RETRIES.labels("persister").inc()
            raise
        self._written(turn, exists)
        return turn

    async def _ack(self, group: ConsumerGroup, entry_ids: list[bytes]) -> None:
        while True:
            try:
                await group.ack(*entry_ids)
                return
            except UNREACHABLE as exc:
                metrics.REDIS_ERRORS.labels("persister").inc()
                metrics.RETRIES.labels("persister").inc()
                log.warning("cannot acknowledge turn (%s); retrying", exc)
                await asyncio.sleep(1.0)


def _span(turn: FinishedTurn) -> contextlib.AbstractContextManager[tracing.Traced]:
    """The turn's "persist turn" span, in the trace of the generation that made it."""
    return tracing.continued(turn.traceparent, "persist turn", turn.conversation, turn.reply_id)


def _decode(fields: dict[bytes, bytes]) -> FinishedTurn:
    try:
        turn = _turn_decoder.decode(fields[b"turn"])
        return msgspec.structs.replace(turn, done_seq=int(fields[b"done_seq"]))
    except (KeyError, ValueError, msgspec.DecodeError) as exc:
        raise Malformed(f"not a finished turn: {exc}") from exc
