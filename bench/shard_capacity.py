"""Append capacity of one Redis core against each primary of a three-primary Redis Cluster:
the same load, one shard at a time.

    .venv/bin/python -m bench.shard_capacity [--conversations 400] [--tokens 50] [--batch 64]
        [--conversation-slots 0] [--rounds 2]

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

Starts its own `redis-server` processes on 127.0.0.1 and stops them by PID. A benchmark: it
never fails on a number.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import uuid
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.crc import key_slot

from bench.redis_append import MAX_EVENTS, TTL, _appends, _delta, _listen, _prepare, _redis_cpu
from server.app.config import RedisSettings
from server.dev import embedded
from server.redis import client, keys
from server.redis.eventlog import EventLog
from tests.helpers import redis_cluster


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
        async with redis.pipeline(transaction=False) as pipe:  # the next round starts afresh
            for c in conversations:
                pipe.delete(keys.generation(c), keys.seq(c), keys.log(c), keys.persisted(c))
            await pipe.execute()
        for r in (node, *watched):
            await r.aclose()
        await redis.aclose()


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
        async with redis.pipeline(transaction=False) as pipe:
            for c in conversations:
                pipe.delete(keys.generation(c), keys.seq(c), keys.log(c), keys.persisted(c))
            await pipe.execute()
        for node in nodes.values():
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
    parser.add_argument("--out", type=Path)
    opts = parser.parse_args()
    results: dict[str, Any] = {"options": vars(opts) | {"out": None}}
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
