"""What the budget check adds to a turn's acceptance: `say` → `ack` on one socket, one turn at
a time (each waits for its `done`, so every `say` finds its conversation free), against
`parley serve` with budgets off and with a budget configured; with `--base <tree>` (a checkout
of an older commit, e.g. `git archive <commit> | tar -x -C /tmp/base`) that tree first.
Simulated model with no delay.

    .venv/bin/python bench/budget_latency.py [--turns 500] [--base /tmp/base]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocol import frames as f
from tests.helpers import processes
from tests.helpers.conversations import timed_turns
from tests.helpers.processes import INSTANT_TURNS, bench_cluster, redis_db

BUDGET = {"PARLEY_BUDGETS_DEFAULT_TOKENS": str(10**12)}


def report(name: str, times: list[float]) -> None:
    ordered = sorted(times)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    print(f"{name:28} p50 {statistics.median(ordered):6.2f} ms   p99 {p99:6.2f} ms", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=500)
    parser.add_argument("--base", type=Path, help="an older tree to measure first")
    args = parser.parse_args()
    runs: list[tuple[str, Path, dict[str, str]]] = []
    if args.base:
        runs.append((f"base tree ({args.base.name})", args.base, {}))
    runs += [("budgets off", processes.ROOT, {}), ("budget configured", processes.ROOT, BUDGET)]
    here = processes.ROOT
    with tempfile.TemporaryDirectory() as tmp, bench_cluster(Path(tmp)) as cluster:
        for db, (name, root, env) in enumerate(runs, start=1):
            processes.ROOT = root  # the tree `parley serve` runs from
            url = redis_db(cluster.services.redis_url, db)
            server = cluster.process("serve", REDIS_URL=url, **INSTANT_TURNS, **env)
            processes.ROOT = here
            asyncio.run(timed_turns(server.ws_url, 20, f.Ack))  # warm up
            report(name, asyncio.run(timed_turns(server.ws_url, args.turns, f.Ack)))
            server.stop()


if __name__ == "__main__":
    main()
