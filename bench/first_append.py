"""How long a reply's first token waits to be appended, expressed or hurried, under a stream.

    .venv/bin/python -m bench.first_append [--streams 200] [--tps 20] [--firsts 400]

Starts its own Redis (server.dev.embedded) and one worker's `Pipeliner` (the worker's 4 ms
interval), keeps `--streams` generations appending a token each `1/--tps` seconds through
it (the batches a busy worker has in flight), and meanwhile appends `--firsts` first tokens
of other generations, alternately the two ways the worker can send one: `hurry` (its batch
goes as soon as the batch in flight is back) and `express` (at once, in a call of its own).
Prints, for each, p50 / p99 of the time from queuing the token to Redis's answer: the
`append` stage of the time to first token, less the worker's own reading of the chunk. Both
ways run in one process, interleaved, so the machine's load weighs on them alike. A
benchmark: it never fails on a number.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from pathlib import Path

from redis.asyncio import Redis

from protocol import frames as f
from server.dev import embedded
from server.redis import generations, keys
from server.redis.eventlog import EventLog, Pipeliner, encode

TTL = 3600
MAX_EVENTS = 1000
INTERVAL = 0.004
TICK = 0.005


async def _generating(redis: Redis, count: int) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """`count` conversations as a `say` leaves them: a seq counter and a generation mark."""
    pairs = [(uuid.uuid4(), uuid.uuid4()) for _ in range(count)]
    async with redis.pipeline(transaction=False) as pipe:
        for conversation, message_id in pairs:
            pipe.set(keys.seq(conversation), 1, ex=TTL)
            pipe.set(keys.persisted(conversation), 0, ex=TTL)
            generations.claim(pipe, conversation, message_id, "", TTL)
        await pipe.execute()
    return pairs


def _token(conversation: uuid.UUID, message_id: uuid.UUID, index: int) -> bytes:
    return encode(f.Token(conversation=conversation, message_id=message_id, text=f" w{index}"))


async def _stream(
    events: EventLog, pipeliner: Pipeliner, pairs: list[tuple[uuid.UUID, uuid.UUID]], tps: float
) -> None:
    """Every generation of `pairs` appends `tps` tokens a second, spread over ticks."""
    per_tick = len(pairs) * tps * TICK
    owed, at, index = 0.0, 0, [1] * len(pairs)
    appenders = [events.appender(c, m) for c, m in pairs]
    while True:
        owed += per_tick
        while owed >= 1:
            conversation, message_id = pairs[at]
            index[at] += 1
            event = _token(conversation, message_id, index[at])
            appenders[at].append(pipeliner, event, index[at])
            at, owed = (at + 1) % len(pairs), owed - 1
        await asyncio.sleep(TICK)


async def run(url: str, streams: int, tps: float, firsts: int) -> dict[str, dict[str, float]]:
    redis = Redis.from_url(url)
    events = EventLog(redis, MAX_EVENTS, TTL)
    pipeliner = Pipeliner(redis, INTERVAL)
    pipeliner.start()
    background = await _generating(redis, streams)
    fresh = await _generating(redis, firsts)
    stream = asyncio.create_task(_stream(events, pipeliner, background, tps))
    waited: dict[str, list[float]] = {"hurry": [], "express": []}
    try:
        await asyncio.sleep(1.0)  # the stream's batches are going
        for n, (conversation, message_id) in enumerate(fresh):
            express = n % 2 == 1
            queued = time.perf_counter()
            event = _token(conversation, message_id, 1)
            appender = events.appender(conversation, message_id)
            future = appender.append(pipeliner, event, 1, express=express)
            if not express:
                pipeliner.hurry()
            await future
            waited["express" if express else "hurry"].append(time.perf_counter() - queued)
            await asyncio.sleep(0.01 + (n % 7) * 0.001)  # land at varied points of the batches
    finally:
        stream.cancel()
        await pipeliner.stop()
        await redis.aclose()
    return {way: _quantiles(samples) for way, samples in waited.items()}


def _quantiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    at = lambda q: ordered[min(int(q * len(ordered)), len(ordered) - 1)] * 1000  # noqa: E731
    return {"count": len(ordered), "p50_ms": round(at(0.5), 3), "p99_ms": round(at(0.99), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--tps", type=float, default=20)
    parser.add_argument("--firsts", type=int, default=400)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="parley-first-append-") as tmp:
        redis = embedded.start_redis(Path(tmp), persist=False)
        try:
            result = asyncio.run(run(redis.url, args.streams, args.tps, args.firsts))
        finally:
            redis.stop()
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
