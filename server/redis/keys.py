"""Every Redis key and channel name Parley uses, in one place (and the envelope of the one
channel whose messages are not frames as they are, `USERS`).

The names work unchanged on one Redis and on a Redis Cluster, where a script may only touch
keys of one slot. How the keys fall into slots:

- a conversation: every key (and its channel) shares the hash tag `{c:ID}` (in a cluster with
  `redis.conversation_slots` N, one of N tags, ID mod N: conversations then share N slots
  spread evenly over the slot space, and the
  pipeliner's per-slot `append_pieces` calls carry several conversations' events), so the scripts
  `append`, `append_piece`, `read`, `join` (with `meta`, `persisted` and `history`), `load`,
  `set_meta`, `mark_persisted` (with `history`), `cache_history`, `begin` (with `gen`,
  `recent` and `cancelled`) and, in a cluster,
  `turn_check`, `say_commit`, `regenerate_commit` and `finish_commit` stay on it;
  `append_pieces` takes the pieces of many conversations, in a cluster only of
  conversations sharing a slot;
- a user: `turn_rate(user)`, `connections(user)` and `revoked(user)` are single keys, each
  its own slot (no script touches two of them): `turn_rate` (script `turn_rate`),
  `admit_live` and `leave` one user key per call in a cluster. `budget(user)` carries the tag
  `{u:USER}` (`budget_settled` shares it): `budget_load`, `budget_warn` and, in a cluster,
  `turn_budget` and `finish_budget` stay on it;
- an approval: `approval(conversation, call)` carries its conversation's tag, so
  `open_approval` and `settle_approval` append their events in the same script;
- a queue shard: `turns(shard)` and `persist(shard)`, one stream each (shard 0 keeps the
  single-Redis name `parley:turns`, the others carry the tag `{turns:N}`); a conversation's
  turns always go to shard `shard_of(conversation, shards)`, so they stay in order;
- alone: `PROCESSES` (script `beat`), `FINISH_HOOKS`, `DEADLETTER`, the worker heartbeats;
- the fair queue: every key of it carries the tag `{parley:turns}`, the slot of turns shard 0
  (`TURNS`, no tag: its whole name is what hashes), so its ring, `told`, the workers' `SLOTS`,
  each user's `queue(user)` and `running(user)` and shard 0 share one slot. On one Redis,
  `say`/`regenerate` take these beside the conversation's keys (and every turns shard);
  `dispatch`, `release`, `unqueue` and `announce` take them as they are. In a cluster the
  queued turns all go to shard 0, so `enter` (a turn's queue step after its conversation's
  commit, with the turn's `entered` mark), `dispatch`, `release`, `unqueue` and
  `announce_told` stay on the queue's slot and only the `queued` event is appended in a
  second step on the conversation's (`queued_event`).

On one Redis, `say` and `regenerate` still take the conversation's keys with `turns(shard)`,
`turn_rate(user)` and `budget(user)` in one script, `finish` the conversation's keys with
`persist(shard)` and `budget(user)`, and `admit` takes `PROCESSES` with a batch of users'
keys: one round trip each. In a cluster those are split into single-slot steps
(server/redis/turns.py, server/redis/presence.py).

Channels: a conversation's (`channel`) is published from its scripts, with `SPUBLISH` in a
cluster so that it reaches only the node owning its slot; `CANCEL`, `USERS` and `SERVER` are
process-wide and, in a cluster, sharded channels too (each on the node of its own slot).
"""

from __future__ import annotations

import binascii
import functools
import uuid
from typing import Final

import msgspec

PREFIX: Final = "parley"

TURNS: Final = f"{PREFIX}:turns"
"""Shard 0 of the accepted turns waiting for a generation worker (consumer group `WORKERS`);
the only one on a single Redis (see `turns`)."""
WORKERS: Final = "workers"

PERSIST: Final = f"{PREFIX}:persist"
"""Shard 0 of the finished turns waiting to be written to PostgreSQL (consumer group
`PERSISTERS`); the only one on a single Redis (see `persist`)."""
PERSISTERS: Final = "persisters"


