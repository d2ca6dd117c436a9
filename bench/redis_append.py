"""What Redis spends per appended event, against a raw PUBLISH of the same frame.

    .venv/bin/python -m bench.redis_append [--conversations 400] [--tokens 200] [--batch 64]

Starts its own Redis (server.dev.embedded), loads `--conversations` conversations the way a
`say` leaves them (seq counter, generation mark), subscribes one pub/sub connection to all
their channels (a web process), then appends `--tokens` token events to each through the
worker's own code (a generation's `Appender`, told the highest seq acknowledged as the worker
tells it, in batches of `--batch` pieces: one `append_pieces` call each), and afterwards
PUBLISHes the same framed bytes to the same channels in the same pipelines. For each it reads
Redis's own accounting before and after: `INFO cpu` (user + sys, what the Redis process spent,
network included) and `INFO commandstats` (time inside the commands), and this process's own
CPU (the worker's side: the pipeliner, redis-py, the replies; the subscriber's draining
included, the same for both). A third round sends what an event writes without a script
(INCR of the seq, XADD to the log, PUBLISH, pipelined: none of the script's checks, so the
floor of any way of appending that keeps a counter, a log and a channel). Prints µs per
event and events per second per Redis core; it is a benchmark, it never fails on a number.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.crc import key_slot

from bench.callgrind import CallgrindRedis
from protocol import frames as f
from server.dev import embedded
from server.redis import generations, keys
from server.redis.eventlog import EventLog, Pipeliner, encode

TTL = 3600
MAX_EVENTS = 1000
ROUNDS = ("append", "publish", "commands")


async def _redis_cpu(redis: Redis) -> tuple[float, dict[str, tuple[int, int]]]:
    """(CPU seconds Redis used so far, {command: (calls, µs)})."""
    cpu = await redis.info("cpu")
    stats = await redis.info("commandstats")
    commands = {
        name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
        for name, v in stats.items()
    }
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]), commands


def _delta(
    before: tuple[float, dict[str, tuple[int, int]]],
    after: tuple[float, dict[str, tuple[int, int]]],
    events: int,
) -> dict[str, Any]:
    commands = {}
    for name, (calls, usec) in after[1].items():
        was = before[1].get(name, (0, 0))
        if calls - was[0] > 0:
            commands[name] = {"calls": calls - was[0], "usec": usec - was[1]}
    cpu_us = (after[0] - before[0]) * 1e6 / events
    inside_us = sum(c["usec"] for c in commands.values()) / events
    return {
        "events": events,
        "redis_cpu_us_per_event": round(cpu_us, 2),
        "command_us_per_event": round(inside_us, 2),
        "events_per_redis_core_per_s": round(1e6 / cpu_us) if cpu_us else None,
        "commands": commands,
    }


async def _prepare(
    redis: Redis, conversations: list[uuid.UUID], message_ids: list[uuid.UUID]
) -> None:
    pipe = redis.pipeline(transaction=False)
    for conversation, message_id in zip(conversations, message_ids, strict=True):
        pipe.set(keys.seq(conversation), 1, ex=TTL)
        pipe.set(keys.persisted(conversation), 0, ex=TTL)
        generations.claim(pipe, conversation, message_id, "bench", TTL)
    await pipe.execute()


def _tokens(
    conversations: list[uuid.UUID], message_ids: list[uuid.UUID], tokens: int
) -> Iterator[tuple[uuid.UUID, uuid.UUID, int, bytes]]:
    """(conversation, message id, piece index, token frame without seq), a round of every
    conversation per token."""
    pairs = list(zip(conversations, message_ids, strict=True))
    for index in range(1, tokens + 1):
        for conversation, message_id in pairs:
            token = f.Token(conversation=conversation, message_id=message_id, text=f" w{index}")
            yield conversation, message_id, index, encode(token)


async def _appends(
    events: EventLog,
    conversations: list[uuid.UUID],
    message_ids: list[uuid.UUID],
    tokens: int,
    batch: int,
) -> None:
    pipeliner = Pipeliner(events.redis)
    pipeliner.start()
    pending = []
    acked: dict[uuid.UUID, int] = {}  # what the worker passes: the highest seq acknowledged
    appenders = {  # one a generation, as the worker's
        c: events.appender(c, m, functools.partial(_acked, acked, c))
        for c, m in zip(conversations, message_ids, strict=True)
    }
    for conversation, _, index, frame in _tokens(conversations, message_ids, tokens):
        piece = appenders[conversation].append(pipeliner, frame, index)
        piece.add_done_callback(functools.partial(_ack, acked, conversation))
        pending.append(piece)
        if len(pending) >= batch:
            await asyncio.gather(*pending)
            pending = []
    await asyncio.gather(*pending)
    await pipeliner.stop()


def _acked(acked: dict[uuid.UUID, int], conversation: uuid.UUID) -> int:
    return acked.get(conversation, 0)


def _ack(acked: dict[uuid.UUID, int], conversation: uuid.UUID, piece: asyncio.Future[Any]) -> None:
    acked[conversation] = max(acked.get(conversation, 0), int(piece.result()))


def _publish(pipe: Any, conversation: uuid.UUID, seq: int, framed: bytes) -> None:
    """The same frame, framed as the script would (the seq spliced in front), PUBLISHed."""
    pipe.publish(keys.channel(conversation), framed)


def _three_writes(pipe: Any, conversation: uuid.UUID, seq: int, framed: bytes) -> None:
    """An event's three writes as plain commands (seq, log entry, PUBLISH)."""
    pipe.incr(keys.seq(conversation))
    pipe.xadd(keys.log(conversation), {"f": framed}, id=f"{seq}-0")
    pipe.publish(keys.channel(conversation), framed)


