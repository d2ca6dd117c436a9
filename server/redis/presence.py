"""Open sockets per user, counted across every web process, for the per-user connection limit.

Each process keeps its own count in a per-user hash (field = process id) and its heartbeat
in the registry of live processes (`keys.PROCESSES`, a deadline on Redis's clock); counts of
processes whose deadline passed (they died) are dropped at the next admission, so a crash
never locks a user out. The scripts are `scripts/admit.lua`, `leave.lua` and `beat.lua`.

Admissions and departures are batched: whatever arrives while one Redis call is in flight
goes in the next, as one script call for all the users in it. Under a connection storm that
is one round trip per few dozen sockets instead of one each; alone, a socket waits for no
one (`batches.Batches`, which the joins' reads use too). A departure that cannot reach Redis
is kept and sent with the next batch.

On a Redis Cluster every user's hash is on its own slot and the registry on another, so a
batch is one `live_processes` call, then one `admit_live` (or `leave`) call per user, all in
one pipeline each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections import Counter
from typing import Final

from redis.asyncio import Redis
from redis.exceptions import RedisError

from server.redis import keys, scripts
from server.redis.batches import Batches
from server.redis.client import is_cluster

log = logging.getLogger("parley.presence")

HEARTBEAT_TTL: Final = 30
HEARTBEAT_EVERY: Final = 10.0
MAX_BATCH: Final = 256
RETRY_AFTER: Final = 1.0

ADMIT: Final = scripts.load("admit", functions=["lib_now", "lib_admit"])
ADMIT_LIVE: Final = scripts.load("admit_live", functions=["lib_admit"])
LIVE_PROCESSES: Final = scripts.load("live_processes", functions=["lib_now"])
LEAVE: Final = scripts.load("leave")
BEAT: Final = scripts.load("beat", functions=["lib_now"])


class Presence:
    def __init__(self, redis: Redis, limit: int) -> None:
        self.redis = redis
        self.limit = limit
        self.process = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self._admit = ADMIT.register(redis)
        self._admit_live = ADMIT_LIVE.register(redis)
        self._live = LIVE_PROCESSES.register(redis)
        self._leave = LEAVE.register(redis)
        self.per_user = is_cluster(redis)
        """On a Redis Cluster: one call per user, each on the user's slot."""
        self._beat_script = BEAT.register(redis)
        self._admissions = Batches(self._admit_users, MAX_BATCH)
        self._leaving: Counter[str] = Counter()
        self._leaver: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    async def start(self) -> None:
        await self._beat()
        self._task = asyncio.create_task(self._heartbeat())

    async def stop(self) -> None:
        """Counts of this process die with its place in the registry, removed here."""
        self._stopped = True
        if self._task:
            self._task.cancel()
        self._admissions.stop()
        if self._leaver is not None:
            await asyncio.wait([self._leaver], timeout=RETRY_AFTER * 2)
            self._leaver.cancel()
        with contextlib.suppress(RedisError, OSError):
            await self.redis.zrem(keys.PROCESSES, self.process)

    async def admit(self, user: str) -> bool:
        """Count one more socket for `user`; False when the user is at the limit. Raises
        RedisError/OSError when Redis cannot be reached."""
        if self._stopped:
            raise ConnectionError("the web process is stopping")
        return bool(await self._admissions.ask(user))

    def leave(self, user: str) -> None:
        """Count one socket fewer for `user` (sent with the next batch)."""
        if self._stopped:
            return
        self._leaving[user] += 1
        if self._leaver is None:
            self._leaver = asyncio.create_task(self._leave_batches())

    async def _leave_batches(self) -> None:
        try:
            while self._leaving:
                users = list(self._leaving)[:MAX_BATCH]
                counts = [self._leaving.pop(user) for user in users]
                try:
                    await self._leave_users(users, counts)
                except (RedisError, OSError) as exc:
                    log.warning("cannot count sockets that closed; retrying: %s", exc)
                    self._leaving.update(dict(zip(users, counts, strict=True)))
                    await asyncio.sleep(RETRY_AFTER)
        finally:
            self._leaver = None

    async def _admit_users(self, users: list[str]) -> list[int]:
        if not self.per_user:
            admit = self._admit.bind(
                processes_key=keys.PROCESSES,
                user_keys=[keys.connections(user) for user in users],
                process=self.process,
                limit=self.limit,
            )
            result: list[int] = await admit.run()
            return result
        live = await self._live(processes_key=keys.PROCESSES)
        return await scripts.run_all(
            self.redis,
            [
                self._admit_live.bind(
                    user_key=keys.connections(user),
                    process=self.process,
                    limit=self.limit,
                    live=b" ".join(live),
                )
                for user in users
            ],
        )

    async def _leave_users(self, users: list[str], counts: list[int]) -> None:
        if not self.per_user:
            await self._leave(
                user_keys=[keys.connections(user) for user in users],
                process=self.process,
                counts=counts,
            )
            return
        calls = [
            self._leave.bind(user_keys=[keys.connections(user)], process=self.process, counts=[n])
            for user, n in zip(users, counts, strict=True)
        ]
        await scripts.run_all(self.redis, calls)

    async def _beat(self) -> None:
        await self._beat_script(
            processes_key=keys.PROCESSES, process=self.process, ttl_ms=HEARTBEAT_TTL * 1000
        )

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_EVERY)
            try:
                await self._beat()
            except (RedisError, OSError) as exc:
                log.warning("presence heartbeat failed: %s", exc)
