"""Exactly-once, in-order delivery per socket: the cursor merging log reads and live frames."""

from __future__ import annotations

import gc
import random

from hypothesis import given
from hypothesis import strategies as st

from protocol.resume import Cursor, NextStep, Verdict, resume_point


def frames(seqs: range) -> list[tuple[int, bytes]]:
    return [(s, b"e%d" % s) for s in seqs]


def test_join_holds_live_frames_until_the_log_is_read() -> None:
    cursor = Cursor()
    cursor.start_at(3)
    assert cursor.live(6, b"e6") is Verdict.HOLD
    result = cursor.catch_up(frames(range(4, 6)), head=5)
    assert result.frames == [b"e4", b"e5", b"e6"] and result.next_step is NextStep.LIVE
    assert cursor.live(6, b"e6") is Verdict.DROP
    assert cursor.live(7, b"e7") is Verdict.SEND


def test_a_skipped_seq_is_a_gap_not_a_reorder() -> None:
    cursor = Cursor()
    cursor.start_at(0)
    cursor.catch_up([], head=0)
    assert cursor.live(1, b"e1") is Verdict.SEND
    assert cursor.live(3, b"e3") is Verdict.GAP
    assert cursor.live(4, b"e4") is Verdict.HOLD
    result = cursor.catch_up(frames(range(2, 4)), head=3)
    assert result.frames == [b"e2", b"e3", b"e4"] and result.next_step is NextStep.LIVE


def test_trimmed_log_means_reset() -> None:
    cursor = Cursor()
    cursor.start_at(2)
    result = cursor.catch_up(frames(range(10, 12)), head=11)
    assert result.next_step is NextStep.RESET


def test_client_ahead_of_the_log_means_reset() -> None:
    cursor = Cursor()
    cursor.start_at(50)
    assert cursor.catch_up([], head=7).next_step is NextStep.RESET


def test_history_followed_by_the_whole_log_resumes_where_the_history_ends() -> None:
    assert resume_point(frames(range(5, 9)), start=4, head=8) == 4
    assert resume_point([], start=4, head=4) == 4


def test_events_lost_after_the_history_are_skipped_not_waited_for() -> None:
    """Redis lost seqs 5..9 (and a worker's floor raised the counter past them): a socket
    given the history up to 4 follows from 9, the events after the hole come in order, and
    its cursor takes live frames again."""
    logged = frames(range(10, 13))
    start = resume_point([*frames(range(5, 7)), *logged], start=4, head=12)
    assert start == 9
    cursor = Cursor()
    cursor.start_at(start)
    result = cursor.catch_up(logged, head=12)
    assert result.frames == [b"e10", b"e11", b"e12"] and result.next_step is NextStep.LIVE
    assert cursor.live(13, b"e13") is Verdict.SEND


def test_a_counter_raised_past_an_empty_log_resumes_at_the_head() -> None:
    assert resume_point([], start=2, head=15) == 15
    assert resume_point(frames(range(3, 6)), start=2, head=15) == 15


def test_hole_past_the_head_means_read_again() -> None:
    cursor = Cursor()
    cursor.start_at(0)
    cursor.live(3, b"e3")
    result = cursor.catch_up(frames(range(1, 2)), head=1)
    assert result.frames == [b"e1"] and result.next_step is NextStep.AGAIN
    result = cursor.catch_up(frames(range(2, 4)), head=3)
    assert result.frames == [b"e2", b"e3"] and result.next_step is NextStep.LIVE


@given(
    total=st.integers(1, 60),
    after=st.integers(0, 60),
    joined_at=st.integers(0, 60),
    lost=st.sets(st.integers(1, 60), max_size=10),
    seed=st.integers(0, 2**16),
)
def test_every_event_exactly_once_in_order(
    total: int, after: int, joined_at: int, lost: set[int], seed: int
) -> None:
    """Whatever the moment of joining and whichever publishes are lost, the socket ends with
    events after+1..total, each once, in order."""
    after, joined_at = min(after, total), min(joined_at, total)
    after = min(after, joined_at)
    rng = random.Random(seed)
    cursor = Cursor()
    cursor.start_at(after)
    sent: list[bytes] = []
    for seq in range(joined_at + 1, total + 1):
        if seq in lost:
            continue
        verdict = cursor.live(seq, b"e%d" % seq)
        if verdict is Verdict.SEND:
            sent.append(b"e%d" % seq)
        if rng.random() < 0.2 or verdict is Verdict.GAP:
            result = cursor.catch_up(frames(range(cursor.last_seq + 1, seq + 1)), head=seq)
            sent += result.frames
    for _ in range(3):
        result = cursor.catch_up(frames(range(cursor.last_seq + 1, total + 1)), head=total)
        sent += result.frames
    assert sent == [b"e%d" % s for s in range(after + 1, total + 1)]


def test_a_cursor_live_again_after_a_long_replay_keeps_no_table() -> None:
    """One cursor per joined socket: once caught up it must not keep the table of the frames
    it held during a replay (a dict keeps its size when emptied)."""
    cursor = Cursor()
    cursor.start_at(0)
    for seq in range(101, 201):  # live frames arriving while the log is read
        assert cursor.live(seq, b"x") is Verdict.HOLD
    result = cursor.catch_up([(seq, b"x") for seq in range(1, 101)], 200)
    assert result.next_step is NextStep.LIVE and len(result.frames) == 200
    assert cursor.live(201, b"x") is Verdict.SEND
    assert not any(isinstance(o, dict) for o in gc.get_referents(cursor))
