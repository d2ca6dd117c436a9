"""The one rule for text Parley stores: it must fit a PostgreSQL `text` column.

PostgreSQL `text` (UTF-8) cannot hold NUL, and no UTF-8 encoder can write a lone UTF-16
surrogate (U+D800 to U+DFFF; a Python `str` holds one when a JSON `\\ud800` escape was decoded
without its pair). Text a client sends is refused when it breaks the rule (`problem`, at the
edge: frames, REST bodies, configuration, tokens); text Parley did not choose and must keep
anyway (the model's output, a queued turn) has each bad character replaced by U+FFFD (`scrub`).

Both are cheap on the hot path: one `'\\x00' in s` scan, and a surrogate scan (a UTF-8 encode)
only for text that is not ASCII.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

import msgspec

REPLACEMENT: Final = "\ufffd"
_UNSTORABLE: Final = re.compile("[\x00\ud800-\udfff]")
_SURROGATE_ESCAPE: Final = re.compile(r"\\u[dD][89a-fA-F]")


def problem(text: str) -> str | None:
    """Why `text` cannot be stored, or None when it can."""
    if "\x00" in text:
        return "holds a NUL character (\\u0000), which cannot be stored"
    if (surrogate := _first_surrogate(text)) is not None:
        return f"holds a lone UTF-16 surrogate (\\u{ord(surrogate):04x}), not valid Unicode"
    return None


def scrub(text: str) -> str:
    """`text` with every NUL and lone surrogate replaced by U+FFFD (itself when clean)."""
    if "\x00" not in text and (text.isascii() or _first_surrogate(text) is None):
        return text  # (ASCII, the common case, without a call: scrub runs per model chunk)
    return _UNSTORABLE.sub(REPLACEMENT, text)


def _first_surrogate(text: str) -> str | None:
    """Encoding is the fastest scan for a surrogate (a few times faster than a regex search);
    ASCII text, the common case, needs none."""
    if text.isascii():
        return None
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        return text[exc.start]
    return None


def unstorable_field(value: msgspec.Struct) -> tuple[str, str] | None:
    """The first string field of a Struct (or in a list of strings) that breaks the rule, as
    (field name, problem); None when every one is storable."""
    for name in value.__struct_fields__:
        field = getattr(value, name)
        if isinstance(field, str):
            if (why := problem(field)) is not None:
                return name, why
        elif isinstance(field, list):
            for item in field:
                if isinstance(item, str) and (why := problem(item)) is not None:
                    return name, why
    return None


def describe(field: str, why: str) -> str:
    """The message of the `invalid` error (or HTTP 400) for an unstorable field."""
    return f"`{field}` {why}"


def surrogate_field(data: bytes | str) -> tuple[str, str] | None:
    """For a JSON object msgspec refused: the top-level field whose string holds a lone
    surrogate escape, if that is what is wrong with it. Only for the error path: it decodes
    again with the standard library, which accepts such escapes."""
    source = data.decode(errors="replace") if isinstance(data, bytes) else data
    if _SURROGATE_ESCAPE.search(source) is None:
        return None
    try:
        raw: Any = json.loads(source)
    except (ValueError, RecursionError):
        return None
    if not isinstance(raw, dict):
        return None
    for name, field in raw.items():
        texts = field if isinstance(field, list) else [field]
        for item in texts:
            if isinstance(item, str) and (why := problem(item)) is not None:
                return scrub(str(name))[:64], why
    return None
