"""`approve` / `deny` through the shared server's sockets, for a call opened in Redis as the
worker opens it: every tab gets the request and the one resolution once, in seq order; two
tabs answering at the same instant get one outcome; a stranger, an unknown call and a late
answer each get a defined reply."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio
from redis.asyncio import Redis

from protocol import frames as f
from server.dev.client import Client, ProtocolError
from server.redis.approvals import Approvals
from tests.helpers.auth import mint, new_user
from tests.helpers.conversations import start_conversation
from tests.helpers.processes import ParleyProcess, Services

pytestmark = pytest.mark.e2e


@pytest_asyncio.fixture
async def store(services: Services) -> AsyncIterator[Approvals]:
    """The approvals of the shared server's Redis database, as its worker keeps them."""
    redis = Redis.from_url(services.redis_url)
    yield Approvals(redis, timeout=60)
    await redis.aclose()


async def tabs(parley: ParleyProcess, user: str, count: int) -> list[Client]:
    return [await Client.connect(parley.ws_url, mint(user)) for _ in range(count)]


async def pending_call(store: Approvals, conversation: uuid.UUID, owner: str) -> str:
    call_id = f"call_{uuid.uuid4().hex[:12]}"
    args = '{"path": "/tmp/x"}'
    await store.open(str(conversation), call_id, owner, "delete_file", args, str(uuid.uuid4()))
    return call_id


def of_type(client: Client, conversation: uuid.UUID, kind: type) -> list[f.ServerFrame]:
    return [e for e in client.events(conversation) if isinstance(e, kind)]


async def test_two_tabs_answering_at_once_get_one_outcome_everywhere(
    parley: ParleyProcess, store: Approvals
) -> None:
    user = new_user()
    first, second = await tabs(parley, user, 2)
    try:
        conversation = await start_conversation(first)
        await second.request(f.Join(conversation=conversation))
        call_id = await pending_call(store, conversation, user)
        for tab in (first, second):
            request = await tab.wait_for(lambda fr: isinstance(fr, f.ApprovalRequest))
            assert (request.call_id, request.tool) == (call_id, "delete_file")
        approved, denied = await asyncio.gather(
            first.request(f.Approve(conversation=conversation, call_id=call_id)),
            second.request(f.Deny(conversation=conversation, call_id=call_id, reason="no")),
        )
        answers = [approved.approval, denied.approval]
        assert sorted(a.first for a in answers) == [False, True]
        assert answers[0].state == answers[1].state
        won = answers[0].state
        for tab in (first, second):
            await tab.wait_for(lambda fr: isinstance(fr, f.ApprovalResolved))
        await asyncio.sleep(0.2)  # a second resolution, if there were one, would be here now
        seqs = set()
        for tab in (first, second):
            resolved = of_type(tab, conversation, f.ApprovalResolved)
            assert [(r.call_id, r.state, r.by) for r in resolved] == [(call_id, won, user)]
            assert len(of_type(tab, conversation, f.ApprovalRequest)) == 1
            seqs.add(tuple(e.seq for e in tab.events(conversation)))
        assert len(seqs) == 1  # the same events at the same seqs on both tabs
        later = await first.request(f.Approve(conversation=conversation, call_id=call_id))
        assert (later.approval.first, later.approval.state) == (False, won)
    finally:
        await asyncio.gather(first.close(), second.close())


async def test_a_reloaded_tab_finds_the_request_and_its_resolution(
    parley: ParleyProcess, store: Approvals
) -> None:
    user = new_user()
    (tab,) = await tabs(parley, user, 1)
    try:
        conversation = await start_conversation(tab)
        call_id = await pending_call(store, conversation, user)
        await tab.wait_for(lambda fr: isinstance(fr, f.ApprovalRequest))
    finally:
        await tab.close()
    (reloaded,) = await tabs(parley, user, 1)
    try:
        joined = await reloaded.request(f.Join(conversation=conversation))
        request = await reloaded.wait_for(lambda fr: isinstance(fr, f.ApprovalRequest))
        assert request.call_id == call_id and request.seq > joined.last_seq - 1
        ack = await reloaded.request(f.Deny(conversation=conversation, call_id=call_id))
        assert (ack.approval.first, ack.approval.state, ack.approval.by) == (True, "denied", user)
        resolved = await reloaded.wait_for(lambda fr: isinstance(fr, f.ApprovalResolved))
        assert resolved.seq == request.seq + 1 and resolved.state == "denied"
    finally:
        await reloaded.close()


async def test_to_a_stranger_a_call_is_not_found_like_an_unknown_one(
    parley: ParleyProcess, store: Approvals
) -> None:
    owner = new_user()
    (tab,) = await tabs(parley, owner, 1)
    (stranger,) = await tabs(parley, new_user(), 1)
    try:
        conversation = await start_conversation(tab)
        call_id = await pending_call(store, conversation, owner)
        with pytest.raises(ProtocolError) as refused:
            await stranger.request(f.Approve(conversation=conversation, call_id=call_id))
        assert refused.value.error.code == "not_found"
        assert "delete_file" not in refused.value.error.message
        with pytest.raises(ProtocolError) as unknown:
            await tab.request(f.Approve(conversation=conversation, call_id="call_nope"))
        assert (
            unknown.value.error.code == "not_found" and "call_nope" in unknown.value.error.message
        )
        still = await store.get(str(conversation), call_id)
        assert still is not None and still.state == "pending"
        assert not of_type(tab, conversation, f.ApprovalResolved)
        assert stranger.closed.done() is False and tab.closed.done() is False
    finally:
        await asyncio.gather(tab.close(), stranger.close())


async def test_the_same_answers_over_http_for_clients_on_server_sent_events(
    parley: ParleyProcess, store: Approvals
) -> None:
    owner = new_user()
    (tab,) = await tabs(parley, owner, 1)
    try:
        conversation = await start_conversation(tab)
        call_id = await pending_call(store, conversation, owner)
        url = f"/api/conversations/{conversation}/approvals/{call_id}"

        async def post(user: str, body: object, path: str = url) -> httpx.Response:
            headers = {"Authorization": f"Bearer {mint(user)}"}
            return await http.post(path, json=body, headers=headers)

        async with httpx.AsyncClient(base_url=parley.url, timeout=10) as http:
            assert (await post(new_user(), {"decision": "approve"})).status_code == 404
            unknown = await post(owner, {"decision": "approve"}, url + "x")
            assert unknown.status_code == 404 and call_id + "x" in unknown.text
            assert (await post(owner, {"decision": "maybe"})).status_code == 400
            denied = await post(owner, {"decision": "deny", "reason": "no"})
            assert denied.status_code == 200
            assert denied.json() == {
                "call_id": call_id, "state": "denied", "first": True, "by": owner, "reason": "no"
            }  # fmt: skip
            again = await post(owner, {"decision": "approve"})
            assert (again.json()["first"], again.json()["state"]) == (False, "denied")
        resolved = await tab.wait_for(lambda fr: isinstance(fr, f.ApprovalResolved))
        assert (resolved.state, resolved.reason) == ("denied", "no")
    finally:
        await tab.close()
