"""Append capacity of one Redis core against each primary of a three-primary Redis Cluster:
the same load, one shard at a time.

    .venv/bin/python -m bench.shard_capacity [--conversations 400] [--tokens 50] [--batch 64]
        [--conversation-slots 0] [--rounds 2]
    .venv/bin/python -m bench.shard_capacity --quota 0.03 --quota-period-ms 50
        --feeders-per-primary 1 [--generations 300] [--tps 10] [--seconds 6] [--no-replicas]

A 2-core machine cannot saturate three Redis processes at once (the clients need the cores
too), so each is measured alone under the same load and the cluster's capacity is their sum:
`--conversations` conversations whose keys live on the measured node (on the single Redis:
any; in the cluster: conversations picked so that their slot is one the measured primary
serves), each appending `--tokens` token events through the worker's own code
(`EventLog.append_piece` through the `Pipeliner`, `--batch` pieces in flight, a round of
every conversation per token, as a worker streaming many replies sends them), one subscriber
connection on the measured node draining every conversation's channel (SUBSCRIBE, or
SSUBSCRIBE in the cluster: a web process's bus). Redis's own accounting of the measured node
is read before and after (`INFO cpu`: user + sys, network included; `INFO commandstats`);
events per second per Redis core = 1e6 / (Redis CPU µs per event). The other nodes' CPU
meanwhile is printed too (the cluster bus and replication to the replicas).

`--conversation-slots N` runs it as `redis.conversation_slots = N` does (the conversations'
keys tagged `{c:ID mod N}`, so that they share N slots; 0: each its own): the worker's
pipeliner sends one `append_pieces` call per slot in a batch, so this shows what sharing
slots saves. The single Redis ignores the setting, as Parley does. Like for like: the same
`--conversations` per node (one shard's share of a cluster's conversations, e.g. 133 of 400),
the replica on both sides (one Redis with a replica against a primary, which has one), and
the same events per script call (`--conversation-slots 3`: one slot per primary, so a
primary gets the whole batch in one call as one Redis does). `--no-replicas` stops the
cluster's replicas first: then compare with one Redis alone. `--spread` adds a round with
thrice `--conversations` spread over all three primaries at once, as a real worker's batches
are (a batch's calls per slot then carry ≈ batch / slots events), the primaries' CPU summed.

`--saturate SHARE` measures the shards at saturation instead, all three at once: every
primary may run SHARE of each 50 ms (SIGSTOP/SIGCONT by PID from a process of the bench's
own, each Redis in its own third of the period), so that a 2-core machine's clients can offer
more than it can append. `--generations` streams per primary (each on a conversation the
primary serves) send `--tps` tokens a second through `--workers` pipeliners, coalesced as the
worker coalesces them (a stream's text joins its event still waiting; so at saturation a
worker's batch holds one event per stream, carrying more tokens, and a call per slot carries
its streams' events). Measured: one Redis, a one-primary cluster (its replica, N =
`--slots-per-primary` conversation slots) and a three-primary cluster (3 N slots, spread
evenly), after a second's warm-up and for `--seconds`: per primary its CPU per appended event,
also net of what it spends idle (its cron, the cluster bus: read for `--idle` seconds before
and subtracted, since a throttled node appends few events), events per call, tokens per
event, and how much of its share it used. A lone Redis stopped and continued by signals gets
more than its share on this VM, so one Redis and the one-primary cluster are offered more
(`--tps-alone`) to saturate as well; the per-event figures do not depend on it.

`--quota SHARE` does the same with exact CPU quotas instead of signals (bench/cpu_quota.py:
a cgroup of its own per Redis process, replicas too, named after the bench's PID and removed
at the end; cgroup v1 `cpu` or v2 `cpu.max`, and where neither is writable it says so and
stops): every node is "one small core", so three saturated primaries need little of the
machine and are compared with one Redis and one primary at the same `--tps` by the events a
second they append. Each primary's `cpu.stat` over the window proves it saturated (throttled
in ≈ every period it ran in); the bench's own CPU (the feeders) and the load average are
printed beside, and the tokens a second appended against those offered (the feeders kept
up). With replicas, the three primaries run once more with them stopped.
`--feeders-per-primary 1` spreads the `--workers` pipeliners over one process per primary,
as over worker processes (each pipeliner still carries its share of every primary's
streams): fed from this one process, three primaries at 3 % of a core used only 0.66 to 0.89
of their quotas while one used all of its, the process's event loop being too slow to
answer three nodes' batches at once on a busy machine; from three, each used ≈ all of it.

Starts its own `redis-server` processes on 127.0.0.1 and stops them by PID. A benchmark: it
never fails on a number.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import multiprocessing
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.crc import key_slot

from bench.cpu_quota import CpuQuotas, Group, Throttling
from bench.redis_append import MAX_EVENTS, TTL, _appends, _delta, _listen, _prepare, _redis_cpu
from protocol.parts import PartsBuilder
from server.app.config import RedisSettings, WorkerSettings
from server.dev import embedded
from server.generation.worker import OpenText, token_head
from server.redis import client, keys
from server.redis.eventlog import Appender, EventLog, Pipeliner
from tests.helpers import redis_cluster

THROTTLE_PERIOD = 0.05
"""`--saturate`: a Redis runs `--saturate` of every this many seconds."""
THROTTLE_SLOTS = 3
THROTTLER = (
    "import sys; from bench.shard_capacity import THROTTLE_PERIOD, _throttle; "
    "_throttle([int(p) for p in sys.argv[2:]], float(sys.argv[1]), THROTTLE_PERIOD)"
)
"""`_throttle` in a process of its own (started by `saturate`, stopped by its PID)."""


def _served(node: redis_cluster.Node) -> list[tuple[int, int]]:
    """The slot ranges `node` serves."""
    for line in node.cli("CLUSTER", "NODES").splitlines():
        parts = line.split()
        if "myself" in parts[2]:
            return [
                (int(low), int(high or low))
                for low, _, high in (span.partition("-") for span in parts[8:])
            ]
    return []


def conversations_on(ranges: list[tuple[int, int]] | None, n: int) -> list[uuid.UUID]:
    """`n` conversation ids whose slot is in `ranges` (None: any)."""
    chosen: list[uuid.UUID] = []
    for _ in range(n * 64 + 10_000):
        if len(chosen) == n:
            break
        conversation = uuid.uuid4()
        slot = key_slot(keys.seq(conversation).encode())
        if ranges is None or any(low <= slot <= high for low, high in ranges):
            chosen.append(conversation)
    return chosen


async def measure(
    settings: RedisSettings,
    node_url: str,
    others: list[str],
    conversations: list[uuid.UUID],
    opts: argparse.Namespace,
) -> dict[str, Any]:
    """One round on the node at `node_url` (the conversations all live there)."""
    redis = await client.opened(settings)
    node = Redis.from_url(node_url)
    watched = [Redis.from_url(url) for url in others]
    try:
        events = EventLog(redis, MAX_EVENTS, TTL)
        message_ids = [uuid.uuid4() for _ in conversations]
        await _prepare(redis, conversations, message_ids)
        ready = asyncio.Event()
        drain = asyncio.create_task(_listen(node_url, conversations, ready, settings.cluster))
        await ready.wait()
        await node.config_resetstat()
        before = await _redis_cpu(node)
        others_before = [(await _redis_cpu(r))[0] for r in watched]
        await _appends(events, conversations, message_ids, opts.tokens, opts.batch)
        after = await _redis_cpu(node)
        others_after = [(await _redis_cpu(r))[0] for r in watched]
        await asyncio.sleep(0.5)
        drain.cancel()
        received = await drain
        count = len(conversations) * opts.tokens
        result = _delta(before, after, count)
        calls = result["commands"].get("evalsha", {}).get("calls", 0)
        result["events_per_call"] = round(count / calls, 2) if calls else None
        result["calls_per_event"] = {
            name: round(c["calls"] / count, 3) for name, c in result["commands"].items()
        }
        result["received"] = received
        result["others_cpu_us_per_event"] = [
            round((a - b) * 1e6 / count, 2)
            for a, b in zip(others_after, others_before, strict=True)
        ]
        return result
    finally:
        await _close(redis, conversations, [node, *watched])


async def measure_spread(
    settings: RedisSettings,
    primaries: dict[str, list[tuple[int, int]]],
    conversations: list[uuid.UUID],
    opts: argparse.Namespace,
) -> dict[str, Any]:
    """One round with the conversations spread over every primary, as a worker's batches
    are in a real cluster (a batch's pieces go to all primaries, so a call per slot carries
    ≈ batch / slots events): the primaries' CPU summed, per event."""
    redis = await client.opened(settings)
    nodes = {url: Redis.from_url(url) for url in primaries}
    drains = []
    try:
        events = EventLog(redis, MAX_EVENTS, TTL)
        message_ids = [uuid.uuid4() for _ in conversations]
        await _prepare(redis, conversations, message_ids)
        for url, ranges in primaries.items():
            mine = [
                c
                for c in conversations
                if any(low <= key_slot(keys.seq(c).encode()) <= high for low, high in ranges)
            ]
            ready = asyncio.Event()
            drains.append(asyncio.create_task(_listen(url, mine, ready, True)))
            await ready.wait()
        for node in nodes.values():
            await node.config_resetstat()
        before = [await _redis_cpu(node) for node in nodes.values()]
        await _appends(events, conversations, message_ids, opts.tokens, opts.batch)
        after = [await _redis_cpu(node) for node in nodes.values()]
        await asyncio.sleep(0.5)
        for drain in drains:
            drain.cancel()
        received = sum([await drain for drain in drains])
        count = len(conversations) * opts.tokens
        shares = [_delta(b, a, count) for b, a in zip(before, after, strict=True)]
        total = sum(share["redis_cpu_us_per_event"] for share in shares)
        calls = sum(share["commands"].get("evalsha", {}).get("calls", 0) for share in shares)
        return {
            "redis_cpu_us_per_event": round(total, 2),
            "primaries_us_per_event": [share["redis_cpu_us_per_event"] for share in shares],
            "events_per_call": round(count / calls, 2) if calls else None,
            "received": received,
        }
    finally:
        await _close(redis, conversations, list(nodes.values()))


