"""The process's Redis client: one Redis, or a Redis Cluster reached through any seed node.

Everything that talks to Redis takes the client made here. In a cluster (`redis.cluster`)
the same key names are used (server/redis/keys.py gives each conversation and each queue
shard its own hash tag), the few steps that span slots run as one script per slot
(server/redis/turns.py says in which order and why), and channels are sharded
(`SPUBLISH`/`SSUBSCRIBE`, server/edge/shardbus.py).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence
from typing import Any, Final, cast

import hiredis
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterPipeline, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.driver_info import DriverInfo
from redis.exceptions import (
    AskError,
    ClusterError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from server.app.config import RedisSettings

AnyRedis = Redis | RedisCluster
"""Either client: both take the same commands, scripts and non-transactional pipelines."""

CLUSTER_ERROR_RETRIES: Final = 8
"""Redirections and reconnections one command may take while a failover settles."""


UNREACHABLE: Final = (RedisError, RedisClusterException, OSError, AttributeError, RuntimeError)
"""What a call may raise while Redis cannot be reached. Besides the usual errors, redis-py's
cluster client can be caught using a connection it is tearing down while a failover settles
(`'NoneType' object has no attribute 'writelines'`, uvloop's `the handler is closed`), and
raises `RedisClusterException`, which is no `RedisError`, when no node it knows answers while
it reads the slot table again; the next call reconnects, so the loops that retry treat those
alike."""


MOVING: Final = (ClusterError, TryAgainError, AskError)
"""Replies that say a slot is elsewhere or on its way there (a failover, a migration): the
cluster is down or its slot not served yet, `TRYAGAIN` for a command whose keys are split
between the slot's two nodes, `ASK`/`MOVED` (an AskError) and redis-py's "TTL exhausted"
after too many of them."""


def passing(exc: BaseException) -> bool:
    """Whether `exc` says Redis cannot answer now (`UNREACHABLE`, or a cluster that is
    `MOVING`) rather than that it refused the command (another `ResponseError`: a script's
    error, a wrong type), which no retry would change."""
    if isinstance(exc, ResponseError):
        return isinstance(exc, MOVING)
    return isinstance(exc, UNREACHABLE)


def connect(settings: RedisSettings) -> Any:
    """The client for `settings` (typed `Any`: redis-py's cluster client and single client
    share their commands but no declared type)."""
    if settings.cluster:
        return WaitingCluster.from_url(
            settings.url,
            max_connections=settings.pool_size,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), CLUSTER_ERROR_RETRIES),
        )
    pool = QuickPool.from_url(
        settings.url,
        max_connections=settings.pool_size,
        timeout=5,
        health_check_interval=10,
        driver_info=DriverInfo(),  # once: each connection would read the package metadata
    )
    pool.connection_class = packed_by_hiredis(pool.connection_class)
    return Redis(connection_pool=pool)


class QuickPool(BlockingConnectionPool):
    """redis-py's blocking pool (a caller waits for a connection while `max_connections` are
    in use), handing out an idle connection and taking it back without the waiting's
    machinery when no one waits: redis-py takes a condition, a timeout and a lock and
    records metrics around every command and pipeline, ≈ 35 µs of a GET's ≈ 160 µs of
    client CPU (docs/benchmarks.md). When callers wait, none is free, the pool is in
    maintenance or a connection must authenticate again, redis-py's own way is taken."""

    async def get_connection(self, *args: Any, **kwargs: Any) -> AbstractConnection:
        available = self._available_connections
        if args or kwargs or not available or self._in_maintenance or self._waiting():
            connected = await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
            return cast(AbstractConnection, connected)
        connection = available.pop()
        self._in_use_connections.add(connection)
        try:
            await self.ensure_connection(connection)
        except BaseException:
            await self.release(connection)
            raise
        return connection

    async def release(self, connection: AbstractConnection) -> None:
        if (
            self._in_maintenance
            or self._waiting()
            or getattr(connection, "_re_auth_token", None) is not None
        ):
            await super().release(connection)
            return
        self._in_use_connections.remove(connection)
        if connection.should_reconnect():  # type: ignore[no-untyped-call]
            await connection.disconnect()
        self._available_connections.append(connection)

    def _waiting(self) -> bool:
        """Whether a caller waits for a connection (it is woken by redis-py's release)."""
        return bool(getattr(self._condition, "_waiters", True))


