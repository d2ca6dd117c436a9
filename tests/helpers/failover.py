"""Killing the Redis Cluster primary under a streaming conversation (the failover test and
bench/failover.py)."""

from __future__ import annotations

import asyncio
import time

from server.redis import keys
from tests.helpers.processes import RedisBackend
from tests.helpers.tabs import TabClient, until

FAILOVER_ENV = {"PARLEY_WORKER_LEASE_SECONDS": "2"}
IN_FLIGHT = 0.1
"""Seconds after the kill during which tokens the dead primary published before it died may
still arrive (not counted as tokens flowing again)."""


async def kill_owner_mid_stream(backend: RedisBackend, tabs: list[TabClient]) -> float:
    """Start a long reply, kill the primary owning the conversation's slot once the tabs
    have some of it; the seconds from the kill until the last tab gets tokens again."""
    assert backend.nodes is not None
    first, last = tabs[0], tabs[-1]
    await first.say("failover [sim:tokens=200][sim:tps=40]")
    await until(lambda: last.tokens() >= 10, 15, "tokens before the kill", tabs)
    assert first.conversation is not None
    owner = await asyncio.to_thread(backend.nodes.owner, keys.channel(first.conversation))
    killed = time.monotonic()
    await asyncio.to_thread(owner.kill)
    await asyncio.sleep(IN_FLIGHT)
    seen = last.tokens()
    await until(lambda: last.tokens() > seen, 30, "tokens after the failover", tabs)
    return time.monotonic() - killed
