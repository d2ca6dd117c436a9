"""Shared test fixtures: real embedded Redis and PostgreSQL (one each per test session) and
Parley itself as real server processes on 127.0.0.1. Helpers live in tests/helpers/.

Tests isolate themselves by using fresh user names and conversations, so one server serves
many tests; tests that restart or kill processes start their own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
import pytest_asyncio

from server.dev.client import Client
from tests.helpers.auth import mint, new_user
from tests.helpers.processes import Cluster, ParleyProcess, Services, start_services


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
def parley(cluster: Cluster) -> ParleyProcess:
    """One `parley serve` shared by the tests that need an ordinary server."""
    return cluster.process("serve")


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
