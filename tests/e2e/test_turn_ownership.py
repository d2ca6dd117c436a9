"""A web process's copy of a conversation's row for its turns (`Copy`,
server/edge/conversations.py) against what another web process changes meanwhile: the say
script accepts the turn only while Redis holds the row the copy was read from, so a model
set elsewhere is the one the next turn uses, a conversation deleted or erased elsewhere
refuses the turn as `not_found`, another user is refused as before, and a conversation Redis
lost is loaded from PostgreSQL again. The turns go through the shared `parley` server (its
copy made by the first turn); the changes through a second web process on the same Redis
and PostgreSQL (no worker: the shared server's takes the turns)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from redis.asyncio import Redis

from protocol import frames as f
from server.dev.client import Client, ProtocolError
from server.redis import keys
from tests.helpers.auth import mint, new_user
from tests.helpers.conversations import say_and_finish, start_conversation
from tests.helpers.processes import Cluster, ParleyProcess

KEY = "ownership-test-key"
QUICK = "[sim:tokens=2] [sim:tps=200]"


@pytest.fixture(scope="module")
def elsewhere(cluster: Cluster) -> Iterator[ParleyProcess]:
    """Another web process on the shared server's Redis database and PostgreSQL."""
    web = cluster.process("web", PARLEY_SERVER_API_KEYS=KEY)
    try:
        yield web
    finally:
        web.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def redis(cluster: Cluster) -> AsyncIterator[Redis]:
    async with Redis.from_url(cluster.services.redis_url) as client:
        yield client


async def said_once(connect: Any, user: str) -> tuple[Client, uuid.UUID]:
    """A tab of `user` on the shared server and a conversation it made and said one turn in
    (so the server holds a copy of its row)."""
    tab: Client = await connect(user)
    conversation = await start_conversation(tab)
    await say_and_finish(tab, conversation, f"one {QUICK}")
    return tab, conversation


async def refused(tab: Client, frame: Any) -> str:
    with pytest.raises(ProtocolError) as error:
        await tab.request(frame)
    return error.value.error.code


async def test_a_turn_uses_the_model_another_web_process_set(
    connect: Any, user: str, elsewhere: ParleyProcess
) -> None:
    tab, conversation = await said_once(connect, user)
    other = await Client.connect(elsewhere.ws_url, mint(user))
    try:
        await other.request(f.Update(conversation=conversation, model="another-model"))
    finally:
        await other.close()
    begin = len(tab.frames)
    await tab.request(f.Say(conversation=conversation, text=f"two {QUICK}"))
    start = await tab.wait_for(lambda fr: isinstance(fr, f.Start), start=begin)
    assert start.model == "another-model"
    await tab.wait_for(lambda fr: isinstance(fr, f.Done), start=begin)


async def test_another_users_turn_is_not_found_on_a_process_holding_the_owners_copy(
    connect: Any, user: str
) -> None:
    _, conversation = await said_once(connect, user)
    stranger: Client = await connect(new_user())
    assert await refused(stranger, f.Say(conversation=conversation, text="mine?")) == "not_found"
    assert await refused(stranger, f.Regenerate(conversation=conversation)) == "not_found"


@pytest.mark.parametrize("erased", [False, True], ids=["deleted", "user-erased"])
async def test_a_conversation_deleted_elsewhere_refuses_the_turn(
    connect: Any, user: str, elsewhere: ParleyProcess, erased: bool
) -> None:
    tab, conversation = await said_once(connect, user)
    if erased:  # the server API's erasure of the user and everything of theirs
        path, bearer = f"/api/server/users/{user}", KEY
    else:
        path, bearer = f"/api/conversations/{conversation}", mint(user)
    async with httpx.AsyncClient(base_url=elsewhere.url) as http:
        gone = await http.delete(path, headers={"Authorization": f"Bearer {bearer}"})
    assert gone.status_code == 204
    assert await refused(tab, f.Say(conversation=conversation, text="still?")) == "not_found"
    assert await refused(tab, f.Regenerate(conversation=conversation)) == "not_found"


async def test_a_conversation_redis_lost_is_loaded_again_for_the_turn(
    connect: Any, user: str, redis: Redis
) -> None:
    tab, conversation = await said_once(connect, user)
    await redis.delete(keys.meta(conversation), keys.recent(conversation))  # expired
    done = await say_and_finish(tab, conversation, f"two {QUICK}")
    assert done.reason == "stop"
    assert await redis.exists(keys.meta(conversation)) == 1
