"""Poison isolation for Parley's queues (Redis Streams read through a consumer group).

Whatever handles an entry runs under `attempt`: a failure is either transient (Redis or
PostgreSQL unreachable, a deadlock, a server shutting down: retried with back-off for as long
as it lasts, as an outage only delays the queue) or permanent (the entry cannot be decoded, or
PostgreSQL refuses it: an encoding, data or constraint error, or any error nobody expected).
A permanent failure is tried `PERMANENT_ATTEMPTS` times, then the entry is moved to the
dead-letter stream `parley:deadletter` with the error, its source queue and group, the number
of attempts and the time, acknowledged and deleted in the same MULTI, and logged at error
level. The queue moves on at once: one bad entry delays the others by its own few retries.

`parley deadletter list | retry <id> | drop <id>` (server/app/cli.py) shows them to the operator,
puts one back on its source queue, or discards it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, TypeVar, cast

import asyncpg
import msgspec
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from server.redis import keys
from server.redis.client import is_cluster

log = logging.getLogger("parley.deadletter")

PERMANENT_ATTEMPTS: Final = 3
PERMANENT_DELAYS: Final = (0.05, 0.2)
TRANSIENT_DELAYS: Final = (0.1, 0.2, 0.5, 1.0)
KEPT: Final = 10_000
"""The dead-letter stream keeps about this many entries (older ones are trimmed)."""
ERROR_CHARS: Final = 500
FIELD_PREFIX: Final = "field:"

# SQLSTATE classes that mean "not now" rather than "not this": connection exception,
# transaction rollback (serialization, deadlock), insufficient resources, object not in
# prerequisite state (lock not available), operator intervention (shutdown), system error.
_TRANSIENT_SQL_CLASSES: Final = frozenset({"08", "40", "53", "55", "57", "58"})
_TRANSIENT_REDIS_REPLIES: Final = ("OOM", "BUSY", "LOADING", "TRYAGAIN", "MASTERDOWN", "READONLY")

T = TypeVar("T")


class Transient(Exception):
    """Raised by a handler for a failure that must be retried until it passes."""


class Malformed(Exception):
    """Raised by a handler for an entry it cannot read: permanent."""


class Poisoned(Exception):
    """An entry failed permanently `attempts` times; `error` is the last failure."""

    def __init__(self, error: BaseException, attempts: int) -> None:
        super().__init__(f"{describe(error)} ({attempts} attempts)")
        self.error = error
        self.attempts = attempts


def is_transient(exc: BaseException) -> bool:
    """True for a failure worth retrying as it is; False for one that will fail again."""
    if isinstance(exc, Transient):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        return (exc.sqlstate or "")[:2] in _TRANSIENT_SQL_CLASSES
    if isinstance(exc, asyncpg.InterfaceError) and isinstance(exc, ValueError):
        return False  # asyncpg's own DataError: an argument it cannot encode
    if isinstance(exc, ResponseError):
        return str(exc).startswith(_TRANSIENT_REDIS_REPLIES)
    return isinstance(exc, OSError | RedisError | asyncpg.InterfaceError)


def describe(exc: BaseException) -> str:
    cause = exc.__cause__ if isinstance(exc, Transient | Malformed) and exc.__cause__ else exc
    return f"{type(cause).__name__}: {cause}"[:ERROR_CHARS]


async def attempt(work: Callable[[], Awaitable[T]], what: str) -> T:
    """Run `work` until it succeeds: a transient failure is retried with back-off as long as
    it lasts; a permanent one up to PERMANENT_ATTEMPTS times (Malformed: once, as the same
    bytes will not decode better), then Poisoned is raised."""
    failures = 0
    transient = 0
    while True:
        try:
            return await work()
        except Exception as exc:
            if is_transient(exc):
                if transient == 0:
                    log.warning("cannot handle %s (%s); retrying until it passes", what, exc)
                delay = TRANSIENT_DELAYS[min(transient, len(TRANSIENT_DELAYS) - 1)]
                transient += 1
            else:
                failures += 1
                if failures >= PERMANENT_ATTEMPTS or isinstance(exc, Malformed):
                    raise Poisoned(exc, failures + transient) from exc
                log.warning("%s failed (%s); trying again", what, describe(exc), exc_info=exc)
                delay = PERMANENT_DELAYS[min(failures - 1, len(PERMANENT_DELAYS) - 1)]
            await asyncio.sleep(delay)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead-lettered entry as the operator sees it."""

    id: str
    source: str
    group: str
    entry: str
    error: str
    attempts: int
    at: float
    fields: dict[str, bytes]