def turns(shard: int) -> str:
    """Stream `shard` of the accepted turns; each shard has its own hash tag (its own slot)."""
    return TURNS if shard == 0 else f"{TURNS}:{{turns:{shard}}}"


def persist(shard: int) -> str:
    """Stream `shard` of the finished turns, tagged like `turns`."""
    return PERSIST if shard == 0 else f"{PERSIST}:{{persist:{shard}}}"


def shard_of(conversation: uuid.UUID, shards: int) -> int:
    """The queue shard of a conversation's turns and finished turns: the same for every
    process, so one conversation's turns are consumed in the order they were queued."""
    return conversation.int % shards


FINISH_HOOKS: Final = f"{PREFIX}:hooks:finish"
"""Stream of `finish` hook calls waiting to reach the host application (consumer group
`FINISH_SENDERS`, `server/generation/finish_hooks.py`)."""
FINISH_SENDERS: Final = "finish-senders"

DEADLETTER: Final = f"{PREFIX}:deadletter"
"""Stream of queue entries that failed permanently, from any queue (`server/deadletter.py`):
the entry's fields, prefixed `field:`, with `source`, `group`, `entry`, `error`, `attempts`
and `at`. Shown, retried and dropped by `parley deadletter`."""

CANCEL: Final = f"{PREFIX}:cancel"
"""Channel every worker listens on: the payload is a conversation id to stop generating."""


_conversation_tags: tuple[str, ...] = ()
"""The hash tags the conversations share in a cluster (`share_slots`); none: each its own."""
HASH_SLOTS: Final = 16384
_TAG_SEARCH: Final = 400_000
"""How many candidate tags `share_slots` hashes to find one for each slot it aims at (about
every slot is hit within 16384 × ln 16384 ≈ 160,000)."""


def share_slots(tags: int) -> None:
    """Give conversations `tags` hash tags to share (a conversation the tag number ID mod
    `tags`), or each its own (`{c:ID}`) with 0. Set once at start from
    `redis.conversation_slots` (a cluster only): the worker's pipeliner sends one
    `append_pieces` call per slot in a batch, so conversations sharing slots share calls.
    Tag i hashes to the slot in the middle of the i-th of `tags` equal runs of slots, so that
    a cluster whose primaries serve equal runs of slots in order (`redis-cli --cluster
    create` makes them) has as many on each primary when their number divides `tags`."""
    global _conversation_tags
    _conversation_tags = _spread_tags(tags)
    _conv.cache_clear()


