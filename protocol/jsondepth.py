"""How deeply a JSON text nests, measured without decoding it.

A JSON decoder recurses once per `[` or `{`: 50,000 of them in a 50 KB body exhaust Python's
recursion limit and the decoder raises `RecursionError` instead of a decode error. Untrusted
JSON is therefore measured here first and refused when it nests deeper than its reader needs.

Everything runs in C-level bytes operations, never a Python loop per character:

1. a text with no more brackets than the limit cannot be too deep (two `count` calls: every
   ordinary frame stops here);
2. string literals are cut out with one regular expression, then `translate` deletes all but
   the brackets and makes `{}` into `[]`;
3. each pass of `replace(b"[]", b"")` peels one level of innermost pairs, so a balanced text
   of depth d is empty after exactly d passes; at most `limit + 1` passes run.

Unbalanced brackets (left over after the passes) are counted as if they all enclosed the
deepest pair: that can overstate the depth of a text that is not valid JSON, never understate
it, so the decoder never recurses deeper than the limit.
"""

from __future__ import annotations

import re
from typing import Final

MAX_DEPTH: Final = 32
"""Deeper than any Parley message needs (a client frame nests 1 deep, a model chunk 4)."""

_STRING: Final = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_ONE_KIND: Final = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS: Final = bytes(b for b in range(256) if b not in b"[]{}")


def too_deep(data: bytes | bytearray | str, limit: int = MAX_DEPTH) -> bool:
    """True when `data` may nest more than `limit` arrays and objects deep (see above)."""
    raw = _bytes(data)
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    return _depth(raw, limit + 1) > limit


def depth(data: bytes | bytearray | str) -> int:
    """The nesting depth of `data` (exact for valid JSON; 0 for a scalar)."""
    raw = _bytes(data)
    return _depth(raw, raw.count(b"[") + raw.count(b"{"))


def _depth(raw: bytes, cap: int) -> int:
    """The depth as described in the module docstring, counting at most `cap` passes."""
    brackets = _STRING.sub(b"", raw).translate(_ONE_KIND, _NOT_BRACKETS)
    passes = 0
    while b"[]" in brackets and passes < cap:
        brackets = brackets.replace(b"[]", b"")
        passes += 1
    if b"[]" in brackets:
        return passes + 1
    return passes + brackets.count(b"[")


def _bytes(data: bytes | bytearray | str) -> bytes:
    return data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
