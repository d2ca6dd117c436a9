"""Who has joined a conversation, across web processes, for the server API's presence.

One hash per conversation (`keys.present`): field `[process, user]` (JSON) -> how many of
that process's sockets watch the conversation for that user. Joins and leaves are counted
locally and sent in batches (one pipeline of HINCRBY per batch, whatever arrives while one is
in flight goes in the next), never waited for by the socket: presence is advisory. A read
keeps only live processes' counts (the registry `keys.PROCESSES` that `server.redis.presence`
keeps), so a crashed process's sockets vanish with its heartbeat; the hash expires after
`redis.ttl_seconds` without a join or leave."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from typing import Final

import msgspec
from redis.asyncio import Redis
from redis.exceptions import RedisError

from server.redis import keys

log = logging.getLogger("parley.rooms")

MAX_BATCH: Final = 256
RETRY_AFTER: Final = 1.0
MAX_RETRIES: Final = 5


class Present(msgspec.Struct, frozen=True):
    user: str
    sockets: int


class Rooms:
    def __init__(self, redis: Redis, process: str, ttl: int) -> None:
        self.redis = redis
        self.process = process
        self.ttl = ttl
        self._pending: Counter[tuple[uuid.UUID, str]] = Counter()
        self._sender: asyncio.Task[None] | None = None

    def joined(self, conversation: uuid.UUID, user: str) -> None:
        self._count(conversation, user, 1)

    def left(self, conversation: uuid.UUID, user: str) -> None:
        self._count(conversation, user, -1)

    async def stop(self) -> None:
        """Send what is pending (briefly: a process's counts die with it anyway)."""
        sender = self._sender
        if sender is not None:
            await asyncio.wait([sender], timeout=RETRY_AFTER * 2)
            sender.cancel()

    def _count(self, conversation: uuid.UUID, user: str, delta: int) -> None:
        self._pending[(conversation, user)] += delta
        if self._sender is None:
            self._sender = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        failures = 0
        try:
            while self._pending and failures < MAX_RETRIES:
                batch = list(self._pending.items())[:MAX_BATCH]
                for place, _ in batch:
                    del self._pending[place]
                try:
                    await self._write([(place, delta) for place, delta in batch if delta])
                    failures = 0
                except (RedisError, OSError) as exc:
                    failures += 1
                    log.warning("cannot record who joined a conversation; retrying: %s", exc)
                    self._pending.update(dict(batch))
                    await asyncio.sleep(RETRY_AFTER)
        finally:
            self._sender = None

    async def _write(self, batch: list[tuple[tuple[uuid.UUID, str], int]]) -> None:
        if not batch:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for (conversation, user), delta in batch:
                key = keys.present(conversation)
                pipe.hincrby(key, self._field(user), delta)
                pipe.expire(key, self.ttl)
            await pipe.execute()

    def _field(self, user: str) -> str:
        return msgspec.json.encode([self.process, user]).decode()


async def present(redis: Redis, conversation: uuid.UUID) -> list[Present]:
    """Users with sockets joined to the conversation on live web processes, and how many."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.time()
        pipe.zrange(keys.PROCESSES, 0, -1, withscores=True)
        pipe.hgetall(keys.present(conversation))
        (seconds, micros), processes, counts = await pipe.execute()
    now_ms = seconds * 1000 + micros // 1000
    live = {_text(name) for name, deadline in processes if deadline >= now_ms}
    sockets: Counter[str] = Counter()
    for field, count in counts.items():
        try:
            process, user = msgspec.json.decode(field, type=tuple[str, str])
        except msgspec.DecodeError:
            continue
        if process in live and int(count) > 0:
            sockets[user] += int(count)
    return [Present(user, n) for user, n in sorted(sockets.items())]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
