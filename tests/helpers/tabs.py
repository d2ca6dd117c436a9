"""`TabClient`: one browser tab following one conversation over any number of sockets, replayed the
way a correct client applies what it receives; and `until`, the bounded poll the tests wait with."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import websockets
from hypothesis import HealthCheck, Phase, settings

from protocol import frames as f
from server.dev.client import Client, ProtocolError
from tests.helpers.auth import mint, new_user
from tests.helpers.processes import Cluster, ParleyProcess, alive, start_all, stop_all


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


def end_to_end_examples(count: int) -> settings:
    """hypothesis settings for a property test over real processes: `count` examples, no
    deadline, no example database, no shrinking (bounded time)."""
    return settings(
        max_examples=count,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.reuse, Phase.generate],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


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
    closes its socket or, with `heartbeat`, stops answering pings. Its transcript is computed
    from everything its sockets received.
    """

    def __init__(
        self,
        user: str,
        conversation: uuid.UUID | None,
        servers: Sequence[ParleyProcess],
        name: str = "tab",
        follow: bool = False,
        heartbeat: float | None = None,
    ) -> None:
        self.user = user
        self.conversation = conversation
        self.servers = list(servers)
        self.name = name
        self.follow = follow
        self.heartbeat = heartbeat
        """Seconds between the socket's pings, and to wait for a pong before it counts the
        server gone (a browser's heartbeat): how a tab notices a server cut off the network."""
        self.sockets: list[Received] = []
        self.closes: list[tuple[float, int | None, str]] = []
        self.failures: list[str] = []
        self.recoveries = 0
        self.state = "off"  # off (no open socket) | left (socket, not joined) | on (joined)
        self._dropped: dict[int, int] = {}
        """Per socket `drop()` aborted (by `id`), the frames it held then: a killed tab reads
        nothing more, though the client may still decode what was in its buffer."""
        self._recovering: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<TabClient {self.name} {self.state} last_seq={self.last_seq}>"

    @property
    def client(self) -> Client | None:
        last = self.sockets[-1] if self.sockets else None
        return last if isinstance(last, Client) else None

    def connected(self) -> bool:
        """A socket that is open: not closed, nor aborted by `drop` (whose close the
        client notices only on a later turn of the loop)."""
        client = self.client
        return client is not None and not (client.closed.done() or client.ws.transport.is_closing())

    async def open(self, server: ParleyProcess) -> Client:
        pings = {"ping_interval": self.heartbeat, "ping_timeout": self.heartbeat}
        client = await Client.connect(
            server.ws_url, mint(self.user), **(pings if self.heartbeat else {})
        )
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
            self._dropped[id(client)] = len(client.frames)
            client.ws.transport.abort()

    async def say(self, text: str, timeout: float = 15) -> f.Ack:
        """`say` on the current socket, retrying while the service is unavailable or busy;
        every try carries the same `id`, so a turn whose ack was lost is not taken twice."""
        deadline = time.monotonic() + timeout
        turn = f.Say(conversation=self.conversation, text=text, id=uuid.uuid4())
        while True:
            try:
                if self.client is None or not self.connected():
                    raise ConnectionError("no socket")
                ack: f.Ack = await self.client.request(turn, timeout=5)
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
            held = zip(sock.raw, sock.frames, sock.arrived, strict=False)
            for raw, frame, at in itertools.islice(held, self._dropped.get(id(sock))):
                if isinstance(frame, f.Joined) and frame.conversation == self.conversation:
                    segments.append(Segment(sock, frame))
                elif (
                    isinstance(frame, f.ConversationEvent | f.Error)
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


@dataclass
class TwoWebs:
    """Two web processes and one worker on one Redis (database or cluster), and two tabs of
    one user following one conversation: `tabs[0]` on the first web process, `tabs[1]` on the
    second (each reconnects to the other when its own goes)."""

    webs: list[ParleyProcess]
    worker: ParleyProcess
    tabs: list[TabClient]

    @property
    def procs(self) -> list[ParleyProcess]:
        return [*self.webs, self.worker]

    @property
    def conversation(self) -> uuid.UUID:
        assert self.tabs[0].conversation is not None
        return self.tabs[0].conversation


@contextlib.asynccontextmanager
async def two_tabs_on_two_webs(
    cluster: Cluster, env: dict[str, str], title: str
) -> AsyncIterator[TwoWebs]:
    """Start 2 web + 1 worker processes with `env`, create a conversation titled `title`
    and join it from a tab on each web process; everything is closed and stopped after."""
    webs = [cluster.process("web", start=False, **env) for _ in range(2)]
    worker = cluster.process("worker", start=False, **env)
    first = TabClient(new_user(), None, webs, "t1", follow=True)
    group = TwoWebs(webs, worker, [first])
    try:
        start_all(group.procs)
        await first.create(webs[0], title=title)
        await first.join()
        second = TabClient(first.user, first.conversation, [webs[1], webs[0]], "t2", follow=True)
        group.tabs.append(second)
        await second.join()
        yield group
    finally:
        await close_all(group.tabs)
        await stop_all(group.procs)
