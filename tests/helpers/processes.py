"""Embedded Redis and PostgreSQL, and Parley itself as real child processes on 127.0.0.1.

Every process here is stopped only by its own PID.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import IntEnum, unique
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster as RedisClusterClient

from server.dev import embedded
from server.redis import generations
from tests.helpers import redis_cluster
from tests.helpers.auth import SECRET

ROOT = Path(__file__).resolve().parents[2]
WORKING_ROLES: Final = ("serve", "worker")

PORT_TAKEN = "address already in use"
"""What uvicorn logs when the port it was given is taken."""

FAST_MODEL = {
    "PARLEY_SIMULATOR_FIRST_TOKEN_DELAY": "0.02",
    "PARLEY_SIMULATOR_TOKENS_PER_SECOND": "400",
}

INSTANT_TURNS = {
    "PARLEY_SIMULATOR_FIRST_TOKEN_DELAY": "0",
    "PARLEY_SIMULATOR_TOKENS_PER_SECOND": "0",
    "PARLEY_LIMITS_TURNS_PER_MINUTE": "100000",
    "PARLEY_SERVER_LOG_LEVEL": "warning",
}
"""For a benchmark that times turns: the simulated model answers at once, the turn rate never
refuses, and the log says only what went wrong."""


# Each group of processes that runs workers gets its own Redis database so that no worker of
# another group (all share one Redis) claims its turns: streams and keys are per database, and
# the pub/sub channels involved are per conversation or per user.
@unique
class Db(IntEnum):
    """The Redis database of each group of test processes that must not see another's
    queues (a worker claims any turn in its database). Database 0 is the shared `parley`
    server's; one number each, listed here so that no two tests pick the same."""

    SCALE = 1
    SHORT_LOG = 2
    SLOW_READER = 3
    OPS = 4
    REDIS_OUTAGE = 5
    PG_OUTAGE = 6
    PG_PAUSED = 7
    POISON = 8
    SHUTDOWN = 9
    SCRIPTS = 10
    SERVER_API = 11
    SSE = 12
    SLOW_SSE = 13
    TRACING = 14
    TRACING_NO_WORKER = 15
    METRICS = 16
    LOGS = 17
    HOOKS = 18
    HOOKS_TIMEOUT = 19
    HOOKS_PROCESS_KILLED = 20
    HOOKS_GIVE_UP = 21
    HOOKS_UI = 22
    UI_SHORT_STREAMS = 23
    LLAMA = 24
    LLAMA_SHORT = 25
    THINK_TAGS = 26
    BUDGETS = 27
    BUDGETS_UI = 28
    RESTART = 29
    PROMETHEUS = 30
    DEV_LOGIN_UI = 31
    IDENTITY = 32
    TOKEN_RENEWAL = 33
    AUTH_TIMEOUT = 34
    TOOLS = 40
    TOOLS_TAKEOVER = 41
    FAIR_QUEUE = 50
    FAIR_QUEUE_CAP = 51
    FAIR_QUEUE_KILL = 52
    ONE_BUSY_SHARD = 60
    LOST_ACKNOWLEDGED = 61
    APPROVALS = 45
    APPROVALS_EXPIRY = 46
    APPROVALS_UI = 47
    PERSISTER = 110
    REPLICA_BEHIND = 150
    FIRST_TOKEN_STAGES = 135


SCALE_DB = Db.SCALE


@dataclass
class Services:
    redis_url: str
    database_url: str
    redis: embedded.Service
    postgres: embedded.Service

    def stop(self) -> None:
        self.redis.stop()
        self.postgres.stop()


def start_services(data: Path) -> Services:
    """An embedded Redis (no persistence) and PostgreSQL (fsync off) with their data in `data`."""
    redis = embedded.start_redis(data, persist=False, databases=max(Db) + 1)
    try:
        postgres = embedded.start_postgres(data, fast=True)
    except BaseException:
        redis.stop()
        raise
    return Services(redis.url, postgres.url, redis, postgres)


def redis_db(url: str, db: int) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{db}"))


