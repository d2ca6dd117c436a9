"""The protocol's constants rendered for the places that restate them, so each has one source.

`javascript()` is `server/static/protocol.js`, the close codes and error codes for the browser
UI (`parley protocol-js` prints it); `close_code_table()` and `error_code_list()` are what
`docs/protocol.md` says. Tests keep the checked-in copies in step, like docs/asyncapi.json.
"""

from __future__ import annotations

from typing import Final, get_args

from protocol.frames import ErrorCode
from protocol.session import CLOSE_MEANINGS, CloseCode

ERROR_CODES: Final[tuple[str, ...]] = get_args(ErrorCode)

_JS_HEADER: Final = """\
// The protocol's close codes and error codes. Generated from protocol/session.py and
// protocol/frames.py by `parley protocol-js > server/static/protocol.js`: change those, not
// this file (tests/protocol/test_reference.py fails when the two differ). What each close
// code means: docs/protocol.md, "Close codes".
"""


def javascript() -> str:
    close = "".join(f"  {code.name}: {int(code)},\n" for code in CloseCode)
    errors = "".join(f'  {code.upper()}: "{code}",\n' for code in ERROR_CODES)
    return (
        f"{_JS_HEADER}\n"
        f"export const CLOSE_CODE = Object.freeze({{\n{close}}});\n\n"
        f"export const ERROR_CODE = Object.freeze({{\n{errors}}});\n"
    )


def close_code_table() -> str:
    """The table under "Close codes" in docs/protocol.md."""
    rows = "".join(f"| {int(code)} | {CLOSE_MEANINGS[code]} |\n" for code in CloseCode)
    return f"| code | meaning |\n|---|---|\n{rows}"


def error_code_list() -> str:
    """How docs/protocol.md lists the `code`s of an `error` frame."""
    return ", ".join(f"`{code}`" for code in ERROR_CODES)
