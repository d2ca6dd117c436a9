"""The Lua scripts against the real embedded Redis, without a Parley process.

These tests use their own database number of the session's Redis, so that the jobs and
finished turns they queue are never seen by a Parley process running in the same session.
A test marked `counts_commands` gets a Redis server of its own instead: `INFO commandstats`
counts every client's commands, and a Parley process running in the session (or a test's
leftover task) would add to what the test counts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
from redis.asyncio import Redis

from server.app.config import RedisSettings
from server.dev import embedded
from server.redis.client import connect, packs_as_given
from server.redis.eventlog import EventLog, Pipeliner
from tests.helpers.processes import Db, Services
from tests.helpers.scripts import MAX_EVENTS, TTL

SCRIPTS_DB = Db.SCRIPTS


def scripts_db(services: Services) -> Redis:
    return Redis.from_url(f"{services.redis_url.rsplit('/', 1)[0]}/{SCRIPTS_DB}")


@pytest.fixture(scope="module")
def lone_redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis server that only this module's `counts_commands` tests talk to."""
    service = embedded.start_redis(tmp_path_factory.mktemp("lone-redis"), persist=False)
    try:
        yield service.url
    finally:
        service.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def redis(services: Services, request: pytest.FixtureRequest) -> AsyncIterator[Redis]:
    if request.node.get_closest_marker("counts_commands") is not None:
        url = request.getfixturevalue("lone_redis_url")
        async with Redis.from_url(url) as client:
            yield client
        return
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


@pytest_asyncio.fixture(loop_scope="session", params=["redis-py", "connect"])
async def pipeliner(redis: Redis, request: pytest.FixtureRequest) -> AsyncIterator[Pipeliner]:
    """The worker's pipeliner on the scripts' database, started, and stopped after the test:
    on a plain redis-py client, and on Parley's own (`client.connect`, whose connections
    send the `append_pieces` calls the pipeliner packs itself)."""
    if request.param == "redis-py":
        pipeliner = Pipeliner(redis)
    else:
        at = redis.connection_pool.connection_kwargs
        url = f"redis://{at['host']}:{at['port']}/{at.get('db', 0)}"
        pipeliner = Pipeliner(connect(RedisSettings(url=url)))
        assert packs_as_given(pipeliner.redis)
    pipeliner.start()
    yield pipeliner
    await pipeliner.stop()
    if pipeliner.redis is not redis:
        await pipeliner.redis.aclose()
