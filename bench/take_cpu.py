"""The worker's Python per relayed token, in process, without the network: each model block
goes in where the connection hands it to aiohttp (`ResponseHandler.data_received`, its HTTP
parser, the pushed reader: `body.pushed`), through `_Reply.feed` (the SSE cut, the chunk's
decode and piece, the watchdog) to the worker's `_take` (parts, coalescing, the `Appender`);
then the pipeliner takes its batch (`Pipeliner._calls`: the packed `append_pieces` call), the
connection packs it (`pack_command`) and the results are settled as Redis would answer.

    .venv/bin/python -m bench.take_cpu [--streams 400] [--rounds 150] [--repeat 5] [--profile F]
        [--direct]

Each round gives every stream one block (one token, framed as `parley model` frames it, in
HTTP chunked encoding) and then takes one batch: one token per event, as a worker that keeps
up sees them. Prints, in CPU µs per token (`time.process_time`), `feed` (block → queued
event) and `batch` (packed call, results settled): each a run's median round, the best of
`--repeat` runs (and `mean`: the best run's mean, GC passes and interruptions included). No
Redis, no PostgreSQL: the `Worker` is built on a client that never connects. `--direct` gives
each event to `_Reply.feed` itself, without aiohttp's protocol, parser and pushed reader: the
difference is what a protocol of Parley's own under the connection could save at most. A
benchmark: it never fails on a number.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import functools
import json
import statistics
import time
import uuid
from typing import Any

import msgspec
import uvloop
from aiohttp.client_proto import ResponseHandler

from server.app.config import Settings
from server.generation import llm as llm_module
from server.generation.body import pushed
from server.generation.worker import Running, Worker, token_head
from server.redis.client import connect
from server.redis.eventlog import EventLog
from server.redis.turns import Job, Turns

_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


class _Transport:
    """Enough of a transport for aiohttp's protocol: it is never written to."""

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def close(self) -> None: ...


def _block(index: int, direct: bool) -> bytes:
    """One token as `parley model` sends it (server/dev/simulator.py), one HTTP chunk (or,
    `direct`, the event alone)."""
    chunk = {
        "id": "chatcmpl-0123456789abcdef01234567",
        "object": "chat.completion.chunk",
        "created": 1764500000,
        "model": "parley-sim",
        "choices": [
            {"index": 0, "delta": {"content": f" word{index % 50}"}, "finish_reason": None}
        ],
    }
    event = b"data: " + msgspec.json.encode(chunk) + b"\n\n"
    if direct:
        return event
    return b"%x\r\n%b\r\n" % (len(event), event)


class _Stream:
    """One generation: its `Running`, its reply and its connection's protocol."""

    def __init__(self, worker: Worker, settings: Settings) -> None:
        job = Job(conversation=uuid.uuid4(), user="u", message_id=uuid.uuid4(), model="m")
        run = self.run = Running(job)
        run.appender = worker.events.appender(
            job.conversation, job.message_id, lambda: run.acked, run.settled
        )
        run.token_head = token_head(job.conversation, job.message_id)
        run.first_piece = True  # the first token's express path is per turn, not per token
        reply = self.reply = llm_module._Reply(settings.llm, functools.partial(worker._take, run))
        reply.request = None
        loop = asyncio.get_running_loop()
        protocol = self.protocol = ResponseHandler(loop)
        protocol.connection_made(_Transport())  # type: ignore[arg-type]
        protocol.set_response_params(read_bufsize=2**16)
        protocol.data_received(_HEAD)
        (_, content), _ = protocol._buffer[0]
        self.push = pushed(content, reply.feed)
        assert self.push is not None


async def _measure(
    streams: int, rounds: int, direct: bool, profile: cProfile.Profile | None
) -> dict[str, float]:
    settings = Settings()
    settings = msgspec.structs.replace(
        settings, redis=msgspec.structs.replace(settings.redis, url="redis://127.0.0.1:1/0")
    )
    redis = connect(settings.redis)
    events = EventLog(redis, settings.redis.log_max_events, settings.redis.ttl_seconds)
    turns = Turns(redis, settings.redis.log_max_events, settings.redis.ttl_seconds, 30.0)
    worker = Worker(settings, redis, None, events, turns, None)  # type: ignore[arg-type]
    pipeliner = worker.pipeliner
    connection = redis.connection_pool.make_connection()
    all_streams = [_Stream(worker, settings) for _ in range(streams)]
    blocks = [_block(i, direct) for i in range(rounds)]
    feeds = [
        stream.reply.feed if direct else stream.protocol.data_received for stream in all_streams
    ]
    seq = 0
    feed: list[float] = []
    batch: list[float] = []
    if profile is not None:
        profile.enable()
    for block in blocks:
        began = time.process_time()
        for feed_one in feeds:
            feed_one(block)
        taken = time.process_time()
        queued, pipeliner._queue = pipeliner._queue, []
        for sent in pipeliner._calls(queued):
            connection.pack_command(*sent.call.command())
            count = len(sent.pieces or ())
            sent.settle(list(range(seq + 1, seq + 1 + count)))
            seq += count
        feed.append(taken - began)
        batch.append(time.process_time() - taken)
    if profile is not None:
        profile.disable()
    tokens = streams * rounds
    events_made = sum(stream.run.index for stream in all_streams)
    for stream in all_streams:
        stream.push.stop()  # type: ignore[union-attr]
        stream.reply.watchdog.stop()
    return {  # a round's median: a round the machine interrupted (or a GC pass) is left out
        "feed": statistics.median(feed) * 1e6 / streams,
        "batch": statistics.median(batch) * 1e6 / streams,
        "mean": (sum(feed) + sum(batch)) * 1e6 / tokens,
        "tokens_per_event": tokens / events_made,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--profile", help="write a cProfile of one more run to this file")
    parser.add_argument("--direct", action="store_true", help="without aiohttp (see above)")
    args = parser.parse_args()
    runs = [
        uvloop.run(_measure(args.streams, args.rounds, args.direct, None))
        for _ in range(args.repeat)
    ]
    best = {key: min(run[key] for run in runs) for key in ("feed", "batch")}
    result = {
        "streams": args.streams,
        "direct": args.direct,
        "rounds": args.rounds,
        "feed_us_per_token": round(best["feed"], 2),
        "batch_us_per_token": round(best["batch"], 2),
        "total_us_per_token": round(min(run["feed"] + run["batch"] for run in runs), 2),
        "mean_us_per_token": round(min(run["mean"] for run in runs), 2),
        "feed_all": [round(run["feed"], 2) for run in runs],
        "batch_all": [round(run["batch"], 2) for run in runs],
        "tokens_per_event": round(runs[0]["tokens_per_event"], 3),
    }
    print(json.dumps(result))
    if args.profile:
        profile = cProfile.Profile(time.process_time)
        uvloop.run(_measure(args.streams, args.rounds, args.direct, profile))
        profile.dump_stats(args.profile)


if __name__ == "__main__":
    main()
