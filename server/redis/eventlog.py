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
import hashlib
import itertools
import logging
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

import msgspec
from redis.asyncio import Redis
from redis.crc import key_slot

from protocol.frames import Conversation, Message
from server.redis import generations, keys, scripts
from server.redis.batches import Batches
from server.redis.client import (
    UNREACHABLE,
    HeldConnection,
    Packed,
    bulk,
    is_cluster,
    packs_as_given,
)

UNLOADED: Final = -1
LOST: Final = -2
BEHIND: Final = -3
"""The seq counter went back below a seq Redis had acknowledged (a failover to a replica that
lacks the last events; scripts/lib_seq_floor.lua): raised, nothing appended."""
TAKEN_OVER: Final = -4
"""The generation is run by another worker now (this one's lease lapsed while it could not
reach Redis, and the turn was taken over): nothing appended; the caller stops the turn."""
RETRY_FOR: Final = 60.0
RETRY_DELAYS: Final = (0.05, 0.1, 0.2, 0.5, 1.0)
APPENDED_KEPT: Final = int(2 * RETRY_FOR)
"""Seconds Redis keeps an `append_pieces` call's mark (which of its pieces it appended):
longer than the pipeliner resends a call."""
MARKED_FROM: Final = 4
"""A call of at least this many pieces is marked; a smaller one writes each appended piece's
index to its generation's `gen` instead (as cheap there, and it holds no key for 2 minutes:
in a cluster whose conversations each have their own slot a call carries one piece)."""

log = logging.getLogger("parley.eventlog")

APPEND: Final = scripts.load("append", functions=["lib_append_event"])
APPEND_PIECE: Final = scripts.load("append_piece", functions=["lib_append_piece"])
APPEND_PIECES: Final = scripts.load("append_pieces", functions=["lib_append_piece"])
# `Pipeliner._packed_call` packs these inputs by hand, in this order: a change to the
# script's header fails here, at import, rather than sending them in the old order
if (APPEND_PIECES.keys, APPEND_PIECES.args) != (
    scripts.Inputs(("call_key",), "piece_keys"),
    scripts.Inputs(("maxlen", "ttl", "kept", "worker"), "piece_args"),
):
    raise scripts.ScriptError("append_pieces.lua's inputs are not the ones packed by hand")
PIECES_PER_CALL: Final = 200
"""At most this many pieces in one `append_pieces` call (Lua's `unpack` of its KEYS and
ARGV has a limit of a few thousand values)."""
SEQ_FLOOR: Final = scripts.load("seq_floor", functions=["lib_seq_floor"])
READ: Final = scripts.load("read")
LOAD: Final = scripts.load("load")
MARK_PERSISTED: Final = scripts.load("mark_persisted", functions=["lib_seq_floor"])
SET_META: Final = scripts.load("set_meta")
CACHE_HISTORY: Final = scripts.load("cache_history", functions=["lib_seq_floor"])
JOIN: Final = scripts.load("join")
BEGIN: Final = scripts.load("begin")
JOINS_PER_CALL: Final = 64
"""At most this many sockets' joins in one `join` call (the reply carries each one's events,
and without `after` its transcript)."""

RECENT_KEPT: Final = 200
HISTORY_CACHED_BYTES: Final = 1 << 20
"""A persisted transcript larger than this (encoded) is read from PostgreSQL at every join
rather than kept in Redis."""


class CachedMeta(msgspec.Struct, frozen=True):
    """What Redis keeps of a conversation's row; `meta.last_seq` is read from the seq key."""

    owner: str
    meta: Conversation


class Stamped(msgspec.Struct, frozen=True):
    """A cached row as read, with the SHA-1 of its bytes (`meta_sha`), which the say and
    regenerate scripts compare with Redis's to prove the row has not changed since."""

    cached: CachedMeta
    sha: str


def meta_sha(raw: bytes) -> str:
    """The hex SHA-1 of a cached row's bytes, as Lua's `redis.sha1hex` computes it."""
    return hashlib.sha1(raw).hexdigest()


class Begun(msgspec.Struct, frozen=True):
    """What a worker reads as it starts a generation (`EventLog.begin`)."""

    history: list[Message] | None
    """The recent messages; None (with `meta`) when the conversation's state is not loaded."""
    meta: CachedMeta | None
    cancelled: str | None
    """The message id a `cancel` marked (it may be another turn's)."""
    piece: int
    """The index of the generation's last appended event (0 before any)."""


