"""Two numbers for a first look at Parley on this machine:

1. time from `say` to the first `token` frame with the simulated model's first-token delay at
   0 (median and p95 of 100 turns, one after another, one tab);
2. RSS of `parley serve` with 1,000 idle sockets, each joined to a conversation.

    .venv/bin/python bench/core_numbers.py [--turns 100] [--sockets 1000]

It starts its own embedded Redis and PostgreSQL and its own `parley serve` (127.0.0.1 only),
and stops them when done. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from protocol import frames as f  # noqa: E402
from server import embedded  # noqa: E402
from server.dev.client import Client  # noqa: E402
from tests.conftest import SECRET, mint  # noqa: E402


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def first_token_latencies(url: str, turns: int, fresh: bool) -> list[float]:
    """`fresh`: every turn in a new conversation; else all turns in one conversation, whose
    growing history goes to the model each time."""
    client = await Client.connect(url, mint("bench-ttft"))
    conversation = None
    latencies = []
    for i in range(turns):
        if fresh or conversation is None:
            conversation = (await client.request(f.Create(title="ttft"))).conversation
            await client.request(f.Join(conversation=conversation))
        start = len(client.frames)
        sent = time.perf_counter()
        await client.send(f.Say(conversation=conversation, text=f"turn {i} [sim:tokens=5]"))
        await client.wait_for(lambda fr: isinstance(fr, f.Token), start=start)
        latencies.append((time.perf_counter() - sent) * 1000)
        await client.wait_for(lambda fr: isinstance(fr, f.Done), start=start)
    await client.close()
    return latencies


async def idle_sockets(url: str, count: int) -> list[Client]:
    owner = await Client.connect(url, mint("bench-idle"))
    conversations = [
        (await owner.request(f.Create(title=f"idle {i}"))).conversation for i in range(10)
    ]
    await owner.close()
    gate = asyncio.Semaphore(100)

    async def one(i: int) -> Client:
        async with gate:
            client = await Client.connect(url, mint("bench-idle"))
            await client.request(f.Join(conversation=conversations[i % len(conversations)]))
            return client

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def measure(url: str, pid: int, turns: int, sockets: int) -> None:
    for fresh, where in ((True, "each in a new conversation"), (False, "in one conversation")):
        latencies = sorted(await first_token_latencies(url, turns, fresh))
        print(
            f"say -> first token, {len(latencies)} turns {where}, first-token delay 0: "
            f"median {statistics.median(latencies):.2f} ms, "
            f"p95 {latencies[int(len(latencies) * 0.95) - 1]:.2f} ms, "
            f"min {latencies[0]:.2f} ms"
        )
    before = rss_kib(pid)
    clients = await idle_sockets(url, sockets)
    await asyncio.sleep(2)
    after = rss_kib(pid)
    print(
        f"RSS of parley serve: {before / 1024:.1f} MiB before, {after / 1024:.1f} MiB "
        f"with {len(clients)} idle joined sockets "
        f"({(after - before) / len(clients):.1f} KiB per socket)"
    )
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


def wait_ready(port: int) -> None:
    for _ in range(300):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1)
            return
        except OSError:
            time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=100)
    parser.add_argument("--sockets", type=int, default=1000)
    args = parser.parse_args()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with tempfile.TemporaryDirectory() as tmp:
        redis = embedded.start_redis(Path(tmp), persist=False)
        postgres = embedded.start_postgres(Path(tmp), fast=True)
        port = embedded.free_port()
        env = dict(
            os.environ,
            REDIS_URL=redis.url,
            DATABASE_URL=postgres.url,
            PARLEY_JWT_SECRET=SECRET,
            PARLEY_DATA_DIR=f"{tmp}/data",
            PARLEY_CONFIG="/nonexistent",
            PARLEY_SIMULATOR_FIRST_TOKEN_DELAY="0",
            PARLEY_SIMULATOR_TOKENS_PER_SECOND="0",
            PARLEY_LIMITS_TURNS_PER_MINUTE="100000",
            PARLEY_LIMITS_MAX_CONNECTIONS_PER_USER="100000",
            PARLEY_SERVER_LOG_LEVEL="warning",
        )
        log = Path(tmp) / "serve.log"
        with log.open("w") as out:
            server = subprocess.Popen(
                [sys.executable, "-m", "server.app.cli", "serve", "--port", str(port)],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_ready(port)
            asyncio.run(measure(f"ws://127.0.0.1:{port}/ws", server.pid, args.turns, args.sockets))
        except BaseException:
            print(log.read_text()[-3000:])
            raise
        finally:
            server.terminate()
            server.wait(30)
            redis.stop()
            postgres.stop()


if __name__ == "__main__":
    main()
