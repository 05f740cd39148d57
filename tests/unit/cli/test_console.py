from __future__ import annotations

import io
import random
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from buildcell.cli.console import PlainReporter, _LineSplitter

KEY = ("build", "stdout")
MAX = _LineSplitter.MAX_LINE
MARK = _LineSplitter.CONTINUED


def feed_all(splitter: _LineSplitter, pieces: list[bytes], key: tuple[str, str] = KEY) -> list[str]:
    lines = []
    for piece in pieces:
        lines += splitter.feed(key, piece)
    return lines + splitter.flush(key)


def cut(data: bytes, sizes: list[int]) -> list[bytes]:
    pieces, at = [], 0
    for size in sizes:
        pieces.append(data[at : at + size])
        at += size
    return [*pieces, data[at:]]


def held(splitter: _LineSplitter, key: tuple[str, str] = KEY) -> tuple[list[bytes], int]:
    return splitter._partial.get(key, ([], 0))


def test_lines_are_split_and_partial_lines_kept_until_they_end() -> None:
    splitter = _LineSplitter()
    assert splitter.feed(KEY, b"one\ntw") == ["one"]
    assert splitter.feed(KEY, b"o") == []
    assert splitter.feed(KEY, b"\nthree\n\nfour") == ["two", "three", ""]
    assert splitter.flush(KEY) == ["four"]
    assert splitter.flush(KEY) == []
    assert splitter.feed(KEY, b"") == []


def test_each_step_and_stream_has_its_own_partial_line() -> None:
    splitter = _LineSplitter()
    other = ("build", "stderr")
    assert splitter.feed(KEY, b"out-") == []
    assert splitter.feed(other, b"err-") == []
    assert splitter.feed(KEY, b"line\n") == ["out-line"]
    assert splitter.flush(other) == ["err-"]


def test_invalid_utf8_is_replaced_not_fatal() -> None:
    assert feed_all(_LineSplitter(), [b"a\xff", b"b\n\xc3"]) == ["a\ufffdb", "\ufffd"]


def test_a_line_of_max_line_bytes_is_given_out_whole() -> None:
    splitter = _LineSplitter()
    line = b"x" * MAX
    assert feed_all(splitter, [line[:100], line[100:], b"\n"]) == [line.decode()]
    assert held(splitter) == ([], 0)


def test_a_longer_line_is_given_out_in_marked_pieces_as_they_complete() -> None:
    splitter = _LineSplitter()
    line = b"y" * (2 * MAX + 10)
    first = splitter.feed(KEY, line[: MAX + 1])
    assert first == ["y" * MAX + MARK]  # as soon as more than MAX_LINE bytes wait
    assert held(splitter)[1] == 1
    assert splitter.feed(KEY, line[MAX + 1 :] + b"\nnext\n") == [
        "y" * MAX + MARK,
        "y" * 10,
        "next",
    ]