class CachedHistory(msgspec.Struct, frozen=True):
    """A conversation's persisted transcript and the seq it covers (`history_seq`)."""

    seq: int
    messages: list[Message]


class Opening(msgspec.Struct, frozen=True):
    """What a join reads in one round trip (`EventLog.opening`): the cached row (None: Redis
    does not hold the conversation), the head seq, the logged events after the join's start,
    and, when asked for, the cached persisted transcript (None: not cached or not the
    latest), which is then that start."""

    meta: CachedMeta | None
    head: int
    events: list[tuple[int, bytes]]
    history: CachedHistory | None = None


Joining = tuple[uuid.UUID, int | None]
"""A socket's join: the conversation and its `after`."""


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
        self._seq_floor = SEQ_FLOOR.register(redis)
        self._read = READ.register(redis)
        self._load = LOAD.register(redis)
        self._set_meta = SET_META.register(redis)
        self._mark_persisted = MARK_PERSISTED.register(redis)
        self._cache_history = CACHE_HISTORY.register(redis)
        self._join = JOIN.register(redis)
        self._begin = BEGIN.register(redis)
        self._cluster = is_cluster(redis)
        self._joins: Batches[Joining, Opening] = Batches(self._open, JOINS_PER_CALL)

    async def append(self, conversation: uuid.UUID, event: bytes) -> int:
        """Append an encoded event (without seq); return its seq, or UNLOADED."""
        seq = await self._append(
            **event_keys(conversation),
            frame=event,
            maxlen=self.max_events,
            ttl=self.ttl,
        )
        return int(seq)

    async def raise_seq(self, conversation: uuid.UUID, floor: int) -> bool:
        """Raise the conversation's seq counter to `floor` if it is below (Redis lost events
        acknowledged up to there); whether it was raised (scripts/seq_floor.lua)."""
        return bool(await self._seq_floor(seq_key=keys.seq(conversation), floor=floor))

    async def read(
        self, conversation: uuid.UUID, after: int
    ) -> tuple[int, list[tuple[int, bytes]]]:
        """The last seq assigned (UNLOADED when unknown) and the retained events after `after`."""
        head, entries = await self._read(
            seq_key=keys.seq(conversation),
            log_key=keys.log(conversation),
            first_id=f"{after + 1}-0",
        )
        return int(head), _entries(entries)

    async def opening(self, conversation: uuid.UUID, after: int | None) -> Opening:
        """What a socket joining the conversation needs, in one read: the cached row, and
        the events after `after` or, with `after` None, the cached transcript and the events
        after it. The joins asked while one read is in flight share the next (`_open`)."""
        return await self._joins.ask((conversation, after))

    async def _open(self, asked: list[Joining]) -> list[Opening | BaseException]:
        """A batch of joins in one `join` call (one per slot in a cluster, the calls made at
        once): the sockets joining one conversation from one seq (tabs of one person, as
        a rule) share one read. A call that fails fails its own joins."""
        joins = list(dict.fromkeys(asked))
        groups: dict[int, list[Joining]] = {}
        for join in joins:
            slot = key_slot(keys.meta(join[0]).encode()) if self._cluster else 0
            groups.setdefault(slot, []).append(join)
        replies = await asyncio.gather(
            *(self._join_call(group).run() for group in groups.values()),
            return_exceptions=True,
        )
        read: dict[Joining, Opening | BaseException] = {}
        for group, reply in zip(groups.values(), replies, strict=True):
            if isinstance(reply, BaseException):
                read.update(dict.fromkeys(group, reply))
            else:
                read.update(zip(group, map(_opened_alone, reply), strict=True))
        return [read[join] for join in asked]

    def _join_call(self, joins: list[Joining]) -> scripts.Call:
        join_keys: list[str] = []
        join_args: list[str] = []
        for conversation, after in joins:
            c = str(conversation)  # formatted once for the five keys
            join_keys += (keys.meta(c), keys.seq(c), keys.log(c))
            join_keys += (keys.persisted(c), keys.history(c))
            join_args += (f"{(after or 0) + 1}-0", "1" if after is None else "0")
        return self._join.bind(join_keys=join_keys, join_args=join_args)

    async def head(self, conversation: uuid.UUID) -> int:
        value = await self.redis.get(keys.seq(conversation))
        return UNLOADED if value is None else int(value)

    async def stamped(self, conversation: uuid.UUID) -> Stamped | None:
        """The cached row and the SHA-1 of its bytes, or None when Redis holds none."""
        raw = await self.redis.get(keys.meta(conversation))
        if raw is None:
            return None
        return Stamped(_meta_decoder.decode(raw), meta_sha(cast(bytes, raw)))

    async def load(
        self,
        owner: str,
        meta: Conversation,
        last_seq: int,
        history_seq: int,
        history: Sequence[Message],
    ) -> str:
        """Seed Redis from PostgreSQL unless another process already did: the latest messages
        as context, every user message id, so that a `say` repeating one is a duplicate
        however long ago it was said, and `history` (the whole persisted transcript, up to
        `history_seq`) as the joins' copy. The SHA-1 of the row as this process encoded it
        (what Redis holds unless another process seeded or changed it meanwhile)."""
        cached = _encoder.encode(CachedMeta(owner, meta))
        await self._load(
            meta_key=keys.meta(meta.id),
            seq_key=keys.seq(meta.id),
            recent_key=keys.recent(meta.id),
            persisted_key=keys.persisted(meta.id),
            said_key=keys.said(meta.id),
            history_key=keys.history(meta.id),
            meta=cached,
            last_seq=last_seq,
            ttl=self.ttl,
            persisted=history_seq,
            said_ids=" ".join(str(m.id) for m in history if m.role == "user"),
            history=_history_copy(history_seq, history),
            messages=[_encoder.encode(m) for m in history[-RECENT_KEPT:]],
        )
        return meta_sha(cached)

    async def mark_persisted(self, conversation: uuid.UUID, seq: int) -> None:
        """PostgreSQL holds every event up to `seq`: the log may trim them."""
        await self.persisted_call(conversation, seq).run()

    def persisted_call(self, conversation: uuid.UUID, seq: int) -> scripts.Call:
        """`mark_persisted` as a call, to run now or queue on a pipeline."""
        return self._mark_persisted.bind(
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
        self, conversation: uuid.UUID, seq: int, messages: list[Message], last_seq: int = 0
    ) -> None:
        """Keep the transcript PostgreSQL holds up to `seq` for the next joins, unless a
        persist has moved on since it was read (or it is too large to keep); and raise the
        seq counter to `last_seq` (PostgreSQL's) and `persisted` to `seq` where Redis is
        behind them, having lost what it acknowledged (scripts/cache_history.lua)."""
        await self._cache_history(
            persisted_key=keys.persisted(conversation),
            history_key=keys.history(conversation),
            seq_key=keys.seq(conversation),
            history=_history_copy(seq, messages),
            seq=str(seq),
            ttl=self.ttl,
            last_seq=last_seq,
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

    async def begin(
        self,
        conversation: uuid.UUID,
        message_id: uuid.UUID,
        worker: str,
        lease: int,
        pipeliner: Pipeliner | None = None,
    ) -> Begun:
        """Make the conversation's generation `message_id`'s, run by `worker` (marked for
        `lease` seconds), and read what a generation needs to start, in one script call
        (scripts/begin.lua; server/redis/generations.py describes the mark), sent through
        `pipeliner` if given (with the other calls made meanwhile)."""
        call = self.begin_call(conversation, message_id, worker, lease)
        return self.begun(await (call.run() if pipeliner is None else pipeliner.call(call)))

    def begin_call(
        self, conversation: uuid.UUID, message_id: uuid.UUID, worker: str, lease: int
    ) -> scripts.Call:
        """`begin`'s script call, to send as the caller sees fit (its answer: `begun`)."""
        c = str(conversation)
        return self._begin.bind(
            gen_key=keys.generation(c),
            meta_key=keys.meta(c),
            recent_key=keys.recent(c),
            cancel_key=keys.cancelled(c),
            message_id=str(message_id),
            worker=worker,
            lease=lease,
        )

    @staticmethod
    def begun(answer: list[Any]) -> Begun:
        """What the `begin` script answered."""
        meta, items, cancelled, piece = answer
        loaded = meta is not None
        return Begun(
            history=[_message_decoder.decode(item) for item in items] if loaded else None,
            meta=_meta_decoder.decode(meta) if loaded else None,
            cancelled=None if cancelled is None else cancelled.decode(),
            piece=int(piece),
        )

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
        *,
        express: bool = False,
    ) -> asyncio.Future[Any]:
        """Queue one event of a generation; the future gives its seq, 0 for a repeat (an
        `index` up to the one the generation was last claimed with, or the piece of a call
        sent again whose first run appended it), UNLOADED when the conversation's Redis
        state is gone, LOST when the generation's, BEHIND when the seq counter is below
        `floor()` (the highest seq Redis acknowledged to the generation), or TAKEN_OVER when
        a worker other than the pipeliner's runs the generation now. The call is made when
        its batch is taken (see `Pipeliner.call`): an `event` given as a function is encoded
        then, and `floor()` counts every batch acknowledged before it. The pieces of a batch
        go to Redis in one `append_pieces` call (one per slot in a cluster), each appended as
        `append_piece` appends it; the call carries a mark of its own, so that sent again it
        appends nothing twice. `express`: sent at once, alone (`Pipeliner.express`). (A
        generation queues its events through its `appender`.)"""
        appender = self.appender(conversation, message_id, floor)
        return appender.append(pipeliner, event, index, express=express)

    def appender(
        self,
        conversation: uuid.UUID,
        message_id: uuid.UUID,
        floor: Callable[[], int] = lambda: 0,
        settle: Settle | None = None,
    ) -> Appender:
        """What queues one generation's events (`append_piece`), its keys made once."""
        return Appender(
            str(conversation), str(message_id), floor, self.max_events, self.ttl, settle
        )


