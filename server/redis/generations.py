"""The `gen` hash: the generation running in a conversation. Its presence means busy.

Fields: `message_id` (the reply being generated), `state` (`queued` until a worker claims
it), `worker` (the consumer running it), `piece` (its events indexed up to there are
repeats: set when its worker publishes the turn again, so that the events still in flight
from before are dropped, and by each event a small `append_pieces` call appends; read by a
worker taking the turn over). It expires `lease` seconds after its worker's last heartbeat
renewed it, so a conversation whose worker died does not stay busy.

Written by Lua scripts, atomically with the events they append: `say` and `regenerate` create
it (`message_id`, `state`), `begin` (a worker starting it: `EventLog.begin`) names the
`worker` and reads `piece`, `append_pieces` refuses an event whose `message_id` it does not
hold, whose index is up to `piece` or whose `worker` is another's, `finish` deletes it.
Everything else Python reads or writes of it goes through this module.
"""

from __future__ import annotations

import uuid
from typing import Final

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from server.redis import keys

MESSAGE_ID: Final = "message_id"
WORKER: Final = "worker"
PIECE: Final = "piece"


def claim(
    pipe: Pipeline,
    conversation: uuid.UUID,
    message_id: uuid.UUID,
    worker: str,
    lease: int,
    piece: int | None = None,
) -> None:
    """Queue on `pipe`: the generation is `message_id`'s, run by `worker`. With `piece`,
    every event of it indexed up to there will be refused as a repeat."""
    gen = keys.generation(conversation)
    pipe.hset(gen, mapping={MESSAGE_ID: str(message_id), WORKER: worker})
    if piece is not None:
        pipe.hset(gen, PIECE, piece)
    pipe.expire(gen, lease)


def renew(pipe: Pipeline, conversation: uuid.UUID, lease: int) -> None:
    """Queue on `pipe`: the generation's worker is alive, keep the mark `lease` seconds more."""
    pipe.expire(keys.generation(conversation), lease)


def clear(pipe: Pipeline, conversation: uuid.UUID) -> None:
    """Queue on `pipe`: forget whatever generation the conversation had."""
    pipe.delete(keys.generation(conversation))


async def message_id(redis: Redis, conversation: uuid.UUID) -> str | None:
    """The reply being generated in the conversation, if any."""
    return _text(await redis.hget(keys.generation(conversation), MESSAGE_ID))


async def worker(redis: Redis, conversation: uuid.UUID) -> str | None:
    """The worker running the conversation's generation, once one has claimed it."""
    return _text(await redis.hget(keys.generation(conversation), WORKER))


async def last_piece(redis: Redis, conversation: uuid.UUID) -> int:
    """The index up to which the generation's events are repeats (0 until a claim or a small
    `append_pieces` call set one): a worker taking the turn over indexes its events after it."""
    value = await redis.hget(keys.generation(conversation), PIECE)
    return int(value) if value is not None else 0


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value
