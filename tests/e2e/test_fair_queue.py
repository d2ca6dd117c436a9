"""The fair queue end to end: a web process and workers with a few slots on their own Redis
database or Redis Cluster; users' turns wait for a slot round-robin, their tabs see `queued`
positions, a user runs at most `limits.generations_per_user` at once, a queued turn can be
cancelled, and a worker killed while turns wait loses none."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from protocol import frames as f
from server.dev.client import Client
from tests.helpers.auth import mint, new_user
from tests.helpers.processes import (
    BACKENDS,
    Cluster,
    Db,
    ParleyProcess,
    RedisBackend,
    clusters_for,
    redis_db,
    start_all,
    stop_together,
)

SLOTS = "4"
TURNS_PER_MINUTE = "100"


def reply(tokens: int, tps: int = 10) -> str:
    """A turn whose simulated reply lasts about tokens / tps seconds."""
    return f"[sim:tokens={tokens}] [sim:tps={tps}] go"


def backend(request: pytest.FixtureRequest, cluster: Cluster, db: Db) -> RedisBackend:
    """Database `db` of the session's Redis, or a Redis Cluster of its own."""
    clusters = clusters_for(request)
    if clusters is None:
        return RedisBackend(redis_db(cluster.services.redis_url, db))
    return clusters.backend()


@contextlib.contextmanager
def web_and_worker(cluster: Cluster, backend: RedisBackend, **env: str) -> Iterator[ParleyProcess]:
    env = {**backend.env(), **env}
    procs = [cluster.process(role, start=False, **env) for role in ("web", "worker")]
    start_all(procs)
    try:
        yield procs[0]
    finally:
        stop_together(procs)


@pytest.fixture(scope="module", params=BACKENDS)
def uncapped(request: pytest.FixtureRequest, cluster: Cluster) -> Iterator[ParleyProcess]:
    env = {
        "PARLEY_WORKER_CONCURRENCY": SLOTS,
        "PARLEY_LIMITS_GENERATIONS_PER_USER": "0",
        "PARLEY_LIMITS_TURNS_PER_MINUTE": TURNS_PER_MINUTE,
    }
    with web_and_worker(cluster, backend(request, cluster, Db.FAIR_QUEUE), **env) as web:
        yield web


@pytest.fixture(scope="module", params=BACKENDS)
def capped(request: pytest.FixtureRequest, cluster: Cluster) -> Iterator[ParleyProcess]:
    on = backend(request, cluster, Db.FAIR_QUEUE_CAP)
    with web_and_worker(cluster, on, PARLEY_WORKER_CONCURRENCY=SLOTS) as web:
        yield web


@pytest.fixture(params=BACKENDS)
def kill_backend(request: pytest.FixtureRequest, cluster: Cluster) -> RedisBackend:
    return backend(request, cluster, Db.FAIR_QUEUE_KILL)


@pytest_asyncio.fixture(loop_scope="session")
async def tabs() -> AsyncIterator[list[Client]]:
    opened: list[Client] = []
    yield opened
    for client in opened:
        await client.close()


async def tab(opened: list[Client], web: ParleyProcess, user: str) -> Client:
    client = await Client.connect(web.ws_url, mint(user))
    opened.append(client)
    return client


async def conversations(client: Client, n: int) -> list[uuid.UUID]:
    made = []
    for _ in range(n):
        created = await client.request(f.Create())
        await client.request(f.Join(conversation=created.conversation))
        made.append(created.conversation)
    return made


async def join(client: Client, made: list[uuid.UUID]) -> None:
    for conversation in made:
        await client.request(f.Join(conversation=conversation))


async def done(client: Client, conversation: uuid.UUID, timeout: float = 90) -> f.Done:
    return await client.wait_for(
        lambda fr: isinstance(fr, f.Done) and fr.conversation == conversation, timeout=timeout
    )


async def started(client: Client, conversation: uuid.UUID) -> None:
    await client.wait_for(lambda fr: isinstance(fr, f.Start) and fr.conversation == conversation)


def arrivals(client: Client, kind: type, after: float = 0.0) -> list[tuple[float, f.ServerFrame]]:
    return [
        (at, fr)
        for at, fr in zip(client.arrived, client.frames, strict=True)
        if isinstance(fr, kind) and at >= after
    ]


def positions(client: Client, conversation: uuid.UUID) -> list[int]:
    return [
        fr.position
        for fr in client.frames
        if isinstance(fr, f.Queued) and fr.conversation == conversation
    ]


def most_running(client: Client) -> int:
    """The most generations the tab saw running at once (between their `start` and `done`)."""
    running, most = 0, 0
    for fr in client.frames:
        if isinstance(fr, f.Start):
            running += 1
            most = max(most, running)
        elif isinstance(fr, f.Done):
            running -= 1
    return most


