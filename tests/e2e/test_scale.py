"""Scale out (issue 3, items 1 and 2): several `parley web` and `parley worker` processes on one
Redis and one PostgreSQL, tabs spread over them, and the guarantee of docs/protocol.md under random
joins, leaves, drops and rejoins.

The helpers here (`TabClient`, `start_all`, `start_model`, `redis_db`, the shared `scaled` cluster)
are used by test_resilience.py too.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import websockets
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from protocol import frames as f
from server.dev import embedded
from server.dev.client import Client, ProtocolError
from server.redis import keys
from tests.conftest import Cluster, ParleyProcess, mint, new_user
from tests.e2e.test_core import (
    assert_contiguous,
    event_frames,
    start_conversation,
    wait_persisted,
)

# Each group of processes gets its own Redis database so that no worker started by another test
# (all share the session's Redis) claims its turns: streams and keys are per database, and the
# pub/sub channels involved are per conversation or per user.
SCALE_DB = 1
SHORT_LOG_DB = 2
SCALE_REPLY = "[sim:tokens=40][sim:tps=300]"

# --------------------------------------------------------------------------- processes


def redis_db(url: str, db: int) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{db}"))


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


def model_process(cluster: Cluster, **env: str) -> ParleyProcess:
    """A standalone simulated model (`parley model`), not started yet."""
    port = embedded.free_port()
    name = f"model-{len(cluster.started)}"
    proc = ParleyProcess(
        "model", cluster.env(**env), port, cluster.tmp / f"{name}.log", extra=["--port", str(port)]
    )
    cluster.started.append(proc)
    return proc


def wait_model(proc: ParleyProcess, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.proc is not None
        if proc.proc.poll() is not None:
            raise RuntimeError(f"parley model exited:\n{proc.log()}")
        try:
            model_stats_now(proc)
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"parley model not ready:\n{proc.log()}")


def model_stats_now(proc: ParleyProcess) -> dict[str, Any]:
    with urllib.request.urlopen(f"{proc.url}/v1/sim/stats", timeout=2) as response:
        stats: dict[str, Any] = json.loads(response.read())
        return stats


async def model_stats(proc: ParleyProcess) -> dict[str, Any]:
    return await asyncio.to_thread(model_stats_now, proc)


def alive(procs: Iterable[ParleyProcess]) -> list[ParleyProcess]:
    return [p for p in procs if p.proc is not None and p.proc.poll() is None]


async def stop_all(procs: Iterable[ParleyProcess]) -> None:
    await asyncio.gather(*(asyncio.to_thread(p.stop, timeout=15) for p in procs))


def stop_together(procs: Iterable[ParleyProcess]) -> None:
    """SIGTERM each (only the processes given) and wait for all, side by side."""
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda p: p.stop(timeout=15), procs))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


class Scaled:
    def __init__(
        self,
        webs: list[ParleyProcess],
        workers: list[ParleyProcess],
        model: ParleyProcess,
        redis_url: str,
    ) -> None:
        self.webs = webs
        self.workers = workers
        self.model = model
        self.redis_url = redis_url

    def __repr__(self) -> str:
        return f"Scaled(webs={[w.port for w in self.webs]}, model={self.model.port})"


_scaled: dict[int, Scaled] = {}


def scaled_cluster(cluster: Cluster) -> Scaled:
    """2 web + 2 worker processes and a standalone simulated model they all use, started once
    per session (the cluster fixture stops them) and shared by the tests that do not break them."""
    found = _scaled.get(id(cluster))
    if found:
        if len(alive([*found.webs, *found.workers, found.model])) == 5:
            return found
        stop_together([*found.webs, *found.workers, found.model])  # no stray consumers
    model = model_process(cluster)
    redis_url = redis_db(cluster.services.redis_url, SCALE_DB)
    env = {
        "REDIS_URL": redis_url,
        "OPENAI_BASE_URL": f"{model.url}/v1",
        "OPENAI_API_KEY": "sim",
    }
    webs = [cluster.process("web", start=False, **env) for _ in range(2)]
    workers = [cluster.process("worker", start=False, **env) for _ in range(2)]
    start_all([model, *webs, *workers])
    _scaled[id(cluster)] = found = Scaled(webs, workers, model, redis_url)
    return found


@pytest.fixture(scope="module")
def scaled(cluster: Cluster) -> Scaled:
    return scaled_cluster(cluster)


# --------------------------------------------------------------------------- a tab


async def until(
    check: Callable[[], bool],
    timeout: float,
    what: str,
    tabs: Sequence[TabClient] = (),
    step: float = 0.02,
) -> float:
    """Poll `check` until true; the seconds it took. Bounded by `timeout`; on timeout the
    message describes `tabs`."""
    started = time.monotonic()
    deadline = started + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout} s waiting for {what}\n"
                + "\n".join(tab.describe() for tab in tabs)
            )
        await asyncio.sleep(step)
    return time.monotonic() - started


class Received(Protocol):
    raw: list[str]
    frames: list[Any]
    arrived: list[float]


@dataclass
class Recorded:
    """What a socket that is not a `Client` (a raw websockets connection) received."""

    raw: list[str] = field(default_factory=list)
    frames: list[Any] = field(default_factory=list)
    arrived: list[float] = field(default_factory=list)

    def add(self, text: str) -> None:
        self.raw.append(text)
        self.frames.append(f.decode_server(text))
        self.arrived.append(time.monotonic())


@dataclass
class Segment:
    """One `joined` and the conversation events that socket received after it."""

    socket: Received
    joined: f.Joined
    events: list[tuple[str, Any, float]] = field(default_factory=list)


@dataclass
class View:
    messages: list[tuple[str, str]]
    pending: list[uuid.UUID]
    reasons: dict[uuid.UUID, str]
    orphan_tokens: int


def first_seq(frame: Any) -> int:
    """The first seq an event frame stands for (merged token pieces carry `first_seq`)."""
    return getattr(frame, "first_seq", 0) or int(frame.seq)


RETRYABLE = (OSError, ConnectionError, TimeoutError, ProtocolError, websockets.WebSocketException)


class TabClient:
    """One browser tab following one conversation over any number of sockets.

    It joins, leaves, drops and rejoins with `after` = the last seq it holds, like the UI does;
    with `follow`, it reconnects by itself (to a live process of `servers`) when the server
    closes its socket. Its transcript is computed from everything its sockets received.
    """

    def __init__(
        self,
        user: str,
        conversation: uuid.UUID | None,
        servers: Sequence[ParleyProcess],
        name: str = "tab",
        follow: bool = False,
    ) -> None:
        self.user = user
        self.conversation = conversation
        self.servers = list(servers)
        self.name = name
        self.follow = follow
        self.sockets: list[Received] = []
        self.closes: list[tuple[float, int | None, str]] = []
        self.failures: list[str] = []
        self.recoveries = 0
        self.state = "off"  # off (no open socket) | left (socket, not joined) | on (joined)
        self._recovering: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<TabClient {self.name} {self.state} last_seq={self.last_seq}>"

    @property
    def client(self) -> Client | None:
        last = self.sockets[-1] if self.sockets else None
        return last if isinstance(last, Client) else None

    def connected(self) -> bool:
        return self.client is not None and not self.client.closed.done()

    async def open(self, server: ParleyProcess) -> Client:
        client = await Client.connect(server.ws_url, mint(self.user))
        self.sockets.append(client)
        client.closed.add_done_callback(functools.partial(self._closed, client))
        self.state = "left"
        return client

    async def create(self, server: ParleyProcess, **kwargs: Any) -> uuid.UUID:
        client = self.client if self.connected() else await self.open(server)
        assert client is not None
        self.conversation = (await client.request(f.Create(**kwargs))).conversation
        return self.conversation

    async def join(self, after: int | None = None, server: ParleyProcess | None = None) -> f.Joined:
        if not self.connected():
            await self.open(server or self.servers[0])
        assert self.client is not None and self.conversation is not None
        joined: f.Joined = await self.client.request(
            f.Join(conversation=self.conversation, after=after)
        )
        self.state = "on"
        return joined

    async def rejoin(self, server: ParleyProcess | None = None) -> f.Joined:
        """Join with `after` = the last seq held (a fresh join if it never joined)."""
        return await self.join(self.last_seq, server)

    async def leave(self) -> None:
        assert self.client is not None
        await self.client.request(f.Leave(conversation=self.conversation))
        self.state = "left"

    def drop(self) -> None:
        """Lose the socket abruptly (no close frame), like a tab killed or a network gone."""
        client = self.client
        self.state = "off"
        if client is not None:
            client.ws.transport.abort()

    async def say(self, text: str, timeout: float = 15) -> f.Ack:
        """`say` on the current socket, retrying while the service is unavailable or busy."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.client is None or not self.connected():
                    raise ConnectionError("no socket")
                ack: f.Ack = await self.client.request(
                    f.Say(conversation=self.conversation, text=text), timeout=5
                )
                return ack
            except RETRYABLE as exc:
                if time.monotonic() > deadline:
                    raise
                self.failures.append(f"say: {exc!r}")
                await asyncio.sleep(0.2)

    async def close(self) -> None:
        self.follow = False
        if self._recovering is not None:
            self._recovering.cancel()
        for sock in self.sockets:
            if isinstance(sock, Client):
                await asyncio.wait_for(sock.close(), 5)

    # ------------------------------------------------------------------ reconnecting

    def _closed(self, client: Client, done: asyncio.Future[tuple[int | None, str]]) -> None:
        if done.cancelled():
            return
        code, reason = done.result()
        self.closes.append((time.monotonic(), code, reason))
        if client is not self.client:
            return
        was_on, self.state = self.state == "on", "off"
        if self.follow and was_on and (self._recovering is None or self._recovering.done()):
            self._recovering = asyncio.get_running_loop().create_task(self._recover())

    async def _recover(self, timeout: float = 40) -> None:
        deadline = time.monotonic() + timeout
        for attempt in range(200):
            if not self.follow or time.monotonic() > deadline:
                return
            servers = alive(self.servers)
            if servers:
                try:
                    await self.rejoin(servers[attempt % len(servers)])
                    self.recoveries += 1
                    return
                except RETRYABLE as exc:
                    self.failures.append(f"rejoin: {exc!r}")
            await asyncio.sleep(min(0.1 * 2**attempt, 1.0))

    # ------------------------------------------------------------------ what it holds

    def segments(self) -> tuple[list[Segment], list[str]]:
        segments: list[Segment] = []
        orphans: list[str] = []
        for sock in self.sockets:
            for raw, frame, at in zip(sock.raw, sock.frames, sock.arrived, strict=False):
                if isinstance(frame, f.Joined) and frame.conversation == self.conversation:
                    segments.append(Segment(sock, frame))
                elif (
                    isinstance(frame, f.ConversationEvent)
                    and frame.conversation == self.conversation
                ):
                    if segments and segments[-1].socket is sock:
                        segments[-1].events.append((raw, frame, at))
                    else:
                        orphans.append(raw)
        return segments, orphans

    def replay(self) -> tuple[View, int | None, list[str]]:
        """Apply what the sockets received the way a correct client does: `joined` with
        `history` replaces the transcript; an event is applied when its seq is the next one,
        skipped when already held (events still in flight on a socket that re-joins), and a
        gap is a problem. Returns the view, the last seq held, and the problems."""
        segments, orphans = self.segments()
        found = [f"{self.name}: event before any `joined`: {raw[:120]}" for raw in orphans]
        messages: dict[uuid.UUID, dict[str, Any]] = {}
        held: int | None = None
        orphan_tokens = 0
        previous: Received | None = None
        for index, segment in enumerate(segments):
            joined = segment.joined
            label = f"{self.name}: segment {index} (joined last_seq={joined.last_seq}"
            label += f", reset={joined.reset}, history={joined.history is not None})"
            spans = [(first_seq(frame), frame.seq) for _, frame, _ in segment.events]
            expected = joined.last_seq
            for lo, hi in spans:
                if lo != expected + 1 or hi < lo:
                    found.append(f"{label} got seqs {spans}")
                    break
                expected = hi
            if joined.history is not None:
                messages = {
                    m.id: {"role": m.role, "parts": [m.content], "done": True, "reason": m.status}
                    for m in joined.history
                }
                held = joined.last_seq
            elif held is None:
                found.append(f"{label}: no history on a first join")
                held = joined.last_seq
            elif joined.last_seq > held or (
                joined.last_seq != held and segment.socket is not previous
            ):
                found.append(f"{label}: the client held seq {held}")
            previous = segment.socket
            for _, frame, _ in segment.events:
                if frame.seq <= held:
                    continue
                if first_seq(frame) != held + 1:
                    found.append(f"{label}: seqs {first_seq(frame)}..{frame.seq} after {held}")
                    break
                held = frame.seq
                if isinstance(frame, f.MessageEvent):
                    m = frame.message
                    messages[m.id] = {"role": m.role, "parts": [m.content], "done": True}
                elif isinstance(frame, f.Start):
                    if frame.replaces:
                        messages.pop(frame.replaces, None)
                    messages[frame.message_id] = {"role": "assistant", "parts": [], "done": False}
                elif isinstance(frame, f.Token):
                    if frame.message_id in messages:
                        messages[frame.message_id]["parts"].append(frame.text)
                    else:
                        orphan_tokens += 1
                elif isinstance(frame, f.Done) and frame.message_id in messages:
                    messages[frame.message_id].update(done=True, reason=frame.reason)
        view = View(
            messages=[(m["role"], "".join(m["parts"])) for m in messages.values()],
            pending=[k for k, m in messages.items() if not m["done"]],
            reasons={k: m["reason"] for k, m in messages.items() if "reason" in m},
            orphan_tokens=orphan_tokens,
        )
        return view, held, found

    def describe(self) -> str:
        view, held, problems = self.replay()
        segments, _ = self.segments()
        joins = [
            (s.joined.last_seq, s.joined.reset, s.joined.history is not None, len(s.events))
            for s in segments
        ]
        shown = [
            (role, text[:40] + ("..." if len(text) > 40 else "")) for role, text in view.messages
        ]
        return (
            f"  {self.name}: state={self.state} held={held} pending={len(view.pending)} "
            f"orphan_tokens={view.orphan_tokens} closes={[c[1:] for c in self.closes]} "
            f"joins(last_seq, reset, history, events)={joins} problems={problems} "
            f"failures={self.failures[-3:]} messages={shown}"
        )

    @property
    def last_seq(self) -> int | None:
        """The last seq held without a gap (what a client passes as `after`)."""
        return self.replay()[1]

    def problems(self) -> list[str]:
        """Seqs missing or repeated after a join point, gaps, events outside any join."""
        return self.replay()[2]

    def view(self) -> View:
        return self.replay()[0]

    def settled(self, messages: int) -> bool:
        view = self.view()
        return len(view.messages) >= messages and not view.pending

    def events(self) -> list[Any]:
        segments, _ = self.segments()
        return [frame for s in segments for _, frame, _ in s.events]

    def tokens(self, message_id: uuid.UUID | None = None) -> int:
        return sum(
            isinstance(e, f.Token) and message_id in (None, e.message_id) for e in self.events()
        )