class HeldConnection:
    """One connection to a single Redis, made as its client's pool makes one and held by a
    sender that sends a command or a pipeline of them at a time and reads their replies
    before it sends more (the worker's pipeliner, one batch after the other): without the
    pool, retry and metrics machinery of redis-py's `execute_command` and pipeline around
    every call, and with one timer for the call rather than an `asyncio.wait_for` task per
    send and a timeout per reply (docs/benchmarks.md). Each step (the send, each reply) must
    finish within the client's `socket_timeout`, as redis-py's own would.

    It is used by one caller at a time (`busy`: another caller takes the client's way). A
    connection Redis closed, or holding bytes nobody asked for, is replaced before a send, as
    the pool replaces one it hands out; one that fails or times out in a call (or whose
    call is cancelled) is disconnected and dropped, and the error raised as redis-py raises
    it (`ConnectionError`, `TimeoutError`): the caller's retry sends the call again, on a
    new connection. Error replies are given as exceptions among the replies (`NoScriptError`
    among them), as a pipeline's `raise_on_error=False` gives them."""

    def __init__(self, redis: Redis) -> None:
        pool = redis.connection_pool
        kwargs = dict(pool.connection_kwargs)
        as_the_pool_makes_it = pool.connection_class(**kwargs)  # (no I/O: its timeouts)
        self.timeout: float | None = as_the_pool_makes_it.socket_timeout
        kwargs["socket_connect_timeout"] = as_the_pool_makes_it.socket_connect_timeout
        kwargs["socket_timeout"] = None  # timed here, a timer per call (`_sent`)
        kwargs["health_check_interval"] = 0  # a closed connection is seen before a send
        self._make = functools.partial(pool.connection_class, **kwargs)
        self._connection: AbstractConnection | None = None
        self.busy = False

    async def run(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Each command's reply, or its error reply as an exception, in order."""
        self.busy = True
        try:
            connection = await self._ready()
            return await self._sent(connection, commands)
        except TimeoutError:  # the step's own timer (`_sent`)
            await self.drop()
            raise RedisTimeoutError("Timeout sending or reading a held connection's call") from None
        except BaseException:
            await self.drop()
            raise
        finally:
            self.busy = False

    async def _sent(
        self, connection: AbstractConnection, commands: Sequence[Sequence[Any]]
    ) -> list[Any]:
        if len(commands) == 1:
            packed = connection.pack_command(*commands[0])
        else:
            packed = connection.pack_commands(commands)
        replies: list[Any] = []
        timeout = self.timeout
        async with asyncio.timeout(timeout) as step:
            await connection.send_packed_command(packed, check_health=False)
            for _ in commands:
                if timeout is not None and replies:
                    step.reschedule(asyncio.get_running_loop().time() + timeout)
                try:
                    replies.append(await connection.read_response())
                except ResponseError as exc:
                    replies.append(exc)
        return replies

    async def _ready(self) -> AbstractConnection:
        """The held connection, connected and with nothing to read, or a new one."""
        connection = self._connection
        if connection is not None and connection.is_connected:
            if not await connection.can_read():
                return connection
            await self.drop()
        connection = self._connection = self._make()
        await connection.connect()  # type: ignore[no-untyped-call]
        return connection

    async def drop(self) -> None:
        """Disconnect the held connection, if any (the next call makes another)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.disconnect(nowait=True)


class WaitingCluster(RedisCluster):
    """redis-py's cluster client, except that a caller waits for a connection when
    `max_connections` commands are in flight, as `BlockingConnectionPool` makes it wait on one
    Redis: redis-py's cluster client fails the command with `MaxConnectionsError` when a
    node's pool is all in use, which a web process joining thousands of sockets at once
    answered as Redis unavailable. At most `max_connections` commands and pipelines are in
    flight at once (a pipeline takes one connection per node it reaches), so no node's pool
    runs out."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.in_flight = asyncio.Semaphore(kwargs.get("max_connections", 100))

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self.in_flight:
            return await super().execute_command(*args, **kwargs)

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> Any:
        if shard_hint:
            return super().pipeline(transaction, shard_hint)  # refused as redis-py refuses it
        return WaitingPipeline(self, transaction)  # type: ignore[abstract]  # as redis-py makes it


class WaitingPipeline(ClusterPipeline):
    """A pipeline of a `WaitingCluster`, counted among its commands in flight."""

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> Any:
        client = self.cluster_client
        assert isinstance(client, WaitingCluster)
        async with client.in_flight:
            return await super().execute(raise_on_error, allow_redirections)


async def opened(settings: RedisSettings) -> Any:
    """The client for `settings`, ready for concurrent use: a cluster client has read the
    slot table before its first command. redis-py routes a command it is asked before it
    knows the table to any node, which answers MOVED, and every fifth MOVED makes the
    client close all its connections, those other commands are using too: the first
    commands of a process that starts several loops at once (the worker's and the
    persister's consumer groups) would fail with `'NoneType' object has no attribute
    'writelines'` or `Connection closed by server`."""
    redis = connect(settings)
    if settings.cluster:
        await redis.initialize()
    return redis


class HiredisPacking:
    """Commands packed by hiredis (C) rather than by the Python loop over every argument of
    redis-py's asyncio connection (which has no hiredis packer): the same bytes for a
    fraction of the time (docs/benchmarks.md). Arguments that are all `bytes`, `str` or `int`
    (what Parley sends) are handed to hiredis as they are, which encodes them exactly as
    redis-py's UTF-8 encoder does; any other (a float, a `bool` redis-py refuses…) goes through
    the connection's own encoder first, so what is sent and refused is unchanged."""

    encoder: Any

    def pack_command(self, *args: Any) -> list[bytes]:
        if type(args[-1]) is Packed:  # packed by its maker, sent as it is
            return [args[-1]]
        if isinstance(args[0], str):  # 'SCRIPT EXISTS': the words of a command apart
            args = (*args[0].encode().split(), *args[1:])
        elif b" " in args[0]:
            args = (*args[0].split(), *args[1:])
        if not (self._utf8 and _AS_THEY_ARE.issuperset(map(type, args))):
            args = tuple(map(self.encoder.encode, args))
        return [hiredis.pack_command(args)]

    @functools.cached_property
    def _utf8(self) -> bool:
        """The encoder is the default one, which hiredis's own encoding matches."""
        encoder = self.encoder
        return bool(encoder.encoding == "utf-8" and encoder.encoding_errors == "strict")


class Packed(bytes):
    """A whole command already in Redis's protocol (RESP), given to `execute_command` after
    its name (`"EVALSHA", packed`: redis-py reads the name, never copying the command): a
    connection that packs with `HiredisPacking` sends it as it is. For a
    caller that makes the same large command shape very often from parts it encoded once
    (the pipeliner's `append_pieces`), where packing every argument again costs more."""


def packs_as_given(redis: object) -> bool:
    """Whether `redis` sends a `Packed` command as it is (a single Redis whose connections
    pack with `HiredisPacking`; a cluster client must read a command's keys to route it)."""
    pool = getattr(redis, "connection_pool", None)
    connection_class = getattr(pool, "connection_class", None)
    return (
        not is_cluster(redis)
        and isinstance(connection_class, type)
        and issubclass(connection_class, HiredisPacking)
    )


def bulk(value: bytes) -> bytes:
    """`value` as a RESP bulk string (as hiredis packs an argument)."""
    return b"$%d\r\n%b\r\n" % (len(value), value)


_AS_THEY_ARE: Final = frozenset({bytes, str, int})
"""Argument types hiredis encodes byte for byte as redis-py does (not `bool`, an `int` that
redis-py refuses, nor `float`, which it writes with `repr`)."""


def packed_by_hiredis(
    connection_class: type[AbstractConnection],
) -> type[AbstractConnection]:
    """`connection_class` (TCP, TLS or Unix socket, as the URL chose) packing with hiredis."""
    name = f"Hiredis{connection_class.__name__}"
    return cast(type[AbstractConnection], type(name, (HiredisPacking, connection_class), {}))


def is_cluster(redis: object) -> bool:
    return isinstance(redis, RedisCluster)


def publish_verb(redis: object) -> str:
    """PUBLISH on one Redis; SPUBLISH in a cluster, where a plain PUBLISH goes to every node."""
    return "SPUBLISH" if is_cluster(redis) else "PUBLISH"


def publish(target: Any, channel: str, message: bytes | str) -> Any:
    """PUBLISH `message` (or queue it, when `target` is a pipeline); sharded in a cluster."""
    if isinstance(target, RedisCluster | ClusterPipeline):
        return target.spublish(channel, message)
    return target.publish(channel, message)
