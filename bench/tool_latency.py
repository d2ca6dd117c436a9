"""What the tools layer adds to one tool call: `Runner.run` of a single call (parse, schema
check, signed POST or MCP request, result checks) against a local tool that answers at once,
minus the tool's own time as the tool measured it; beside it, a bare signed POST to the same
receiver (what any HTTP call costs) and an MCP tool over streamable HTTP (the SDK's client
against its own server, a process on 127.0.0.1).

    .venv/bin/python bench/tool_latency.py [--calls 200]

With `--step`, what one whole tool step adds through a running `parley serve` (embedded Redis
and PostgreSQL, its simulated model answering at once): a tab asks for a call of the local
tool; from the moment the tab sees the model's call end (its `part_end`) to the moment it
sees the first token of the model's answer to the result, minus the tool's own time. That is
the worker ending the model's stream, the runner's call, publishing the result, the second
model request up to its first token, and the fan-out of both to the tab.

    .venv/bin/python bench/tool_latency.py --step [--calls 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocol import frames as f
from protocol.toolcalls import ToolCall
from server.app.config import HooksSettings, HttpToolSettings, McpServerSettings, ToolsSettings
from server.app.hooks import Hooks
from server.dev import embedded
from server.dev.client import Client
from server.tools.definitions import CallContext
from server.tools.runner import Runner
from server.tools.toolbox import Toolbox
from tests.helpers.auth import SECRET as JWT_SECRET
from tests.helpers.auth import mint
from tests.helpers.mcp_process import McpProcess
from tests.helpers.processes import ParleyProcess

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"],
}
CONTEXT = CallContext(user="alice", conversation="c1", message_id="m1")
OWN: list[float] = []
"""The tool's own time per call (ms), from reading the request to writing the reply."""


