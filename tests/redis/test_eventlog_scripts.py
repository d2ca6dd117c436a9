"""append, append_piece, read, load, set_meta, mark_persisted and begin against the real Redis."""

from __future__ import annotations

import asyncio
import functools
import uuid
from typing import Any

import hiredis
import msgspec
import pytest
from redis.asyncio import Redis

from protocol.frames import Message, utcnow
from server.redis import generations, keys, scripts
from server.redis.eventlog import (
    APPEND,
    APPEND_PIECES,
    APPENDED_KEPT,
    BEHIND,
    HISTORY_CACHED_BYTES,
    LOST,
    MARKED_FROM,
    TAKEN_OVER,
    UNLOADED,
    Begun,
    CachedHistory,
    CachedMeta,
    EventLog,
    Opening,
    Piece,
    Pipeliner,
    event_keys,
)
from tests.helpers.faults import Proxy
from tests.helpers.processes import Services
from tests.helpers.scripts import MAX_EVENTS, conversation_row, loaded


def frame(text: str) -> bytes:
    return msgspec.json.encode({"type": "token", "text": text})


async def cached_row(events: EventLog, conversation: uuid.UUID) -> CachedMeta | None:
    """The conversation's row as Redis caches it."""
    stamped = await events.stamped(conversation)
    return None if stamped is None else stamped.cached


async def log_seqs(redis: Redis, conversation: uuid.UUID) -> list[int]:
    entries = await redis.xrange(keys.log(conversation))
    return [int(entry_id.split(b"-")[0]) for entry_id, _ in entries]


async def test_append_assigns_consecutive_seqs_and_splices_each_in_front(
    events: EventLog,
) -> None:
    conversation = await loaded(events, last_seq=41)
    seqs = [await events.append(conversation, frame(str(i))) for i in range(3)]
    assert seqs == [42, 43, 44]
    head, logged = await events.read(conversation, after=42)
    assert head == 44
    assert logged == [
        (43, b'{"seq":43,"type":"token","text":"1"}'),
        (44, b'{"seq":44,"type":"token","text":"2"}'),
    ]


async def test_append_publishes_the_framed_event(events: EventLog, redis: Redis) -> None:
    conversation = await loaded(events)
    pubsub = redis.pubsub()
    await pubsub.subscribe(keys.channel(conversation))
    try:
        await pubsub.get_message(timeout=1.0)  # the subscribe confirmation
        await events.append(conversation, frame("hi"))
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2.0)
        assert message is not None
        assert message["data"] == b'{"seq":1,"type":"token","text":"hi"}'
    finally:
        await pubsub.aclose()


async def test_append_refuses_an_unloaded_conversation(events: EventLog, redis: Redis) -> None:
    conversation = uuid.uuid4()
    assert await events.append(conversation, frame("x")) == UNLOADED
    assert not await redis.exists(keys.seq(conversation), keys.log(conversation))


async def test_the_log_keeps_every_event_postgresql_does_not_have(
    events: EventLog, redis: Redis
) -> None:
    conversation = await loaded(events)
    for i in range(300):
        await events.append(conversation, frame(str(i)))
    assert await log_seqs(redis, conversation) == list(range(1, 301))  # none persisted yet

    await events.mark_persisted(conversation, 250)
    kept = await log_seqs(redis, conversation)
    assert len(kept) < 300  # trimmed (by whole stream nodes: `~`)
    assert kept == list(range(kept[0], 301)) and kept[0] <= 251

    await events.append(conversation, frame("more"))
    assert (await log_seqs(redis, conversation))[-51:] == list(range(251, 302))


async def test_mark_persisted_only_moves_forward(events: EventLog, redis: Redis) -> None:
    conversation = await loaded(events)
    await events.mark_persisted(conversation, 7)
    await events.mark_persisted(conversation, 3)
    assert await redis.get(keys.persisted(conversation)) == b"7"


async def test_load_seeds_once_and_never_lowers_the_seq(events: EventLog, redis: Redis) -> None:
    meta = conversation_row(last_seq=10)
    await events.load("alice", meta, 10, 10, [])
    await events.append(meta.id, frame("not persisted yet"))
    await redis.delete(keys.meta(meta.id))  # the cached row expired, the counter did not
    await events.load("alice", meta, 10, 10, [])
    assert await events.head(meta.id) == 11
    cached = await cached_row(events, meta.id)
    assert cached is not None and cached.owner == "alice" and cached.meta.id == meta.id

    await events.load("bob", meta, 10, 10, [])  # loaded already: nothing changes
    cached = await cached_row(events, meta.id)
    assert cached is not None and cached.owner == "alice"


async def test_set_meta_replaces_a_cached_row_only(events: EventLog) -> None:
    meta = conversation_row()
    await events.set_meta("alice", meta)
    assert await cached_row(events, meta.id) is None
    await events.load("alice", meta, 0, 0, [])
    renamed = msgspec.structs.replace(meta, title="renamed")
    await events.set_meta("alice", renamed)
    cached = await cached_row(events, meta.id)
    assert cached is not None and cached.meta.title == "renamed"


async def claim_generation(redis: Redis, conversation: uuid.UUID, message_id: uuid.UUID) -> None:
    pipe = redis.pipeline(transaction=False)
    generations.claim(pipe, conversation, message_id, "worker-a", lease=60)
    await pipe.execute()


async def generating(events: EventLog, redis: Redis) -> tuple[uuid.UUID, uuid.UUID]:
    """A loaded conversation and the id of the generation running in it."""
    conversation = await loaded(events)
    message_id = uuid.uuid4()
    await claim_generation(redis, conversation, message_id)
    return conversation, message_id


