"""`sse.Events` cuts the `data` of server-sent events out of a body's blocks: each stream
here is fed whole, cut in two at every byte offset, and one byte at a time, and must give the
same events every way."""

from __future__ import annotations

import pytest

from protocol.sse_parse import Events, Oversized

STREAMS: list[tuple[str, bytes, list[bytes], bool]] = [
    ("openai", b'data: {"a":1}\n\ndata: {"b":2}\n\ndata: [DONE]\n\n', [b'{"a":1}', b'{"b":2}'],
     True),
    ("crlf", b"data: a\r\n\r\ndata: b\r\n\r\ndata: [DONE]\r\n\r\n", [b"a", b"b"], True),
    ("cr", b"data: a\r\rdata: b\r\rdata: [DONE]\r\r", [b"a", b"b"], True),
    ("mixed endings", b"data: a\r\n\r\ndata: b\n\ndata: c\r\r", [b"a", b"b", b"c"], False),
    (
        "comments, other fields, several data lines, no space, empty events",
        b": ping\n\nevent: message\nid: 1\nretry: 5\ndata: x\ndata: y\n\n\n\ndata:z\n\n",
        [b"x\ny", b"z"],
        False,
    ),
    ("a data line after a whole one", b"data: a\ndata: b\n\ndata: c\n\n", [b"a\nb", b"c"], False),
    ("nothing after [DONE]", b"data: a\n\ndata: [DONE]\n\ndata: never\n\n", [b"a"], True),
    ("[DONE] inside an event is data", b"data: x\ndata: [DONE]\n\n", [b"x\n[DONE]"], False),
    ("the end without a blank line", b"data: a\n\ndata: last\n", [b"a", b"last"], False),
    ("a line never ended is dropped", b"data: a\n\ndata: cut", [b"a"], False),
    ("an empty payload", b"data: \n\ndata:\n\n", [b"", b""], False),
]  # fmt: skip


def read(blocks: list[bytes], limit: int = 1 << 20) -> tuple[list[bytes], bool]:
    events = Events(limit)
    out: list[bytes] = []
    for block in blocks:
        out += events.feed(block)
    if (last := events.end()) is not None:
        out.append(last)
    return out, events.done


def every_split(wire: bytes) -> list[list[bytes]]:
    """The stream whole, in two at every offset, and byte by byte."""
    halves = [[wire[:at], wire[at:]] for at in range(1, len(wire))]
    return [[wire], *halves, [wire[i : i + 1] for i in range(len(wire))]]


@pytest.mark.parametrize(
    ("wire", "expected", "done"), [s[1:] for s in STREAMS], ids=[s[0] for s in STREAMS]
)
def test_the_same_events_however_the_body_is_cut(
    wire: bytes, expected: list[bytes], done: bool
) -> None:
    for blocks in every_split(wire):
        assert read(blocks) == (expected, done), blocks


def test_three_way_cuts_of_the_commonest_stream() -> None:
    wire = STREAMS[0][1]
    for first in range(1, len(wire)):
        for second in range(first + 1, len(wire)):
            blocks = [wire[:first], wire[first:second], wire[second:]]
            assert read(blocks) == (STREAMS[0][2], True), blocks


@pytest.mark.parametrize(
    "wire",
    [
        b"data: " + b"x" * 17 + b"\n\n",  # one whole line
        b"data: " + b"x" * 17,  # a line not ended yet
        b"data: 12345678\ndata: 12345678\ndata: 1\n\n",  # an event of several lines
    ],
)
def test_a_line_or_event_longer_than_the_limit_is_refused(wire: bytes) -> None:
    for blocks in every_split(wire):
        with pytest.raises(Oversized, match="longer than the limit"):
            read(blocks, limit=16)


def test_at_the_limit_is_read() -> None:
    wire = b"data: " + b"x" * 10 + b"\n\ndata: 12345678\ndata: 12345678\n\n"
    for blocks in every_split(wire):
        assert read(blocks, limit=16) == ([b"x" * 10, b"12345678\n12345678"], False)


def test_blocks_after_done_are_not_read() -> None:
    events = Events(1 << 20)
    assert events.feed(b"data: a\n\ndata: [DONE]\n\n") == [b"a"]
    assert events.feed(b"data: b\n\n") == []
    assert events.end() is None


def at_event_ends(wire: bytes) -> list[bytes]:
    """`wire` cut after each blank line (LF LF): as a model sends it, an event a block."""
    blocks, start = [], 0
    while (end := wire.find(b"\n\n", start)) >= 0:
        blocks.append(wire[start : end + 2])
        start = end + 2
    return [*blocks, wire[start:]] if start < len(wire) else blocks


@pytest.mark.parametrize(
    ("wire", "expected", "done"), [s[1:] for s in STREAMS], ids=[s[0] for s in STREAMS]
)
def test_blocks_of_whole_events_read_as_the_stream_whole(
    wire: bytes, expected: list[bytes], done: bool
) -> None:
    """A model sends one event per block: such blocks (taken without their lines split),
    also after a block that left a line, an event or a CR open, read the same."""
    assert read(at_event_ends(wire)) == (expected, done)
    for at in range(1, len(wire)):
        assert read([wire[:at], *at_event_ends(wire[at:])]) == (expected, done), at
