"""The server API (`/api/server/`, docs/server-api.md) on two `parley web` processes and a
worker sharing their own Redis database: API keys, disconnects and revocations across
processes, notices, presence, and a user's data read, exported and erased."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio
from redis.asyncio import Redis

from protocol import frames as f
from server.dev.client import Client
from server.edge.disconnects import Disconnect, publish
from tests.helpers.auth import mint, new_user
from tests.helpers.conversations import say_and_finish, start_conversation, wait_persisted
from tests.helpers.openapi import fuzz
from tests.helpers.processes import Cluster, Db, ParleyProcess, redis_db, two_webs_and_a_worker

SERVER_API_DB = Db.SERVER_API
KEY = "server-key-0123456789abcdef"
OTHER_KEY = "second-key-0123456789abcdef"
UNAUTHORIZED = 4401


@pytest.fixture(scope="module")
def webs(cluster: Cluster) -> Iterator[tuple[ParleyProcess, ParleyProcess]]:
    env = {
        "REDIS_URL": redis_db(cluster.services.redis_url, SERVER_API_DB),
        "PARLEY_SERVER_API_KEYS": f"{KEY}, {OTHER_KEY}",
    }
    with two_webs_and_a_worker(cluster, **env) as webs:
        yield webs


@pytest_asyncio.fixture(loop_scope="session")
async def api(webs: tuple[ParleyProcess, ParleyProcess]) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=webs[0].url, headers={"authorization": f"Bearer {KEY}"}, timeout=10
    ) as client:
        yield client


async def closed_with(client: Client, timeout: float = 5.0) -> int | None:
    code, _ = await asyncio.wait_for(asyncio.shield(client.closed), timeout)
    return code


async def refused(url: str, token: str) -> int | None:
    """The close code a socket offering `token` gets (None: it was accepted)."""
    client = await Client.connect(url, token, wait_ready=False)
    try:
        await client.wait_for(lambda fr: isinstance(fr, f.Ready), timeout=5)
    except ConnectionError:
        return await closed_with(client)
    finally:
        await client.close()
    return None


async def one_tab_each(webs: tuple[ParleyProcess, ParleyProcess], user: str) -> list[Client]:
    """A signed-in socket of `user` on each web process."""
    return [await Client.connect(web.ws_url, mint(user)) for web in webs]


async def test_keys_are_required_and_a_user_token_is_not_one(
    webs: tuple[ParleyProcess, ParleyProcess], parley: ParleyProcess
) -> None:
    user = new_user()
    path = f"/api/server/users/{user}/conversations"
    async with httpx.AsyncClient(base_url=webs[1].url, timeout=10) as http:
        assert (await http.get(path)).status_code == 401
        wrong = {"authorization": "Bearer not-the-key"}
        assert (await http.get(path, headers=wrong)).status_code == 401
        as_user = {"authorization": f"Bearer {mint(user)}"}
        assert (await http.get(path, headers=as_user)).status_code == 401
        no_scheme = {"authorization": KEY}
        assert (await http.get(path, headers=no_scheme)).status_code == 401
        for key in (KEY, OTHER_KEY):
            ok = await http.get(path, headers={"authorization": f"Bearer {key}"})
            assert ok.status_code == 200 and ok.json() == []
        body = await http.post("/api/server/disconnect", headers=wrong, content=b"[" * 100_000)
        assert body.status_code == 401
    async with httpx.AsyncClient(base_url=parley.url, timeout=10) as http:  # no keys: off
        off = await http.get(path, headers={"authorization": f"Bearer {KEY}"})
        assert off.status_code == 404


async def test_the_api_is_in_the_openapi_document(webs: tuple[ParleyProcess, ...]) -> None:
    async with httpx.AsyncClient(base_url=webs[0].url, timeout=10) as http:
        paths = (await http.get("/schema/openapi.json")).json()["paths"]
    for path in (
        "/api/server/disconnect",
        "/api/server/notice",
        "/api/server/conversations/{conversation}/presence",
        "/api/server/users/{user}/export",
    ):
        assert path in paths


def test_no_generated_request_gets_a_server_error(
    webs: tuple[ParleyProcess, ParleyProcess],
) -> None:
    """Every `/api/server/` operation, fuzzed from the OpenAPI document with a valid key."""
    operations = fuzz(webs[0].url, "^/api/server/", {"Authorization": f"Bearer {KEY}"}, 25)
    assert len(operations) >= 10, operations


async def test_bad_bodies_are_400(api: httpx.AsyncClient) -> None:
    deep = await api.post("/api/server/disconnect", content=b"[" * 100_000)
    assert deep.status_code == 400
    unknown = await api.post("/api/server/disconnect", json={"user": "u", "extra": 1})
    assert unknown.status_code == 400
    empty = await api.post("/api/server/notice", json={"user": "u", "text": ""})
    assert empty.status_code == 400


async def test_disconnect_closes_every_socket_on_both_processes_and_revokes_the_token(
    webs: tuple[ParleyProcess, ParleyProcess], api: httpx.AsyncClient
) -> None:
    web_a, web_b = webs
    user = new_user()
    token = mint(user)
    tabs = [
        await Client.connect(web_a.ws_url, token),
        await Client.connect(web_a.ws_url, token),
        await Client.connect(web_b.ws_url, token),
    ]
    bystander = await Client.connect(web_b.ws_url, mint(new_user()))
    try:
        started = time.monotonic()
        answer = await api.post("/api/server/disconnect", json={"user": user})
        assert answer.status_code == 202
        codes = await asyncio.gather(*(closed_with(tab) for tab in tabs))
        took = time.monotonic() - started
        assert codes == [UNAUTHORIZED] * 3
        assert took < 1.0, f"disconnect took {took:.3f} s"
        assert not bystander.closed.done()
        for web in webs:  # the old token, cached by both processes before, is refused
            assert await refused(web.ws_url, token) == UNAUTHORIZED
        revoked_before = answer.json()["revoked_before"]
        await asyncio.sleep(max(int(revoked_before) + 1 - time.time(), 0) + 0.01)
        fresh = mint(user)  # issued after the revocation (iat counts whole seconds)
        assert await refused(web_b.ws_url, fresh) is None
        rest = await api.get(f"/api/server/users/{user}/conversations")
        assert rest.status_code == 200
    finally:
        for client in (*tabs, bystander):
            await client.close()


async def test_a_socket_admitted_while_the_revocation_was_written_is_swept_later(
    webs: tuple[ParleyProcess, ParleyProcess], cluster: Cluster
) -> None:
    """The disconnect message alone (no revocation in Redis, as for a token verified just
    before it was written): the late sweep closes a socket signed in with an older token."""
    user = new_user()
    old = mint(user)
    before = time.time() + 0.001
    redis = Redis.from_url(redis_db(cluster.services.redis_url, SERVER_API_DB))
    try:
        await publish(redis, Disconnect(user=user, before=before))
    finally:
        await redis.aclose()
    late = await Client.connect(webs[1].ws_url, old)
    await asyncio.sleep(max(int(before) + 1 - time.time(), 0) + 0.01)
    fresh = await Client.connect(webs[1].ws_url, mint(user))
    try:
        assert await closed_with(late, 3.0) == UNAUTHORIZED
        await fresh.request(f.Ping())
        assert not fresh.closed.done()
    finally:
        await late.close()
        await fresh.close()


async def test_session_disconnect_leaves_the_other_sessions(
    webs: tuple[ParleyProcess, ParleyProcess], api: httpx.AsyncClient
) -> None:
    web_a, web_b = webs
    user = new_user()
    kept_token, dropped_token = mint(user, jti="kept"), mint(user, jti="dropped")
    plain_token = mint(user, ttl=3000)  # no jti, no sid: revoked by its digest
    kept = await Client.connect(web_a.ws_url, kept_token)
    dropped = await Client.connect(web_a.ws_url, dropped_token)  # cached on web A
    plain = await Client.connect(web_b.ws_url, plain_token)
    also_plain = await Client.connect(web_a.ws_url, plain_token)
    try:
        for target in (dropped, plain):
            assert target.ready is not None
            session = target.ready.session
            answer = await api.post(
                "/api/server/disconnect", json={"user": user, "session": session}
            )
            assert answer.status_code == 202 and answer.json()["revoked_before"] is None
            assert await closed_with(target, 1.0) == UNAUTHORIZED
        await kept.request(f.Ping())
        assert not also_plain.closed.done()  # another session with the same token stays
        for web in webs:
            assert await refused(web.ws_url, dropped_token) == UNAUTHORIZED
            assert await refused(web.ws_url, plain_token) == UNAUTHORIZED
            assert await refused(web.ws_url, kept_token) is None
    finally:
        for client in (kept, dropped, plain, also_plain):
            await client.close()


async def test_notice_reaches_every_tab_with_a_seq_and_survives_a_rejoin(
    webs: tuple[ParleyProcess, ParleyProcess], api: httpx.AsyncClient
) -> None:
    user = new_user()
    a, b = await one_tab_each(webs, user)
    try:
        conversation = await start_conversation(a)
        joined = await b.request(f.Join(conversation=conversation))
        answer = await api.post(
            "/api/server/notice",
            json={"user": user, "conversation": str(conversation), "text": "maintenance at 5"},
        )
        assert answer.status_code == 202
        seq = answer.json()["seq"]
        assert seq == joined.last_seq + 1
        for tab in (a, b):
            notice = await tab.wait_for(lambda fr: isinstance(fr, f.Notice), timeout=5)
            assert (notice.seq, notice.text, notice.conversation) == (
                seq,
                "maintenance at 5",
                conversation,
            )
        later = await Client.connect(webs[1].ws_url, mint(user))
        async with later:
            await later.request(f.Join(conversation=conversation, after=seq - 1))
            replayed = await later.wait_for(lambda fr: isinstance(fr, f.Notice), timeout=5)
            assert replayed.seq == seq
        start = len(a.frames)
        to_user = await api.post("/api/server/notice", json={"user": user, "text": "hello"})
        assert to_user.status_code == 202 and to_user.json()["seq"] == 0
        for tab in (a, b):
            note = await tab.wait_for(
                lambda fr: isinstance(fr, f.Notice) and fr.text == "hello", timeout=5
            )
            assert note.conversation is None and note.seq == 0
        assert len(a.frames) > start
        other = await api.post(
            "/api/server/notice",
            json={"user": new_user(), "conversation": str(conversation), "text": "x"},
        )
        assert other.status_code == 404
    finally:
        await a.close()
        await b.close()


async def test_presence_counts_sockets_on_both_processes(
    webs: tuple[ParleyProcess, ParleyProcess], api: httpx.AsyncClient
) -> None:
    user = new_user()
    a, b = await one_tab_each(webs, user)
    guest = await Client.connect(webs[1].ws_url, mint(new_user()))
    try:
        conversation = await start_conversation(a)
        await start_conversation(guest)  # elsewhere: not counted here
        await b.request(f.Join(conversation=conversation))
        path = f"/api/server/conversations/{conversation}/presence"
        seen: dict[str, Any] = {}

        async def present(sockets: int) -> bool:
            seen.update((await api.get(path)).json())
            return seen["sockets"] == sockets

        await until_async(lambda: present(2), 5, "two sockets present")
        assert seen["users"] == [{"user": user, "sockets": 2}]
        await b.request(f.Leave(conversation=conversation))
        await until_async(lambda: present(1), 5, "one socket present")
        await a.close()
        await until_async(lambda: present(0), 5, "nobody present")
        assert seen["users"] == []
    finally:
        for client in (a, b, guest):
            await client.close()


async def until_async(check: Any, timeout: float, what: str) -> None:
    """Poll an async check, bounded by `timeout`."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        await asyncio.sleep(0.05)


