"""Fixtures for the storage tests: an empty database of its own per test, on the session's
embedded PostgreSQL, and a pool on it with Parley's codecs (storage.db.create_pool)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest_asyncio

from storage import db
from tests.helpers.processes import Services


@pytest_asyncio.fixture
async def empty_pool(services: Services) -> AsyncIterator[asyncpg.Pool]:
    """A pool on a new, empty database, dropped after the test."""
    name = f"storage_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(services.database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        url = urlunsplit(urlsplit(services.database_url)._replace(path=f"/{name}"))
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