class Tool(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = 65536
    disable_nagle_algorithm = True

    def do_POST(self) -> None:
        started = time.perf_counter()
        self.rfile.read(int(self.headers["content-length"]))
        self.send_response(200)
        self.send_header("content-length", "27")
        self.end_headers()
        self.wfile.write(b'{"sky":"clear","temp":21.5}')
        self.wfile.flush()
        OWN.append((time.perf_counter() - started) * 1000)

    def log_message(self, *args: Any) -> None:
        pass


CPU: dict[str, float] = {}
"""Per measured series, the event loop thread's CPU time per call (ms): the client side only
(the receiver runs in other threads), much less distorted by other load than wall time."""


async def runner_calls(runner: Runner, name: str, arguments: str, calls: int) -> list[float]:
    times: list[float] = []
    cpu = time.thread_time()
    for i in range(calls):
        started = time.perf_counter()
        [result] = await runner.run([ToolCall(0, f"call_{i}", name, arguments)], CONTEXT)
        times.append((time.perf_counter() - started) * 1000)
        assert result.ok, result
    CPU[name] = (time.thread_time() - cpu) * 1000 / calls
    return times


async def bare_posts(url: str, calls: int) -> list[float]:
    poster = Hooks(HooksSettings(secret=SECRET))
    times: list[float] = []
    try:
        await poster.post(url, {"city": "Oslo"}, "warm", 5.0)
        cpu = time.thread_time()
        for i in range(calls):
            started = time.perf_counter()
            await poster.post(url, {"city": "Oslo", "days": 2}, f"call_{i}", 5.0)
            times.append((time.perf_counter() - started) * 1000)
        CPU["bare"] = (time.thread_time() - cpu) * 1000 / calls
    finally:
        await poster.close()
    return times


async def http_tool(url: str, calls: int) -> tuple[list[float], list[float]]:
    tool = HttpToolSettings(name="weather", url=url, parameters=SCHEMA)
    box = Toolbox(ToolsSettings(http=[tool], secret=SECRET))
    runner = Runner(box, max_result_bytes=65_536, max_parallel=8)
    try:
        await runner_calls(runner, "weather", '{"city": "Oslo", "days": 2}', 20)  # warm up
        OWN.clear()
        totals = await runner_calls(runner, "weather", '{"city": "Oslo", "days": 2}', calls)
    finally:
        await box.close()
    return totals, list(OWN)


async def mcp_tool(url: str, calls: int) -> list[float]:
    box = Toolbox(ToolsSettings(mcp=[McpServerSettings(name="bench", url=url)]))
    await box.start()
    runner = Runner(box, max_result_bytes=65_536, max_parallel=8)
    try:
        await runner_calls(runner, "add", '{"a": 1, "b": 2}', 20)  # warm up
        return await runner_calls(runner, "add", '{"a": 1, "b": 2}', calls)
    finally:
        await box.close()


def percentiles(times: list[float]) -> tuple[float, float]:
    ordered = sorted(times)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def report(name: str, times: list[float]) -> None:
    p50, p99 = percentiles(times)
    print(f"{name:44} p50 {p50:7.3f} ms   p99 {p99:7.3f} ms")


STEP_TEXT = '[sim:tool=weather {"city": "Oslo", "days": 2}][sim:delay=0][sim:tokens=2]'


def serve_with_the_tool(url: str, data: Path) -> ParleyProcess:
    """`parley serve` (embedded services under `data`) offering the local tool."""
    config = data / "config.toml"
    config.write_text(
        f'[tools]\nsecret = "{SECRET}"\n\n[[tools.http]]\nname = "weather"\n'
        f'url = "{url}"\nparameters = {{ type = "object" }}\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_")}
    env.pop("REDIS_URL", None)
    env.pop("DATABASE_URL", None)
    env.update(
        PARLEY_CONFIG=str(config),
        PARLEY_DATA_DIR=str(data),
        PARLEY_JWT_SECRET=JWT_SECRET,
        PARLEY_SIMULATOR_TOKENS_PER_SECOND="1000",
        PARLEY_LIMITS_TURNS_PER_MINUTE="100000",
    )
    proc = ParleyProcess("serve", env, embedded.free_port(), data / "serve.log")
    proc.start(wait=False)
    proc.wait_ready(120)
    return proc


async def tool_steps(ws_url: str, calls: int) -> list[float]:
    """Per turn, the tab's time from the call's end to the answer's first token (ms)."""
    client = await Client.connect(ws_url, mint("bench"))
    times: list[float] = []
    try:
        for i in range(calls + 10):  # the first 10 warm up
            created = await client.request(f.Create())
            conversation = created.conversation
            await client.request(f.Join(conversation=conversation))
            start = len(client.frames)
            await client.request(f.Say(conversation=conversation, text=STEP_TEXT))
            done = await client.wait_for(lambda fr: isinstance(fr, f.Done), start=start)
            assert done.reason == "stop", done
            await client.request(f.Leave(conversation=conversation))
            frames = client.frames[start:]
            arrived = client.arrived[start:]
            end = next(i for i, fr in enumerate(frames) if isinstance(fr, f.PartEnd))
            token = next(i for i, fr in enumerate(frames) if isinstance(fr, f.Token))
            if i >= 10:
                times.append((arrived[token] - arrived[end]) * 1000)
    finally:
        await client.close()
    return times


def step(url: str, calls: int) -> None:
    with tempfile.TemporaryDirectory(prefix="parley-step-") as tmp:
        proc = serve_with_the_tool(url, Path(tmp))
        try:
            totals = asyncio.run(tool_steps(proc.ws_url, calls))
        finally:
            proc.stop()
    own = OWN[-len(totals) :]
    report("tool step: call end -> answer's first token", totals)
    report("tool step: the tool's own time", own)
    added = [total - mine for total, mine in zip(totals, own, strict=True)]
    report("tool step: added by Parley (step - own)", added)
    print(f"load average: {Path('/proc/loadavg').read_text().split()[:3]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--step", action="store_true", help="a whole tool step through Parley")
    args = parser.parse_args()
    receiver = ThreadingHTTPServer(("127.0.0.1", embedded.free_port()), Tool)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{receiver.server_address[1]}/weather"
    if args.step:
        try:
            step(url, args.calls)
        finally:
            receiver.shutdown()
        return
    mcp = McpProcess().start()
    try:
        report("bare signed POST (hooks' client)", asyncio.run(bare_posts(url, args.calls)))
        totals, own = asyncio.run(http_tool(url, args.calls))
        report("HTTP tool: Runner.run, one call", totals)
        report("HTTP tool: the tool's own time", own)
        added = [total - mine for total, mine in zip(totals, own, strict=True)]
        report("HTTP tool: added by Parley (run - own)", added)
        report("MCP tool (streamable HTTP): Runner.run", asyncio.run(mcp_tool(mcp.url, args.calls)))
        print(
            f"client CPU per call: bare POST {CPU['bare']:.3f} ms, HTTP tool via Runner "
            f"{CPU['weather']:.3f} ms, MCP tool via Runner {CPU['add']:.3f} ms"
        )
        print(f"load average: {Path('/proc/loadavg').read_text().split()[:3]}")
    finally:
        mcp.stop()
        receiver.shutdown()


if __name__ == "__main__":
    main()
