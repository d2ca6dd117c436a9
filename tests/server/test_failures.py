"""The error classification against real Redis and PostgreSQL errors: what the request's own
data caused is `invalid`, an unreachable service `unavailable`, Parley's own fault `internal`."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from server.dev import embedded
from server.edge.failures import classify, refusal


async def _error(call: Any) -> BaseException:
    try:
        await call
    except Exception as exc:
        return exc
    raise AssertionError("no error")


async def test_redis_errors(services: Any) -> None:
    redis = Redis.from_url(services.redis_url)
    key = f"test:{uuid.uuid4()}"
    try:
        bad_id = await _error(redis.xrange(key, f"{2**64}-0", "+"))
        await redis.set(key, "a string")
        wrong_type = await _error(redis.xrange(key, "-", "+"))
        pipe = redis.pipeline(transaction=False)
        pipe.xrange(key, "-", "+")
        pipe.evalsha("0" * 40, 0)
        pipelined = await pipe.execute(raise_on_error=False)
    finally:
        await redis.delete(key)
        await redis.aclose()
    gone = Redis.from_url(f"redis://127.0.0.1:{embedded.free_port()}", socket_timeout=2)
    unreachable = await _error(gone.get("x"))
    await gone.aclose()
    assert classify(bad_id) == "invalid"
    assert classify(wrong_type) == "internal"
    assert classify(unreachable) == "unavailable"
    # in a pipeline, redis-py puts the command before the reply; a script Redis does not know
    assert [classify(exc) for exc in pipelined] == ["internal", "internal"], pipelined


async def test_postgres_errors(db: asyncpg.Pool) -> None:
    nul = await _error(db.fetchval("SELECT $1::text", "a\x00b"))
    not_a_number = await _error(db.fetchval("SELECT $1::text::int", "twelve"))
    out_of_range = await _error(db.fetchval("SELECT $1::bigint * 10", 2**62))
    argument = await _error(db.fetchval("SELECT $1::int", "not an int"))
    missing_table = await _error(db.fetchval("SELECT * FROM no_such_table"))
    for exc in (nul, not_a_number, out_of_range, argument):
        assert classify(exc) == "invalid", repr(exc)
    assert classify(missing_table) == "internal"
    port = embedded.free_port()
    unreachable = await _error(asyncpg.connect(f"postgresql://x@127.0.0.1:{port}/x", timeout=2))
    assert classify(unreachable) == "unavailable"


@pytest.mark.parametrize(
    ("exc", "code"),
    [(OSError("reset"), "unavailable"), (RuntimeError("bug"), "internal")],
)
def test_refusal_messages(exc: Exception, code: str) -> None:
    refused = refusal(exc, "a test")
    assert refused.code == code
    assert "bug" not in refused.message  # a fault's details stay in the log