def answers(url: str) -> bool:
    """Whether GET `url` answers 200 within a second."""
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def read_log(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def wait_until_up(
    proc: subprocess.Popen[bytes],
    up: Callable[[], bool],
    what: str,
    log: Callable[[], str],
    timeout: float,
    pause: float = 0.05,
) -> None:
    """Wait until `up()` says the process `what` serves; RuntimeError as soon as it exits,
    TimeoutError after `timeout` seconds, either with its `log()`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited:\n{log()}")
        if up():
            return
        time.sleep(pause)
    raise TimeoutError(f"{what} not ready:\n{log()}")


@dataclass
class ParleyProcess:
    """`parley serve | web | worker | model` as a child process, stopped only by its own PID.

    `preexec` runs in the child before Parley starts (the benchmarks pin CPUs with it).
    `launcher` comes before the Python command line and `host` is the address it listens
    on and is reached at (tests/helpers/hosts.py runs processes in network namespaces)."""

    role: str
    env: dict[str, str]
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    extra: list[str] = field(default_factory=list)
    preexec: Callable[[], None] | None = None
    host: str = "127.0.0.1"
    launcher: list[str] = field(default_factory=list)
    _port_clashes: int = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/ws"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, wait: bool = True) -> ParleyProcess:
        args = [*self.launcher, sys.executable, "-m", "server.app.cli", self.role, *self.extra]
        if self.role in ("serve", "web"):
            args += ["--host", self.host, "--port", str(self.port)]
        self._port_clashes = self.log().count(PORT_TAKEN)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            args, cwd=ROOT, env=self.env, stdout=log, stderr=log, preexec_fn=self.preexec
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30) -> None:
        while True:
            assert self.proc is not None
            try:
                wait_until_up(self.proc, self._ready, f"parley {self.role}", self.log, timeout)
                return
            except RuntimeError:
                if not self._lost_its_port():
                    raise
                self.start(wait=False)

    def _ready(self) -> bool:
        if self.role == "worker":
            return "worker ready" in self.log()
        return answers(f"{self.url}/readyz")

    def _lost_its_port(self) -> bool:
        """Whether the web server exited because another process took its port between
        `free_port()` and the bind (other processes start all the time); if so, it gets a
        new one, at most a few times."""
        clashes = self.log().count(PORT_TAKEN)
        if self.role not in ("serve", "web") or clashes <= self._port_clashes or clashes > 3:
            return False
        self.port = embedded.free_port()
        return True

    def log(self) -> str:
        return read_log(self.log_path)

    def send_signal(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.proc is None:
            return None
        self.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


@dataclass
class Cluster:
    """Starts Parley processes against one Redis and PostgreSQL (the test session's)."""

    services: Services
    tmp: Path
    started: list[ParleyProcess] = field(default_factory=list)

    def env(self, **overrides: str) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("PARLEY_", "OPENAI_")) and k not in ("PORT",)
        }
        env.update(
            REDIS_URL=self.services.redis_url,
            DATABASE_URL=self.services.database_url,
            PARLEY_JWT_SECRET=SECRET,
            PARLEY_DATA_DIR=str(self.tmp / "data"),
            PARLEY_CONFIG=str(self.tmp / "none.toml"),
            PARLEY_SERVER_LOG_LEVEL="info",
            **FAST_MODEL,
        )
        env.update(overrides)
        return env

    def process(self, role: str, *, start: bool = True, **env: str) -> ParleyProcess:
        name = f"{role}-{len(self.started)}"
        proc = ParleyProcess(role, self.env(**env), embedded.free_port(), self.tmp / f"{name}.log")
        self._refuse_a_second_worker(proc)
        self.started.append(proc)
        return proc.start() if start else proc

    def _refuse_a_second_worker(self, proc: ParleyProcess) -> None:
        """The session's shared database has one process running a worker, the shared
        server: a second one would take turns of the tests that use it (and send them to its
        own simulated model). Groups of workers each have a database of their own."""
        url = self.services.redis_url
        if proc.role not in WORKING_ROLES or proc.env["REDIS_URL"] != url:
            return
        for other in self.started:
            running = other.proc is not None and other.proc.poll() is None
            if running and other.role in WORKING_ROLES and other.env["REDIS_URL"] == url:
                raise AssertionError(
                    f"a {proc.role} on the shared database, where a {other.role} runs: "
                    "give it a database of its own (Db, redis_db)"
                )

    def model(self, **env: str) -> ParleyProcess:
        """A standalone simulated model (`parley model`), not started yet."""
        port = embedded.free_port()
        name = f"model-{len(self.started)}"
        proc = ParleyProcess(
            "model", self.env(**env), port, self.tmp / f"{name}.log", extra=["--port", str(port)]
        )
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            proc.stop(timeout=15)


