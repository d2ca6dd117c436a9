"""Fan-out on a Redis Cluster: one sharded pub/sub connection per primary, not per socket.

A channel's messages are published with `SPUBLISH` on the node owning its slot, so it is
subscribed (`SSUBSCRIBE`) there, through that node's `Bus` (server/edge/bus.py), which
confirms subscriptions, pings, reconnects and resyncs exactly as on a single Redis. This
class only routes: a channel goes to the bus of its slot's primary, per the cluster client's
slot table.

When a node's connection breaks (the node died or was demoted) or Redis ends a subscription
itself (`sunsubscribe`: the slot migrated), the slot table is read again and every channel
whose owner changed moves to its new owner's bus; once subscribed there, its listeners are
told to `resync` (they read the conversation's log from the last seq they delivered, or get
`joined {reset: true}` if it is gone), because whatever was published meanwhile is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Final

from redis.asyncio.cluster import RedisCluster

from server.app import metrics
from server.edge.bus import Bus, BusUnavailable, Listener
from server.redis.client import UNREACHABLE

log = logging.getLogger("parley.shardbus")

REROUTE_PAUSES: Final = (0.1, 0.2, 0.5, 1.0)
"""Pauses between readings of the slot table while a failover has not settled."""
REROUTE_FOR: Final = 60.0


def _unchanged(data: bytes) -> bytes:
    return data


class ShardedBus:
    def __init__(
        self,
        cluster: RedisCluster,
        wrap: Callable[[bytes], bytes] = _unchanged,
        after: Callable[[], None] | None = None,
    ) -> None:
        self._cluster = cluster
        self._wrap = wrap
        self._after = after
        self._buses: dict[str, Bus] = {}
        self._routes: dict[bytes, str] = {}
        self._reroute: asyncio.Task[None] | None = None
        self._again = False
        self._stopping = False
        self.moves = 0

    async def start(self) -> None:
        """A connection to every primary, opened now rather than under a connect storm."""
        await self._cluster.initialize()
        for node in self._cluster.get_primaries():
            await self._bus_of(node.name)

    async def stop(self) -> None:
        self._stopping = True
        if self._reroute is not None:
            self._reroute.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reroute
        for bus in self._buses.values():
            await bus.stop()

    @property
    def healthy(self) -> bool:
        return (
            bool(self._buses)
            and all(
                self._buses[node].healthy
                for node in set(self._routes.values())
                if node in self._buses
            )
            and any(bus.healthy for bus in self._buses.values())
        )

    @property
    def channels(self) -> int:
        return len(self._routes)

    async def subscribe(self, channel: str, listener: Listener, raw: bool = False) -> None:
        name = channel.encode()
        node = self._routes.get(name) or self._owner(name)
        self._routes[name] = node
        bus = await self._bus_of(node)
        await bus.subscribe(channel, listener, raw)

    def unsubscribe(self, channel: str, listener: Listener) -> None:
        name = channel.encode()
        node = self._routes.get(name)
        bus = self._buses.get(node) if node else None
        if bus is None:
            return
        bus.unsubscribe(channel, listener)
        if name not in bus.holds():
            del self._routes[name]

    # ------------------------------------------------------------------ routing

    def _owner(self, channel: bytes) -> str:
        node = self._cluster.get_node_from_key(channel.decode())
        if node is None:
            raise BusUnavailable(f"no node serves the slot of {channel!r}")
        return str(node.name)

    async def _bus_of(self, node: str) -> Bus:
        bus = self._buses.get(node)
        if bus is None:
            host, _, port = node.rpartition(":")
            bus = Bus(
                f"redis://{host}:{port}",
                self._wrap,
                sharded=True,
                on_lost=self._changed,
                on_dropped=lambda _: self._changed(),
                after=self._after,
            )
            self._buses[node] = bus
            await bus.start()
        return bus

    def _changed(self) -> None:
        """A connection broke or a subscription was ended by Redis: read the slot table
        again (once at a time; a change noticed meanwhile makes the running pass go again)."""
        if self._stopping:
            return
        if self._reroute is not None and not self._reroute.done():
            self._again = True
            return
        self._reroute = asyncio.create_task(self._move_channels(), name="parley-shardbus")

    async def _move_channels(self) -> None:
        deadline = asyncio.get_running_loop().time() + REROUTE_FOR
        attempt = 0
        while not self._stopping:
            self._again = False
            try:
                await self._cluster.nodes_manager.initialize()
                stranded = await self._move_once()
            except (*UNREACHABLE, BusUnavailable) as exc:
                log.warning("cannot read the cluster's slots yet (%s)", exc)
                stranded = True
            if not stranded and not self._again:
                await self._close_idle()
                return
            if asyncio.get_running_loop().time() > deadline:
                log.error("channels still on unreachable nodes after %.0f s", REROUTE_FOR)
                return
            await asyncio.sleep(REROUTE_PAUSES[min(attempt, len(REROUTE_PAUSES) - 1)])
            attempt += 1

    async def _move_once(self) -> bool:
        """Move each channel whose slot changed owner; True while some channel is still on
        a node whose connection is down (its replica may not be promoted yet) or that ended
        its subscription (the slot moved, but the node that answered the slot table had not
        heard yet)."""
        stranded = False
        for name, node in list(self._routes.items()):
            owner = self._owner(name)
            if owner == node:
                bus = self._buses[node]
                if name not in bus.holds():
                    del self._routes[name]  # it was left meanwhile
                elif not bus.healthy:
                    stranded = True
                elif bus.dropped(name):
                    if await self._serves(node, name):
                        await self._move(name, node, node)  # its slot was assigned again
                    else:
                        stranded = True  # the slot table read predates the change
                continue
            await self._move(name, node, owner)
        return stranded

    async def _move(self, name: bytes, node: str, owner: str) -> None:
        """Subscribe `name`'s listeners through `owner`'s bus, then have them resync."""
        listeners, raw = self._buses[node].take(name)
        self._routes[name] = owner
        target = await self._bus_of(owner)
        for listener in listeners:
            await target.subscribe(name.decode(), listener, raw)
        self.moves += 1
        metrics.BUS_RESYNCS.inc(len(listeners))
        for listener in listeners:
            listener.resync()

    async def _serves(self, node: str, channel: bytes) -> bool:
        """Whether `node` itself says it serves `channel`'s slot (a node's word on its own
        slots is the latest; another node's may lag)."""
        slot = self._cluster.keyslot(channel)
        target = self._cluster.get_node(node_name=node)
        if target is None:
            return False
        host, _, port = node.rpartition(":")
        ranges = await self._cluster.execute_command("CLUSTER SLOTS", target_nodes=target)
        return any(
            low <= slot <= high and _address(served["primary"]) == (host, int(port))
            for (low, high), served in ranges.items()
        )

    async def _close_idle(self) -> None:
        """Stop the buses of nodes that are no longer primaries and hold no channel."""
        primaries = {node.name for node in self._cluster.get_primaries()}
        for node, bus in list(self._buses.items()):
            if node not in primaries and not bus.holds():
                del self._buses[node]
                await bus.stop()


def _address(node: tuple[Any, Any]) -> tuple[str, int]:
    """(host, port) of a node as redis-py gives `CLUSTER SLOTS` (host as bytes or str)."""
    host = node[0].decode() if isinstance(node[0], bytes) else str(node[0])
    return host, int(node[1])


Fanout = Bus | ShardedBus
"""A process's pub/sub: one `Bus` on a single Redis, a `ShardedBus` on a cluster."""


def open_bus(
    redis: object,
    url: str,
    wrap: Callable[[bytes], bytes] = _unchanged,
    after: Callable[[], None] | None = None,
) -> Fanout:
    """The fan-out for the process's client `redis` (not started yet); `wrap` and `after`
    as `Bus` takes them."""
    if isinstance(redis, RedisCluster):
        return ShardedBus(redis, wrap, after)
    return Bus(url, wrap, after=after)
