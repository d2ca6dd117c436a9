"""What Parley's failure handling costs, measured on this machine with real processes (the
tests in tests/e2e/test_resilience.py assert bounds on the same figures):

1. how soon a peer that stops answering pings is closed (pings every 1 s, 1 s timeout);
2. how soon a turn is taken over after its worker is SIGKILLed (lease 2 s);
3. how soon a `cancel` sent on one web process aborts the model's stream started from another;
4. how soon finished turns reach PostgreSQL after it was unreachable for 10 s;
5. server memory per reader that stops reading during a fast 5,000-token reply, and the
   normal tab's token gaps meanwhile (outbox limit 64 KiB).

    .venv/bin/python -m bench.resilience_numbers [--only peer takeover cancel postgres slow]

Run from the repository root. It starts its own embedded Redis and PostgreSQL and its own
Parley processes (127.0.0.1 only) and stops them, by PID, when done. A benchmark, not a test:
it never fails on a number.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import websockets
from redis.asyncio import Redis

from protocol import frames as f
from server.dev.client import Client
from tests.helpers.auth import mint, new_user
from tests.helpers.conversations import gaps, index_of, p99, start_conversation, wait_persisted
from tests.helpers.faults import Proxy
from tests.helpers.processes import (
    Cluster,
    bench_cluster,
    model_stats,
    redis_db,
    scaled_cluster,
    small_outbox_server,
    start_all,
    stop_all,
    worker_of,
)
from tests.helpers.procfs import kernel_send_queue, rss_kib
from tests.helpers.sockets import TCP_ESTABLISHED, stalled_reader, tcp_state
from tests.helpers.tabs import until

# A Redis database per measurement, so that no worker of another one claims its turns.
PEER_DB, TAKEOVER_DB, POSTGRES_DB, SLOW_DB = 3, 4, 5, 6
HEARTBEAT = {"PARLEY_SERVER_WS_PING_INTERVAL": "1", "PARLEY_SERVER_WS_PING_TIMEOUT": "1"}


async def dead_peer(cluster: Cluster) -> str:
    web = cluster.process(
        "serve", start=False, REDIS_URL=redis_db(cluster.services.redis_url, PEER_DB), **HEARTBEAT
    )
    start_all([web])
    dead = await websockets.connect(
        web.ws_url,
        subprotocols=[f.SUBPROTOCOL, f"{f.BEARER_PREFIX}{mint(new_user())}"],  # type: ignore[list-item]
        ping_interval=None,
        open_timeout=10,
    )
    try:
        await asyncio.wait_for(dead.recv(), 10)  # ready
        dead.transport.pause_reading()
        took = await until(lambda: tcp_state(dead) != TCP_ESTABLISHED, 10, "the close")
        return f"dead peer closed {took:.2f} s after it stopped reading (ping 1 s, timeout 1 s)"
    finally:
        dead.transport.abort()
        await stop_all([web])


async def takeover(cluster: Cluster) -> str:
    env = {"REDIS_URL": redis_db(cluster.services.redis_url, TAKEOVER_DB)}
    web = cluster.process("web", start=False, **env)
    workers = [
        cluster.process("worker", start=False, PARLEY_WORKER_LEASE_SECONDS="2", **env)
        for _ in range(2)
    ]
    start_all([web, *workers])
    redis = Redis.from_url(env["REDIS_URL"])
    a = await Client.connect(web.ws_url, mint(new_user()))
    try:
        conversation = await start_conversation(a, title="takeover")
        await a.request(f.Say(conversation=conversation, text="[sim:tokens=150][sim:tps=50]"))
        start = await a.wait_for(lambda fr: isinstance(fr, f.Start))
        await a.wait_for(lambda fr: isinstance(fr, f.Token) and fr.seq >= start.seq + 10)
        pid = await worker_of(redis, conversation)
        victim = next(w for w in workers if w.pid == pid)
        killed_at, mark = time.monotonic(), len(a.frames)
        await asyncio.to_thread(victim.kill)
        first = await a.wait_for(
            lambda fr: isinstance(fr, f.Start | f.Done) and fr.message_id == start.message_id,
            start=mark,
            timeout=30,
        )
        at = index_of(a, lambda fr: fr is first, mark)
        assert at is not None
        outcome = "start again" if isinstance(first, f.Start) else f"done {first.reason}"
        return f"worker SIGKILL (lease 2 s): {outcome} after {a.arrived[at] - killed_at:.2f} s"
    finally:
        await a.close()
        await redis.aclose()
        await stop_all([web, *workers])


async def cancel(cluster: Cluster) -> str:
    scaled = scaled_cluster(cluster)
    user = new_user()
    a = await Client.connect(scaled.webs[0].ws_url, mint(user))
    b = await Client.connect(scaled.webs[1].ws_url, mint(user))
    try:
        conversation = await start_conversation(b, title="stop")
        await a.request(f.Join(conversation=conversation))
        before = await model_stats(scaled.model)
        await b.request(f.Say(conversation=conversation, text="[sim:tokens=400][sim:tps=50]"))
        start = await a.wait_for(lambda fr: isinstance(fr, f.Start))
        await a.wait_for(lambda fr: isinstance(fr, f.Token) and fr.seq >= start.seq + 5)
        sent = time.monotonic()
        await a.request(f.Cancel(conversation=conversation))
        stats = before
        deadline = time.monotonic() + 5
        while stats["aborted"] <= before["aborted"] and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            stats = await model_stats(scaled.model)
        latency = (stats["last_aborted_at"] - sent) * 1000
        return f"cancel from another web process: model stream aborted after {latency:.0f} ms"
    finally:
        await asyncio.gather(a.close(), b.close(), return_exceptions=True)
        await stop_all([*scaled.webs, *scaled.workers, scaled.model])


async def postgres_down(cluster: Cluster) -> str:
    with Proxy.to_url(cluster.services.database_url) as proxy:
        server = cluster.process(
            "serve",
            start=False,
            REDIS_URL=redis_db(cluster.services.redis_url, POSTGRES_DB),
            DATABASE_URL=proxy.url(cluster.services.database_url),
        )
        start_all([server])
        a = await Client.connect(server.ws_url, mint(new_user()))
        db = await asyncpg.create_pool(cluster.services.database_url, min_size=1, max_size=2)
        try:
            conversations = [await start_conversation(a, title=f"pg {i}") for i in range(3)]
            for conv in conversations:
                await a.request(f.Say(conversation=conv, text="[sim:tokens=40][sim:tps=40]"))
            proxy.refuse()
            down = time.monotonic()
            await asyncio.sleep(10)
            proxy.resume()
            back = time.monotonic()
            for conv in conversations:
                await wait_persisted(db, conv, 2, timeout=30)
            return (
                f"PostgreSQL down {back - down:.0f} s: 3 finished turns persisted "
                f"{time.monotonic() - back:.2f} s after it returned"
            )
        finally:
            await a.close()
            await db.close()
            await stop_all([server])


async def slow_readers(cluster: Cluster, readers: int = 4, tokens: int = 5000) -> str:
    tps = 1000
    server = small_outbox_server(cluster, SLOW_DB, tokens)
    start_all([server])
    user = new_user()
    normal = await Client.connect(server.ws_url, mint(user))
    sockets: list[Any] = []
    try:
        conversation = await start_conversation(normal, title="slow readers")
        for _ in range(readers):
            ws, _ = await stalled_reader(server.ws_url, mint(user), conversation)
            sockets.append(ws)
        before = peak = rss_kib(server.pid)
        queued = 0
        await normal.request(
            f.Say(conversation=conversation, text=f"[sim:tokens={tokens}][sim:tps={tps}]")
        )
        finished = asyncio.ensure_future(
            normal.wait_for(lambda fr: isinstance(fr, f.Done), timeout=30 + tokens / tps * 2)
        )
        while not finished.done():
            peak = max(peak, rss_kib(server.pid))
            queued = max(queued, kernel_send_queue(server.port))
            await asyncio.wait([finished], timeout=0.1)
        loaded, frames = gaps(normal, finished.result().message_id)
        grown = (peak - before) / 1024
        return (
            f"{readers} readers stalled during a {tokens}-token reply at {tps} tokens/s: server "
            f"RSS +{grown:.1f} MiB ({grown / readers:.2f} MiB per stalled reader; kernel send "
            f"queues at most {queued / 1024:.0f} KiB in all); the normal tab's token gaps p50 "
            f"{statistics.median(loaded) * 1e3:.2f} ms, p99 {p99(loaded) * 1e3:.1f} ms "
            f"({tokens} tokens in {frames} frames)"
        )
    finally:
        for ws in sockets:
            ws.transport.abort()
        await normal.close()
        await stop_all([server])


MEASUREMENTS: dict[str, Callable[[Cluster], Awaitable[str]]] = {
    "peer": dead_peer,
    "takeover": takeover,
    "cancel": cancel,
    "postgres": postgres_down,
    "slow": slow_readers,
}


async def measure(cluster: Cluster, chosen: list[str]) -> None:
    for name in chosen:
        print(await MEASUREMENTS[name](cluster), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--only", nargs="*", choices=list(MEASUREMENTS), help="run only these")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="parley-resilience-") as tmp,
        bench_cluster(Path(tmp)) as cluster,
    ):
        asyncio.run(measure(cluster, args.only or list(MEASUREMENTS)))


if __name__ == "__main__":
    main()