def check_tabs(
    tabs: Sequence[TabClient], expected: list[tuple[str, str]], context: object = ""
) -> None:
    for tab in tabs:
        assert not tab.problems(), (tab.problems(), context)
        view = tab.view()
        assert view.orphan_tokens == 0, (tab.name, "tokens of a message it never saw start")
        assert not view.pending, (tab.name, "a message still in progress", context)
        assert view.messages == expected, (tab.name, context)


async def close_all(tabs: Iterable[TabClient]) -> None:
    await asyncio.gather(*(t.close() for t in tabs), return_exceptions=True)


# --------------------------------------------------------------------------- 1. scale out


async def test_tabs_on_two_web_processes_see_identical_events(
    scaled: Scaled, db: asyncpg.Pool
) -> None:
    """Three tabs over two web processes, three conversations generating at once on two
    workers: byte-identical event streams, one `start` per reply, one model request per turn."""
    web_a, web_b = scaled.webs
    user = new_user()
    a = await Client.connect(web_a.ws_url, mint(user))
    b = await Client.connect(web_b.ws_url, mint(user))
    c = await Client.connect(web_b.ws_url, mint(user))
    try:
        conversations = [await start_conversation(a, title=f"scale {i}") for i in range(3)]
        for conversation in conversations:
            await b.request(f.Join(conversation=conversation))
            await c.request(f.Join(conversation=conversation))
        before = await model_stats(scaled.model)
        rounds = 2
        for n in range(rounds):
            marks = {tab: len(tab.frames) for tab in (a, b, c)}
            await asyncio.gather(
                *(
                    a.request(f.Say(conversation=conv, text=f"round {n} {SCALE_REPLY}"))
                    for conv in conversations
                )
            )
            for tab in (a, b, c):
                for conv in conversations:
                    await tab.wait_for(
                        lambda fr, conv=conv: isinstance(fr, f.Done) and fr.conversation == conv,
                        start=marks[tab],
                    )
        after = await model_stats(scaled.model)
        for conv in conversations:
            assert event_frames(a, conv) == event_frames(b, conv) == event_frames(c, conv)
            assert_contiguous(a, conv, 1)
            starts = Counter(fr.message_id for fr in a.events(conv) if isinstance(fr, f.Start))
            assert len(starts) == rounds and set(starts.values()) == {1}, starts
            dones = [fr for fr in a.events(conv) if isinstance(fr, f.Done)]
            assert [d.reason for d in dones] == ["stop"] * rounds
        assert after["started"] - before["started"] == rounds * len(conversations), (before, after)
        for conv in conversations:
            rows = await wait_persisted(db, conv, 2 * rounds)
            assert [r[0] for r in rows] == ["user", "assistant"] * rounds
    finally:
        await asyncio.gather(a.close(), b.close(), c.close(), return_exceptions=True)


