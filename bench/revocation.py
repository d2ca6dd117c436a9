"""How soon a server API disconnect closes a user's sockets on two web processes: 100
disconnects, each of a fresh user with one socket on the process that takes the request
(A) and one on the other (B); the seconds from sending `POST /api/server/disconnect` until
each socket has its 4401 close frame, as p50/p99/max.

    .venv/bin/python -m bench.revocation [--rounds 100]

Run from the repository root. It starts its own embedded Redis and PostgreSQL and two
`parley web` processes (127.0.0.1 only) and stops them, by PID, when done. A benchmark, not
a test: it never fails on a number.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from server.dev.client import Client
from tests.helpers.auth import mint, new_user
from tests.helpers.conversations import p99
from tests.helpers.processes import Cluster, bench_cluster, start_all

KEY = "bench-server-key-0123456789"
CLOSE_TIMEOUT = 5.0


async def closed_after(client: Client, started: float) -> float:
    await asyncio.wait_for(asyncio.shield(client.closed), CLOSE_TIMEOUT)
    return time.monotonic() - started


async def one_disconnect(http: httpx.AsyncClient, ws_a: str, ws_b: str) -> tuple[float, float]:
    user = new_user()
    token = mint(user)
    local = await Client.connect(ws_a, token)
    remote = await Client.connect(ws_b, token)
    try:
        started = time.monotonic()
        answer = await http.post("/api/server/disconnect", json={"user": user})
        answer.raise_for_status()
        here, there = await asyncio.gather(
            closed_after(local, started), closed_after(remote, started)
        )
        return here, there
    finally:
        await local.close()
        await remote.close()


def summary(name: str, seconds: list[float]) -> str:
    ms = [s * 1000 for s in seconds]
    return (
        f"{name}: p50 {statistics.median(ms):.1f} ms, p99 {p99(ms):.1f} ms, "
        f"max {max(ms):.1f} ms over {len(ms)} disconnects"
    )


async def measure(cluster: Cluster, rounds: int) -> None:
    env = {"PARLEY_SERVER_API_KEYS": KEY}
    web_a, web_b = (cluster.process("web", start=False, **env) for _ in range(2))
    start_all([web_a, web_b])
    headers = {"authorization": f"Bearer {KEY}"}
    local: list[float] = []
    remote: list[float] = []
    async with httpx.AsyncClient(base_url=web_a.url, headers=headers, timeout=10) as http:
        for _ in range(rounds):
            here, there = await one_disconnect(http, web_a.ws_url, web_b.ws_url)
            local.append(here)
            remote.append(there)
    print(summary("socket on the process that took the request", local))
    print(summary("socket on the other web process", remote))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=100)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="parley-revocation-") as tmp,
        bench_cluster(Path(tmp)) as cluster,
    ):
        asyncio.run(measure(cluster, args.rounds))


if __name__ == "__main__":
    main()
