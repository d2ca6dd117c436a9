"""The persister's CPU per persisted turn, in this process, against a real PostgreSQL and Redis:
finished turns (a user message, a reply and its usage row, as the worker queues them) of
`--conversations` conversations are put on the persist stream, then read `--batch` at a time
and written (`Persister._persist_all`: PostgreSQL, then the marks and acknowledgements), with
the process's CPU time counted around each write only.

    .venv/bin/python -m bench.persist_cost [--turns 2000] [--batch 10] [--rounds 5]

Prints µs of this process's CPU per turn for each round and the minimum (the machine is
shared: the least disturbed round is the one to compare). Starts its own PostgreSQL and Redis
on 127.0.0.1 in a temporary directory and stops them by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

import msgspec
from redis.asyncio import Redis

from protocol.frames import Message, Usage, utcnow
from server.dev import embedded
from server.generation.persister import Persister
from server.redis import keys
from server.redis.eventlog import EventLog
from storage import conversations, db
from storage.messages import FinishedTurn
from storage.usage import UsageEntry
from tests.helpers.scripts import conversation_row


def finished_turn(conversation: uuid.UUID, index: int) -> FinishedTurn:
    """The `index`th turn of a conversation: its user message, its reply and what it spent."""
    now = utcnow()
    user = Message(
        id=uuid.uuid4(), role="user", content="a question " * 5, status="complete", created_at=now
    )
    reply = Message(
        id=uuid.uuid4(),
        role="assistant",
        content="an answer of a few words",
        status="complete",
        model="sim",
        usage=Usage(prompt_tokens=40, completion_tokens=2),
        created_at=now + timedelta(milliseconds=50),
    )
    spent = UsageEntry(
        owner="alice", model="sim", status="complete", prompt_tokens=40, completion_tokens=2,
        started_at=now,
    )  # fmt: skip
    return FinishedTurn(
        conversation=conversation,
        user_message=user,
        user_seq=index * 4 + 1,
        reply=reply,
        replaces=None,
        finished_at=now,
        done_seq=index * 4 + 4,
        spent=spent,
    )


async def one_round(persister: Persister, opts: argparse.Namespace) -> float:
    """µs of CPU per turn for `opts.turns` turns written `opts.batch` at a time."""
    ids = []
    for _ in range(opts.conversations):
        meta = conversation_row()
        await conversations.insert(persister.pool, "alice", meta)
        ids.append(meta.id)
    for n in range(opts.turns):
        turn = finished_turn(ids[n % len(ids)], n // len(ids))
        entry = {"turn": msgspec.json.encode(turn), "done_seq": turn.done_seq}
        await persister.redis.xadd(keys.persist(0), entry)  # type: ignore[arg-type]
    group = persister.groups[0]
    spent = 0.0
    written = 0
    while written < opts.turns:
        entries = await group.read(opts.batch, 100)
        started = time.process_time()
        await persister._persist_all(group, entries)
        spent += time.process_time() - started
        written += len(entries)
    return spent / written * 1e6


async def measure(pg_url: str, redis_url: str, opts: argparse.Namespace) -> None:
    pool = await db.create_pool(pg_url)
    await db.migrate(pool)
    redis = Redis.from_url(redis_url)
    try:
        persister = Persister(redis, pool, EventLog(redis, 1000, 3600), name="bench")
        await persister.groups[0].ensure()
        await one_round(persister, argparse.Namespace(**{**vars(opts), "turns": 200}))
        rounds = [await one_round(persister, opts) for _ in range(opts.rounds)]
        print(
            f"batch {opts.batch}: µs of CPU per persisted turn, rounds "
            + ", ".join(f"{r:.0f}" for r in rounds)
            + f"; min {min(rounds):.0f}"
        )
    finally:
        await redis.aclose()
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=2000)
    parser.add_argument("--conversations", type=int, default=50)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="persist-cost-") as tmp:
        pg = embedded.start_postgres(Path(tmp), fast=True)
        redis = embedded.start_redis(Path(tmp), persist=False)
        try:
            asyncio.run(measure(pg.url, redis.url, opts))
        finally:
            redis.stop()
            pg.stop()


if __name__ == "__main__":
    main()
