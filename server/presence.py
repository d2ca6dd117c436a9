"""Open sockets per user, counted across every web process, for the per-user connection limit.

Each process keeps its own count in a per-user hash (field = process id) and a heartbeat key;
counts of processes whose heartbeat expired (they died) are dropped at the next admission, so
a crash never locks a user out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from typing import Final

from redis.asyncio import Redis
from redis.exceptions import RedisError

from protocol import keys

log = logging.getLogger("parley.presence")

HEARTBEAT_TTL: Final = 30
HEARTBEAT_EVERY: Final = 10.0

_ADMIT: Final = """
local total = 0
for i, v in ipairs(redis.call('HGETALL', KEYS[1])) do
  if i % 2 == 1 then
    local alive = redis.call('EXISTS', ARGV[3] .. v) == 1
    if not alive then redis.call('HDEL', KEYS[1], v) end
    if alive then total = total + tonumber(redis.call('HGET', KEYS[1], v)) end
  end
end
if total >= tonumber(ARGV[2]) then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
return 1
"""


class Presence:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.process = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self._admit = redis.register_script(_ADMIT)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._beat()
        self._task = asyncio.create_task(self._heartbeat())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        with contextlib.suppress(RedisError, OSError):
            await self.redis.delete(keys.process(self.process))

    async def admit(self, user: str, limit: int) -> bool:
        admitted = await self._admit(
            keys=[keys.connections(user)],
            args=[self.process, limit, keys.process("")],
        )
        return bool(admitted)

    async def leave(self, user: str) -> None:
        await self.redis.hincrby(keys.connections(user), self.process, -1)

    async def _beat(self) -> None:
        await self.redis.set(keys.process(self.process), "1", ex=HEARTBEAT_TTL)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_EVERY)
            try:
                await self._beat()
            except (RedisError, OSError) as exc:
                log.warning("presence heartbeat failed: %s", exc)