async def append_pieces(
    events: EventLog,
    pipeliner: Pipeliner,
    conversation: uuid.UUID,
    message_id: uuid.UUID,
    *indexes: int,
) -> list[int]:
    """Queue the pieces with these indexes together (one batch) and give their results."""
    futures = [
        events.append_piece(pipeliner, conversation, frame(str(i)), message_id, i) for i in indexes
    ]
    return list(await asyncio.gather(*futures))


def pieces_call(
    redis: Redis,
    mark: str,
    pieces: list[tuple[uuid.UUID, uuid.UUID, int]],
    kept: int = APPENDED_KEPT,
) -> scripts.Call:
    """One `append_pieces` call, marked `mark` (unmarked with `kept` 0), of (conversation,
    message id, index) pieces, as the pipeliner makes it."""
    piece_keys: list[str] = []
    piece_args: list[object] = []
    for conversation, message_id, index in pieces:
        piece_keys.extend([*event_keys(conversation).values(), keys.generation(conversation)])
        piece_args.extend([frame(str(index)), str(message_id), index, 0])
    return APPEND_PIECES.register(redis).bind(
        call_key=keys.appended(pieces[0][0], mark),
        maxlen=MAX_EVENTS,
        ttl=60,
        kept=kept,
        worker="",
        piece_keys=piece_keys,
        piece_args=piece_args,
    )


async def hset_calls(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_hset", {}).get("calls", 0))


@pytest.mark.counts_commands
async def test_a_call_sent_again_appends_nothing_twice_and_tries_its_refused_pieces_again(
    events: EventLog, redis: Redis
) -> None:
    """The call's mark says which of its pieces its first run appended: those answer 0 (a
    repeat), the refused ones are tried again (here LOST the first time, then the
    conversation's generation is theirs). One mark per call, kept a little while; the
    generation itself is not written per piece."""
    conversation, message_id = await generating(events, redis)
    other = await loaded(events)
    other_reply = uuid.uuid4()
    call = pieces_call(
        redis,
        uuid.uuid4().hex,
        [(conversation, message_id, 1), (other, other_reply, 1), (conversation, message_id, 2)],
    )
    written = await hset_calls(redis)
    assert await call.run() == [1, LOST, 2]
    assert await hset_calls(redis) == written
    assert await generations.last_piece(redis, conversation) == 0
    await claim_generation(redis, other, other_reply)
    assert await call.run() == [0, 1, 0]
    assert await call.run() == [0, 0, 0]
    assert await log_seqs(redis, conversation) == [1, 2]
    assert await log_seqs(redis, other) == [1]
    mark = keys.appended(conversation, "")
    (marked,) = [k async for k in redis.scan_iter(f"{mark}*")]
    assert 0 < await redis.ttl(marked) <= APPENDED_KEPT


async def test_a_reply_lost_with_its_connection_is_answered_by_the_retry_without_a_second_append(
    events: EventLog, redis: Redis, services: Services
) -> None:
    """The worker's pipeliner through a link that carries the call to Redis, then breaks
    before the reply comes back: the call is sent again and answers that its pieces were
    appended already; the log and the channel have each event once."""
    conversation, message_id = await generating(events, redis)
    warming, warming_id = await generating(events, redis)
    await redis.script_load(APPEND_PIECES.source)  # so the held reply is the call's own
    pubsub = redis.pubsub()
    await pubsub.subscribe(keys.channel(conversation))
    await pubsub.get_message(timeout=1.0)
    with Proxy.to_url(services.redis_url) as proxy:
        database = redis.get_connection_kwargs()["db"]
        proxied = Redis.from_url(proxy.redis_url(services.redis_url, database))
        pipeliner = Pipeliner(proxied)
        pipeliner.start()
        try:
            # connected (its greeting answered) before the replies wait
            await events.append_piece(pipeliner, warming, frame("0"), warming_id, 1)
            proxy.hold_replies()
            queued = [
                events.append_piece(pipeliner, conversation, frame(str(i)), message_id, i)
                for i in range(1, MARKED_FROM + 1)
            ]
            for _ in range(100):
                if len(await log_seqs(redis, conversation)) == MARKED_FROM:
                    break
                await asyncio.sleep(0.05)
            proxy.cut()
            proxy.resume()
            assert await asyncio.wait_for(asyncio.gather(*queued), 10) == [0] * MARKED_FROM
        finally:
            await pipeliner.stop()
            await proxied.aclose()
    events_once = list(range(1, MARKED_FROM + 1))
    assert await log_seqs(redis, conversation) == events_once
    assert [k async for k in redis.scan_iter(f"{keys.appended(conversation, '')}*")]
    published = []
    while message := await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5):
        published.append(message["data"])
    await pubsub.aclose()
    assert published == [b'{"seq":%d,"type":"token","text":"%d"}' % (i, i) for i in events_once]


