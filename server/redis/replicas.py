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

On a cluster a turn's events and its `finish` live on its conversation's node, which is
often not the persist stream's: there the persister writes a short-lived probe key of the
conversation's slot (`keys.replica_probe`) and sends `WAIT` after it on the same connection,
once per node that holds conversations of the batch, all nodes at once.

A node without replicas (ROLE lists none online, looked up at most every `RECHECK` seconds)
is sent no `WAIT` at all.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, Final

from redis.asyncio.cluster import ClusterNode
from redis.exceptions import ResponseError

from server.redis import keys
from server.redis.client import is_cluster
from server.redis.streams import ConsumerGroup

RECHECK: Final = 5.0
"""Seconds a node's count of online replicas is trusted before ROLE is asked again."""

PROBE_MS: Final = 10_000
"""How long a probe key lives: past any wait, so that it never piles up."""


class Replication:
    def __init__(self, redis: Any, timeout_ms: int) -> None:
        """`timeout_ms`: how long one `WAIT` may take; 0 sends none."""
        self.redis = redis
        self.timeout_ms = timeout_ms
        self.clustered = is_cluster(redis)
        self._replicas: dict[str, tuple[float, int]] = {}

    async def settled(
        self,
        group: ConsumerGroup,
        entry_ids: Sequence[bytes],
        conversations: Iterable[uuid.UUID] = (),
    ) -> bool:
        """Whether every online replica of `group`'s node holds the entries and all written
        before them — and on a cluster, of each node of `conversations`, all written there —
        waiting up to `timeout_ms` (True at once where there is no replica, or the wait is
        off). Raises what Redis raises when it cannot be asked."""
        if self.timeout_ms <= 0 or not entry_ids:
            return True
        waits = [self._stream_settled(group, entry_ids)]
        if self.clustered:
            waits += [self._node_settled(*aim) for aim in self._other_nodes(group, conversations)]
        return all(await asyncio.gather(*waits))

    async def _stream_settled(self, group: ConsumerGroup, entry_ids: Sequence[bytes]) -> bool:
        claim = ("XCLAIM", group.stream, group.group, group.consumer, 0, *entry_ids, "JUSTID")
        if not self.clustered:
            replicas = await self._online_replicas("", self.redis)
            if replicas == 0:
                return True
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xclaim(group.stream, group.group, group.consumer, 0, [*entry_ids], justid=True)
                pipe.execute_command("WAIT", replicas, self.timeout_ms)
                replies = await pipe.execute(raise_on_error=False)
            return _acked(replies) >= replicas
        return await self._node_settled(self._node(group.stream), claim)

    async def _node_settled(self, node: ClusterNode, write: tuple[Any, ...]) -> bool:
        replicas = await self._online_replicas(node.name, node)
        if replicas == 0:
            return True
        wait = ("WAIT", replicas, self.timeout_ms)
        return await _on_one_connection(node, write, wait) >= replicas

    def _other_nodes(
        self, group: ConsumerGroup, conversations: Iterable[uuid.UUID]
    ) -> list[tuple[ClusterNode, tuple[Any, ...]]]:
        """A probe write for each node, other than the stream's, serving one of
        `conversations`."""
        stream_node = self._node(group.stream).name
        aims: dict[str, tuple[ClusterNode, tuple[Any, ...]]] = {}
        for conversation in conversations:
            probe = keys.replica_probe(conversation)
            node = self._node(probe)
            if node.name != stream_node and node.name not in aims:
                aims[node.name] = (node, ("SET", probe, b"1", "PX", PROBE_MS))
        return list(aims.values())

    async def _online_replicas(self, name: str, client: Any) -> int:
        now = time.monotonic()
        known = self._replicas.get(name)
        if known is not None and now - known[0] < RECHECK:
            return known[1]
        role = await client.execute_command("ROLE")
        count = len(role[2]) if role[0] in (b"master", "master") else 0
        self._replicas[name] = (now, count)
        return count

    def _node(self, key: str) -> ClusterNode:
        node: ClusterNode = self.redis.get_node_from_key(key)
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
    return _acked(replies)


def _acked(replies: Sequence[Any]) -> int:
    """How many replicas the last reply, a `WAIT`'s, says acknowledged. An error reply
    raises, the write's too: a `WAIT` after a write that failed proves nothing."""
    for reply in replies:
        if isinstance(reply, BaseException):
            raise reply
    return int(replies[-1])
