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
from redis.exceptions import ResponseError
from redis.typing import StreamIdT

log = logging.getLogger("parley.streams")

Entry = tuple[bytes, dict[bytes, bytes]]
"""A stream entry: its id and its fields."""

MAX_PENDING: Final = 100


class Pending(msgspec.Struct, frozen=True):
    """An entry delivered to `consumer` and not acknowledged for `idle_ms`."""

    entry_id: bytes
    consumer: str
    idle_ms: int


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
            await self._recreate_if_missing(exc)
            return []
        return [
            entry
            for _, entries in cast(list[tuple[bytes, list[Entry]]], reply or [])
            for entry in entries
        ]

    async def ack(self, entry_id: bytes) -> None:
        """The entry is done with: acknowledge and delete it, in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.xack(self.stream, self.group, entry_id)
        pipe.xdel(self.stream, entry_id)
        await pipe.execute()

    async def pending(self, count: int = MAX_PENDING) -> list[Pending]:
        """The oldest `count` entries delivered and not acknowledged, by any consumer."""
        try:
            reply: list[dict[str, Any]] = await self.redis.xpending_range(
                self.stream, self.group, "-", "+", count
            )
        except ResponseError as exc:
            await self._recreate_if_missing(exc)
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
            await self._recreate_if_missing(exc)
            return []
        return cast(list[Entry], reply)

    async def autoclaim(self, min_idle_ms: int, count: int = MAX_PENDING) -> list[Entry]:
        """Take over up to `count` entries pending with any consumer for `min_idle_ms`."""
        try:
            reply = await self.redis.xautoclaim(
                self.stream, self.group, self.consumer, min_idle_ms, "0-0", count=count
            )
        except ResponseError as exc:
            await self._recreate_if_missing(exc)
            return []
        return cast(list[Entry], reply[1])  # Redis 7 adds a third element (deleted ids)

    async def _recreate_if_missing(self, exc: ResponseError) -> None:
        """Redis lost its data (restarted empty): the group must be made again."""
        if "NOGROUP" not in str(exc):
            raise exc
        log.warning("%s consumer group missing; creating it again", self.stream)
        await self.ensure()
