"""Hosts that die, on a real network: three network namespaces on a bridge (tests/helpers/
hosts.py), each running `parley web` and `parley worker`, with Redis and PostgreSQL on the
bridge's address. Tabs of one conversation are spread across the hosts.

- every tab, whichever host it is on, receives the same events;
- a host killed (every process, SIGKILL) in the middle of generations: other hosts' workers
  take its generations over within the lease, the killed host's tabs move to other hosts and
  resume with `after`; every tab ends with the persisted transcript, persisted once;
- a host cut off the network for 10 s (link down, processes running) while its worker
  generates: the same, and when it comes back its stale worker changes nothing and its web
  process serves again; no socket on a surviving host is closed.

Namespaces need root and iproute2 (`.ci/run` installs it): without them the fixture fails
and says why.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import msgspec
import pytest

from protocol import frames as f
from tests.helpers import redis_cluster
from tests.helpers.auth import new_user
from tests.helpers.conversations import wait_persisted
from tests.helpers.faults import Proxy
from tests.helpers.hosts import Host, Network
from tests.helpers.processes import (
    BACKENDS,
    ROOT,
    Cluster,
    ParleyProcess,
    RedisBackend,
    counter_now,
    start_all,
    worker_of,
)
from tests.helpers.tabs import TabClient, check_tabs, close_all, until

LEASE = 2
CUT_SECONDS = 10
HOSTS_ENV = {
    "PARLEY_WORKER_LEASE_SECONDS": str(LEASE),
    "PARLEY_SERVER_WS_PING_INTERVAL": "1",
    "PARLEY_SERVER_WS_PING_TIMEOUT": "1",
    "PARLEY_SERVER_SHUTDOWN_GRACE": "2",
}
HEARTBEAT = 1.0
"""The tabs' own ping interval and pong timeout, seconds (a browser's heartbeat)."""
JOINS = "parley_joins_total"
LONG_REPLY = "[sim:tokens=200][sim:tps=25]"
GENERATIONS = 6


@dataclass
class Machines:
    """Three hosts, each with one web and one worker process, on one Redis and PostgreSQL."""

    net: Network
    env: dict[str, str]
    backend: RedisBackend
    webs: list[ParleyProcess]
    workers: list[ParleyProcess]

    @property
    def hosts(self) -> list[Host]:
        return self.net.hosts

    def revive(self) -> None:
        """Every host linked and running its web and worker again (a test before may have
        killed one)."""
        for host in self.hosts:
            host.restore()
        starting = []
        for index, host in enumerate(self.hosts):
            for role, procs in (("web", self.webs), ("worker", self.workers)):
                proc = procs[index]
                if proc.proc is None or proc.proc.poll() is not None:
                    procs[index] = host.process(role, self.env, start=False)
                    starting.append(procs[index])
        start_all(starting)

    def host_of_worker(self, pid: int | None) -> int:
        found = [i for i, w in enumerate(self.workers) if w.pid == pid]
        assert found, f"the generation runs on {pid}, not on {[w.pid for w in self.workers]}"
        return found[0]

    def tabs(self, user: str) -> list[TabClient]:
        """One following tab per host, each trying its own host's web process first."""
        n = len(self.webs)
        return [
            TabClient(
                user,
                None,
                [self.webs[(i + k) % n] for k in range(n)],
                name=f"tab@host{i}",
                follow=True,
                heartbeat=HEARTBEAT,
            )
            for i in range(n)
        ]


@pytest.fixture(scope="module", params=BACKENDS)
def machines(
    request: pytest.FixtureRequest, cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Machines]:
    """Three hosts, each running a web and a worker process; Redis (one server, or a
    six-node cluster) on the bridge's address, and the session's PostgreSQL through a proxy
    there."""
    tmp = tmp_path_factory.mktemp("hosts")
    with Network.make(3, tmp) as net:
        if request.param == "redis":
            backend = RedisBackend(net.redis(tmp / "redis"))
        else:
            nodes = redis_cluster.start(tmp / "cluster", host=net.gateway)
            net.on_close.append(nodes.stop)
            backend = RedisBackend(nodes.url, clustered=True, nodes=nodes)
        database = urlsplit(cluster.services.database_url)
        assert database.hostname and database.port
        with Proxy(database.hostname, database.port, listen=net.gateway).start() as postgres:
            env = cluster.env(
                DATABASE_URL=postgres.url(cluster.services.database_url),
                **backend.env(),
                **HOSTS_ENV,
            )
            webs = [host.process("web", env, start=False) for host in net.hosts]
            workers = [host.process("worker", env, start=False) for host in net.hosts]
            start_all([*webs, *workers])
            try:
                yield Machines(net, env, backend, webs, workers)
            finally:  # before the proxy to PostgreSQL closes
                net.stop_processes()