Settle = Callable[[int, Any], None]
"""Told an event's index and its result (as `append_piece`'s future gives it, or the
exception it would raise)."""


class Appender:
    """One generation's events queued for their batch (`EventLog.append_piece`): its
    conversation's keys and message id formatted once, not per event (this runs per
    token)."""

    __slots__ = (
        "conversation", "floor", "keys", "maxlen", "message_id", "packed_keys",
        "packed_message_id", "settle", "slot", "ttl",
    )  # fmt: skip

    def __init__(
        self,
        conversation: str,
        message_id: str,
        floor: Callable[[], int],
        maxlen: int,
        ttl: int,
        settle: Settle | None,
    ) -> None:
        c = self.conversation = conversation
        self.keys = (
            keys.seq(c),
            keys.log(c),
            keys.channel(c),
            keys.persisted(c),
            keys.generation(c),
        )
        """seq, log, channel, persisted and generation keys of the conversation"""
        self.message_id = message_id
        self.floor = floor
        self.maxlen = maxlen
        self.ttl = ttl
        self.settle = settle
        """Told each result of `queue` (None: the appender's events are `append`ed)."""
        self.slot = key_slot(self.keys[0].encode())
        self.packed_keys = b"".join(bulk(key.encode()) for key in self.keys)
        """The keys as a packed command carries them (`Pipeliner._packed_call`)."""
        self.packed_message_id = bulk(message_id.encode())

    def append(
        self,
        pipeliner: Pipeliner,
        event: bytes | Callable[[], bytes],
        index: int,
        *,
        express: bool = False,
    ) -> asyncio.Future[Any]:
        """Queue an event (or `express` it); its future gives its result
        (`EventLog.append_piece`)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        piece = Piece(self, event, index, future)
        if express:
            pipeliner.express(piece)
        else:
            pipeliner.piece(piece)
        return future

    def queue(self, pipeliner: Pipeliner, event: bytes | Callable[[], bytes], index: int) -> None:
        """Queue an event whose result goes to `settle`, called where the batch's reply is
        read: no future, and no callback scheduled on the loop, per event."""
        pipeliner.piece(Piece(self, event, index, None))


def event_keys(conversation: uuid.UUID | str) -> dict[str, str]:
    """The keys of `append_event` (scripts/lib_append_event.lua), by name: every script that
    appends an event to the conversation takes them."""
    return {
        "seq_key": keys.seq(conversation),
        "log_key": keys.log(conversation),
        "channel": keys.channel(conversation),
        "persisted_key": keys.persisted(conversation),
    }


encode: Final = _encoder.encode
"""An event (or any value) as JSON: the encoder's own method, no call around it (it encodes
every token's text)."""


