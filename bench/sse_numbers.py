"""SSE next to the WebSocket, on two `parley web` processes side by side (one serves the SSE
clients, the other the sockets), one `parley worker` and the simulated model:

1. RSS per idle client: `--idle` SSE streams of a conversation on one web process, as many
   joined sockets on the other;
2. web CPU per delivered event: `--readers` SSE streams and as many sockets on one
   conversation, one reply of `--tokens` tokens; each web process's CPU time over the events
   it delivered.

    .venv/bin/python -m bench.sse_numbers [--idle 500] [--readers 50] [--tokens 2000] [--out F]

(`bench/run.py --only sse` runs it and puts both figures in its table.) With `--out` the
figures are also written to F as JSON.

It starts its own embedded Redis and PostgreSQL and its processes (127.0.0.1 only), and stops
them when done. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from protocol import frames as f
from server.dev.client import Client
from tests.helpers.auth import mint
from tests.helpers.processes import ParleyProcess, bench_cluster, start_all
from tests.helpers.procfs import cpu_seconds, rss_kib

USER = "bench-sse"


class SseReader:
    """A raw SSE client: opens the stream, reads and counts events."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.events = 0

    @classmethod
    async def open(cls, web: ParleyProcess, token: str, conversation: uuid.UUID) -> SseReader:
        reader, writer = await asyncio.open_connection("127.0.0.1", web.port)
        writer.write(
            f"GET /api/conversations/{conversation}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {token}\r\n\r\n".encode()
        )
        got = b""
        while b"event: joined" not in got:
            got += await asyncio.wait_for(reader.read(65_536), 10)
        return cls(reader, writer)

    async def until_done(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        tail = b""
        while time.monotonic() < deadline:
            data = await asyncio.wait_for(self.reader.read(65_536), timeout)
            self.events += data.count(b"\nevent: ")
            if b"event: done" in tail + data:
                return
            tail = data[-16:]
        raise TimeoutError("no done")

    def close(self) -> None:
        self.writer.close()


async def conversation(web: ParleyProcess, token: str) -> uuid.UUID:
    async with httpx.AsyncClient() as http:
        response = await http.post(
            f"{web.url}/api/conversations",
            json={},
            headers={"authorization": f"Bearer {token}"},
        )
        return uuid.UUID(response.json()["id"])


async def idle(sse_web: ParleyProcess, ws_web: ParleyProcess, count: int) -> dict[str, Any]:
    token = mint(USER)
    conv = await conversation(sse_web, token)
    before = rss_kib(sse_web.pid), rss_kib(ws_web.pid)
    gate = asyncio.Semaphore(50)

    async def sse_one() -> SseReader:
        async with gate:
            return await SseReader.open(sse_web, token, conv)

    async def ws_one() -> Client:
        async with gate:
            client = await Client.connect(ws_web.ws_url, token)
            await client.request(f.Join(conversation=conv))
            return client

    streams = await asyncio.gather(*(sse_one() for _ in range(count)))
    sockets = await asyncio.gather(*(ws_one() for _ in range(count)))
    await asyncio.sleep(2)
    after = rss_kib(sse_web.pid), rss_kib(ws_web.pid)
    per = {
        "sse": round((after[0] - before[0]) / count, 1),
        "websocket": round((after[1] - before[1]) / count, 1),
    }
    for name, key in (("SSE stream", "sse"), ("socket", "websocket")):
        print(f"RSS per idle joined {name}: {per[key]} KiB ({count} of them)")
    for stream in streams:
        stream.close()
    await asyncio.gather(*(s.close() for s in sockets), return_exceptions=True)
    return {"clients": count, "rss_kib_per_idle_client": per}


async def fan_out(
    sse_web: ParleyProcess, ws_web: ParleyProcess, readers: int, tokens: int
) -> dict[str, Any]:
    token = mint(USER)
    conv = await conversation(sse_web, token)
    streams = [await SseReader.open(sse_web, token, conv) for _ in range(readers)]
    sockets = [await Client.connect(ws_web.ws_url, token) for _ in range(readers)]
    for client in sockets:
        await client.request(f.Join(conversation=conv))
    cpu_before = cpu_seconds(sse_web.pid), cpu_seconds(ws_web.pid)
    await sockets[0].request(
        f.Say(conversation=conv, text=f"bench [sim:tokens={tokens}][sim:tps={tokens}]")
    )
    await asyncio.gather(*(s.until_done(60) for s in streams))
    for client in sockets:
        await client.wait_for(lambda fr: isinstance(fr, f.Done), timeout=60)
    cpu_after = cpu_seconds(sse_web.pid), cpu_seconds(ws_web.pid)
    sse_events = sum(s.events for s in streams)
    ws_events = sum(len(c.events(conv)) for c in sockets)
    out: dict[str, Any] = {"readers": readers, "tokens": tokens}
    for name, key, cpu, events in (
        ("SSE", "sse", cpu_after[0] - cpu_before[0], sse_events),
        ("WebSocket", "websocket", cpu_after[1] - cpu_before[1], ws_events),
    ):
        out[key] = {
            "events": events,
            "cpu_seconds": round(cpu, 3),
            "cpu_us_per_event": round(cpu / events * 1e6, 2),
        }
        print(
            f"web CPU per delivered {name} event: {cpu / events * 1e6:.1f} µs "
            f"({events} events to {readers} clients, {cpu:.2f} s CPU)"
        )
    for stream in streams:
        stream.close()
    await asyncio.gather(*(c.close() for c in sockets), return_exceptions=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--idle", type=int, default=500)
    parser.add_argument("--readers", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--out", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with tempfile.TemporaryDirectory() as tmp, bench_cluster(Path(tmp)) as cluster:
        model = cluster.model(PARLEY_SIMULATOR_FIRST_TOKEN_DELAY="0")
        env = {
            "OPENAI_BASE_URL": f"{model.url}/v1",
            "OPENAI_API_KEY": "sim",
            "PARLEY_LIMITS_MAX_CONNECTIONS_PER_USER": "100000",
            "PARLEY_LIMITS_TURNS_PER_MINUTE": "100000",
            "PARLEY_LLM_MAX_TOKENS": str(args.tokens + 10),
            # one event per token: the web's cost per event over many events (a worker that
            # coalesces would send a 2,000-token reply as a few hundred larger events)
            "PARLEY_WORKER_COALESCE": "false",
        }
        webs = [cluster.process("web", start=False, **env) for _ in range(2)]
        worker = cluster.process("worker", start=False, **env)
        start_all([model, *webs, worker])
        result = {
            "idle": asyncio.run(idle(webs[0], webs[1], args.idle)),
            "fan_out": asyncio.run(fan_out(webs[0], webs[1], args.readers, args.tokens)),
        }
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
