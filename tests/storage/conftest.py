"""Fixtures for the storage tests: an embedded PostgreSQL of their own (the session's serves
the Parley processes of the e2e tier, which may hold most of its connections), an empty
database per test on it, and a pool with Parley's codecs (storage.db.create_pool)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import pytest_asyncio

from server.dev import embedded
from storage import db


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    postgres = embedded.start_postgres(tmp_path_factory.mktemp("storage"), fast=True)
    try:
        yield postgres.url
    finally:
        postgres.stop()


@pytest_asyncio.fixture
async def empty_pool(postgres_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on a new, empty database, dropped after the test."""
    name = f"storage_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(postgres_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        url = urlunsplit(urlsplit(postgres_url)._replace(path=f"/{name}"))
        pool = await db.create_pool(url, size=4)
        try:
            yield pool
        finally:
            await pool.close()
        await admin.execute(f'DROP DATABASE "{name}"')
    finally:
        await admin.close()


@pytest_asyncio.fixture
async def pool(empty_pool: asyncpg.Pool) -> asyncpg.Pool:
    """A pool on a new database with every migration applied."""
    await db.migrate(empty_pool)
    return empty_pool