@functools.cache
def _spread_tags(tags: int) -> tuple[str, ...]:
    if not tags:
        return ()
    aims = [(2 * i + 1) * HASH_SLOTS // (2 * tags) for i in range(tags)]
    wanted = set(aims)
    found: dict[int, str] = {}
    for k in range(_TAG_SEARCH):
        tag = f"c{k}"
        slot = binascii.crc_hqx(tag.encode(), 0) % HASH_SLOTS
        if slot in wanted and slot not in found:
            found[slot] = tag
            if len(found) == len(wanted):
                break
    return tuple(found.get(slot, f"c:{i}") for i, slot in enumerate(aims))


@functools.lru_cache(maxsize=1 << 16)
def _conv(conversation: uuid.UUID | str) -> str:
    """The start of every key of the conversation, its hash tag included."""
    if not _conversation_tags:
        return f"{PREFIX}:{{c:{conversation}}}"
    tag = _conversation_tags[uuid.UUID(str(conversation)).int % len(_conversation_tags)]
    return f"{PREFIX}:{{{tag}}}:{conversation}"


def channel(conversation: uuid.UUID | str) -> str:
    """Pub/sub channel carrying the conversation's events."""
    return _conv(conversation)


def log(conversation: uuid.UUID | str) -> str:
    """Stream of the conversation's recent events; entry id `SEQ-0`, field `f` = frame."""
    return f"{_conv(conversation)}:log"


def seq(conversation: uuid.UUID | str) -> str:
    """Counter holding the last seq assigned in the conversation."""
    return f"{_conv(conversation)}:seq"


def replica_probe(conversation: uuid.UUID | str) -> str:
    """A short-lived key the persister writes on the conversation's node just before a
    `WAIT` there (server/redis/replicas.py): a `WAIT` covers its connection's own writes."""
    return f"{_conv(conversation)}:probe"


def persisted(conversation: uuid.UUID | str) -> str:
    """The seq up to which PostgreSQL holds the conversation: the log may trim before it."""
    return f"{_conv(conversation)}:persisted"


def history(conversation: uuid.UUID | str) -> str:
    """Cached persisted transcript: `CachedHistory` (JSON), valid while its seq is the one in
    `persisted` (a persist moves `persisted` on, so a stale copy is never used)."""
    return f"{_conv(conversation)}:history"


def meta(conversation: uuid.UUID | str) -> str:
    """Cached conversation row (owner, title, system, model, times) as JSON."""
    return f"{_conv(conversation)}:meta"


def recent(conversation: uuid.UUID | str) -> str:
    """List of the conversation's latest finished messages (JSON), the model's context."""
    return f"{_conv(conversation)}:recent"


def generation(conversation: uuid.UUID | str) -> str:
    """Hash describing the generation running in the conversation; its presence means busy."""
    return f"{_conv(conversation)}:gen"


def appended(conversation: uuid.UUID | str, call: str) -> str:
    """Which pieces of the worker's `append_pieces` call `call` were appended, kept for a
    little while so that a retry of the call appends nothing twice; in the slot of
    `conversation`, the call's first."""
    return f"{_conv(conversation)}:appended:{call}"


def cancelled(conversation: uuid.UUID | str) -> str:
    """Message id whose generation was cancelled, checked by a worker before it starts."""
    return f"{_conv(conversation)}:cancel"


def finished(conversation: uuid.UUID | str, message_id: uuid.UUID | str) -> str:
    """The seq of a generation's `done`, so that a retried finish appends nothing twice."""
    return f"{_conv(conversation)}:done:{message_id}"


def turn_fate(conversation: uuid.UUID | str, message_id: uuid.UUID | str) -> str:
    """In a cluster, whether the turn `message_id` was committed or declared void (scripts
    `turn_fate`, `say_commit`, `regenerate_commit`): what settles a reservation its web
    process left behind."""
    return f"{_conv(conversation)}:fate:{message_id}"


def finished_turn(conversation: uuid.UUID | str, message_id: uuid.UUID | str) -> str:
    """In a cluster, the finished turn (as queued for PostgreSQL) kept beside `finished`, so
    that a takeover can queue it again if its worker died before it did."""
    return f"{finished(conversation, message_id)}:turn"


def worker(name: str) -> str:
    """Heartbeat of a live generation worker; a turn whose worker lost it is taken over."""
    return f"{PREFIX}:worker:{name}"


def said(conversation: uuid.UUID | str) -> str:
    """Set of the conversation's user message ids (every `say` id, and those of the persisted
    history when loaded), so that a retry with the same id is not a second turn."""
    return f"{_conv(conversation)}:said"


def approval(conversation: uuid.UUID | str, call_id: str) -> str:
    """Hash of a tool call waiting for (or settled by) a person's approval: owner, tool,
    arguments, message id, expiry (ms, Redis's clock), state, who answered and why."""
    return f"{_conv(conversation)}:approval:{call_id}"


def tool_steps(conversation: uuid.UUID | str, message_id: uuid.UUID | str) -> str:
    """A reply's completed tool steps (its parts and usage so far), so that a worker taking
    the turn over resumes after them instead of running their calls again."""
    return f"{_conv(conversation)}:steps:{message_id}"


USERS: Final = f"{PREFIX}:users"
"""Pub/sub channel of `conversation_changed` for every user, as `user_message` puts it; each
web process subscribes once and routes it to that user's sockets (no subscription per socket:
the changes are rare, the sockets many)."""


def user_message(user: str, frame: bytes) -> bytes:
    """The user (JSON, so it holds no raw newline), a newline, then the frame."""
    return msgspec.json.encode(user) + b"\n" + frame


def split_user_message(message: bytes) -> tuple[str, bytes]:
    head, _, frame = message.partition(b"\n")
    return msgspec.json.decode(head, type=str), frame


def turn_rate(user: str) -> str:
    """Counter of turns the user started in the current one-minute window."""
    return f"{PREFIX}:rate:{user}"


def budget(user: str) -> str:
    """Hash of the user's token budget (`server.redis.budgets`): spending per bucket, the
    user's own limit, the rebuild's epoch. A cache of the usage ledger in PostgreSQL; its
    hash tag is the user's, so it can sit on the user's slot."""
    return f"{PREFIX}:budget:{{u:{user}}}"


def budget_settled(user: str, message_id: uuid.UUID | str) -> str:
    """In a cluster, set once the turn `message_id` settled its reservation in the user's
    budget (script `finish_budget`), so a retry or a takeover does not settle it twice."""
    return f"{budget(user)}:settled:{message_id}"


def connections(user: str) -> str:
    """Hash web process id -> the user's open sockets on that process."""
    return f"{PREFIX}:conns:{user}"


PROCESSES: Final = f"{PREFIX}:procs"
"""Sorted set of live web processes: member = process id, score = the deadline of its
heartbeat in milliseconds of Redis's clock. A process's counts in `connections` die with it."""


SERVER: Final = f"{PREFIX}:server"
"""Pub/sub channel of the server API's disconnects (`server.edge.disconnects`): every web
process subscribes once and closes the sockets a message names."""


def revoked(user: str) -> str:
    """Hash of the user's revoked tokens: `before` -> a Unix time (every token issued before
    it), `jti:<id>` / `sid:<id>` / `tok:<digest>` -> 1. Expires `server_api.revocation_ttl`
    after the last revocation."""
    return f"{PREFIX}:revoked:{user}"


def present(conversation: uuid.UUID | str) -> str:
    """Hash of who has joined the conversation: field `[process, user]` (JSON) -> sockets."""
    return f"{_conv(conversation)}:present"


def stream_ticket(ticket: str) -> str:
    """A single-use ticket for an SSE stream (`server.redis.tickets`): the user it stands for."""
    return f"{PREFIX}:ticket:{ticket}"


QUEUE_TAG: Final = f"{{{TURNS}}}"
"""The fair queue's hash tag: the slot of `TURNS` (turns shard 0), whose name has no tag."""

QUEUE_RING: Final = f"{PREFIX}:queue:ring:{QUEUE_TAG}"
"""List of the users with turns in the fair queue, the next to be served first
(server/redis/queue.py): a user is in it exactly while their `queue` is not empty."""

QUEUE_TOLD: Final = f"{PREFIX}:queue:told:{QUEUE_TAG}"
"""Hash of the turns waiting in the fair queue: message id -> `position:ms`, the last place
announced and when (`-1:0` until the first), so a position changes on the tabs at most once
a second and never after the turn left the queue (dispatch and unqueue delete its entry)."""

QUEUE_ANNOUNCER: Final = f"{PREFIX}:queue:announcer"
"""Held (SET NX, one second) by the process announcing the queue's positions this second."""

SLOTS: Final = f"{PREFIX}:slots:{QUEUE_TAG}"
"""Hash worker name -> `slots deadline_ms` (its `worker.concurrency` and the time its
heartbeat runs out, by the worker's clock, compared with Redis's own in `say`/`regenerate`
and with the dispatching process's in server/redis/queue.py: hosts' clocks must agree to
well within `worker.lease_seconds`): the capacity the fair queue fills."""


def queue(user: str) -> str:
    """List of the user's turns (jobs, JSON) waiting in the fair queue, oldest first."""
    return f"{PREFIX}:queue:{QUEUE_TAG}:{user}"


def entered(message_id: uuid.UUID | str) -> str:
    """In a cluster, how a turn was handed to the fair queue (`enter.lua`): 1 waiting, 0
    started; so that a retried `enter` does not enter it twice. Expires."""
    return f"{PREFIX}:queue:entered:{QUEUE_TAG}:{message_id}"


def running(user: str) -> str:
    """Counter of the user's turns handed to the workers and not finished yet."""
    return f"{PREFIX}:running:{QUEUE_TAG}:{user}"
