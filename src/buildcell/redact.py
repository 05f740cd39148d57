"""Redaction of secret values from build output, and the leak check on outputs.

A secret leaks in more shapes than its raw bytes: tools base64-encode it into auth
headers, hex-dump it, percent-encode it into URLs and JSON-escape it into logs.
:func:`encodings` lists every shape we look for; :class:`Redactor` replaces each
occurrence of any of them with ``***`` in a stream of output chunks, and :class:`Scanner`
(or :func:`scan`) names the secrets whose shapes occur, to refuse outputs that carry them.

Build output is large and must not be slowed down much, so the search avoids running a
big regular-expression alternation over every byte. Every pattern at least ``m`` bytes
long contains a ``g``-byte block that starts at a multiple of a stride ``d`` (with
``d + g - 1 <= m``), so it is enough to look up the blocks at those positions, read as
machine integers through a :class:`memoryview`, in a set of the patterns' blocks. Only
where a block hits is the text compared with the patterns; patterns too short for that
to pay off are found with :meth:`bytes.find`. The work is linear in the output size.
"""

from __future__ import annotations

import base64
import copy
import json
import struct
import sys
import urllib.parse
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate, compress, count
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

# Every pattern is at least this long, so its first bytes can key a dictionary.
_HEAD = MIN_SECRET_LENGTH

# scan() reads memory in slices of this size, so that a large mapping is never copied whole.
_SCAN_SLICE = 1 << 20


