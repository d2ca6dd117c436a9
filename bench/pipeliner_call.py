"""What one pipeliner call costs the worker's process: client CPU per `append_pieces` call.

    .venv/bin/python -m bench.pipeliner_call [--conversations 16] [--calls 4000] [--rounds 5]

Starts its own Redis (server.dev.embedded, nothing persisted), makes `--conversations`
generating conversations as a `say` leaves them, and relays token events through the
worker's own pipeliner on Parley's own client (`client.connect`): each call queues one event
of each of `--pieces` conversations (1: a lightly loaded worker, whose batches carry a piece
or two; 16: the batches of a worker relaying 400 streams) and waits for their results, then
the next. Reports the process's CPU time (time.process_time) per script call and per event,
the minimum over `--rounds` rounds of `--calls` calls, one round of each batch size after the
other. The wall time includes Redis's; the CPU time is this process's only (the pipeliner,
redis-py, the event loop). A benchmark: it never fails on a number.
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

from protocol import frames as f
from server.app.config import RedisSettings
from server.dev import embedded
from server.redis import generations, keys
from server.redis.client import connect
from server.redis.eventlog import Appender, EventLog, Pipeliner, encode

TTL = 3600
MAX_EVENTS = 100_000


async def _generating(redis: Redis, events: EventLog, count: int) -> list[Appender]:
    """`count` conversations with a generation running, one appender each."""
    appenders = []
    pipe = redis.pipeline(transaction=False)
    for _ in range(count):
        conversation, message_id = uuid.uuid4(), uuid.uuid4()
        pipe.set(keys.seq(conversation), 1, ex=TTL)
        pipe.set(keys.persisted(conversation), 0, ex=TTL)
        generations.claim(pipe, conversation, message_id, "bench", TTL)
        appenders.append(events.appender(conversation, message_id))
    await pipe.execute()
    return appenders


async def _round(pipeliner: Pipeliner, appenders: list[Appender], calls: int, first: int) -> float:
    """CPU seconds for `calls` calls of one event per appender each, indexes from `first`."""
    frames = [
        encode(
            f.Token(
                conversation=uuid.UUID(a.conversation),
                message_id=uuid.UUID(a.message_id),
                text=" w",
            )
        )
        for a in appenders
    ]
    started = time.process_time()
    for index in range(first, first + calls):
        results = await asyncio.gather(
            *(a.append(pipeliner, frame, index) for a, frame in zip(appenders, frames, strict=True))
        )
        assert all(r > 0 for r in results), results
    return time.process_time() - started


async def run(conversations: int, calls: int, rounds: int, sizes: list[int]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        service = embedded.start_redis(Path(tmp), persist=False)
        try:
            redis = connect(RedisSettings(url=service.url))
            events = EventLog(redis, MAX_EVENTS, TTL)
            pipeliner = Pipeliner(redis, worker="bench")
            pipeliner.start()
            appenders = {size: await _generating(redis, events, size) for size in sizes}
            next_index = dict.fromkeys(sizes, 1)
            best: dict[int, float] = {}
            for _ in range(rounds):
                for size in sizes:
                    spent = await _round(pipeliner, appenders[size], calls, next_index[size])
                    next_index[size] += calls
                    best[size] = min(best.get(size, spent), spent)
            await pipeliner.stop()
            await redis.aclose()
        finally:
            service.stop()
    return {
        f"{size}_pieces_per_call": {
            "us_per_call": round(best[size] * 1e6 / calls, 1),
            "us_per_event": round(best[size] * 1e6 / calls / size, 2),
        }
        for size in sizes
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=16, help="the largest batch")
    parser.add_argument("--calls", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    sizes = sorted({1, args.conversations})
    print(
        json.dumps(asyncio.run(run(args.conversations, args.calls, args.rounds, sizes)), indent=2)
    )


if __name__ == "__main__":
    main()
