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


def tabs_after(
    log: list[bytes], merge_after: list[int], actions: list[tuple[int, str]]
) -> list[Tab]:
    """Tabs there from the start that got the log live, each reading or rejoining as
    `actions` say after each event, and having read everything at the end."""
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
    return tabs


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
    for tab in tabs_after(log, merge_after, actions):
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


CallScript = list[tuple[int, str]]
"""A model response's call fragments: (which call, a piece of its arguments)."""

APPROVALS: dict[int, f.ToolApproval | None] = {
    0: None,
    1: f.ToolApproval(state="denied", by="alice", reason="not that file"),
    2: f.ToolApproval(state="approved", by="alice"),
}
"""How a person answered each call (call 0 needed no approval)."""


def published_steps(
    steps: list[tuple[str, CallScript]], answer: str
) -> tuple[list[bytes], list[f.Part]]:
    """A reply that calls tools: per step some text, then its calls' fragments interleaved,
    then their results; then the answer. Framed as the append script frames them."""
    builder = PartsBuilder(CONV, MESSAGE)
    events: list[f.ServerFrame] = [f.Start(conversation=CONV, message_id=MESSAGE, model="m")]
    for step, (text, fragments) in enumerate(steps):
        if text:
            events += builder.switch("text", 0.0)
            events.append(builder.add(text))
        opened: dict[int, int] = {}
        for call, piece in fragments:
            if call not in opened:
                opened[call], starting = builder.open_call(f"c{step}_{call}", f"tool{call}", 0.0)
                events += starting
            events.append(builder.add_to(opened[call], piece))
        events += builder.close(1.0)
        for call in sorted(opened):
            status = "ok" if call % 2 == 0 else "error"
            events += builder.result(
                f"c{step}_{call}", f"tool{call}", status, f"r{call}", 2.5, APPROVALS[call]
            )
    events += builder.switch("text", 2.0)
    events.append(builder.add(answer))
    events += builder.close(3.0)
    events.append(f.Done(conversation=CONV, message_id=MESSAGE, reason="stop"))
    log = [f.splice_seq(f.encode(e), seq) for seq, e in enumerate(events, start=1)]
    return log, builder.parts()


tool_steps = st.lists(
    st.tuples(
        st.text(max_size=4),
        st.lists(st.tuples(st.integers(0, 2), st.text(min_size=1, max_size=5)), max_size=12),
    ),
    min_size=1,
    max_size=3,
)


@settings(max_examples=200, deadline=None)
@given(
    steps=tool_steps,
    merge_after=st.lists(st.sampled_from([0, 1, 10**6]), min_size=1, max_size=3),
    actions=st.lists(st.tuples(st.integers(0, 2), st.sampled_from(["read", "rejoin", "none"]))),
)
def test_tool_steps_fold_on_every_tab_to_the_persisted_parts_byte_for_byte(
    steps: list[tuple[str, CallScript]], merge_after: list[int], actions: list[tuple[int, str]]
) -> None:
    log, persisted = published_steps(steps, "done")
    for tab in tabs_after(log, merge_after, actions):
        assert msgspec.json.encode(tab.folded.parts()) == msgspec.json.encode(persisted)


def test_parallel_calls_stream_their_arguments_into_their_own_parts() -> None:
    _, parts = published_steps(
        [("Let me look.", [(0, '{"ci'), (1, '{"q"'), (0, 'ty":"Oslo"}'), (1, ":1}")])], "Sunny."
    )
    assert [(p.kind, p.call_id, p.name, p.text, p.status) for p in parts] == [
        ("text", None, None, "Let me look.", None),
        ("tool_call", "c0_0", "tool0", '{"city":"Oslo"}', None),
        ("tool_call", "c0_1", "tool1", '{"q":1}', None),
        ("tool_result", "c0_0", "tool0", "r0", "ok"),
        ("tool_result", "c0_1", "tool1", "r1", "error"),
        ("text", None, None, "Sunny.", None),
    ]
    assert parts[3].duration_ms == 2.5
    assert [p.approval for p in parts] == [None, None, None, None, APPROVALS[1], None]
    assert content_of(parts) == "Let me look.Sunny."
    assert stored_parts(parts) == parts


def test_a_v1_client_sees_only_the_answer_text_of_a_reply_that_called_tools() -> None:
    log, _ = published_steps([("", [(0, "{}")])], "It is sunny.")
    tokens = [e.text for e in map(f.decode_server, log) if isinstance(e, f.Token)]
    assert "".join(tokens) == "It is sunny."


def test_a_taken_over_reply_replays_its_recorded_steps_and_goes_on_from_them() -> None:
    _, recorded = published_steps([("a", [(0, "{}"), (1, '{"x":1}')])], "")
    builder = PartsBuilder(CONV, MESSAGE)
    builder.restore(recorded[:-1])  # the completed step, as Redis kept it
    folded = MessageParts(MESSAGE)
    for event in [
        f.Start(conversation=CONV, message_id=MESSAGE, model="m"),
        *builder.replay(),
        *builder.switch("text", 0.0),
        builder.add("the answer"),
    ]:
        folded.apply(event)
    assert (
        folded.parts()
        == builder.parts()
        == [*recorded[:-1], f.Part(kind="text", text="the answer")]
    )


def test_an_approvals_outcome_survives_the_wire_a_takeover_and_storage() -> None:
    log, persisted = published_steps([("", [(0, "{}"), (1, "{}"), (2, "{}")])], "ok")
    folded = MessageParts(MESSAGE)
    for frame in log:
        folded.apply(f.decode_server(frame))
    stored = msgspec.json.decode(msgspec.json.encode(persisted), type=list[f.Part])
    assert folded.parts() == persisted == stored
    assert [p.approval for p in stored if p.kind == "tool_result"] == list(APPROVALS.values())
    builder = PartsBuilder(CONV, MESSAGE)
    builder.restore(persisted[:-1])
    replayed = MessageParts(MESSAGE)
    for event in builder.replay():
        replayed.apply(event)
    assert replayed.parts() == builder.parts() == persisted[:-1]


def test_a_result_part_end_names_the_approvals_state_by_and_reason() -> None:
    log, _ = published_steps([("", [(1, "{}")])], "")
    (end,) = [e for e in log if b'"approval"' in e]
    assert msgspec.json.decode(end)["approval"] == {
        "state": "denied",
        "by": "alice",
        "reason": "not that file",
    }


def test_extend_keeps_the_text_as_add_does_and_makes_the_event_later() -> None:
    added, extended = PartsBuilder(CONV, MESSAGE), PartsBuilder(CONV, MESSAGE)
    events = []
    for builder in (added, extended):
        builder.switch("reasoning", 0.0)
        builder.switch("text", 1.0)
    for text in ("an", "swer"):
        events.append(added.add(text))
        index = extended.extend(text)
        assert index == extended.current == 1
        assert extended.piece(index, text) == events[-1]
    assert extended.parts() == added.parts()
