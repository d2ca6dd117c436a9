"""A reconnect storm: every tab of one `parley web` loses it at once and rejoins another.

    .venv/bin/python -m bench.reconnect_storm [--tabs 10000] [--conversations 1000]

Starts its own Redis and PostgreSQL, two `parley web` processes (A, B) and no worker. The
tabs (`--tabs` sockets, spread over `--conversations` conversations, each with a finished
turn persisted in PostgreSQL) join on A. Events keep being appended to every conversation
(the append script, from this process) while A is SIGKILLed: each tab then reconnects to B
and joins with `after` = the last seq it holds. Reported: the storm's completion time (kill
→ last tab caught up), each rejoin's time (kill → its `joined`) p50/p99, the statements B
sent PostgreSQL during the storm (`parley_postgres_queries_total`), and whether any tab
lost or repeated an event (each tab's seqs must be contiguous up to the head). Socket
set-ups including `join` per second and per web core come from B's CPU time during the
storm; the tabs' own CPU (this process's) is reported beside it: on a small machine the
tabs and B share the cores. The tabs run on uvloop, as `parley load` does (`--asyncio`: on
asyncio's own loop). B's run-queue wait (/proc schedstat: runnable, no CPU free) and its
event loop lag p50/p99 during the storm come beside its CPU. A benchmark: it never fails on a
number.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Final

import msgspec
from redis.asyncio import Redis

from bench import profiling, worker_cost
from protocol import frames as f
from server.load.runner import run_loop
from server.load.wsclient import Endpoint, WSClient, connect
from server.redis import keys
from server.redis.eventlog import EventLog, encode
from tests.helpers import procfs
from tests.helpers.auth import mint
from tests.helpers.processes import ParleyProcess, bench_cluster, postgres_queries_now, start_all


class _Incoming(msgspec.Struct):
    type: str
    seq: int = -1
    ref: str | None = None
    conversation: str = ""
    last_seq: int = -1
    reset: bool = False


_decode = msgspec.json.Decoder(_Incoming).decode
ERRORS: list[bytes] = []
"""`error` frames the tabs received (a refused join leaves its tab waiting until timeout)."""


class Tab:
    """One socket joined to one conversation, checking that its seqs are contiguous."""

    __slots__ = ("conversation", "gaps", "joined", "last_seq", "ready", "rejoined_at", "ws")

    def __init__(self, conversation: str) -> None:
        self.conversation = conversation
        self.ws: WSClient | None = None
        self.last_seq = -1
        self.gaps = 0
        self.ready: asyncio.Future[None] | None = None
        self.joined: asyncio.Future[None] | None = None
        self.rejoined_at = 0.0

    def on_text(self, payload: bytes) -> None:
        fr = _decode(payload)
        if fr.seq >= 0:
            if self.last_seq >= 0 and fr.seq != self.last_seq + 1:
                self.gaps += 1
            self.last_seq = max(self.last_seq, fr.seq)
        elif fr.type == "ready" and self.ready is not None and not self.ready.done():
            self.ready.set_result(None)
        elif fr.type == "error":
            ERRORS.append(payload[:300])
        elif fr.type == "joined" and self.joined is not None and not self.joined.done():
            if fr.reset:
                self.gaps += 1  # a reset means the log had lost what this tab missed
            self.last_seq = fr.last_seq
            self.rejoined_at = time.monotonic()
            self.joined.set_result(None)

    def on_closed(self, code: int | None, reason: str) -> None:
        pass

    async def join(self, port: int, token: str, after: int | None, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        self.ready, self.joined = loop.create_future(), loop.create_future()
        endpoint = Endpoint(f"ws://127.0.0.1:{port}/ws")
        protocols = [f.SUBPROTOCOL, f"{f.BEARER_PREFIX}{token}"]
        async with asyncio.timeout(timeout):
            self.ws = await connect(endpoint, protocols, self.on_text, self.on_closed, timeout)
            await self.ready
            frame: dict[str, Any] = {"type": "join", "conversation": self.conversation}
            if after is not None:
                frame["after"] = after
            self.ws.send_text(msgspec.json.encode(frame))
            await self.joined


async def _conversations(web: ParleyProcess, token: str, n: int) -> list[str]:
    """`n` conversations of the user, created over one socket (within its frame rate)."""
    tab = Tab("")
    created: list[str] = []
    waiting: asyncio.Queue[str] = asyncio.Queue()

    def on_text(payload: bytes) -> None:
        fr = msgspec.json.decode(payload)
        if fr.get("type") == "created":
            waiting.put_nowait(fr["conversation"])
        elif fr.get("type") == "error":
            waiting.put_nowait("")
        elif fr.get("type") == "ready" and tab.ready is not None and not tab.ready.done():
            tab.ready.set_result(None)

    tab.ready = asyncio.get_running_loop().create_future()
    endpoint = Endpoint(web.ws_url)
    protocols = [f.SUBPROTOCOL, f"{f.BEARER_PREFIX}{token}"]
    ws = await connect(endpoint, protocols, on_text, tab.on_closed, 10)
    await tab.ready
    while len(created) < n:
        ws.send_text(msgspec.json.encode({"type": "create", "title": f"storm {len(created)}"}))
        conversation = await asyncio.wait_for(waiting.get(), 10)
        if conversation:
            created.append(conversation)
        else:  # over the socket's frame rate: wait for the bucket to refill
            await asyncio.sleep(0.5)
    ws.abort()
    return created


async def _append_until(
    events: EventLog, conversations: list[str], rate: float, stop: asyncio.Event
) -> int:
    """Append a notice-like event to the conversations round-robin at `rate` per second
    until `stop` is set. (Not cancelled: redis-py can swallow a cancel that lands inside a
    call, and the appender then ran on, and the benchmark waited for it, forever.)"""
    sent = 0
    while rate > 0 and not stop.is_set():
        for c in conversations:
            if stop.is_set():
                break
            frame = encode(f.Token(conversation=uuid.UUID(c), message_id=uuid.UUID(c), text="x"))
            await events.append(uuid.UUID(c), frame)
            sent += 1
            await asyncio.sleep(1 / rate)
    return sent


UI_FIRST_RETRY: Final = (0.25, 0.5)
"""The browser UI's wait before its first reconnect, seconds (server/static/connection.js:
half to all of 500 ms)."""


async def _gather_bounded(
    coros: list[Any], concurrency: int, delays: list[float] | None = None
) -> list[Any]:
    """Run `coros`, at most `concurrency` at once, each after its delay (if given), which
    it waits for without holding a place."""
    gate = asyncio.Semaphore(concurrency)

    async def one(coro: Any, delay: float) -> Any:
        if delay:
            await asyncio.sleep(delay)
        async with gate:
            return await coro

    waits = delays or [0.0] * len(coros)
    return await asyncio.gather(
        *(one(c, d) for c, d in zip(coros, waits, strict=True)), return_exceptions=True
    )


SCRIPT_CALLS: Final = ("cmdstat_evalsha", "cmdstat_eval")


async def _script_calls(redis: Redis) -> int:
    """Script calls Redis has run so far (`INFO commandstats`; the commands a script runs
    are counted apart): the storm's count includes the appender's (`--rate 0` for none)."""
    stats = await redis.info("commandstats")
    return sum(int(stats[name]["calls"]) for name in SCRIPT_CALLS if name in stats)


async def storm(
    web_a: ParleyProcess,
    web_b: ParleyProcess,
    redis_url: str,
    tabs_n: int,
    conversations_n: int,
    concurrency: int,
    rate: float,
    profile: Path | None = None,
    ui_delay: bool = False,
) -> dict[str, Any]:
    token = mint("storm-user", ttl=3600)
    conversations = await _conversations(web_a, token, conversations_n)
    tabs = [Tab(conversations[i % conversations_n]) for i in range(tabs_n)]
    first = time.monotonic()
    opened = await _gather_bounded([t.join(web_a.port, token, None, 60) for t in tabs], concurrency)
    failed_open = sum(isinstance(r, BaseException) for r in opened)
    first_seconds = time.monotonic() - first
    redis = Redis.from_url(redis_url)
    events = EventLog(redis, 2000, 3600)
    stop = asyncio.Event()
    appender = asyncio.create_task(_append_until(events, conversations, rate, stop))
    await asyncio.sleep(1.0)
    queries_before = await asyncio.to_thread(postgres_queries_now, web_b)
    calls_before = await _script_calls(redis)
    cpu_before = procfs.cpu_seconds(web_b.pid)
    wait_before = procfs.run_queue_wait(web_b.pid)[0]
    lag_before = await asyncio.to_thread(worker_cost.loop_lag_buckets, web_b.url)
    own_before = time.process_time()
    if profile is not None:
        profiling.start(web_b.pid)
    killed = time.monotonic()
    web_a.send_signal(signal.SIGKILL)
    delays = [random.uniform(*UI_FIRST_RETRY) for _ in tabs] if ui_delay else None
    rejoined = await _gather_bounded(
        [t.join(web_b.port, token, t.last_seq, 30) for t in tabs], concurrency, delays
    )
    done = time.monotonic()
    cpu = procfs.cpu_seconds(web_b.pid) - cpu_before
    wait = procfs.run_queue_wait(web_b.pid)[0] - wait_before
    lag = worker_cost.over_run(
        lag_before, await asyncio.to_thread(worker_cost.loop_lag_buckets, web_b.url)
    )
    own_cpu = time.process_time() - own_before
    calls = await _script_calls(redis) - calls_before
    if profile is not None:
        profiling.stop(web_b.pid, profile)
    queries = await asyncio.to_thread(postgres_queries_now, web_b) - queries_before
    await asyncio.sleep(1.0)
    stop.set()
    appended = await appender
    await asyncio.sleep(1.0)  # the last events reach every tab
    heads = {c: int(await redis.get(keys.seq(c)) or 0) for c in conversations}
    await redis.aclose()
    failed = sum(isinstance(r, BaseException) for r in rejoined)
    times = sorted(t.rejoined_at - killed for t in tabs if t.rejoined_at > killed)
    behind = sum(1 for t in tabs if t.last_seq < heads[t.conversation])
    for t in tabs:
        if t.ws is not None:
            t.ws.abort()

    def pct(q: float) -> float | None:
        return round(times[min(int(q * len(times)), len(times) - 1)] * 1000, 1) if times else None

    return {
        "tabs": tabs_n,
        "conversations": conversations_n,
        "ui_delay": ui_delay,
        "failed_first_join": failed_open,
        "first_joins_seconds": round(first_seconds, 2),
        "failed_rejoin": failed,
        "storm_seconds": round(done - killed, 2),
        "rejoin_ms_p50": pct(0.5),
        "rejoin_ms_p99": pct(0.99),
        "postgres_queries_during_storm": queries,
        "redis_script_calls_during_storm": calls,
        "web_b_cpu_seconds": round(cpu, 2),
        "web_b_cpu_wait_seconds": round(wait, 2),
        "web_b_loop_lag_ms": {"p50": lag["p50_ms"], "p99": lag["p99_ms"]},
        "client_cpu_seconds": round(own_cpu, 2),
        "client_cpu_us_per_setup": round(own_cpu * 1e6 / len(times)) if times else None,
        "setups_with_join_per_web_core_s": round(len(times) / cpu) if cpu else None,
        "web_b_cpu_us_per_setup": round(cpu * 1e6 / len(times)) if times else None,
        "events_appended": appended,
        "tabs_with_a_gap_or_reset": sum(1 for t in tabs if t.gaps),
        "tabs_behind_the_head": behind,
        "error_frames": len(ERRORS),
        "first_error": ERRORS[0].decode(errors="replace") if ERRORS else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tabs", type=int, default=10_000)
    parser.add_argument("--conversations", type=int, default=1_000)
    parser.add_argument("--concurrency", type=int, default=200, help="set-ups in flight")
    parser.add_argument(
        "--rate", type=float, default=500, help="events appended per second during the storm"
    )
    parser.add_argument(
        "--ui-delay",
        action="store_true",
        help="each tab waits a random 250-500 ms before reconnecting, as the browser UI does",
    )
    parser.add_argument(
        "--asyncio",
        action="store_true",
        help="the tabs on asyncio's own event loop, not uvloop (as this bench ran before)",
    )
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--profile", type=Path, help="cProfile web B during the storm into this pstats file"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, bench_cluster(Path(tmp)) as cluster:
        env = {
            "PARLEY_LIMITS_MAX_CONNECTIONS_PER_USER": "1000000",
            "PARLEY_METRICS_LOOP_LAG_INTERVAL": f"{worker_cost.LAG_INTERVAL:g}",
        }
        profiled = profiling.env(args.profile.resolve()) if args.profile else {}
        webs = [
            cluster.process("web", start=False, **env),
            cluster.process("web", start=False, **env, **profiled),
        ]
        start_all(webs)
        run = asyncio.run if args.asyncio else run_loop
        result = run(
            storm(
                webs[0],
                webs[1],
                cluster.services.redis_url,
                args.tabs,
                args.conversations,
                args.concurrency,
                args.rate,
                args.profile,
                args.ui_delay,
            )
        )
    text = json.dumps(result, indent=1)
    print(text)
    if args.profile:
        print(profiling.report(args.profile))
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