class Piece:
    """One event of a generation waiting for its batch (`Appender`)."""

    __slots__ = ("appender", "event", "future", "index")

    def __init__(
        self,
        appender: Appender,
        event: bytes | Callable[[], bytes],
        index: int,
        future: asyncio.Future[Any] | None,
    ) -> None:
        self.appender = appender
        self.event = event
        self.index = index
        self.future = future
        """Given the result; None: the appender's `settle` is."""

    def settled(self, result: Any) -> None:
        if self.future is not None:
            _settle(self.future, result)
            return
        settle = self.appender.settle
        assert settle is not None  # (`Appender.queue` is used only with one)
        try:
            settle(self.index, result)
        except Exception:  # called in the pipeliner's task, which every generation waits on
            log.exception("the result of an event of %s was not taken", self.appender.conversation)


@dataclass(frozen=True, slots=True)
class _Sent:
    """One script call of a batch and what waits for its result: a single call's future,
    or, for `append_pieces`, its pieces (its result is then a list, one result each)."""

    call: scripts.Call
    future: asyncio.Future[Any] | None = None
    pieces: list[Piece] | None = None

    def settle(self, result: Any) -> None:
        if self.pieces is None:
            assert self.future is not None
            _settle(self.future, result)
        elif isinstance(result, BaseException):
            for piece in self.pieces:
                piece.settled(result)
        else:
            for piece, each in zip(self.pieces, result, strict=True):
                piece.settled(each)


