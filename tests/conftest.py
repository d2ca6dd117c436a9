"""Shared test fixtures: real embedded Redis and PostgreSQL (one each per test session) and
Parley itself as real server processes on 127.0.0.1. Helpers live in tests/helpers/.

Tests isolate themselves by using fresh user names and conversations, so one server serves
many tests; tests that restart or kill processes start their own.

Tiers follow the directories: every test under tests/e2e is marked `e2e` and every test under
tests/ui `ui` here, so that `-m "not e2e and not ui"` (`python3 dev.py test --fast`) runs the
unit and in-process tests (tests/protocol, storage, redis, server) and nobody has to remember
a marker.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio

from server.dev.client import Client
from tests.helpers.auth import mint, new_user
from tests.helpers.processes import (
    Cluster,
    ParleyProcess,
    RedisClusters,
    Services,
    start_services,
)

SLOW_TIERS = {"e2e": pytest.mark.e2e, "ui": pytest.mark.ui}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test with its directory's tier (tests/e2e: `e2e`, tests/ui: `ui`)."""
    here = Path(__file__).parent
    for item in items:
        parts = item.path.relative_to(here).parts if item.path.is_relative_to(here) else ()
        if parts and parts[0] in SLOW_TIERS:
            item.add_marker(SLOW_TIERS[parts[0]])


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    services = start_services(tmp_path_factory.mktemp("services"))
    try:
        yield services
    finally:
        services.stop()


@pytest.fixture(scope="session")
def cluster(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(services, tmp_path_factory.mktemp("parley"))
    try:
        yield cluster
    finally:
        cluster.stop_all()


@pytest.fixture(scope="session")
def redis_clusters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusters]:
    """Six-node Redis Clusters (`redis-server` 7 from PATH), one per group of processes that
    asks for one; all stopped at the end of the session."""
    clusters = RedisClusters(tmp_path_factory.mktemp("redis-clusters"))
    try:
        yield clusters
    finally:
        clusters.stop()


@pytest.fixture(scope="session")
def parley(cluster: Cluster) -> Iterator[ParleyProcess]:
    """One `parley serve` shared by the tests that need an ordinary server.

    Stopped when pytest tears it down, which it may do before the session ends (a module's
    parametrized fixture of the same name makes it build a new one): an old server left
    running would be a second worker taking the shared database's turns."""
    proc = cluster.process("serve")
    yield proc
    proc.stop()


@pytest.fixture
def user() -> str:
    return new_user()


@pytest_asyncio.fixture
async def connect(parley: ParleyProcess) -> AsyncIterator[object]:
    """connect(user=None, **kw) -> Client on the shared server; closed after the test."""
    clients: list[Client] = []

    async def open_client(
        user: str | None = None, server: ParleyProcess | None = None, **kwargs: object
    ) -> Client:
        target = server or parley
        client = await Client.connect(target.ws_url, mint(user or new_user()), **kwargs)  # type: ignore[arg-type]
        clients.append(client)
        return client

    yield open_client
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


@pytest_asyncio.fixture(loop_scope="session", scope="session")
async def db(services: Services) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(services.database_url, min_size=1, max_size=4)
    assert pool is not None
    yield pool
    await pool.close()