async def test_a_call_of_a_few_pieces_writes_their_indexes_to_gen_instead_of_a_mark(
    events: EventLog, redis: Redis, pipeliner: Pipeliner
) -> None:
    """Below MARKED_FROM pieces a call holds no mark for two minutes (in a cluster of
    conversations each on its own slot every call is one piece): sent again, it finds its
    pieces' indexes in `gen` and appends nothing twice."""
    conversation, message_id = await generating(events, redis)
    few = [(conversation, message_id, i) for i in range(1, MARKED_FROM)]
    call = pieces_call(redis, uuid.uuid4().hex, few, kept=0)
    assert await call.run() == list(range(1, MARKED_FROM))
    assert await call.run() == [0] * (MARKED_FROM - 1)
    assert await generations.last_piece(redis, conversation) == MARKED_FROM - 1
    queued = [MARKED_FROM, MARKED_FROM + 1]  # as the pipeliner sends a small batch
    assert await append_pieces(events, pipeliner, conversation, message_id, *queued) == queued
    assert await generations.last_piece(redis, conversation) == MARKED_FROM + 1
    assert not [k async for k in redis.scan_iter(f"{keys.appended(conversation, '')}*")]
    assert await log_seqs(redis, conversation) == list(range(1, MARKED_FROM + 2))


async def test_pieces_up_to_the_index_a_claim_gave_are_repeats_in_any_call(
    events: EventLog, redis: Redis, pipeliner: Pipeliner
) -> None:
    """The worker claims its generation again with the index it got to when it publishes
    the turn again: the pieces still in flight from before it are dropped."""
    conversation, message_id = await generating(events, redis)
    pieces = functools.partial(append_pieces, events, pipeliner, conversation, message_id)
    assert await pieces(1, 2) == [1, 2]
    pipe = redis.pipeline(transaction=False)
    generations.claim(pipe, conversation, message_id, "worker-a", lease=60, piece=4)
    await pipe.execute()
    assert await pieces(3, 4, 5) == [0, 0, 3]
    assert await pieces(4, 6) == [0, 4]
    assert await log_seqs(redis, conversation) == [1, 2, 3, 4]


async def test_a_call_refuses_the_pieces_of_another_generation_of_a_conversation_it_appends_to(
    events: EventLog, redis: Redis, pipeliner: Pipeliner
) -> None:
    """The generation is read once per conversation in a call; each piece is still checked
    against it."""
    conversation, message_id = await generating(events, redis)
    queued = [
        events.append_piece(pipeliner, conversation, frame("a"), message_id, 1),
        events.append_piece(pipeliner, conversation, frame("b"), uuid.uuid4(), 2),
        events.append_piece(pipeliner, conversation, frame("c"), message_id, 3),
    ]
    assert await asyncio.gather(*queued) == [1, LOST, 2]
    assert await log_seqs(redis, conversation) == [1, 2]


async def test_a_piece_of_a_generation_redis_no_longer_knows_is_lost(
    events: EventLog, redis: Redis, pipeliner: Pipeliner
) -> None:
    conversation, _ = await generating(events, redis)
    other = uuid.uuid4()
    assert await events.append_piece(pipeliner, conversation, frame("x"), other, 1) == LOST
    unloaded = uuid.uuid4()
    piece = events.append_piece(pipeliner, unloaded, frame("x"), other, 1)
    assert await piece == UNLOADED
    assert await log_seqs(redis, conversation) == []


async def test_queued_pieces_tell_their_generation_each_result_where_the_reply_is_read(
    events: EventLog, redis: Redis, pipeliner: Pipeliner
) -> None:
    """A generation's appender takes each result of the pieces it queued, in their order,
    made at the batch's call (an event given as a function encoded then); pieces queued with
    a future among them, and another generation's, keep their own results and order."""
    conversation, message_id = await generating(events, redis)
    told: list[tuple[int, object]] = []
    floor = 0
    appender = events.appender(
        conversation, message_id, lambda: floor, lambda index, result: told.append((index, result))
    )
    stranger = events.appender(conversation, uuid.uuid4())
    encoded: list[str] = []

    def late(text: str) -> bytes:
        encoded.append(text)
        return frame(text)

    appender.queue(pipeliner, frame("a"), 1)
    refused = stranger.append(pipeliner, frame("x"), 1)
    appender.queue(pipeliner, functools.partial(late, "b"), 2)
    last = appender.append(pipeliner, frame("c"), 3)
    assert encoded == []  # not before the batch is taken
    assert await last == 3
    assert await refused == LOST
    assert told == [(1, 1), (2, 2)]
    assert encoded == ["b"]
    _, logged = await events.read(conversation, after=0)
    assert [event for _, event in logged] == [
        f'{{"seq":{seq},"type":"token","text":"{text}"}}'.encode()
        for seq, text in [(1, "a"), (2, "b"), (3, "c")]
    ]
    floor = 9  # the highest seq acknowledged: the counter is below it
    appender.queue(pipeliner, frame("d"), 4)
    await stranger.append(pipeliner, frame("y"), 2)  # the batch's end
    assert told[2:] == [(4, BEHIND)]


async def test_a_generation_that_fails_to_take_a_result_stops_no_other(
    events: EventLog, redis: Redis, pipeliner: Pipeliner, caplog: pytest.LogCaptureFixture
) -> None:
    """Results go to their generation in the pipeliner's task: one that raises is logged,
    and the pipeliner goes on sending every generation's events."""
    conversation, message_id = await generating(events, redis)

    def broken(index: int, result: object) -> None:
        raise RuntimeError("a broken taker")

    events.appender(conversation, message_id, settle=broken).queue(pipeliner, frame("a"), 1)
    after = events.appender(conversation, message_id).append(pipeliner, frame("b"), 2)
    assert await asyncio.wait_for(after, 5) == 2
    later = events.appender(conversation, message_id).append(pipeliner, frame("c"), 3)
    assert await asyncio.wait_for(later, 5) == 3
    assert "was not taken" in caplog.text