def _settle(future: asyncio.Future[Any], result: Any) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


class Pipeliner:
    """Sends script calls to Redis in pipelines: while one batch is in flight the next one
    gathers, so a worker streaming many replies pays one round trip per batch, not per token,
    and the calls of one conversation keep their order. Two batches are sent at least
    `interval` seconds apart (the first after a pause at once), so that under load each
    carries more — unless a caller `hurry`s the next one (a reply's first token: it goes
    with the next batch, which waits only for the one in flight) or `express`es it (it goes
    at once, in a call of its own, beside the batch in flight)."""

    def __init__(self, redis: Redis, interval: float = 0.0, worker: str = "") -> None:
        self.redis = redis
        self.interval = interval
        self.worker = worker
        """The worker whose generations' events this sends: they are refused (TAKEN_OVER)
        once another runs the generation. '' for a caller that runs none."""
        self._append_pieces = APPEND_PIECES.register(redis)
        self._cluster = is_cluster(redis)
        self._packs = packs_as_given(redis)
        """`append_pieces` calls are packed here (`_packed_call`)."""
        self._held = None if self._cluster else HeldConnection(redis)
        """The connection of its own the calls are sent on (on one Redis; a call sent while
        another is in flight on it, an expressed one, takes the client's pool)."""
        self._packed_sha = bulk(self._append_pieces.redis_script.sha.encode())
        self._packed_worker = bulk(worker.encode())
        self._packed_name = bulk(self._append_pieces.script.name.encode())
        self._name = uuid.uuid4().hex
        self._calls_made = itertools.count(1)
        self._queue: list[Piece | tuple[scripts.Call | Callable[[], scripts.Call], Any]]
        self._queue = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._hurried = False
        self._nap: asyncio.Future[None] | None = None
        """The wait for the interval to pass, while it lasts (`hurry` ends it)."""
        self._expressed: set[asyncio.Task[None]] = set()
        """Expressed calls in flight: the next batch is sent once they are answered."""

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="parley-pipeliner")

    async def stop(self) -> None:
        if self._task:
            while self._queue or self._expressed:
                await asyncio.sleep(0.01)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._held is not None:
            await self._held.drop()

    def call(self, call: scripts.Call | Callable[[], scripts.Call]) -> asyncio.Future[Any]:
        """Queue a call; one given as a function is made when its batch is taken, so what
        it sends may still grow while earlier batches are in flight."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((call, future))
        self._wake.set()
        return future

    def piece(self, piece: Piece) -> None:
        """Queue a generation's event (`Appender`): the pieces queued together are sent
        together. Only the first of a batch wakes the pipeliner: with more queued, it is
        awake or takes them at once (`_run` clears the wake before it takes the queue)."""
        queue = self._queue
        queue.append(piece)
        if len(queue) == 1:
            self._wake.set()

    def express(self, piece: Piece) -> None:
        """Send a generation's event at once, in a call of its own, without waiting for the
        batch in flight or the interval (a reply's first token). Only for an event none of
        whose conversation's earlier calls is queued or in flight: the batch in flight may
        be answered after it. A batch taken later is sent once it is answered, so what
        follows it in the conversation keeps its place."""
        sent = self._pieces_call([piece], piece.appender.maxlen, piece.appender.ttl)
        task = asyncio.create_task(self._send([sent]), name="parley-pipeliner-express")
        self._expressed.add(task)
        task.add_done_callback(self._expressed.discard)

    def hurry(self) -> None:
        """Send the next batch without waiting for the interval to pass."""
        self._hurried = True
        nap = self._nap
        if nap is not None and not nap.done():
            nap.set_result(None)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        sent = -self.interval
        while True:
            await self._wake.wait()
            wait = sent + self.interval - loop.time()
            if wait > 0 and not self._hurried:
                await self._pause(loop, wait)
            self._hurried = False
            self._wake.clear()
            while self._expressed:  # what follows an expressed event must not pass it
                await asyncio.wait(set(self._expressed))
            sent = loop.time()
            queued, self._queue = self._queue, []
            batch = list(self._calls(queued))
            if batch:
                await self._send(batch)
                # let the futures' callbacks run before the next batch's calls are made,
                # so that what they record (a generation's acknowledged seq) is counted there
                await asyncio.sleep(0)

    async def _pause(self, loop: asyncio.AbstractEventLoop, seconds: float) -> None:
        """Wait `seconds`, or less if `hurry` is called meanwhile."""
        nap = self._nap = loop.create_future()
        timer = loop.call_later(seconds, _settle, nap, None)
        try:
            await nap
        finally:
            timer.cancel()
            self._nap = None

    def _calls(self, queued: list[Piece | tuple[Any, asyncio.Future[Any]]]) -> Iterator[_Sent]:
        """The batch's script calls, in the order queued: each run of pieces between two
        other calls becomes `append_pieces` calls (so a conversation's pieces never pass its
        other calls, nor they its pieces)."""
        run: list[Piece] = []
        for item in queued:
            if type(item) is Piece:
                run.append(item)
                continue
            assert isinstance(item, tuple)
            yield from self._pieces_calls(run)
            run = []
            call, future = item
            yield _Sent(call if isinstance(call, scripts.Call) else call(), future)
        yield from self._pieces_calls(run)

    def _pieces_calls(self, run: list[Piece]) -> Iterator[_Sent]:
        """Consecutive pieces as `append_pieces` calls: one per group of pieces that may
        share a call (on one Redis all of them; in a cluster those of one slot, since a
        script touches only keys of one slot), at most PIECES_PER_CALL each. A
        conversation's pieces stay in one group, in order."""
        if not run:
            return
        first = run[0].appender
        if not self._cluster and all(
            p.appender.maxlen == first.maxlen and p.appender.ttl == first.ttl for p in run
        ):
            groups = {(0, first.maxlen, first.ttl): run}  # the rule: one call for them all
        else:
            groups = {}
            for piece in run:
                a = piece.appender
                slot = a.slot if self._cluster else 0
                groups.setdefault((slot, a.maxlen, a.ttl), []).append(piece)
        for (_, maxlen, ttl), group in groups.items():
            for start in range(0, len(group), PIECES_PER_CALL):
                chunk = group[start : start + PIECES_PER_CALL]
                yield self._pieces_call(chunk, maxlen, ttl)

    def _pieces_call(self, chunk: list[Piece], maxlen: int, ttl: int) -> _Sent:
        call_key = keys.appended(
            chunk[0].appender.conversation, f"{self._name}:{next(self._calls_made)}"
        )
        kept = APPENDED_KEPT if len(chunk) >= MARKED_FROM else 0
        if self._packs:
            return _Sent(self._packed_call(chunk, call_key, maxlen, ttl, kept), pieces=chunk)
        piece_keys: list[str] = []
        piece_args: list[Any] = []
        add_keys, add_args = piece_keys.extend, piece_args.extend
        for piece in chunk:
            event, appender = piece.event, piece.appender
            add_keys(appender.keys)
            add_args((
                event if type(event) is bytes else event(),  # type: ignore[operator]
                appender.message_id, piece.index, appender.floor(),
            ))  # fmt: skip
        call = self._append_pieces.bind(
            call_key=call_key,
            maxlen=maxlen,
            ttl=ttl,
            worker=self.worker,
            kept=kept,
            piece_keys=piece_keys,
            piece_args=piece_args,
        )
        return _Sent(call, pieces=chunk)

    def _packed_call(
        self, chunk: list[Piece], call_key: str, maxlen: int, ttl: int, kept: int
    ) -> scripts.Call:
        """The same `append_pieces` call as `bind` makes, packed here (`client.Packed`): each
        piece's keys and message id were packed once for its generation (`Appender`), so a
        piece costs the packing of its frame and two numbers, not of nine arguments."""
        piece_keys: list[bytes] = []
        piece_args: list[bytes] = []
        add_keys, add_args = piece_keys.append, piece_args.append
        for piece in chunk:
            event, appender = piece.event, piece.appender
            if type(event) is not bytes:
                event = event()  # type: ignore[operator]
            index, floor = b"%d" % piece.index, b"%d" % appender.floor()
            add_keys(appender.packed_keys)
            add_args(
                b"$%d\r\n%b\r\n%b$%d\r\n%b\r\n$%d\r\n%b\r\n"  # frame, message id, index, floor
                % (
                    len(event),
                    event,
                    appender.packed_message_id,
                    len(index),
                    index,
                    len(floor),
                    floor,
                )
            )
        count = len(chunk)
        nkeys = b"%d" % (1 + 5 * count)
        head = b"*%d\r\n$7\r\nEVALSHA\r\n" % (3 + 1 + 5 * count + 4 + 4 * count + 1)
        numbers = (bulk(b"%d" % value) for value in (maxlen, ttl, kept))
        packed = b"".join((
            head, self._packed_sha, bulk(nkeys), bulk(call_key.encode()), *piece_keys,
            *numbers, self._packed_worker, *piece_args, self._packed_name,
        ))  # fmt: skip
        return scripts.Call(self._append_pieces.redis_script, [], [], Packed(packed))

    async def _send(self, batch: list[_Sent]) -> None:
        """Send a batch, again and again while Redis is unreachable (every script the worker
        sends is idempotent: sent again, the same call appends nothing twice), until
        RETRY_FOR seconds have passed."""
        deadline = asyncio.get_running_loop().time() + RETRY_FOR
        attempt = 0
        while True:
            try:
                calls = [sent.call for sent in batch]
                results = await scripts.pipelined(self.redis, calls, self._held)
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
        for sent, result in zip(batch, results, strict=True):
            sent.settle(result)


def _opened(reply: list[Any]) -> Opening:
    """One join's result from the `join` script."""
    raw_meta, head, entries, persisted, raw_history = reply
    meta = None if raw_meta is None else _meta_decoder.decode(raw_meta)
    history = None
    if raw_history is not None:
        history = _history_decoder.decode(raw_history)
        if history.seq != int(persisted):
            history = None
    return Opening(meta, int(head), _entries(entries), history)


def _opened_alone(reply: list[Any]) -> Opening | BaseException:
    """`_opened`, or what it raised: a join whose answer cannot be read fails alone."""
    try:
        return _opened(reply)
    except (msgspec.DecodeError, ValueError, TypeError) as exc:
        return exc


def _entries(entries: list[tuple[bytes, list[bytes]]]) -> list[tuple[int, bytes]]:
    """Log entries as XRANGE returns them, as (seq, event) pairs."""
    return [(int(eid.split(b"-")[0]), fields[1]) for eid, fields in entries]


def _history_copy(seq: int, messages: Sequence[Message]) -> bytes:
    """The transcript as `history` keeps it, or b"" when it is too large to keep."""
    encoded = _encoder.encode(CachedHistory(seq, list(messages)))
    return b"" if len(encoded) > HISTORY_CACHED_BYTES else encoded
