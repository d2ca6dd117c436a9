"""The finish hook's retry schedule (pure): an endpoint down for minutes is tried again and
again, every 30 s at most, until `hooks.finish_give_up` (10 min by default)."""

from __future__ import annotations

import itertools

from server.app.config import HooksSettings
from server.generation.finish_hooks import MAX_BACKOFF, MIN_BACKOFF, backoff


def test_a_receiver_down_for_minutes_is_tried_all_along() -> None:
    give_up = HooksSettings().finish_give_up
    tries = [0.0]
    while tries[-1] < give_up and len(tries) < 1000:
        tries.append(tries[-1] + backoff(tries[-1]))
    gaps = [later - earlier for earlier, later in itertools.pairwise(tries)]
    assert give_up >= 600
    assert gaps[0] == MIN_BACKOFF and max(gaps) == MAX_BACKOFF == 30.0
    assert gaps == sorted(gaps)  # it backs off, never faster again
    assert sum(1 for t in tries if 60 <= t <= 300) >= 8  # minutes 1-5: tried at least 8 times