def small_outbox_server(cluster: Cluster, db: int, tokens: int) -> ParleyProcess:
    """`parley serve` (not started yet) on Redis database `db` whose sockets' outboxes hold
    64 KiB, and whose model may reply with up to `tokens` tokens: for slow readers."""
    return cluster.process(
        "serve",
        start=False,
        REDIS_URL=redis_db(cluster.services.redis_url, db),
        PARLEY_LIMITS_OUTBOX_BYTES="65536",
        PARLEY_LLM_MAX_TOKENS=str(tokens + 10),
        PARLEY_SIMULATOR_MAX_TOKENS=str(tokens + 10),
    )


@contextmanager
def two_webs_and_a_worker(
    cluster: Cluster, **env: str
) -> Iterator[tuple[ParleyProcess, ParleyProcess]]:
    """Two `parley web` processes and a worker (with its own simulated model), started
    together with `env` and stopped together."""
    procs = [cluster.process(role, start=False, **env) for role in ("web", "web", "worker")]
    start_all(procs)
    try:
        yield procs[0], procs[1]
    finally:
        stop_together(procs)


def start_all(procs: Iterable[ParleyProcess], timeout: float = 90) -> None:
    """Start processes side by side (each takes seconds to import, more on a busy machine),
    then wait for each; if one does not come up, stop them all (only these) and raise."""
    procs = list(procs)
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.start(wait=False)
        for proc in procs:
            left = max(deadline - time.monotonic(), 1)
            if proc.role == "model":
                wait_model(proc, left)
            else:
                proc.wait_ready(left)
    except BaseException:
        stop_together(procs)
        raise


def wait_model(proc: ParleyProcess, timeout: float = 30) -> None:
    assert proc.proc is not None
    up = functools.partial(answers, f"{proc.url}/v1/sim/stats")
    wait_until_up(proc.proc, up, "parley model", proc.log, timeout)


def model_stats_now(proc: ParleyProcess) -> dict[str, Any]:
    with urllib.request.urlopen(f"{proc.url}/v1/sim/stats", timeout=2) as response:
        stats: dict[str, Any] = json.loads(response.read())
        return stats


async def model_stats(proc: ParleyProcess) -> dict[str, Any]:
    return await asyncio.to_thread(model_stats_now, proc)


def counter_now(proc: ParleyProcess, name: str) -> int:
    """The unlabelled counter `name` from the process's GET /metrics."""
    with urllib.request.urlopen(f"{proc.url}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(f"{name} "):
                return int(float(line.split()[1]))
    raise AssertionError(f"no {name} in {proc.url}/metrics")


def postgres_queries_now(proc: ParleyProcess) -> int:
    """`parley_postgres_queries_total` from the process's GET /metrics."""
    return counter_now(proc, "parley_postgres_queries_total")


async def postgres_queries(proc: ParleyProcess) -> int:
    return await asyncio.to_thread(postgres_queries_now, proc)


def alive(procs: Iterable[ParleyProcess]) -> list[ParleyProcess]:
    return [p for p in procs if p.proc is not None and p.proc.poll() is None]


async def stop_all(procs: Iterable[ParleyProcess]) -> None:
    await asyncio.gather(*(asyncio.to_thread(p.stop, timeout=15) for p in procs))


def stop_together(procs: Iterable[ParleyProcess]) -> None:
    """SIGTERM each (only the processes given) and wait for all, side by side."""
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda p: p.stop(timeout=15), procs))


@dataclass
class RedisBackend:
    """Where a group of test processes keeps its Redis state: a database of the session's
    single Redis, or a six-node Redis Cluster of its own (a cluster has no databases)."""

    url: str
    clustered: bool = False
    nodes: redis_cluster.SixNodes | None = None
    """The cluster's nodes, for a test that kills one."""

    def env(self) -> dict[str, str]:
        return {"REDIS_URL": self.url, "PARLEY_REDIS_CLUSTER": str(self.clustered).lower()}

    def client(self) -> Any:
        """A redis-py client for the tests' own reads (closed by the caller)."""
        if self.clustered:
            return RedisClusterClient.from_url(self.url)
        return Redis.from_url(self.url)


