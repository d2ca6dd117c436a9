from __future__ import annotations

import pytest

from protocol.think import ThinkSplitter

REPLY = "<think>Let me see: 2 < 3, so </th is not a tag.</think>\n\nThe answer is <b>4</b>."
EXPECTED = [
    ("reasoning", "Let me see: 2 < 3, so </th is not a tag."),
    ("text", "\n\nThe answer is <b>4</b>."),
]


def split(pieces: list[str]) -> list[tuple[str, str]]:
    """Feed the pieces and join what comes out by kind, in order."""
    splitter = ThinkSplitter()
    out: list[tuple[str, str]] = []
    for piece in pieces:
        out += splitter.feed(piece)
    out += splitter.finish()
    joined: list[tuple[str, str]] = []
    for kind, text in out:
        assert text, "no empty pieces"
        if joined and joined[-1][0] == kind:
            joined[-1] = (kind, joined[-1][1] + text)
        else:
            joined.append((kind, text))
    return joined


def test_whole_reply_in_one_piece() -> None:
    assert split([REPLY]) == EXPECTED


@pytest.mark.parametrize("cut", range(1, len(REPLY)))
def test_the_reply_cut_in_two_at_every_position(cut: int) -> None:
    assert split([REPLY[:cut], REPLY[cut:]]) == EXPECTED


@pytest.mark.parametrize("start", range(len(REPLY)))
def test_every_character_a_piece_of_its_own_and_three_way_cuts(start: int) -> None:
    assert split(list(REPLY)) == EXPECTED
    for end in range(start + 1, len(REPLY)):
        assert split([REPLY[:start], REPLY[start:end], REPLY[end:]]) == EXPECTED


def test_a_prefix_of_a_tag_at_the_very_end_is_text() -> None:
    assert split(["Hello <thi"]) == [("text", "Hello <thi")]
    assert split(["<think>hmm </thi"]) == [("reasoning", "hmm </thi")]


def test_text_without_tags_passes_through_piece_by_piece() -> None:
    splitter = ThinkSplitter()
    assert splitter.feed("Hello") == [("text", "Hello")]
    assert splitter.feed(" world <") == [("text", " world ")]
    assert splitter.feed("3") == [("text", "<3")]
    assert splitter.finish() == []


def test_two_thinking_blocks() -> None:
    assert split(["<think>a</think>b<think>c</think>d"]) == [
        ("reasoning", "a"),
        ("text", "b"),
        ("reasoning", "c"),
        ("text", "d"),
    ]
