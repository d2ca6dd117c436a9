"""MCP servers' tools through the SDK's client, against real MCP server processes: streamable
HTTP on 127.0.0.1 and stdio."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from protocol.toolcalls import ToolCall
from server.app.config import McpServerSettings, ToolsSettings
from server.tools.definitions import CallContext
from server.tools.mcp import render
from server.tools.runner import Runner
from server.tools.toolbox import Toolbox
from tests.helpers.mcp_process import STDIO_COMMAND, McpProcess

ALICE = CallContext(user="alice", conversation="c1")


def call(name: str, arguments: str, id: str = "c1") -> ToolCall:
    return ToolCall(0, id, name, arguments)


def toolbox_for(
    url: str = "", command: list[str] | None = None, timeout: float = 5.0, **extra: object
) -> Toolbox:
    server = McpServerSettings(
        name="test", url=url, command=command or [], headers={"x-user": "{user}"}, **extra
    )
    return Toolbox(ToolsSettings(mcp=[server], call_timeout=timeout, max_result_bytes=100_000))


@pytest.fixture
def mcp_server() -> Iterator[McpProcess]:
    process = McpProcess().start()
    yield process
    process.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def http_box(mcp_server: McpProcess) -> AsyncIterator[Toolbox]:
    box = toolbox_for(mcp_server.url, prefix="t_", approvals={"echo": "always"})
    await box.start()
    yield box
    await box.close()


def test_header_templates_fill_user_and_conversation() -> None:
    templates = {"x-user": "{user}", "x-c": "c={conversation}", "x-other": "{kept} {"}
    assert render({"a": "{user}/{conversation}"}, ALICE) == {"a": "alice/c1"}
    assert render({"x-kept": "{kept}"}, ALICE) == {"x-kept": "{kept}"}
    with pytest.raises(ValueError):
        render(templates, ALICE)


async def test_tools_are_listed_with_prefix_schema_and_approval(http_box: Toolbox) -> None:
    tools = {tool.name: tool for tool in http_box.definitions()}
    assert {"t_echo", "t_add", "t_hang", "t_big", "t_die", "t_grow"} <= set(tools)
    assert tools["t_add"].parameters["required"] == ["a", "b"]
    assert tools["t_add"].remote_name == "add"
    assert (tools["t_echo"].approval, tools["t_add"].approval) == ("always", "never")
    assert tools["t_add"].openai()["function"]["name"] == "t_add"


async def test_calls_run_in_parallel_with_per_user_headers(http_box: Toolbox) -> None:
    runner = Runner(http_box, max_result_bytes=100_000, max_parallel=8)
    calls = [
        call("t_add", '{"a": 2, "b": 3}', "a"),
        call("t_echo", '{"text": "hi"}', "b"),
        call("t_whoami", "{}", "c"),
        call("t_hang", '{"seconds": 1}', "d"),
        call("t_hang", '{"seconds": 1}', "e"),
    ]
    await runner.run([call("t_whoami", "{}")], ALICE)  # alice's session is open
    started = time.monotonic()
    results = await runner.run(calls, ALICE)
    assert time.monotonic() - started < 1.9  # the two one-second calls overlapped
    assert [(r.call_id, r.status, r.content) for r in results] == [
        ("a", "ok", "5"),
        ("b", "ok", "hi"),
        ("c", "ok", "alice"),
        ("d", "ok", "woke"),
        ("e", "ok", "woke"),
    ]
    [bob] = await runner.run([call("t_whoami", "{}")], CallContext("bob", "c2"))
    assert bob.content == "bob"


async def test_a_result_is_made_storable(http_box: Toolbox) -> None:
    runner = Runner(http_box, max_result_bytes=100_000, max_parallel=8)
    [result] = await runner.run([call("t_echo", '{"text": "nul \\u0000 here"}')], ALICE)
    assert (result.status, result.content) == ("ok", "nul \ufffd here")


async def test_invalid_arguments_and_an_unknown_tool_are_error_results(http_box: Toolbox) -> None:
    runner = Runner(http_box, max_result_bytes=100_000, max_parallel=8)
    results = await runner.run(
        [
            call("t_add", '{"a": 2}', "missing"),
            call("t_add", '{"a": "two", "b": 1}', "wrong"),
            call("t_add", '{"a": 2, "b"', "broken"),
            call("t_add", "[1, 2]", "array"),
            call("nope", "{}", "unknown"),
        ],
        ALICE,
    )
    assert all(r.status == "error" for r in results), results
    missing, wrong, broken, array, unknown = (r.content for r in results)
    assert "'b' is a required property" in missing
    assert "a: 'two' is not of type 'integer'" in wrong
    assert "not valid JSON" in broken and "JSON object" in array
    assert "there is no tool 'nope'" in unknown and "t_add" in unknown


async def test_a_hanging_tool_times_out_and_a_huge_result_is_refused(http_box: Toolbox) -> None:
    runner = Runner(http_box, max_result_bytes=100_000, max_parallel=8)
    http_box.servers[0].tools["t_hang"] = _with_timeout(http_box, "t_hang", 0.3)
    started = time.monotonic()
    hung, huge, over = await runner.run(
        [
            call("t_hang", '{"seconds": 30}', "h"),
            call("t_big", '{"size": 5000000}', "b"),
            call("t_big", '{"size": 100001}', "o"),
        ],
        ALICE,
    )
    assert time.monotonic() - started < 5
    assert hung.status == "timeout" and "0.3 s" in hung.content
    # 5 MB never arrives whole: the SDK stops reading the event past its bound
    assert huge.status == "error" and "exceeded the 465536 byte limit" in huge.content
    assert over.status == "error" and "larger than 100000 bytes" in over.content


async def test_cancel_abandons_a_running_mcp_call(http_box: Toolbox) -> None:
    runner = Runner(http_box, max_result_bytes=100_000, max_parallel=8)
    batch = runner.start([call("t_hang", '{"seconds": 30}')], ALICE)
    await asyncio.sleep(0.5)
    started = time.monotonic()
    [result] = await batch.cancel()
    assert result.status == "cancelled" and time.monotonic() - started < 0.5
    [after] = await runner.run([call("t_add", '{"a": 1, "b": 1}')], ALICE)
    assert (after.status, after.content) == ("ok", "2")  # the session is still good


async def test_a_name_taken_by_another_tool_is_skipped_once(
    mcp_server: McpProcess, caplog: pytest.LogCaptureFixture
) -> None:
    twice = [
        McpServerSettings(name="first", url=mcp_server.url),
        McpServerSettings(name="second", url=mcp_server.url),
    ]
    box = Toolbox(ToolsSettings(mcp=twice))
    await box.start()
    try:
        for _ in range(3):
            echo = box.lookup("echo")
            assert echo is not None and echo.source == "first"
        warnings = [r for r in caplog.records if "skipped: the name is taken" in r.message]
        assert len({r.message for r in warnings}) == len(warnings) > 0
    finally:
        await box.close()


async def test_the_list_is_read_again_when_the_server_says_it_changed(http_box: Toolbox) -> None:
    assert http_box.lookup("t_extra") is None
    runner = Runner(http_box, max_result_bytes=100_000, max_parallel=8)
    [grown] = await runner.run([call("t_grow", "{}")], ALICE)
    assert grown.content == "grown"
    deadline = time.monotonic() + 10
    while http_box.lookup("t_extra") is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    [extra] = await runner.run([call("t_extra", "{}")], ALICE)
    assert (extra.status, extra.content) == ("ok", "extra")


async def test_a_server_killed_mid_call_gives_an_error_then_a_restart_is_used(
    mcp_server: McpProcess,
) -> None:
    box = toolbox_for(mcp_server.url)
    await box.start()
    try:
        runner = Runner(box, max_result_bytes=100_000, max_parallel=8)
        batch = runner.start([call("hang", '{"seconds": 30}')], ALICE)
        await asyncio.sleep(0.5)
        started = time.monotonic()
        mcp_server.kill()
        [result] = await batch.results()
        assert result.status == "error" and "MCP" in result.content, result
        assert time.monotonic() - started < 4  # at once, not at the call's 5 s timeout
        mcp_server.start()
        await box.refresh()
        [again] = await runner.run([call("echo", '{"text": "back"}')], ALICE)
        assert (again.status, again.content) == ("ok", "back")
    finally:
        await box.close()


async def test_stdio_server_tools_and_its_death_mid_call() -> None:
    box = toolbox_for(command=STDIO_COMMAND, timeout=30.0)  # a new process imports the SDK
    await box.start()
    try:
        runner = Runner(box, max_result_bytes=100_000, max_parallel=8)
        [added] = await runner.run([call("add", '{"a": 1, "b": 2}', "a")], ALICE)
        assert (added.status, added.content) == ("ok", "3")
        started = time.monotonic()
        [died] = await runner.run([call("die", "{}", "d")], ALICE)
        assert died.status == "error" and "Connection closed" in died.content, died
        assert time.monotonic() - started < 5
        [again] = await runner.run([call("echo", '{"text": "new process"}')], ALICE)
        assert (again.status, again.content) == ("ok", "new process")
    finally:
        await box.close()


async def test_an_unreachable_server_offers_no_tools_and_start_does_not_fail() -> None:
    box = toolbox_for("http://127.0.0.1:9/mcp")
    started = time.monotonic()
    await box.start()
    assert box.definitions() == [] and time.monotonic() - started < 12
    await box.close()


def _with_timeout(box: Toolbox, name: str, timeout: float) -> object:
    from dataclasses import replace

    tool = box.lookup(name)
    assert tool is not None
    return replace(tool, timeout=timeout)
