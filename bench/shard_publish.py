"""What a Redis Cluster shard spends per published frame and per appended event, against one
Redis: the raw PUBLISH / SPUBLISH of the same frame and the append path, side by side.

    .venv/bin/python -m bench.shard_publish [--conversations 400] [--tokens 100] [--rounds 3]

On one Redis (Debian's `redis-server` 7, as the cluster's nodes; the bundled embedded one is
too old for SPUBLISH), alone and then with a replica attached: PUBLISH, SPUBLISH, and the
appends through the worker's own code
(`EventLog.append_piece` through the `Pipeliner`, `--batch` pieces in flight, PUBLISH
inside the script). Then on one primary of a six-node cluster (three primaries, a replica
each), with conversations whose slot that primary serves, sharing one hash tag (as
`redis.conversation_slots` does, so that a call carries as many events as on one Redis):
SPUBLISH and the appends (SPUBLISH inside the script), its replica's CPU meanwhile; then the
same once the replica is stopped. Redis 7.0 sends every SPUBLISH over the cluster bus to the
shard's replicas (each a message with the bus's full header); on one Redis PUBLISH and
SPUBLISH only go into the replication stream if a replica is attached. One subscriber
connection drains every channel (SUBSCRIBE, or SSUBSCRIBE per slot). `INFO cpu` (user +
sys) before and after each round gives µs per event; rounds alternate, the least disturbed
is kept. Starts its own `redis-server` processes and stops them by PID; a benchmark, it
never fails on a number.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError

from bench.redis_append import MAX_EVENTS, TTL, _appends, _listen, _prepare, _redis_cpu, _tokens
from bench.shard_capacity import _served, conversations_on
from server.app.config import RedisSettings
from server.dev.embedded import free_port
from server.redis import client, keys
from server.redis.eventlog import EventLog
from tests.helpers import redis_cluster

Round = Callable[[list[uuid.UUID], list[uuid.UUID]], Coroutine[Any, Any, None]]
"""A round's work on (conversations, their generations' message ids)."""


async def _nothing(conversations: list[uuid.UUID], message_ids: list[uuid.UUID]) -> None:
    return None


async def _cpu(url: str) -> float:
    node = Redis.from_url(url)
    try:
        return (await _redis_cpu(node))[0]
    finally:
        await node.aclose()


def publishes(url: str, command: str, tokens: int, batch: int) -> Round:
    """Raw `command` (PUBLISH or SPUBLISH) of the framed tokens, pipelined on the node."""

    async def run(conversations: list[uuid.UUID], message_ids: list[uuid.UUID]) -> None:
        node = Redis.from_url(url)
        pipe = node.pipeline(transaction=False)
        for conversation, _, index, frame in _tokens(conversations, message_ids, tokens):
            framed = b'{"seq":%d,' % (index + 1) + frame[1:]
            pipe.execute_command(command, keys.channel(conversation), framed)
            if len(pipe) >= batch:
                await pipe.execute()
        await pipe.execute()
        await node.aclose()

    return run


def appends(settings: RedisSettings, tokens: int, batch: int) -> tuple[Round, Round]:
    """The conversations loaded as a `say` leaves them (not measured), then the token events
    through `EventLog.append_piece` and the `Pipeliner`."""

    async def prepare(conversations: list[uuid.UUID], message_ids: list[uuid.UUID]) -> None:
        redis = await client.opened(settings)
        try:
            await _prepare(redis, conversations, message_ids)
        finally:
            await redis.aclose()

    async def run(conversations: list[uuid.UUID], message_ids: list[uuid.UUID]) -> None:
        redis = await client.opened(settings)
        try:
            events = EventLog(redis, MAX_EVENTS, TTL)
            await _appends(events, conversations, message_ids, tokens, batch)
        finally:
            await redis.aclose()

    return prepare, run


async def measure(
    node_url: str,
    watched: list[str],
    conversations: list[uuid.UUID],
    tokens: int,
    sharded: bool,
    work: tuple[Round, Round],
) -> dict[str, Any]:
    """One round: Redis CPU per event on the node and on each `watched` node meanwhile."""
    prepare, body = work
    message_ids = [uuid.uuid4() for _ in conversations]
    await prepare(conversations, message_ids)
    ready = asyncio.Event()
    drain = asyncio.create_task(_listen(node_url, conversations, ready, sharded))
    await ready.wait()
    urls = [node_url, *watched]
    before = [await _cpu(url) for url in urls]
    await body(conversations, message_ids)
    after = [await _cpu(url) for url in urls]
    await asyncio.sleep(0.5)
    drain.cancel()
    received = await drain
    count = len(conversations) * tokens
    spent = [round((a - b) * 1e6 / count, 2) for a, b in zip(after, before, strict=True)]
    return {"us_per_event": spent[0], "watched_us_per_event": spent[1:], "received": received}


Variant = Callable[[], Coroutine[Any, Any, dict[str, Any]]]


def run_rounds(variants: dict[str, Variant], rounds: int) -> dict[str, Any]:
    """Each variant `rounds` times, in alternating order; the least disturbed kept."""
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    names = list(variants)
    for index in range(rounds):
        for name in names if index % 2 == 0 else list(reversed(names)):
            results[name].append(asyncio.run(variants[name]()))
    return {
        name: min(runs, key=lambda r: r["us_per_event"])
        | {"rounds": [r["us_per_event"] for r in runs]}
        for name, runs in results.items()
    }


def single_variants(url: str, watched: list[str], opts: argparse.Namespace) -> dict[str, Variant]:
    settings = RedisSettings(url=url)

    def variant(work: tuple[Round, Round], sharded: bool) -> Variant:
        def start() -> Coroutine[Any, Any, dict[str, Any]]:
            chosen = conversations_on(None, opts.conversations)
            return measure(url, watched, chosen, opts.tokens, sharded, work)

        return start

    return {
        "PUBLISH": variant((_nothing, publishes(url, "PUBLISH", opts.tokens, opts.batch)), False),
        "SPUBLISH": variant((_nothing, publishes(url, "SPUBLISH", opts.tokens, opts.batch)), True),
        "append": variant(appends(settings, opts.tokens, opts.batch), False),
    }


def shard_variants(
    nodes: redis_cluster.SixNodes, primary: redis_cluster.Node, opts: argparse.Namespace
) -> dict[str, Variant]:
    url = f"redis://{primary.address}"
    others = [f"redis://{n.address}" for n in nodes.nodes if n.alive() and n is not primary]
    settings = RedisSettings(url=nodes.url, cluster=True)
    served = _served(primary)
    tag = next(t for t in range(64) if _tag_on(t, served))

    def variant(work: tuple[Round, Round]) -> Variant:
        def start() -> Coroutine[Any, Any, dict[str, Any]]:
            chosen = [_with_tag(tag) for _ in range(opts.conversations)]
            return measure(url, others, chosen, opts.tokens, True, work)

        return start

    return {
        "SPUBLISH": variant((_nothing, publishes(url, "SPUBLISH", opts.tokens, opts.batch))),
        "append": variant(appends(settings, opts.tokens, opts.batch)),
    }


class Standalone:
    """A plain `redis-server` 7 on 127.0.0.1 (no cluster), stopped by its PID."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True)
        self.port = free_port()
        binary = shutil.which("redis-server") or "redis-server"
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--dir", str(directory), "--repl-diskless-sync-delay", "0"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            if asyncio.run(_answers(self.url)):
                return
            time.sleep(0.1)
        raise RuntimeError("redis-server did not start")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


