"""Each conversation's event sequence in Redis: seq counter, event log, pub/sub channel.

Every change to a conversation is one Lua script, so that taking the next seq, appending the
framed event to the log (a Stream whose entry id is the seq) and PUBLISHing it happen as one
atomic step. Frames arrive encoded without their seq; the script splices `{"seq":N,` in front,
and from then on every process forwards those exact bytes.

The conversation's Redis state (meta, seq, recent messages) is loaded from PostgreSQL on first
use and expires when idle; scripts answer `unloaded` when it is missing so the caller loads it
and tries again, rather than restarting seq at 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Sequence
from typing import Any, Final

import msgspec
from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError

from protocol import keys
from protocol.frames import Conversation, Message

UNLOADED: Final = -1
LOST: Final = -2
RETRY_FOR: Final = 60.0
RETRY_DELAYS: Final = (0.05, 0.1, 0.2, 0.5, 1.0)

log = logging.getLogger("parley.eventlog")

# The log keeps the last `maxlen` events, and never trims an event PostgreSQL does not have
# yet (past `persisted`): a tab joining with the persisted history must find the rest here.
# The persisted key shares the conversation's hash tag, so it lives on the same cluster slot.
APPEND_FUNCTION: Final = """
local function append(seq_key, log_key, channel, frame, maxlen, ttl)
  local seq = redis.call('INCR', seq_key)
  local framed = '{"seq":' .. seq .. ',' .. string.sub(frame, 2)
  local keep = seq - tonumber(maxlen) + 1
  local persisted = redis.call('GET', (string.gsub(seq_key, ':seq$', ':persisted')))
  if persisted and tonumber(persisted) + 1 < keep then keep = tonumber(persisted) + 1 end
  if keep < 1 then keep = 1 end
  local ok = pcall(redis.call, 'XADD', log_key, 'MINID', '~', keep, seq .. '-0', 'f', framed)
  if not ok then
    redis.call('DEL', log_key)
    redis.call('XADD', log_key, seq .. '-0', 'f', framed)
  end
  redis.call('PUBLISH', channel, framed)
  redis.call('EXPIRE', log_key, ttl)
  redis.call('EXPIRE', seq_key, ttl)
  return seq
end
"""

APPEND_SCRIPT: Final = (
    APPEND_FUNCTION
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
return append(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3])
"""
)

# A generation's events carry an index; a retried call (the connection broke before the reply)
# finds its index already recorded in the generation hash and appends nothing twice. A missing
# generation hash (Redis lost its data, whoever reloaded the conversation since) answers LOST:
# the worker must republish the turn before anything else of it is appended.
# KEYS: seq log channel gen   ARGV: frame maxlen ttl message_id index gen_ttl
_APPEND_PIECE: Final = (
    APPEND_FUNCTION
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HGET', KEYS[4], 'message_id') ~= ARGV[4] then return -2 end
local last = tonumber(redis.call('HGET', KEYS[4], 'piece') or '-1')
if last >= tonumber(ARGV[5]) then return 0 end
redis.call('HSET', KEYS[4], 'piece', ARGV[5])
return append(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3])
"""
)

_READ: Final = """
local head = redis.call('GET', KEYS[1])
if not head then return {-1, {}} end
return {tonumber(head), redis.call('XRANGE', KEYS[2], ARGV[1], '+')}
"""

# KEYS: meta seq recent persisted said
# ARGV: meta last_seq ttl history_seq n_recent recent... said_id...
_LOAD: Final = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local ttl = tonumber(ARGV[3])
redis.call('SET', KEYS[4], ARGV[4], 'EX', ttl)
redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl)
local seq = tonumber(redis.call('GET', KEYS[2]) or '0')
if seq < tonumber(ARGV[2]) then seq = tonumber(ARGV[2]) end
redis.call('SET', KEYS[2], seq, 'EX', ttl)
redis.call('DEL', KEYS[3])
local last_recent = 5 + tonumber(ARGV[5])
for i = 6, last_recent do redis.call('RPUSH', KEYS[3], ARGV[i]) end
if last_recent >= 6 then redis.call('EXPIRE', KEYS[3], ttl) end
for i = last_recent + 1, #ARGV do redis.call('SADD', KEYS[5], ARGV[i]) end
if #ARGV > last_recent then redis.call('EXPIRE', KEYS[5], ttl) end
return 1
"""

# KEYS: persisted log seq   ARGV: seq ttl maxlen
_MARK_PERSISTED: Final = """
local current = tonumber(redis.call('GET', KEYS[1]) or '-1')
local persisted = tonumber(ARGV[1])
if persisted <= current then return 0 end
redis.call('SET', KEYS[1], persisted, 'EX', ARGV[2])
local keep = tonumber(redis.call('GET', KEYS[3]) or '0') - tonumber(ARGV[3]) + 1
if persisted + 1 < keep then keep = persisted + 1 end
if keep > 1 then redis.call('XTRIM', KEYS[2], 'MINID', '~', keep) end
return 1
"""

_SET_META: Final = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'KEEPTTL')
return 1
"""

RECENT_KEPT: Final = 200


class CachedMeta(msgspec.Struct, frozen=True):
    """What Redis keeps of a conversation's row; `meta.last_seq` is read from the seq key."""

    owner: str
    meta: Conversation


