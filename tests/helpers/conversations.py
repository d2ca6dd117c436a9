"""One conversation over one `Client`: start it, say something, read back what the socket
received and what PostgreSQL holds."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from typing import Any

import asyncpg
import msgspec

from protocol import frames as f
from protocol.parts import MessageParts, parts_of
from server.dev.client import Client
from tests.helpers.auth import mint, new_user


async def start_conversation(client: Client, **kwargs: Any) -> uuid.UUID:
    created = await client.request(f.Create(**kwargs))
    await client.request(f.Join(conversation=created.conversation))
    return created.conversation


async def say_and_finish(client: Client, conversation: uuid.UUID, text: str) -> f.Done:
    start = len(client.frames)
    await client.request(f.Say(conversation=conversation, text=text))
    return await client.wait_for(
        lambda fr: isinstance(fr, f.Done) and fr.conversation == conversation, start=start
    )


def event_frames(client: Client, conversation: uuid.UUID) -> list[str]:
    """The raw bytes of every conversation event the socket received, in order."""
    marker = f'"conversation":"{conversation}"'
    return [raw for raw in client.raw if raw.startswith('{"seq":') and marker in raw]


def transcript(client: Client, conversation: uuid.UUID) -> list[tuple[str, str]]:
    """(role, text) per message from the socket's joined history plus its events."""
    messages: dict[uuid.UUID, list[str]] = {}
    roles: dict[uuid.UUID, str] = {}
    for frame in client.frames:
        if isinstance(frame, f.Joined) and frame.conversation == conversation and frame.history:
            messages, roles = {}, {}
            for m in frame.history:
                messages[m.id], roles[m.id] = [m.content], m.role
        elif isinstance(frame, f.MessageEvent) and frame.conversation == conversation:
            messages[frame.message.id] = [frame.message.content]
            roles[frame.message.id] = "user"
        elif isinstance(frame, f.Start) and frame.conversation == conversation:
            if frame.replaces:
                messages.pop(frame.replaces, None)
            messages[frame.message_id], roles[frame.message_id] = [], "assistant"
        elif isinstance(frame, f.Token) and frame.conversation == conversation:
            messages[frame.message_id].append(frame.text)
    return [(roles[k], "".join(v)) for k, v in messages.items()]


def assert_contiguous(client: Client, conversation: uuid.UUID, first: int) -> None:
    """Every seq from `first` on exactly once, in order (a merged token frame covers
    `first_seq..seq`)."""
    seqs: list[int] = []
    for frame in client.events(conversation):
        start = getattr(frame, "first_seq", 0) or frame.seq
        seqs.extend(range(start, frame.seq + 1))
    assert seqs == list(range(first, first + len(seqs))), seqs


def index_of(client: Client, match: Any, start: int = 0) -> int | None:
    """The index in `client.frames` of the first frame from `start` on that `match`es."""
    for index in range(start, len(client.frames)):
        if match(client.frames[index]):
            return index
    return None


async def persisted(db: asyncpg.Pool, conversation: uuid.UUID) -> list[tuple[str, str, str]]:
    rows = await db.fetch(
        "SELECT role, content, status FROM messages WHERE conversation_id = $1 ORDER BY seq",
        conversation,
    )
    return [(r["role"], r["content"], r["status"]) for r in rows]


class StoredReply(msgspec.Struct, frozen=True, kw_only=True):
    """An assistant message's row as PostgreSQL holds it. A join and the REST API may be
    served from the transcript's copy in Redis, so only this shows what was persisted."""

    content: str
    status: str
    parts: list[f.Part] | None
    reason: f.DoneReason | None
    usage: f.Usage | None


async def stored_reply(
    db: asyncpg.Pool, conversation: uuid.UUID, message_id: uuid.UUID
) -> StoredReply:
    row = await db.fetchrow(
        "SELECT content, status, parts::text AS parts, reason, usage::text AS usage"
        " FROM messages WHERE conversation_id = $1 AND id = $2",
        conversation,
        message_id,
    )
    assert row is not None, f"message {message_id} is not in PostgreSQL"
    parts, usage = row["parts"], row["usage"]
    return StoredReply(
        content=row["content"],
        status=row["status"],
        parts=None if parts is None else msgspec.json.decode(parts, type=list[f.Part]),
        reason=row["reason"],
        usage=None if usage is None else msgspec.json.decode(usage, type=f.Usage),
    )


async def wait_persisted(
    db: asyncpg.Pool, conversation: uuid.UUID, count: int, timeout: float = 10
) -> list[tuple[str, str, str]]:
    deadline = time.monotonic() + timeout
    rows = await persisted(db, conversation)
    while len(rows) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        rows = await persisted(db, conversation)
    return rows


def gaps(client: Client, message_id: uuid.UUID) -> tuple[list[float], int]:
    """Seconds between consecutive token *events* as the client got them (a merged frame
    delivers all the events it stands for at once), and how many frames carried them."""
    times: list[float] = []
    frames = 0
    for fr, at in zip(client.frames, client.arrived, strict=False):
        if isinstance(fr, f.Token) and fr.message_id == message_id:
            frames += 1
            times += [at] * (fr.seq - (fr.first_seq or fr.seq) + 1)
    return [b - a for a, b in itertools.pairwise(times)], frames


def p99(values: list[float]) -> float:
    return sorted(values)[int(len(values) * 0.99) - 1] if values else 0.0


async def timed_turns(ws_url: str, turns: int, until: type[f.ServerFrame]) -> list[float]:
    """Milliseconds from sending each `say` to the first `until` frame after it, one turn at a
    time on one socket (each waits for its `done`, so every `say` finds the conversation
    free). A benchmark's measure: `Ack` is the acceptance, `Token` the time to first token."""
    times: list[float] = []
    async with await Client.connect(ws_url, mint(new_user())) as client:
        conversation = await start_conversation(client)
        for i in range(turns):
            start = len(client.frames)
            sent = time.monotonic()
            await client.send(f.Say(conversation=conversation, text=f"q{i} [sim:tokens=2]"))
            await client.wait_for(lambda fr: isinstance(fr, until), start=start, timeout=10)
            times.append((time.monotonic() - sent) * 1000)
            await client.wait_for(lambda fr: isinstance(fr, f.Done), start=start, timeout=10)
    return times


def folded(client: Client, message_id: uuid.UUID) -> list[f.Part]:
    """The message's parts as a tab rebuilds them from its history and events (an event at
    or below the last seq it holds is one it has: a rejoin's replay may repeat it)."""
    parts = MessageParts(message_id)
    history: list[f.Part] | None = None
    held = 0
    for frame in client.frames:
        if isinstance(frame, f.Joined) and frame.history is not None:
            history = next((parts_of(m) for m in frame.history if m.id == message_id), None)
            held = frame.last_seq
        elif isinstance(frame, f.ConversationEvent) and frame.seq > held:
            held = frame.seq
            parts.apply(frame)
    return parts.parts() or history or []
