"""The Lua scripts against the real embedded Redis, without a Parley process.

These tests use their own database number of the session's Redis, so that the jobs and
finished turns they queue are never seen by a Parley process running in the same session.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio
from redis.asyncio import Redis

from server.redis.eventlog import EventLog, Pipeliner
from tests.helpers.processes import Db, Services
from tests.helpers.scripts import MAX_EVENTS, TTL

SCRIPTS_DB = Db.SCRIPTS


def scripts_db(services: Services) -> Redis:
    return Redis.from_url(f"{services.redis_url.rsplit('/', 1)[0]}/{SCRIPTS_DB}")


@pytest_asyncio.fixture(loop_scope="session")
async def redis(services: Services) -> AsyncIterator[Redis]:
    async with scripts_db(services) as client:
        yield client


@pytest_asyncio.fixture(loop_scope="session")
async def second_redis(services: Services) -> AsyncIterator[Redis]:
    """Another client of the same database: another process, as far as Redis can tell."""
    async with scripts_db(services) as client:
        yield client


@pytest_asyncio.fixture(loop_scope="session")
async def events(redis: Redis) -> EventLog:
    return EventLog(redis, MAX_EVENTS, TTL)


@pytest_asyncio.fixture(loop_scope="session")
async def pipeliner(redis: Redis) -> AsyncIterator[Pipeliner]:
    """The worker's pipeliner on the scripts' database, started, and stopped after the test."""
    pipeliner = Pipeliner(redis)
    pipeliner.start()
    yield pipeliner
    await pipeliner.stop()
