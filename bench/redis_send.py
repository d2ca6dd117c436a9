"""What one batch of appends costs the caller: a redis-py pipeline against a plain command.

    .venv/bin/python -m bench.redis_send [--pieces 8] [--batches 2000] [--rounds 6]

Starts its own Redis (server.dev.embedded) and, on the worker's own client
(`server.redis.client.connect`: hiredis packing), sends one `append_pieces` call of
`--pieces` events `--batches` times in each of two ways, alternating for `--rounds` rounds:
queued on a redis-py pipeline (how every batch went before) and as `scripts.pipelined` sends
a batch of one call (a plain EVALSHA). Prints this process's CPU per batch (min and median
over the rounds). The pieces name conversations Redis does not hold, so each is answered
UNLOADED at once: the call's cost to the caller is what is measured, not the Lua's.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from server.app.config import RedisSettings
from server.dev import embedded
from server.redis import keys, scripts
from server.redis.client import connect
from server.redis.eventlog import APPEND_PIECES


def _call(redis: Any, pieces: int) -> scripts.Call:
    piece_keys: list[str] = []
    piece_args: list[Any] = []
    for _ in range(pieces):
        c = str(uuid.uuid4())
        piece_keys += [keys.seq(c), keys.log(c), keys.channel(c), keys.persisted(c)]
        piece_keys.append(keys.generation(c))
        piece_args += [b'{"type":"token","text":" a word"}', str(uuid.uuid4()), 5, 0]
    registered = APPEND_PIECES.register(redis)
    return registered.bind(
        call_key=keys.appended(c, "redis_send"),
        maxlen=1000,
        ttl=60,
        kept=0,
        worker="",
        piece_keys=piece_keys,
        piece_args=piece_args,
    )


async def run(url: str, pieces: int, batches: int, rounds: int) -> dict[str, list[float]]:
    redis = connect(RedisSettings(url=url))
    call = _call(redis, pieces)
    await redis.script_load(call.script.script)

    async def through_pipeline() -> None:
        async with redis.pipeline(transaction=False) as pipe:
            await call.run(pipe)
            await pipe.execute(raise_on_error=False)

    async def plain() -> None:
        await scripts.pipelined(redis, [call])

    ways: dict[str, Callable[[], Awaitable[None]]] = {
        "pipeline": through_pipeline,
        "plain": plain,
    }
    results: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, send in ways.items():
            started = time.process_time()
            for _ in range(batches):
                await send()
            results[name].append((time.process_time() - started) * 1e6 / batches)
    await redis.aclose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pieces", type=int, default=8, help="events in the batch's call")
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="parley-send-bench-") as tmp:
        redis = embedded.start_redis(Path(tmp), persist=False)
        try:
            results = asyncio.run(run(redis.url, args.pieces, args.batches, args.rounds))
        finally:
            redis.stop()
    for name, values in results.items():
        print(
            f"{name:8} client CPU per batch of {args.pieces}: "
            f"min {min(values):.1f} µs, median {statistics.median(values):.1f} µs"
        )


if __name__ == "__main__":
    main()
