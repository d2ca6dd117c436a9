from protocol.fairness import Told, Waiting, due, pick, positions, told


def test_a_user_with_one_turn_is_served_in_the_first_pass_over_one_with_fifty() -> None:
    ring = [Waiting("a", 50, 0), Waiting("b", 1, 0)]
    assert pick(ring, 2, 0) == ["a", "b"]
    assert pick(ring, 4, 0) == ["a", "b", "a", "a"]


def test_a_user_at_the_cap_is_skipped_and_the_others_fill_the_slots() -> None:
    ring = [Waiting("a", 10, 2), Waiting("b", 3, 1), Waiting("c", 1, 0)]
    assert pick(ring, 5, 2) == ["b", "c"]


def test_no_free_slot_or_nothing_waiting_picks_no_one() -> None:
    assert pick([Waiting("a", 3, 0)], 0, 2) == []
    assert pick([Waiting("a", 0, 0)], 4, 2) == []


def test_without_a_cap_one_user_takes_every_free_slot() -> None:
    assert pick([Waiting("a", 3, 7)], 5, 0) == ["a", "a", "a"]


def test_positions_follow_the_round_robin_order() -> None:
    ring = [Waiting("a", 3, 0), Waiting("b", 1, 0), Waiting("c", 2, 0)]
    # order: a0 b0 c0 a1 c1 a2
    assert positions(ring) == {"a": [0, 3, 5], "b": [1], "c": [2, 4]}


def test_a_waiting_turns_position_never_grows_while_the_others_are_served() -> None:
    a, b = 40, 2
    seen: list[int] = []
    ring = [Waiting("a", a, 0), Waiting("b", b, 0)]
    for _ in range(50):
        if not any(w.queued for w in ring):
            break
        places = positions(ring)
        if places.get("b"):
            seen.append(places["b"][-1])
        served = pick(ring, 1, 0)[0]
        ring = [w for w in ring if w.user != served] + [
            Waiting(w.user, w.queued - 1, 0) for w in ring if w.user == served
        ]
    assert seen == sorted(seen, reverse=True)
    assert seen[-1] == 0


def test_a_new_position_is_due_once_a_second_but_0_at_once() -> None:
    last = told("3:10000")
    assert last == Told(3, 10000)
    assert not due(last, 3, 20000)  # the same place is never told twice in a row
    assert not due(last, 2, 10999)
    assert due(last, 2, 11000)
    assert due(last, 0, 10001)  # next to start: told at once
    assert due(told("-1:0"), 5, 10**12)  # never told yet


def test_a_turn_no_longer_waiting_is_never_due() -> None:
    assert told(None) is None
    assert told("garbage") is None
    assert not due(None, 0, 10**12)
