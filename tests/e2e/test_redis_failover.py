"""A Redis Cluster primary dies mid-stream: its replica is promoted and nothing is lost,
duplicated or stuck. The time from the kill to tokens flowing again is measured (10 runs) by
`.venv/bin/python -m bench.failover`."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from tests.helpers.conversations import persisted, wait_persisted
from tests.helpers.failover import FAILOVER_ENV, kill_owner_mid_stream
from tests.helpers.processes import Cluster, RedisClusters, alive
from tests.helpers.tabs import check_tabs, two_tabs_on_two_webs, until


@pytest.mark.soak
async def test_primary_killed_mid_stream_replica_takes_over_and_tabs_converge(
    cluster: Cluster, redis_clusters: RedisClusters, db: asyncpg.Pool
) -> None:
    """SIGKILL of the primary that owns a streaming conversation's slot, two tabs on two web
    processes watching: each tab ends with the persisted transcript (exactly, or after a
    `joined {reset: true}`, never with a gap or a duplicate), the turn is persisted once,
    and the conversation takes a new turn (nothing stuck busy)."""
    backend = redis_clusters.backend()
    env = {**backend.env(), **FAILOVER_ENV}
    async with two_tabs_on_two_webs(cluster, env, "failover") as group:
        tabs, conversation = group.tabs, group.conversation
        took = await kill_owner_mid_stream(backend, tabs)
        assert took < 20
        rows = await wait_persisted(db, conversation, 2, timeout=30)
        assert len(rows) == 2 and rows[1][2] == "complete", rows
        await until(lambda: all(t.settled(2) for t in tabs), 20, "the tabs to converge", tabs)
        check_tabs(tabs, [(r[0], r[1]) for r in rows])
        await asyncio.sleep(1)  # a second copy of the turn would be written by now
        assert len(await persisted(db, conversation)) == 2
        await tabs[1].say("after the failover [sim:tokens=20][sim:tps=200]")
        rows = await wait_persisted(db, conversation, 4, timeout=20)
        await until(lambda: all(t.settled(4) for t in tabs), 20, "the next turn", tabs)
        check_tabs(tabs, [(r[0], r[1]) for r in rows])
        assert len(alive(group.procs)) == len(group.procs), "a process died"