async def open_tabs(machines: Machines, title: str) -> tuple[list[TabClient], uuid.UUID]:
    """One tab on each host's web process, all joined to one new conversation."""
    tabs = machines.tabs(new_user())
    conversation = await tabs[0].create(machines.webs[0], title=title)
    for index, tab in enumerate(tabs):
        tab.conversation = conversation
        await tab.join(server=machines.webs[index])
    return tabs, conversation


async def generation_host(
    machines: Machines, tab: TabClient, conversation: uuid.UUID
) -> tuple[int, uuid.UUID]:
    """Once the reply to the turn `tab` said streams, the index of the host whose worker
    generates it, and the reply's message id."""
    await until(lambda: tab.tokens() >= 10, 20, "the reply's first tokens", [tab])
    start = next(e for e in tab.events() if isinstance(e, f.Start))
    redis = machines.backend.client()
    try:
        pid = await worker_of(redis, conversation)
    finally:
        await redis.aclose()
    return machines.host_of_worker(pid), start.message_id


def restarted_at(tabs: list[TabClient], message_id: uuid.UUID, since: float) -> float | None:
    """When the first of `tabs` received `start` again for `message_id` after `since`."""
    times = [
        at
        for tab in tabs
        for sock in tab.sockets
        for frame, at in zip(sock.frames, sock.arrived, strict=False)
        if at > since and isinstance(frame, f.Start) and frame.message_id == message_id
    ]
    return min(times, default=None)


async def persisted_once(db: asyncpg.Pool, conversation: uuid.UUID, tabs: list[TabClient]) -> None:
    rows = await wait_persisted(db, conversation, 2)
    check_tabs(tabs, [(r[0], r[1]) for r in rows], [t.describe() for t in tabs])
    ids = await db.fetch("SELECT id FROM messages WHERE conversation_id = $1", conversation)
    assert len(ids) == len({r["id"] for r in ids}) == 2, ids


async def test_tabs_on_three_hosts_receive_identical_events(
    machines: Machines, db: asyncpg.Pool
) -> None:
    """A tab on each host's web process; the turn is generated by some host's worker: every
    tab receives exactly the same event frames, and they add up to the persisted turn."""
    machines.revive()
    tabs, conversation = await open_tabs(machines, "three hosts")
    try:
        await tabs[1].say("hello [sim:tokens=40][sim:tps=200]")
        await until(lambda: all(t.settled(2) for t in tabs), 20, "the reply on every tab", tabs)
        events = [[_plain(e) for e in tab.events()] for tab in tabs]
        assert events[0] and events[0] == events[1] == events[2]
        await persisted_once(db, conversation, tabs)
    finally:
        await close_all(tabs)


async def test_a_host_killed_mid_generations_has_every_one_taken_over_elsewhere(
    machines: Machines, db: asyncpg.Pool
) -> None:
    """Six conversations generating at once (on the three hosts' workers), each with a tab
    on every host; SIGKILL every process of the host generating the most: workers on the
    other hosts restart every one of its generations within the lease (plus their claim
    interval), the dead host's tabs rejoin other hosts with `after`, every tab ends with its
    conversation's persisted transcript, each reply is persisted once, and no tab on a
    surviving host loses its socket."""
    machines.revive()
    opened = [await open_tabs(machines, f"host killed {n}") for n in range(GENERATIONS)]
    everyone = [tab for tabs, _ in opened for tab in tabs]
    try:
        for tabs, _ in opened:
            await tabs[0].say(f"tell me a long story {LONG_REPLY}")
        running = [await generation_host(machines, tabs[0], c) for tabs, c in opened]
        hosts = [host for host, _ in running]
        victim = max(set(hosts), key=hosts.count)
        orphans = [message_id for host, message_id in running if host == victim]
        killed_at = time.monotonic()
        machines.hosts[victim].kill()
        await until(lambda: all(t.settled(2) for t in everyone), 60, "every reply", everyone)
        restarts = [restarted_at(everyone, message_id, killed_at) for message_id in orphans]
        assert None not in restarts, [t.describe() for t in everyone]
        took = max(at - killed_at for at in restarts if at is not None)
        assert took < LEASE + 8, took
        print(f"host kill -> its {len(orphans)} generations running again: {took:.2f} s")
        moved = [tabs[victim] for tabs, _ in opened]
        await until(lambda: all(t.recoveries for t in moved), 15, "the dead host's tabs", moved)
        for tabs, conversation in opened:
            await persisted_once(db, conversation, tabs)
            survivors = [t for i, t in enumerate(tabs) if i != victim]
            assert all(not t.closes for t in survivors), [t.describe() for t in survivors]
    finally:
        await close_all(everyone)


