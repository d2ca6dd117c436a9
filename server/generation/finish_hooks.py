"""The `finish` hook: every ended turn reported to the host application at least once.

The worker queues one entry per turn on the `parley:hooks:finish` Stream as soon as the turn
is finished (`enqueue`). A `FinishSender` in every worker process reads it through the
`finish-senders` consumer group and POSTs it. An entry whose call failed stays pending; it is
tried again once it has been idle for a back-off that grows with its age (1 s, up to 30 s),
by whichever sender looks first, so a sender that died loses nothing. An entry still failing
`hooks.finish_give_up` seconds after it was queued goes to the dead-letter stream. The
`webhook-id` is the reply's message id, the same on every try, so the receiver dedupes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from datetime import datetime
from typing import Final, Literal

import msgspec
from redis.asyncio import Redis

from protocol import frames as f
from server.app.config import HooksSettings
from server.app.hooks import FINISH_TIMEOUT, HookFailed, Hooks, timed
from server.redis import keys
from server.redis.client import UNREACHABLE, is_cluster
from server.redis.deadletter import DeadLetters, Malformed, Poisoned
from server.redis.streams import ConsumerGroup, Entry, consumer_name, entry_ms
from server.redis.turns import HookData

log = logging.getLogger("parley.hooks")

Status = Literal["complete", "cancelled", "error", "length"]
Watchers = Literal["delivered", "watchers_left_during", "no_watchers"]

MIN_BACKOFF: Final = 1.0
MAX_BACKOFF: Final = 30.0
LOOK_EVERY: Final = 1.0
KEPT: Final = 100_000
"""The queue keeps about this many entries while the endpoint is down."""
STATUS: Final[dict[f.DoneReason, Status]] = {
    "stop": "complete",
    "length": "length",
    "content_filter": "complete",
    "tool_calls": "complete",
    "cancelled": "cancelled",
    "error": "error",
}
"""Every `done` reason's status: the four the hook promises (the reason itself is sent too)."""


class Timings(msgspec.Struct, frozen=True, kw_only=True):
    started_at: datetime
    finished_at: datetime
    first_token_ms: float | None = None
    duration_ms: float


class FinishEvent(msgspec.Struct, frozen=True, kw_only=True):
    """The `finish` hook's payload (docs/hooks.md)."""

    type: Literal["finish"] = "finish"
    conversation: uuid.UUID
    user: str
    message_id: uuid.UUID
    user_message_id: uuid.UUID | None
    replaces: uuid.UUID | None
    status: Status
    reason: f.DoneReason | None = None
    """The turn's `done` reason, finer than `status` (`content_filter`, `tool_calls`); None
    only in an entry queued by a version that did not send it."""
    error: str | None
    code: str | None
    model: str
    usage: f.Usage | None
    timings: Timings
    watchers: Watchers
    data: HookData


def watchers(at_start: int, at_end: int) -> Watchers:
    """Whether a tab saw the turn end, from the conversation channel's subscriber count
    (PUBSUB NUMSUB: web processes with a tab joined) at the start and at the end."""
    if at_end > 0:
        return "delivered"
    return "watchers_left_during" if at_start > 0 else "no_watchers"


async def subscribers(redis: Redis, conversation: uuid.UUID) -> int:
    """0 when Redis cannot say: the count only describes, it decides nothing."""
    try:
        channel = keys.channel(conversation)
        if is_cluster(redis):  # a shard channel: counted on the primary owning its slot
            node = redis.get_node_from_key(channel)  # type: ignore[attr-defined]
            reply = await redis.pubsub_shardnumsub(channel, target_nodes=node)
        else:
            reply = await redis.pubsub_numsub(channel)
    except UNREACHABLE:
        return 0
    return int(reply[0][1]) if reply else 0


async def enqueue(redis: Redis, event: FinishEvent) -> None:
    try:
        await redis.xadd(
            keys.FINISH_HOOKS, {"event": msgspec.json.encode(event)}, maxlen=KEPT, approximate=True
        )
    except UNREACHABLE as exc:
        log.warning("cannot queue the finish hook of %s: %s", event.message_id, exc)


def backoff(age: float) -> float:
    return min(max(age / 4, MIN_BACKOFF), MAX_BACKOFF)


class FinishSender:
    def __init__(self, redis: Redis, hooks: Hooks, settings: HooksSettings) -> None:
        self.redis = redis
        self.hooks = hooks
        self.settings = settings
        self.group = ConsumerGroup(redis, keys.FINISH_HOOKS, keys.FINISH_SENDERS, consumer_name())
        self.dead_letters = DeadLetters(redis)
        self.sent = 0
        self._stopping = False

    def stop(self) -> None:
        """Finish the calls in hand, then return from `run`."""
        self._stopping = True

    async def run(self) -> None:
        await self.group.ensure()
        looked = 0.0
        while not self._stopping:
            try:
                if time.monotonic() - looked > LOOK_EVERY:
                    looked = time.monotonic()
                    await self._retry_pending()
                entries = await self.group.read(32, 500)
            except UNREACHABLE as exc:
                log.warning("cannot read finish hooks (%s); retrying", exc)
                await asyncio.sleep(1.0)
                continue
            await self._send_all(entries)

    async def _send_all(self, entries: list[Entry]) -> None:
        if entries:
            await asyncio.gather(*(self._send(entry_id, fields) for entry_id, fields in entries))

    async def _retry_pending(self) -> None:
        now_ms = time.time() * 1000
        due = [
            p.entry_id
            for p in await self.group.pending()
            if p.idle_ms
            >= 1000
            * max(
                backoff((now_ms - entry_ms(p.entry_id)) / 1000),
                FINISH_TIMEOUT if p.consumer != self.group.consumer else 0,
            )
        ]
        if due:
            await self._send_all(await self.group.claim(due, int(MIN_BACKOFF * 1000)))

    async def _send(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        body = fields.get(b"event")
        age = time.time() - entry_ms(entry_id) / 1000
        try:
            if body is None:
                raise Malformed("not a finish hook entry")
            event = msgspec.json.decode(body, type=FinishEvent)
            await self._post(body, event)
        except (HookFailed, Malformed, msgspec.DecodeError) as exc:
            if isinstance(exc, HookFailed) and age < self.settings.finish_give_up:
                log.info("finish hook %s not delivered yet (%s)", entry_id.decode(), exc)
                return  # stays pending; tried again after its back-off
            await self.dead_letters.bury(
                keys.FINISH_HOOKS, keys.FINISH_SENDERS, entry_id, fields, Poisoned(exc, 1)
            )
            return
        self.sent += 1
        with contextlib.suppress(*UNREACHABLE):
            await self.group.ack(entry_id)

    async def _post(self, body: bytes, event: FinishEvent) -> None:
        with timed("finish"):
            url = self.settings.finish_url
            await self.hooks.post(url, msgspec.Raw(body), str(event.message_id), FINISH_TIMEOUT)
