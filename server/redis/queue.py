"""The fair queue in front of the workers: turns wait per user and are handed to the turns
Stream round-robin across users, as free generation slots allow.

`say`/`regenerate` (with `limits.fair_queue`) push the job onto the user's list
`keys.queue(user)` and put the user in the ring `keys.QUEUE_RING` when their list was empty.
`dispatch` reads the ring, the users' queued and running counts and the workers' capacity
(the sum of `worker.concurrency` over the workers whose heartbeat in `keys.SLOTS` is alive),
lets protocol/fairness.py pick, and has `scripts/dispatch.lua` move the picked turns onto the
Stream, which checks the capacity and the per-user cap again, atomically: a concurrent
dispatcher can make a pick less fair, never overfill. The turns on the Stream (delivered or
not, their workers alive or not) are the ones running: a worker's `release` deletes an entry
and lowers the user's running count in one step, so a worker that dies loses no turn (its
entries stay pending and are taken over) and frees no slot it did not free.

Positions: `announce` computes every waiting turn's place (protocol/fairness.positions) and
appends `queued {message_id, position}` to its conversation when the tabs have not been
told it (`scripts/announce.lua`: never more often than once a second per turn, and never
once the turn has left the queue). The web process announces right after accepting a turn;
workers announce and dispatch on a short tick (one of them per tick, `keys.QUEUE_ANNOUNCER`)
and after every turn they finish.

One Redis node: the dispatch script touches the ring, every shard of the Stream (a turn goes
to its conversation's, `keys.shard_of`) and every picked user's keys (each user's keys share
the user's hash tag). On a Redis Cluster the fair queue is off (server/app/runtime.py).
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Final

import msgspec
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from protocol import frames as f
from protocol.fairness import Waiting, pick, positions
from server.redis import keys, scripts
from server.redis.eventlog import encode, event_keys

log = logging.getLogger("parley.queue")

DISPATCH: Final = scripts.load("dispatch")
RELEASE: Final = scripts.load("release")
UNQUEUE: Final = scripts.load("unqueue")
ANNOUNCE: Final = scripts.load("announce", functions=["lib_append_event"])

MAX_SHOWN: Final = 1000
"""Per user, the waiting turns whose position is announced (the rest wait unannounced)."""


class _Queued(msgspec.Struct):
    """What the queue needs of a waiting job."""

    conversation: uuid.UUID
    message_id: uuid.UUID


_queued = msgspec.json.Decoder(_Queued)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class FairQueue:
    def __init__(
        self,
        redis: Redis,
        per_user: int,
        max_events: int,
        ttl: int,
        *,
        enabled: bool = True,
        shards: int = 1,
    ) -> None:
        self.redis = redis
        self.shards = shards
        """The turns Stream's shards; `dispatch` puts a turn on its conversation's."""
        self.per_user = per_user
        self.max_events = max_events
        self.ttl = ttl
        self.enabled = enabled
        self.lease = 3
        """Seconds a waiting turn's `generating` mark lives; each announcement renews it."""
        self._dispatch = DISPATCH.register(redis)
        self._release = RELEASE.register(redis)
        self._unqueue = UNQUEUE.register(redis)
        self._announce = ANNOUNCE.register(redis)

    # ------------------------------------------------------------------ capacity

    @staticmethod
    def beat(pipe: Pipeline, worker: str, slots: int, lease: float) -> None:
        """Queue a worker's share of the capacity, alive for `lease` seconds."""
        deadline = int((time.time() + lease) * 1000)
        pipe.hset(keys.SLOTS, worker, f"{slots} {deadline}")

    @staticmethod
    async def leave(redis: Redis, worker: str) -> None:
        await redis.hdel(keys.SLOTS, worker)

    async def capacity(self) -> int:
        """The live workers' slots; a worker whose heartbeat ran out is forgotten."""
        now = time.time() * 1000
        total, dead = 0, []
        beats = await self.redis.hgetall(keys.SLOTS)
        for worker, value in beats.items():
            slots, _, deadline = _text(value).partition(" ")
            if int(deadline or 0) < now:
                dead.append(worker)
            else:
                total += int(slots)
        if dead:
            await self.redis.hdel(keys.SLOTS, *dead)
        return total

    # ------------------------------------------------------------------ moving turns

    async def waiting(self) -> list[Waiting]:
        """The ring, in serving order, with each user's queued and running counts."""
        users = [_text(user) for user in await self.redis.lrange(keys.QUEUE_RING, 0, -1)]
        if not users:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for user in users:
            pipe.llen(keys.queue(user))
            pipe.get(keys.running(user))
        counts = await pipe.execute()
        return [
            Waiting(user, int(counts[2 * i]), int(counts[2 * i + 1] or 0))
            for i, user in enumerate(users)
        ]

    async def dispatch(self) -> list[str]:
        """Hand waiting turns to the workers, as many as free slots; their message ids."""
        if not self.enabled:
            return []
        ring = await self.waiting()
        if not ring:
            return []
        capacity = await self.capacity()
        free = capacity - await self._on_streams()
        users = pick(ring, free, self.per_user)
        if not users:
            return []
        user_keys = [key for user in users for key in (keys.queue(user), keys.running(user))]
        started: list[bytes] = await self._dispatch(
            ring_key=keys.QUEUE_RING,
            told_key=keys.QUEUE_TOLD,
            rest=[*self._streams(), *user_keys],
            capacity=capacity,
            per_user=self.per_user,
            shards=self.shards,
            picks=users,
        )
        return [m.decode() for m in started]

    def _streams(self) -> list[str]:
        return [keys.turns(shard) for shard in range(self.shards)]

    async def _on_streams(self) -> int:
        """The turns on the Stream's shards: the ones running."""
        pipe = self.redis.pipeline(transaction=False)
        for stream in self._streams():
            pipe.xlen(stream)
        return sum(await pipe.execute())

    async def release(
        self, stream: str, group: str, entry_id: bytes, user: str, *, buried: bool
    ) -> bool:
        """A worker is done with a turn of `stream` the queue counted (or buried it): free
        its slot. Whether turns wait in the queue (for one of them to take the slot)."""
        waiting: int = await self._release(
            turns_key=stream,
            running_key=keys.running(user),
            ring_key=keys.QUEUE_RING,
            group=group,
            entry_id=entry_id,
            buried="1" if buried else "0",
        )
        return waiting > 0

    async def unqueue(self, user: str, message_id: str, stream: str) -> bool:
        """Take a cancelled turn out of the queue onto its conversation's `stream`, for a
        worker to end it at once."""
        return bool(
            await self._unqueue(
                queue_key=keys.queue(user),
                ring_key=keys.QUEUE_RING,
                turns_key=stream,
                running_key=keys.running(user),
                told_key=keys.QUEUE_TOLD,
                user=user,
                message_id=message_id,
            )
        )

    # ------------------------------------------------------------------ positions

    async def take_turn(self, seconds: float) -> bool:
        """Whether this process announces this tick (one process per `seconds`)."""
        return bool(
            await self.redis.set(keys.QUEUE_ANNOUNCER, "1", nx=True, px=int(seconds * 1000))
        )

    async def announce(self) -> int:
        """Tell each waiting turn's tabs its position where it changed, and keep its
        conversation's `generating` mark alive (no worker renews it yet); events appended."""
        if not self.enabled:
            return 0
        ring = await self.waiting()
        if not ring:
            return 0
        places = positions(ring)
        pipe = self.redis.pipeline(transaction=False)
        for waiting in ring:
            pipe.lrange(keys.queue(waiting.user), 0, MAX_SHOWN - 1)
        queues: list[list[bytes]] = await pipe.execute()
        now_ms = int(time.time() * 1000)
        conversations = [_queued.decode(job).conversation for jobs in queues for job in jobs]
        pipe = self.redis.pipeline(transaction=False)
        for waiting, jobs in zip(ring, queues, strict=True):
            for job, position in zip(jobs, places[waiting.user], strict=False):
                await self._tell(job, position, now_ms).run(pipe)
        for conversation in conversations:
            pipe.expire(keys.generation(conversation), self.lease)
        results = await pipe.execute()
        return sum(1 for seq in results[: len(results) - len(conversations)] if seq)

    def _tell(self, raw: bytes, position: int, now_ms: int) -> scripts.Call:
        job = _queued.decode(raw)
        frame = f.Queued(
            conversation=job.conversation, message_id=job.message_id, position=position
        )
        return self._announce.bind(
            told_key=keys.QUEUE_TOLD,
            **event_keys(job.conversation),
            message_id=str(job.message_id),
            position=position,
            now_ms=now_ms,
            frame=encode(frame),
            maxlen=self.max_events,
            ttl=self.ttl,
        )
