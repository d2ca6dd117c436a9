"""Shared test fixtures: real embedded Redis and PostgreSQL (one each per test session) and
Parley itself as real server processes on 127.0.0.1.

Tests isolate themselves by using fresh user names and conversations, so one server serves
many tests; tests that restart or kill processes start their own.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import jwt
import pytest
import pytest_asyncio

from server.dev import embedded
from server.dev.client import Client

ROOT = Path(__file__).resolve().parent.parent
SECRET = "parley-test-secret-0123456789abcdef0123456789"
FAST_MODEL = {
    "PARLEY_SIMULATOR_FIRST_TOKEN_DELAY": "0.02",
    "PARLEY_SIMULATOR_TOKENS_PER_SECOND": "400",
}


@dataclass
class Services:
    redis_url: str
    database_url: str
    redis: embedded.Service
    postgres: embedded.Service


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    data = tmp_path_factory.mktemp("services")
    redis = embedded.start_redis(data, persist=False)
    postgres = embedded.start_postgres(data, fast=True)
    try:
        yield Services(redis.url, postgres.url, redis, postgres)
    finally:
        redis.stop()
        postgres.stop()


def mint(user: str, ttl: float = 3600, secret: str = SECRET, **claims: object) -> str:
    now = int(time.time())
    payload: dict[str, object] = {"sub": user, "iat": now, "exp": now + int(ttl), **claims}
    return jwt.encode(payload, secret, algorithm="HS256")


def new_user() -> str:
    return f"user-{uuid.uuid4().hex[:10]}"


@dataclass
class ParleyProcess:
    """`parley serve | web | worker` as a child process, stopped only by its own PID."""

    role: str
    env: dict[str, str]
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    extra: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, wait: bool = True) -> ParleyProcess:
        args = [sys.executable, "-m", "server.app.cli", self.role, *self.extra]
        if self.role in ("serve", "web"):
            args += ["--port", str(self.port)]
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(args, cwd=ROOT, env=self.env, stdout=log, stderr=log)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"parley {self.role} exited:\n{self.log()}")
            if self.role == "worker":
                if "worker ready" in self.log():
                    return
            else:
                try:
                    with urllib.request.urlopen(f"{self.url}/readyz", timeout=1) as r:
                        if r.status == 200:
                            return
                except OSError:
                    pass
            time.sleep(0.05)
        raise TimeoutError(f"parley {self.role} not ready:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

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
    """Starts Parley processes against the session's Redis and PostgreSQL."""

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
        self.started.append(proc)
        return proc.start() if start else proc

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            proc.stop(timeout=15)


@pytest.fixture(scope="session")
def cluster(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(services, tmp_path_factory.mktemp("parley"))
    try:
        yield cluster
    finally:
        cluster.stop_all()


@pytest.fixture(scope="session")
def parley(cluster: Cluster) -> ParleyProcess:
    """One `parley serve` shared by the tests that need an ordinary server."""
    return cluster.process("serve")


@pytest.fixture
def user() -> str:
    return new_user()


@pytest_asyncio.fixture
async def connect(parley: ParleyProcess) -> AsyncIterator[object]:
    """connect(user=None, **kw) -> Client on the shared server; closed after the test."""
    clients: list[Client] = []

    async def open_client(
        user: str | None = None, server: ParleyProcess | None = None, **kwargs: object
    ) -> Client:
        target = server or parley
        client = await Client.connect(target.ws_url, mint(user or new_user()), **kwargs)  # type: ignore[arg-type]
        clients.append(client)
        return client

    yield open_client
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


@pytest_asyncio.fixture(loop_scope="session", scope="session")
async def db(services: Services) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(services.database_url, min_size=1, max_size=4)
    assert pool is not None
    yield pool
    await pool.close()
