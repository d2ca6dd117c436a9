"""Token budgets end to end, on a single Redis and on a Redis Cluster (where the reservation
and the settlement are steps of their own on the user's slot): two `parley web` processes
and a worker on their own Redis database or cluster, users' tabs firing turns at once, the
usage ledger in PostgreSQL, `GET /api/usage`, the server API's usage, budget and export, and
a Redis flush that must not give budget back."""

from __future__ import annotations

import asyncio
import csv
import io
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio

from protocol import frames as f
from server.dev.client import Client, ProtocolError
from tests.helpers.auth import mint, new_user
from tests.helpers.conversations import say_and_finish, start_conversation
from tests.helpers.processes import (
    BACKENDS,
    Cluster,
    Db,
    ParleyProcess,
    RedisBackend,
    clusters_for,
    redis_db,
    two_webs_and_a_worker,
)

KEY = "budget-key-0123456789abcdef"
LIMIT = 3300
"""Room for three turns' worst case (max_tokens 1000 and a short prompt), not four."""
TABS = 20


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest, cluster: Cluster) -> RedisBackend:
    """A database of the session's Redis, or a Redis Cluster of this module's own."""
    clusters = clusters_for(request)
    if clusters is None:
        return RedisBackend(redis_db(cluster.services.redis_url, Db.BUDGETS))
    return clusters.backend()


@pytest.fixture(scope="module")
def webs(cluster: Cluster, backend: RedisBackend) -> Iterator[tuple[ParleyProcess, ParleyProcess]]:
    env = {
        **backend.env(),
        "PARLEY_SERVER_API_KEYS": KEY,
        "PARLEY_BUDGETS_DEFAULT_TOKENS": str(LIMIT),
        "PARLEY_BUDGETS_GROUP_CLAIM": "plan",
        "PARLEY_BUDGETS_GROUPS": '{"pro": 1000000}',
        "PARLEY_BUDGETS_MODELS": '{"free": ["parley-sim"]}',
        "PARLEY_BUDGETS_PRICES": '{"parley-sim": {"input": 2.0, "output": 8.0}}',
        "PARLEY_LLM_MAX_TOKENS": "1000",
    }
    with two_webs_and_a_worker(cluster, **env) as webs:
        yield webs


@pytest_asyncio.fixture(loop_scope="session")
async def api(webs: tuple[ParleyProcess, ParleyProcess]) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=webs[1].url, headers={"authorization": f"Bearer {KEY}"}, timeout=10
    ) as client:
        yield client


async def ledger(db: asyncpg.Pool, user: str, turns: int) -> list[asyncpg.Record]:
    """The user's ledger rows once there are `turns` of them (the persister is asynchronous)."""
    for _ in range(100):
        rows = await db.fetch("SELECT * FROM usage WHERE owner = $1 ORDER BY finished_at", user)
        if len(rows) >= turns:
            return rows
        await asyncio.sleep(0.1)
    raise AssertionError(f"the ledger holds {len(rows)} turns of {user}, not {turns}")


def spent(rows: list[asyncpg.Record]) -> int:
    return sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows)


async def budget_of(api: httpx.AsyncClient, user: str) -> dict[str, Any]:
    reply = await api.get(f"/api/server/users/{user}/usage")
    assert reply.status_code == 200, reply.text
    report: dict[str, Any] = reply.json()
    return report["budget"]


async def outcome(client: Client, conversation: uuid.UUID) -> f.Ack | f.Error:
    try:
        ack: f.Ack = await client.request(
            f.Say(conversation=conversation, text="[sim:delay=1] [sim:tokens=30] go"), timeout=20
        )
    except ProtocolError as refused:
        return refused.error
    return ack