async def test_join_again_on_the_same_socket_keeps_live_events(scaled: Scaled) -> None:
    """A socket alone on its web process in a conversation joins it again (a refresh of that
    view, or a rejoin after a gap): live events must keep coming (found by the property test:
    the process dropped its pub/sub subscription)."""
    web_a, web_b = scaled.webs
    user = new_user()
    writer = TabClient(user, None, [web_a], "writer")
    again = TabClient(user, None, [web_b], "again")
    tabs = [writer, again]
    try:
        again.conversation = await writer.create(web_a, title="join again")
        await writer.join()
        await again.join(server=web_b)
        await again.join()  # the same socket: leave + join on the server
        await writer.say(f"live? {SCALE_REPLY}")
        await until(lambda: writer.settled(2), 10, "the reply", tabs)
        head = writer.last_seq or 0
        await until(lambda: (again.last_seq or 0) >= head, 5, "the live events", tabs)
        check_tabs(tabs, writer.view().messages)
    finally:
        await close_all(tabs)


# --------------------------------------------------------------------------- 2. the guarantee

PROPERTY_REPLY = "[sim:tokens=40][sim:tps=150]"
OPS = ("join", "leave", "drop", "rejoin")
actions = st.tuples(
    st.integers(1, 3),  # which tab (0 is the driver, always joined)
    st.sampled_from(OPS),
    st.floats(0.0, 0.15),  # delay before the action
    st.integers(0, 1),  # which web process, when it (re)connects
)
schedules = st.lists(st.lists(actions, min_size=1, max_size=4), min_size=2, max_size=3)


