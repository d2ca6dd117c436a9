"""What one `say` costs the web process, in process: Redis round trips and CPU time.

    .venv/bin/python -m bench.say_cost [--conversations 20] [--says 400] [--rounds 5]

Starts its own Redis and PostgreSQL, builds the web's conversation service as `parley web`
does (server/app/runtime.py, without sockets or a worker), makes `--conversations`
conversations (one user each) and says in them one after another, the turn's `generating`
mark cleared between says as a finished turn leaves it (outside the measured time). Reports:
the round trips one `say` sends to Redis (counted with MONITOR: the commands a client sent,
not those its scripts ran), and the process's CPU time per `say` (time.process_time around
the `say` calls only; the minimum over `--rounds` rounds of `--says` says). A benchmark: it
never fails on a number.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from server.app import config
from server.app.runtime import Runtime
from server.dev import embedded
from server.redis import keys


async def _round_trips(url: str, say: Any) -> int:
    """The commands clients sent Redis while `say()` ran (MONITOR lists a script's own
    commands too, as the `lua` client's: those are not round trips)."""
    watcher = Redis.from_url(url)
    seen: list[str] = []
    async with watcher.monitor() as monitor:

        async def listen() -> None:
            async for command in monitor.listen():
                if command.get("client_type") != "lua":
                    seen.append(str(command.get("command", "")).split(" ", 1)[0])

        listening = asyncio.create_task(listen())
        await asyncio.sleep(0.2)
        await say()
        await asyncio.sleep(0.3)
        listening.cancel()
    await watcher.aclose()
    return len(seen)


async def measure(args: argparse.Namespace, redis_url: str, database_url: str) -> dict[str, Any]:
    environ = {
        "REDIS_URL": redis_url,
        "DATABASE_URL": database_url,
        "PARLEY_CONFIG": str(Path(tempfile.gettempdir()) / "none.toml"),
        "PARLEY_JWT_SECRET": "bench-secret-bench-secret-bench-secret",
        "PARLEY_DATA_DIR": tempfile.mkdtemp(prefix="say-cost-"),
        "PARLEY_LIMITS_TURNS_PER_MINUTE": "1000000",
        "PARLEY_LIMITS_FAIR_QUEUE": "false",  # no worker here: turns go to the Stream
    }
    runtime = Runtime(settings=config.load(environ=environ), runs_web=False, runs_worker=False)
    await runtime.start()
    conversations = runtime.conversations
    pairs = []
    for i in range(args.conversations):
        meta = await conversations.create(f"user-{i}", None, None, None)
        pairs.append((f"user-{i}", meta.id))

    async def say(user: str, conversation: uuid.UUID) -> None:
        await conversations.say(user, conversation, "hello", None)

    async def finished(conversation: uuid.UUID) -> None:
        await runtime.redis.delete(keys.generation(conversation))

    for user, c in pairs:  # the first turn of each reads (and loads) the row
        await say(user, c)
        await finished(c)
    user, c = pairs[0]
    trips = await _round_trips(redis_url, lambda: say(user, c))
    await finished(c)
    rounds = []
    for _ in range(args.rounds):
        spent = 0.0
        for i in range(args.says):
            user, c = pairs[i % len(pairs)]
            before = time.process_time()
            await say(user, c)
            spent += time.process_time() - before
            await finished(c)
        rounds.append(spent / args.says * 1e6)
    await runtime.stop()
    return {
        "round_trips_per_say": trips,
        "web_cpu_us_per_say_min": round(min(rounds), 1),
        "web_cpu_us_per_say_rounds": [round(r, 1) for r in rounds],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=20)
    parser.add_argument("--says", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="say-cost-") as tmp:
        redis = embedded.start_redis(Path(tmp), persist=False)
        postgres = embedded.start_postgres(Path(tmp), fast=True)
        try:
            result = asyncio.run(measure(args, redis.url, postgres.url))
        finally:
            redis.stop()
            postgres.stop()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