async def test_a_batch_packed_by_the_pipeliner_is_the_call_hiredis_packs(
    events: EventLog, pipeliner: Pipeliner
) -> None:
    """Where the client sends a command packed as it is, the pipeliner packs `append_pieces`
    itself from what each generation packed once: the same bytes as its bound call packed
    argument by argument (frames given as bytes or made late, any number of pieces)."""
    appenders = [
        events.appender(uuid.uuid4(), uuid.uuid4(), functools.partial(int, floor))
        for floor in (0, 7, 10**12)
    ]
    pieces = [
        Piece(
            appenders[i % 3], frame(f"é {i}") if i % 2 else functools.partial(frame, "x"), i, None
        )
        for i in range(MARKED_FROM + 2)
    ]
    for chunk in (pieces[:1], pieces):
        kept = APPENDED_KEPT if len(chunk) >= MARKED_FROM else 0
        packed = pipeliner._packed_call(chunk, "parley:appended:x", MAX_EVENTS, 60, kept)
        bound = APPEND_PIECES.register(events.redis).bind(
            call_key="parley:appended:x",
            maxlen=MAX_EVENTS,
            ttl=60,
            kept=kept,
            worker=pipeliner.worker,
            piece_keys=[key for piece in chunk for key in piece.appender.keys],
            piece_args=[
                value
                for piece in chunk
                for value in (
                    piece.event if isinstance(piece.event, bytes) else piece.event(),
                    piece.appender.message_id,
                    piece.index,
                    piece.appender.floor(),
                )
            ],
        )
        assert packed.packed == hiredis.pack_command(bound.command())
        assert packed.script.sha == bound.script.sha


async def test_the_pieces_of_a_worker_whose_generation_was_taken_over_are_refused(
    events: EventLog, redis: Redis
) -> None:
    """worker-a's generation taken over by worker-b (its lease lapsed while it was cut off):
    a stale piece of worker-a's, even one indexed past worker-b's, appends nothing."""
    conversation, message_id = await generating(events, redis)  # run by worker-a
    stale, taking = Pipeliner(redis, worker="worker-a"), Pipeliner(redis, worker="worker-b")
    stale.start(), taking.start()
    try:
        assert await append_pieces(events, stale, conversation, message_id, 1) == [1]
        pipe = redis.pipeline(transaction=False)
        generations.claim(pipe, conversation, message_id, "worker-b", lease=60, piece=1)
        await pipe.execute()
        assert await append_pieces(events, taking, conversation, message_id, 2) == [2]
        assert await append_pieces(events, stale, conversation, message_id, 2, 9) == [
            TAKEN_OVER,
            TAKEN_OVER,
        ]
        assert await append_pieces(events, taking, conversation, message_id, 3) == [3]
        assert await log_seqs(redis, conversation) == [1, 2, 3]
    finally:
        await stale.stop()
        await taking.stop()


async def test_a_seq_counter_gone_back_below_an_acknowledged_seq_is_never_reused(
    events: EventLog, redis: Redis, pipeliner: Pipeliner
) -> None:
    """A failover to a replica that lacked the last two events (emulated: the counter set
    back, their log entries gone): the next piece, told the highest seq acknowledged, raises
    the counter past it and appends nothing; the following ones go on after it."""
    conversation, message_id = await generating(events, redis)
    acked = 0

    async def piece(index: int) -> int:
        nonlocal acked
        seq = await events.append_piece(
            pipeliner, conversation, frame(str(index)), message_id, index, lambda: acked
        )
        acked = max(acked, int(seq))
        return int(seq)

    assert [await piece(i) for i in (1, 2, 3)] == [1, 2, 3]
    await redis.set(keys.seq(conversation), 1, keepttl=True)
    await redis.xdel(keys.log(conversation), "2-0", "3-0")
    assert await piece(4) == BEHIND
    assert int(await redis.get(keys.seq(conversation))) == 3
    assert [await piece(i) for i in (5, 6)] == [4, 5]
    assert await log_seqs(redis, conversation) == [1, 4, 5]


def everything_of(conversation: uuid.UUID) -> list[str]:
    """Every key of a conversation's Redis state."""
    return [
        keys.seq(conversation),
        keys.meta(conversation),
        keys.log(conversation),
        keys.recent(conversation),
        keys.said(conversation),
        keys.persisted(conversation),
        keys.history(conversation),
        keys.generation(conversation),
    ]


async def test_a_turn_published_again_on_an_emptied_redis_goes_past_the_floor_in_one_go(
    events: EventLog, redis: Redis
) -> None:
    """Redis restarted empty under a generation whose events were acknowledged up to seq 3:
    seeded again from PostgreSQL (nothing persisted: seq 0) and the counter raised to the
    floor once, every event the worker publishes again is appended after 3, none refused
    BEHIND (a refused first one had the worker publish the whole turn a second time)."""
    conversation, message_id = await generating(events, redis)
    pipeliner = Pipeliner(redis)
    pipeliner.start()
    try:
        pieces = functools.partial(append_pieces, events, pipeliner, conversation, message_id)
        assert await pieces(1, 2, 3) == [1, 2, 3]
        await redis.delete(*everything_of(conversation))  # what an emptied Redis holds of it
        assert await pieces(4) == [UNLOADED]
        await loaded(events, last_seq=0, conversation=conversation)
        await claim_generation(redis, conversation, message_id)
        assert await events.raise_seq(conversation, 3)
        assert not await events.raise_seq(conversation, 3)
        republished = [
            events.append_piece(pipeliner, conversation, frame(str(i)), message_id, i, lambda: 3)
            for i in (5, 6, 7)
        ]
        assert list(await asyncio.gather(*republished)) == [4, 5, 6]
    finally:
        await pipeliner.stop()
    assert await log_seqs(redis, conversation) == [4, 5, 6]