async def _pipelined(
    redis: Redis,
    conversations: list[uuid.UUID],
    message_ids: list[uuid.UUID],
    tokens: int,
    batch: int,
    writes: Callable[[Any, uuid.UUID, int, bytes], None],
) -> None:
    """Each token's frame, with its seq spliced in front, written by `writes` in pipelines
    of `batch` events."""
    pipe = redis.pipeline(transaction=False)
    for n, (conversation, _, index, frame) in enumerate(
        _tokens(conversations, message_ids, tokens), 1
    ):
        writes(pipe, conversation, index + 1, b'{"seq":%d,' % (index + 1) + frame[1:])
        if n % batch == 0:
            await pipe.execute()
    await pipe.execute()


async def _listen(
    redis_url: str, conversations: list[uuid.UUID], ready: asyncio.Event, sharded: bool = False
) -> int:
    """One subscriber on every channel, draining what arrives (a web process's bus); with
    `sharded`, SSUBSCRIBEd on a cluster node (one command per slot, as it must be)."""
    client = Redis.from_url(redis_url)
    pubsub = client.pubsub()
    channels = [keys.channel(c) for c in conversations]
    if sharded:
        by_slot: dict[int, list[str]] = {}
        for channel in channels:
            by_slot.setdefault(key_slot(channel.encode()), []).append(channel)
        for same in by_slot.values():
            await pubsub.ssubscribe(*same)
    else:
        await pubsub.subscribe(*channels)
    ready.set()
    received = 0
    try:
        while True:
            message = await pubsub.get_message(timeout=1.0)
            if message is not None and message["type"] in ("message", "smessage"):
                received += 1
    except asyncio.CancelledError:
        return received
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await client.aclose()


