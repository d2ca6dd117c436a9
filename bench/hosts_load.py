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
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tests.helpers import redis_cluster
from tests.helpers.faults import Proxy
from tests.helpers.hosts import Network
from tests.helpers.processes import ROOT, Cluster, start_all, start_services
from tests.helpers.procfs import cpu_seconds

TABS = 3


def _redis_pids(backend: str, net: Network, tmp: Path) -> tuple[str, dict[str, int], bool]:
    """Start the backend; its URL, the PIDs of the Redis processes that take writes (by
    name), and whether it is a cluster."""
    if backend == "redis":
        url = net.redis(tmp / "redis")
        return url, {"redis": net.services[-1].pid}, False
    nodes = redis_cluster.start(tmp / "cluster", host=net.gateway)
    net.on_close.append(nodes.stop)
    primaries = {}
    for line in nodes.nodes[0].cli("CLUSTER", "NODES").splitlines():
        parts = line.split()
        if "master" in parts[2]:
            port = int(parts[1].split("@")[0].rsplit(":", 1)[1])
            node = next(n for n in nodes.nodes if n.port == port)
            primaries[f"primary:{port}"] = node.proc.pid
    replicas = {f"replica:{n.port}": n.proc.pid for n in nodes.nodes}
    for name in primaries:
        replicas.pop(f"replica:{name.split(':')[1]}", None)
    return nodes.url, {**primaries, **replicas}, True


def run(backend: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    services = start_services(tmp / "services")
    cluster = Cluster(services, tmp)
    try:
        with Network.make(3, tmp) as net:
            url, pids, clustered = _redis_pids(backend, net, tmp)
            pg = urlsplit(services.database_url)
            assert pg.hostname and pg.port
            with Proxy(pg.hostname, pg.port, listen=net.gateway).start() as postgres:
                env = cluster.env(
                    REDIS_URL=url,
                    PARLEY_REDIS_CLUSTER=str(clustered).lower(),
                    DATABASE_URL=postgres.url(services.database_url),
                )
                webs = [host.process("web", env, start=False) for host in net.hosts]
                workers = [host.process("worker", env, start=False) for host in net.hosts]
                start_all([*webs, *workers])
                out = tmp / f"load-{backend}.json"
                command = [sys.executable, "-m", "server.app.cli", "load", "fanout"]
                command += [a for web in webs for a in ("--url", web.ws_url)]
                command += ["--conversations", str(args.conversations), "--tabs", str(TABS)]
                command += ["--tokens", str(args.tokens), "--tps", str(args.tps)]
                command += ["--rate", str(args.rate), "--duration", str(args.duration)]
                command += ["--no-progress", "--no-charts", "--out", str(out)]
                before = {name: cpu_seconds(pid) for name, pid in pids.items()}
                done = subprocess.run(
                    command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
                )
                after = {name: cpu_seconds(pid) for name, pid in pids.items()}
                if done.returncode != 0:
                    print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
                result = json.loads(out.read_text())
                net.stop_processes()  # before the proxy to PostgreSQL closes
    finally:
        cluster.stop_all()
        services.stop()
    return _summary(backend, result, {n: after[n] - before[n] for n in pids})


def _summary(backend: str, result: dict[str, Any], cpu: dict[str, float]) -> dict[str, Any]:
    frames = result["throughput"]["frames"]
    tokens = result["throughput"]["tokens"]
    latency = result["latency_ms"]
    appended = max(tokens / TABS, 1)  # each appended token reaches every tab
    written = {name: seconds for name, seconds in cpu.items() if not name.startswith("replica")}
    return {
        "backend": backend,
        "sockets": result["connections"]["opened"],
        "frames_per_second": result["throughput"]["frames_per_second"],
        "tokens_per_second": result["throughput"]["tokens_per_second"],
        "frames": frames,
        "tokens": tokens,
        "ttft_ms": {k: latency.get("ttft", {}).get(k) for k in ("p50_ms", "p99_ms")},
        "token_gap_ms": {k: latency.get("gap", {}).get(k) for k in ("p50_ms", "p99_ms")},
        "lost": result["integrity"]["lost"],
        "duplicated": result["integrity"]["duplicated"],
        "redis_cpu_seconds": {k: round(v, 2) for k, v in cpu.items()},
        "redis_cpu_us_per_frame": round(sum(written.values()) / max(frames, 1) * 1e6, 2),
        "redis_cpu_us_per_appended_token": round(sum(written.values()) / appended * 1e6, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--tps", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=0.5, help="turns/s per conversation")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--backends", default="redis,cluster")
    args = parser.parse_args()
    rows = []
    for backend in args.backends.split(","):
        with tempfile.TemporaryDirectory(prefix="parley-hosts-") as tmp:
            rows.append(run(backend, args, Path(tmp)))
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
