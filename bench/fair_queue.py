"""One worker's turn throughput with the fair queue off and on: `parley serve` (one worker,
`worker.concurrency` 8, or `--slots`) and a simulated model with no delay; 4 users with 8
conversations each say a turn, wait for its `done` and say the next, for `--turns` turns in
all. Runs with `limits.fair_queue` off, on with no cap per user, and on with the default cap
of 2. With 8 slots for 32 conversations most turns wait (the queue's slow path); with
`--slots 32` and the cap off nobody ever waits (its fast path, decided inside `say`).

    .venv/bin/python bench/fair_queue.py [--turns 800] [--slots 8]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocol import frames as f
from server.dev.client import Client
from tests.helpers.auth import mint, new_user
from tests.helpers.processes import INSTANT_TURNS, bench_cluster, redis_db

USERS, CONVERSATIONS = 4, 8
RUNS = {
    "fair queue off": {"PARLEY_LIMITS_FAIR_QUEUE": "false"},
    "fair queue on, no cap": {"PARLEY_LIMITS_GENERATIONS_PER_USER": "0"},
    "fair queue on, cap 2": {},
}


async def conversation_turns(client: Client, turns: int) -> None:
    created = await client.request(f.Create())
    conversation = created.conversation
    await client.request(f.Join(conversation=conversation))
    for _ in range(turns):
        start = len(client.frames)
        await client.request(f.Say(conversation=conversation, text="[sim:tokens=20] hi"))
        await client.wait_for(
            lambda fr: isinstance(fr, f.Done) and fr.conversation == conversation,
            start=start,
            timeout=60,
        )


async def throughput(url: str, turns: int) -> float:
    """Turns finished per second, every user's conversations going at once."""
    clients = [await Client.connect(url, mint(new_user())) for _ in range(USERS)]
    each = max(turns // (USERS * CONVERSATIONS), 1)
    began = time.perf_counter()
    await asyncio.gather(
        *(conversation_turns(c, each) for c in clients for _ in range(CONVERSATIONS))
    )
    elapsed = time.perf_counter() - began
    for client in clients:
        await client.close()
    return each * USERS * CONVERSATIONS / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=800)
    parser.add_argument("--slots", type=int, default=8, help="worker.concurrency")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, bench_cluster(Path(tmp)) as cluster:
        for db, (name, env) in enumerate(RUNS.items(), start=1):
            url = redis_db(cluster.services.redis_url, db)
            slots = {"PARLEY_WORKER_CONCURRENCY": str(args.slots)}
            server = cluster.process("serve", REDIS_URL=url, **INSTANT_TURNS, **slots, **env)
            asyncio.run(throughput(server.ws_url, 64))  # warm up
            rate = asyncio.run(throughput(server.ws_url, args.turns))
            print(f"{name:24} {rate:7.1f} turns/s", flush=True)
            server.stop()


if __name__ == "__main__":
    main()