async def _round(
    redis_url: str,
    events: EventLog,
    name: str,
    n: int,
    tokens: int,
    batch: int,
    counted: CallgrindRedis | None = None,
) -> dict[str, Any]:
    redis = events.redis
    conversations = [uuid.uuid4() for _ in range(n)]
    message_ids = [uuid.uuid4() for _ in range(n)]
    await _prepare(redis, conversations, message_ids)
    ready = asyncio.Event()
    listener = asyncio.create_task(_listen(redis_url, conversations, ready))
    await ready.wait()
    await redis.config_resetstat()
    before = await _redis_cpu(redis)
    executed = counted.instructions() if counted else 0
    client_before = time.process_time()
    if name == "append":
        await _appends(events, conversations, message_ids, tokens, batch)
    else:
        writes = _three_writes if name == "commands" else _publish
        await _pipelined(redis, conversations, message_ids, tokens, batch, writes)
    client = (time.process_time() - client_before) * 1e6 / (n * tokens)
    executed = counted.instructions() - executed if counted else 0
    after = await _redis_cpu(redis)
    await asyncio.sleep(0.5)
    listener.cancel()
    received = await listener
    await redis.flushdb()
    return _delta(before, after, n * tokens) | {
        "received": received,
        "client_cpu_us_per_event": round(client, 2),
        "instructions_per_event": round(executed / (n * tokens)),
    }


async def run(
    redis_url: str,
    n: int,
    tokens: int,
    batch: int,
    rounds: int,
    counted: CallgrindRedis | None = None,
) -> dict[str, Any]:
    """Appends and raw PUBLISHes in alternating rounds; each keeps its least disturbed round
    (the machine may be shared: other processes only ever add to Redis's CPU time). With
    `counted` (the Redis at `redis_url` under callgrind) each round counts instructions too."""
    redis = Redis.from_url(redis_url)
    events = EventLog(redis, MAX_EVENTS, TTL)
    results: dict[str, Any] = {"conversations": n, "tokens": tokens, "batch": batch}
    for name in ROUNDS:
        results[name + "_rounds"] = []
    for _ in range(rounds):
        for name in ROUNDS:
            r = await _round(redis_url, events, name, n, tokens, batch, counted)
            results[name + "_rounds"].append(r)
    for name in ROUNDS:
        results[name] = min(results[name + "_rounds"], key=lambda r: r["redis_cpu_us_per_event"])
    await redis.aclose()
    publish = results["publish"]
    for name in ("append", "commands"):
        results[f"{name}_ratio"] = round(
            results[name]["redis_cpu_us_per_event"] / publish["redis_cpu_us_per_event"], 2
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=400)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--batch", type=int, default=64, help="calls per pipeline")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (best kept)")
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--callgrind",
        action="store_true",
        help="run Redis under valgrind's callgrind and count its instructions per event",
    )
    parser.add_argument(
        "--redis-server", help="with --callgrind: this binary (default: embedded's)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="parley-redis-bench-") as tmp:
        if args.callgrind:
            binary = args.redis_server or str(embedded._redis_binary())
            redis: CallgrindRedis | embedded.Service = CallgrindRedis(Path(tmp), binary)
        else:
            redis = embedded.start_redis(Path(tmp), persist=False)
        counted = redis if isinstance(redis, CallgrindRedis) else None
        try:
            options = (args.conversations, args.tokens, args.batch, args.rounds)
            results = asyncio.run(run(redis.url, *options, counted))
        finally:
            redis.stop()
    text = json.dumps(results, indent=1)
    if args.out:
        args.out.write_text(text)
    for name in ROUNDS:
        r = results[name]
        print(
            f"{name:8} Redis CPU {r['redis_cpu_us_per_event']:6.2f} µs/event "
            f"(inside commands {r['command_us_per_event']:5.2f}), "
            f"{r['events_per_redis_core_per_s']:,} events/s per Redis core, "
            f"client CPU {r['client_cpu_us_per_event']:6.2f} µs/event, "
            f"{r['received']:,} received"
            + (f", {r['instructions_per_event']:,} instructions/event" if args.callgrind else "")
        )
    print(f"append / publish: {results['append_ratio']}×")
    print(f"commands / publish: {results['commands_ratio']}×")
    for name, c in results["append"]["commands"].items():
        print(f"  {name:12} {c['calls']:8,} calls {c['usec'] / c['calls']:6.2f} µs/call")


if __name__ == "__main__":
    main()
