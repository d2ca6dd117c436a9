"""Hypothesis strategies for hostile input, shared by the fuzz targets (tests/protocol/test_fuzz_*).

Each target feeds one decoder bytes and text that a client, a model or an operator could
send: arbitrary bytes, arbitrary JSON, nesting far past any recursion limit (bare or inside a
field), numbers past every integer type, and text holding lone surrogates.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

SURROGATES = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
ANY_CHARACTER = st.characters(codec=None, exclude_categories=()) | SURROGATES
HUGE_INTEGERS = st.sampled_from([2**53 + 1, 2**63, 2**64, 10**30, -(2**64), 10**400])
NUMBERS = st.integers() | HUGE_INTEGERS | st.floats(allow_nan=False, allow_infinity=False)
SCALARS = st.none() | st.booleans() | NUMBERS | st.text(ANY_CHARACTER, max_size=40)
JSON_VALUES: st.SearchStrategy[Any] = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.text(ANY_CHARACTER, max_size=12), inner, max_size=5)
    ),
    max_leaves=25,
)


def to_json(value: Any) -> str:
    """JSON text of `value`; lone surrogates stay in the text (`ensure_ascii=False`)."""
    return json.dumps(value, ensure_ascii=False)


@st.composite
def deep_nesting(draw: st.DrawFn) -> str:
    """Arrays and objects nested up to 60,000 deep, closed or not, bare or in a field."""
    levels = draw(st.integers(min_value=1, max_value=60_000))
    opener = draw(st.sampled_from(["[", '{"a":', '[{"b":', '{"s": "[[", "n":']))
    closer = {"[": "]", '{"a":': "}", '[{"b":': "}]", '{"s": "[[", "n":': "}"}[opener]
    body = opener * levels + "1" + (closer * levels if draw(st.booleans()) else "")
    field = draw(st.sampled_from(["type", "text", "ref", "extra", "after", "token"]))
    kind = draw(st.sampled_from(["say", "join", "ping", "auth", "create"]))
    return body if draw(st.booleans()) else f'{{"type": "{kind}", "{field}": {body}}}'


def frame_like(kind: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Objects shaped like frames of `kind`, with hostile values in their fields."""
    fields = st.sampled_from(
        ["ref", "conversation", "after", "text", "id", "title", "system", "model", "token"]
    )
    return st.builds(
        lambda k, extra: to_json({"type": k, **extra}),
        kind,
        st.dictionaries(fields, JSON_VALUES | HUGE_INTEGERS, max_size=4),
    )


HOSTILE_TEXT = (
    st.text(ANY_CHARACTER, max_size=200)
    | JSON_VALUES.map(to_json)
    | deep_nesting()
    | frame_like(st.sampled_from(["say", "join", "create", "auth", "ping", "leave", "x"]))
)
HOSTILE_BYTES = st.binary(max_size=300) | HOSTILE_TEXT.map(
    lambda t: t.encode("utf-8", "surrogatepass")
)
