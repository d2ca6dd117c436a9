"""A `redis-server` run under valgrind's callgrind, for counting the instructions it executes.

CPU time on a shared machine moves by ±20 % from run to run; the instructions Redis executes
for the same work do not (they leave out what memory and caches cost, so they are the
figure to compare two versions of a script by, beside the CPU time, not instead of it).
`instructions()` asks callgrind to dump its counts (which also zeroes them) and returns the
running total; the difference around a round is what the round cost. Redis runs 20 to 50 times
slower under valgrind: keep the rounds small. Started on 127.0.0.1, stopped by its PID.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from server.dev.embedded import free_port

READY_TIMEOUT = 60.0
DUMP_TIMEOUT = 60.0


class CallgrindRedis:
    def __init__(self, directory: Path, binary: str) -> None:
        if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
            raise RuntimeError("valgrind (with callgrind_control) is not installed")
        self.directory = directory
        self.port = free_port()
        self.total = 0
        self._read: set[Path] = set()
        argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={directory / 'out'}"]
        argv += [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "no", "--dir", str(directory)]
        quiet = subprocess.DEVNULL
        self.proc = subprocess.Popen(argv, stdout=quiet, stderr=quiet)
        self._wait_ready()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def instructions(self) -> int:
        """Instructions executed since the start (a dump per call)."""
        control = ["callgrind_control", "--dump", str(self.proc.pid)]
        subprocess.run(control, capture_output=True, check=True)
        deadline = time.monotonic() + DUMP_TIMEOUT
        while time.monotonic() < deadline:
            for dump in set(self.directory.glob("out*")) - self._read:
                totals = _totals(dump)
                if totals is not None:
                    self._read.add(dump)
                    self.total += totals
                    return self.total
            time.sleep(0.05)
        raise RuntimeError("callgrind wrote no dump")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            try:
                with Redis(port=self.port, socket_connect_timeout=1) as probe:
                    if probe.ping():
                        return
            except RedisConnectionError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("redis-server under valgrind did not start")


def _totals(dump: Path) -> int | None:
    """The dump's instruction total, None while it is still being written."""
    for line in dump.read_text(errors="replace").splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    return None
