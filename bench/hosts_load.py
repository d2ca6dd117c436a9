"""`parley load` across three hosts, one Redis against a three-primary Redis Cluster at the
same offered load: delivered frames/s, token latency, and each Redis process's CPU per
delivered frame and per appended token.

    .venv/bin/python -m bench.hosts_load [--conversations 100] [--tokens 100] [--tps 20]
                                         [--duration 20] [--backends redis,cluster]

Makes three hosts (network namespaces on a bridge, tests/helpers/hosts.py; needs root and
iproute2), each running `parley web` and `parley worker` (with its own simulated model);
PostgreSQL (embedded, on 127.0.0.1) is reached through a proxy on the bridge's address, Redis
listens there itself (one `redis-server`, or six as a cluster: three primaries, one replica
each). One `parley load fanout` run spreads each conversation's three tabs over the three
hosts' web processes (`--url` three times). Everything it starts is stopped by PID and every
namespace and link it makes is deleted.

For tens of thousands of sockets (30,000: `--conversations 10000 --rate 0.005 --procs 2`) the
bench raises its own open-file limit before it starts anything (to 200,000, or to the hard
limit where raising that is not permitted), so the web processes and the load generators it
starts inherit it: each web process holds a third of the sockets, each generator its share.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tests.helpers import redis_cluster
from tests.helpers.faults import Proxy
from tests.helpers.hosts import Network
from tests.helpers.processes import ROOT, Cluster, start_all, start_services
from tests.helpers.procfs import cpu_seconds

TABS = 3
IDLE_SECONDS = 10.0
OPEN_FILES = 200_000
"""The open-file limit the bench sets for itself and every process it starts."""


@dataclass
class Redises:
    """The backend's URL, its Redis processes by name ("redis", "primary:PORT",
    "replica:PORT") as (PID, address), and whether it is a cluster."""

    url: str
    processes: dict[str, tuple[int, str]]
    clustered: bool

    def cpu(self) -> dict[str, float]:
        """Each process's CPU seconds so far (user + system, from /proc)."""
        return {name: cpu_seconds(pid) for name, (pid, _) in self.processes.items()}

    def reset_commandstats(self) -> None:
        for _, address in self.processes.values():
            _cli(address, "CONFIG", "RESETSTAT")

    def command_seconds(self) -> dict[str, float]:
        """Seconds each process spent executing commands since the reset (INFO
        commandstats: the sum of every command's usec), without its idle housekeeping."""
        return {
            name: _command_usec(_cli(address, "INFO", "commandstats")) / 1e6
            for name, (_, address) in self.processes.items()
        }


def _cli(address: str, *args: str) -> str:
    host, port = address.rsplit(":", 1)
    command = [shutil.which("redis-cli") or "redis-cli", "-h", host, "-p", port, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=10, check=True).stdout


def _command_usec(info: str) -> float:
    """cmdstat_evalsha:calls=1,usec=12,usec_per_call=… lines → the sum of usec."""
    total = 0.0
    for line in info.splitlines():
        if line.startswith("cmdstat_"):
            fields = dict(kv.split("=", 1) for kv in line.split(":", 1)[1].split(","))
            total += float(fields["usec"])
    return total


def _start_redis(backend: str, net: Network, tmp: Path) -> Redises:
    """The backend, listening on the bridge's address."""
    if backend == "redis":
        url = net.redis(tmp / "redis")
        address = urlsplit(url).netloc
        return Redises(url, {"redis": (net.services[-1].pid, address)}, False)
    nodes = redis_cluster.start(tmp / "cluster", host=net.gateway)
    net.on_close.append(nodes.stop)
    primaries = {n.port for n in nodes.primaries()}  # those serving slots: a node is listed
    # as a master until its CLUSTER REPLICATE has gone through
    processes = {
        f"{'primary' if n.port in primaries else 'replica'}:{n.port}": (n.proc.pid, n.address)
        for n in nodes.nodes
    }
    return Redises(nodes.url, dict(sorted(processes.items())), True)


