"""The model's streamed tool-call fragments put together into complete calls."""

from __future__ import annotations

import itertools
import json

from hypothesis import given
from hypothesis import strategies as st

from protocol.toolcalls import (
    Calls,
    Fragment,
    FunctionFragment,
    ToolCall,
    assistant_message,
    tool_message,
)

WEATHER = '{"city": "Zürich", "days": [1, 2]}'
TIME = '{"zone": "UTC"}'


def head(index: int | None, id: str, name: str, arguments: str = "") -> Fragment:
    return Fragment(index, id, FunctionFragment(name, arguments))


def piece(index: int | None, arguments: str) -> Fragment:
    return Fragment(index, None, FunctionFragment(None, arguments))


def run(fragments: list[Fragment], **bounds: int) -> list[ToolCall]:
    calls = Calls(**bounds)
    for fragment in fragments:
        calls.add(fragment)
    return calls.finish()


def cut(text: str, positions: tuple[int, ...]) -> list[str]:
    edges = [0, *positions, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(edges)]


def test_every_split_in_two_and_three_gives_the_same_call() -> None:
    n = len(WEATHER)
    for count in (1, 2):
        for positions in itertools.combinations(range(1, n), count):
            fragments = [head(0, "c1", "weather")]
            fragments += [piece(0, p) for p in cut(WEATHER, positions)]
            assert run(fragments) == [ToolCall(0, "c1", "weather", WEATHER)], positions


def test_one_character_per_fragment_and_arguments_in_the_first_fragment() -> None:
    fragments = [head(0, "c1", "weather"), *(piece(0, ch) for ch in WEATHER)]
    assert run(fragments) == [ToolCall(0, "c1", "weather", WEATHER)]
    whole = [head(0, "c1", "weather", WEATHER)]
    assert run(whole) == [ToolCall(0, "c1", "weather", WEATHER)]


def test_parallel_calls_interleaved_in_every_order() -> None:
    a = [head(0, "a", "weather"), *(piece(0, p) for p in cut(WEATHER, (5, 12, 20)))]
    b = [head(1, "b", "time"), *(piece(1, p) for p in cut(TIME, (3, 9)))]
    expected = [ToolCall(0, "a", "weather", WEATHER), ToolCall(1, "b", "time", TIME)]
    # every interleaving that keeps each call's own order (choose a's slots among all)
    total = len(a) + len(b)
    for slots in itertools.combinations(range(total), len(a)):
        ai, bi = iter(a), iter(b)
        merged = [next(ai) if i in slots else next(bi) for i in range(total)]
        assert run(merged) == expected


def test_progress_reports_each_piece_with_the_call_it_belongs_to() -> None:
    calls = Calls()
    first = calls.add(head(0, "c1", "weather"))
    assert first is not None and (first.id, first.name, first.arguments) == ("c1", "weather", "")
    second = calls.add(piece(0, '{"city"'))
    assert second is not None and (second.index, second.id, second.arguments) == (
        0,
        "c1",
        '{"city"',
    )


def test_an_id_and_name_repeated_on_every_fragment_are_taken_once() -> None:
    fragments = [head(0, "c1", "weather", p) for p in cut(WEATHER, (4, 10))]
    assert run(fragments) == [ToolCall(0, "c1", "weather", WEATHER)]


def test_a_name_in_pieces_is_joined() -> None:
    fragments = [head(0, "c1", "wea"), Fragment(0, None, FunctionFragment("ther", WEATHER))]
    assert run(fragments) == [ToolCall(0, "c1", "weather", WEATHER)]


def test_without_index_fragments_continue_the_latest_call_and_a_new_id_opens_one() -> None:
    fragments = [
        head(None, "a", "weather"),
        piece(None, WEATHER[:7]),
        piece(None, WEATHER[7:]),
        head(None, "b", "time", TIME),
    ]
    assert run(fragments) == [
        ToolCall(0, "a", "weather", WEATHER),
        ToolCall(1, "b", "time", TIME),
    ]


def test_a_call_without_id_gets_one_and_without_name_carries_a_problem() -> None:
    calls = run([Fragment(2, None, FunctionFragment("time", TIME)), piece(3, "{}")])
    assert calls == [
        ToolCall(2, "call_2", "time", TIME),
        ToolCall(3, "call_3", "", "{}", "the call names no tool"),
    ]


def test_arguments_past_the_cap_are_dropped_and_the_call_says_so() -> None:
    fragments = [head(0, "c1", "weather"), *(piece(0, "x" * 40) for _ in range(10))]
    [call] = run(fragments, max_argument_chars=100)
    assert call == ToolCall(0, "c1", "weather", "", "the arguments are too long")


def test_calls_past_the_limit_are_not_kept() -> None:
    accumulator = Calls(max_calls=2)
    for index in range(5):
        accumulator.add(head(index, f"c{index}", "time", TIME))
    assert [c.id for c in accumulator.finish()] == ["c0", "c1"]
    assert accumulator.dropped == 3


def test_ids_and_names_are_bounded() -> None:
    fragments = [head(0, "i" * 10, "n" * 10)] + [
        Fragment(0, "i" * 10 + str(k), FunctionFragment("n" * 10 + str(k))) for k in range(100)
    ]
    [call] = run(fragments)
    assert len(call.id) <= 256 and len(call.name) <= 256


def test_the_history_messages_the_next_request_carries() -> None:
    call = ToolCall(0, "c1", "weather", WEATHER)
    assert assistant_message("", [call]) == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": WEATHER}}
        ],
    }
    assert tool_message("c1", "sunny") == {"role": "tool", "tool_call_id": "c1", "content": "sunny"}


@given(
    st.lists(
        st.tuples(st.dictionaries(st.text(max_size=5), st.integers()), st.integers(1, 5)),
        min_size=1,
        max_size=4,
    ),
    st.randoms(use_true_random=False),
)
def test_any_arguments_cut_anywhere_and_interleaved_come_back_whole(
    specs: list[tuple[dict[str, int], int]], rng: object
) -> None:
    import random

    assert isinstance(rng, random.Random)
    texts = [json.dumps(args) for args, _ in specs]
    streams: list[list[Fragment]] = []
    for index, (text, (_, parts)) in enumerate(zip(texts, specs, strict=True)):
        positions = sorted(rng.sample(range(1, len(text)), min(parts, len(text) - 1)))
        streams.append(
            [head(index, f"c{index}", "t"), *(piece(index, p) for p in cut(text, tuple(positions)))]
        )
    merged: list[Fragment] = []
    while any(streams):
        stream = rng.choice([s for s in streams if s])
        merged.append(stream.pop(0))
    assert [c.arguments for c in run(merged)] == texts