class RedisClusters:
    """Six-node Redis Clusters made on demand (one per group of processes that must not
    share queues), all stopped at the end of the session."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[redis_cluster.SixNodes] = []

    def backend(self) -> RedisBackend:
        nodes = redis_cluster.start(self.tmp / f"cluster-{len(self.started)}")
        self.started.append(nodes)
        return RedisBackend(nodes.url, clustered=True, nodes=nodes)

    def stop(self) -> None:
        for nodes in self.started:
            nodes.stop()


BACKENDS = ["redis", "redis-cluster"]
"""The parameters of a fixture whose processes run against a single Redis and against a
six-node Redis Cluster (the guarantee tests run on both)."""


def clusters_for(request: Any) -> RedisClusters | None:
    """For a fixture parametrized with BACKENDS: None for `redis`, the session's Redis
    Clusters (fixture `redis_clusters`) for `redis-cluster`."""
    if request.param == "redis":
        return None
    clusters: RedisClusters = request.getfixturevalue("redis_clusters")
    return clusters


class Scaled:
    """2 web + 2 worker processes on their own Redis database (or Redis Cluster), and the
    standalone simulated model they all use."""

    def __init__(
        self,
        webs: list[ParleyProcess],
        workers: list[ParleyProcess],
        model: ParleyProcess,
        backend: RedisBackend,
    ) -> None:
        self.webs = webs
        self.workers = workers
        self.model = model
        self.backend = backend
        self.redis_url = backend.url

    def __repr__(self) -> str:
        return f"Scaled(webs={[w.port for w in self.webs]}, model={self.model.port})"


_scaled: dict[tuple[int, bool], Scaled] = {}


def scaled_cluster(cluster: Cluster, clusters: RedisClusters | None = None) -> Scaled:
    """The `Scaled` processes, started once per cluster (which stops them) and shared by the
    tests that do not break them; started again if one of them died. With `clusters`, on a
    Redis Cluster of their own instead of a database of the session's Redis."""
    clustered = clusters is not None
    found = _scaled.get((id(cluster), clustered))
    if found:
        if len(alive([*found.webs, *found.workers, found.model])) == 5:
            return found
        stop_together([*found.webs, *found.workers, found.model])  # no stray consumers
    if clusters is None:
        backend = RedisBackend(redis_db(cluster.services.redis_url, SCALE_DB))
    else:
        backend = found.backend if found else clusters.backend()
    model = cluster.model()
    env = {
        **backend.env(),
        "OPENAI_BASE_URL": f"{model.url}/v1",
        "OPENAI_API_KEY": "sim",
    }
    webs = [cluster.process("web", start=False, **env) for _ in range(2)]
    workers = [cluster.process("worker", start=False, **env) for _ in range(2)]
    start_all([model, *webs, *workers])
    _scaled[(id(cluster), clustered)] = found = Scaled(webs, workers, model, backend)
    return found


async def worker_of(redis: Redis, conversation: uuid.UUID) -> int | None:
    """The pid of the worker running the conversation's generation ("<host>-<pid>")."""
    owner = await generations.worker(redis, conversation)
    return None if owner is None else int(owner.rsplit("-", 1)[1])


def poll_readyz(url: str, seconds: float) -> list[tuple[float, int | str]]:
    """GET /readyz every 20 ms: (time, status or the error), until refused a few times."""
    seen: list[tuple[float, int | str]] = []
    deadline = time.monotonic() + seconds
    refused = 0
    while time.monotonic() < deadline and refused < 3:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=0.5) as response:
                status: int | str = response.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except OSError as exc:
            status = type(exc).__name__
            refused += 1
        seen.append((time.monotonic(), status))
        time.sleep(0.02)
    return seen


@contextmanager
def bench_cluster(tmp: Path) -> Iterator[Cluster]:
    """Embedded services and a `Cluster` on them for a benchmark script: on failure the
    processes' logs are printed; on the way out every process and service is stopped."""
    services = start_services(tmp)
    cluster = Cluster(services, tmp)
    try:
        yield cluster
    except BaseException:
        for proc in cluster.started:
            print(proc.log()[-3000:])
        raise
    finally:
        cluster.stop_all()
        services.stop()