async def test_the_log_keeps_at_most_max_events_once_persisted(
    events: EventLog, redis: Redis
) -> None:
    conversation = await loaded(events)
    await redis.set(keys.persisted(conversation), 10_000, keepttl=True)  # all persisted
    for i in range(250):
        await events.append(conversation, frame(str(i)))
    kept = await log_seqs(redis, conversation)
    assert MAX_EVENTS <= len(kept) < 250 and kept[-1] == 250


def said(text: str) -> Message:
    return Message(
        id=uuid.uuid4(), role="user", content=text, status="complete", created_at=utcnow()
    )


async def test_the_transcript_is_kept_only_while_it_is_the_latest_persisted(
    events: EventLog, redis: Redis
) -> None:
    conversation = await loaded(events, last_seq=4)  # load keeps what it read: nothing
    assert await events.history(conversation) == CachedHistory(4, [])
    await redis.delete(keys.history(conversation))
    transcript = [said("one")]
    await events.cache_history(conversation, 3, transcript)  # older than what is persisted
    assert await events.history(conversation) is None
    await events.cache_history(conversation, 4, transcript)
    cached = await events.history(conversation)
    assert cached is not None and (cached.seq, cached.messages) == (4, transcript)
    await events.mark_persisted(conversation, 6)  # a turn persisted since: the copy is stale
    assert await events.history(conversation) is None
    await events.cache_history(conversation, 4, transcript)  # read before that persist
    assert await events.history(conversation) is None


async def behind(redis: Redis, conversation: uuid.UUID, seq: int, persisted: int) -> None:
    """Set the conversation back as a replica promoted without its events after `seq` (and
    the persist of them) holds it: the counter and `persisted` lowered, those events gone."""
    head = int(await redis.get(keys.seq(conversation)))
    await redis.set(keys.seq(conversation), seq, keepttl=True)
    await redis.set(keys.persisted(conversation), persisted, keepttl=True)
    await redis.delete(keys.history(conversation))
    gone = [f"{s}-0" for s in range(seq + 1, head + 1)]
    if gone:
        await redis.xdel(keys.log(conversation), *gone)


async def test_a_transcript_read_from_postgresql_raises_what_redis_lost_to_it(
    events: EventLog, redis: Redis
) -> None:
    """Redis behind PostgreSQL (the counter at 3 and `persisted` at 2 where PostgreSQL holds
    up to 6): keeping the transcript just read raises the counter to PostgreSQL's `last_seq`
    and `persisted` to the transcript's seq, and keeps the copy; the next event is 7. A
    floor below what Redis holds lowers nothing."""
    conversation = await loaded(events, last_seq=2)
    for text in ("a", "b", "c", "d"):
        await events.append(conversation, frame(text))
    await behind(redis, conversation, seq=3, persisted=2)
    transcript = [said("one")]
    await events.cache_history(conversation, 5, transcript, last_seq=6)
    assert await events.head(conversation) == 6
    assert await events.history(conversation) == CachedHistory(5, transcript)
    assert await events.append(conversation, frame("e")) == 7
    await events.cache_history(conversation, 4, transcript, last_seq=5)
    assert await events.head(conversation) == 7
    assert int(await redis.get(keys.persisted(conversation))) == 5


async def test_a_transcript_too_large_to_keep_still_raises_the_counter(
    events: EventLog, redis: Redis
) -> None:
    conversation = await loaded(events, last_seq=2)
    huge = [said("x" * HISTORY_CACHED_BYTES)]
    await events.cache_history(conversation, 4, huge, last_seq=4)
    assert await events.head(conversation) == 4
    assert await events.history(conversation) is None


async def test_a_persist_marked_past_the_counter_raises_it(events: EventLog, redis: Redis) -> None:
    """A replica promoted without a turn's last events, then told that PostgreSQL holds
    them: the counter goes past them, not back over them."""
    conversation = await loaded(events, last_seq=2)
    for text in ("a", "b", "c"):
        await events.append(conversation, frame(text))
    await behind(redis, conversation, seq=3, persisted=2)
    await events.mark_persisted(conversation, 5)
    assert await events.head(conversation) == 5
    assert await events.append(conversation, frame("d")) == 6


async def test_load_keeps_the_transcript_it_was_given_as_the_joins_copy(
    events: EventLog,
) -> None:
    meta = conversation_row(last_seq=3)
    transcript = [said("one"), said("two")]
    await events.load("alice", meta, 3, 3, transcript)
    assert await events.history(meta.id) == CachedHistory(3, transcript)


async def test_a_forgotten_conversation_keeps_no_transcript(events: EventLog, redis: Redis) -> None:
    conversation = await loaded(events, last_seq=2)
    await events.cache_history(conversation, 2, [said("one")])
    await events.forget(conversation)
    assert not await redis.exists(keys.history(conversation))


