"""Redis Stream consumer groups: how a worker takes turns from `parley:turns` and a
persister takes finished turns from `parley:persist`.

Each entry goes to one consumer of the group and stays pending until the consumer
acknowledges it (`ack`, which also deletes it: the streams are queues, not logs). Entries
pending with a consumer that died are claimed by another (`claim` by id, `autoclaim` by idle
time). A group that disappears because Redis restarted empty (`NOGROUP`) is created again by
whichever call finds it missing, which then answers as if the stream were empty.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from typing import Any, Final, cast

import msgspec
from redis.asyncio import Redis
from redis.exceptions import NoScriptError, ResponseError
from redis.typing import KeyT, StreamIdT

from server.redis.client import is_cluster
from server.redis.scripts import Call, raise_if_unreachable

log = logging.getLogger("parley.streams")

Entry = tuple[bytes, dict[bytes, bytes]]
"""A stream entry: its id and its fields."""

MAX_PENDING: Final = 100
IDLE_BLOCK_MS: Final = 100
"""When a read cannot wait on every shard at once (fewer free slots than shards, or a
cluster, where a blocking read spans one slot) and found every shard empty, how long it
waits on one of them before looking at them all again (Redis wakes a blocked read that
times out only about every 100 ms anyway)."""


class Pending(msgspec.Struct, frozen=True):
    """An entry delivered to `consumer` and not acknowledged for `idle_ms`."""

    entry_id: bytes
    consumer: str
    idle_ms: int


def entry_ms(entry_id: bytes) -> int:
    """When Redis added the entry, in its clock's milliseconds (an entry id's first part)."""
    return int(entry_id.partition(b"-")[0])


def consumer_name() -> str:
    """This process's name within a group: unique per host and process."""
    return f"{socket.gethostname()}-{os.getpid()}"


class ConsumerGroup:
    def __init__(self, redis: Redis, stream: str, group: str, consumer: str) -> None:
        self.redis = redis
        self.stream = stream
        self.group = group
        self.consumer = consumer

    async def ensure(self) -> None:
        """Create the group (and the stream) unless it exists; it starts at the beginning."""
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read(self, count: int, block_ms: int) -> list[Entry]:
        """Up to `count` entries no consumer has had yet, waiting up to `block_ms` for one."""
        try:
            reply = await self.redis.xreadgroup(
                self.group, self.consumer, {self.stream: ">"}, count=count, block=block_ms
            )
        except ResponseError as exc:
            await self.recreate_if_missing(exc)
            return []
        return [
            entry
            for _, entries in cast(list[tuple[bytes, list[Entry]]], reply or [])
            for entry in entries
        ]

    async def ack(self, *entry_ids: bytes) -> None:
        """The entries are done with: acknowledge and delete them, in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xack(self.stream, self.group, *entry_ids)
            pipe.xdel(self.stream, *entry_ids)
            await pipe.execute()

    async def ack_after(self, calls: Sequence[Call], entry_ids: Sequence[bytes]) -> list[Call]:
        """Run the script `calls`, then acknowledge and delete the entries, in one pipeline
        (on a cluster, one per node): the calls whose script Redis did not know, not run
        (`scripts.pipelined` loads and runs them). Another error of a call is its own
        affair; one of the acknowledgement raises."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for call in calls:
                await call.run(pipe)
            pipe.xack(self.stream, self.group, *entry_ids)
            pipe.xdel(self.stream, *entry_ids)
            results = list(await pipe.execute(raise_on_error=False))
        raise_if_unreachable(self.redis, results)
        failed = next((r for r in results[len(calls) :] if isinstance(r, Exception)), None)
        if failed is not None:
            raise failed
        unknown = zip(calls, results, strict=False)
        return [call for call, result in unknown if isinstance(result, NoScriptError)]

    async def pending(self, count: int = MAX_PENDING) -> list[Pending]:
        """The oldest `count` entries delivered and not acknowledged, by any consumer."""
        try:
            reply: list[dict[str, Any]] = await self.redis.xpending_range(
                self.stream, self.group, "-", "+", count
            )
        except ResponseError as exc:
            await self.recreate_if_missing(exc)
            return []
        return [
            Pending(item["message_id"], item["consumer"].decode(), item["time_since_delivered"])
            for item in reply
        ]

    async def claim(self, entry_ids: Sequence[bytes], min_idle_ms: int) -> list[Entry]:
        """Take over entries still idle for `min_idle_ms`; one deleted meanwhile comes back
        with no fields."""
        ids: list[StreamIdT] = [*entry_ids]
        try:
            reply = await self.redis.xclaim(
                self.stream, self.group, self.consumer, min_idle_ms, ids
            )
        except ResponseError as exc:
            await self.recreate_if_missing(exc)
            return []
        return cast(list[Entry], reply)

    async def autoclaim(self, min_idle_ms: int, count: int = MAX_PENDING) -> list[Entry]:
        """Take over up to `count` entries pending with any consumer for `min_idle_ms`."""
        try:
            reply = await self.redis.xautoclaim(
                self.stream, self.group, self.consumer, min_idle_ms, "0-0", count=count
            )
        except ResponseError as exc:
            await self.recreate_if_missing(exc)
            return []
        return cast(list[Entry], reply[1])  # Redis 7 adds a third element (deleted ids)

    async def recreate_if_missing(self, exc: ResponseError) -> None:
        """Redis lost its data (restarted empty): the group must be made again."""
        if "NOGROUP" not in str(exc):
            raise exc
        log.warning("%s consumer group missing; creating it again", self.stream)
        await self.ensure()


