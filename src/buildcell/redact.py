"""Redaction of secret values from build output, and the leak check on outputs.

A secret leaks in more shapes than its raw bytes: tools base64-encode it into auth
headers, hex-dump it, percent-encode it into URLs, JSON-escape it into logs, and write it
as UTF-16 (Windows tools, a Java or JavaScript string dumped as it is held).
:func:`encodings` lists every shape we look for; :class:`Redactor` replaces each
occurrence of any of them with ``***`` in a stream of output chunks, and :class:`Scanner`
(or :func:`scan`) names the secrets whose shapes occur, to refuse outputs that carry them.

Output is also searched as a terminal shows it: a value printed with escape sequences
between its characters (a colour per character, a highlight in the middle, a hyperlink)
shows as the value, so it is found in the text between the sequences (see
:class:`Redactor` for what then replaces it). Output without an ESC byte costs one
``memchr`` more for this.

Build output is large and must not be slowed down much, so the search avoids running a
big regular-expression alternation over every byte. Every pattern at least ``m`` bytes
long contains a ``g``-byte block that starts at a multiple of a stride ``d`` (with
``d + g - 1 <= m``), so it is enough to look up the blocks at those positions, read as
machine integers through a :class:`memoryview`, in a set of the patterns' blocks. Only
where a block hits is the text compared with the patterns; patterns too short for that
to pay off are found with :meth:`bytes.find`, and patterns with a byte that text output
hardly holds (the zero bytes of UTF-16) by looking for that byte. The work is linear in
the output size.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import functools
import json
import re
import struct
import sys
import urllib.parse
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate, compress, count
from operator import itemgetter
from typing import Literal

from buildcell.errors import ConfigError

__all__ = [
    "MIN_SECRET_LENGTH",
    "REPLACEMENT",
    "Redactor",
    "Scanner",
    "Secret",
    "encodings",
    "scan",
]

#: Shorter values would match all over ordinary output and shred it.
MIN_SECRET_LENGTH = 4

#: What every redacted range of output becomes.
REPLACEMENT = b"***"

_Chunk = bytes | bytearray | memoryview

# Cost model for choosing how to search, in nanoseconds, measured on a small x86-64 VM:
# looking up one sampled block (creating the int, hashing it, probing the set), and
# bytes.find, which skips about a needle's length per step: _NS_FIND / (len + 1) per byte.
# Only their ratio matters.
_NS_PER_SAMPLE = 38.0
_NS_FIND = 5.0
# 4-byte blocks collide with ordinary text far more often than 8-byte ones; weigh that in.
_SHORT_GRAM_PENALTY = 1.3
# Each pass costs a little on its own, which matters for small chunks.
_MAX_PASSES = 4
# Up to this many distinct hits in one pass are located by searching for each.
_LOCATE_BY_FIND = 16
# When more than one sample in _FALSE_HIT_RATIO has to be compared with patterns (hex-heavy
# output against hex forms), use 8-byte blocks for the next _FALLBACK_CALLS searches.
_FALSE_HIT_RATIO = 100
_FALLBACK_CALLS = 16
# Patterns are found by their anchor bytes while at most one byte in this many is one.
_ANCHOR_DENSITY = 256
# Up to this many distinct anchor bytes are each looked for with memchr (some 30 times
# faster than the bytes.translate pass that rules out more at once).
_FEW_ANCHORS = 4
# Anchor bytes are counted in this many bytes at the start first, which rules out most
# binary output (full of zero bytes) before counting them all.
_ANCHOR_SAMPLE = 4096

# Every pattern is at least this long, so its first bytes can key a dictionary.
_HEAD = MIN_SECRET_LENGTH

# scan() reads memory in slices of this size, so that a large mapping is never copied whole.
_SCAN_SLICE = 1 << 20

# Terminal escape sequences start with this byte; output without it costs one memchr more.
_ESC = b"\x1b"
# A zero byte among this many bytes at the start makes output binary from there on.
_TEXT_PROBE = 8000
# Longer sequences are not taken for sequences (the ESC is shown as text), which bounds
# what an incomplete one at the end of a chunk keeps back.
_ESCAPE_PAYLOAD = 1024
_ESCAPE_INTERMEDIATES = 16
# Up to one ESC in this many bytes, sequences are found one by one from their ESC (as
# judged by the first _DENSITY_SAMPLE of them, and given up on if they get denser).
_ESCAPES_BY_FIND = 512
_DENSITY_SAMPLE = 16
# Searching a small piece of shown text costs about as much as searching this many more
# bytes of it: with few sequences only the text around each one is searched.
_WINDOW_COST = 1024
# A secret shown with escape sequences between its characters is found if its occurrence
# covers at most this many times its length (an SGR code or two per character fit).
_SPREAD = 64


def encodings(value: bytes) -> set[bytes]:
    """Every form of ``value`` that must be redacted from output.

    These are: the raw bytes; for a multi-line value each line (without ``\\r``) of at
    least :data:`MIN_SECRET_LENGTH` bytes; base64 with the standard and URL-safe alphabets,
    for the value alone (with and without ``=`` padding) and embedded in a longer encoded
    stream at each of the three byte alignments (the characters that depend only on the
    value, plus the padded and unpadded ends for a value that ends the stream); lower and
    upper case hex; percent-encoding as by :func:`urllib.parse.quote` and
    :func:`~urllib.parse.quote_plus`; JSON string escaping with and without
    ``ensure_ascii`` (bytes that are not UTF-8 taken as by ``surrogateescape``); and
    UTF-16, little and big endian, of the value and of each such line (see
    :func:`_utf16_forms`).

    Args:
        value: the secret value.

    Returns:
        The set of byte strings to look for, each at least :data:`MIN_SECRET_LENGTH` long
        unless ``value`` itself is shorter.
    """
    value = bytes(value)
    texts = [value]
    if b"\n" in value:
        for line in value.split(b"\n"):
            line = line.strip(b"\r")  # noqa: PLW2901 - the stripped line is what is kept
            if len(line) >= MIN_SECRET_LENGTH:
                texts.append(line)
    forms = set(texts)
    for whole in texts:
        forms |= _utf16_forms(whole)
    forms |= _base64_forms(value)
    forms.add(value.hex().encode("ascii"))
    forms.add(value.hex().upper().encode("ascii"))
    for quoted in (
        urllib.parse.quote(value, safe=""),
        urllib.parse.quote_plus(value, safe=""),
    ):
        forms.add(quoted.encode("ascii"))
    text = value.decode("utf-8", "surrogateescape")
    for ensure_ascii in (True, False):
        escaped = json.dumps(text, ensure_ascii=ensure_ascii)[1:-1]
        forms.add(escaped.encode("utf-8", "surrogateescape"))
    return forms


def _utf16_forms(value: bytes) -> set[bytes]:
    """UTF-16 (little and big endian, no byte order mark) forms of ``value``.

    A value that is UTF-8 is re-encoded as the text it is; every value is also widened
    byte for byte (each byte taken as the code point of the same number, as ``latin-1``
    decodes it), which is what becomes of bytes that are not UTF-8, or not read as such,
    on their way into a UTF-16 string. For ASCII both are the same.

    A zero byte at either end (half of a first or last character below U+0100) is left
    out. That half tells nothing, and with it the big-endian form of such text would match
    its little-endian copy shifted by a byte, running into half of the character before:
    as it is, the characters around a ``***`` are left whole (for an ASCII value, with the
    rest of the output still aligned on two bytes).
    """
    texts = {value.decode("latin-1")}
    with contextlib.suppress(UnicodeDecodeError):
        texts.add(value.decode("utf-8"))
    forms = set()
    for text in texts:
        for codec in ("utf-16-le", "utf-16-be"):
            form = text.encode(codec)
            if form:
                forms.add(form[form[0] == 0 : len(form) - (form[-1] == 0)])
    return forms


def _base64_forms(value: bytes) -> set[bytes]:
    """Base64 forms of ``value`` that do not depend on the bytes around it.

    A value that starts ``k`` bytes into a 3-byte group shares its first ``ceil(8k/6)``
    characters with the bytes before it, and its last character with the bytes after it
    unless the stream ends there (then that character is padded with zero bits).
    """
    forms: set[bytes] = set()
    for k in range(3):
        first = -(-8 * k // 6)
        stable_end = 8 * (k + len(value)) // 6
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            encoded = encode(b"\0" * k + value)
            for form in (
                encoded[first:stable_end],
                encoded[first:],
                encoded[first:].rstrip(b"="),
            ):
                if len(form) >= MIN_SECRET_LENGTH:
                    forms.add(form)
    return forms


class Secret:
    """A named secret value that never shows itself in a repr, str or error message.

    Args:
        name: how the secret is referred to in messages, events and leak reports.
        value: the secret bytes; only :meth:`reveal` returns them.

    Raises:
        ConfigError: ``value`` is shorter than :data:`MIN_SECRET_LENGTH` bytes.
    """

    __slots__ = ("_value", "name")

    def __init__(self, name: str, value: bytes) -> None:
        if len(value) < MIN_SECRET_LENGTH:
            raise ConfigError(
                f"secret {name!r} is shorter than {MIN_SECRET_LENGTH} bytes: "
                "it cannot be redacted without destroying output",
                hint=f"use a value of at least {MIN_SECRET_LENGTH} bytes",
            )
        self.name = name
        self._value = bytes(value)

    def reveal(self) -> bytes:
        """The secret value, for the one place that injects it or redacts it."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret(name={self.name!r})"

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class _Sampling:
    """Which blocks of a buffer to look up so that no pattern can slip between them.

    Blocks of ``gram`` bytes are read at ``offset + k * period`` for each offset: every
    pass reads every ``step``-th block of a view cast to machine integers.
    """

    gram: int  # 4 or 8
    step: int
    offsets: tuple[int, ...]
    gap: int  # the largest distance between consecutive sampled positions
    cost: float  # estimated nanoseconds per byte of input

    @property
    def period(self) -> int:
        return self.gram * self.step

    @classmethod
    def for_min_length(cls, shortest: int, grams: Iterable[int] = (8, 4)) -> _Sampling | None:
        """The cheapest sampling that still catches every pattern of ``shortest`` bytes."""
        options = []
        for gram in grams:
            if gram > shortest:
                continue
            # A pattern holds a whole block that starts within its first max_gap bytes.
            max_gap = shortest - gram + 1
            # With a given number of passes, the longest period is the cheapest.
            for most_passes in range(1, _MAX_PASSES + 1):
                step = most_passes * max_gap // gram
                if step < 1:
                    continue
                period = gram * step
                passes = -(-period // max_gap)
                offsets = tuple(i * period // passes for i in range(passes))
                gap = max(b - a for a, b in zip(offsets, (*offsets[1:], period), strict=True))
                cost = _NS_PER_SAMPLE * passes / period
                if gram < 8:
                    cost *= _SHORT_GRAM_PENALTY
                options.append(cls(gram, step, offsets, gap, cost))
        return min(options, key=lambda s: (s.cost, len(s.offsets)), default=None)


class _Sampler:
    """Finds patterns by looking up sampled blocks of the buffer in a set."""

    def __init__(self, sampling: _Sampling, patterns: Iterable[bytes]) -> None:
        self.sampling = sampling
        entries: defaultdict[int, list[tuple[bytes, int]]] = defaultdict(list)
        # Native byte order, as the cast of the buffer reads its blocks.
        block_at = struct.Struct("=Q" if sampling.gram == 8 else "=I").unpack_from
        offsets = range(sampling.gap)
        for pattern in patterns:
            for offset in offsets:
                entries[block_at(pattern, offset)[0]].append((pattern, offset))
        self._entries = {key: tuple(hits) for key, hits in entries.items()}
        self._blocks = frozenset(self._entries)
        self._format: Literal["I", "Q"] = "Q" if sampling.gram == 8 else "I"

    def search(self, buf: bytes, found: set[tuple[int, bytes]]) -> tuple[int, int]:
        """Add ``(start, pattern)`` for every occurrence in ``buf`` to ``found``.

        Returns:
            How many blocks were sampled, and how many of them had to be compared.
        """
        view = memoryview(buf)
        sampling = self.sampling
        gram, period = sampling.gram, sampling.period
        sampled = compared = 0
        for offset in sampling.offsets:
            count = (len(buf) - offset) // gram
            if count <= 0:
                continue
            blocks = view[offset : offset + count * gram].cast(self._format)
            if sampling.step > 1:
                blocks = blocks[:: sampling.step]
            sampled += len(blocks)
            hits = self._blocks.intersection(blocks)
            if not hits:
                continue  # the common case: one C loop over the samples, nothing found
            for index in self._locate(blocks, hits):
                compared += 1
                block_start = offset + index * period
                for pattern, shift in self._entries[blocks[index]]:
                    start = block_start - shift
                    if start >= 0 and buf.startswith(pattern, start):
                        found.add((start, pattern))
        return sampled, compared

    def _locate(self, blocks: memoryview[int], hits: frozenset[int]) -> Iterable[int]:
        """Indices of the samples in ``blocks`` whose value is one of ``hits``."""
        if len(hits) > _LOCATE_BY_FIND:
            # One more pass over the samples beats a search for each of many hits.
            return compress(count(), map(hits.__contains__, blocks))
        gram = self.sampling.gram
        sampled = blocks.tobytes()
        indices = []
        for key in hits:
            block = key.to_bytes(gram, sys.byteorder)
            at = sampled.find(block)
            while at >= 0:
                if at % gram == 0:
                    indices.append(at // gram)
                at = sampled.find(block, at + 1)
        return indices


class _Plan:
    """Finds a set of patterns: the shortest with ``bytes.find``, the rest by sampling.

    Only patterns that do not start with another pattern are searched for; the others
    (the padded ends of base64 forms, mostly) are checked where their prefix occurs.
    """

    def __init__(self, patterns: Iterable[bytes]) -> None:
        roots: list[bytes] = []
        by_head: dict[bytes, list[bytes]] = {}
        extensions: dict[bytes, list[bytes]] = {}
        for pattern in sorted(patterns, key=len):
            siblings = by_head.setdefault(pattern[:_HEAD], [])
            root = next((r for r in siblings if pattern.startswith(r)), None)
            if root is None:
                roots.append(pattern)
                siblings.append(pattern)
            else:
                extensions.setdefault(root, []).append(pattern)
        self._extensions = {root: tuple(longer) for root, longer in extensions.items()}

        short, sampling = _plan(roots)
        self._short = tuple(short)
        sampled = roots[len(short) :]
        self._sampler = _Sampler(sampling, sampled) if sampling is not None else None
        # 4-byte blocks of hex-heavy output often hit the blocks of hex forms; when they
        # keep doing so, 8-byte blocks (more of them, but no false hits) are cheaper.
        # Built the first time it is needed: most output never is hex-heavy.
        self._fallback: _Sampler | None = None
        self._fallback_plan: tuple[_Sampling, Sequence[bytes]] | None = None
        self._fallback_left = 0
        if sampling is not None and sampling.gram < 8:
            wide = _Sampling.for_min_length(len(sampled[0]), grams=(8,))
            self._fallback_plan = (wide, sampled) if wide is not None else None

    def search(self, buf: bytes, found: set[tuple[int, bytes]]) -> None:
        """Add ``(start, pattern)`` for every occurrence in ``buf`` to ``found``."""
        roots: set[tuple[int, bytes]] = set()
        for pattern in self._short:
            at = buf.find(pattern)
            while at >= 0:
                roots.add((at, pattern))
                at = buf.find(pattern, at + 1)
        if self._fallback_left > 0:
            self._fallback_left -= 1
            if self._fallback is None:
                assert self._fallback_plan is not None
                self._fallback = _Sampler(*self._fallback_plan)
            self._fallback.search(buf, roots)
        elif self._sampler is not None:
            sampled, compared = self._sampler.search(buf, roots)
            if self._fallback_plan is not None and compared * _FALSE_HIT_RATIO > sampled:
                self._fallback_left = _FALLBACK_CALLS
        found |= roots
        for start, root in roots:
            for pattern in self._extensions.get(root, ()):
                if buf.startswith(pattern, start):
                    found.add((start, pattern))


class _Anchors:
    """Finds patterns that contain a byte that text hardly ever does, by that byte.

    Binary secrets have raw forms and lines short enough to force dense sampling, and the
    UTF-16 forms of text have a zero byte in every other place, but text output hardly
    ever contains such anchor bytes. A few anchor bytes (a zero byte for the UTF-16 forms
    of every ASCII secret) are each ruled out by one ``memchr``; many, by one pass of
    ``bytes.translate``. Output full of them is searched the other way.
    """

    def __init__(self, anchored: Mapping[bytes, int]) -> None:
        entries: dict[int, list[tuple[bytes, int]]] = {}
        for pattern, offset in anchored.items():
            entries.setdefault(pattern[offset], []).append((pattern, offset))
        self._entries = {byte: tuple(hits) for byte, hits in entries.items()}
        self._others = bytes(b for b in range(256) if b not in self._entries)
        self._few = tuple(sorted(self._entries)) if len(self._entries) <= _FEW_ANCHORS else None

    def search(self, buf: bytes, found: set[tuple[int, bytes]]) -> bool:
        """Add occurrences in ``buf`` to ``found``, unless anchor bytes are too common.

        Returns:
            False, having added nothing, if more than one byte in :data:`_ANCHOR_DENSITY`
            of ``buf`` is an anchor byte.
        """
        budget = len(buf) // _ANCHOR_DENSITY
        if self._few is not None:
            present: Iterable[int] = [byte for byte in self._few if byte in buf]
            if present:
                # Binary output usually shows it from the start: count there first.
                head = min(len(buf), _ANCHOR_SAMPLE)
                if sum(buf.count(byte, 0, head) for byte in present) > head // _ANCHOR_DENSITY:
                    return False
                if sum(map(buf.count, present)) > budget:
                    return False
        else:
            anchors = buf.translate(None, self._others)
            if len(anchors) > budget:
                return False
            present = set(anchors)
        for byte in present:
            candidates = self._entries[byte]
            at = buf.find(byte)
            while at >= 0:
                for pattern, offset in candidates:
                    start = at - offset
                    if start >= 0 and buf.startswith(pattern, start):
                        found.add((start, pattern))
                at = buf.find(byte, at + 1)
        return True

    @staticmethod
    def choose(pattern: bytes) -> int | None:
        """Where the rarest byte of ``pattern`` is, if it has one rare enough to anchor."""
        ranks = pattern.translate(_RARITY)
        rank = min(ranks)
        return ranks.index(rank) if rank < _NOT_AN_ANCHOR else None


def _rarity(byte: int) -> int:
    """How common ``byte`` is in build output: 0 for never (in text), 3 for all the time."""
    if byte in b"\t\n\v\f\r\x1b" or 0x20 <= byte < 0x7F:
        return _NOT_AN_ANCHOR
    if 0x80 <= byte < 0xC0:
        return 2  # UTF-8 continuation bytes
    if 0xC2 <= byte < 0xF5:
        return 1  # UTF-8 lead bytes
    return 0  # control characters, bytes that never occur in UTF-8


_NOT_AN_ANCHOR = 3
_RARITY = bytes(_rarity(b) for b in range(256))


class _Pairs:
    """The two-byte strings in patterns, and tables (for :meth:`bytes.translate`) that map
    each byte to 1 if it is the first, or the second, byte of one of them and to 0 if not."""

    __slots__ = ("ends", "pairs", "starts")

    def __init__(self, patterns: Iterable[bytes]) -> None:
        self.pairs = frozenset(p[i : i + 2] for p in patterns for i in range(len(p) - 1))
        firsts = {pair[0] for pair in self.pairs}
        seconds = {pair[1] for pair in self.pairs}
        self.starts = bytes(b in firsts for b in range(256))
        self.ends = bytes(b in seconds for b in range(256))


class _Index:
    """All patterns of a set of secrets, found together in one pass over a buffer."""

    def __init__(self, secrets: Iterable[Secret]) -> None:
        names: dict[bytes, set[str]] = {}
        for secret in secrets:
            for form in encodings(secret.reveal()):
                names.setdefault(form, set()).add(secret.name)
        self.names: Mapping[bytes, frozenset[str]] = {p: frozenset(n) for p, n in names.items()}
        patterns = sorted(self.names, key=len)
        self.max_len = len(patterns[-1]) if patterns else 0

        self._patterns = patterns
        anchored = {}
        for pattern in patterns:
            at = _Anchors.choose(pattern)
            if at is not None:
                anchored[pattern] = at
        self._anchors = _Anchors(anchored) if anchored else None
        # Only one of the two plans is needed for text output, the other for binary output
        # (or both for a stream of each): each is built when first needed.
        self._anchored = frozenset(anchored)

        heads: dict[int, list[bytes]] = {}
        for pattern in reversed(patterns):
            heads.setdefault(int.from_bytes(pattern[:_HEAD], sys.byteorder), []).append(pattern)
        self._heads = {head: tuple(longest_first) for head, longest_first in heads.items()}
        self._head_keys = frozenset(self._heads)
        self._short_prefixes = frozenset(p[:i] for p in patterns for i in range(1, _HEAD))

    @functools.cached_property
    def _everything(self) -> _Plan:
        """Finds every pattern."""
        return _Plan(self._patterns)

    @functools.cached_property
    def _unanchored(self) -> _Plan:
        """Finds the patterns that have no anchor byte."""
        if not self._anchored:
            return self._everything
        return _Plan([p for p in self._patterns if p not in self._anchored])

    @functools.cached_property
    def _pairs(self) -> _Pairs:
        """The two-byte strings in patterns (needed only for output with escape sequences)."""
        return _Pairs(self._patterns)

    def __bool__(self) -> bool:
        return self.max_len > 0

    def occurrences(self, buf: bytes) -> set[tuple[int, bytes]]:
        """``(start, pattern)`` for every occurrence of every pattern inside ``buf``."""
        found: set[tuple[int, bytes]] = set()
        if self._anchors is not None and self._anchors.search(buf, found):
            self._unanchored.search(buf, found)
            return found
        # Binary output is full of anchor bytes: search for everything the other way.
        self._everything.search(buf, found)
        return found

    def search(
        self, buf: bytes, *, final: bool, text_end: int | None = None
    ) -> tuple[int, list[tuple[int, int, bytes]]]:
        """Every occurrence in ``buf`` as it is and as a terminal shows it, and where to cut.

        Args:
            buf: the output, or the start of what is left of it.
            final: nothing follows ``buf``: an escape sequence it leaves incomplete is
                text, and all of it may be emitted.
            text_end: where in ``buf`` the output stops being text (see :class:`_Stream`):
                only before it are escape sequences seen through.

        Returns:
            Where ``buf`` may be cut: every occurrence that starts before that point lies
            wholly inside ``buf`` (and is found again the same, however the rest of the
            stream goes), and the point is not inside an escape sequence. Then the
            occurrences, as ``(start, end, pattern)`` sorted by position.
        """
        cut = len(buf) if final else self.safe_end(buf)
        found = [(start, start + len(p), p) for start, p in self.occurrences(buf)]
        shown_to = len(buf) if text_end is None else min(text_end, len(buf))
        if shown_to > 0 and buf.find(_ESC, 0, shown_to) >= 0:
            # Where the text as shown ends: at the end of the text, for good, or where an
            # incomplete sequence that the next chunk may complete starts.
            closed = final or shown_to < len(buf)
            end = shown_to if closed else _pending(buf)
            found = [
                _outside_sequences(buf, occurrence, end) if occurrence[0] < end else occurrence
                for occurrence in found
            ]
            cut = self._search_shown(buf, end, cut, final=final, closed=closed, found=found)
        found.sort()
        return cut, found

    def _search_shown(
        self,
        buf: bytes,
        end: int,
        cut: int,
        *,
        final: bool,
        closed: bool,
        found: list[tuple[int, int, bytes]],
    ) -> int:
        """Add the occurrences that only the text as shown holds; return the cut for both.

        An occurrence in the shown text counts when it spans escape sequences (others are
        found as they are) and covers at most :data:`_SPREAD` times its length of ``buf``.
        Such an occurrence holds the two bytes on either side of a seam (where sequences
        were taken out) as two bytes that follow each other in a pattern: only if some
        seam has such bytes is the shown text searched, and only around those seams where
        that is less.
        """
        pairs = self._pairs
        few = None if _dense(buf, 0, end) else _few_seams_between(buf, end, pairs.pairs)
        shown = None if few is not None else _Shown(buf, 0, end, dense=True)
        if few or (shown is not None and shown.any_seam_between(pairs)):
            shown = shown or _Shown(buf, 0, end)
            text = shown.text
            hot = [g for g in shown.seams() if text[g - 1 : g + 1] in pairs.pairs]
            windows = _windows(hot, self.max_len - 1, len(text))
            occurrences: set[tuple[int, bytes]] = set()
            if sum(high - low + _WINDOW_COST for low, high in windows) < len(text):
                for low, high in windows:
                    occurrences.update(
                        (low + at, pattern) for at, pattern in self.occurrences(text[low:high])
                    )
            else:
                occurrences = self.occurrences(text)
            for start, pattern in occurrences:
                first = shown.where(start)
                last = shown.where(start + len(pattern) - 1) + 1
                if len(pattern) < last - first <= _SPREAD * len(pattern):
                    found.append((first, last, pattern))
        if final:
            return cut
        if cut < end:
            holding = _sequence_holding(buf, cut, end)
            if holding is not None:
                cut = holding[0]
        if closed:
            return cut
        return min(cut, end, self._shown_safe_end(buf, end))

    def _shown_safe_end(self, buf: bytes, end: int) -> int:
        """Where in ``buf`` the shown text of ``buf[:end]`` that could still begin a pattern
        starts (``end`` if none does), leaving out any already spread over so much of
        ``buf`` that it could not count.

        That text is at most the last ``max_len - 1`` bytes shown, and lies after
        ``reach``: it is looked for near the end first, and from ``reach`` on only if
        sequences are dense there.
        """
        reach = end - _SPREAD * self.max_len
        shown = _Shown.near_end(buf, end - 4 * self.max_len, end)
        if shown.start > 0 and len(shown.text) < self.max_len:
            shown = _Shown.near_end(buf, reach, end)
        text = shown.text
        tail = self.safe_end(text)
        if tail < len(text) and shown.where(tail) <= reach:
            after = shown.index_after(reach + 1)
            tail = after + self.safe_end(text[after:])
        return shown.where(tail) if tail < len(text) else end

    def safe_end(self, buf: bytes) -> int:
        """Where the longest suffix of ``buf`` that could still begin a pattern starts.

        Every occurrence that starts before this point lies wholly inside ``buf``.
        """
        end = len(buf)
        window = min(self.max_len - 1, end)
        tail = buf[end - window :]
        view = memoryview(tail)
        starts: set[int] = set()
        for offset in range(_HEAD):
            count = (window - offset) // _HEAD
            if count <= 0:
                continue
            heads = view[offset : offset + count * _HEAD].cast("I")
            for key in self._head_keys.intersection(heads):
                head = key.to_bytes(_HEAD, sys.byteorder)
                at = tail.find(head)
                while at >= 0:
                    starts.add(at)
                    at = tail.find(head, at + 1)
        for at in sorted(starts):
            length = window - at
            rest = tail[at:]
            for pattern in self._heads[int.from_bytes(rest[:_HEAD], sys.byteorder)]:
                if len(pattern) <= length:
                    break
                if pattern.startswith(rest):
                    return end - length
        for length in range(min(_HEAD - 1, window), 0, -1):
            if tail[window - length :] in self._short_prefixes:
                return end - length
        return end


def _escape_sequence(payload: int, intermediates: int) -> bytes:
    """A regular expression for one escape sequence, as ECMA-48 lays them out."""
    return (
        rb"\x1b(?:"
        # CSI (colours, cursor movement): ESC [, parameters, intermediates, a final byte.
        rb"\[[\x30-\x3f]{0,%d}+[\x20-\x2f]{0,%d}+[\x40-\x7e]"
        # OSC (titles, hyperlinks), DCS, SOS, PM, APC: a string ended by BEL or ESC \.
        rb"|[\]PX^_][^\x07\x1b]{0,%d}+(?:\x07|\x1b\\)"
        # Character sets and the like (ESC ( B): intermediates and a final byte.
        rb"|[\x20-\x2f]{1,%d}+[\x30-\x7e]"
        # The rest of the two-byte sequences (ESC 7, ESC M, ESC \).
        rb"|[\x30-\x4f\x51-\x57\x59\x5a\x5c\x60-\x7e]"
        rb")"
    ) % (payload, intermediates, payload, intermediates)


# What follows ESC in a string sequence: OSC, DCS, SOS, PM, APC.
_STRINGS = frozenset(b"]PX^_")
_HIDDEN = re.compile(_escape_sequence(_ESCAPE_PAYLOAD, _ESCAPE_INTERMEDIATES))
# Split with the sequences kept: text, sequence, text, ..., text.
_SEQUENCES = re.compile(b"(" + _HIDDEN.pattern + b")")
# No sequence is longer.
_LONGEST_ESCAPE = 3 + _ESCAPE_PAYLOAD + _ESCAPE_INTERMEDIATES
# The start of a sequence that reaches the end of the buffer: the next bytes may end it.
_INCOMPLETE = re.compile(
    (
        rb"\x1b(?:\[[\x30-\x3f]{0,%d}+[\x20-\x2f]{0,%d}+"
        rb"|[\]PX^_][^\x07\x1b]{0,%d}+\x1b?"
        rb"|[\x20-\x2f]{0,%d}+)\Z"
    )
    % (_ESCAPE_PAYLOAD, _ESCAPE_INTERMEDIATES, _ESCAPE_PAYLOAD, _ESCAPE_INTERMEDIATES)
)


class _Stream:
    """How far a scanned stream has got, and where it stops being text.

    A zero byte among the first :data:`_TEXT_PROBE` bytes makes the stream binary from
    there on, as git and diff tell binary files from text. In a binary file (an object
    file, an archive, an image) the ESC bytes start escape sequences only by chance, and
    seeing through them would only slow the scan down. A zero byte further on leaves the
    stream text. (What a cell prints is always searched as a terminal shows it: the
    terminal ignores zero bytes.)
    """

    __slots__ = ("binary", "seen")

    def __init__(self) -> None:
        self.seen = 0  # bytes of the stream before the buffer being searched
        self.binary: int | None = None  # where in the stream it is binary from

    def text_end(self, buf: bytes) -> int | None:
        """Where in ``buf`` (which starts :attr:`seen` bytes into the stream) the text
        ends; ``None`` if it does not."""
        if self.binary is None and self.seen < _TEXT_PROBE:
            at = buf.find(0, 0, _TEXT_PROBE - self.seen)
            if at >= 0:
                self.binary = self.seen + at
        return None if self.binary is None else max(0, self.binary - self.seen)


def _pending(buf: bytes) -> int:
    """Where an escape sequence that is still incomplete at the end of ``buf`` starts;
    ``len(buf)`` if there is none.

    No sequence holds an ESC but the one that ends a string, so only the last ESC, or
    the one before it when the last is the final byte, can start one.
    """
    last = buf.rfind(_ESC)
    if last == len(buf) - 1:
        before = buf.rfind(_ESC, 0, last)
        return before if before >= 0 and _INCOMPLETE.match(buf, before) else last
    return last if last >= 0 and _INCOMPLETE.match(buf, last) else len(buf)


class _Shown:
    """``buf[start:end]`` as a terminal shows it, and where each shown byte lies in ``buf``.

    What is shown is the text between escape sequences; an ESC that starts no complete
    sequence is shown as text. ``start`` must not lie inside a sequence.
    """

    __slots__ = ("_pieces", "_positions", "end", "start", "text")

    def __init__(self, buf: bytes, start: int, end: int, *, dense: bool = False) -> None:
        if dense or _dense(buf, start, end):
            self._pieces = _SEQUENCES.split(buf[start:end] if start or end < len(buf) else buf)
        else:
            self._pieces = _split(buf, start, end)
        self.start, self.end = start, end
        self.text = b"".join(self._pieces[::2])
        self._positions: tuple[list[int], list[int]] | None = None

    @classmethod
    def near_end(cls, buf: bytes, limit: int, end: int) -> _Shown:
        """From the last ESC at or before ``limit`` on: it starts a sequence, is shown, or
        ends a string (and then ESC \\ is a sequence of its own), so what comes after it
        is shown as it is in all of ``buf``."""
        start = max(0, buf.rfind(_ESC, 0, limit + 1)) if limit > 0 else 0
        return cls(buf, start, end)

    def any_seam_between(self, pairs: _Pairs) -> bool:
        """Whether the bytes on either side of any run of sequences make one of ``pairs``."""
        shown = list(filter(None, self._pieces[::2]))
        lasts = bytes(map(itemgetter(-1), shown[:-1]))
        firsts = bytes(map(itemgetter(0), shown[1:]))
        # First byte by byte, all at once: big integers with a 1 where a byte may start (or
        # end) a pair, ANDed. Then each seam that passes.
        maybe = int.from_bytes(lasts.translate(pairs.starts), "big") & int.from_bytes(
            firsts.translate(pairs.ends), "big"
        )
        if not maybe:
            return False
        marks = maybe.to_bytes(len(lasts), "big")
        at = marks.find(1)
        while at >= 0:
            if lasts[at : at + 1] + firsts[at : at + 1] in pairs.pairs:
                return True
            at = marks.find(1, at + 1)
        return False

    def seams(self) -> Iterable[int]:
        """The indices into ``text`` where sequences were taken out (before each byte)."""
        return accumulate(map(len, self._pieces[:-1:2]))

    def _map(self) -> tuple[list[int], list[int]]:
        """Where each piece starts in ``buf``, and each piece of text in ``text``."""
        if self._positions is None:
            lengths = list(map(len, self._pieces))
            self._positions = (
                list(accumulate(lengths, initial=self.start)),
                list(accumulate(lengths[::2], initial=0)),
            )
        return self._positions

    def where(self, index: int) -> int:
        """Where in ``buf`` the byte ``text[index]`` is."""
        at, text_at = self._map()
        piece = bisect_right(text_at, index) - 1
        return at[2 * piece] + index - text_at[piece]

    def index_after(self, pos: int) -> int:
        """The index into ``text`` of the first byte shown from ``buf[pos:]``."""
        at, text_at = self._map()
        if pos <= self.start:
            return 0
        if pos >= self.end:
            return len(self.text)
        piece = bisect_right(at, pos) - 1
        if piece % 2:
            return text_at[(piece + 1) // 2]
        return text_at[piece // 2] + pos - at[piece]


def _dense(buf: bytes, start: int, end: int) -> bool:
    """Whether the first ESC bytes of ``buf[start:end]`` are too close together for each to
    be looked at (more than one in :data:`_ESCAPES_BY_FIND` bytes)."""
    at = buf.find(_ESC, start, end)
    first = at
    for _ in range(_DENSITY_SAMPLE):
        if at < 0:
            return False
        at = buf.find(_ESC, at + 1, end)
    return at >= 0 and at - first < _DENSITY_SAMPLE * _ESCAPES_BY_FIND


def _split(buf: bytes, start: int, end: int) -> list[bytes]:
    """``buf[start:end]`` as text, sequence, text, ..., text.

    Few ESC bytes are found with memchr and each looked at; many, by one pass of the
    regular expression (which examines every byte, but matches quicker).
    """
    pieces: list[bytes] = []
    budget = max(8, (end - start) // _ESCAPES_BY_FIND)
    text = start
    at = buf.find(_ESC, start, end)
    while at >= 0:
        budget -= 1
        if budget < 0:
            return _SEQUENCES.split(buf[start:end] if start or end < len(buf) else buf)
        match = _HIDDEN.match(buf, at, end)
        if match is None:
            at = buf.find(_ESC, at + 1, end)
            continue
        pieces += (buf[text:at], match.group())
        text = match.end()
        at = buf.find(_ESC, text, end)
    pieces.append(buf[text:end])
    return pieces


def _few_seams_between(buf: bytes, end: int, pairs: frozenset[bytes]) -> bool | None:
    """Whether the bytes on either side of any run of escape sequences in ``buf[:end]``
    make one of ``pairs``; ``None`` if there are too many sequences to look one by one."""
    budget = max(8, end // _ESCAPES_BY_FIND)
    at = buf.find(_ESC, 0, end)
    while at >= 0:
        run_end = at
        while (match := _HIDDEN.match(buf, run_end, end)) is not None:
            budget -= 1
            run_end = match.end()
        if budget < 0:
            return None
        if run_end == at:  # an ESC shown as text
            at = buf.find(_ESC, at + 1, end)
            continue
        if at > 0 and run_end < end and buf[at - 1 : at] + buf[run_end : run_end + 1] in pairs:
            return True
        at = buf.find(_ESC, run_end, end)
    return False


def _windows(seams: Iterable[int], reach: int, size: int) -> list[tuple[int, int]]:
    """The ranges of ``range(size)`` within ``reach`` of a seam (sorted), merged."""
    windows: list[tuple[int, int]] = []
    for seam in seams:
        low, high = max(0, seam - reach), min(size, seam + reach)
        if windows and low <= windows[-1][1]:
            windows[-1] = (windows[-1][0], high)
        else:
            windows.append((low, high))
    return windows


def _outside_sequences(
    buf: bytes, occurrence: tuple[int, int, bytes], end: int
) -> tuple[int, int, bytes]:
    """``occurrence``, widened to the whole escape sequence it starts inside, if any.

    Its ``***`` then never lands inside a sequence, where it would make a terminal swallow
    what follows. A string (a title, a hyperlink) is the exception: it may hold ``*``, so
    what it holds is redacted in place.
    """
    start, stop, pattern = occurrence
    holding = _sequence_holding(buf, start, end)
    if holding is None or buf[holding[0] + 1] in _STRINGS:
        return occurrence
    return holding[0], max(stop, holding[1]), pattern


def _sequence_holding(buf: bytes, pos: int, end: int) -> tuple[int, int] | None:
    """The escape sequence of ``buf[:end]`` that ``pos`` lies inside (not at its start)."""
    esc = buf.rfind(_ESC, max(0, pos - _LONGEST_ESCAPE), pos)
    if esc < 0:
        return None
    if buf.startswith(b"\\", esc + 1):
        # This ESC may end a string that starts at the one before it.
        string = buf.rfind(_ESC, max(0, esc - _LONGEST_ESCAPE), esc)
        match = _HIDDEN.match(buf, string, end) if string >= 0 else None
        if match is not None and match.end() > esc:
            return (string, match.end()) if match.end() > pos else None
    match = _HIDDEN.match(buf, esc, end)
    return (esc, match.end()) if match is not None and match.end() > pos else None


def _plan(patterns: Sequence[bytes]) -> tuple[Sequence[bytes], _Sampling | None]:
    """Split ``patterns`` (sorted by length) into those found with ``bytes.find`` and the
    rest, found by sampling, so that the estimated cost per byte is least."""
    finding = list(accumulate((_NS_FIND / (len(p) + 1) for p in patterns), initial=0.0))
    best: tuple[float, int, _Sampling | None] = (finding[-1], len(patterns), None)
    for split, pattern in enumerate(patterns):
        if finding[split] >= best[0]:
            break
        if split and len(patterns[split - 1]) == len(pattern):
            continue
        sampling = _Sampling.for_min_length(len(pattern))
        if sampling is not None and finding[split] + sampling.cost < best[0]:
            best = (finding[split] + sampling.cost, split, sampling)
    return patterns[: best[1]], best[2]


def _as_bytes(chunk: _Chunk) -> bytes:
    return chunk if type(chunk) is bytes else bytes(chunk)


class Redactor:
    """Replaces every occurrence of any form of any secret with :data:`REPLACEMENT`.

    Where occurrences overlap or touch, their union becomes a single ``***``. Output that
    holds no secret passes through byte for byte. Fed in chunks, the concatenation of what
    :meth:`feed` and :meth:`flush` return equals :meth:`redact` of the whole stream, however
    the stream is split.

    Escape sequences (ECMA-48: CSI such as the SGR colour codes, OSC and the other
    strings ended by BEL or ``ESC \\``, and the two-byte and character-set sequences) are
    seen through: a form that the text between them shows is an occurrence that runs from
    its first to its last shown byte, if that is at most 64 times the form's length. The
    sequences inside it go with it, and those around it stay: the ``***`` shows in the
    colour the value started in, and a reset printed after the value still resets. (A
    sequence longer than 1024 bytes, or one an unexpected byte breaks off, is text.) An
    occurrence in the bytes as they are that starts inside a sequence takes that sequence
    with it, so that no ``***`` lands where a terminal would read it as part of one; one
    inside a string (a title, a hyperlink's address) is replaced where it is.

    Args:
        secrets: the secrets to redact; may be empty (then output passes through).
    """

    def __init__(self, secrets: Sequence[Secret]) -> None:
        self._index = _Index(secrets)
        self._start()

    def _start(self) -> None:
        """A stream's state: nothing kept back yet."""
        self._carry = b""
        # Length of the start of _carry already covered by an emitted "***" whose range
        # may still grow; None when the last range is closed.
        self._open: int | None = None

    def fresh(self) -> Redactor:
        """A redactor of the same secrets for another stream, sharing this one's index
        (which costs far more to build than a stream's state)."""
        twin = copy.copy(self)
        twin._start()
        return twin

    @property
    def max_pattern(self) -> int:
        """The length of the longest form of any secret (0 without secrets)."""
        return self._index.max_len

    def feed(self, chunk: _Chunk) -> bytes:
        """Redact the next chunk of a stream.

        Returns:
            What can be emitted now. Trailing bytes are kept back only while they could
            still be the start of a secret: at most ``max_pattern - 1`` of them, but in
            output with escape sequences the characters of a value shown among them (at
            most ``64 * max_pattern`` bytes) and an incomplete sequence at the end (at
            most about 1 KiB).
        """
        data = _as_bytes(chunk)
        if not self._index:
            return data
        buf = self._carry + data if self._carry else data
        cut, found = self._index.search(buf, final=False)
        out, self._open = self._emit(buf, cut, found, self._open)
        self._carry = buf[cut:]
        return out

    def flush(self) -> bytes:
        """Redact and return what :meth:`feed` kept back; the stream may then start over."""
        buf, opened = self._carry, self._open
        self._start()
        if not buf:
            return b""
        cut, found = self._index.search(buf, final=True)
        return self._emit(buf, cut, found, opened)[0]

    def redact(self, data: _Chunk) -> bytes:
        """Redact a whole buffer at once, independently of any stream being fed."""
        buf = _as_bytes(data)
        if not self._index:
            return buf
        cut, found = self._index.search(buf, final=True)
        return self._emit(buf, cut, found, None)[0]

    @staticmethod
    def _emit(
        buf: bytes, cut: int, found: Iterable[tuple[int, int, bytes]], opened: int | None
    ) -> tuple[bytes, int | None]:
        """Redact ``buf[:cut]``, given that ``buf[:opened]`` is already covered by ``***``.

        Occurrences (``found``, sorted) are taken in order of their start, and only those
        starting before ``cut`` (all of which lie inside ``buf``); the rest are seen again
        with the next chunk. A range still open at ``cut`` has had its ``***`` emitted
        already, so occurrences that later overlap or touch it add nothing more to the
        output.

        Returns:
            The output, and how much of ``buf[cut:]`` the still-open range covers.
        """
        pieces: list[bytes] = []
        end = opened  # end of the current range, whose "***" is already out
        pos = 0 if opened is None else opened  # where the unemitted text starts
        for start, stop, _ in found:
            if start >= cut:
                break
            if end is not None and start <= end:
                end = max(end, stop)
            else:
                pieces += (buf[pos:start], REPLACEMENT)
                end = stop
            pos = end
        if end is not None and end >= cut:
            return b"".join(pieces), end - cut
        pieces.append(buf[pos:cut])
        return b"".join(pieces), None


class Scanner:
    """Finds which secrets occur, in any of their forms, in data fed in chunks.

    Text is also searched as a terminal shows it, like :class:`Redactor` output; binary
    data (a zero byte among its first 8000 bytes) only from before that byte on, as the
    ESC bytes in binary data start escape sequences only by chance.

    Args:
        secrets: the secrets to look for.
    """

    def __init__(self, secrets: Sequence[Secret]) -> None:
        self._index = _Index(secrets)
        self._wanted = frozenset(s.name for s in secrets)
        self._start()

    def _start(self) -> None:
        self._carry = b""
        self._found: set[str] = set()
        self._stream = _Stream()

    def fresh(self) -> Scanner:
        """A scanner of the same secrets for another file or stream, sharing this one's
        index (which costs far more to build than a scan's state)."""
        twin = copy.copy(self)
        twin._start()
        return twin

    @property
    def found(self) -> set[str]:
        """Names of the secrets seen so far (taking the data fed so far as complete)."""
        found = set(self._found)
        if self._carry:
            # An escape sequence left incomplete at the end is text after all.
            text_end = copy.copy(self._stream).text_end(self._carry)
            for _, _, pattern in self._index.search(self._carry, final=True, text_end=text_end)[1]:
                found |= self._index.names[pattern]
        return found

    def feed(self, chunk: _Chunk) -> None:
        """Scan the next chunk; occurrences across chunk boundaries are found too."""
        if not self._index or self._found == self._wanted:
            return
        buf = self._carry + _as_bytes(chunk)
        cut, found = self._index.search(buf, final=False, text_end=self._stream.text_end(buf))
        for _, _, pattern in found:
            self._found |= self._index.names[pattern]
        self._carry = buf[cut:]
        self._stream.seen += cut


def scan(data: bytes | memoryview, secrets: Sequence[Secret]) -> list[str]:
    """Names of the secrets that occur in ``data`` in any form, in the order given.

    ``data`` may be a memoryview of a mapped file; it is read in slices, never copied whole.
    """
    scanner = Scanner(secrets)
    view = memoryview(data).cast("B")
    for start in range(0, len(view), _SCAN_SLICE):
        scanner.feed(view[start : start + _SCAN_SLICE])
    found = scanner.found
    return list(dict.fromkeys(s.name for s in secrets if s.name in found))
