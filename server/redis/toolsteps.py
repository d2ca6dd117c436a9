"""A reply's tool steps, kept in Redis while its turn runs.

The worker records the reply's parts so far, how many model calls it made and what they cost
twice per step: when the model's response named its calls (with those calls `pending`),
and once their results are in, before it calls the model again. A worker that takes the turn
over (the first one died) reads the record and publishes those parts again after its
`start`; then it runs the pending calls, if any, without asking the model again (a person's
approval is waited for there), or goes on with the next model call. A completed step is never
run twice; the calls of a step whose results were not all in run again.
"""

from __future__ import annotations

import uuid
from typing import Final

import msgspec
from redis.asyncio import Redis

from protocol.frames import Part, Usage
from protocol.toolcalls import ToolCall
from server.redis import keys

RETAIN_SECONDS: Final = 86_400
"""A record outlives any turn (one waiting for a person's approval included)."""


class Steps(msgspec.Struct, frozen=True, kw_only=True):
    steps: int
    """Model calls made."""
    parts: list[Part]
    usage: list[Usage | None] = []
    """Each model call's usage, as the model reported it."""
    pending: list[ToolCall] = []
    """The calls of the step in progress, when their results are not in yet."""


_decoder: Final = msgspec.json.Decoder(Steps)


async def record(
    redis: Redis, conversation: uuid.UUID, message_id: uuid.UUID, steps: Steps
) -> None:
    await redis.set(
        keys.tool_steps(conversation, message_id), msgspec.json.encode(steps), ex=RETAIN_SECONDS
    )


async def recorded(redis: Redis, conversation: uuid.UUID, message_id: uuid.UUID) -> Steps | None:
    """The steps a previous worker completed; None when there were none (or unreadable)."""
    value = await redis.get(keys.tool_steps(conversation, message_id))
    if value is None:
        return None
    try:
        return _decoder.decode(value)
    except msgspec.DecodeError:
        return None


async def forget(redis: Redis, conversation: uuid.UUID, message_id: uuid.UUID) -> None:
    await redis.delete(keys.tool_steps(conversation, message_id))
