"""What the persister's `WAIT` costs per persisted batch: `Replication.settled` (the batch's
entries claimed again by their consumer, then `WAIT <replicas> <ms>` on that connection, one
round trip), timed batch after batch, against a primary with one replica (a one-shard Redis
Cluster), reached with the plain client (as a single Redis with a replica) and with the
cluster client, alternately.

    .venv/bin/python -m bench.persist_wait [--batches 2000] [--batch 1] [--passes 2]

Starts its own two nodes (tests/helpers/redis_cluster.py) on 127.0.0.1 and stops them by PID.
Replica and primary share the machine here: across hosts add the network round trip.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from server.app.config import RedisSettings
from server.redis.client import opened
from server.redis.replicas import Replication
from server.redis.streams import ConsumerGroup
from tests.helpers import redis_cluster

STREAM = "bench:persist"


async def timed(url: str, clustered: bool, opts: argparse.Namespace) -> list[float]:
    """Seconds each batch's wait took."""
    redis = await opened(RedisSettings(url=url, cluster=clustered))
    try:
        group = ConsumerGroup(redis, STREAM, "persisters", "bench")
        await group.ensure()
        replication = Replication(redis, 1000)
        times = []
        for _ in range(opts.batches):
            for _ in range(opts.batch):
                await redis.xadd(STREAM, {"turn": b"x" * 2000})
            entry_ids = [entry_id for entry_id, _ in await group.read(opts.batch, 10)]
            started = time.perf_counter()
            if not await replication.settled(group, entry_ids):
                raise RuntimeError("the replica did not acknowledge within 1 s")
            times.append(time.perf_counter() - started)
            await group.ack(*entry_ids)
        return times
    finally:
        await redis.aclose()


def report(clustered: bool, times: list[float]) -> None:
    times.sort()
    p99 = times[int(len(times) * 0.99)]
    client = "cluster client" if clustered else "plain client"
    print(
        f"{client}: {len(times)} batches, p50 {statistics.median(times) * 1e6:.0f} µs, "
        f"p99 {p99 * 1e6:.0f} µs, mean {statistics.mean(times) * 1e6:.0f} µs"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=1, help="finished turns per batch")
    parser.add_argument("--passes", type=int, default=2)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        nodes = redis_cluster.start_one_shard(Path(directory), replicas=1)
        try:
            url = f"redis://{nodes.primaries()[0].address}"
            for _ in range(opts.passes):
                for clustered in (False, True):
                    report(clustered, asyncio.run(timed(url, clustered, opts)))
        finally:
            nodes.stop()


if __name__ == "__main__":
    main()
