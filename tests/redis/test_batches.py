"""Batched asks (joins, admissions) against a Redis of their own that is restarted under
them."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from redis.exceptions import RedisError

from server.app.config import RedisSettings
from server.dev import embedded
from server.redis.client import connect
from server.redis.eventlog import EventLog
from tests.helpers.scripts import MAX_EVENTS, TTL, loaded

JOINERS = 8
BACK_WITHIN = 10.0


async def test_joins_asked_through_a_redis_restart_are_answered_again_after_it(
    tmp_path: Path,
) -> None:
    """Sockets keep joining while their Redis is stopped and a new one started on its port:
    the joins asked meanwhile fail (as Redis unavailable), and once it is back every join
    is answered again, without the process doing anything (the pool's connections
    reconnect); when the joins stop, no connection is left in use."""
    server = await asyncio.to_thread(embedded.start_redis, tmp_path / "one", persist=False)
    redis = connect(RedisSettings(url=server.url, pool_size=4))
    events = EventLog(redis, MAX_EVENTS, TTL)
    outcomes: list[bool] = []
    joining = True

    async def keep_joining(conversation: uuid.UUID) -> None:
        while joining:
            try:
                outcomes.append((await events.opening(conversation, 0)).meta is not None)
            except RedisError:
                outcomes.append(False)
                await asyncio.sleep(0.01)

    try:
        conversation = await loaded(events)
        joiners = [asyncio.create_task(keep_joining(conversation)) for _ in range(JOINERS)]
        await until_answered(outcomes, 50)
        port = urlsplit(server.url).port
        await asyncio.to_thread(server.stop)
        server = await asyncio.to_thread(
            embedded.start_redis, tmp_path / "two", persist=False, port=port
        )
        await loaded(events, conversation=conversation)  # the new Redis is empty
        del outcomes[:]
        await until_answered(outcomes, 50)
        joining = False
        await asyncio.gather(*joiners)
        await until_given_back(redis)
    finally:
        joining = False
        await redis.aclose()
        server.stop()


async def until_answered(outcomes: list[bool], count: int) -> None:
    """Wait until `count` joins in a row were answered, at most BACK_WITHIN seconds."""
    deadline = time.monotonic() + BACK_WITHIN
    while not (len(outcomes) >= count and all(outcomes[-count:])):
        assert time.monotonic() < deadline, f"joins not answered: {outcomes[-20:]}"
        await asyncio.sleep(0.05)


async def until_given_back(redis: Any) -> None:
    """Wait until no connection of the pool is in use."""
    deadline = time.monotonic() + BACK_WITHIN
    while redis.connection_pool._in_use_connections:
        assert time.monotonic() < deadline, "a connection was not given back to the pool"
        await asyncio.sleep(0.01)