# --- at saturation ---------------------------------------------------------------------------


class _Stream:
    """One generation streaming `--tps` tokens a second, coalesced as the worker coalesces
    them (`worker.OpenText`): text arriving while its event waits in the pipeliner joins it,
    so a generation has at most one event waiting and one in flight, however slow Redis is."""

    def __init__(self, conversation: uuid.UUID, message_id: uuid.UUID) -> None:
        self.conversation = conversation
        self.message_id = message_id
        self.index = 0
        self.acked = 0
        self.open: OpenText | None = None
        self.parts = PartsBuilder(conversation, message_id)
        self.head = token_head(conversation, message_id)
        self.appender: Appender | None = None
        """Queues its events, as the worker's generation queues them (made by `start`)."""

    def start(self, events: EventLog) -> Appender:
        self.appender = events.appender(
            self.conversation, self.message_id, functools.partial(getattr, self, "acked")
        )
        return self.appender

    def acknowledged(self, piece: asyncio.Future[Any]) -> None:
        if not piece.cancelled() and piece.exception() is None:
            self.acked = max(self.acked, int(piece.result()))


@dataclass
class _Tally:
    """What the streams did while measured, per node."""

    tokens: dict[str, int]
    events: dict[str, int]
    outstanding: set[asyncio.Future[Any]] = field(default_factory=set)

    def counted(self, node: str, text: OpenText, piece: asyncio.Future[Any]) -> None:
        if not piece.cancelled() and piece.exception() is None and int(piece.result()) > 0:
            self.events[node] = self.events.get(node, 0) + 1
            self.tokens[node] = self.tokens.get(node, 0) + text.text.count(" w")