async def test_a_host_cut_off_for_10s_changes_nothing_when_it_returns(
    machines: Machines, db: asyncpg.Pool
) -> None:
    """Take the generating host off the network for 10 s (its processes keep running): the
    generation restarts on another host within the lease, the cut-off host's tab notices
    (heartbeat) and rejoins another host with `after`; when the host returns, its worker's
    stale writes change nothing (every tab still holds exactly the persisted transcript,
    persisted once) and its web process serves a new tab and a new turn."""
    machines.revive()
    tabs, conversation = await open_tabs(machines, "host cut off")
    try:
        await tabs[0].say(f"tell me a long story {LONG_REPLY}")
        victim, message_id = await generation_host(machines, tabs[0], conversation)
        host = machines.hosts[victim]
        cut_at = time.monotonic()
        host.cut()
        try:
            await until(lambda: all(t.settled(2) for t in tabs), 40, "the whole reply", tabs)
            took = restarted_at(tabs, message_id, cut_at)
            assert took is not None and took - cut_at < LEASE + 8, [t.describe() for t in tabs]
            print(f"host cut off -> generation running again: {took - cut_at:.2f} s")
            await until(lambda: tabs[victim].recoveries >= 1, 15, "the rejoin", [tabs[victim]])
            await until(lambda: time.monotonic() > cut_at + CUT_SECONDS, CUT_SECONDS + 1, "10 s")
        finally:
            host.restore()
        survivors = [t for i, t in enumerate(tabs) if i != victim]
        assert all(not t.closes for t in survivors), [t.describe() for t in survivors]
        machines.webs[victim].wait_ready()  # answers GET /readyz from the other side again

        back = TabClient(tabs[0].user, conversation, [machines.webs[victim]], name="back")
        tabs.append(back)
        joined = await back.join(server=machines.webs[victim])
        assert joined.history is not None
        await back.say("and now? [sim:tokens=20][sim:tps=200]")
        await until(lambda: all(t.settled(4) for t in tabs), 30, "the second reply", tabs)
        rows = await wait_persisted(db, conversation, 4)
        check_tabs(tabs, [(r[0], r[1]) for r in rows], [t.describe() for t in tabs])
        count = await db.fetchval("SELECT count(*) FROM messages WHERE id = $1", message_id)
        assert count == 1
    finally:
        await close_all(tabs)


def test_load_spreads_each_conversations_tabs_over_the_hosts(
    machines: Machines, tmp_path: Path
) -> None:
    """`parley load` with one `--url` per host: every web process gets a third of the
    sockets (each conversation's three tabs on three hosts) and the tabs, though on different
    hosts, receive every event of their conversation once, in order."""
    machines.revive()
    before = [counter_now(web, JOINS) for web in machines.webs]
    out = tmp_path / "load.json"
    args = [sys.executable, "-m", "server.app.cli", "load", "chat"]
    args += [arg for web in machines.webs for arg in ("--url", web.ws_url)]
    args += ["--conversations", "4", "--tabs", "3", "--rate", "0.5", "--duration", "4"]
    args += ["--tokens", "30", "--tps", "100", "--no-progress", "--no-charts", "--out", str(out)]
    done = subprocess.run(
        args, cwd=ROOT, env=machines.env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    integrity = result["integrity"]
    assert integrity["lost"] == integrity["duplicated"] == 0, integrity
    assert result["counters"]["tabs.joined"] == 12, result["counters"]
    gained = [counter_now(web, JOINS) - b for web, b in zip(machines.webs, before, strict=True)]
    assert gained == [4, 4, 4], gained


def _plain(frame: Any) -> Any:
    """A frame as comparable data."""
    return msgspec.to_builtins(frame)
