"""Each conversation's event sequence in Redis: seq counter, event log, pub/sub channel.

Every change to a conversation is one Lua script (`scripts/*.lua`), so that taking the next
seq, appending the framed event to the log (a Stream whose entry id is the seq) and
PUBLISHing it happen as one atomic step. Frames arrive encoded without their seq; the script
splices `{"seq":N,` in front, and from then on every process forwards those exact bytes.

The conversation's Redis state (meta, seq, recent messages) is loaded from PostgreSQL on first
use and expires when idle; scripts answer `unloaded` when it is missing so the caller loads it
and tries again, rather than restarting seq at 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Final

import msgspec
from redis.asyncio import Redis

from protocol.frames import Conversation, Message
from server.redis import generations, keys, scripts
from server.redis.client import UNREACHABLE

UNLOADED: Final = -1
LOST: Final = -2
BEHIND: Final = -3
"""The seq counter went back below a seq Redis had acknowledged (a failover to a replica that
lacks the last events; scripts/lib_seq_floor.lua): raised, nothing appended."""
RETRY_FOR: Final = 60.0
RETRY_DELAYS: Final = (0.05, 0.1, 0.2, 0.5, 1.0)

log = logging.getLogger("parley.eventlog")

APPEND: Final = scripts.load("append", functions=["lib_append_event"])
APPEND_PIECE: Final = scripts.load("append_piece", functions=["lib_seq_floor"])
READ: Final = scripts.load("read")
LOAD: Final = scripts.load("load")
MARK_PERSISTED: Final = scripts.load("mark_persisted")
SET_META: Final = scripts.load("set_meta")
CACHE_HISTORY: Final = scripts.load("cache_history")

RECENT_KEPT: Final = 200
HISTORY_CACHED_BYTES: Final = 1 << 20
"""A persisted transcript larger than this (encoded) is read from PostgreSQL at every join
rather than kept in Redis."""


class CachedMeta(msgspec.Struct, frozen=True):
    """What Redis keeps of a conversation's row; `meta.last_seq` is read from the seq key."""

    owner: str
    meta: Conversation


class CachedHistory(msgspec.Struct, frozen=True):
    """A conversation's persisted transcript and the seq it covers (`history_seq`)."""

    seq: int
    messages: list[Message]


_meta_decoder: Final = msgspec.json.Decoder(CachedMeta)
_history_decoder: Final = msgspec.json.Decoder(CachedHistory)
_message_decoder: Final = msgspec.json.Decoder(Message)
_encoder: Final = msgspec.json.Encoder()