def run(backend: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    services = start_services(tmp / "services")
    cluster = Cluster(services, tmp)
    try:
        with Network.make(3, tmp) as net:
            redises = _start_redis(backend, net, tmp)
            pg = urlsplit(services.database_url)
            assert pg.hostname and pg.port
            with Proxy(pg.hostname, pg.port, listen=net.gateway).start() as postgres:
                env = cluster.env(
                    REDIS_URL=redises.url,
                    PARLEY_REDIS_CLUSTER=str(redises.clustered).lower(),
                    DATABASE_URL=postgres.url(services.database_url),
                    PARLEY_REDIS_CONVERSATION_SLOTS=str(args.conversation_slots),
                )
                webs = [host.process("web", env, start=False) for host in net.hosts]
                workers = [host.process("worker", env, start=False) for host in net.hosts]
                start_all([*webs, *workers], timeout=300)
                out = tmp / f"load-{backend}.json"
                command = [sys.executable, "-m", "server.app.cli", "load", "fanout"]
                command += [a for web in webs for a in ("--url", web.ws_url)]
                command += ["--conversations", str(args.conversations), "--tabs", str(TABS)]
                command += ["--tokens", str(args.tokens), "--tps", str(args.tps)]
                command += ["--rate", str(args.rate), "--duration", str(args.duration)]
                command += ["--procs", str(args.procs), "--max-connections", str(OPEN_FILES)]
                command += ["--no-progress", "--no-charts", "--out", str(out)]
                idle = _idle_rate(redises)
                redises.reset_commandstats()
                before = redises.cpu()
                started = time.monotonic()
                done = subprocess.run(
                    command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600
                )
                after = redises.cpu()
                seconds = time.monotonic() - started
                commands = redises.command_seconds()
                print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
                result = json.loads(out.read_text())
                net.stop_processes()  # before the proxy to PostgreSQL closes
    finally:
        cluster.stop_all()
        services.stop()
    cpu = {name: after[name] - before[name] for name in before}
    busy = {name: cpu[name] - idle[name] * seconds for name in cpu}
    return _summary(backend, result, busy, commands)


def _idle_rate(redises: Redises, seconds: float = IDLE_SECONDS) -> dict[str, float]:
    """Each Redis process's CPU seconds per second with every Parley process connected and
    nothing to do (cron, cluster bus, the workers' blocked reads and leases): subtracted
    from the run's, so that what is left is the load's."""
    before = redises.cpu()
    time.sleep(seconds)
    after = redises.cpu()
    return {name: (after[name] - before[name]) / seconds for name in before}


def _summary(
    backend: str, result: dict[str, Any], cpu: dict[str, float], commands: dict[str, float]
) -> dict[str, Any]:
    frames = result["throughput"]["frames"]
    tokens = result["throughput"]["tokens"]
    latency = result["latency_ms"]
    appended = max(tokens / TABS, 1)  # each appended token reaches every tab
    written = [name for name in cpu if not name.startswith("replica")]
    process_seconds = sum(cpu[name] for name in written)
    command_seconds = sum(commands[name] for name in written)
    return {
        "backend": backend,
        "sockets": result["connections"]["opened"],
        "frames_per_second": result["throughput"]["frames_per_second"],
        "tokens_per_second": result["throughput"]["tokens_per_second"],
        "frames": frames,
        "tokens": tokens,
        "ttft_ms": {k: latency.get("ttft", {}).get(k) for k in ("p50_ms", "p99_ms")},
        "token_gap_ms": {k: latency.get("gap", {}).get(k) for k in ("p50_ms", "p99_ms")},
        "connect_ms": {k: latency.get("connect", {}).get(k) for k in ("p50_ms", "p99_ms")},
        "lost": result["integrity"]["lost"],
        "duplicated": result["integrity"]["duplicated"],
        "redis_cpu_seconds_above_idle": {k: round(v, 2) for k, v in cpu.items()},
        "redis_command_seconds": {k: round(v, 2) for k, v in commands.items()},
        "primaries_cpu_us_per_frame": round(process_seconds / max(frames, 1) * 1e6, 2),
        "primaries_cpu_us_per_appended_token": round(process_seconds / appended * 1e6, 2),
        "primaries_command_us_per_appended_token": round(command_seconds / appended * 1e6, 2),
    }


def open_files() -> int:
    """Raise this process's open-file limit (inherited by everything it starts) to
    OPEN_FILES, or as far as the hard limit allows where raising that is not permitted."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES, OPEN_FILES))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--tps", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=0.5, help="turns/s per conversation")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--backends", default="redis,cluster")
    parser.add_argument("--procs", type=int, default=1, help="load generator processes")
    parser.add_argument(
        "--conversation-slots", type=int, default=0, help="redis.conversation_slots (cluster)"
    )
    args = parser.parse_args()
    print(f"open files: {open_files()}", file=sys.stderr)
    rows = []
    for backend in args.backends.split(","):
        with tempfile.TemporaryDirectory(prefix="parley-hosts-") as tmp:
            rows.append(run(backend, args, Path(tmp)))
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