async def act(tab: TabClient, op: str, server: ParleyProcess) -> None:
    if op == "join":
        await tab.join(None, server)
    elif op == "leave" and tab.state == "on":
        await tab.leave()
    elif op == "drop" and tab.state != "off":
        tab.drop()
    elif op == "rejoin":
        await tab.rejoin(server)


@settings(
    max_examples=8,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],  # no shrinking: bounded time
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(schedule=schedules)
async def test_random_joins_leaves_drops_and_rejoins_end_identical(
    scaled: Scaled, db: asyncpg.Pool, schedule: list[list[tuple[int, str, float, int]]]
) -> None:
    webs = scaled.webs
    user = new_user()
    driver = TabClient(user, None, webs, "driver")
    await driver.create(webs[0], title="property")
    tabs = [driver] + [TabClient(user, driver.conversation, webs, f"tab{i}") for i in range(1, 4)]
    try:
        await driver.join()
        for turn, steps in enumerate(schedule):
            await driver.say(f"turn {turn} {PROPERTY_REPLY}")
            for index, op, delay, web in steps:
                await asyncio.sleep(delay)
                await act(tabs[index], op, webs[web])
            await until(
                lambda n=turn: driver.settled(2 * (n + 1)), 15, f"turn {turn} to finish", tabs
            )
        for index, tab in enumerate(tabs[1:]):
            if tab.state != "on":
                await tab.rejoin(webs[index % 2])
        head = driver.last_seq or 0
        await until(
            lambda: all((t.last_seq or 0) >= head and t.settled(2 * len(schedule)) for t in tabs),
            10,
            "every tab to reach the head",
            tabs,
        )
        rows = await wait_persisted(db, driver.conversation, 2 * len(schedule))
        expected = [(role, content) for role, content, _ in rows]
        assert [r for r, _ in expected] == ["user", "assistant"] * len(schedule)
        check_tabs(tabs, expected, schedule)
    finally:
        await close_all(tabs)


