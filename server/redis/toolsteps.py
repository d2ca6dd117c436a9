"""A reply's completed tool steps, kept in Redis while its turn runs.

After each step whose calls all ended (results in), the worker records the reply's parts so
far, how many model calls it made and what they cost, before it calls the model again. A
worker that takes the turn over (the first one died) reads the record, publishes those
parts again after its `start` and goes on with the next model call: a completed call is never
run twice. A call running when its worker died has no result recorded: its step runs again.

A step whose calls wait for a person's approval is recorded before it waits, with its calls
(`waiting`): a worker that takes the turn over then resumes at those calls — their approvals
read again, answered or not — without calling the model for that step again.
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
    waiting: list[ToolCall] = []
    """The last step's calls, when the record was made before they ran because one of them
    waits for a person's approval; empty once every call of the step has its result."""


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