async def _stream_tokens(
    events: EventLog,
    pipeliner: Pipeliner,
    streams: list[tuple[_Stream, str]],
    tps: float,
    tally: _Tally,
    stop: asyncio.Event,
) -> None:
    """Every stream's tokens, `tps` a second each, in ticks of 5 ms, until `stop`."""
    loop = asyncio.get_running_loop()
    start, owed = loop.time(), 0.0
    sent = 0
    appenders = [stream.start(events) for stream, _ in streams]
    while not stop.is_set():
        await asyncio.sleep(0.005)
        owed = (loop.time() - start) * tps * len(streams)
        for _ in range(int(owed) - sent):
            stream, node = streams[sent % len(streams)]
            appender = appenders[sent % len(streams)]
            sent += 1
            if stream.open is not None and stream.open.join(0, " w"):
                continue
            open_text = stream.open = OpenText(0, " w", stream.parts, stream.head)
            stream.index += 1
            piece = appender.append(pipeliner, open_text, stream.index)
            piece.add_done_callback(stream.acknowledged)
            tally.outstanding.add(piece)
            piece.add_done_callback(tally.outstanding.discard)
            piece.add_done_callback(functools.partial(tally.counted, node, open_text))


def _throttle(pids: list[int], share: float, period: float) -> None:
    """Let each of the processes `pids` run `share` of every `period` seconds (SIGSTOP,
    SIGCONT), as a CPU quota would, each in its own part of the period (so that they do not
    compete for the two cores): a Redis given a fraction of a core saturates at a load the
    clients of a 2-core machine can offer. Runs in a child process until terminated, at a
    real-time priority where allowed (it sleeps nearly all the time; at an ordinary one, on
    a busy machine, it wakes late and the processes run several times their share)."""
    with contextlib.suppress(OSError):
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    step = period / max(THROTTLE_SLOTS, len(pids))  # the same rhythm for one Redis as for three
    start = time.monotonic()
    while True:
        for i, pid in enumerate(pids):
            _sleep_until(start + i * step)
            os.kill(pid, signal.SIGCONT)
            _sleep_until(start + i * step + share * period)
            os.kill(pid, signal.SIGSTOP)
        start += period


def _sleep_until(deadline: float) -> None:
    time.sleep(max(0.0, deadline - time.monotonic()))