async def test_twenty_tabs_at_once_on_two_processes_run_exactly_what_the_budget_holds(
    webs: tuple[ParleyProcess, ParleyProcess], api: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    user = new_user()
    token = mint(user)
    tabs = [await Client.connect(webs[i % 2].ws_url, token) for i in range(TABS)]
    try:
        ready = tabs[0].ready
        assert ready is not None and ready.budget is not None
        assert (ready.budget.limit, ready.budget.used, ready.budget.remaining) == (LIMIT, 0, LIMIT)
        conversations = [await start_conversation(tab) for tab in tabs]
        results = await asyncio.gather(*map(outcome, tabs, conversations))
        accepted = [(i, r) for i, r in enumerate(results) if isinstance(r, f.Ack)]
        refused = [r for r in results if isinstance(r, f.Error)]
        assert len(accepted) == 3, results
        assert len(refused) == TABS - 3
        for error in refused:
            assert error.code == "quota_exceeded" and error.remaining == 0
            assert error.resets_at is not None and error.resets_at > f.utcnow()
        reported = 0
        for i, _ in accepted:
            done = await tabs[i].wait_for(
                lambda fr, conversation=conversations[i]: (
                    isinstance(fr, f.Done) and fr.conversation == conversation
                ),
                timeout=30,
            )
            assert done.reason == "stop" and done.usage is not None
            reported += done.usage.prompt_tokens + done.usage.completion_tokens
        rows = await ledger(db, user, 3)
        assert len(rows) == 3 and spent(rows) == reported
        assert {r["status"] for r in rows} == {"complete"}
        expected_cost = sum(
            (r["prompt_tokens"] * 2.0 + r["completion_tokens"] * 8.0) / 1e6 for r in rows
        )
        assert sum(r["cost"] for r in rows) == pytest.approx(expected_cost)
        assert (await budget_of(api, user))["used"] == reported  # every reservation settled
    finally:
        await asyncio.gather(*(tab.close() for tab in tabs))


async def test_a_redis_flush_between_turns_gives_no_budget_back(
    webs: tuple[ParleyProcess, ParleyProcess],
    api: httpx.AsyncClient,
    db: asyncpg.Pool,
    backend: RedisBackend,
) -> None:
    user = new_user()
    async with await Client.connect(webs[0].ws_url, mint(user)) as client:
        conversation = await start_conversation(client)
        first = await say_and_finish(client, conversation, "[sim:tokens=40] one")
        assert first.usage is not None
        rows = await ledger(db, user, 1)
    redis = backend.client()
    try:
        await redis.flushdb()  # on a cluster: every primary
    finally:
        await redis.aclose()
    assert (await budget_of(api, user))["used"] == spent(rows) > 0  # rebuilt from the ledger
    async with await Client.connect(webs[1].ws_url, mint(user)) as client:
        assert client.ready is not None and client.ready.budget is not None
        assert client.ready.budget.used == spent(rows)
        await client.request(f.Join(conversation=conversation))
        second = await say_and_finish(client, conversation, "[sim:tokens=40] two")
        assert second.reason == "stop"
    rows = await ledger(db, user, 2)
    assert (await budget_of(api, user))["used"] == spent(rows)


async def test_cancelled_and_failed_turns_give_their_reservation_back(
    webs: tuple[ParleyProcess, ParleyProcess], api: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    user = new_user()
    async with await Client.connect(webs[0].ws_url, mint(user)) as client:
        conversation = await start_conversation(client)
        start = len(client.frames)
        await client.request(f.Say(conversation=conversation, text="[sim:delay=5] slow"))
        assert (await budget_of(api, user))["used"] > 1000  # the worst case is reserved
        await client.request(f.Cancel(conversation=conversation))
        cancelled = await client.wait_for(lambda fr: isinstance(fr, f.Done), start=start)
        assert cancelled.reason == "cancelled"
        failed = await say_and_finish(client, conversation, "[sim:error] break")
        assert failed.reason == "error"
    rows = await ledger(db, user, 2)
    assert [r["status"] for r in rows] == ["cancelled", "error"]
    assert (await budget_of(api, user))["used"] == spent(rows) < 1000


async def test_usage_reads_back_per_day_and_model_and_exports_for_billing(
    webs: tuple[ParleyProcess, ParleyProcess], api: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    user = new_user()
    token = mint(user)
    async with await Client.connect(webs[0].ws_url, token) as client:
        conversation = await start_conversation(client)
        await say_and_finish(client, conversation, "[sim:tokens=20] a")
        await say_and_finish(client, conversation, "[sim:tokens=20] b")
    rows = await ledger(db, user, 2)
    async with httpx.AsyncClient(base_url=webs[0].url, timeout=10) as http:
        await http.delete(
            f"/api/conversations/{conversation}", headers={"authorization": f"Bearer {token}"}
        )
        mine = await http.get(
            "/api/usage", params={"group_by": "model"}, headers={"authorization": f"Bearer {token}"}
        )
        bad = await http.get(
            "/api/usage",
            params={"from": "2026-01-02T00:00:00Z", "to": "2026-01-01T00:00:00Z"},
            headers={"authorization": f"Bearer {token}"},
        )
        year_one = await http.get(
            "/api/usage",
            params={"to": "0001-01-01T00:04:01+23:35"},  # 30 days before it is before year 1
            headers={"authorization": f"Bearer {token}"},
        )
        anonymous = await http.get("/api/usage")
    assert (bad.status_code, year_one.status_code, anonymous.status_code) == (400, 400, 401)
    assert mine.status_code == 200, mine.text
    totals = mine.json()["totals"]
    assert [t["key"] for t in totals] == ["parley-sim"] and totals[0]["turns"] == 2
    assert totals[0]["prompt_tokens"] + totals[0]["completion_tokens"] == spent(rows)
    kept = await db.fetchval("SELECT count(*) FROM usage WHERE owner = $1", user)
    assert kept == 2  # the conversation is gone, its spending is not
    exported = await api.get("/api/server/usage/export", params={"user": user, "format": "csv"})
    assert exported.status_code == 200 and exported.headers["content-type"].startswith("text/csv")
    lines = list(csv.DictReader(io.StringIO(exported.text)))
    assert [int(line["completion_tokens"]) for line in lines] == [
        r["completion_tokens"] for r in rows
    ]
    as_json = await api.get("/api/server/usage/export", params={"user": user})
    assert [r["message_id"] for r in as_json.json()] == [str(r["message_id"]) for r in rows]


async def test_a_users_own_budget_and_group_policy(
    webs: tuple[ParleyProcess, ParleyProcess], api: httpx.AsyncClient
) -> None:
    user = new_user()
    changed = await api.put(f"/api/server/users/{user}/budget", json={"tokens": 10})
    assert changed.status_code == 200 and changed.json()["limit"] == 10
    async with await Client.connect(webs[1].ws_url, mint(user, plan="free")) as client:
        with pytest.raises(ProtocolError) as forbidden:
            await client.request(f.Create(model="gpt-expensive"))
        assert forbidden.value.error.code == "forbidden_model"
        conversation = await start_conversation(client)
        with pytest.raises(ProtocolError) as over:
            await client.request(f.Say(conversation=conversation, text="hello"))
        assert over.value.error.code == "quota_exceeded"
    back = await api.put(f"/api/server/users/{user}/budget", json={"tokens": None})
    assert back.json()["limit"] == LIMIT
    async with await Client.connect(webs[0].ws_url, mint(user, plan="pro")) as client:
        assert client.ready is not None and client.ready.budget is not None
        assert client.ready.budget.limit == 1_000_000
        pro_only = await start_conversation(client, model="gpt-expensive")  # pro: any model
    async with await Client.connect(webs[1].ws_url, mint(user, plan="free")) as client:
        await client.request(f.Join(conversation=pro_only))
        with pytest.raises(ProtocolError) as downgraded:
            await client.request(f.Say(conversation=pro_only, text="hello"))
        assert downgraded.value.error.code == "forbidden_model"
