"""The fair queue in front of the workers: turns wait per user and are handed to the turns
Stream round-robin across users, as free generation slots allow.

`say`/`regenerate` (with `limits.fair_queue`) start a turn in their own script call when
nobody waits, the user runs fewer than `limits.generations_per_user` and a slot is free
(scripts/lib_fair_queue.lua); otherwise they push the job onto the user's list
`keys.queue(user)`, put the user in the ring `keys.QUEUE_RING` when their list was empty, and
the web process calls `serve` here: dispatch, then announce, from one read of the queue
(`_read`: the ring, then in one pipeline every ring user's counts and first waiting jobs, the
workers' slots, the `told` hash and the Stream's length). Dispatching lets
protocol/fairness.py pick within the free slots and has `scripts/dispatch.lua` move the
picked turns onto the Stream,
which checks the capacity and the per-user cap again, atomically: a concurrent dispatcher can
make a pick less fair, never overfill. The turns on the Stream (delivered or not, their
workers alive or not) are the ones running: a worker's `release` deletes an entry and lowers
the user's running count in one step, so a worker that dies loses no turn (its entries stay
pending and are taken over) and frees no slot it did not free; `release` answers whether
turns wait, and only then does the worker serve.

Positions: `announce` computes every waiting turn's place (protocol/fairness.positions) and
appends `queued {message_id, position}` to its conversation when protocol/fairness.due says
so (once a second at most, position 0 at once, never once the turn left the queue;
`scripts/announce.lua` decides again atomically, and is called only for the turns due), the
places computed on the read with the turns just handed over taken out (`_after_dispatch`).
The web process serves right after queueing a turn, a worker after releasing one while turns
wait, and the workers on a short tick (one of them per tick, `keys.QUEUE_ANNOUNCER`), which
also renews the waiting turns' `generating` marks and covers a worker joining or dying.

Every key of the queue carries one hash tag (`keys.QUEUE_TAG`, the slot of turns shard 0):
the ring, `told`, the workers' slots, each user's waiting list and running count. On one
Redis, the dispatch script touches those and every shard of the Stream (a turn goes to its
conversation's, `keys.shard_of`). On a Redis Cluster every turn that goes through the queue
goes to shard 0, so `enter` (the queue's step of a turn, after its conversation's commit:
server/redis/turns.py), `dispatch`, `release` and `unqueue` each touch that one slot and
decide atomically, as on one Redis; only `announce` is split, into `announce_told` on the
queue's slot (decides and records) then `queued_event` on the conversation's (appends, and
only while no worker has claimed the turn, so `queued` never follows `start`). Why one slot
rather than the users' own: the hand-over moves a job from a user's list to the Stream,
counts it against the capacity and the user's cap and rotates the ring; split across slots
that would be several steps, and a process dying between two of them would lose a turn or
leak a slot for good. The cost is that every turn's queue steps (2 to 4 script calls per
turn, none per token) land on one shard.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import Final

import msgspec
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from protocol import frames as f
from protocol.fairness import Waiting, due, pick, positions, told
from server.redis import keys, scripts
from server.redis.client import is_cluster
from server.redis.eventlog import encode, event_keys

log = logging.getLogger("parley.queue")

DISPATCH: Final = scripts.load("dispatch")
RELEASE: Final = scripts.load("release")
UNQUEUE: Final = scripts.load("unqueue")
ANNOUNCE: Final = scripts.load("announce", functions=["lib_announce", "lib_append_event"])
ENTER: Final = scripts.load("enter", functions=["lib_now", "lib_fair_queue"])
ANNOUNCE_TOLD: Final = scripts.load("announce_told", functions=["lib_announce"])
QUEUED_EVENT: Final = scripts.load("queued_event", functions=["lib_append_event"])

ENTERED_TTL: Final = 3600
"""Seconds a cluster turn's `entered` mark outlives its `enter` (far past any retry)."""

MAX_SHOWN: Final = 1000
"""Per user, the waiting turns whose position is announced (the rest wait unannounced)."""


class _Queued(msgspec.Struct):
    """What the queue needs of a waiting job."""

    conversation: uuid.UUID
    message_id: uuid.UUID


