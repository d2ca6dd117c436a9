"""A worker claims turns from every shard of the turns queue in one loop: a turn queued on
one shard starts at once, while the worker's reads of the other, empty shards are waiting."""

from __future__ import annotations

import statistics
import time

from protocol import frames as f
from server.dev.client import Client
from tests.helpers.auth import mint, new_user
from tests.helpers.conversations import start_conversation
from tests.helpers.processes import Cluster, Db, redis_db, start_all, stop_all

SHARDS = 8
TURNS = 5
QUICK = "quick [sim:tokens=5][sim:tps=200]"


async def test_a_turn_starts_at_once_whichever_shard_it_is_queued_on(cluster: Cluster) -> None:
    """A worker with one slot and eight queue shards (a cluster's default): each turn of a
    conversation starts within half a second of its `say`. (With a claim loop per shard,
    each loop holding the slot for a one-second blocking read of its own, mostly empty,
    shard, a turn waited for the loop of its shard to get the slot: a second or more.)"""
    env = {
        "REDIS_URL": redis_db(cluster.services.redis_url, Db.ONE_BUSY_SHARD),
        "PARLEY_REDIS_QUEUE_SHARDS": str(SHARDS),
        "PARLEY_WORKER_CONCURRENCY": "1",
    }
    web = cluster.process("web", start=False, **env)
    worker = cluster.process("worker", start=False, **env)
    waits = []
    try:
        start_all([web, worker])
        async with await Client.connect(web.ws_url, mint(new_user())) as client:
            conversation = await start_conversation(client, title="one shard")
            for _ in range(TURNS):
                begin = len(client.frames)
                asked = time.monotonic()
                await client.request(f.Say(conversation=conversation, text=QUICK))
                await client.wait_for(lambda fr: isinstance(fr, f.Start), start=begin)
                waits.append(time.monotonic() - asked)
                await client.wait_for(lambda fr: isinstance(fr, f.Done), start=begin)
    finally:
        await stop_all([web, worker])
    assert statistics.median(waits) < 0.5, [round(w, 2) for w in waits]