class EventLog:
    def __init__(self, redis: Redis, max_events: int, ttl: int) -> None:
        self.redis = redis
        self.max_events = max_events
        self.ttl = ttl
        self._append = APPEND.register(redis)
        self._append_piece = APPEND_PIECE.register(redis)
        self._read = READ.register(redis)
        self._load = LOAD.register(redis)
        self._set_meta = SET_META.register(redis)
        self._mark_persisted = MARK_PERSISTED.register(redis)
        self._cache_history = CACHE_HISTORY.register(redis)

    async def append(self, conversation: uuid.UUID, event: bytes) -> int:
        """Append an encoded event (without seq); return its seq, or UNLOADED."""
        seq = await self._append(
            **event_keys(conversation),
            frame=event,
            maxlen=self.max_events,
            ttl=self.ttl,
        )
        return int(seq)

    async def read(
        self, conversation: uuid.UUID, after: int
    ) -> tuple[int, list[tuple[int, bytes]]]:
        """The last seq assigned (UNLOADED when unknown) and the retained events after `after`."""
        head, entries = await self._read(
            seq_key=keys.seq(conversation),
            log_key=keys.log(conversation),
            first_id=f"{after + 1}-0",
        )
        return int(head), [(int(eid.split(b"-")[0]), fields[1]) for eid, fields in entries]

    async def head(self, conversation: uuid.UUID) -> int:
        value = await self.redis.get(keys.seq(conversation))
        return UNLOADED if value is None else int(value)

    async def meta(self, conversation: uuid.UUID) -> CachedMeta | None:
        raw = await self.redis.get(keys.meta(conversation))
        return None if raw is None else _meta_decoder.decode(raw)

    async def load(
        self,
        owner: str,
        meta: Conversation,
        last_seq: int,
        history_seq: int,
        history: Sequence[Message],
    ) -> None:
        """Seed Redis from PostgreSQL unless another process already did: the latest messages
        as context, and every user message id, so that a `say` repeating one is a duplicate
        however long ago it was said."""
        await self._load(
            meta_key=keys.meta(meta.id),
            seq_key=keys.seq(meta.id),
            recent_key=keys.recent(meta.id),
            persisted_key=keys.persisted(meta.id),
            said_key=keys.said(meta.id),
            meta=_encoder.encode(CachedMeta(owner, meta)),
            last_seq=last_seq,
            ttl=self.ttl,
            persisted=history_seq,
            said_ids=" ".join(str(m.id) for m in history if m.role == "user"),
            messages=[_encoder.encode(m) for m in history[-RECENT_KEPT:]],
        )

    async def mark_persisted(self, conversation: uuid.UUID, seq: int) -> None:
        """PostgreSQL holds every event up to `seq`: the log may trim them."""
        await self._mark_persisted(
            persisted_key=keys.persisted(conversation),
            log_key=keys.log(conversation),
            seq_key=keys.seq(conversation),
            history_key=keys.history(conversation),
            persisted=seq,
            ttl=self.ttl,
            maxlen=self.max_events,
        )

    async def history(self, conversation: uuid.UUID) -> CachedHistory | None:
        """The persisted transcript kept by `cache_history`, if it is still the latest (its
        seq is the one PostgreSQL is known to hold up to)."""
        persisted, raw = await self.redis.mget(
            keys.persisted(conversation), keys.history(conversation)
        )
        if persisted is None or raw is None:
            return None
        cached = _history_decoder.decode(raw)
        return cached if cached.seq == int(persisted) else None

    async def cache_history(
        self, conversation: uuid.UUID, seq: int, messages: list[Message]
    ) -> None:
        """Keep the transcript PostgreSQL holds up to `seq` for the next joins, unless a
        persist has moved on since it was read (or it is too large to keep)."""
        encoded = _encoder.encode(CachedHistory(seq, messages))
        if len(encoded) > HISTORY_CACHED_BYTES:
            return
        await self._cache_history(
            persisted_key=keys.persisted(conversation),
            history_key=keys.history(conversation),
            history=encoded,
            seq=str(seq),
            ttl=self.ttl,
        )

    async def set_meta(self, owner: str, meta: Conversation) -> None:
        await self._set_meta(
            meta_key=keys.meta(meta.id), meta=_encoder.encode(CachedMeta(owner, meta))
        )

    async def recent(self, conversation: uuid.UUID) -> list[Message] | None:
        """The latest finished messages, oldest first; None when the state is not loaded."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(keys.meta(conversation))
            pipe.lrange(keys.recent(conversation), 0, -1)
            loaded, items = await pipe.execute()
        if not loaded:
            return None
        return [_message_decoder.decode(item) for item in items]

    async def context(
        self, conversation: uuid.UUID
    ) -> tuple[list[Message] | None, CachedMeta | None]:
        """`recent` and `meta` in one round trip (a generation reads both to begin)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(keys.meta(conversation))
            pipe.lrange(keys.recent(conversation), 0, -1)
            raw, items = await pipe.execute()
        if raw is None:
            return None, None
        return [_message_decoder.decode(item) for item in items], _meta_decoder.decode(raw)

    async def forget(self, conversation: uuid.UUID) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(
                keys.meta(conversation),
                keys.recent(conversation),
                keys.log(conversation),
                keys.said(conversation),
                keys.history(conversation),
            )
            generations.clear(pipe, conversation)
            await pipe.execute()

    def append_piece(
        self,
        pipeliner: Pipeliner,
        conversation: uuid.UUID,
        event: bytes | Callable[[], bytes],
        message_id: uuid.UUID,
        index: int,
        floor: Callable[[], int] = lambda: 0,
    ) -> asyncio.Future[Any]:
        """Queue one event of a generation; the future gives its seq, 0 for a repeat,
        UNLOADED when the conversation's Redis state is gone, LOST when the generation's, or
        BEHIND when the seq counter is below `floor()` (the highest seq Redis acknowledged
        to the generation). The call is made when its batch is taken (see `Pipeliner.call`):
        an `event` given as a function is encoded then, and `floor()` counts every batch
        acknowledged before it."""
        c = str(conversation)  # formatted once for the five keys (this runs per token)

        def bind() -> scripts.Call:
            return self._append_piece.bind(
                **event_keys(c),
                gen_key=keys.generation(c),
                frame=event() if callable(event) else event,
                maxlen=self.max_events,
                ttl=self.ttl,
                message_id=str(message_id),
                piece=index,
                floor=floor(),
            )

        return pipeliner.call(bind)


def event_keys(conversation: uuid.UUID | str) -> dict[str, str]:
    """The keys of `append_event` (scripts/lib_append_event.lua), by name: every script that
    appends an event to the conversation takes them."""
    return {
        "seq_key": keys.seq(conversation),
        "log_key": keys.log(conversation),
        "channel": keys.channel(conversation),
        "persisted_key": keys.persisted(conversation),
    }


def encode(obj: Any) -> bytes:
    return _encoder.encode(obj)


class Pipeliner:
    """Sends script calls to Redis in pipelines: while one batch is in flight the next one
    gathers, so a worker streaming many replies pays one round trip per batch, not per token,
    and the calls of one conversation keep their order."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._queue: list[tuple[scripts.Call | Callable[[], scripts.Call], asyncio.Future[Any]]]
        self._queue = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="parley-pipeliner")

    async def stop(self) -> None:
        if self._task:
            while self._queue:
                await asyncio.sleep(0.01)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def call(self, call: scripts.Call | Callable[[], scripts.Call]) -> asyncio.Future[Any]:
        """Queue a call; one given as a function is made when its batch is taken, so what
        it sends may still grow while earlier batches are in flight."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((call, future))
        self._wake.set()
        return future

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            queued, self._queue = self._queue, []
            batch = [(c if isinstance(c, scripts.Call) else c(), f) for c, f in queued]
            if batch:
                await self._send(batch)
                # let the futures' callbacks run before the next batch's calls are made,
                # so that what they record (a generation's acknowledged seq) is counted there
                await asyncio.sleep(0)

    async def _send(self, batch: list[tuple[scripts.Call, asyncio.Future[Any]]]) -> None:
        """Send a batch, again and again while Redis is unreachable (every script the worker
        sends is idempotent), until RETRY_FOR seconds have passed."""
        deadline = asyncio.get_running_loop().time() + RETRY_FOR
        attempt = 0
        while True:
            try:
                results = await scripts.pipelined(self.redis, [call for call, _ in batch])
                break
            except UNREACHABLE as exc:
                if asyncio.get_running_loop().time() > deadline:
                    results = [exc] * len(batch)
                    break
                if attempt == 0:
                    log.warning("Redis unreachable (%s); holding %d calls", exc, len(batch))
                await asyncio.sleep(RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)])
                attempt += 1
            except Exception as exc:  # the batch fails, not the pipeliner every call waits on
                log.exception("a batch of %d calls failed", len(batch))
                results = [exc] * len(batch)
                break
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
