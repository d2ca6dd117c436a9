"""The model calls tools, end to end: two web processes and two workers, the simulated model,
a real HTTP tool receiver and a real MCP server (streamable HTTP) on 127.0.0.1. Every tab's
parts equal the persisted parts byte for byte; bad calls and hostile tools end in results the
model reads; `cancel` stops a step; the step limit ends a model that never stops."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
import redis.asyncio

from protocol import frames as f
from server.dev import embedded
from server.dev.client import Client, ProtocolError
from tests.helpers.auth import mint
from tests.helpers.conversations import folded, start_conversation, wait_persisted
from tests.helpers.mcp_process import McpProcess
from tests.helpers.processes import (
    Cluster,
    Db,
    ParleyProcess,
    model_stats,
    redis_db,
    start_all,
    stop_together,
    worker_of,
)
from tests.helpers.receiver import SECRET, Receiver

pytestmark = pytest.mark.e2e

MAX_STEPS = 3
HUGE = 5 * 1024 * 1024
SLOW = 1.5
"""Seconds the `slow` tool takes."""
CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


@dataclass
class Tools:
    webs: list[ParleyProcess]
    workers: list[ParleyProcess]
    model: ParleyProcess
    receiver: Receiver
    mcp: McpProcess


def http_tools(receiver: Receiver) -> list[dict[str, Any]]:
    return [
        {"name": "weather", "description": "The weather in a city", "parameters": CITY,
         "url": receiver.url("/weather")},
        {"name": "slow", "url": receiver.url("/slow")},
        {"name": "stuck", "url": receiver.url("/stuck"), "timeout": 1.0},
        {"name": "huge", "url": receiver.url("/huge")},
        {"name": "garbled", "url": receiver.url("/garbled")},
    ]  # fmt: skip


def answer_weather(path: str, body: dict[str, Any]) -> tuple[int, bytes]:
    return 200, json.dumps({"city": body["arguments"]["city"], "celsius": 3}).encode()


def answer_slowly(path: str, body: dict[str, Any]) -> tuple[int, bytes]:
    time.sleep(SLOW)
    return 200, b'{"slept": true}'


def tool_config(cluster: Cluster, receiver: Receiver, mcp: McpProcess) -> Path:
    """The tools as config.toml has them (their schemas nest deeper than an environment
    variable's JSON may)."""
    http = "".join(
        "[[tools.http]]\n" + "".join(f"{k} = {toml_inline(v)}\n" for k, v in tool.items())
        for tool in http_tools(receiver)
    )
    path = cluster.tmp / "tools.toml"
    path.write_text(
        f'[tools]\nsecret = "{SECRET}"\n\n{http}\n'
        f'[[tools.mcp]]\nname = "calc"\nurl = "{mcp.url}"\nprefix = "mcp_"\n'
    )
    return path


def toml_inline(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_inline(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(toml_inline(v) for v in value) + "]"
    return json.dumps(value)


def tool_env(cluster: Cluster, db: int, config: Path, model: str) -> dict[str, str]:
    return {
        "REDIS_URL": redis_db(cluster.services.redis_url, db),
        "OPENAI_BASE_URL": f"{model}/v1",
        "OPENAI_API_KEY": "sim",
        "PARLEY_CONFIG": str(config),
        "PARLEY_LLM_MAX_STEPS": str(MAX_STEPS),
        "PARLEY_WORKER_LEASE_SECONDS": "2",
    }


@pytest.fixture(scope="module")
def tools(cluster: Cluster) -> Iterator[Tools]:
    receiver = Receiver(embedded.free_port(), hang=4.0)
    receiver.start()
    mcp = McpProcess().start()
    model = cluster.model()
    env = tool_env(cluster, Db.TOOLS, tool_config(cluster, receiver, mcp), model.url)
    webs = [cluster.process("web", start=False, **env) for _ in range(2)]
    workers = [cluster.process("worker", start=False, **env) for _ in range(2)]
    start_all([model, *webs, *workers], timeout=240)
    try:
        yield Tools(webs, workers, model, receiver, mcp)
    finally:
        stop_together([*webs, *workers, model])
        mcp.stop()
        receiver.stop()


@pytest.fixture
def receiver(tools: Tools) -> Receiver:
    tools.receiver.reset()
    tools.receiver.answers.update(
        {
            "/weather": answer_weather,
            "/slow": answer_slowly,
            "/stuck": lambda p, b: None,
            "/huge": lambda p, b: (200, json.dumps("x" * HUGE).encode()),
            "/garbled": lambda p, b: (200, b"{not json"),
        }
    )
    return tools.receiver


async def two_tabs(
    connect: Any, user: str, procs: Tools, **create: Any
) -> tuple[Client, Client, uuid.UUID]:
    """Tab a on the first web process (it creates the conversation), tab b on the second."""
    a: Client = await connect(user, server=procs.webs[0])
    conversation = await start_conversation(a, **create)
    b: Client = await connect(user, server=procs.webs[1])
    await b.request(f.Join(conversation=conversation))
    return a, b, conversation


async def turn(
    a: Client, b: Client, conversation: uuid.UUID, text: str, timeout: float = 30
) -> f.Done:
    start = len(a.frames)
    await a.request(f.Say(conversation=conversation, text=text))
    done = await a.wait_for(lambda fr: isinstance(fr, f.Done), start=start, timeout=timeout)
    await b.wait_for(lambda fr: isinstance(fr, f.Done) and fr.message_id == done.message_id)
    return done


async def persisted_reply(
    db: asyncpg.Pool, connect: Any, user: str, tools: Tools, conversation: uuid.UUID, count: int
) -> f.Message:
    """The reply as a fresh tab's `joined.history` has it, once PostgreSQL holds the turn."""
    await wait_persisted(db, conversation, count)
    reader: Client = await connect(user, server=tools.webs[1])
    joined = await reader.request(f.Join(conversation=conversation))
    assert joined.history is not None
    return joined.history[-1]


def assert_tabs_match(reply: f.Message, *tabs: Client) -> None:
    stored = msgspec.json.encode(reply.parts)
    for tab in tabs:
        assert msgspec.json.encode(folded(tab, reply.id)) == stored


def shape(reply: f.Message) -> list[tuple[str, str | None, str | None]]:
    return [(p.kind, p.name, p.status) for p in reply.parts or []]


async def test_parallel_calls_stream_to_every_tab_run_and_persist_byte_for_byte(
    connect: Any, user: str, db: asyncpg.Pool, tools: Tools, receiver: Receiver
) -> None:
    a, b, conversation = await two_tabs(connect, user, tools)
    text = '[sim:tool=weather {"city": "Oslo"}][sim:tool=mcp_add {"a": 2, "b": 3}]'
    done = await turn(a, b, conversation, text)
    assert done.reason == "stop"
    reply = await persisted_reply(db, connect, user, tools, conversation, 2)
    assert shape(reply) == [
        ("tool_call", "weather", None),
        ("tool_call", "mcp_add", None),
        ("tool_result", "weather", "ok"),
        ("tool_result", "mcp_add", "ok"),
        ("text", None, None),
    ]
    parts = reply.parts or []
    assert json.loads(parts[0].text) == {"city": "Oslo"}
    assert parts[0].call_id == parts[2].call_id and parts[1].call_id == parts[3].call_id
    assert json.loads(parts[2].text) == {"city": "Oslo", "celsius": 3}
    assert parts[3].text == "5"
    assert "weather answered" in reply.content and "mcp_add answered: 5" in reply.content
    assert [body["arguments"] for body in receiver.of("/weather")] == [{"city": "Oslo"}]
    assert receiver.bad_signatures == 0
    assert_tabs_match(reply, a, b)
    # the arguments streamed in pieces, the two calls interleaved, to both tabs
    deltas = [fr.index for fr in b.frames if isinstance(fr, f.PartDelta)]
    assert len(deltas) > 4 and deltas != sorted(deltas)
    # a client of version 1 reads the answer in `token` events alone
    tokens = "".join(fr.text for fr in a.frames if isinstance(fr, f.Token))
    assert tokens == reply.content
    # the next turn's prompt holds the calls and their results
    await turn(a, b, conversation, "thanks [sim:tokens=3]")
    asked = (await model_stats(tools.model))["recent_messages"]
    ours = [m for m in asked if m[-1]["content"] == "thanks [sim:tokens=3]"]
    assert ours, f"not among the model's last {len(asked)} requests"
    assert {"role": "tool", "content": parts[2].text} in ours[-1]
    assert {"role": "tool", "content": "5"} in ours[-1]


async def test_invalid_arguments_and_an_unknown_tool_are_results_the_model_reads(
    connect: Any, user: str, db: asyncpg.Pool, tools: Tools, receiver: Receiver
) -> None:
    a, b, conversation = await two_tabs(connect, user, tools)
    done = await turn(a, b, conversation, '[sim:tool=weather {"town": 1}][sim:tool=nosuch {}]')
    assert done.reason == "stop"
    reply = await persisted_reply(db, connect, user, tools, conversation, 2)
    assert shape(reply)[2:4] == [
        ("tool_result", "weather", "error"),
        ("tool_result", "nosuch", "error"),
    ]
    invalid, unknown = (reply.parts or [])[2:4]
    assert "schema" in invalid.text and "city" in invalid.text
    assert "there is no tool 'nosuch'" in unknown.text
    assert receiver.of("/weather") == []
    assert "nosuch answered: there is no tool" in reply.content
    assert_tabs_match(reply, a, b)


async def test_a_hanging_tool_times_out_a_5_mb_or_garbled_result_is_refused(
    connect: Any, user: str, db: asyncpg.Pool, tools: Tools, receiver: Receiver
) -> None:
    a, b, conversation = await two_tabs(connect, user, tools)
    began = time.monotonic()
    done = await turn(
        a,
        b,
        conversation,
        '[sim:tool=stuck {}][sim:tool=huge {}][sim:tool=mcp_big {"size": 5242880}]'
        "[sim:tool=garbled {}]",
    )
    assert done.reason == "stop"
    assert time.monotonic() - began < receiver.hang  # the turn did not wait for the stuck tool
    reply = await persisted_reply(db, connect, user, tools, conversation, 2)
    stuck, huge, big, garbled = (reply.parts or [])[4:8]
    assert [p.status for p in (stuck, huge, big, garbled)] == ["timeout", "error", "error", "error"]
    assert "did not answer within 1 s" in stuck.text
    assert "larger than" in huge.text and "byte limit" in big.text
    assert "not valid JSON" in garbled.text
    assert len(msgspec.json.encode(reply)) < 64 * 1024
    assert_tabs_match(reply, a, b)


async def test_the_step_limit_ends_a_model_that_never_stops_calling_tools(
    connect: Any, user: str, db: asyncpg.Pool, tools: Tools, receiver: Receiver
) -> None:
    a, b, conversation = await two_tabs(connect, user, tools)
    done = await turn(a, b, conversation, '[sim:tool=weather {"city": "Rome"}][sim:tool_repeat]')
    assert done.reason == "tool_calls"
    assert done.error is not None and f"step limit of {MAX_STEPS}" in done.error
    reply = await persisted_reply(db, connect, user, tools, conversation, 2)
    assert reply.reason == "tool_calls"
    kinds = [p.kind for p in reply.parts or []]
    assert kinds == ["tool_call", "tool_result"] * MAX_STEPS
    assert len(receiver.of("/weather")) == MAX_STEPS - 1  # the last call did not run
    assert "step limit" in (reply.parts or [])[-1].text
    assert_tabs_match(reply, a, b)


async def test_cancel_from_another_tab_during_a_slow_call_abandons_it(
    connect: Any, user: str, db: asyncpg.Pool, tools: Tools, receiver: Receiver
) -> None:
    a, b, conversation = await two_tabs(connect, user, tools)
    start = len(a.frames)
    text = '[sim:tool=mcp_hang {"seconds": 20}][sim:tool=weather {"city": "Bergen"}]'
    await a.request(f.Say(conversation=conversation, text=text))
    for _ in range(400):  # the step runs both calls: the weather answers at once
        if receiver.of("/weather"):
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    asked = time.monotonic()
    await b.request(f.Cancel(conversation=conversation))
    done = await a.wait_for(lambda fr: isinstance(fr, f.Done), start=start, timeout=10)
    assert time.monotonic() - asked < 3.0
    assert done.reason == "cancelled"
    reply = await persisted_reply(db, connect, user, tools, conversation, 2)
    assert reply.status == "cancelled"
    hang, weather = (reply.parts or [])[2:4]
    assert (hang.name, hang.status) == ("mcp_hang", "cancelled")
    assert weather.status == "ok"  # it had finished: its result stays
    assert_tabs_match(reply, a, b)


async def test_a_conversation_offers_only_the_tools_it_chose(
    connect: Any, user: str, db: asyncpg.Pool, tools: Tools, receiver: Receiver
) -> None:
    a: Client = await connect(user, server=tools.webs[0])
    with pytest.raises(ProtocolError) as refused:
        await a.request(f.Create(tools=["weather", "nope"]))
    assert refused.value.error.code == "invalid"
    assert "'nope'" in refused.value.error.message and "weather" in refused.value.error.message
    a, b, conversation = await two_tabs(connect, user, tools, tools=["weather"])
    done = await turn(a, b, conversation, '[sim:tool=mcp_add {"a": 1, "b": 1}]')
    assert done.reason == "stop"
    reply = await persisted_reply(db, connect, user, tools, conversation, 2)
    assert "there is no tool 'mcp_add' (tools: weather)" in (reply.parts or [])[1].text
    headers = {"Authorization": f"Bearer {mint(user)}"}
    async with httpx.AsyncClient(base_url=tools.webs[1].url, headers=headers) as http:
        wrong = await http.patch(f"/api/conversations/{conversation}", json={"tools": ["x"]})
        assert wrong.status_code == 400 and "x" in wrong.text
        created = await http.post("/api/conversations", json={"tools": []})
        assert created.status_code == 201 and created.json()["tools"] == []
    with pytest.raises(ProtocolError):
        await b.request(f.Update(conversation=conversation, tools=["mcp_add", "x"]))
    start = len(a.frames)
    await b.request(f.Update(conversation=conversation, tools=["weather", "mcp_add"]))
    updated = await a.wait_for(lambda fr: isinstance(fr, f.Updated), start=start)
    assert updated.meta.tools == ["weather", "mcp_add"]
    await a.request(f.Say(conversation=conversation, text='[sim:tool=mcp_add {"a": 1, "b": 1}]'))
    done = await a.wait_for(lambda fr: isinstance(fr, f.Done), start=start, timeout=30)
    reply = await persisted_reply(db, connect, user, tools, conversation, 4)
    assert (reply.parts or [])[1].status == "ok" and (reply.parts or [])[1].text == "2"


async def test_a_worker_taking_a_turn_over_resumes_after_its_completed_steps(
    cluster: Cluster, connect: Any, user: str, db: asyncpg.Pool, tools: Tools, receiver: Receiver
) -> None:
    """SIGKILL the worker while the second step's call runs: the other worker resumes at that
    step's calls (neither the first step's call nor the second model call is made again) and
    every tab ends with the persisted reply."""
    config = cluster.tmp / "tools.toml"
    env = tool_env(cluster, Db.TOOLS_TAKEOVER, config, tools.model.url)
    web = cluster.process("web", start=False, **env)
    workers = [cluster.process("worker", start=False, **env) for _ in range(2)]
    start_all([web, *workers], timeout=240)
    store = redis.asyncio.Redis.from_url(env["REDIS_URL"])
    try:
        a: Client = await connect(user, server=web)
        conversation = await start_conversation(a)
        asked = (await model_stats(tools.model))["started"]
        await a.request(
            f.Say(conversation=conversation, text="[sim:tool=slow {}][sim:tool_repeat]")
        )
        for _ in range(400):
            if len(receiver.of("/slow")) == 2:
                break
            await asyncio.sleep(0.02)
        pid = await worker_of(store, conversation)
        victim = next(w for w in workers if w.pid == pid)
        await asyncio.to_thread(victim.kill)
        done = await a.wait_for(lambda fr: isinstance(fr, f.Done), timeout=40)
        assert done.reason == "tool_calls"
        assert len(receiver.of("/slow")) == MAX_STEPS  # 1, 2 (its worker killed), 2 again
        assert (await model_stats(tools.model))["started"] - asked == MAX_STEPS
        starts = [fr for fr in a.frames if isinstance(fr, f.Start)]
        assert len(starts) == 2 and starts[0].message_id == starts[1].message_id
        await wait_persisted(db, conversation, 2)
        reader: Client = await connect(user, server=web)
        joined = await reader.request(f.Join(conversation=conversation))
        assert joined.history is not None
        reply = joined.history[-1]
        assert [p.kind for p in reply.parts or []] == ["tool_call", "tool_result"] * MAX_STEPS
        assert [p.status for p in reply.parts or []][1::2] == ["ok", "ok", "error"]
        assert_tabs_match(reply, a)
    finally:
        await store.aclose()
        stop_together([web, *workers])
