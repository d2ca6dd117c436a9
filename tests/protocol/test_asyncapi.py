from __future__ import annotations

from pathlib import Path

from protocol.asyncapi import CLIENT, SERVER, document, render

DOC = Path(__file__).resolve().parents[2] / "docs" / "asyncapi.json"


def test_checked_in_document_is_current() -> None:
    """Regenerate with `parley asyncapi > docs/asyncapi.json`."""
    assert DOC.read_text() == render()


def test_every_frame_is_described() -> None:
    doc = document()
    assert set(doc["components"]["messages"]) == {
        s.__struct_config__.tag for s in (*CLIENT, *SERVER)
    }
    assert doc["asyncapi"] == "3.0.0"