_queued = msgspec.json.Decoder(_Queued)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One read of the fair queue (`FairQueue._read`)."""

    ring: list[Waiting]
    jobs: list[list[bytes]]
    """Each ring user's first `MAX_SHOWN` waiting jobs, oldest first."""
    capacity: int
    told: dict[str, str]
    """The `told` hash: message id -> `position:ms`."""
    on_streams: int


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
        self.in_steps = is_cluster(redis)
        """On a Redis Cluster: every queued turn goes to turns shard 0 (the queue's slot),
        and positions are told in two single-slot steps."""
        self.shards = 1 if self.in_steps else shards
        """The turns Stream's shards; `dispatch` puts a turn on its conversation's."""
        self.per_user = per_user
        self.max_events = max_events
        self.ttl = ttl
        self.enabled = enabled
        self.lease = 3
        """Seconds a waiting turn's `generating` mark lives; the workers' tick renews it."""
        self._dispatch = DISPATCH.register(redis)
        self._release = RELEASE.register(redis)
        self._unqueue = UNQUEUE.register(redis)
        self._announce = ANNOUNCE.register(redis)
        self._enter = ENTER.register(redis)
        self._announce_told = ANNOUNCE_TOLD.register(redis)
        self._queued_event = QUEUED_EVENT.register(redis)

    # ------------------------------------------------------------------ capacity

    @staticmethod
    def beat(pipe: Pipeline, worker: str, slots: int, lease: float) -> None:
        """Queue a worker's share of the capacity, alive for `lease` seconds."""
        deadline = int((time.time() + lease) * 1000)
        pipe.hset(keys.SLOTS, worker, f"{slots} {deadline}")

    @staticmethod
    async def leave(redis: Redis, worker: str) -> None:
        await redis.hdel(keys.SLOTS, worker)

    async def _capacity(self, beats: dict[bytes, bytes]) -> int:
        """The live workers' slots in `beats` (the `slots` hash); a worker whose heartbeat
        ran out is forgotten."""
        now = time.time() * 1000
        total, dead = 0, []
        for worker, value in beats.items():
            slots, _, deadline = _text(value).partition(" ")
            if int(deadline or 0) < now:
                dead.append(worker)
            else:
                total += int(slots)
        if dead:
            await self.redis.hdel(keys.SLOTS, *dead)
        return total

    # ------------------------------------------------------------------ one read

    async def _read(self) -> Snapshot | None:
        """The queue as it stands, in two round trips (the ring, then everything about its
        users, the workers and the streams in one pipeline); None when nobody waits."""
        users = [_text(user) for user in await self.redis.lrange(keys.QUEUE_RING, 0, -1)]
        if not users:
            return None
        async with self.redis.pipeline(transaction=False) as pipe:
            for user in users:
                pipe.llen(keys.queue(user))
                pipe.get(keys.running(user))
                pipe.lrange(keys.queue(user), 0, MAX_SHOWN - 1)
            pipe.hgetall(keys.SLOTS)
            pipe.hgetall(keys.QUEUE_TOLD)
            for stream in self._streams():
                pipe.xlen(stream)
            replies = await pipe.execute()
        per_user, rest = replies[: 3 * len(users)], replies[3 * len(users) :]
        return Snapshot(
            ring=[
                Waiting(user, int(per_user[3 * i]), int(per_user[3 * i + 1] or 0))
                for i, user in enumerate(users)
            ],
            jobs=[per_user[3 * i + 2] for i in range(len(users))],
            capacity=await self._capacity(rest[0]),
            told={_text(k): _text(v) for k, v in rest[1].items()},
            on_streams=sum(rest[2:]),
        )

    # ------------------------------------------------------------------ moving turns

    async def serve(self, *, renew: bool = False) -> list[str]:
        """Hand waiting turns to the workers as free slots allow, then tell the waiting
        turns their places (with `renew`, keep their `generating` marks alive), all from one
        read: the places are the read's with the handed-over turns taken out as dispatch.lua
        took them. The message ids handed over."""
        if not self.enabled:
            return []
        state = await self._read()
        if state is None:
            return []
        started = await self._hand_over(state)
        await self._tell_places(_after_dispatch(state, started), renew)
        return started

    async def dispatch(self) -> list[str]:
        """Hand waiting turns to the workers, as many as free slots; their message ids."""
        if not self.enabled:
            return []
        state = await self._read()
        return [] if state is None else await self._hand_over(state)

    async def _hand_over(self, state: Snapshot) -> list[str]:
        users = pick(state.ring, state.capacity - state.on_streams, self.per_user)
        if not users:
            return []
        user_keys = [key for user in users for key in (keys.queue(user), keys.running(user))]
        started: list[bytes] = await self._dispatch(
            ring_key=keys.QUEUE_RING,
            told_key=keys.QUEUE_TOLD,
            rest=[*self._streams(), *user_keys],
            capacity=state.capacity,
            per_user=self.per_user,
            shards=self.shards,
            picks=users,
        )
        return [m.decode() for m in started]

    def _streams(self) -> list[str]:
        return [keys.turns(shard) for shard in range(self.shards)]

    def turns_key(self, shard: int) -> str:
        """Where a turn of the conversation on turns shard `shard` goes: there, except in a
        cluster with the queue on, where every turn goes to shard 0 (the queue's slot)."""
        return keys.TURNS if self.enabled and self.in_steps else keys.turns(shard)

    async def enter(self, job: bytes, message_id: uuid.UUID, user: str) -> bool:
        """In a cluster, after the conversation's commit: hand the turn to the workers, or
        queue it (enter.lua). Whether it waits."""
        waits: int = await self._enter(
            turns_key=keys.TURNS,
            queue_key=keys.queue(user),
            ring_key=keys.QUEUE_RING,
            told_key=keys.QUEUE_TOLD,
            running_key=keys.running(user),
            slots_key=keys.SLOTS,
            entered_key=keys.entered(message_id),
            job=job,
            message_id=str(message_id),
            user=user,
            per_user=self.per_user,
            ttl=ENTERED_TTL,
        )
        return waits == 1

    async def release(
        self, stream: str, group: str, entry_id: bytes, user: str, *, buried: bool
    ) -> bool:
        """A worker is done with a turn of `stream` the queue counted (or buried it): free
        its slot. Whether turns wait in the queue (for one of them to take the slot)."""
        waiting = await self.release_call(stream, group, entry_id, user, buried=buried).run()
        return int(waiting) > 0

    def release_call(
        self, stream: str, group: str, entry_id: bytes, user: str, *, buried: bool = False
    ) -> scripts.Call:
        """`release` as a call (its result the number of turns waiting), to run now or
        queue on a pipeline; only a release that is not `buried` may be sent twice."""
        return self._release.bind(
            turns_key=stream,
            running_key=keys.running(user),
            ring_key=keys.QUEUE_RING,
            group=group,
            entry_id=entry_id,
            buried="1" if buried else "0",
        )

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

    async def announce(self, *, renew: bool = False) -> int:
        """Tell each waiting turn's tabs its position where it is due; events appended."""
        if not self.enabled:
            return 0
        state = await self._read()
        return 0 if state is None else await self._tell_places(state, renew)

    async def _tell_places(self, state: Snapshot, renew: bool) -> int:
        """Tell each waiting turn of `state` its position where it is due
        (protocol/fairness.due on this read; announce.lua checks again, atomically); with
        `renew`, keep the waiting conversations' `generating` marks alive (no worker renews
        them yet). Events appended."""
        now_ms = int(time.time() * 1000)
        places = positions(state.ring)
        placed = [
            (_queued.decode(raw), position)
            for waiting, raws in zip(state.ring, state.jobs, strict=True)
            for raw, position in zip(raws, places[waiting.user], strict=False)
        ]
        told_now = [
            (job, position)
            for job, position in placed
            if due(told(state.told.get(str(job.message_id))), position, now_ms)
        ]
        if renew and placed:
            async with self.redis.pipeline(transaction=False) as pipe:
                for job, _ in placed:
                    pipe.expire(keys.generation(job.conversation), self.lease)
                await pipe.execute()
        if not told_now:
            return 0
        if self.in_steps:
            told_now = await self._told_in_cluster(told_now, now_ms)
        calls = [self._tell(job, position, now_ms) for job, position in told_now]
        results = await scripts.run_all(self.redis, calls) if calls else []
        return sum(1 for seq in results if seq)

    async def _told_in_cluster(
        self, placed: list[tuple[_Queued, int]], now_ms: int
    ) -> list[tuple[_Queued, int]]:
        """In a cluster, the first step of telling places: those of `placed` still due,
        recorded as told on the queue's slot (announce_told.lua)."""
        calls = [
            self._announce_told.bind(
                told_key=keys.QUEUE_TOLD,
                message_id=str(job.message_id),
                position=position,
                now_ms=now_ms,
            )
            for job, position in placed
        ]
        results = await scripts.run_all(self.redis, calls)
        return [one for one, due_now in zip(placed, results, strict=True) if due_now]

    def _tell(self, job: _Queued, position: int, now_ms: int) -> scripts.Call:
        """The call that appends `queued` to the conversation: in a cluster (whose first step
        decided) only while no worker has claimed the turn; on one Redis deciding too."""
        frame = f.Queued(
            conversation=job.conversation, message_id=job.message_id, position=position
        )
        if self.in_steps:
            return self._queued_event.bind(
                gen_key=keys.generation(job.conversation),
                **event_keys(job.conversation),
                message_id=str(job.message_id),
                frame=encode(frame),
                maxlen=self.max_events,
                ttl=self.ttl,
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


def _after_dispatch(state: Snapshot, started: list[str]) -> Snapshot:
    """`state` as dispatch.lua left it having handed over `started`: each such turn (its
    user's oldest waiting) gone from `told` and from its user's list, the user running one
    more and moved to the end of the ring, or out of it when nothing of theirs waits."""
    if not started:
        return state
    ring, jobs = list(state.ring), [list(waiting) for waiting in state.jobs]
    for message_id in started:
        for i, waiting in enumerate(ring):
            if jobs[i] and str(_queued.decode(jobs[i][0]).message_id) == message_id:
                rest = jobs.pop(i)[1:]
                del ring[i]
                if waiting.queued > 1:
                    ring.append(Waiting(waiting.user, waiting.queued - 1, waiting.running + 1))
                    jobs.append(rest)
                break
    told = {m: t for m, t in state.told.items() if m not in started}
    return Snapshot(ring, jobs, state.capacity, told, state.on_streams + len(started))
