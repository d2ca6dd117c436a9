"""The hooks' HTTP client (`server.app.hooks.Hooks`) against a real receiver on 127.0.0.1
(tests/helpers/receiver.py): signed calls, and a timeout that bounds the whole call."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import REGISTRY

from server.app.config import HooksSettings
from server.app.hooks import ALLOW, Hooks
from tests.helpers.receiver import SECRET, Slowly, receiving


@pytest.mark.parametrize("policy", ["allow", "refuse"])
async def test_a_trickling_answer_is_cut_at_the_timeout(policy: str) -> None:
    """Headers at once, then a byte every 0.1 s: each read is quick, the answer (3.7 s) is
    not; the call is a failure after `turn_timeout`, and the failure policy applies."""
    hooks = Hooks(HooksSettings(secret=SECRET, turn_timeout=0.3, turn_failure=policy))  # type: ignore[arg-type]
    failed = {"hook": "turn", "outcome": "failed"}
    before = REGISTRY.get_sample_value("parley_hook_call_seconds_count", failed) or 0.0
    with receiving() as receiver:
        receiver.answers["/turn"] = lambda p, b: Slowly(b'{"allow": false, "message": "late"}')
        try:
            started = time.monotonic()
            call = hooks.decide(receiver.url("/turn"), {"type": "turn"})
            reply = await asyncio.wait_for(call, 10)
            took = time.monotonic() - started
        finally:
            await hooks.close()
    assert took < 1.5, f"the call took {took:.2f} s"
    if policy == "allow":
        assert reply == ALLOW
    else:
        assert (reply.allow, reply.message) == (False, "the application is unavailable")
    assert receiver.bad_signatures == 0 and receiver.of("/turn") == [{"type": "turn"}]
    assert REGISTRY.get_sample_value("parley_hook_call_seconds_count", failed) == before + 1
    assert (REGISTRY.get_sample_value("parley_hook_call_seconds_sum", failed) or 0) >= 0.3