@pytest.mark.counts_commands
async def test_a_join_reads_the_row_the_events_and_the_transcript_in_one_script_call(
    events: EventLog, redis: Redis
) -> None:
    conversation = await loaded(events, last_seq=2)
    await events.cache_history(conversation, 2, transcript := [said("one")])
    for text in ("a", "b", "c"):
        await events.append(conversation, frame(text))
    await events.opening(conversation, 3)  # Redis learns the script
    calls = await script_calls(redis)
    rejoin = await events.opening(conversation, 3)
    assert await script_calls(redis) == calls + 1
    assert rejoin.meta == await cached_row(events, conversation) and rejoin.meta is not None
    assert (rejoin.head, [seq for seq, _ in rejoin.events], rejoin.history) == (5, [4, 5], None)
    fresh = await events.opening(conversation, None)
    assert fresh.history is not None and (fresh.history.seq, fresh.history.messages) == (
        2,
        transcript,
    )
    assert [seq for seq, _ in fresh.events] == [3, 4, 5]
    await events.mark_persisted(conversation, 4)  # the copy is stale: no transcript
    stale = await events.opening(conversation, None)
    assert (stale.history, stale.head, stale.meta) == (None, 5, rejoin.meta)
    assert (await events.opening(uuid.uuid4(), 0)).meta is None  # not in Redis


@pytest.mark.counts_commands
async def test_joins_asked_together_are_one_script_call_each_answered_as_alone(
    events: EventLog, redis: Redis
) -> None:
    """Thirty sockets joining six conversations at once, with and without `after` (one
    conversation not in Redis): each gets what it gets alone, and all of them one call."""
    conversations = [await loaded(events, last_seq=2) for _ in range(5)]
    for n, conversation in enumerate(conversations):
        await events.cache_history(conversation, 2, [said(f"said {n}")])
        for i in range(n):
            await events.append(conversation, frame(str(i)))
    asked = [(c, after) for c in [*conversations, uuid.uuid4()] for after in (None, 0, 2, 2, 3)]
    alone = [await events.opening(c, after) for c, after in asked]
    calls = await script_calls(redis)
    together = await asyncio.gather(*(events.opening(c, after) for c, after in asked))
    assert await script_calls(redis) == calls + 1
    assert together == alone
    assert [o.head for o in alone[::5]] == [2, 3, 4, 5, 6, UNLOADED]
    assert [len(o.events) for o in alone[10:15]] == [2, 2, 2, 2, 1]  # seqs 3 and 4 logged


async def test_a_join_whose_answer_cannot_be_read_fails_alone(
    events: EventLog, redis: Redis
) -> None:
    """A conversation whose cached row is not what Parley writes, joined together with a
    sound one: the sound one is answered, the other raises."""
    sound, broken = await loaded(events, last_seq=1), await loaded(events, last_seq=1)
    await redis.set(keys.meta(broken), b"not a row")
    answered, failed = await asyncio.gather(
        events.opening(sound, 0), events.opening(broken, 0), return_exceptions=True
    )
    assert isinstance(answered, Opening) and answered.meta is not None and answered.head == 1
    assert isinstance(failed, msgspec.DecodeError)


async def script_commands(redis: Redis) -> int:
    """How many SCRIPT commands (LOAD, EXISTS, FLUSH…) Redis has run."""
    stats = await redis.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k.startswith("cmdstat_script"))


@pytest.mark.counts_commands
async def test_a_batch_of_pieces_is_one_round_trip_and_survives_redis_forgetting_its_scripts(
    events: EventLog, redis: Redis, pipeliner: Pipeliner
) -> None:
    conversation, message_id = await generating(events, redis)
    pieces = functools.partial(append_pieces, events, pipeliner, conversation, message_id)
    assert await pieces(1, 2) == [1, 2]
    before = await script_commands(redis)
    assert await pieces(3, 4) == [3, 4]
    assert await script_commands(redis) == before  # no SCRIPT EXISTS ahead of the batch
    await redis.script_flush()  # as after a restart of Redis
    assert await pieces(5, 6) == [5, 6]  # loaded again, then run in order
    assert await log_seqs(redis, conversation) == [1, 2, 3, 4, 5, 6]


async def test_begin_marks_the_generation_and_reads_nothing_of_an_unloaded_conversation(
    events: EventLog, redis: Redis
) -> None:
    conversation, message_id = uuid.uuid4(), uuid.uuid4()
    begun = await events.begin(conversation, message_id, "worker-a", lease=60)
    assert begun == Begun(history=None, meta=None, cancelled=None, piece=0)
    assert await generations.message_id(redis, conversation) == str(message_id)
    assert await generations.worker(redis, conversation) == "worker-a"
    assert 0 < await redis.ttl(keys.generation(conversation)) <= 60


@pytest.mark.counts_commands
async def test_begin_reads_the_context_the_cancel_mark_and_the_last_piece_in_one_call(
    events: EventLog, redis: Redis, pipeliner: Pipeliner
) -> None:
    meta = conversation_row()
    said = Message(
        id=uuid.uuid4(), role="user", content="hi", status="complete", created_at=utcnow()
    )
    await events.load("alice", meta, 1, 1, [said])
    message_id = uuid.uuid4()
    await claim_generation(redis, meta.id, message_id)  # by worker-a
    await append_pieces(events, pipeliner, meta.id, message_id, 1, 2)
    await redis.set(keys.cancelled(meta.id), str(message_id))
    calls = await script_calls(redis)
    begun = await events.begin(meta.id, message_id, "worker-b", lease=60)
    assert await script_calls(redis) == calls + 1
    assert begun.history == [said] == await events.recent(meta.id)
    assert begun.meta is not None and begun.meta == await cached_row(events, meta.id)
    assert begun.meta.owner == "alice" and begun.meta.meta.id == meta.id
    assert (begun.cancelled, begun.piece) == (str(message_id), 2)
    assert await generations.worker(redis, meta.id) == "worker-b"
    assert await generations.last_piece(redis, meta.id) == 2  # kept for the takeover


