"""Fuzz what the model sends for tool calls: fragments of any shape (as the `openai` client
builds them, unvalidated) become a checked Fragment or a ValidationError the reader turns into
a malformed reply; any sequence of fragments puts together bounded calls; any arguments text
is an object or a ToolError the model reads, never another exception."""

from __future__ import annotations

from typing import Any

import jsonschema
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.toolcalls import BadFragment, Calls, Fragment, FunctionFragment, read_fragment
from server.tools import validation
from server.tools.definitions import ToolError
from tests.protocol.fuzzing import ANY_CHARACTER, JSON_VALUES, deep_nesting, to_json

TEXT = st.text(ANY_CHARACTER, max_size=40)
FRAGMENTS = st.builds(
    Fragment,
    st.none() | st.integers(min_value=-5, max_value=2**40),
    st.none() | TEXT,
    st.none() | st.builds(FunctionFragment, st.none() | TEXT, st.none() | TEXT),
)
SCHEMA = validation.checker(
    {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
)


@settings(max_examples=300, deadline=None)
@given(st.lists(FRAGMENTS, max_size=60))
def test_any_fragments_give_bounded_calls(fragments: list[Fragment]) -> None:
    calls = Calls(max_calls=4, max_argument_chars=100)
    for fragment in fragments:
        calls.add(fragment)
    finished = calls.finish()
    assert len(finished) <= 4
    for call in finished:
        assert len(call.arguments) <= 100 and len(call.id) <= 256 and len(call.name) <= 256
        assert call.id and (call.problem is not None or call.name)


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES)
def test_any_delta_shape_is_a_fragment_or_a_validation_error(value: Any) -> None:
    try:
        fragment = read_fragment(value)
    except BadFragment:
        return
    assert fragment.index is None or isinstance(fragment.index, int)
    assert fragment.id is None or isinstance(fragment.id, str)
    Calls().add(fragment)


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES.map(to_json) | TEXT | deep_nesting())
def test_any_arguments_text_is_an_object_or_a_tool_error(text: str) -> None:
    try:
        arguments = validation.parse(text)
        validation.validate(SCHEMA, arguments)
    except ToolError as exc:
        assert str(exc)
    else:
        jsonschema.validate(arguments, SCHEMA.schema)