class DeadLetters:
    """The dead-letter stream: bury an entry from a queue, list, retry or drop them."""

    def __init__(self, redis: Redis, stream: str = keys.DEADLETTER) -> None:
        self.redis = redis
        self.stream = stream

    async def bury(
        self,
        source: str,
        group: str,
        entry_id: bytes,
        fields: dict[bytes, bytes],
        failure: Poisoned,
    ) -> None:
        """Move the entry to the dead-letter stream and take it off its queue, in one MULTI;
        retried while Redis is unreachable, so the entry is never lost."""
        record: dict[str | bytes, bytes | str | int | float] = {
            "source": source,
            "group": group,
            "entry": entry_id,
            "error": describe(failure.error),
            "attempts": failure.attempts,
            "at": round(time.time(), 3),
        }
        record.update({FIELD_PREFIX.encode() + name: value for name, value in fields.items()})
        log.error(
            "entry %s of %s failed %d times (%s); moved to %s",
            entry_id.decode(),
            source,
            failure.attempts,
            describe(failure.error),
            self.stream,
        )
        delay = 0
        while True:
            try:
                # one step on one Redis; on a cluster the streams are on two slots, and a
                # retry after a half-done pipeline can only add the dead letter twice
                async with self.redis.pipeline(transaction=not is_cluster(self.redis)) as pipe:
                    pipe.xadd(self.stream, record, maxlen=KEPT, approximate=True)  # type: ignore[arg-type]
                    pipe.xack(source, group, entry_id)
                    pipe.xdel(source, entry_id)
                    await pipe.execute()
                return
            except (RedisError, OSError) as exc:
                log.warning("cannot dead-letter %s (%s); retrying", entry_id.decode(), exc)
                await asyncio.sleep(TRANSIENT_DELAYS[min(delay, len(TRANSIENT_DELAYS) - 1)])
                delay += 1

    async def list(self, count: int = 100) -> list[DeadLetter]:
        """The oldest `count` dead letters."""
        entries = cast(
            list[tuple[bytes, dict[bytes, bytes]]],
            await self.redis.xrange(self.stream, count=count),
        )
        return [_dead_letter(entry_id, fields) for entry_id, fields in entries]

    async def get(self, dead_id: str) -> DeadLetter | None:
        entries = cast(
            list[tuple[bytes, dict[bytes, bytes]]],
            await self.redis.xrange(self.stream, dead_id, dead_id),
        )
        return _dead_letter(*entries[0]) if entries else None

    async def retry(self, dead_id: str) -> str | None:
        """Put a dead letter back on its source queue (as a new entry); its new id, or None
        when there is no such dead letter."""
        letter = await self.get(dead_id)
        if letter is None:
            return None
        async with self.redis.pipeline(transaction=not is_cluster(self.redis)) as pipe:
            pipe.xadd(letter.source, letter.fields)  # type: ignore[arg-type]
            pipe.xdel(self.stream, dead_id)
            new_id, _ = await pipe.execute()
        return str(new_id.decode() if isinstance(new_id, bytes) else new_id)

    async def drop(self, dead_id: str) -> bool:
        return bool(await self.redis.xdel(self.stream, dead_id))


def _dead_letter(entry_id: bytes, fields: dict[bytes, bytes]) -> DeadLetter:
    def text(name: bytes) -> str:
        return fields.get(name, b"").decode(errors="replace")

    prefix = FIELD_PREFIX.encode()
    return DeadLetter(
        id=entry_id.decode(),
        source=text(b"source"),
        group=text(b"group"),
        entry=text(b"entry"),
        error=text(b"error"),
        attempts=int(fields.get(b"attempts", b"0")),
        at=float(fields.get(b"at", b"0")),
        fields={
            name[len(prefix) :].decode(errors="replace"): value
            for name, value in fields.items()
            if name.startswith(prefix)
        },
    )


def encode_letter(letter: DeadLetter) -> bytes:
    """A dead letter as one JSON line for the CLI (field values as text, bad bytes replaced)."""
    return msgspec.json.encode(
        {
            "id": letter.id,
            "source": letter.source,
            "group": letter.group,
            "entry": letter.entry,
            "error": letter.error,
            "attempts": letter.attempts,
            "at": letter.at,
            "fields": {k: v.decode(errors="replace") for k, v in letter.fields.items()},
        }
    )
