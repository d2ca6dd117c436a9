"""Finished turns, from the `parley:persist` Stream to PostgreSQL.

Each entry is written in one transaction, idempotently (message ids were chosen before the
write), and acknowledged only after the commit: PostgreSQL being down delays persistence and
loses nothing. Entries left pending by a persister that died are claimed by another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

import asyncpg
import msgspec
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from protocol import frames as f
from server.app import logs, metrics
from server.redis import keys
from server.redis.eventlog import EventLog
from server.redis.turns import read_group
from storage.messages import FinishedTurn, save_turn

log = logging.getLogger("parley.persister")

RETRY_DELAYS = (0.1, 0.2, 0.5, 1.0)
CLAIM_IDLE_MS = 10_000
CLAIM_EVERY = 5.0

_turn_decoder = msgspec.json.Decoder(FinishedTurn)


class Persister:
    def __init__(
        self, redis: Redis, pool: asyncpg.Pool, events: EventLog, name: str | None = None
    ) -> None:
        self.redis = redis
        self.events = events
        self.pool = pool
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.saved = 0
        self._stopping = False

    async def run(self) -> None:
        await self._ensure_group()
        pending_checked = 0.0
        loop = asyncio.get_running_loop()
        while not self._stopping:
            try:
                if loop.time() - pending_checked > CLAIM_EVERY:
                    pending_checked = loop.time()
                    await self._claim_abandoned()
                entries = await read_group(
                    self.redis, keys.PERSIST, keys.PERSISTERS, self.name, 100, 1000
                )
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                log.warning("persist consumer group missing; creating it again")
                await self._ensure_group()
                continue
            except (RedisError, OSError) as exc:
                metrics.REDIS_ERRORS.labels("persister").inc()
                metrics.RETRIES.labels("persister").inc()
                log.warning("cannot read finished turns (%s); retrying", exc)
                await asyncio.sleep(1.0)
                continue
            for entry_id, fields in entries:
                await self._persist(entry_id, fields)

    def stop(self) -> None:
        self._stopping = True

    async def _ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(keys.PERSIST, keys.PERSISTERS, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _claim_abandoned(self) -> None:
        reply = await self.redis.xautoclaim(
            keys.PERSIST, keys.PERSISTERS, self.name, CLAIM_IDLE_MS, "0-0", count=100
        )
        claimed = reply[1]  # Redis 7 adds a third element (deleted ids)
        for entry_id, fields in claimed:
            await self._persist(entry_id, fields)

    async def _persist(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        try:
            turn = _turn_decoder.decode(fields[b"turn"])
            turn = msgspec.structs.replace(turn, done_seq=int(fields[b"done_seq"]))
        except (KeyError, ValueError, msgspec.DecodeError):
            log.error("dropping malformed finished turn %s", entry_id)
            await self._ack(entry_id)
            return
        logs.CONVERSATION.set(str(turn.conversation))
        logs.MESSAGE.set(str(turn.reply.id))
        await self._save(turn)
        metrics.PERSISTED.inc()
        metrics.PERSIST_LAG.observe(max((f.utcnow() - turn.finished_at).total_seconds(), 0.0))
        with contextlib.suppress(RedisError, OSError):
            await self.events.mark_persisted(turn.conversation, turn.done_seq)
        await self._ack(entry_id)

    async def _save(self, turn: FinishedTurn) -> None:
        """Retry until the commit succeeds: a database outage only delays the write."""
        attempt = 0
        while True:
            try:
                if not await save_turn(self.pool, turn):
                    log.info("conversation %s is gone; turn dropped", turn.conversation)
                self.saved += 1
                return
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                metrics.POSTGRES_ERRORS.labels("persister").inc()
                metrics.RETRIES.labels("persister").inc()
                if attempt == 0:
                    log.warning("cannot write turn (%s); retrying until the database is back", exc)
                await asyncio.sleep(RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)])
                attempt += 1

    async def _ack(self, entry_id: bytes) -> None:
        while True:
            try:
                pipe = self.redis.pipeline(transaction=False)
                pipe.xack(keys.PERSIST, keys.PERSISTERS, entry_id)
                pipe.xdel(keys.PERSIST, entry_id)
                await pipe.execute()
                return
            except (RedisError, OSError) as exc:
                metrics.REDIS_ERRORS.labels("persister").inc()
                metrics.RETRIES.labels("persister").inc()
                log.warning("cannot acknowledge turn (%s); retrying", exc)
                await asyncio.sleep(1.0)
