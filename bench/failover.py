"""Redis Cluster failover mid-stream: the time from SIGKILL of the primary that owns a
streaming conversation's slot to tokens reaching the tabs again, over several runs, each on a
fresh six-node cluster (2 web + 1 worker processes, two tabs on different web processes; the
nodes' `cluster-node-timeout` is 2 s). The test tests/e2e/test_redis_failover.py asserts what
the tabs and PostgreSQL end with; this only measures.

    .venv/bin/python -m bench.failover [--runs 10]

Starts its own embedded PostgreSQL, Redis Cluster nodes and Parley processes on 127.0.0.1 and
stops them by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from pathlib import Path

from tests.helpers.failover import FAILOVER_ENV, kill_owner_mid_stream
from tests.helpers.processes import Cluster, RedisClusters, bench_cluster
from tests.helpers.tabs import two_tabs_on_two_webs


async def one_run(cluster: Cluster, clusters: RedisClusters) -> float:
    backend = clusters.backend()
    env = {**backend.env(), **FAILOVER_ENV}
    try:
        async with two_tabs_on_two_webs(cluster, env, "failover bench") as group:
            return await kill_owner_mid_stream(backend, group.tabs)
    finally:
        clusters.stop()
        clusters.started.clear()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, bench_cluster(Path(tmp)) as cluster:
        times = []
        for run in range(opts.runs):
            clusters = RedisClusters(Path(tmp) / f"run-{run}")
            took = asyncio.run(one_run(cluster, clusters))
            times.append(took)
            print(f"run {run + 1}: kill -> tokens again {took * 1000:.0f} ms", flush=True)
        ordered = sorted(times)
        p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
        print(
            f"{len(times)} runs: p50 {statistics.median(times) * 1000:.0f} ms, "
            f"p99 {p99 * 1000:.0f} ms, max {max(times) * 1000:.0f} ms"
        )


if __name__ == "__main__":
    main()