def test_cuts_fall_between_utf8_characters() -> None:
    text = "é✓𝄞" * (MAX // 3)  # characters of two, three and four bytes
    lines = feed_all(
        _LineSplitter(), [text.encode()[i : i + 1000] for i in range(0, MAX * 3, 1000)]
    )
    assert len(lines) > 2
    assert all(line.endswith(MARK) for line in lines[:-1])
    assert "".join(line.removesuffix(MARK) for line in lines) == text
    assert "\ufffd" not in "".join(lines)
    assert all(len(line.removesuffix(MARK).encode()) <= MAX for line in lines)


@st.composite
def outputs(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    """Output with short and long lines, some without an end, and how it is chunked."""
    parts = []
    for _ in range(draw(st.integers(1, 6))):
        length = draw(st.sampled_from([0, 1, 50, MAX - 1, MAX, MAX + 1, 2 * MAX + 3]))
        fill = draw(st.sampled_from([b"a", "é".encode(), "✓".encode(), b"\xff", b"ab\xe2"]))
        parts.append((fill * length)[:length])
        parts.append(draw(st.sampled_from([b"\n", b"\n\n", b""])))
    data = b"".join(parts)
    sizes = draw(st.lists(st.integers(1, 4096), max_size=40))
    if draw(st.booleans()):
        sizes = [draw(st.integers(1, 4096))] * (len(data) // 1000 + 1)
    return data, sizes


def reference(data: bytes) -> list[str]:
    """The lines of ``data``: each longer than MAX_LINE bytes cut into marked pieces of
    MAX_LINE bytes, less the start of a UTF-8 character the cut would split."""
    lines = []
    raw = data.split(b"\n")
    for i, whole in enumerate(raw):
        if i == len(raw) - 1 and not whole:
            break
        line = whole
        while len(line) > MAX:
            end = MAX
            for back in range(1, 4):
                byte = line[MAX - back]
                if byte < 0x80:
                    break
                if byte >= 0xC0:
                    if back < (2 if byte < 0xE0 else 3 if byte < 0xF0 else 4):
                        end = MAX - back
                    break
            lines.append(line[:end].decode(errors="replace") + MARK)
            line = line[end:]
        lines.append(line.decode(errors="replace"))
    return lines


@settings(deadline=None, max_examples=60)
@given(outputs())
def test_lines_do_not_depend_on_how_the_output_is_chunked(output: tuple[bytes, list[int]]) -> None:
    data, sizes = output
    expected = reference(data)
    assert feed_all(_LineSplitter(), [data]) == expected
    splitter = _LineSplitter()
    lines = []
    for piece in cut(data, sizes):
        lines += splitter.feed(KEY, piece)
        assert held(splitter)[1] <= MAX
    assert lines + splitter.flush(KEY) == expected


def test_output_without_newlines_is_linear_and_bounded() -> None:
    # Feeding 8 MiB without a newline, in chunks of 1 to 4096 bytes: what is held for the
    # line is never joined again with each chunk (the earlier pieces stay the very same
    # objects), is joined once it exceeds MAX_LINE, and never holds more than MAX_LINE.
    # The bytes copied in all joins together are then linear in the input.
    rng = random.Random(4)
    total = 8 << 20
    data = bytes(rng.choice(b"abcdefgh ") for _ in range(1 << 16)) * (total >> 16)
    splitter = _LineSplitter()
    joined = given_out = at = 0
    while at < total:
        chunk = data[at : at + rng.randint(1, 4096)]
        at += len(chunk)
        before, size = held(splitter)
        before = list(before)
        lines = splitter.feed(KEY, chunk)
        after, now = held(splitter)
        if lines:
            joined += size + len(chunk)
            assert len(after) == 1 and now <= MAX
        else:
            assert len(after) == len(before) + 1
            assert all(a is b for a, b in zip(after, before, strict=False))
            assert now == size + len(chunk)
        assert now <= MAX
        given_out += sum(len(line) - len(MARK) for line in lines)
    assert given_out + held(splitter)[1] == total
    assert joined <= 2 * total


def test_flush_gives_out_what_is_held_as_its_last_line() -> None:
    splitter = _LineSplitter()
    splitter.feed(KEY, b"z" * (MAX + 5))
    assert splitter.flush(KEY) == ["zzzzz"]


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_plain_reporter_prints_long_unterminated_output_in_pieces(chunk: int) -> None:
    out, err = io.StringIO(), io.StringIO()
    reporter = PlainReporter(out=out, err=err)
    step: Any = SimpleNamespace(name="s")
    data = b"q" * (MAX + 100)
    for at in range(0, len(data), chunk):
        reporter.step_output(step, "stdout", data[at : at + chunk])
    assert out.getvalue() == "[s] " + "q" * MAX + MARK + "\n"
    reporter.step_finished(step, SimpleNamespace(exit_code=0, duration=1.0))  # type: ignore[arg-type]
    assert out.getvalue().endswith("[s] " + "q" * 100 + "\n")
