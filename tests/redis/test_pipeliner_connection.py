"""The pipeliner's own connection to a single Redis (`client.HeldConnection`), against the
real embedded Redis: closed by Redis, lost with Redis, or too slow to answer, it is replaced
and every call is answered once, nothing appended twice or lost."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from redis.asyncio import Redis

from server.app.config import RedisSettings
from server.dev import embedded
from server.redis.client import connect
from server.redis.eventlog import MARKED_FROM, EventLog, Pipeliner
from tests.helpers.faults import Proxy
from tests.helpers.processes import Services
from tests.helpers.scripts import MAX_EVENTS, TTL
from tests.redis.test_eventlog_scripts import (
    append_pieces,
    frame,
    generating,
    log_seqs,
    script_commands,
)


def unreachable_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]


@pytest.mark.counts_commands
async def test_a_held_connection_redis_closed_is_replaced_before_the_next_batch(
    events: EventLog, redis: Redis, pipeliner: Pipeliner, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis closes the pipeliner's idle connection (here `CLIENT KILL`, as a `timeout` or an
    operator would): the next batch goes on a new one at once, as a pooled connection
    found closed is replaced, without an error or a retry."""
    caplog.set_level(logging.WARNING, "parley.eventlog")
    conversation, message_id = await generating(events, redis)
    assert await append_pieces(events, pipeliner, conversation, message_id, 1, 2) == [1, 2]
    await redis.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    await asyncio.sleep(0.2)  # the close reaches the pipeliner's connection
    assert await append_pieces(events, pipeliner, conversation, message_id, 3, 4) == [3, 4]
    assert await log_seqs(redis, conversation) == [1, 2, 3, 4]
    assert unreachable_warnings(caplog) == []


async def test_redis_restarts_under_a_generation_lose_and_repeat_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis restarts (its data kept on disk) while the pipeliner holds a connection: a piece
    queued while it is down waits, then goes on a new connection once it is back; after a
    second restart that forgets the scripts, the next piece meets `NOSCRIPT`, the scripts
    are loaded and it runs again. Each piece appended once, in order."""
    caplog.set_level(logging.WARNING, "parley.eventlog")
    service = embedded.start_redis(tmp_path, persist=True)
    port = int(service.url.rsplit(":", 1)[1].split("/")[0])
    redis = connect(RedisSettings(url=service.url))
    pipeliner = Pipeliner(redis)
    pipeliner.start()
    try:
        events = EventLog(redis, MAX_EVENTS, TTL)
        conversation, message_id = await generating(events, redis)
        assert await append_pieces(events, pipeliner, conversation, message_id, 1, 2) == [1, 2]
        service.stop()
        waiting = asyncio.ensure_future(
            append_pieces(events, pipeliner, conversation, message_id, 3)
        )
        await asyncio.sleep(0.3)
        assert not waiting.done()
        service = embedded.start_redis(tmp_path, port=port, persist=True)
        assert await asyncio.wait_for(waiting, 10) == [3]
        assert len(unreachable_warnings(caplog)) == 1
        service.stop()
        service = embedded.start_redis(tmp_path, port=port, persist=True)
        async with Redis.from_url(service.url) as restarted:  # (none of the pipeliner's)
            await restarted.script_flush()  # a restart that forgets the scripts
            assert await append_pieces(events, pipeliner, conversation, message_id, 4) == [4]
            assert await script_commands(restarted) == 2  # the FLUSH, and loaded again once
            stats = await restarted.info("commandstats")
            # NOSCRIPT; twice when the client's pooled connection, closed by the restart too,
            # fails the SCRIPT LOAD and the call is sent again (as without a held connection)
            assert stats["cmdstat_evalsha"]["failed_calls"] in (1, 2)
            assert await log_seqs(restarted, conversation) == [1, 2, 3, 4]
    finally:
        await pipeliner.stop()
        await redis.aclose()
        service.stop()


async def test_a_reply_later_than_the_socket_timeout_is_sent_again_on_a_new_connection(
    events: EventLog, redis: Redis, services: Services
) -> None:
    """Redis carries out the call but its reply waits past the client's `socket_timeout`:
    the call fails as redis-py's would (a TimeoutError), the connection is dropped, and the
    call is sent again on a new one once Redis answers, which says its pieces were appended
    already."""
    conversation, message_id = await generating(events, redis)
    warming, warming_id = await generating(events, redis)
    with Proxy.to_url(services.redis_url) as proxy:
        url = proxy.redis_url(services.redis_url, redis.get_connection_kwargs()["db"])
        proxied = Redis.from_url(url, socket_timeout=0.5)
        pipeliner = Pipeliner(proxied)
        pipeliner.start()
        try:
            await events.append_piece(pipeliner, warming, frame("0"), warming_id, 1)
            proxy.hold_replies()
            queued = [
                events.append_piece(pipeliner, conversation, frame(str(i)), message_id, i)
                for i in range(1, MARKED_FROM + 1)
            ]
            for _ in range(100):
                if len(await log_seqs(redis, conversation)) == MARKED_FROM:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)  # past the timeout: the call is retried meanwhile
            assert not any(future.done() for future in queued)
            proxy.resume()
            assert await asyncio.wait_for(asyncio.gather(*queued), 10) == [0] * MARKED_FROM
        finally:
            await pipeliner.stop()
            await proxied.aclose()
    assert await log_seqs(redis, conversation) == list(range(1, MARKED_FROM + 1))