def encodings(value: bytes) -> set[bytes]:
    """Every form of ``value`` that must be redacted from output.

    These are: the raw bytes; for a multi-line value each line (without ``\\r``) of at
    least :data:`MIN_SECRET_LENGTH` bytes; base64 with the standard and URL-safe alphabets,
    for the value alone (with and without ``=`` padding) and embedded in a longer encoded
    stream at each of the three byte alignments (the characters that depend only on the
    value, plus the padded and unpadded ends for a value that ends the stream); lower and
    upper case hex; percent-encoding as by :func:`urllib.parse.quote` and
    :func:`~urllib.parse.quote_plus`; and JSON string escaping with and without
    ``ensure_ascii`` (bytes that are not UTF-8 taken as by ``surrogateescape``).

    Args:
        value: the secret value.

    Returns:
        The set of byte strings to look for, each at least :data:`MIN_SECRET_LENGTH` long
        unless ``value`` itself is shorter.
    """
    value = bytes(value)
    forms = {value}
    if b"\n" in value:
        for line in value.split(b"\n"):
            line = line.strip(b"\r")  # noqa: PLW2901 - the stripped line is what is kept
            if len(line) >= MIN_SECRET_LENGTH:
                forms.add(line)
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

    Binary secrets have raw forms and lines short enough to force dense sampling, but
    text output hardly ever contains their anchor bytes: one pass of ``bytes.translate``
    rules them all out. Output full of such bytes is searched the other way.
    """

    def __init__(self, anchored: Mapping[bytes, int]) -> None:
        entries: dict[int, list[tuple[bytes, int]]] = {}
        for pattern, offset in anchored.items():
            entries.setdefault(pattern[offset], []).append((pattern, offset))
        self._entries = {byte: tuple(hits) for byte, hits in entries.items()}
        self.others = bytes(b for b in range(256) if b not in self._entries)

    def search(self, buf: bytes, present: bytes, found: set[tuple[int, bytes]]) -> None:
        """Add occurrences in ``buf``, given the anchor bytes ``present`` in it."""
        for byte in set(present):
            needle = bytes((byte,))
            candidates = self._entries[byte]
            at = buf.find(needle)
            while at >= 0:
                for pattern, offset in candidates:
                    start = at - offset
                    if start >= 0 and buf.startswith(pattern, start):
                        found.add((start, pattern))
                at = buf.find(needle, at + 1)

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

        self._everything = _Plan(patterns)
        anchored = {}
        for pattern in patterns:
            at = _Anchors.choose(pattern)
            if at is not None:
                anchored[pattern] = at
        self._anchors = _Anchors(anchored) if anchored else None
        self._unanchored = (
            _Plan([p for p in patterns if p not in anchored]) if anchored else self._everything
        )

        heads: dict[int, list[bytes]] = {}
        for pattern in reversed(patterns):
            heads.setdefault(int.from_bytes(pattern[:_HEAD], sys.byteorder), []).append(pattern)
        self._heads = {head: tuple(longest_first) for head, longest_first in heads.items()}
        self._head_keys = frozenset(self._heads)
        self._short_prefixes = frozenset(p[:i] for p in patterns for i in range(1, _HEAD))

    def __bool__(self) -> bool:
        return self.max_len > 0

    def occurrences(self, buf: bytes) -> set[tuple[int, bytes]]:
        """``(start, pattern)`` for every occurrence of every pattern inside ``buf``."""
        found: set[tuple[int, bytes]] = set()
        if self._anchors is not None:
            present = buf.translate(None, self._anchors.others)
            if len(present) * _ANCHOR_DENSITY <= len(buf):
                self._unanchored.search(buf, found)
                self._anchors.search(buf, present, found)
                return found
        # Binary output is full of anchor bytes: search for everything the other way.
        self._everything.search(buf, found)
        return found

    def ranges(self, buf: bytes) -> list[tuple[int, int]]:
        """``(start, end)`` of every occurrence of every pattern in ``buf``, sorted."""
        return sorted((start, start + len(p)) for start, p in self.occurrences(buf))

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
            What can be emitted now. At most ``max_pattern - 1`` trailing bytes are kept
            back, and only while they could still be the start of a secret.
        """
        data = _as_bytes(chunk)
        if not self._index:
            return data
        buf = self._carry + data if self._carry else data
        cut = self._index.safe_end(buf)
        out, self._open = self._emit(buf, cut, self._open)
        self._carry = buf[cut:]
        return out

    def flush(self) -> bytes:
        """Redact and return what :meth:`feed` kept back; the stream may then start over."""
        buf, opened = self._carry, self._open
        self._start()
        return self._emit(buf, len(buf), opened)[0]

    def redact(self, data: _Chunk) -> bytes:
        """Redact a whole buffer at once, independently of any stream being fed."""
        buf = _as_bytes(data)
        if not self._index:
            return buf
        return self._emit(buf, len(buf), None)[0]

    def _emit(self, buf: bytes, cut: int, opened: int | None) -> tuple[bytes, int | None]:
        """Redact ``buf[:cut]``, given that ``buf[:opened]`` is already covered by ``***``.

        Occurrences are taken in order of their start, and only those starting before
        ``cut`` (all of which lie inside ``buf``); the rest are seen again with the next
        chunk. A range still open at ``cut`` has had its ``***`` emitted already, so
        occurrences that later overlap or touch it add nothing more to the output.

        Returns:
            The output, and how much of ``buf[cut:]`` the still-open range covers.
        """
        pieces: list[bytes] = []
        end = opened  # end of the current range, whose "***" is already out
        pos = 0 if opened is None else opened  # where the unemitted text starts
        for start, stop in self._index.ranges(buf):
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

    Args:
        secrets: the secrets to look for.
    """

    def __init__(self, secrets: Sequence[Secret]) -> None:
        self._index = _Index(secrets)
        self._wanted = frozenset(s.name for s in secrets)
        self._carry = b""
        self._found: set[str] = set()

    @property
    def found(self) -> set[str]:
        """Names of the secrets seen so far."""
        return set(self._found)

    def feed(self, chunk: _Chunk) -> None:
        """Scan the next chunk; occurrences across chunk boundaries are found too."""
        if not self._index or self._found == self._wanted:
            return
        buf = self._carry + _as_bytes(chunk)
        for _, pattern in self._index.occurrences(buf):
            self._found |= self._index.names[pattern]
        keep = self._index.max_len - 1
        self._carry = buf[len(buf) - keep :] if len(buf) > keep else buf


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