async def _answers(url: str) -> bool:
    node = Redis.from_url(url)
    try:
        return bool(await node.ping())
    except (OSError, RedisConnectionError):
        return False
    finally:
        await node.aclose()


async def _replicate(replica: Standalone, primary: Standalone) -> None:
    """`replica` made a replica of `primary`, once its first sync is done."""
    node = Redis.from_url(replica.url)
    try:
        await node.replicaof("127.0.0.1", primary.port)
        for _ in range(100):
            if (await node.info("replication")).get("master_link_status") == "up":
                return
            await asyncio.sleep(0.1)
        raise RuntimeError("the replica did not sync")
    finally:
        await node.aclose()


SHARED_TAGS = 64
"""The conversations of the cluster rounds share one of this many hash tags (one slot)."""


def _tag_on(tag: int, served: list[tuple[int, int]]) -> bool:
    slot = key_slot(f"{keys.PREFIX}:{{c:{tag}}}".encode())
    return any(low <= slot <= high for low, high in served)


def _with_tag(tag: int) -> uuid.UUID:
    """A conversation id whose keys carry tag `tag` under `keys.share_slots(SHARED_TAGS)`."""
    while True:
        conversation = uuid.uuid4()
        if conversation.int % SHARED_TAGS == tag:
            return conversation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=400)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--batch", type=int, default=64, help="pieces in flight / pipeline")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (best kept)")
    parser.add_argument("--out", type=Path)
    opts = parser.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="parley-shard-publish-") as tmp:
        single = Standalone(Path(tmp) / "single")
        replica = Standalone(Path(tmp) / "replica")
        try:
            alone = single_variants(single.url, [], opts)
            results["one Redis"] = run_rounds(alone, opts.rounds)
            asyncio.run(_replicate(replica, single))
            fed = single_variants(single.url, [replica.url], opts)
            results["one Redis + replica"] = run_rounds(fed, opts.rounds)
        finally:
            replica.stop()
            single.stop()
        nodes = redis_cluster.start(Path(tmp) / "cluster")
        keys.share_slots(SHARED_TAGS)
        try:
            primary = nodes.primaries()[0]
            results["primary + replica"] = run_rounds(
                shard_variants(nodes, primary, opts), opts.rounds
            )
            for node in nodes.nodes:
                if node not in nodes.primaries():
                    node.kill()
            results["primary alone"] = run_rounds(shard_variants(nodes, primary, opts), opts.rounds)
        finally:
            nodes.stop()
    for where, variants in results.items():
        for name, r in variants.items():
            watched = r["watched_us_per_event"]
            busiest = f", busiest other node {max(watched):5.2f}" if watched else ""
            print(
                f"{where:20} {name:9} {r['us_per_event']:6.2f} µs/event{busiest} "
                f"(rounds {r['rounds']}), {r['received']:,} received"
            )
    if opts.out:
        opts.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
