"""Two numbers for a first look at Parley on this machine:

1. time from `say` to the first `token` frame with the simulated model's first-token delay at
   0 (median and p95 of 100 turns, one after another, one tab);
2. RSS of `parley serve` with 1,000 idle sockets, each joined to a conversation.

    .venv/bin/python -m bench.core_numbers [--turns 100] [--sockets 1000]   # from the repo root

It starts its own embedded Redis and PostgreSQL and its own `parley serve` (127.0.0.1 only),
and stops them when done. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import tempfile
import time
from pathlib import Path

from protocol import frames as f
from server.dev.client import Client
from tests.helpers.auth import mint
from tests.helpers.processes import INSTANT_TURNS, bench_cluster
from tests.helpers.procfs import rss_kib


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


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=100)
    parser.add_argument("--sockets", type=int, default=1000)
    args = parser.parse_args()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with tempfile.TemporaryDirectory() as tmp, bench_cluster(Path(tmp)) as cluster:
        server = cluster.process(
            "serve", **INSTANT_TURNS, PARLEY_LIMITS_MAX_CONNECTIONS_PER_USER="100000"
        )
        asyncio.run(measure(server.ws_url, server.pid, args.turns, args.sockets))


if __name__ == "__main__":
    main()
