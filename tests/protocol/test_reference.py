from __future__ import annotations

from pathlib import Path

from protocol.reference import close_code_table, error_code_list, javascript
from protocol.session import CLOSE_MEANINGS, CloseCode

ROOT = Path(__file__).resolve().parents[2]


def test_checked_in_javascript_module_is_current() -> None:
    """Regenerate with `parley protocol-js > server/static/protocol.js`."""
    assert (ROOT / "server" / "static" / "protocol.js").read_text() == javascript()


def test_every_close_code_has_a_meaning() -> None:
    assert set(CLOSE_MEANINGS) == set(CloseCode)


def test_protocol_doc_has_the_close_code_table() -> None:
    """Paste `protocol.reference.close_code_table()` under "Close codes" in docs/protocol.md."""
    assert close_code_table() in (ROOT / "docs" / "protocol.md").read_text()


def test_protocol_doc_lists_every_error_code() -> None:
    prose = " ".join((ROOT / "docs" / "protocol.md").read_text().split())
    assert f"with codes {error_code_list()}." in prose