async def test_begins_sent_together_each_get_their_own_conversation(
    events: EventLog, redis: Redis, pipeliner: Pipeliner
) -> None:
    conversations = [await loaded(events) for _ in range(3)]
    replies = [uuid.uuid4() for _ in conversations]
    await redis.set(keys.cancelled(conversations[1]), str(replies[1]))
    begun = await asyncio.gather(
        *(
            events.begin(c, reply, "worker-a", 60, pipeliner)
            for c, reply in zip(conversations, replies, strict=True)
        )
    )
    assert [b.meta.meta.id if b.meta else None for b in begun] == conversations
    assert [b.cancelled for b in begun] == [None, str(replies[1]), None]
    for c, reply in zip(conversations, replies, strict=True):
        assert await generations.message_id(redis, c) == str(reply)


async def script_calls(redis: Redis) -> int:
    """How many script calls (EVALSHA, EVAL) Redis has run."""
    stats = await redis.info("commandstats")
    return sum(
        int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "eval")
    )


@pytest.mark.counts_commands
async def test_the_pieces_of_many_conversations_queued_together_are_one_script_call(
    events: EventLog, redis: Redis, pipeliner: Pipeliner
) -> None:
    """Each piece gets what it would get alone (its conversation's next seq, a repeat's 0,
    LOST, UNLOADED), its event is logged and published, and the batch is one call."""
    first, second, lost = [await loaded(events, last_seq=n) for n in (10, 20, 30)]
    generation = {c: uuid.uuid4() for c in (first, second, lost)}
    for c in (first, second, lost):
        await claim_generation(redis, c, generation[c])
    pubsub = redis.pubsub()
    await pubsub.subscribe(keys.channel(second))
    try:
        await pubsub.get_message(timeout=1.0)  # the subscribe confirmation
        await events.append_piece(pipeliner, first, frame("0"), generation[first], 1)
        pipe = redis.pipeline(transaction=False)  # claimed again up to it, as a republish does
        generations.claim(pipe, first, generation[first], "worker-a", lease=60, piece=1)
        await pipe.execute()
        before = await script_calls(redis)
        queued = [
            events.append_piece(pipeliner, first, frame("a"), generation[first], 1),  # repeat
            events.append_piece(pipeliner, second, frame("b"), generation[second], 1),
            events.append_piece(pipeliner, first, frame("c"), generation[first], 2),
            events.append_piece(pipeliner, lost, frame("d"), uuid.uuid4(), 1),
            events.append_piece(pipeliner, uuid.uuid4(), frame("e"), uuid.uuid4(), 1),
            events.append_piece(pipeliner, second, frame("f"), generation[second], 2),
        ]
        assert await asyncio.gather(*queued) == [0, 21, 12, LOST, UNLOADED, 22]
        assert await script_calls(redis) - before == 1
        published = [
            await pubsub.get_message(ignore_subscribe_messages=True, timeout=2.0) for _ in range(2)
        ]
        assert [m and m["data"] for m in published] == [
            b'{"seq":21,"type":"token","text":"b"}',
            b'{"seq":22,"type":"token","text":"f"}',
        ]
    finally:
        await pubsub.aclose()
    assert (await events.read(first, after=10))[1] == [
        (11, b'{"seq":11,"type":"token","text":"0"}'),
        (12, b'{"seq":12,"type":"token","text":"c"}'),
    ]
    assert await log_seqs(redis, second) == [21, 22]
    assert await log_seqs(redis, lost) == []


async def test_a_call_queued_between_pieces_keeps_its_place_among_them(
    events: EventLog, redis: Redis, pipeliner: Pipeliner
) -> None:
    conversation, message_id = await generating(events, redis)
    append = APPEND.register(redis).bind(
        **event_keys(conversation), frame=frame("between"), maxlen=MAX_EVENTS, ttl=60
    )
    await redis.script_load(APPEND.source)  # known to Redis, as after a first use
    await redis.script_load(APPEND_PIECES.source)
    queued = [
        events.append_piece(pipeliner, conversation, frame("1"), message_id, 1),
        pipeliner.call(append),
        events.append_piece(pipeliner, conversation, frame("2"), message_id, 2),
    ]
    assert await asyncio.gather(*queued) == [1, 2, 3]
    logged = (await events.read(conversation, after=0))[1]
    assert [event for _, event in logged] == [
        b'{"seq":1,"type":"token","text":"1"}',
        b'{"seq":2,"type":"token","text":"between"}',
        b'{"seq":3,"type":"token","text":"2"}',
    ]


@pytest.mark.counts_commands
async def test_batches_go_at_least_the_interval_apart_and_the_first_at_once(
    events: EventLog, redis: Redis
) -> None:
    """A piece after a pause is sent at once; the pieces queued within the interval after it
    wait for the interval's end and go together, in one script call."""
    conversation, message_id = await generating(events, redis)
    pipeliner = Pipeliner(redis, interval=1.0)
    pipeliner.start()
    await redis.script_load(APPEND_PIECES.source)
    try:
        before = await script_calls(redis)
        loop = asyncio.get_running_loop()
        queued_at = loop.time()
        first = events.append_piece(pipeliner, conversation, frame("1"), message_id, 1)
        assert await asyncio.wait_for(first, 0.9) == 1
        later = [
            events.append_piece(pipeliner, conversation, frame(str(i)), message_id, i)
            for i in (2, 3)
        ]
        assert await asyncio.wait_for(asyncio.gather(*later), 5) == [2, 3]
        assert loop.time() - queued_at >= 1.0
        assert await script_calls(redis) - before == 2
    finally:
        await pipeliner.stop()


