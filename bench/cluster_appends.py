"""Appended tokens per second at saturation, one Redis against a three-primary Redis Cluster,
and each Redis process's CPU meanwhile: the `append_piece` script (the per-token write of a
generation) through the worker's pipeliner, from several client processes, on many
conversations. Also PUBLISH against SPUBLISH inside the script on one Redis.

    .venv/bin/python -m bench.cluster_appends [--seconds 8] [--clients 2] [--conversations 600]

Starts its own `redis-server` processes on 127.0.0.1 (Debian's redis-server 7) and stops them
by PID. On a 2-core machine the clients share the cores with Redis, so the cluster's figure is
bounded by the machine, not by the shards: read the CPU per Redis process beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from server.app.config import RedisSettings
from server.dev.embedded import free_port
from server.redis import client, keys
from server.redis.eventlog import APPEND_PIECE, Pipeliner, event_keys
from server.redis.scripts import Call, Registered
from tests.helpers import redis_cluster
from tests.helpers.procfs import cpu_seconds

TOKEN = b'{"type":"token","conversation":"c","message_id":"m","text":"hello "}'


def token_call(registered: Registered, conversation: uuid.UUID, piece: int) -> Call:
    """`append_piece` of one token, piece `piece` of generation "m" (no seq floor)."""
    return registered.bind(
        **event_keys(conversation),
        gen_key=keys.generation(conversation),
        frame=TOKEN,
        maxlen=200,
        ttl=600,
        message_id="m",
        piece=piece,
        floor=0,
    )


async def opened(redis: Any, conversations: Sequence[uuid.UUID], sharded: bool) -> Registered:
    """`append_piece` (with SPUBLISH if `sharded`) registered with `redis` and loaded into
    it, and each conversation loaded with generation "m" open, no piece yet: what
    `token_call`s need (a bare EVALSHA in a pipeline does not load its script)."""
    script = APPEND_PIECE.sharded() if sharded else APPEND_PIECE
    await redis.script_load(script.source)
    async with redis.pipeline(transaction=False) as pipe:
        for c in conversations:
            pipe.set(keys.seq(c), 0)
            pipe.hset(keys.generation(c), mapping={"message_id": "m", "piece": -1})
        await pipe.execute()
    return script.register(redis)


async def _drive(settings: RedisSettings, seconds: float, conversations: int, sharded: bool) -> int:
    redis = client.connect(settings)
    ids = [uuid.uuid4() for _ in range(conversations)]
    registered = await opened(redis, ids, sharded)
    pipeliner = Pipeliner(redis)
    pipeliner.start()
    done = 0
    deadline = time.monotonic() + seconds

    async def stream(c: uuid.UUID) -> None:
        nonlocal done
        piece = 0
        while time.monotonic() < deadline:
            piece += 1
            await pipeliner.call(token_call(registered, c, piece))
            done += 1

    await asyncio.gather(*(stream(c) for c in ids))
    await pipeliner.stop()
    await redis.aclose()
    return done


def _client(args: tuple[RedisSettings, float, int, bool]) -> int:
    return asyncio.run(_drive(*args))


def measure(
    settings: RedisSettings, pids: list[int], opts: Any, sharded: bool = False
) -> dict[str, Any]:
    before = {pid: cpu_seconds(pid) for pid in pids}
    started = time.monotonic()
    with multiprocessing.Pool(opts.clients) as pool:
        counts = pool.map(
            _client, [(settings, opts.seconds, opts.conversations, sharded)] * opts.clients
        )
    elapsed = time.monotonic() - started
    cpu = {pid: round(100 * (cpu_seconds(pid) - before[pid]) / opts.seconds, 1) for pid in pids}
    return {
        "appends_per_s": round(sum(counts) / opts.seconds),
        "redis_cpu_pct": cpu,
        "wall": round(elapsed, 1),
    }


def single_redis(directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            shutil.which("redis-server") or "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
        ],
        stdout=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    return proc, f"redis://127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--conversations", type=int, default=600)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = single_redis(Path(tmp))
        try:
            plain = measure(RedisSettings(url=url), [proc.pid], opts)
            print("single Redis, PUBLISH  ", plain)
            sharded = measure(RedisSettings(url=url), [proc.pid], opts, sharded=True)
            print("single Redis, SPUBLISH ", sharded)
        finally:
            proc.terminate()
            proc.wait(10)
        nodes = redis_cluster.start(Path(tmp) / "cluster")
        try:
            primaries = [n.proc.pid for n in nodes.nodes]
            result = measure(RedisSettings(url=nodes.url, cluster=True), primaries, opts)
            print("3-primary cluster      ", result)
        finally:
            nodes.stop()


if __name__ == "__main__":
    main()
