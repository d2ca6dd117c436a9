"""The depth scan against the truth: for any JSON value its measured depth is exact, for any
text it never understates how deep a decoder would recurse, and it is cheap."""

from __future__ import annotations

from typing import Any

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.jsondepth import depth, too_deep
from tests.protocol.fuzzing import HOSTILE_BYTES, JSON_VALUES, deep_nesting, to_json


def true_depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max(map(true_depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(true_depth, value.values()), default=0)
    return 0


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES)
def test_depth_of_valid_json_is_exact(value: Any) -> None:
    text = to_json(value)
    assert depth(text) == true_depth(value)
    assert too_deep(text, true_depth(value)) is False
    if true_depth(value) > 0:
        assert too_deep(text, true_depth(value) - 1)


@settings(max_examples=200, deadline=None)
@given(HOSTILE_BYTES | deep_nesting().map(str.encode))
def test_a_text_not_too_deep_decodes_without_recursion_error(data: bytes) -> None:
    if too_deep(data, 32):
        return
    try:
        msgspec.json.decode(data)
    except msgspec.DecodeError:
        pass
    except UnicodeError:
        pass


@given(st.integers(1, 200_000))
@settings(max_examples=20, deadline=None)
def test_nesting_beyond_the_limit_is_found(levels: int) -> None:
    assert too_deep("[" * levels, 32) is (levels > 32)
    assert too_deep('{"a":' * levels + "1" + "}" * levels, 32) is (levels > 32)
    assert not too_deep('"' + "[" * levels + '"', 32)