async def test_a_hurried_batch_does_not_wait_for_the_interval(
    events: EventLog, redis: Redis
) -> None:
    """A reply's first token goes with the next batch at once (`hurry`), even while the
    pipeliner waits for the interval to pass; what follows it waits for the interval again."""
    conversation, message_id = await generating(events, redis)
    pipeliner = Pipeliner(redis, interval=5.0)
    pipeliner.start()
    await redis.script_load(APPEND_PIECES.source)
    try:
        assert (
            await asyncio.wait_for(
                events.append_piece(pipeliner, conversation, frame("1"), message_id, 1), 4
            )
            == 1
        )
        waiting = events.append_piece(pipeliner, conversation, frame("2"), message_id, 2)
        await asyncio.sleep(0.05)  # the pipeliner is in its wait for the interval now
        hurried = events.append_piece(pipeliner, conversation, frame("3"), message_id, 3)
        pipeliner.hurry()
        assert await asyncio.wait_for(asyncio.gather(waiting, hurried), 4) == [2, 3]
        after = events.append_piece(pipeliner, conversation, frame("4"), message_id, 4)
        done, _ = await asyncio.wait([after], timeout=0.5)
        assert not done  # the interval applies again after the hurried batch
        pipeliner.hurry()
        assert await asyncio.wait_for(after, 4) == 4
    finally:
        await pipeliner.stop()


async def test_an_expressed_piece_goes_at_once_while_a_batch_waits(
    events: EventLog, redis: Redis
) -> None:
    """A reply's first token, expressed, is sent in a call of its own at once: not with the
    next batch, which here waits for the interval (a `hurry` would send that batch too)."""
    waiting_in, message_id = await generating(events, redis)
    expressed_in, expressed_id = await generating(events, redis)
    pipeliner = Pipeliner(redis, interval=5.0)
    pipeliner.start()
    await redis.script_load(APPEND_PIECES.source)
    try:
        first = events.append_piece(pipeliner, waiting_in, frame("1"), message_id, 1)
        assert await asyncio.wait_for(first, 4) == 1
        waiting = events.append_piece(pipeliner, waiting_in, frame("2"), message_id, 2)
        await asyncio.sleep(0.05)  # the pipeliner is in its wait for the interval now
        expressed = events.append_piece(
            pipeliner, expressed_in, frame("a"), expressed_id, 1, express=True
        )
        assert await asyncio.wait_for(expressed, 4) == 1
        assert not waiting.done()
        pipeliner.hurry()
        assert await asyncio.wait_for(waiting, 4) == 2
    finally:
        await pipeliner.stop()


class SlowExpress(Pipeliner):
    """Its expressed calls reach Redis `delay` seconds late (a slow connection)."""

    delay = 0.3

    async def _send(self, batch: Any) -> None:
        task = asyncio.current_task()
        if task is not None and task.get_name() == "parley-pipeliner-express":
            await asyncio.sleep(self.delay)
        await super()._send(batch)


async def test_a_piece_expressed_while_the_batch_waits_for_another_is_not_passed(
    events: EventLog, redis: Redis
) -> None:
    """The next batch waits for every expressed call in flight, also one expressed while it
    was waiting for an earlier one: a conversation's second event never passes its first."""
    (a, a_id), (b, b_id), (x, x_id) = [await generating(events, redis) for _ in range(3)]
    pipeliner = SlowExpress(redis)
    pipeliner.start()
    await redis.script_load(APPEND_PIECES.source)
    try:
        first_of_a = events.append_piece(pipeliner, a, frame("a"), a_id, 1, express=True)
        other = events.append_piece(pipeliner, x, frame("x"), x_id, 1)
        await asyncio.sleep(0.1)  # the batch now waits for a's expressed call
        first_of_b = events.append_piece(pipeliner, b, frame("b1"), b_id, 1, express=True)
        second_of_b = events.append_piece(pipeliner, b, frame("b2"), b_id, 2)
        results = await asyncio.wait_for(
            asyncio.gather(first_of_a, other, first_of_b, second_of_b), 10
        )
        assert results == [1, 1, 1, 2]
    finally:
        await pipeliner.stop()
    logged = (await events.read(b, after=0))[1]
    assert [event for _, event in logged] == [
        b'{"seq":1,"type":"token","text":"b1"}',
        b'{"seq":2,"type":"token","text":"b2"}',
    ]


async def test_events_queued_after_an_expressed_piece_follow_it_in_order(
    events: EventLog, redis: Redis, pipeliner: Pipeliner
) -> None:
    """The batch taken while an expressed piece is in flight is sent once it is answered, so
    a conversation's later events never pass it."""
    conversation, message_id = await generating(events, redis)
    await redis.script_load(APPEND_PIECES.source)
    for round_ in range(5):
        base = round_ * 3
        queued = [
            events.append_piece(
                pipeliner, conversation, frame(str(base + 1)), message_id, base + 1, express=True
            ),
            *(
                events.append_piece(pipeliner, conversation, frame(str(i)), message_id, i)
                for i in (base + 2, base + 3)
            ),
        ]
        assert await asyncio.wait_for(asyncio.gather(*queued), 4) == [base + 1, base + 2, base + 3]
    logged = (await events.read(conversation, after=0))[1]
    assert [event for _, event in logged] == [
        f'{{"seq":{i},"type":"token","text":"{i}"}}'.encode() for i in range(1, 16)
    ]
