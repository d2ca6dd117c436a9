"""The process's Redis client: commands packed by hiredis, byte for byte as redis-py would."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio.connection import Connection, UnixDomainSocketConnection
from redis.exceptions import DataError

from server.app.config import RedisSettings
from server.redis.client import connect, packed_by_hiredis
from tests.helpers.processes import Db, Services

COMMANDS: list[tuple[Any, ...]] = [
    ("SET", "k", "välue"),
    ("SET", b"k", b"\x00\xff bytes"),
    ("EVALSHA", "ab" * 20, 2, "key:{c}", b"other", 1.5, -7, 10**20, memoryview(b"frame")),
    ("SCRIPT EXISTS", "ab" * 20),
    (b"CONFIG GET", "maxmemory"),
    ("PUBLISH", "c", b"x" * 100_000),  # above the Python packer's buffer cutoff
    ("SET", "k", 0.1),  # a float: through the encoder (`repr`), as redis-py writes it
    ("SET", "k", 2**70, "EX", 10**3),
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: str(c[0]))
def test_a_command_is_packed_as_redis_py_packs_it(command: tuple[Any, ...]) -> None:
    python, hiredis = Connection(), packed_by_hiredis(Connection)()
    assert b"".join(hiredis.pack_command(*command)) == b"".join(
        bytes(part) for part in python.pack_command(*command)
    )


@pytest.mark.parametrize("value", [None, True], ids=repr)
def test_what_redis_py_refuses_to_send_is_still_refused(value: object) -> None:
    with pytest.raises(DataError, match="Invalid input"):
        packed_by_hiredis(Connection)().pack_command("SET", "k", value)


def test_text_utf8_cannot_hold_is_refused_as_redis_py_refuses_it() -> None:
    with pytest.raises(UnicodeEncodeError):
        Connection().pack_command("SET", "k", "\ud800")
    with pytest.raises(UnicodeEncodeError):
        packed_by_hiredis(Connection)().pack_command("SET", "k", "\ud800")


def test_the_connection_kind_the_url_chose_is_kept() -> None:
    packed = packed_by_hiredis(UnixDomainSocketConnection)
    assert issubclass(packed, UnixDomainSocketConnection)


async def test_the_client_speaks_to_redis_through_the_packer(services: Services) -> None:
    url = f"{services.redis_url.rsplit('/', 1)[0]}/{Db.SCRIPTS}"
    redis = connect(RedisSettings(url=url))
    try:
        await redis.set("packed:k", "välue")
        pipe = redis.pipeline(transaction=False)
        pipe.get("packed:k").incrbyfloat("packed:n", 1.5).config_get("maxmemory")
        value, number, config = await pipe.execute()
        assert value == "välue".encode() and number == 1.5 and "maxmemory" in config
    finally:
        await redis.delete("packed:k", "packed:n")
        await redis.aclose()


async def test_callers_beyond_the_pool_wait_their_turn_and_idle_ones_reuse_a_connection(
    services: Services,
) -> None:
    url = f"{services.redis_url.rsplit('/', 1)[0]}/{Db.SCRIPTS}"
    redis = connect(RedisSettings(url=url, pool_size=2))
    pool = redis.connection_pool
    try:
        for _ in range(5):  # one after another: one connection, taken and given back
            await redis.get("pool:k")
        assert (len(pool._available_connections), len(pool._in_use_connections)) == (1, 0)
        blocked = [redis.blpop(["pool:list"], timeout=0.2) for _ in range(6)]
        async with asyncio.timeout(10):  # three rounds of two, none refused
            assert await asyncio.gather(*blocked) == [None] * 6
        assert (len(pool._available_connections), len(pool._in_use_connections)) == (2, 0)
    finally:
        await redis.delete("pool:k")
        await redis.aclose()
