"""A tool call's approval: first answer wins, only the owner, expiry as denial."""

from __future__ import annotations

import pytest

from protocol.approvals import Approval, answer, model_result

PENDING = Approval("c1", "alice", "delete_file", '{"path": "/tmp/x"}', expires_at=100.0)


def test_the_owners_first_answer_settles_the_call() -> None:
    approved = answer(PENDING, "alice", "approve", now=10.0)
    assert approved.outcome == "settled"
    assert approved.approval is not None and approved.approval.state == "approved"
    assert approved.approval.by == "alice"
    denied = answer(PENDING, "alice", "deny", now=10.0, reason="not that file")
    assert denied.approval is not None
    assert (denied.approval.state, denied.approval.reason) == ("denied", "not that file")


def test_a_second_answer_learns_what_won() -> None:
    first = answer(PENDING, "alice", "deny", now=10.0).approval
    second = answer(first, "alice", "approve", now=11.0)
    assert second.outcome == "already"
    assert second.approval is not None and second.approval.state == "denied"


def test_only_the_owner_may_answer() -> None:
    refused = answer(PENDING, "mallory", "approve", now=10.0)
    assert refused.outcome == "forbidden" and refused.approval == PENDING
    settled = answer(PENDING, "alice", "approve", now=10.0).approval
    assert answer(settled, "mallory", "deny", now=11.0).outcome == "forbidden"


def test_an_unknown_call_is_unknown() -> None:
    assert answer(None, "alice", "approve", now=10.0).outcome == "unknown"


def test_after_the_expiry_an_answer_finds_it_expired() -> None:
    late = answer(PENDING, "alice", "approve", now=100.0)
    assert late.outcome == "already"
    assert late.approval is not None and late.approval.state == "expired"
    assert PENDING.at(99.9).state == "pending" and PENDING.at(100.0).state == "expired"


def test_a_reason_is_bounded() -> None:
    denied = answer(PENDING, "alice", "deny", now=1.0, reason="x" * 10_000).approval
    assert denied is not None and denied.reason is not None and len(denied.reason) == 500


def test_what_the_model_is_told() -> None:
    approved = answer(PENDING, "alice", "approve", now=1.0).approval
    denied = answer(PENDING, "alice", "deny", now=1.0, reason="no").approval
    assert approved is not None and denied is not None
    assert model_result(approved) is None
    assert model_result(denied) == "The user denied this call of delete_file: no"
    assert "did not approve" in (model_result(PENDING.at(200.0)) or "")
    with pytest.raises(ValueError):
        model_result(PENDING)
