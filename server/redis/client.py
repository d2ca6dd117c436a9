"""The process's Redis client: one Redis, or a Redis Cluster reached through any seed node.

Everything that talks to Redis takes the client made here. In a cluster (`redis.cluster`)
the same key names are used (server/redis/keys.py gives each conversation and each queue
shard its own hash tag), the few steps that span slots run as one script per slot
(server/redis/turns.py says in which order and why), and channels are sharded
(`SPUBLISH`/`SSUBSCRIBE`, server/edge/shardbus.py).
"""

from __future__ import annotations

from typing import Any, Final

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterPipeline, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisClusterException, RedisError

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


def connect(settings: RedisSettings) -> Any:
    """The client for `settings` (typed `Any`: redis-py's cluster client and single client
    share their commands but no declared type)."""
    if settings.cluster:
        return RedisCluster.from_url(
            settings.url,
            max_connections=settings.pool_size,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), CLUSTER_ERROR_RETRIES),
        )
    pool = BlockingConnectionPool.from_url(
        settings.url, max_connections=settings.pool_size, timeout=5, health_check_interval=10
    )
    return Redis(connection_pool=pool)


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
