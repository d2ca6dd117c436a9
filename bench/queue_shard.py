"""What the fair queue costs the one shard that holds it: Redis CPU per turn on the queue's
slot, hence the turns a second one queue shard can carry.

    .venv/bin/python -m bench.queue_shard [--turns 3000] [--users 40] [--slots 8]
        [--backlog 64] [--rounds 3]

On a Redis Cluster every queued turn's queue steps run on one slot (server/redis/queue.py says
why), so that primary's CPU per turn caps the turns a second of the whole cluster. This
starts a one-primary Redis Cluster of its own (no replica) and drives the queue's own code
(`FairQueue`) the way the web processes and the workers do, with no model and no
conversation (their steps run on the conversations' slots, spread over every primary):
`--users` users enter `--turns` turns in all (`enter`, then `serve` when the turn waits, as
a web process does; at most `--backlog` entered and not yet released), a worker with
`--slots` generation slots reads them from turns shard 0 (`XREADGROUP`), and releases each
(`release`, then `serve` while turns wait). With few slots for many turns most turns wait:
the queue's slow path (enter, a `serve` after it, a `serve` after a release: the read
pipeline, `dispatch`, `announce_told`); with `--slots` above `--turns` none does (its fast
path: `enter` straight onto the stream). A `serve` reads the whole queue (every waiting
user's list and the `told` hash), so the slow path's cost grows with what waits.
Redis's own accounting (`INFO cpu`, `INFO commandstats`) is read before and after each
round; the least disturbed round is kept. A benchmark: it never fails on a number.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from bench.redis_append import _delta, _redis_cpu
from server.app.config import RedisSettings
from server.redis import client, keys
from server.redis.eventlog import encode
from server.redis.queue import FairQueue
from server.redis.turns import Job
from tests.helpers import redis_cluster

GROUP = "bench-workers"
WORKER = "bench-worker"


async def round_of_turns(url: str, opts: argparse.Namespace) -> dict[str, Any]:
    """One round: every turn entered, handed over, read and released; Redis's CPU per
    turn."""
    redis = await client.opened(RedisSettings(url=url, cluster=True))
    node = Redis.from_url(url)
    queue = FairQueue(redis, per_user=0, max_events=1000, ttl=3600)
    try:
        await redis.delete(keys.TURNS, keys.QUEUE_RING, keys.QUEUE_TOLD, keys.SLOTS)
        await redis.xgroup_create(keys.TURNS, GROUP, id="0", mkstream=True)
        async with redis.pipeline(transaction=False) as pipe:
            FairQueue.beat(pipe, WORKER, opts.slots, 600)
            await pipe.execute()
        users = [f"bench-user-{i}" for i in range(opts.users)]
        jobs = [_job(users[i % len(users)]) for i in range(opts.turns)]
        await node.config_resetstat()
        before = await _redis_cpu(node)
        began = time.perf_counter()
        open_turns = asyncio.Semaphore(opts.backlog)
        await asyncio.gather(
            _web(queue, jobs, open_turns), _worker(redis, queue, len(jobs), open_turns)
        )
        elapsed = time.perf_counter() - began
        after = await _redis_cpu(node)
        result = _delta(before, after, len(jobs))
        return {
            "redis_cpu_us_per_turn": result["redis_cpu_us_per_event"],
            "turns_per_redis_core_per_s": result["events_per_redis_core_per_s"],
            "calls_per_turn": {
                name: round(c["calls"] / len(jobs), 2) for name, c in result["commands"].items()
            },
            "turns_per_s_here": round(len(jobs) / elapsed),
        }
    finally:
        await redis.delete(keys.TURNS, keys.QUEUE_RING, keys.QUEUE_TOLD, keys.SLOTS)
        await node.aclose()
        await redis.aclose()


def _job(user: str) -> Job:
    return Job(conversation=uuid.uuid4(), user=user, message_id=uuid.uuid4(), model="bench")


async def _web(queue: FairQueue, jobs: list[Job], open_turns: asyncio.Semaphore) -> None:
    """The web processes' step of each turn: enter it, and serve the queue when it waits
    (at most `--backlog` turns entered and not yet released)."""
    for job in jobs:
        await open_turns.acquire()
        if await queue.enter(encode(job), job.message_id, job.user):
            await queue.serve()


async def _worker(redis: Any, queue: FairQueue, turns: int, open_turns: asyncio.Semaphore) -> None:
    """A worker: read the turns handed over, release each (a generation of no length), and
    serve the queue while turns wait; until every turn was released (bounded in time)."""
    done = 0
    deadline = time.monotonic() + 300
    while done < turns and time.monotonic() < deadline:
        read = await redis.xreadgroup(GROUP, WORKER, {keys.TURNS: ">"}, count=64, block=100)
        for _, entries in read or []:
            for entry_id, fields in entries:
                user = fields[b"user"].decode()
                if await queue.release(keys.TURNS, GROUP, entry_id, user, buried=False):
                    await queue.serve()
                done += 1
                open_turns.release()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=3000)
    parser.add_argument("--users", type=int, default=40)
    parser.add_argument("--slots", type=int, default=8, help="the workers' generation slots")
    parser.add_argument(
        "--backlog",
        type=int,
        default=64,
        help="turns entered and not yet released at most (waiting or running)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds (least disturbed kept)")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="parley-queue-") as tmp:
        nodes = redis_cluster.start_one_shard(Path(tmp), 0)
        try:
            url = f"redis://{nodes.primaries()[0].address}"
            rounds = [asyncio.run(round_of_turns(url, opts)) for _ in range(opts.rounds)]
        finally:
            nodes.stop()
    best = min(rounds, key=lambda r: r["redis_cpu_us_per_turn"])
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(
        f"{opts.turns} turns of {opts.users} users, {opts.slots} slots, at most "
        f"{opts.backlog} open: queue shard "
        f"{best['redis_cpu_us_per_turn']:.1f} µs of Redis CPU per turn "
        f"(rounds: {[r['redis_cpu_us_per_turn'] for r in rounds]}) → "
        f"{best['turns_per_redis_core_per_s']:,} turns/s per queue shard core; "
        f"{best['turns_per_s_here']:,} turns/s here; load {load}"
    )
    print(f"commands per turn: {best['calls_per_turn']}")


if __name__ == "__main__":
    main()
