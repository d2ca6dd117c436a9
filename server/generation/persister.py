"""Finished turns, from the persist Streams (`keys.persist`: one per queue shard, each read
by its own loop) to PostgreSQL.

The entries of one read are decoded once and written together — one connection, one
transaction, one statement per kind of row (`save_turns`), retried while the failure is
transient — or, when PostgreSQL refuses them, each in its own transaction;
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
import time

import asyncpg
import msgspec
from redis.asyncio import Redis

from protocol import frames as f
from server.app import logs, metrics, tracing
from server.redis import keys, scripts
from server.redis.client import UNREACHABLE
from server.redis.deadletter import (
    TRANSIENT_DELAYS,
    DeadLetters,
    Malformed,
    Poisoned,
    attempt,
    is_transient,
)
from server.redis.eventlog import EventLog
from server.redis.replicas import Replication
from server.redis.streams import ConsumerGroup, Entry, consumer_name
from storage.messages import FinishedTurn, save_turn, save_turns

log = logging.getLogger("parley.persister")

CLAIM_IDLE_MS = 10_000
CLAIM_EVERY = 5.0

_turn_decoder = msgspec.json.Decoder(FinishedTurn)

Decoded = tuple[Entry, FinishedTurn]
"""An entry of a read and the finished turn it holds."""


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
        """Decode the entries once; write their turns together, or each alone if PostgreSQL
        refuses that; send those that do not decode to the dead letters; then mark and
        acknowledge the turns written, all in one round trip."""
        turns, malformed = _decode_all(entries)
        if entries:
            await self._replicated(group, entries, turns)
        saved = await self._persist_together(turns)
        if saved is None:
            saved = []
            for (entry_id, fields), turn in turns:
                if await self._persist(group, entry_id, fields, turn):
                    saved.append((entry_id, turn))
        for (entry_id, fields), error in malformed:  # the same bytes will not decode better
            await self.dead_letters.bury(
                group.stream, keys.PERSISTERS, entry_id, fields or {}, Poisoned(error, 1)
            )
        if saved:
            await self._done(group, saved)

    async def _persist_together(
        self, turns: list[Decoded]
    ) -> list[tuple[bytes, FinishedTurn]] | None:
        """The turns written in one transaction (`save_turns`: one connection, one statement
        per kind of row), or None when PostgreSQL refuses that: one turn it refuses rolls the
        others back with it, so each is then written alone (`_persist`), where a bad one is
        retried, then dead-lettered, without holding up the rest. Each turn's span is opened
        once they are written (from the time the write began): a batch that fails marks no
        turn's span, and the turn written alone has its own."""
        if not turns:
            return []
        began = time.time_ns()
        kept = await self._save_together([turn for _, turn in turns])
        if kept is None:
            return None
        for (_, turn), exists in zip(turns, kept, strict=True):
            with _span(turn, began):
                self._written(turn, exists)
        return [(entry_id, turn) for (entry_id, _), turn in turns]

    async def _save_together(self, turns: list[FinishedTurn]) -> list[bool] | None:
        """`save_turns`, retried with `attempt`'s back-off while the failure is transient
        (PostgreSQL unreachable or shutting down, a deadlock, a dropped connection: as long as
        it lasts, as a turn written alone is), counted; None at once on a permanent one."""
        transient = 0
        while True:
            try:
                return await save_turns(self.pool, [turn.storable() for turn in turns])
            except Exception as exc:  # whatever it is, each turn alone meets it again, or not
                if not is_transient(exc):
                    log.warning(
                        "cannot write %d finished turns together (%s); writing them one by one",
                        len(turns),
                        exc,
                    )
                    return None
                metrics.POSTGRES_ERRORS.labels("persister").inc()
                metrics.RETRIES.labels("persister").inc()
                if transient == 0:
                    log.warning("cannot write %d finished turns (%s); retrying", len(turns), exc)
                await asyncio.sleep(TRANSIENT_DELAYS[min(transient, len(TRANSIENT_DELAYS) - 1)])
                transient += 1

    async def _replicated(
        self, group: ConsumerGroup, entries: list[Entry], turns: list[Decoded]
    ) -> None:
        """Wait (bounded) until the replicas of `group`'s node hold the entries, and on a
        cluster those of their conversations' nodes the turns' events. Without them — a
        replica down or lagging, or a node not answering — the batch is written all the same
        (availability first), counted, and logged once until a wait succeeds."""
        entry_ids = [entry_id for entry_id, _ in entries]
        owners = [turn.conversation for _, turn in turns] if self.replication.clustered else []
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
        self, group: ConsumerGroup, entry_id: bytes, fields: dict[bytes, bytes], turn: FinishedTurn
    ) -> bool:
        """Whether the turn was written to PostgreSQL (False: it went to the dead letters)."""
        try:
            await attempt(lambda: self._save(turn), f"finished turn {entry_id.decode()}")
        except Poisoned as failure:
            await self.dead_letters.bury(group.stream, keys.PERSISTERS, entry_id, fields, failure)
            return False
        return True

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

    async def _save(self, turn: FinishedTurn) -> None:
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


def _span(
    turn: FinishedTurn, began: int | None = None
) -> contextlib.AbstractContextManager[tracing.Traced]:
    """The turn's "persist turn" span, in the trace of the generation that made it (begun
    at `began`, in ns since the epoch, if given)."""
    return tracing.continued(
        turn.traceparent, "persist turn", turn.conversation, turn.reply_id, began
    )


def _decode_all(entries: list[Entry]) -> tuple[list[Decoded], list[tuple[Entry, Malformed]]]:
    """The entries' turns, and the entries that hold none, each with why."""
    turns: list[Decoded] = []
    malformed: list[tuple[Entry, Malformed]] = []
    for entry in entries:
        try:
            turns.append((entry, _decode(entry[1])))
        except Malformed as error:
            malformed.append((entry, error))
    return turns, malformed


def _decode(fields: dict[bytes, bytes]) -> FinishedTurn:
    """The entry's turn; Malformed whatever stops that (a field missing or not what it should
    be, or no fields at all, as XAUTOCLAIM may give for an entry deleted meanwhile)."""
    try:
        turn = _turn_decoder.decode(fields[b"turn"])
        return msgspec.structs.replace(turn, done_seq=int(fields[b"done_seq"]))
    except Exception as exc:
        raise Malformed(f"not a finished turn: {exc}") from exc
