"""Fixtures of the server's unit tests."""

from __future__ import annotations

import pytest

from tests.helpers.replies import WAYS, Way


@pytest.fixture(params=WAYS)
def way(request: pytest.FixtureRequest) -> Way:
    """How `LLM` reads the reply: pulled through `stream`, or pushed to `relay`'s callback."""
    return request.param  # type: ignore[no-any-return]
