"""Waiting until the replicas of a stream's node hold what that node was written up to now.

Redis replication is asynchronous: a turn the persister read from a primary may be missing on
its replica, and should the primary die and the replica be promoted, PostgreSQL would hold a
turn Redis lost (its seqs could be handed out again). So before writing a batch to PostgreSQL
the persister asks the node it read the batch from to `WAIT` for its replicas.

`WAIT` waits for the replication offset of the connection's own last write, so it must follow
a write on the same connection: a `WAIT` on a connection that wrote nothing returns at once and
proves nothing. The batch's entries are claimed again by their own consumer (`XCLAIM … JUSTID`
with no idle time: they stay where they are, their delivery count untouched), which Redis
propagates, then `WAIT` follows on that connection — one round trip, on one connection (on a
cluster, one connection of the node serving the stream's slot). Replication is one ordered
stream per node, so the replicas holding that claim hold everything written before it: the
turn's events, its `finish` and the entries themselves.

A node without replicas (ROLE lists none online, looked up at most every `RECHECK` seconds)
is sent no `WAIT` at all.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Final

from redis.asyncio.cluster import ClusterNode
from redis.exceptions import ResponseError

from server.redis.client import is_cluster
from server.redis.streams import ConsumerGroup

RECHECK: Final = 5.0
"""Seconds a node's count of online replicas is trusted before ROLE is asked again."""


class Replication:
    def __init__(self, redis: Any, timeout_ms: int) -> None:
        """`timeout_ms`: how long one `WAIT` may take; 0 sends none."""
        self.redis = redis
        self.timeout_ms = timeout_ms
        self._clustered = is_cluster(redis)
        self._replicas: dict[str, tuple[float, int]] = {}

    async def settled(self, group: ConsumerGroup, entry_ids: Sequence[bytes]) -> bool:
        """Whether every online replica of `group`'s node holds the entries and all written
        before them, waiting up to `timeout_ms` (True at once where there is no replica, or
        the wait is off). Raises what Redis raises when it cannot be asked."""
        if self.timeout_ms <= 0 or not entry_ids:
            return True
        replicas = await self._online_replicas(group.stream)
        if replicas == 0:
            return True
        acked = await self._claim_and_wait(group, entry_ids, replicas)
        return acked >= replicas

    async def _online_replicas(self, stream: str) -> int:
        now = time.monotonic()
        known = self._replicas.get(stream)
        if known is not None and now - known[0] < RECHECK:
            return known[1]
        if self._clustered:
            role = await self._node(stream).execute_command("ROLE")
        else:
            role = await self.redis.execute_command("ROLE")
        count = len(role[2]) if role[0] in (b"master", "master") else 0
        self._replicas[stream] = (now, count)
        return count

    async def _claim_and_wait(
        self, group: ConsumerGroup, entry_ids: Sequence[bytes], replicas: int
    ) -> int:
        claim = ("XCLAIM", group.stream, group.group, group.consumer, 0, *entry_ids, "JUSTID")
        wait = ("WAIT", replicas, self.timeout_ms)
        if self._clustered:
            return await _on_one_connection(self._node(group.stream), claim, wait)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xclaim(group.stream, group.group, group.consumer, 0, [*entry_ids], justid=True)
            pipe.execute_command(*wait)
            replies = await pipe.execute(raise_on_error=False)
        return _acked(replies[1])

    def _node(self, stream: str) -> ClusterNode:
        node: ClusterNode = self.redis.get_node_from_key(stream)
        return node


async def _on_one_connection(node: ClusterNode, *commands: tuple[Any, ...]) -> int:
    """Send `commands` together on one connection of `node`; the last one's reply (an int).
    The cluster client's own calls take any free connection of a node, which a `WAIT` must
    not."""
    connection = node.acquire_connection()
    try:
        await connection.send_packed_command(connection.pack_commands(commands))
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(await connection.read_response())
            except ResponseError as exc:  # an error reply; the next replies are still due
                replies.append(exc)
    except BaseException:
        await connection.disconnect()  # replies may be left unread on it
        raise
    finally:
        node.release(connection)
    return _acked(replies[-1])


def _acked(reply: Any) -> int:
    """How many replicas a `WAIT` reply says acknowledged; an error reply raises."""
    if isinstance(reply, BaseException):
        raise reply
    return int(reply)
