"""What `WAIT 1 <ms>` after each batch of appended tokens would cost on a Redis Cluster: the
round trip of one batch (`append_piece` calls in one pipeline, as the worker's pipeliner sends
them) to the primary that owns the conversation, without and with a `WAIT 1 <timeout>` in the
same pipeline (the batch is then acknowledged only once a replica has it too).

    .venv/bin/python -m bench.wait_cost [--batches 2000] [--batch 1] [--timeout-ms 100]

Starts its own six-node cluster (tests/helpers/redis_cluster.py) on 127.0.0.1 and stops it by
PID. Replica and primary share the machine here: across hosts add the network round trip.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from redis.asyncio import Redis

from bench.cluster_appends import opened, token_call
from server.redis import keys
from tests.helpers import redis_cluster


async def batches(
    url: str, conversation: uuid.UUID, opts: argparse.Namespace, wait: bool
) -> list[float]:
    """Seconds per batch, sent one after the other to the node at `url`."""
    async with Redis.from_url(url) as redis:
        for _ in range(120):  # a new cluster's replicas sync first (diskless, after 5 s)
            if await redis.execute_command("WAIT", 1, 500) >= 1:
                break
        else:
            raise RuntimeError("the owner's replica did not sync")
        script = await opened(redis, [conversation], sharded=True)
        piece, times = 0, []
        for _ in range(opts.batches):
            pipe = redis.pipeline(transaction=False)
            for _ in range(opts.batch):
                piece += 1
                call = token_call(script, conversation, piece)
                await call.run(pipe)
            if wait:
                pipe.execute_command("WAIT", 1, opts.timeout_ms)
            began = time.perf_counter()
            results = await pipe.execute()
            times.append(time.perf_counter() - began)
            if wait and results[-1] < 1:
                raise RuntimeError("no replica acknowledged the batch in time")
        return times


def summary(times: list[float]) -> str:
    ordered = sorted(times)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return f"p50 {statistics.median(times) * 1e6:.0f} µs, p99 {p99 * 1e6:.0f} µs"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--timeout-ms", type=int, default=100)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        nodes = redis_cluster.start(Path(tmp), node_timeout_ms=15_000)  # no failover here
        try:
            conversation = uuid.uuid4()
            owner = nodes.owner(keys.seq(conversation))
            url = f"redis://{owner.address}"
            for wait in (False, True, False, True):
                times = asyncio.run(batches(url, conversation, opts, wait))
                label = f"WAIT 1 {opts.timeout_ms}" if wait else "no WAIT"
                print(f"batch of {opts.batch}, {label}: {summary(times)}", flush=True)
        finally:
            nodes.stop()


if __name__ == "__main__":
    main()
