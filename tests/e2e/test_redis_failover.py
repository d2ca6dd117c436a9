"""A Redis Cluster primary dies mid-stream: its replica is promoted and nothing is lost,
duplicated or stuck. The time from the kill to tokens flowing again is measured (10 runs) by
`.venv/bin/python -m bench.failover`. And what a failover may do that a kill does not show on
demand: the promoted replica lacks the last events the old primary acknowledged, of a
running turn or of one PostgreSQL persisted meanwhile."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from protocol import frames as f
from server.redis import keys
from tests.helpers.conversations import persisted, wait_persisted
from tests.helpers.failover import FAILOVER_ENV, kill_owner_mid_stream
from tests.helpers.processes import (
    BACKENDS,
    Cluster,
    Db,
    RedisBackend,
    RedisClusters,
    alive,
    redis_db,
    start_all,
    stop_all,
)
from tests.helpers.tabs import TabClient, check_tabs, first_seq, two_tabs_on_two_webs, until

FORGET_LAST = """
local seq = tonumber(redis.call('GET', KEYS[1]))
local back = tonumber(ARGV[1])
redis.call('SET', KEYS[1], seq - back, 'KEEPTTL')
for gone = seq - back + 1, seq do redis.call('XDEL', KEYS[2], gone .. '-0') end
return seq
"""
"""What a replica promoted without the last `back` events of a conversation holds: its seq
counter set back and those events gone from its log (atomically, between two appends)."""


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


def same_seq_same_bytes(tabs: list[TabClient]) -> None:
    """No two frames any tab received stand for the same seqs with different content."""
    seen: dict[tuple[int, int], str] = {}
    for tab in tabs:
        for sock in tab.sockets:
            for raw, frame in zip(sock.raw, sock.frames, strict=True):
                if getattr(frame, "seq", None) is None:
                    continue
                span = (first_seq(frame), int(frame.seq))
                assert seen.setdefault(span, raw) == raw, (tab.name, span, seen[span], raw)


async def test_acknowledged_events_lost_by_redis_are_never_given_again_under_their_seqs(
    cluster: Cluster, db: asyncpg.Pool
) -> None:
    """Mid-stream, Redis forgets the conversation's last five events (as a replica promoted
    before they reached it would): the worker, which had them acknowledged, does not hand out
    their seqs again for other events, and publishes the turn so far past them; a tab that
    joins afterwards, mid-stream, follows past the lost seqs rather than wait for them; every
    tab ends with the persisted transcript and no seq came to any tab with two contents."""
    env = {"REDIS_URL": redis_db(cluster.services.redis_url, Db.LOST_ACKNOWLEDGED)}
    async with two_tabs_on_two_webs(cluster, env, "lost events") as group:
        tabs, conversation = group.tabs, group.conversation
        await tabs[0].say("forgotten [sim:tokens=200][sim:tps=40]")
        await until(lambda: tabs[1].tokens() >= 20, 15, "tokens before", tabs)
        async with Redis.from_url(env["REDIS_URL"]) as redis:
            await redis.eval(FORGET_LAST, 2, keys.seq(conversation), keys.log(conversation), 5)
        seen = tabs[1].tokens()
        await until(lambda: tabs[1].tokens() > seen, 15, "tokens after the loss", tabs)
        late = TabClient(tabs[0].user, conversation, group.webs, "t3", follow=True)
        tabs.append(late)
        await late.join()
        rows = await wait_persisted(db, conversation, 2, timeout=30)
        assert rows[1][2] == "complete", rows
        await until(lambda: all(t.settled(2) for t in tabs), 20, "the tabs to converge", tabs)
        check_tabs(tabs, [(r[0], r[1]) for r in rows])
        same_seq_same_bytes(tabs)


async def test_a_conversations_slot_migrated_mid_stream_keeps_every_tab_exact(
    cluster: Cluster, redis_clusters: RedisClusters, db: asyncpg.Pool
) -> None:
    """The slot of a streaming conversation is migrated to another primary, key by key (the
    worker's appends meet ASK and TRYAGAIN meanwhile), then assigned to it (the old owner
    ends the web processes' subscriptions with `sunsubscribe`): tokens keep reaching both
    tabs, which end with the persisted transcript; the turn is persisted once and the
    conversation takes a new turn on its new primary."""
    backend = redis_clusters.backend()
    nodes = backend.nodes
    assert nodes is not None
    async with two_tabs_on_two_webs(cluster, backend.env(), "migrated") as group:
        tabs, conversation = group.tabs, group.conversation
        await tabs[0].say("migrated [sim:tokens=200][sim:tps=40]")
        await until(lambda: tabs[1].tokens() >= 10, 15, "tokens before the migration", tabs)
        channel = keys.channel(conversation)
        owner = await asyncio.to_thread(nodes.owner, channel)
        target = next(n for n in await asyncio.to_thread(nodes.primaries) if n is not owner)
        await asyncio.to_thread(nodes.move_slot, channel, target, 0.1)
        assert (await asyncio.to_thread(nodes.owner, channel)) is target
        seen = [t.tokens() for t in tabs]
        await until(
            lambda: all(t.tokens() > n for t, n in zip(tabs, seen, strict=True)),
            20,
            "tokens after the migration",
            tabs,
        )
        rows = await wait_persisted(db, conversation, 2, timeout=30)
        assert len(rows) == 2 and rows[1][2] == "complete", rows
        await until(lambda: all(t.settled(2) for t in tabs), 20, "the tabs to converge", tabs)
        check_tabs(tabs, [(r[0], r[1]) for r in rows])
        same_seq_same_bytes(tabs)
        await tabs[1].say("after the migration [sim:tokens=20][sim:tps=200]")
        rows = await wait_persisted(db, conversation, 4, timeout=20)
        await until(lambda: all(t.settled(4) for t in tabs), 20, "the next turn", tabs)
        check_tabs(tabs, [(r[0], r[1]) for r in rows])
        assert len(alive(group.procs)) == len(group.procs), "a process died"


LOSE_TAIL = """
local seq = tonumber(redis.call('GET', KEYS[1]))
local kept = tonumber(ARGV[1])
redis.call('SET', KEYS[1], kept, 'KEEPTTL')
for gone = kept + 1, seq do redis.call('XDEL', KEYS[2], gone .. '-0') end
redis.call('SET', KEYS[3], ARGV[2], 'KEEPTTL')
redis.call('DEL', KEYS[4])
return seq
"""
"""What a replica promoted without the tail of a turn that PostgreSQL then persisted holds:
the seq counter at `kept`, the events after it gone from the log, `persisted` where it was
before the turn and no transcript copy (mark_persisted drops it)."""

BOUND = 3.0
"""Seconds a join, a rejoin or a resync may take on this loaded machine (with the old code
the tab got `joined` but then never took an event of the conversation again)."""


async def lose_tail(redis: Any, conversation: uuid.UUID, kept: int) -> None:
    c = conversation
    keys_ = (keys.seq(c), keys.log(c), keys.persisted(c), keys.history(c))
    await redis.eval(LOSE_TAIL, len(keys_), *keys_, kept, 0)


async def joined_within(tab: TabClient, after: int | None) -> f.Joined:
    joined = await asyncio.wait_for(tab.join(after), BOUND)
    return joined


async def break_subscriptions(backend: RedisBackend, conversation: uuid.UUID) -> None:
    """Close the web processes' pub/sub connections serving `conversation` (as a failover
    does): every socket watching it resyncs from the log."""
    if backend.nodes is not None:
        owner = await asyncio.to_thread(backend.nodes.owner, keys.channel(conversation))
        await asyncio.to_thread(owner.cli, "CLIENT", "KILL", "TYPE", "pubsub")
        return
    redis = backend.client()
    try:
        for client in await redis.client_list(_type="pubsub"):
            if int(client["db"]) == Db.REPLICA_BEHIND:
                await redis.client_kill_filter(_id=client["id"])
    finally:
        await redis.aclose()


@pytest.mark.parametrize("backend_name", BACKENDS)
async def test_a_replica_promoted_behind_postgresql_with_no_worker_answers_at_once(
    cluster: Cluster, request: pytest.FixtureRequest, db: asyncpg.Pool, backend_name: str
) -> None:
    """Three conversations each persist a turn; then Redis holds each as a replica promoted
    without the turn's last five events (and their persist) would, with no worker running.
    In the first a tab rejoins with `after` = all it held, in the second a tab joins afresh,
    in the third a watching tab resyncs (its subscription broke): each gets `joined` at once
    with PostgreSQL's transcript (`reset` where it held seqs the replica lacks). The next
    turns, on a worker started afterwards, take seqs above PostgreSQL's, and every tab ends
    with PostgreSQL's transcript, no seq given twice."""
    if backend_name == "redis":
        backend = RedisBackend(redis_db(cluster.services.redis_url, Db.REPLICA_BEHIND))
    else:
        clusters: RedisClusters = request.getfixturevalue("redis_clusters")
        backend = clusters.backend()
    async with two_tabs_on_two_webs(cluster, backend.env(), "rejoined") as group:
        rejoining, webs = group.tabs[0], group.webs
        joining = TabClient(rejoining.user, None, webs, "joining", follow=True)
        resyncing = TabClient(rejoining.user, None, webs[::-1], "resyncing", follow=True)
        group.tabs += [joining, resyncing]
        await joining.create(webs[0], title="joined")
        await resyncing.create(webs[1], title="resynced")
        await joining.join()
        await resyncing.join()
        lead = [rejoining, joining, resyncing]
        for tab in lead:
            await tab.say("persisted [sim:tokens=20][sim:tps=200]")
        rows = {t.conversation: await wait_persisted(db, t.conversation, 2, 20) for t in lead}
        await until(lambda: all(t.settled(2) for t in group.tabs), 20, "turns", group.tabs)
        await stop_all([group.worker])
        last_seqs = {t.conversation: t.last_seq for t in lead}
        redis = backend.client()
        try:
            for conversation, last_seq in last_seqs.items():
                assert last_seq is not None
                await lose_tail(redis, conversation, kept=last_seq - 5)
        finally:
            await redis.aclose()

        rejoining.drop()
        rejoined = await joined_within(rejoining, last_seqs[rejoining.conversation])
        assert rejoined.reset and rejoined.last_seq == last_seqs[rejoining.conversation]
        fresh = TabClient(rejoining.user, joining.conversation, webs[::-1], "fresh", follow=True)
        group.tabs.append(fresh)
        joined = await joined_within(fresh, None)
        assert joined.last_seq == last_seqs[joining.conversation] and joined.history
        assert resyncing.conversation is not None
        await break_subscriptions(backend, resyncing.conversation)
        await until(lambda: len(resyncing.segments()[0]) > 1, BOUND, "the resync", [resyncing])
        worker = cluster.process("worker", start=False, **backend.env())
        try:
            start_all([worker])
            for tab in lead:
                await tab.say("after the loss [sim:tokens=20][sim:tps=200]")
            for conversation in last_seqs:
                rows[conversation] = await wait_persisted(db, conversation, 4, timeout=20)
            await until(lambda: all(t.settled(4) for t in group.tabs), 20, "next", group.tabs)
        finally:
            await stop_all([worker])
        for conversation, last_seq in last_seqs.items():
            tabs = [t for t in group.tabs if t.conversation == conversation]
            check_tabs(tabs, [(r[0], r[1]) for r in rows[conversation]], conversation)
            said = [e for e in tabs[0].events() if isinstance(e, f.MessageEvent)]
            assert said[-1].seq == last_seq + 1, (conversation, said[-1])
            same_seq_same_bytes(tabs)
