"""Parts of a message: what the worker builds (and persists) is what every tab rebuilds from
the events, whatever merging a lagging socket gets and whenever a tab rejoins with `after`."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import frames as f
from protocol import wsframe
from protocol.outbox import Outbox
from protocol.parts import MessageParts, PartsBuilder, content_of, parts_of, stored_parts
from protocol.resume import Cursor, NextStep

CONV, MESSAGE = uuid.uuid4(), uuid.uuid4()

pieces = st.lists(
    st.tuples(st.sampled_from(["text", "reasoning"]), st.text(min_size=1, max_size=6)),
    min_size=1,
    max_size=40,
)


def published(script: list[tuple[str, str]]) -> tuple[list[bytes], list[f.Part]]:
    """The reply's events as the append script frames them (seq from 1), and its parts."""
    builder = PartsBuilder(CONV, MESSAGE)
    events: list[f.ServerFrame] = [f.Start(conversation=CONV, message_id=MESSAGE, model="m")]
    for now, (kind, text) in enumerate(script):
        if kind != builder.kind:
            events += builder.switch(kind, float(now))  # type: ignore[arg-type]
        events.append(builder.add(text))
    events += builder.close(float(len(script)))
    events.append(f.Done(conversation=CONV, message_id=MESSAGE, reason="stop"))
    log = [f.splice_seq(f.encode(e), seq) for seq, e in enumerate(events, start=1)]
    return log, builder.parts()


@dataclass
class Tab:
    """One socket's cursor and outbox, and the client behind it folding what it reads."""

    merge_after: int
    cursor: Cursor = field(default_factory=Cursor)
    outbox: Outbox = field(init=False)
    held: int = 0
    folded: MessageParts = field(default_factory=lambda: MessageParts(MESSAGE))

    def __post_init__(self) -> None:
        self.outbox = Outbox(limit=10**9, merge_after=self.merge_after)
        self.cursor.start_at(0)

    def join(self, log: list[bytes], head: int) -> None:
        """(Re)join with `after` = the last seq the client holds, catching up from the log."""
        self.read()
        self.cursor = Cursor()
        self.cursor.start_at(self.held)
        logged = [(f.seq_of(frame), frame) for frame in log[:head]]
        caught = self.cursor.catch_up(logged, head)
        assert caught.next_step is NextStep.LIVE
        for frame in caught.frames:
            self.outbox.push(wsframe.text(frame))

    def live(self, frame: bytes) -> None:
        if self.cursor.live(f.seq_of(frame), frame).value == "send":
            self.outbox.push(wsframe.text(frame))

    def read(self) -> None:
        for frame in self.outbox.drain():
            payload = wsframe.payload_of(frame)
            event = f.decode_server(payload)
            seq = getattr(event, "seq", 0)
            if seq <= self.held:
                continue
            first = getattr(event, "first_seq", 0) or seq
            assert first == self.held + 1, "no gap, nothing twice"
            self.held = seq
            self.folded.apply(event)


@settings(max_examples=300, deadline=None)
@given(
    script=pieces,
    merge_after=st.lists(st.sampled_from([0, 1, 64, 10**6]), min_size=1, max_size=4),
    actions=st.lists(st.tuples(st.integers(0, 3), st.sampled_from(["read", "rejoin", "none"]))),
)
def test_every_tab_ends_with_the_persisted_parts_byte_for_byte(
    script: list[tuple[str, str]], merge_after: list[int], actions: list[tuple[int, str]]
) -> None:
    log, persisted = published(script)
    tabs = [Tab(m) for m in merge_after]
    for tab in tabs:
        tab.join(log, 0)
    todo = iter(actions)
    for head, frame in enumerate(log, start=1):
        for tab in tabs:
            tab.live(frame)
        tab_index, action = next(todo, (0, "none"))
        tab = tabs[tab_index % len(tabs)]
        if action == "read":
            tab.read()
        elif action == "rejoin":
            tab.join(log, head)
    for tab in tabs:
        tab.read()
        assert tab.held == len(log)
        assert msgspec.json.encode(tab.folded.parts()) == msgspec.json.encode(persisted)
        assert tab.folded.reason == "stop"


def test_a_lagging_socket_gets_reasoning_pieces_merged_per_part() -> None:
    log, parts = published(
        [("reasoning", "Let"), ("reasoning", " me"), ("text", "Hi"), ("text", "!")]
    )
    tab = Tab(merge_after=0)
    tab.join(log, 0)
    for frame in log:
        tab.live(frame)
    frames = [f.decode_server(wsframe.payload_of(fr)) for fr in tab.outbox.drain()]
    kinds = [type(e).__name__ for e in frames]
    assert kinds == ["Start", "PartStart", "PartDelta", "PartEnd", "Token", "Done"]
    delta = frames[2]
    assert isinstance(delta, f.PartDelta) and (delta.text, delta.first_seq) == ("Let me", 3)
    assert [p.kind for p in parts] == ["reasoning", "text"]
    assert parts[0].duration_ms == 2000.0


def test_a_plain_answer_has_no_part_events_and_no_stored_parts() -> None:
    log, parts = published([("text", "Hello"), ("text", " world")])
    types = [type(f.decode_server(frame)).__struct_config__.tag for frame in log]
    assert types == ["start", "token", "token", "done"]
    assert stored_parts(parts) is None and content_of(parts) == "Hello world"
    message = f.Message(
        id=MESSAGE, role="assistant", content="Hello world", status="complete",
        created_at=f.utcnow(),
    )  # fmt: skip
    assert parts_of(message) == parts


def test_replay_after_redis_lost_the_conversation_rebuilds_the_same_parts() -> None:
    builder = PartsBuilder(CONV, MESSAGE)
    builder.switch("reasoning", 0.0)
    builder.add("think")
    builder.switch("text", 1.5)
    builder.add("an")
    builder.add("swer")
    folded = MessageParts(MESSAGE)
    for event in builder.replay():
        folded.apply(event)
    assert folded.parts() == builder.parts()
    assert [p.text for p in builder.parts()] == ["think", "answer"]