# --------------------------------------------------------------------------- trimmed log: reset


@pytest.fixture(scope="module")
def short_log(cluster: Cluster) -> Any:
    server = cluster.process(
        "serve",
        start=False,
        REDIS_URL=redis_db(cluster.services.redis_url, SHORT_LOG_DB),
        PARLEY_REDIS_LOG_MAX_EVENTS="10",
    )
    start_all([server])
    yield server
    server.stop(timeout=15)


async def test_rejoin_after_trimmed_events_gets_reset_and_full_history(
    short_log: ParleyProcess, db: asyncpg.Pool
) -> None:
    """log_max_events = 10 and 300-token replies: a rejoin with an old `after` gets
    `reset: true` and the whole persisted history, never a partial replay — after a turn and in
    the middle of one — and every tab ends with the persisted transcript."""
    user = new_user()
    servers = [short_log]
    writer = TabClient(user, None, servers, "writer")
    tabs = [writer]
    redis = Redis.from_url(redis_db(short_log.env["REDIS_URL"], SHORT_LOG_DB))
    try:
        conversation = await writer.create(short_log, title="short log")
        await writer.join()
        await writer.say("one [sim:tokens=300]")
        await until(lambda: writer.settled(2), 15, "the first reply", tabs)
        rows = await wait_persisted(db, conversation, 2)
        oldest = await redis.xrange(keys.log(conversation), count=1)
        assert oldest and int(oldest[0][0].split(b"-")[0]) > 5, "the log was not trimmed"

        late = TabClient(user, conversation, servers, "late")
        tabs.append(late)
        joined = await late.join(after=1)
        assert joined.reset and joined.history is not None, joined
        assert [(m.role, m.content) for m in joined.history] == [(r[0], r[1]) for r in rows]

        await writer.say("two [sim:tokens=300][sim:tps=150]")
        await until(lambda: writer.tokens() >= 450, 15, "the second reply to be under way", tabs)
        mid = TabClient(user, conversation, servers, "mid-after")
        fresh = TabClient(user, conversation, servers, "mid-fresh")
        tabs += [mid, fresh]
        joined = await mid.join(after=3)
        assert joined.reset and joined.history is not None, joined
        await fresh.join()
        await until(lambda: writer.settled(4), 15, "the second reply", tabs)
        rows = await wait_persisted(db, conversation, 4)
        expected = [(r[0], r[1]) for r in rows]
        head = writer.last_seq or 0
        await until(
            lambda: all((t.last_seq or 0) >= head and t.settled(4) for t in tabs),
            10,
            "every tab to reach the head",
            tabs,
        )
        check_tabs(tabs, expected)
    finally:
        await redis.aclose()
        await close_all(tabs)