async def test_one_user_with_forty_queued_turns_does_not_starve_another_with_two(
    uncapped: ParleyProcess, tabs: list[Client]
) -> None:
    a, b = new_user(), new_user()
    a_tab = await tab(tabs, uncapped, a)
    a_made = await conversations(a_tab, 40)
    for i, conversation in enumerate(a_made):
        await a_tab.request(f.Say(conversation=conversation, text=reply(6 + 2 * (i % 4))))
    b_tabs = [await tab(tabs, uncapped, b), await tab(tabs, uncapped, b)]
    b_made = await conversations(b_tabs[0], 2)
    await join(b_tabs[1], b_made)
    queued_at = asyncio.get_running_loop().time()
    for conversation in b_made:
        await b_tabs[0].request(f.Say(conversation=conversation, text=reply(4)))
    await done(b_tabs[0], b_made[0])
    b_start = arrivals(b_tabs[0], f.Start)[0][0]
    a_started_between = [fr for at, fr in arrivals(a_tab, f.Start, queued_at) if at < b_start]
    assert len(a_started_between) <= 2, "B's first turn waited for more than two slots"
    for client in b_tabs:
        for conversation in b_made:
            await done(client, conversation)
            seen = positions(client, conversation)
            assert seen, "a waiting turn's tab was not told it is queued"
            assert seen == sorted(seen, reverse=True), seen
    for conversation in b_made:  # every tab of the conversation is told the same
        assert positions(b_tabs[0], conversation) == positions(b_tabs[1], conversation)
    for conversation in a_made:  # and A's turns all ran, none lost
        assert (await done(a_tab, conversation)).reason == "stop"


async def test_a_user_runs_at_most_two_generations_at_once(
    capped: ParleyProcess, tabs: list[Client]
) -> None:
    client = await tab(tabs, capped, new_user())
    made = await conversations(client, 5)
    for conversation in made:
        await client.request(f.Say(conversation=conversation, text=reply(8)))
    for conversation in made:
        assert (await done(client, conversation, 60)).reason == "stop"
    assert most_running(client) == 2
    assert all(positions(client, c) for c in made[2:]), "the turns past the cap wait"


async def test_cancelling_a_queued_turn_removes_it_and_ends_it_cancelled(
    capped: ParleyProcess, tabs: list[Client]
) -> None:
    client = await tab(tabs, capped, new_user())
    made = await conversations(client, 3)
    for conversation in made:
        await client.request(f.Say(conversation=conversation, text=reply(40)))
    waiting = made[2]
    await client.wait_for(lambda fr: isinstance(fr, f.Queued) and fr.conversation == waiting)
    await client.request(f.Cancel(conversation=waiting))
    ended = await done(client, waiting, timeout=3)  # the others run for 4 s: it did not wait
    assert ended.reason == "cancelled"
    assert not [e for e in client.events(waiting) if isinstance(e, f.Token)]
    assert not [
        fr for fr in client.frames if isinstance(fr, f.Done) and fr.conversation in made[:2]
    ]
    for conversation in made[:2]:
        assert (await done(client, conversation, 30)).reason == "stop"


async def test_a_worker_killed_while_turns_wait_loses_none(
    cluster: Cluster, kill_backend: RedisBackend, tabs: list[Client]
) -> None:
    env = {
        **kill_backend.env(),
        "PARLEY_WORKER_CONCURRENCY": "2",
        "PARLEY_WORKER_LEASE_SECONDS": "1",
    }
    procs = [cluster.process(role, start=False, **env) for role in ("web", "worker")]
    start_all(procs)
    spare = cluster.process("worker", start=False, **env)
    try:
        web, worker = procs
        users = [new_user() for _ in range(3)]
        clients = [await tab(tabs, web, user) for user in users]
        made = {client: await conversations(client, 2) for client in clients}
        for client, convs in made.items():
            for conversation in convs:
                await client.request(f.Say(conversation=conversation, text=reply(30)))
        await clients[0].wait_for(lambda fr: isinstance(fr, f.Start))
        worker.kill()
        start_all([spare])
        for client, convs in made.items():
            for conversation in convs:
                assert (await done(client, conversation, 90)).reason == "stop"
    finally:
        stop_together([*procs, spare])


async def test_a_regenerated_turn_waits_its_turn_and_counts_against_the_cap(
    capped: ParleyProcess, tabs: list[Client]
) -> None:
    client = await tab(tabs, capped, new_user())
    again, *busy = await conversations(client, 3)
    await client.request(f.Say(conversation=again, text=reply(2, tps=100)))
    first = await done(client, again, 30)
    for conversation in busy:  # the user's two generations: the cap is reached
        await client.request(f.Say(conversation=conversation, text=reply(30)))
        await started(client, conversation)
    ack = await client.request(f.Regenerate(conversation=again))
    regenerated: f.Done = await client.wait_for(
        lambda fr: isinstance(fr, f.Done) and fr.message_id == ack.message_id, timeout=60
    )
    assert regenerated.reason == "stop"
    seen = [
        (index, fr)
        for index, fr in enumerate(client.frames)
        if isinstance(fr, f.Queued | f.Start) and fr.message_id == ack.message_id
    ]
    assert isinstance(seen[0][1], f.Queued) and isinstance(seen[-1][1], f.Start), seen
    started_at, start = seen[-1]
    assert isinstance(start, f.Start) and start.replaces == first.message_id
    freed = [
        fr
        for fr in client.frames[:started_at]
        if isinstance(fr, f.Done) and fr.conversation in busy
    ]
    assert freed, "the regenerated turn started before one of the user's turns ended"
    assert most_running(client) == 2
