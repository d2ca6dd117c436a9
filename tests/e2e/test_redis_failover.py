"""A Redis Cluster primary dies mid-stream: its replica is promoted and nothing is lost,
duplicated or stuck. The time from the kill to tokens flowing again is measured (10 runs) by
`.venv/bin/python -m bench.failover`. And what a failover may do that a kill does not show on
demand: the promoted replica lacks the last events the old primary acknowledged."""

from __future__ import annotations

import asyncio

import asyncpg
from redis.asyncio import Redis

from server.redis import keys
from tests.helpers.conversations import persisted, wait_persisted
from tests.helpers.failover import FAILOVER_ENV, kill_owner_mid_stream
from tests.helpers.processes import Cluster, Db, RedisClusters, alive, redis_db
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
