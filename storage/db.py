"""The asyncpg pool and the schema migrations."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from importlib import resources
from typing import Any, TypeVar

import asyncpg
import msgspec

S = TypeVar("S", bound=msgspec.Struct)

MIGRATION_LOCK = 0x7061726C  # "parl": one migrating process at a time
_NAME = re.compile(r"^(\d+)_[\w-]+\.sql$")


class QueryCount:
    """Statements this process has sent to PostgreSQL, over every pooled connection (the
    resets a pool runs when a connection comes back included): how the server shows, as
    `parley_postgres_queries_total`, which paths touch PostgreSQL and which do not."""

    __slots__ = ("sent",)

    def __init__(self) -> None:
        self.sent = 0

    def count(self, _query: object) -> None:
        self.sent += 1


QUERIES = QueryCount()


def json_text(value: object) -> str:
    """A jsonb value as its text: the pool's jsonb encoder, and how a batch passes a jsonb
    column as a text array (in an array of jsonb asyncpg would take a list for a dimension)."""
    return msgspec.json.encode(value).decode()


def columns(rows: Iterable[Sequence[object]], width: int) -> list[list[object]]:
    """Rows of `width` values as `width` columns, as `unnest` takes a batch's rows."""
    return [list(column) for column in zip(*rows, strict=True)] or [[] for _ in range(width)]


async def _init_connection(conn: asyncpg.Connection) -> None:
    conn.add_query_logger(QUERIES.count)
    await conn.set_type_codec(
        "jsonb",
        encoder=json_text,
        decoder=msgspec.json.decode,
        schema="pg_catalog",
    )


def structs(rows: Iterable[asyncpg.Record], kind: type[S]) -> list[S]:
    """Rows whose columns bear the names of `kind`'s fields, as `kind`s: a jsonb column (which
    the pool's codec decodes) becomes the Struct, or list of Structs, its field declares."""
    return [msgspec.convert(dict(row), kind) for row in rows]


async def create_pool(url: str, size: int = 10, **kwargs: Any) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        url, min_size=1, max_size=size, init=_init_connection, **kwargs
    )
    assert pool is not None
    return pool


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) of every numbered .sql file in storage/migrations, in order."""
    found = []
    for entry in resources.files("storage").joinpath("migrations").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text()))
    return sorted(found)


async def migrate(pool: asyncpg.Pool) -> list[str]:
    """Apply the migrations not yet recorded; return the names applied."""
    applied: list[str] = []
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version int PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, name, sql in migrations():
            if version in done:
                continue
            await conn.execute(sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name
            )
            applied.append(name)
    return applied