def _release(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


async def saturate(
    settings: RedisSettings,
    primaries: Mapping[str, list[tuple[int, int]] | None],
    watched: list[str],
    opts: argparse.Namespace,
    pids: dict[str, int],
    quotas: CpuQuotas | None = None,
    seeds: dict[str, RedisSettings] | None = None,
) -> dict[str, Any]:
    """`--generations` streams per primary in `primaries` (url → the slot ranges it serves;
    None: one Redis), through the worker's pipeliner (its default `append_interval`) at
    `--tps` tokens a second each, every primary allowed `--saturate` of a core (or, given
    `quotas`, every node, replicas too, `--quota` of a core through its cgroup): per primary,
    after a second's warm-up and for `--seconds`, its CPU per appended event, the events per
    script call it received, the events and tokens a second it appended, with a quota how
    often it was throttled; the bench's own CPU meanwhile (the feeders). `seeds`: each
    primary is a cluster of its own, reached through these settings (else `settings`)."""
    of = seeds or dict.fromkeys(primaries, settings)
    clients = {seed.url: await client.opened(seed) for seed in of.values()}
    nodes = {url: Redis.from_url(url) for url in [*primaries, *watched]}
    drains = []
    streams: list[tuple[_Stream, str]] = []
    for url, ranges in primaries.items():
        mine = conversations_on(ranges, opts.generations)
        streams.extend((_Stream(c, uuid.uuid4()), url) for c in mine)
    try:
        for seed, redis in clients.items():
            theirs = [s for s, node in streams if of[node].url == seed]
            await _prepare(redis, [s.conversation for s in theirs], [s.message_id for s in theirs])
        for url in primaries:
            ready = asyncio.Event()
            mine = [s.conversation for s, node in streams if node == url]
            drains.append(asyncio.create_task(_listen(url, mine, ready, settings.cluster)))
            await ready.wait()
        # what each node spends doing nothing (its cron, the cluster bus): counted against
        # the few events a throttled node appends, it would weigh far more than at full speed
        idle_before = {url: (await _redis_cpu(node))[0] for url, node in nodes.items()}
        idle_began = time.monotonic()
        await asyncio.sleep(opts.idle)
        idle = {
            url: ((await _redis_cpu(node))[0] - idle_before[url]) / (time.monotonic() - idle_began)
            for url, node in nodes.items()
        }
        share = opts.quota or opts.saturate
        throttled = [pids[url] for url in primaries]
        groups: dict[str, Group] = {}
        throttler = None
        if quotas is not None:
            groups = {
                url: quotas.limit(f"{opts.phase}-{_port(url)}", pids[url], share)
                for url in [*primaries, *watched]
            }
        else:
            throttler = subprocess.Popen(  # noqa: ASYNC220 (started once, before measuring)
                [sys.executable, "-c", THROTTLER, str(share), *map(str, throttled)]
            )
        feeding = _Feeding(settings, streams, opts, seeds)
        await feeding.start()
        try:
            await asyncio.sleep(1.0)  # every stream under way, batches at their size
            for node in nodes.values():
                await node.config_resetstat()
            before = {url: await _redis_cpu(node) for url, node in nodes.items()}
            stats_before = {url: group.stat() for url, group in groups.items()}
            bench_before, load_before = _own_cpu(), _loadavg()
            feeding.measuring.set()
            began = time.monotonic()
            await asyncio.sleep(opts.seconds)
            after = {url: await _redis_cpu(node) for url, node in nodes.items()}
            wall = time.monotonic() - began
            bench = (_own_cpu() - bench_before) / wall
            stats = {url: group.stat().since(stats_before[url]) for url, group in groups.items()}
        finally:
            snapshot, feeders_cpu = await feeding.stop()
            if throttler is not None:
                throttler.terminate()
                throttler.wait(5)
                _release(throttled)
            if quotas is not None:
                quotas.release()
        feeders = bench + feeders_cpu / wall if feeding.processes else bench
        for drain in drains:
            drain.cancel()
        received = sum([await drain for drain in drains])
        return {
            "primaries": [
                _saturated(url, before[url], after[url], snapshot, wall, share, idle[url])
                | _throttling(stats.get(url))
                for url in primaries
            ],
            "others_cpu_share": [
                round((after[url][0] - before[url][0]) / wall, 3) for url in watched
            ],
            "others_throttling": [_throttling(stats.get(url)) for url in watched],
            "received": received,
            "seconds": round(wall, 2),
            "feeders_cpu_share": round(feeders, 3),
            "feeder_processes": len(feeding.processes),
            "offered_tokens_per_s": round(opts.generations * opts.tps),
            "loadavg": [load_before, _loadavg()],
        }
    finally:
        for seed, redis in clients.items():
            await _close(redis, [s.conversation for s, n in streams if of[n].url == seed], [])
        for node in nodes.values():
            await node.aclose()


@dataclass(frozen=True)
class _Feed:
    """What one feeder runs: per pipeliner of its own, its streams (conversation, message
    id, node)."""

    url: str
    cluster: bool
    tags: int
    pipeliners: list[list[tuple[uuid.UUID, uuid.UUID, str]]]
    tps: float


class _Feeding:
    """The streams' tokens sent through `--workers` pipeliners: all in this process, or
    (`--feeders-per-primary K`) spread over K processes per primary, as over worker
    processes. Each pipeliner carries its share of every primary's streams either way, so a
    primary's calls carry as many events. `measuring` starts their count."""

    def __init__(
        self,
        settings: RedisSettings,
        streams: list[tuple[_Stream, str]],
        opts: argparse.Namespace,
        seeds: dict[str, RedisSettings] | None = None,
    ) -> None:
        dealt = [
            [(s.conversation, s.message_id, node) for s, node in mine]
            for mine in _dealt(streams, opts.workers, opts.per_node or seeds is not None)
        ]
        primaries = len({node for _, node in streams})
        count = min(max(opts.feeders_per_primary * primaries, 1), len(dealt))
        self.feeds = [
            _Feed(settings.url, settings.cluster, opts.tags, dealt[i::count], opts.tps)
            for i in range(count)
        ]
        if seeds is not None:  # separate clusters: each its own feeder, as fed alone
            self.feeds = [
                _Feed(seeds[node].url, True, opts.tags, dealt[i : i + opts.workers], opts.tps)
                for i, node in zip(
                    range(0, len(dealt), opts.workers),
                    dict.fromkeys(n for _, n in streams),
                    strict=True,
                )
            ]
        context = multiprocessing.get_context("spawn")
        self.measuring = context.Event()
        self.stopping = context.Event()
        self.results: Any = context.Queue()
        self.processes: list[Any] = []
        self.tasks: list[asyncio.Task[dict[str, Any]]] = []
        if opts.feeders_per_primary:
            signals = (self.measuring, self.stopping, self.results)
            self.processes = [
                context.Process(target=_feeder, args=(feed, *signals), daemon=True)
                for feed in self.feeds
            ]

    async def start(self) -> None:
        if not self.processes:
            feed = self.feeds[0]
            self.tasks = [asyncio.create_task(_feed(feed, self.measuring, self.stopping))]
            return
        for process in self.processes:
            process.start()
        for _ in self.processes:  # each has its streams under way
            await asyncio.to_thread(self.results.get, timeout=120)

    async def stop(self) -> tuple[_Tally, float]:
        """Every feeder stopped, once its batches are answered: what they appended while
        measured, and the CPU seconds they used meanwhile."""
        self.stopping.set()
        if self.tasks:
            counts = await asyncio.gather(*self.tasks)
        else:
            counts = [await asyncio.to_thread(self.results.get, timeout=120) for _ in self.feeds]
            for process in self.processes:
                await asyncio.to_thread(process.join, 30)
        tally = _Tally({}, {})
        for count in counts:
            for node, tokens in count["tokens"].items():
                tally.tokens[node] = tally.tokens.get(node, 0) + tokens
            for node, events in count["events"].items():
                tally.events[node] = tally.events.get(node, 0) + events
        return tally, sum(count["cpu"] for count in counts)


def _feeder(feed: _Feed, measuring: Any, stopping: Any, results: Any) -> None:
    """A feeder process (started by `_Feeding`, stopped by `stopping`)."""
    keys.share_slots(feed.tags)
    results.put("ready")
    results.put(asyncio.run(_feed(feed, measuring, stopping)))


async def _feed(feed: _Feed, measuring: Any, stopping: Any) -> dict[str, Any]:
    """Send `feed`'s streams until `stopping`, counting from `measuring` on."""
    redis = await client.opened(RedisSettings(url=feed.url, cluster=feed.cluster))
    try:
        events = EventLog(redis, MAX_EVENTS, TTL)
        dealt = [[(_Stream(c, m), node) for c, m, node in mine] for mine in feed.pipeliners]
        pipeliners = [Pipeliner(redis, WorkerSettings().append_interval) for _ in dealt]
        for pipeliner in pipeliners:
            pipeliner.start()
        tally = _Tally({}, {})
        stop = asyncio.Event()
        producers = [
            asyncio.create_task(_stream_tokens(events, pipeliner, mine, feed.tps, tally, stop))
            for pipeliner, mine in zip(pipeliners, dealt, strict=True)
        ]
        while not measuring.is_set():
            await asyncio.sleep(0.01)
        tally.tokens.clear()
        tally.events.clear()
        began = _own_cpu()
        while not stopping.is_set():
            await asyncio.sleep(0.01)
        counted = {"tokens": dict(tally.tokens), "events": dict(tally.events)}
        cpu = _own_cpu() - began
        stop.set()
        await asyncio.gather(*producers)
        # every batch answered before the pipeliner stops: cancelled while one is in
        # flight, redis-py may swallow the cancellation (and the stop wait forever)
        if tally.outstanding:
            await asyncio.wait(list(tally.outstanding), timeout=60)
        for pipeliner in pipeliners:
            await pipeliner.stop()
        return counted | {"cpu": cpu}
    finally:
        await redis.aclose()


def _dealt(
    streams: list[tuple[_Stream, str]], workers: int, per_node: bool
) -> list[list[tuple[_Stream, str]]]:
    """The streams dealt out to `workers` pipeliners, or (`per_node`) to `workers`
    pipeliners per node, each sending to one node only."""
    if not per_node:
        return [streams[i::workers] for i in range(workers)]
    nodes = dict.fromkeys(node for _, node in streams)
    return [
        [s for s in streams if s[1] == node][i::workers] for node in nodes for i in range(workers)
    ]


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


def _own_cpu() -> float:
    """CPU seconds this process (the feeders: the streams, the pipeliners, the subscribers)
    has used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _throttling(stat: Throttling | None) -> dict[str, Any]:
    """A node's cgroup counters over the window (none without `--quota`)."""
    if stat is None:
        return {}
    return {
        "periods": stat.periods,
        "throttled_periods": stat.throttled,
        "throttled_share": round(stat.throttled_share, 3),
        "throttled_ms": round(stat.throttled_us / 1000),
    }


def _saturated(
    url: str,
    before: tuple[float, dict[str, tuple[int, int]]],
    after: tuple[float, dict[str, tuple[int, int]]],
    tally: _Tally,
    wall: float,
    share: float,
    idle: float,
) -> dict[str, Any]:
    """One primary's figures over the measured window (its events: XADDs it ran); `net`:
    less what it spends idle (`idle` CPU seconds a second)."""
    count = after[1].get("xadd", (0, 0))[0] - before[1].get("xadd", (0, 0))[0]
    result = _delta(before, after, max(count, 1))
    calls = result["commands"].get("evalsha", {}).get("calls", 0)
    cpu = after[0] - before[0]
    net = (cpu - idle * wall) * 1e6 / max(count, 1)
    return {
        "node": url.removeprefix("redis://"),
        "redis_cpu_us_per_event": result["redis_cpu_us_per_event"],
        "net_us_per_event": round(net, 2),
        "command_us_per_event": result["command_us_per_event"],
        "commands": result["commands"],
        "net_events_per_core_per_s": round(1e6 / net) if net > 0 else None,
        "idle_cpu_share": round(idle, 4),
        "events_per_redis_core_per_s": result["events_per_redis_core_per_s"],
        "events_per_call": round(count / calls, 1) if calls else None,
        "events_per_s": round(count / wall),
        "tokens_per_event": round(tally.tokens.get(url, 0) / max(tally.events.get(url, 0), 1), 2),
        "tokens_per_s": round(tally.tokens.get(url, 0) / wall),
        "busy": round(cpu / (share * wall), 2),
        "cpu_share": round(cpu / wall, 4),
        "calls_per_event": {
            n: round(c["calls"] / max(count, 1), 3) for n, c in result["commands"].items()
        },
    }


async def _close(redis: Any, conversations: list[uuid.UUID], nodes: list[Redis]) -> None:
    """Forget the round's conversations (the next round starts afresh) and close the
    clients."""
    async with redis.pipeline(transaction=False) as pipe:
        for c in conversations:
            pipe.delete(keys.generation(c), keys.seq(c), keys.log(c), keys.persisted(c))
        await pipe.execute()
    for node in nodes:
        await node.aclose()
    await redis.aclose()


async def _replicate(replica_url: str, primary_url: str) -> None:
    """Make the Redis at `replica_url` a replica of the one at `primary_url` (as each primary
    of the test cluster has one), once it has synced."""
    primary = Redis.from_url(primary_url)
    replica = Redis.from_url(replica_url)
    try:
        port = int(primary_url.rsplit(":", 1)[1].split("/")[0])
        await replica.replicaof("127.0.0.1", port)
        for _ in range(100):
            if (await replica.info("replication")).get("master_link_status") == "up":
                return
            await asyncio.sleep(0.1)
    finally:
        await primary.aclose()
        await replica.aclose()


def best(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The least disturbed round (others on the machine only add to Redis's CPU time)."""
    return min(rounds, key=lambda r: r["redis_cpu_us_per_event"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=400)
    parser.add_argument("--tokens", type=int, default=50)
    parser.add_argument("--batch", type=int, default=64, help="pieces in flight")
    parser.add_argument("--conversation-slots", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2, help="rounds per node (best kept)")
    parser.add_argument(
        "--no-replicas",
        action="store_true",
        help="stop the cluster's replicas before measuring (compare with one Redis alone)",
    )
    parser.add_argument(
        "--spread",
        action="store_true",
        help="then 3 × --conversations spread over all the primaries at once (their CPU summed)",
    )
    parser.add_argument(
        "--saturate",
        type=float,
        metavar="SHARE",
        help="instead: every primary at saturation, allowed SHARE of a core (e.g. 0.06): one "
        "Redis, a one-primary cluster, then all three primaries of a cluster at once",
    )
    parser.add_argument(
        "--quota",
        type=float,
        metavar="SHARE",
        help="instead: as --saturate, each Redis process (replicas too) in a cgroup of its own "
        "allowed exactly SHARE of a core (e.g. 0.05), and the three primaries once more "
        "without their replicas",
    )
    parser.add_argument(
        "--feeder-priority",
        type=int,
        default=10,
        help="--quota: run the bench (the feeders) at this much less nice, where allowed, so "
        "that other work on the machine does not starve them (the Redis nodes are capped)",
    )
    parser.add_argument(
        "--quota-period-ms", type=float, default=100, help="--quota: the cgroup's period"
    )
    parser.add_argument(
        "--generations", type=int, default=300, help="--saturate: streams per primary"
    )
    parser.add_argument("--tps", type=float, default=40, help="--saturate: tokens/s per stream")
    parser.add_argument(
        "--tps-alone",
        type=float,
        default=40,
        help="--saturate: tokens/s per stream on one Redis and the one-primary cluster (a lone "
        "Redis throttled by signals gets more than its share here: fed more, it saturates too)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=3,
        help="--saturate: pipeliners (workers' batches in flight at once), the streams dealt out",
    )
    parser.add_argument(
        "--feeders-per-primary",
        type=int,
        default=0,
        help="--saturate/--quota: spread the --workers pipeliners over this many processes "
        "per primary (at least one pipeliner each; 0: all in this process)",
    )
    parser.add_argument(
        "--three-alone",
        action="store_true",
        help="--quota: then three one-primary clusters at once, each fed alone (the machine's "
        "share of the gap between one primary and three)",
    )
    parser.add_argument(
        "--per-node",
        action="store_true",
        help="--saturate/--quota: --workers pipeliners per primary, each sending to it alone",
    )
    parser.add_argument("--seconds", type=float, default=6, help="--saturate: measured window")
    parser.add_argument(
        "--idle", type=float, default=2, help="--saturate: seconds each node's idle CPU is read"
    )
    parser.add_argument(
        "--slots-per-primary",
        type=int,
        default=4,
        help="--saturate: conversation_slots per primary, placed evenly (0: the default layout)",
    )
    parser.add_argument("--out", type=Path)
    opts = parser.parse_args()
    results: dict[str, Any] = {"options": vars(opts) | {"out": None}}
    if opts.quota:
        quotas, how = CpuQuotas.found(round(opts.quota_period_ms * 1000))
        if quotas is None:
            print(f"--quota needs a cgroup cpu controller this process can write: {how}")
            return
        print(f"CPU quotas through the {how}")
        # stopped by SIGTERM, it still moves its Redis processes out and removes the groups
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        with contextlib.suppress(OSError):  # the feeders, not the machine's others, get a core
            os.setpriority(os.PRIO_PROCESS, 0, -opts.feeder_priority)
        try:
            results |= run_saturated(opts, quotas)
        finally:
            quotas.close()
    elif opts.saturate:
        results |= run_saturated(opts)
    if opts.quota or opts.saturate:
        report_saturated(results)
        if opts.out:
            opts.out.write_text(json.dumps(results, indent=1))
        return
    with tempfile.TemporaryDirectory(prefix="parley-shards-") as tmp:
        single = embedded.start_redis(Path(tmp) / "single", persist=False)
        replica = embedded.start_redis(Path(tmp) / "replica", persist=False)
        try:
            chosen = conversations_on(None, opts.conversations)
            settings = RedisSettings(url=single.url)
            rounds = [
                asyncio.run(measure(settings, single.url, [], chosen, opts))
                for _ in range(opts.rounds)
            ]
            results["single"] = best(rounds)
            asyncio.run(_replicate(replica.url, single.url))
            rounds = [
                asyncio.run(measure(settings, single.url, [replica.url], chosen, opts))
                for _ in range(opts.rounds)
            ]
            results["single_with_replica"] = best(rounds)
        finally:
            replica.stop()
            single.stop()
        nodes = redis_cluster.start(Path(tmp) / "cluster")
        keys.share_slots(opts.conversation_slots)
        try:
            settings = RedisSettings(url=nodes.url, cluster=True)
            if opts.no_replicas:  # like one Redis without a replica: nothing to feed
                primaries = nodes.primaries()
                for node in nodes.nodes:
                    if node not in primaries:
                        node.kill()
            everyone = [f"redis://{n.address}" for n in nodes.nodes if n.alive()]
            results["shards"] = []
            for primary in nodes.primaries():
                url = f"redis://{primary.address}"
                chosen = conversations_on(_served(primary), opts.conversations)
                others = [u for u in everyone if u != url]
                rounds = [
                    asyncio.run(measure(settings, url, others, chosen, opts))
                    for _ in range(opts.rounds)
                ]
                slots = len({key_slot(keys.seq(c).encode()) for c in chosen})
                results["shards"].append(best(rounds) | {"node": primary.address, "slots": slots})
            if opts.spread:
                served = {f"redis://{p.address}": _served(p) for p in nodes.primaries()}
                chosen = conversations_on(None, 3 * opts.conversations)
                rounds = [
                    asyncio.run(measure_spread(settings, served, chosen, opts))
                    for _ in range(opts.rounds)
                ]
                results["spread"] = best(rounds)
        finally:
            nodes.stop()
    report(results)
    if opts.out:
        opts.out.write_text(json.dumps(results, indent=1))


def run_saturated(opts: argparse.Namespace, quotas: CpuQuotas | None = None) -> dict[str, Any]:
    """One Redis, a one-primary cluster and a three-primary cluster, each primary saturated
    (`saturate`), the same streams and the same slots per primary on each; with `quotas`
    (`--quota`) and replicas, the three primaries once more with their replicas stopped."""
    results: dict[str, Any] = {}
    per_primary = opts.slots_per_primary
    # signals give a lone Redis more than its share here, so it is fed more; a quota is exact
    alone = opts if quotas else argparse.Namespace(**vars(opts) | {"tps": opts.tps_alone})
    with tempfile.TemporaryDirectory(prefix="parley-shards-") as tmp:
        keys.share_slots(0)  # ignored on one Redis, as Parley ignores it
        single = embedded.start_redis(Path(tmp) / "single", persist=False)
        replica = embedded.start_redis(Path(tmp) / "replica", persist=False)
        try:
            watched = []
            if not opts.no_replicas:
                asyncio.run(_replicate(replica.url, single.url))
                watched = [replica.url]
            settings = RedisSettings(url=single.url)
            pids = {single.url: single.pid, replica.url: replica.pid}
            fed = argparse.Namespace(**vars(alone) | {"phase": "single", "tags": 0})
            results["single"] = asyncio.run(
                saturate(settings, {single.url: None}, watched, fed, pids, quotas)
            )
        finally:
            replica.stop()
            single.stop()
        for primaries in (1, 3):
            directory = Path(tmp) / f"cluster-{primaries}"
            if primaries == 1:
                nodes = redis_cluster.start_one_shard(directory, 0 if opts.no_replicas else 1)
            else:
                nodes = redis_cluster.start(directory)
            try:
                keys.share_slots(per_primary * primaries)  # its tags' slots spread evenly
                if opts.no_replicas:
                    _stop_replicas(nodes)
                name = f"cluster_{primaries}"
                fed = argparse.Namespace(
                    **vars(opts if primaries > 1 else alone)
                    | {"phase": name, "tags": per_primary * primaries}
                )
                results[name] = _saturate_cluster(nodes, fed, quotas)
                if primaries > 1 and quotas and not opts.no_replicas:
                    _stop_replicas(nodes)
                    fed.phase = name = "cluster_3_no_replicas"
                    results[name] = _saturate_cluster(nodes, fed, quotas)
            finally:
                nodes.stop()
        if opts.three_alone:
            results["three_alone"] = _saturate_three_alone(Path(tmp), opts, quotas)
    return results


def _saturate_three_alone(
    directory: Path, opts: argparse.Namespace, quotas: CpuQuotas | None
) -> dict[str, Any]:
    """Three one-primary clusters fed at once, each by its own feeder: what the machine does
    to a lone primary's figures when as many nodes and feeders run beside it as beside each
    of three primaries (so what of the gap is the cluster, and what is the machine)."""
    clusters = [
        redis_cluster.start_one_shard(directory / f"alone-{i}", 0 if opts.no_replicas else 1)
        for i in range(3)
    ]
    try:
        keys.share_slots(opts.slots_per_primary)
        seeds: dict[str, RedisSettings] = {}
        served: dict[str, list[tuple[int, int]]] = {}
        pids: dict[str, int] = {}
        for nodes in clusters:
            primary = nodes.primaries()[0]
            url = f"redis://{primary.address}"
            seeds[url] = RedisSettings(url=nodes.url, cluster=True)
            served[url] = _served(primary)
            pids |= {f"redis://{n.address}": n.proc.pid for n in nodes.nodes if n.alive()}
        watched = [url for url in pids if url not in served]
        fed = argparse.Namespace(
            **vars(opts) | {"phase": "three_alone", "tags": opts.slots_per_primary}
        )
        settings = seeds[next(iter(seeds))]
        return asyncio.run(saturate(settings, served, watched, fed, pids, quotas, seeds))
    finally:
        for nodes in clusters:
            nodes.stop()


def _stop_replicas(nodes: redis_cluster.SixNodes) -> None:
    primaries = nodes.primaries()
    for node in [n for n in nodes.nodes if n not in primaries]:
        node.kill()


def _saturate_cluster(
    nodes: redis_cluster.SixNodes, opts: argparse.Namespace, quotas: CpuQuotas | None
) -> dict[str, Any]:
    served = {f"redis://{p.address}": _served(p) for p in nodes.primaries()}
    alive = {f"redis://{n.address}": n.proc.pid for n in nodes.nodes if n.alive()}
    watched = [url for url in alive if url not in served]
    settings = RedisSettings(url=nodes.url, cluster=True)
    return asyncio.run(saturate(settings, served, watched, opts, alive, quotas))


def report_saturated(results: dict[str, Any]) -> None:
    opts = results["options"]
    quota = opts["quota"]
    period = opts["quota_period_ms"]
    limit = (
        f"a quota of {quota:.0%} of a core each per {period:g} ms"
        if quota
        else f"{opts['saturate']:.0%}"
    )
    alone = "" if quota else f" ({opts['tps_alone']:g} on one Redis or one primary)"
    print(
        f"every primary at saturation ({limit}), "
        f"{opts['generations']} streams per primary at {opts['tps']:g} tokens/s{alone} over "
        f"{opts['workers']} workers' pipeliners, "
        f"{opts['slots_per_primary']} conversation slots per primary, "
        f"{'no replicas' if opts['no_replicas'] else 'a replica each'}"
    )
    totals, rates = {}, {}
    for name in ("single", "cluster_1", "cluster_3", "cluster_3_no_replicas", "three_alone"):
        run = results.get(name)
        if run is None:
            continue
        for p in run["primaries"]:
            print(
                f"{name:10} {p['node']:16} {p['events_per_s']:>7,} events/s, "
                f"{p['redis_cpu_us_per_event']:6.2f} µs/event, "
                f"{p['net_us_per_event']:6.2f} net of idle ({p['idle_cpu_share']:.2%} of a core) "
                f"→ {p['net_events_per_core_per_s']:>7,} events/s per core; "
                f"{p['events_per_call']} events per call, {p['tokens_per_event']} tokens per "
                f"event, CPU {p['cpu_share']:.3f} of a core = {p['busy']:.2f} of its share"
                + _throttled(p)
                + f"; {p['tokens_per_s']:,} of {run['offered_tokens_per_s']:,} tokens/s offered"
            )
        print(f"{'':10} others' CPU share meanwhile: {run['others_cpu_share']}")
        if quota:
            print(
                f"{'':10} others throttled: "
                f"{[o.get('throttled_share') for o in run['others_throttling']]}; "
                f"feeders' CPU {run['feeders_cpu_share']:.2f} of a core; "
                f"loadavg {run['loadavg'][0]} → {run['loadavg'][1]}"
            )
        totals[name] = sum(p["net_events_per_core_per_s"] for p in run["primaries"])
        rates[name] = sum(p["events_per_s"] for p in run["primaries"])
        print(f"{'':10} {rates[name]:,} events/s appended in all, {run['received']:,} received")
    one, three, single = totals["cluster_1"], totals["cluster_3"], totals["single"]
    print(
        f"per core (net of idle), summed over the primaries: "
        f"3 shards / 1 shard {three / one:.2f}×, "
        f"3 shards / one Redis {three / single:.2f}×"
    )
    if quota:
        for name in ("cluster_3", "cluster_3_no_replicas", "three_alone"):
            if name in rates:
                print(
                    f"events/s appended, {name} / cluster_1 "
                    f"{rates[name] / rates['cluster_1']:.2f}×, / one Redis "
                    f"{rates[name] / rates['single']:.2f}×"
                )


def _throttled(primary: dict[str, Any]) -> str:
    if "periods" not in primary:
        return ""
    return (
        f", throttled in {primary['throttled_periods']} of {primary['periods']} periods "
        f"({primary['throttled_share']:.0%})"
    )


def report(results: dict[str, Any]) -> None:
    def line(name: str, r: dict[str, Any]) -> str:
        return (
            f"{name:18} Redis CPU {r['redis_cpu_us_per_event']:6.2f} µs/event "
            f"(in commands {r['command_us_per_event']:5.2f}), "
            f"{r['events_per_redis_core_per_s']:>7,} events/s per core, "
            f"{r['events_per_call']} events per script call, {r['received']:,} received"
        )

    print(line("single Redis", results["single"]))
    print(f"{'':18} commands per event: {results['single']['calls_per_event']}")
    replicated = results["single_with_replica"]
    print(line("single + replica", replicated))
    print(f"{'':18} the replica meanwhile, µs/event: {replicated['others_cpu_us_per_event']}")
    total = 0
    for shard in results["shards"]:
        print(line(f"shard {shard['node']}", shard))
        print(f"{'':18} its conversations on {shard['slots']} slots")
        print(f"{'':18} other nodes meanwhile, µs/event: {shard['others_cpu_us_per_event']}")
        print(f"{'':18} commands per event: {shard['calls_per_event']}")
        total += shard["events_per_redis_core_per_s"]
    single = results["single"]["events_per_redis_core_per_s"]
    replicated_rate = replicated["events_per_redis_core_per_s"]
    spread = results.get("spread")
    if spread:
        factor = 3 * replicated["redis_cpu_us_per_event"] / spread["redis_cpu_us_per_event"]
        print(
            f"spread over 3 primaries: {spread['redis_cpu_us_per_event']:.2f} µs/event summed "
            f"({spread['primaries_us_per_event']}), {spread['events_per_call']} events per "
            f"script call, {spread['received']:,} received: 3 shards ≈ "
            f"{factor:.2f}× one Redis with a replica if evenly spread"
        )
    like = "one Redis alone" if results["options"]["no_replicas"] else "the one with a replica"
    print(
        f"3 shards, each at one core: {total:,} events/s = {total / single:.2f}× one Redis, "
        f"{total / replicated_rate:.2f}× one Redis with a replica (like for like: {like})"
    )


if __name__ == "__main__":
    main()
