"""Hosts that can die: Linux network namespaces on one bridge, each a machine of its own.

    with Network.make(3) as net:          # namespaces p<pid>h0..2, bridge pb<pid>
        redis = net.redis(tmp)            # redis-server on the bridge's address
        web = net.hosts[0].process("web", env)
        net.hosts[1].cut()                # link down: the host is unreachable, keeps running
        net.hosts[1].restore()
        net.hosts[2].kill()               # SIGKILL every process the host runs

Every name carries the creating process's PID, so concurrent runs do not meet; `close`
(the context manager's exit, even on failure) stops the processes it started, by PID, and
deletes only the namespaces and links it made. The hosts' addresses are in a private /24
(10.231.N.0/24, N chosen free) whose .1 is the bridge in the root namespace: the test, and
the services it binds to that address, reach every host, and every host reaches them.
Needs root and iproute2 (`ip`); `available()` says why not.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from server.dev.embedded import free_port
from tests.helpers.processes import ParleyProcess, read_log, stop_together, wait_until_up

SUBNET = "10.231"
IP_TIMEOUT = 10.0


class HostsUnavailable(RuntimeError):
    pass


def ip(*args: str) -> str:
    """Run `ip ARGS` (iproute2); raise with its output on failure."""
    done = subprocess.run(
        [shutil.which("ip") or "ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT
    )
    if done.returncode != 0:
        raise HostsUnavailable(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def available() -> str | None:
    """None when network namespaces can be made here, else why not."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed (apt-get install iproute2)"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    return None


@dataclass
class Host:
    """One network namespace with one address, joined to the bridge by a veth pair."""

    namespace: str
    address: str
    link: str
    """The veth end in the root namespace: down = the host cut off the network."""
    tmp: Path
    started: list[ParleyProcess] = field(default_factory=list)

    def process(self, role: str, env: dict[str, str], *, start: bool = True) -> ParleyProcess:
        """`parley ROLE` inside this host, listening on its address (web) or on nothing
        reachable from outside (worker: its simulated model stays on the host's loopback)."""
        name = f"{self.namespace}-{role}-{len(self.started)}"
        proc = ParleyProcess(
            role,
            env,
            free_port(),
            self.tmp / f"{name}.log",
            host=self.address,
            launcher=[shutil.which("ip") or "ip", "netns", "exec", self.namespace],
        )
        self.started.append(proc)
        return proc.start() if start else proc

    def running(self) -> list[ParleyProcess]:
        return [p for p in self.started if p.proc is not None and p.proc.poll() is None]

    def cut(self) -> None:
        """Take the host off the network: packets to and from it are dropped (no reset,
        no close), as when a cable is pulled; its processes keep running."""
        ip("link", "set", self.link, "down")

    def restore(self) -> None:
        ip("link", "set", self.link, "up")

    def kill(self) -> None:
        """The host dies: SIGKILL every process it started (by PID), all at once."""
        for proc in self.running():
            proc.send_signal(signal.SIGKILL)
        for proc in self.started:
            if proc.proc is not None:
                proc.proc.wait(10)


@dataclass
class Network:
    """A bridge in the root namespace (address .1) and hosts .2, .3, … behind it."""

    tag: str
    prefix: str
    bridge: str
    tmp: Path
    hosts: list[Host] = field(default_factory=list)
    services: list[subprocess.Popen[bytes]] = field(default_factory=list)
    on_close: list[Callable[[], None]] = field(default_factory=list)
    """Run by `close` once the hosts' processes are stopped (e.g. a Redis Cluster's stop)."""

    @property
    def gateway(self) -> str:
        """The bridge's address: where services for every host listen."""
        return f"{self.prefix}.1"

    @classmethod
    @contextmanager
    def make(cls, count: int, tmp: Path) -> Iterator[Network]:
        reason = available()
        if reason:
            raise HostsUnavailable(reason)
        tag = f"p{os.getpid()}"
        net = cls(tag, _free_prefix(), f"{tag}br", tmp)
        try:
            net._bridge_up()
            for index in range(count):
                net._add_host(index)
            yield net
        finally:
            net.close()

    def _bridge_up(self) -> None:
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")

    def _add_host(self, index: int) -> None:
        namespace = f"{self.tag}h{index}"
        link = f"{self.tag}v{index}"
        address = f"{self.prefix}.{index + 2}"
        ip("netns", "add", namespace)
        host = Host(namespace, address, link, self.tmp)
        self.hosts.append(host)
        ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", namespace)
        ip("link", "set", link, "master", self.bridge, "up")
        ip("-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
        ip("-n", namespace, "link", "set", "eth0", "up")
        ip("-n", namespace, "link", "set", "lo", "up")

    def redis(self, directory: Path) -> str:
        """A redis-server (Debian's, no persistence) on the gateway and 127.0.0.1, stopped
        with the network; its URL for the hosts."""
        directory.mkdir(parents=True, exist_ok=True)
        port = free_port()
        binary = shutil.which("redis-server")
        if binary is None:
            raise HostsUnavailable("redis-server is not installed (apt-get install redis-server)")
        args = [binary, "--bind", self.gateway, "127.0.0.1", "--port", str(port)]
        args += ["--protected-mode", "no"]  # bound to these addresses only; no password
        args += ["--save", "", "--appendonly", "no", "--dir", str(directory)]
        args += ["--logfile", str(directory / "redis.log")]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.services.append(proc)
        up = functools.partial(_listening, self.gateway, port)
        wait_until_up(proc, up, "redis-server", lambda: read_log(directory / "redis.log"), 15)
        return f"redis://{self.gateway}:{port}/0"

    def stop_processes(self) -> None:
        """SIGTERM every process the hosts run (by PID) and wait for them."""
        stop_together([p for host in self.hosts for p in host.started])

    def close(self) -> None:
        """Stop every process started here (by PID), then delete what was made here."""
        self.stop_processes()
        for stop in self.on_close:
            stop()
        for proc in self.services:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        for host in self.hosts:
            _quietly("netns", "delete", host.namespace)  # deletes its veth pair too
        _quietly("link", "delete", self.bridge)


def _quietly(*args: str) -> None:
    with suppress(HostsUnavailable, subprocess.SubprocessError):
        ip(*args)


def _free_prefix() -> str:
    """10.231.N with N (from this PID) not on any interface here yet."""
    used = ip("-o", "-4", "addr", "show")
    start = os.getpid() % 200
    for step in range(200):
        prefix = f"{SUBNET}.{(start + step) % 200 + 20}"
        if f" {prefix}." not in used:
            return prefix
    raise HostsUnavailable(f"no free /24 in {SUBNET}.20-219")


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False
