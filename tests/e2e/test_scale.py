"""Scale out: several `parley web` and `parley worker` processes on one Redis and one
PostgreSQL, tabs spread over them, and "The guarantee" of docs/protocol.md (every tab ends with
the same transcript: no token lost, none twice, same order) under random joins, leaves, drops
and rejoins.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from typing import Any

import asyncpg
import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio import Redis

from protocol import frames as f
from server.dev.client import Client, ProtocolError
from server.redis import keys
from tests.helpers.auth import mint, new_user
from tests.helpers.conversations import (
    assert_contiguous,
    event_frames,
    say_and_finish,
    start_conversation,
    transcript,
    wait_persisted,
)
from tests.helpers.processes import (
    Cluster,
    Db,
    ParleyProcess,
    RedisBackend,
    Scaled,
    model_stats,
    postgres_queries,
    redis_db,
    start_all,
)
from tests.helpers.tabs import TabClient, check_tabs, close_all, end_to_end_examples, until

SHORT_LOG_DB = Db.SHORT_LOG
SCALE_REPLY = "[sim:tokens=40][sim:tps=300]"


# --------------------------------------------------------------------------- scale out


async def test_tabs_on_two_web_processes_see_identical_events(
    scaled: Scaled, db: asyncpg.Pool
) -> None:
    """Three tabs over two web processes, three conversations generating at once on two
    workers: byte-identical event streams, one `start` per reply, one model request per turn."""
    web_a, web_b = scaled.webs
    user = new_user()
    a = await Client.connect(web_a.ws_url, mint(user))
    b = await Client.connect(web_b.ws_url, mint(user))
    c = await Client.connect(web_b.ws_url, mint(user))
    try:
        conversations = [await start_conversation(a, title=f"scale {i}") for i in range(3)]
        for conversation in conversations:
            await b.request(f.Join(conversation=conversation))
            await c.request(f.Join(conversation=conversation))
        before = await model_stats(scaled.model)
        rounds = 2
        for n in range(rounds):
            marks = {tab: len(tab.frames) for tab in (a, b, c)}
            await asyncio.gather(
                *(
                    a.request(f.Say(conversation=conv, text=f"round {n} {SCALE_REPLY}"))
                    for conv in conversations
                )
            )
            for tab in (a, b, c):
                for conv in conversations:
                    await tab.wait_for(
                        lambda fr, conv=conv: isinstance(fr, f.Done) and fr.conversation == conv,
                        start=marks[tab],
                    )
        after = await model_stats(scaled.model)
        for conv in conversations:
            assert event_frames(a, conv) == event_frames(b, conv) == event_frames(c, conv)
            assert_contiguous(a, conv, 1)
            starts = Counter(fr.message_id for fr in a.events(conv) if isinstance(fr, f.Start))
            assert len(starts) == rounds and set(starts.values()) == {1}, starts
            dones = [fr for fr in a.events(conv) if isinstance(fr, f.Done)]
            assert [d.reason for d in dones] == ["stop"] * rounds
        assert after["started"] - before["started"] == rounds * len(conversations), (before, after)
        for conv in conversations:
            rows = await wait_persisted(db, conv, 2 * rounds)
            assert [r[0] for r in rows] == ["user", "assistant"] * rounds
    finally:
        await asyncio.gather(a.close(), b.close(), c.close(), return_exceptions=True)


async def test_join_again_on_the_same_socket_keeps_live_events(scaled: Scaled) -> None:
    """A socket alone on its web process in a conversation joins it again (a refresh of that
    view, or a rejoin after a gap): live events must keep coming (found by the property test:
    the process dropped its pub/sub subscription)."""
    web_a, web_b = scaled.webs
    user = new_user()
    writer = TabClient(user, None, [web_a], "writer")
    again = TabClient(user, None, [web_b], "again")
    tabs = [writer, again]
    try:
        again.conversation = await writer.create(web_a, title="join again")
        await writer.join()
        await again.join(server=web_b)
        await again.join()  # the same socket: leave + join on the server
        await writer.say(f"live? {SCALE_REPLY}")
        await until(lambda: writer.settled(2), 10, "the reply", tabs)
        head = writer.last_seq or 0
        await until(lambda: (again.last_seq or 0) >= head, 5, "the live events", tabs)
        check_tabs(tabs, writer.view().messages)
    finally:
        await close_all(tabs)


async def test_joins_of_a_conversation_redis_holds_read_no_postgresql(
    scaled: Scaled, db: asyncpg.Pool
) -> None:
    """A new conversation's first join, and once one join has read the persisted
    transcript every join on any web process (with or without `after`), take it from Redis:
    the other process sends PostgreSQL nothing. A turn persisted since makes the copy stale:
    the next join reads PostgreSQL again and gets it."""
    web_a, web_b = scaled.webs
    user = new_user()
    writer = TabClient(user, None, [web_a], "writer")
    tabs = [writer]
    try:
        conversation = await writer.create(web_a, title="no postgres")
        before = await postgres_queries(web_b)
        tabs.append(first := TabClient(user, conversation, [web_b], "first"))
        assert (await first.join()).history == []  # the copy `create` seeded
        assert await postgres_queries(web_b) == before
        await writer.join()
        await writer.say(f"one {SCALE_REPLY}")
        await until(lambda: writer.settled(2), 10, "the reply", tabs)
        first = await wait_persisted(db, conversation, 2)
        await transcript_kept(scaled, web_a, user, conversation)
        before = await postgres_queries(web_b)
        for i in range(5):
            tab = TabClient(user, conversation, [web_b], f"fresh-{i}")
            tabs.append(tab)
            joined = await tab.join()
            assert joined.history is not None
            assert [(m.role, m.content) for m in joined.history] == [r[:2] for r in first]
            tabs.append(again := TabClient(user, conversation, [web_b], f"after-{i}"))
            await again.join(after=joined.last_seq)
        assert await postgres_queries(web_b) == before

        await writer.say(f"two {SCALE_REPLY}")
        await until(lambda: writer.settled(4), 10, "the second reply", tabs)
        second = await wait_persisted(db, conversation, 4)
        late = TabClient(user, conversation, [web_b], "late")
        tabs.append(late)
        joined = await late.join()
        assert joined.history is not None
        assert [(m.role, m.content) for m in joined.history] == [r[:2] for r in second]
    finally:
        await close_all(tabs)


async def test_sockets_joining_at_once_share_redis_reads_each_with_its_own_joined(
    scaled: Scaled,
) -> None:
    """Sixty sockets on one web process join three conversations at once, without `after`,
    from the start and from the last event but one, and six of another user: each gets the
    transcript and the seqs it would get alone, the others `not_found`, and the process
    makes far fewer script calls than joins (the joins asked together share them)."""
    web_a, web_b = scaled.webs
    owner, other = new_user(), new_user()
    writer = await Client.connect(web_a.ws_url, mint(owner))
    sockets: list[Client] = []
    try:
        conversations = [await start_conversation(writer, title=f"at once {i}") for i in range(3)]
        for conversation in conversations:
            await say_and_finish(writer, conversation, f"hello {SCALE_REPLY}")
        heads = {c: writer.events(c)[-1].seq for c in conversations}
        for conversation in conversations:  # a join once the persist is marked keeps the copy
            await transcript_kept(scaled, web_b, owner, conversation)
        joins = [(owner, c, after) for c in conversations for after in (None, 0, heads[c] - 1)]
        joins = [*(joins * 6), *[(other, conversations[i % 3], None) for i in range(6)]]
        sockets = list(
            await asyncio.gather(*(Client.connect(web_b.ws_url, mint(u)) for u, _, _ in joins))
        )
        calls = await script_calls(scaled.backend)
        replies = await asyncio.gather(
            *(
                socket.request(f.Join(conversation=c, after=after))
                for socket, (_, c, after) in zip(sockets, joins, strict=True)
            ),
            return_exceptions=True,
        )
        assert await script_calls(scaled.backend) - calls < len(joins) // 3
        for socket, (user, c, after), joined in zip(sockets, joins, replies, strict=True):
            if user == other:
                assert isinstance(joined, ProtocolError) and joined.error.code == "not_found"
                continue
            assert isinstance(joined, f.Joined) and joined.meta.last_seq == heads[c]
            assert after is None or joined.reset or joined.last_seq == after
            if joined.last_seq < heads[c]:  # the events after it follow
                await socket.wait_for(
                    lambda fr, c=c: (
                        getattr(fr, "conversation", None) == c
                        and getattr(fr, "seq", None) == heads[c]
                    ),
                    timeout=5,
                )
            if not after:  # its history and events, or all its events, are the whole
                assert transcript(socket, c) == transcript(writer, c)
            assert_contiguous(socket, c, joined.last_seq + 1)
    finally:
        await asyncio.gather(writer.close(), *(socket.close() for socket in sockets))


async def transcript_kept(
    scaled: Scaled, web: ParleyProcess, user: str, conversation: uuid.UUID
) -> None:
    """Join until Redis keeps the persisted transcript for the next joins (a join keeps it
    once the persist is marked in Redis)."""
    redis = scaled.backend.client()
    try:
        for _ in range(50):
            warm = await Client.connect(web.ws_url, mint(user))
            await warm.request(f.Join(conversation=conversation))
            await warm.close()
            if await redis.exists(keys.history(conversation)):
                return
            await asyncio.sleep(0.1)
    finally:
        await redis.aclose()


async def script_calls(backend: RedisBackend) -> int:
    """The script calls (EVALSHA, EVAL) the backend's Redis, or its cluster's primaries,
    ran so far."""
    if backend.nodes is None:
        async with backend.client() as redis:
            stats = await redis.info("commandstats")
        return sum(int(stats.get(f"cmdstat_{n}", {}).get("calls", 0)) for n in ("evalsha", "eval"))
    total = 0
    for node in backend.nodes.primaries():
        stats = await asyncio.to_thread(node.cli, "INFO", "commandstats")
        for line in stats.splitlines():
            if line.startswith(("cmdstat_evalsha:", "cmdstat_eval:")):
                total += int(line.split("calls=")[1].split(",")[0])
    return total


async def test_a_joined_transcript_is_the_same_from_redis_as_from_postgresql(
    scaled: Scaled, db: asyncpg.Pool
) -> None:
    """`joined` built from the copy Redis keeps is the one built from PostgreSQL, after each
    kind of write: a persisted turn, a regenerated reply, a changed title; a deleted
    conversation is not found, with no copy left behind."""
    web_a, web_b = scaled.webs
    user = new_user()
    writer = TabClient(user, None, [web_a], "writer")
    tabs = [writer]
    redis = scaled.backend.client()

    async def fresh_join() -> f.Joined:
        tabs.append(tab := TabClient(user, conversation, [web_b], f"tab-{len(tabs)}"))
        return await tab.join()

    async def both_ways(last_reply: uuid.UUID) -> f.Joined:
        """A join from the copy (PostgreSQL untouched), then one with the copy dropped."""
        for _ in range(100):  # until the reply is persisted, marked, and a join kept the copy
            joined = await fresh_join()
            history = joined.history or []
            held = bool(history) and history[-1].id == last_reply
            if held and await redis.exists(keys.history(conversation)):
                break
            await asyncio.sleep(0.1)
        before = await postgres_queries(web_b)
        cached = await fresh_join()
        assert await postgres_queries(web_b) == before
        await redis.delete(keys.history(conversation))
        stored = await fresh_join()
        assert await postgres_queries(web_b) > before
        assert cached.history is not None and cached.history[-1].id == last_reply
        assert (cached.history, cached.meta, cached.last_seq) == (
            stored.history,
            stored.meta,
            stored.last_seq,
        )
        rows = await wait_persisted(db, conversation, 0)
        assert [(m.role, m.content) for m in cached.history] == [
            r[:2] for r in rows if r[:2] in {(m.role, m.content) for m in cached.history}
        ]
        return cached

    try:
        conversation = await writer.create(web_a, title="both ways")
        await writer.join()
        await writer.say(f"one {SCALE_REPLY}")
        await until(lambda: writer.settled(2), 10, "the reply", tabs)
        client = writer.client
        assert client is not None
        done = [fr for fr in client.frames if isinstance(fr, f.Done)]
        first = await both_ways(done[-1].message_id)
        assert first.history is not None and len(first.history) == 2

        ack = await client.request(f.Regenerate(conversation=conversation))
        await client.wait_for(
            lambda fr: isinstance(fr, f.Done) and fr.message_id == ack.message_id, timeout=15
        )
        again = await both_ways(ack.message_id)
        assert again.history is not None and len(again.history) == 2
        assert again.history[0] == first.history[0]

        await client.request(f.Update(conversation=conversation, title="renamed"))
        renamed = await both_ways(ack.message_id)
        assert renamed.meta.title == "renamed" and renamed.history == again.history

        async with httpx.AsyncClient(base_url=web_a.url) as http:
            deleted = await http.delete(
                f"/api/conversations/{conversation}",
                headers={"Authorization": f"Bearer {mint(user)}"},
            )
        assert deleted.status_code == 204
        assert not await redis.exists(keys.history(conversation))
        with pytest.raises(ProtocolError) as refused:
            await fresh_join()
        assert refused.value.error.code == "not_found"
    finally:
        await redis.aclose()
        await close_all(tabs)


# --------------------------------------------------------------------------- the guarantee

PROPERTY_REPLY = "[sim:tokens=40][sim:tps=150]"
OPS = ("join", "leave", "drop", "rejoin")
actions = st.tuples(
    st.integers(1, 3),  # which tab (0 is the driver, always joined)
    st.sampled_from(OPS),
    st.floats(0.0, 0.15),  # delay before the action
    st.integers(0, 1),  # which web process, when it (re)connects
)
schedules = st.lists(st.lists(actions, min_size=1, max_size=4), min_size=2, max_size=3)


async def act(tab: TabClient, op: str, server: ParleyProcess) -> None:
    if op == "join":
        await tab.join(None, server)
    elif op == "leave" and tab.state == "on":
        await tab.leave()
    elif op == "drop" and tab.state != "off":
        tab.drop()
    elif op == "rejoin":
        await tab.rejoin(server)


@end_to_end_examples(8)
@given(schedule=schedules)
async def test_random_joins_leaves_drops_and_rejoins_end_identical(
    scaled: Scaled, db: asyncpg.Pool, schedule: list[list[tuple[int, str, float, int]]]
) -> None:
    webs = scaled.webs
    user = new_user()
    driver = TabClient(user, None, webs, "driver")
    await driver.create(webs[0], title="property")
    tabs = [driver] + [TabClient(user, driver.conversation, webs, f"tab{i}") for i in range(1, 4)]
    try:
        await driver.join()
        for turn, steps in enumerate(schedule):
            await driver.say(f"turn {turn} {PROPERTY_REPLY}")
            for index, op, delay, web in steps:
                await asyncio.sleep(delay)
                await act(tabs[index], op, webs[web])
            await until(
                lambda n=turn: driver.settled(2 * (n + 1)), 15, f"turn {turn} to finish", tabs
            )
        for index, tab in enumerate(tabs[1:]):
            if tab.state != "on":
                await tab.rejoin(webs[index % 2])
        head = driver.last_seq or 0
        await until(
            lambda: all((t.last_seq or 0) >= head and t.settled(2 * len(schedule)) for t in tabs),
            10,
            "every tab to reach the head",
            tabs,
        )
        rows = await wait_persisted(db, driver.conversation, 2 * len(schedule))
        expected = [(role, content) for role, content, _ in rows]
        assert [r for r, _ in expected] == ["user", "assistant"] * len(schedule)
        check_tabs(tabs, expected, schedule)
    finally:
        await close_all(tabs)


# --------------------------------------------------------------------------- trimmed log: reset


@pytest.fixture(scope="module")
def short_log(cluster: Cluster) -> Any:
    server = cluster.process(
        "serve",
        start=False,
        REDIS_URL=redis_db(cluster.services.redis_url, SHORT_LOG_DB),
        PARLEY_REDIS_LOG_MAX_EVENTS="10",
    )
    start_all([server])
    yield server
    server.stop(timeout=15)


async def test_rejoin_after_trimmed_events_gets_reset_and_full_history(
    short_log: ParleyProcess, db: asyncpg.Pool
) -> None:
    """log_max_events = 10 and 300-token replies: a rejoin with an old `after` gets
    `reset: true` and the whole persisted history, never a partial replay — after a turn and in
    the middle of one — and every tab ends with the persisted transcript."""
    user = new_user()
    servers = [short_log]
    writer = TabClient(user, None, servers, "writer")
    tabs = [writer]
    redis = Redis.from_url(redis_db(short_log.env["REDIS_URL"], SHORT_LOG_DB))
    try:
        conversation = await writer.create(short_log, title="short log")
        await writer.join()
        await writer.say("one [sim:tokens=300]")
        await until(lambda: writer.settled(2), 15, "the first reply", tabs)
        rows = await wait_persisted(db, conversation, 2)
        oldest = await redis.xrange(keys.log(conversation), count=1)
        assert oldest and int(oldest[0][0].split(b"-")[0]) > 5, "the log was not trimmed"

        late = TabClient(user, conversation, servers, "late")
        tabs.append(late)
        joined = await late.join(after=1)
        assert joined.reset and joined.history is not None, joined
        assert [(m.role, m.content) for m in joined.history] == [(r[0], r[1]) for r in rows]

        await writer.say("two [sim:tokens=300][sim:tps=150]")
        await until(lambda: writer.tokens() >= 450, 15, "the second reply to be under way", tabs)
        mid = TabClient(user, conversation, servers, "mid-after")
        fresh = TabClient(user, conversation, servers, "mid-fresh")
        tabs += [mid, fresh]
        joined = await mid.join(after=3)
        assert joined.reset and joined.history is not None, joined
        await fresh.join()
        await until(lambda: writer.settled(4), 15, "the second reply", tabs)
        rows = await wait_persisted(db, conversation, 4)
        expected = [(r[0], r[1]) for r in rows]
        head = writer.last_seq or 0
        await until(
            lambda: all((t.last_seq or 0) >= head and t.settled(4) for t in tabs),
            10,
            "every tab to reach the head",
            tabs,
        )
        check_tabs(tabs, expected)
    finally:
        await redis.aclose()
        await close_all(tabs)