class Shards:
    """The consumer groups of every shard of one queue, read by one loop.

    A read asks every shard for at most its share of the free slots (with fewer free slots
    than shards, one each for the next shards in turn, until one has an entry), so the
    entries of a busy shard are taken as soon as slots are free, never held up by reads of
    empty shards that reserved them. On one Redis with a slot free for each shard a read is
    one blocking `XREADGROUP` over all the shards' streams; otherwise (in a cluster each
    shard has its own slot, and a read of several is CROSSSLOT) non-blocking reads sweep the
    shards (in a cluster one pipeline per sweep: each node's share in one round trip), and
    only when all were empty does a short blocking read wait on one of them.
    """

    def __init__(self, groups: Sequence[ConsumerGroup]) -> None:
        self.groups = list(groups)
        self._by_stream = {group.stream.encode(): group for group in self.groups}
        self._clustered = bool(self.groups) and is_cluster(self.groups[0].redis)
        self._next = 0

    async def ensure(self) -> None:
        for group in self.groups:
            await group.ensure()

    async def read(self, free: int, block_ms: int) -> list[tuple[ConsumerGroup, Entry]]:
        """At most `free` entries in all, waiting up to `block_ms` for one (about
        IDLE_BLOCK_MS when the shards cannot all be waited on at once)."""
        shards = len(self.groups)
        count = max(free // shards, 1)
        if free >= shards and not self._clustered:
            return await self._read_together(self.groups, count, block_ms)
        step = min(free, shards)
        for _ in range(0, shards, step):
            picked = [self.groups[(self._next + i) % shards] for i in range(step)]
            self._next = (self._next + step) % shards
            found = await self._read_once(picked, count)
            if found:
                return found
        waiting = self.groups[self._next]
        self._next = (self._next + 1) % shards
        entries = await waiting.read(count, min(block_ms, IDLE_BLOCK_MS))
        return [(waiting, entry) for entry in entries]

    async def _read_once(
        self, picked: list[ConsumerGroup], count: int
    ) -> list[tuple[ConsumerGroup, Entry]]:
        if self._clustered:
            return await self._read_each(picked, count)
        return await self._read_together(picked, count, None)

    async def _read_together(
        self, picked: list[ConsumerGroup], count: int, block_ms: int | None
    ) -> list[tuple[ConsumerGroup, Entry]]:
        """One XREADGROUP of the streams of `picked` (all on one Redis)."""
        redis, first = picked[0].redis, picked[0]
        streams: dict[KeyT, StreamIdT] = {group.stream: ">" for group in picked}
        try:
            reply = await redis.xreadgroup(
                first.group, first.consumer, streams, count=count, block=block_ms
            )
        except ResponseError as exc:
            for group in picked:
                await group.recreate_if_missing(exc)
            return []
        return [
            (self._by_stream[stream], entry)
            for stream, entries in cast(list[tuple[bytes, list[Entry]]], reply or [])
            for entry in entries
        ]

    async def _read_each(
        self, picked: list[ConsumerGroup], count: int
    ) -> list[tuple[ConsumerGroup, Entry]]:
        """A non-blocking XREADGROUP of each of `picked` (on a cluster), in one pipeline."""
        async with picked[0].redis.pipeline(transaction=False) as pipe:
            for group in picked:
                pipe.xreadgroup(group.group, group.consumer, {group.stream: ">"}, count=count)
            replies = list(await pipe.execute(raise_on_error=False))
        raise_if_unreachable(picked[0].redis, replies)
        found: list[tuple[ConsumerGroup, Entry]] = []
        for group, reply in zip(picked, replies, strict=True):
            if isinstance(reply, ResponseError):
                await group.recreate_if_missing(reply)
                continue
            if isinstance(reply, BaseException):
                raise reply
            found += [(group, entry) for _, entries in reply or [] for entry in entries]
        return found
