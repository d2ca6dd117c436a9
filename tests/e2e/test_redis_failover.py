"""A Redis Cluster primary dies mid-stream: its replica is promoted and nothing is lost,
duplicated or stuck. The time from the kill to tokens flowing again is measured (10 runs) by
`.venv/bin/python -m bench.failover`.

In the `soak` tier (`-m soak`): it passes in about half of the runs on this machine; in the
others the tabs stop receiving tokens after the kill (cause not found yet). A promoted
replica that lost acknowledged token events is a known gap as well: the worker does not
notice its seq counter went back (docs/deploy.md)."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from tests.helpers.auth import new_user
from tests.helpers.conversations import persisted, wait_persisted
from tests.helpers.failover import FAILOVER_ENV, kill_owner_mid_stream
from tests.helpers.processes import (
    Cluster,
    RedisClusters,
    alive,
    start_all,
    stop_all,
)
from tests.helpers.tabs import TabClient, check_tabs, close_all, until


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
    webs = [cluster.process("web", start=False, **env) for _ in range(2)]
    worker = cluster.process("worker", start=False, **env)
    procs = [*webs, worker]
    user = new_user()
    t1 = TabClient(user, None, webs, "t1", follow=True)
    tabs = [t1]
    try:
        start_all(procs)
        await t1.create(webs[0], title="failover")
        await t1.join()
        t2 = TabClient(user, t1.conversation, [webs[1], webs[0]], "t2", follow=True)
        tabs.append(t2)
        await t2.join()
        took = await kill_owner_mid_stream(backend, tabs)
        assert took < 20
        assert t1.conversation is not None
        rows = await wait_persisted(db, t1.conversation, 2, timeout=30)
        assert len(rows) == 2 and rows[1][2] == "complete", rows
        await until(lambda: all(t.settled(2) for t in tabs), 20, "the tabs to converge", tabs)
        check_tabs(tabs, [(r[0], r[1]) for r in rows])
        await asyncio.sleep(1)  # a second copy of the turn would be written by now
        assert len(await persisted(db, t1.conversation)) == 2
        await t2.say("after the failover [sim:tokens=20][sim:tps=200]")
        rows = await wait_persisted(db, t1.conversation, 4, timeout=20)
        await until(lambda: all(t.settled(4) for t in tabs), 20, "the next turn", tabs)
        check_tabs(tabs, [(r[0], r[1]) for r in rows])
        assert len(alive(procs)) == len(procs), "a process died"
    finally:
        await close_all(tabs)
        await stop_all(procs)