_meta_decoder: Final = msgspec.json.Decoder(CachedMeta)
_message_decoder: Final = msgspec.json.Decoder(Message)
_encoder: Final = msgspec.json.Encoder()


class EventLog:
    def __init__(self, redis: Redis, max_events: int, ttl: int) -> None:
        self.redis = redis
        self.max_events = max_events
        self.ttl = ttl
        self._append = redis.register_script(APPEND_SCRIPT)
        self._append_piece = redis.register_script(_APPEND_PIECE)
        self._read = redis.register_script(_READ)
        self._load = redis.register_script(_LOAD)
        self._set_meta = redis.register_script(_SET_META)
        self._mark_persisted = redis.register_script(_MARK_PERSISTED)

    async def append(self, conversation: uuid.UUID, event: bytes) -> int:
        """Append an encoded event (without seq); return its seq, or UNLOADED."""
        seq = await self._append(
            keys=[keys.seq(conversation), keys.log(conversation), keys.channel(conversation)],
            args=[event, self.max_events, self.ttl],
        )
        return int(seq)

    async def read(
        self, conversation: uuid.UUID, after: int
    ) -> tuple[int, list[tuple[int, bytes]]]:
        """The last seq assigned (UNLOADED when unknown) and the retained events after `after`."""
        head, entries = await self._read(
            keys=[keys.seq(conversation), keys.log(conversation)], args=[f"{after + 1}-0"]
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
        recent = history[-RECENT_KEPT:]
        await self._load(
            keys=[
                keys.meta(meta.id),
                keys.seq(meta.id),
                keys.recent(meta.id),
                keys.persisted(meta.id),
                keys.said(meta.id),
            ],
            args=[
                _encoder.encode(CachedMeta(owner, meta)),
                last_seq,
                self.ttl,
                history_seq,
                len(recent),
                *(_encoder.encode(m) for m in recent),
                *(str(m.id) for m in history if m.role == "user"),
            ],
        )

    async def mark_persisted(self, conversation: uuid.UUID, seq: int) -> None:
        """PostgreSQL holds every event up to `seq`: the log may trim them."""
        await self._mark_persisted(
            keys=[keys.persisted(conversation), keys.log(conversation), keys.seq(conversation)],
            args=[seq, self.ttl, self.max_events],
        )

    async def set_meta(self, owner: str, meta: Conversation) -> None:
        await self._set_meta(
            keys=[keys.meta(meta.id)], args=[_encoder.encode(CachedMeta(owner, meta))]
        )

    async def recent(self, conversation: uuid.UUID) -> list[Message] | None:
        """The latest finished messages, oldest first; None when the state is not loaded."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.exists(keys.meta(conversation))
        pipe.lrange(keys.recent(conversation), 0, -1)
        loaded, items = await pipe.execute()
        if not loaded:
            return None
        return [_message_decoder.decode(item) for item in items]

    async def forget(self, conversation: uuid.UUID) -> None:
        await self.redis.delete(
            keys.meta(conversation),
            keys.recent(conversation),
            keys.generation(conversation),
            keys.log(conversation),
            keys.said(conversation),
        )

    def append_piece(
        self,
        pipeliner: Pipeliner,
        conversation: uuid.UUID,
        event: bytes,
        message_id: uuid.UUID,
        index: int,
        gen_ttl: int,
    ) -> asyncio.Future[Any]:
        """Queue one event of a generation; the future gives its seq, 0 for a repeat,
        UNLOADED when the conversation's Redis state is gone, or LOST when the generation's."""
        return pipeliner.call(
            self._append_piece,
            [
                keys.seq(conversation),
                keys.log(conversation),
                keys.channel(conversation),
                keys.generation(conversation),
            ],
            [event, self.max_events, self.ttl, str(message_id), index, gen_ttl],
        )


def encode(obj: Any) -> bytes:
    return _encoder.encode(obj)


class Pipeliner:
    """Sends script calls to Redis in pipelines: while one batch is in flight the next one
    gathers, so a worker streaming many replies pays one round trip per batch, not per token,
    and the calls of one conversation keep their order."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._queue: list[tuple[AsyncScript, list[str], list[Any], asyncio.Future[Any]]] = []
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

    def call(self, script: AsyncScript, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((script, keys, args, future))
        self._wake.set()
        return future

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._queue = self._queue, []
            if batch:
                await self._send(batch)

    async def _send(
        self, batch: list[tuple[AsyncScript, list[str], list[Any], asyncio.Future[Any]]]
    ) -> None:
        """Send a batch, again and again while Redis is unreachable (every script the worker
        sends is idempotent), until RETRY_FOR seconds have passed."""
        deadline = asyncio.get_running_loop().time() + RETRY_FOR
        attempt = 0
        while True:
            pipe = self.redis.pipeline(transaction=False)
            for script, keys_, args, _ in batch:
                await script(keys=keys_, args=args, client=pipe)
            try:
                results = await pipe.execute(raise_on_error=False)
                break
            except (ConnectionError, TimeoutError, OSError, RedisConnectionError) as exc:
                if asyncio.get_running_loop().time() > deadline:
                    results = [exc] * len(batch)
                    break
                if attempt == 0:
                    log.warning("Redis unreachable (%s); holding %d calls", exc, len(batch))
                await asyncio.sleep(RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)])
                attempt += 1
        for (*_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
