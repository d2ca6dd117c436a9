"""The application's HTTP tools and the runner, against a real receiver on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio

from protocol.toolcalls import ToolCall
from server.app.config import ConfigError, HttpToolSettings, ToolsSettings
from server.dev import embedded
from server.tools.definitions import CallContext
from server.tools.runner import Runner
from server.tools.toolbox import Toolbox
from tests.helpers.receiver import SECRET, Receiver

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
    "required": ["city"],
    "additionalProperties": False,
}
ALICE = CallContext(user="alice", conversation="conv-1", message_id="m-1")


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver(embedded.free_port(), hang=3.0)
    r.start()
    yield r
    r.stop()


@pytest.fixture(autouse=True)
def fresh(receiver: Receiver) -> None:
    receiver.reset()


def tool(receiver: Receiver, name: str, **extra: Any) -> HttpToolSettings:
    return HttpToolSettings(name=name, url=receiver.url(f"/{name}"), parameters=WEATHER, **extra)


@pytest_asyncio.fixture(loop_scope="session")
async def box(receiver: Receiver) -> AsyncIterator[Toolbox]:
    tools = [
        tool(receiver, "weather", description="The weather in a city"),
        tool(receiver, "slow", timeout=0.3),
        tool(receiver, "big"),
        tool(receiver, "broken"),
        tool(receiver, "failing"),
    ]
    toolbox = Toolbox(ToolsSettings(http=tools, max_result_bytes=65_536), hooks_secret=SECRET)
    yield toolbox
    await toolbox.close()


def runner(toolbox: Toolbox) -> Runner:
    return Runner(toolbox, max_result_bytes=65_536, max_parallel=8)


def call(name: str, arguments: str, id: str = "call-1") -> ToolCall:
    return ToolCall(0, id, name, arguments)


def answer(payload: bytes, status: int = 200) -> Any:
    return lambda path, body: (status, payload)


async def test_a_call_is_a_signed_post_and_its_json_reply_the_result(
    box: Toolbox, receiver: Receiver
) -> None:
    receiver.answers["/weather"] = answer(b'{"sky": "clear",  "temp": 21}')
    [result] = await runner(box).run([call("weather", '{"city": "Oslo", "days": 2}')], ALICE)
    assert (result.status, result.content) == ("ok", '{"sky":"clear","temp":21}')
    [(path, body, headers)] = receiver.calls
    assert path == "/weather" and receiver.bad_signatures == 0
    assert body == {
        "type": "tool_call",
        "tool": "weather",
        "call_id": "call-1",
        "arguments": {"city": "Oslo", "days": 2},
        "user": "alice",
        "conversation": "conv-1",
        "message_id": "m-1",
    }
    assert headers["webhook-id"] == "call-1"


async def test_the_definition_the_model_is_offered(box: Toolbox) -> None:
    weather = box.lookup("weather")
    assert weather is not None
    assert weather.openai() == {
        "type": "function",
        "function": {
            "name": "weather",
            "parameters": WEATHER,
            "description": "The weather in a city",
        },
    }


async def test_arguments_that_miss_the_schema_never_reach_the_tool(
    box: Toolbox, receiver: Receiver
) -> None:
    results = await runner(box).run(
        [
            call("weather", '{"days": 0, "wind": true}', "a"),
            call("weather", '{"city": ', "b"),
            call("weather", "[" * 100 + "]" * 100, "c"),
            call("weather", "", "d"),
        ],
        ALICE,
    )
    assert [r.status for r in results] == ["error"] * 4
    schema, broken, deep, empty = (r.content for r in results)
    assert "'city' is a required property" in schema
    assert "days: 0 is less than the minimum of 1" in schema
    assert "'wind' was unexpected" in schema
    assert "not valid JSON" in broken and "nest more than 32 levels" in deep
    assert "'city' is a required property" in empty  # no arguments: {}
    assert receiver.calls == []


async def test_hostile_tools_each_give_an_error_result(box: Toolbox, receiver: Receiver) -> None:
    receiver.answers["/slow"] = lambda path, body: None  # hangs 3 s
    receiver.answers["/big"] = answer(b'"' + b"x" * 5_000_000 + b'"')
    receiver.answers["/broken"] = answer(b'{"not": json')
    receiver.answers["/failing"] = answer(b'{"error": "boom"}', status=500)
    started = time.monotonic()
    slow, big, broken, failing = await runner(box).run(
        [
            call("slow", '{"city": "x"}', "s"),
            call("big", '{"city": "x"}', "b"),
            call("broken", '{"city": "x"}', "j"),
            call("failing", '{"city": "x"}', "f"),
        ],
        ALICE,
    )
    assert time.monotonic() - started < 2.5  # the hanging one did not hold the others
    assert slow.status == "timeout" and "within 0.3 s" in slow.content
    assert big.status == "error" and "larger than 65536 bytes" in big.content
    assert broken.status == "error" and "not valid JSON" in broken.content
    assert failing.status == "error" and "HTTP 500" in failing.content


async def test_unknown_tools_and_unreadable_calls_are_error_results(box: Toolbox) -> None:
    unknown, garbled = await runner(box).run(
        [
            call("launch_rockets", "{}", "u"),
            ToolCall(1, "g", "weather", "", problem="the arguments are too long"),
        ],
        ALICE,
    )
    assert unknown.status == "error" and "there is no tool 'launch_rockets'" in unknown.content
    assert "weather" in unknown.content
    assert garbled.status == "error" and "too long" in garbled.content


async def test_cancel_abandons_running_calls_and_keeps_finished_ones(
    box: Toolbox, receiver: Receiver
) -> None:
    receiver.answers["/slow"] = lambda path, body: None
    receiver.answers["/weather"] = answer(b'{"sky": "grey"}')
    batch = runner(box).start(
        [call("weather", '{"city": "x"}', "w"), call("slow", '{"city": "x"}', "s")], ALICE
    )
    deadline = time.monotonic() + 5
    while not batch.tasks[0].done() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    started = time.monotonic()
    done, abandoned = await batch.cancel()
    assert time.monotonic() - started < 0.2
    assert (done.status, done.content) == ("ok", '{"sky":"grey"}')
    assert abandoned.status == "cancelled" and "cancelled" in abandoned.content


async def test_calls_beyond_max_parallel_wait_their_turn(box: Toolbox, receiver: Receiver) -> None:
    def slowly(path: str, body: dict[str, Any]) -> tuple[int, bytes]:
        time.sleep(0.2)
        return 200, json.dumps(body["call_id"]).encode()

    receiver.answers["/weather"] = slowly
    two_at_a_time = Runner(box, max_result_bytes=65_536, max_parallel=2)
    started = time.monotonic()
    results = await two_at_a_time.run(
        [call("weather", '{"city": "x"}', f"c{i}") for i in range(4)], ALICE
    )
    assert [r.content for r in results] == ['"c0"', '"c1"', '"c2"', '"c3"']
    assert time.monotonic() - started >= 0.4


def test_a_tool_schema_that_is_not_json_schema_stops_start_up(receiver: Receiver) -> None:
    bad = HttpToolSettings(name="bad", url=receiver.url("/bad"), parameters={"type": "nonsense"})
    with pytest.raises(ConfigError, match=r"tools\.http bad: parameters"):
        Toolbox(ToolsSettings(http=[bad]))


async def test_the_tools_secret_wins_over_the_hooks_secret(receiver: Receiver) -> None:
    other = "whsec_" + "b3RoZXJzZWNyZXRvdGhlcnNlY3JldA=="
    toolbox = Toolbox(ToolsSettings(http=[tool(receiver, "weather")], secret=other), SECRET)
    try:
        await runner(toolbox).run([call("weather", '{"city": "x"}')], ALICE)
    finally:
        await toolbox.close()
    assert receiver.bad_signatures == 1


async def test_arguments_with_a_lone_surrogate_are_an_error_result(box: Toolbox) -> None:
    [result] = await runner(box).run([call("weather", '{"city": "\ud800"}')], ALICE)
    assert result.status == "error" and "not valid Unicode" in result.content