async def test_export_holds_the_messages_and_erase_removes_everything(
    webs: tuple[ParleyProcess, ParleyProcess], api: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    user = new_user()
    tab = await Client.connect(webs[1].ws_url, mint(user))
    try:
        conversation = await start_conversation(tab, title="to export")
        await say_and_finish(tab, conversation, "remember the milk")
        assert len(await wait_persisted(db, conversation, 2)) == 2
        listed = (await api.get(f"/api/server/users/{user}/conversations")).json()
        assert [c["id"] for c in listed] == [str(conversation)]
        read = await api.get(f"/api/server/users/{user}/conversations/{conversation}")
        assert read.status_code == 200
        assert read.json()["messages"][0]["content"] == "remember the milk"
        assert (
            await api.get(f"/api/server/users/{new_user()}/conversations/{conversation}")
        ).status_code == 404
        export = (await api.get(f"/api/server/users/{user}/export")).json()
        assert export["user"] == user
        (exported,) = export["conversations"]
        assert exported["meta"]["title"] == "to export"
        assert [m["role"] for m in exported["messages"]] == ["user", "assistant"]
        assert exported["messages"][0]["content"] == "remember the milk"

        changed = len(tab.frames)
        assert (await api.delete(f"/api/server/users/{user}")).status_code == 204
        rows = await db.fetchval(
            "SELECT count(*) FROM messages WHERE conversation_id = $1", conversation
        )
        owned = await db.fetchval("SELECT count(*) FROM conversations WHERE owner = $1", user)
        assert (rows, owned) == (0, 0)
        read = await api.get(f"/api/server/users/{user}/conversations/{conversation}")
        assert read.status_code == 404
        assert (await api.get(f"/api/server/users/{user}/export")).json()["conversations"] == []
        await tab.wait_for(
            lambda fr: isinstance(fr, f.ConversationChanged) and fr.deleted, start=changed
        )
    finally:
        await tab.close()


def test_unknown_ids_are_404_not_500(webs: tuple[ParleyProcess, ParleyProcess]) -> None:
    headers = {"authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=webs[0].url, headers=headers, timeout=10) as http:
        missing = http.get(f"/api/server/users/u/conversations/{uuid.uuid4()}")
        assert missing.status_code == 404
        assert http.get("/api/server/conversations/not-a-uuid/presence").status_code in (400, 404)
        long_user = http.get(f"/api/server/users/{'u' * 300}/conversations")
        assert long_user.status_code == 400
