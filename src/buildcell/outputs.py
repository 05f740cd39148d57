"""Collection of build outputs from a workspace that an untrusted command has written.

After the cell ran, everything under its workspace may be hostile: symlinks to host files,
symlinked directories, fifos, sockets, names with newlines or invalid UTF-8, and a process
that keeps swapping entries while we look. Collection therefore never resolves a path: it
walks with directory file descriptors, opens each entry relative to its parent with
``O_NOFOLLOW``, and decides what an entry is from ``fstat`` of the descriptor it holds,
so what is checked is what is read.

Output patterns are glob patterns relative to the workspace:

* ``*`` matches any run of characters, ``?`` one character, ``[...]`` one character of a
  set (``[!...]`` negates it, ``a-z`` is a range); they match within one path segment and
  never match ``/``. They also match names that begin with ``.``.
* ``**`` as a whole segment matches zero or more segments: ``**/*.whl`` finds wheels at
  any depth, ``dist/**`` everything below ``dist``. Elsewhere (``a**b``) it is the same as
  ``*``.
* A pattern that names a directory collects nothing from it: use ``dist/**`` or
  ``dist/*``. Directories themselves are never outputs.
* A leading ``./`` is allowed; there is no escaping, a backslash is an ordinary character.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import stat
from collections.abc import Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from buildcell._fs import file_kind
from buildcell.errors import ConfigError, OutputError

__all__ = [
    "CollectedOutput",
    "OutputReport",
    "SkippedOutput",
    "collect_outputs",
    "match_pattern",
    "validate_patterns",
]

logger = logging.getLogger(__name__)

# Limits on what a hostile workspace can make us walk; both end collection with an error.
_MAX_DEPTH = 256
_MAX_ENTRIES = 1_000_000
_CHUNK = 1 << 20

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a fifo swapped in after the type check opens at once instead of waiting for
# a writer; O_NOCTTY: a terminal can never become our controlling tty.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class CollectedOutput:
    """A regular file copied from the workspace into the output directory.

    Attributes:
        path: posix path relative to the workspace (and to the output directory); names
            that are not UTF-8 are kept as :func:`os.fsdecode` gives them.
        size: bytes copied.
        sha256: hex digest of exactly the bytes copied.
        executable: whether the copy is mode 0755 rather than 0644.
    """

    path: str
    size: int
    sha256: str
    executable: bool


@dataclass(frozen=True)
class SkippedOutput:
    """An entry that matched a pattern but was not copied, and why."""

    path: str
    reason: str


@dataclass(frozen=True)
class OutputReport:
    """The result of :func:`collect_outputs`, each part sorted by path.

    ``unmatched`` lists the patterns (as given) that matched no file, symlink or special
    file; a pattern that only named directories is unmatched.
    """

    collected: tuple[CollectedOutput, ...]
    skipped: tuple[SkippedOutput, ...]
    unmatched: tuple[str, ...]


# --- patterns (pure) -------------------------------------------------------------------

# A compiled segment: a literal name, a regular expression, or None for ``**``.
_Segment = str | re.Pattern[str] | None


@dataclass(frozen=True)
class _Pattern:
    """A pattern as a small NFA over path segments; states are segment indices."""

    segments: tuple[_Segment, ...]
    # closure[i]: the states reachable from i without consuming a segment (``**`` may
    # match zero segments).
    closure: tuple[frozenset[int], ...]

    @property
    def start(self) -> frozenset[int]:
        return self.closure[0]

    def step(self, states: frozenset[int], name: str) -> frozenset[int]:
        nxt: set[int] = set()
        for i in states:
            if i == len(self.segments):
                continue
            seg = self.segments[i]
            if seg is None:
                nxt |= self.closure[i]
            elif (seg == name) if isinstance(seg, str) else seg.fullmatch(name):
                nxt |= self.closure[i + 1]
        return frozenset(nxt)

    def accepts(self, states: frozenset[int]) -> bool:
        return len(self.segments) in states

    def may_match_below(self, states: frozenset[int]) -> bool:
        """Whether anything below a directory in ``states`` could still match."""
        return any(i < len(self.segments) for i in states)


def _normalize(pattern: str) -> str:
    if not isinstance(pattern, str):
        raise ConfigError(f"invalid output pattern {pattern!r}: expected a string")
    if "\0" in pattern:
        raise ConfigError(f"invalid output pattern {pattern!r}: it contains a NUL character")
    if pattern.startswith("/"):
        raise ConfigError(
            f"invalid output pattern {pattern!r}: patterns are relative to the workspace",
            hint="drop the leading '/' (or '/workspace/')",
        )
    text = pattern
    while text.startswith("./"):
        text = text[2:]
    if not text:
        raise ConfigError(f"invalid output pattern {pattern!r}: it is empty")
    for segment in text.split("/"):
        if segment == "..":
            raise ConfigError(f"invalid output pattern {pattern!r}: '..' would leave the workspace")
        if segment in ("", "."):
            hint = f"to collect a directory's contents use '{text.rstrip('/')}/**'"
            raise ConfigError(
                f"invalid output pattern {pattern!r}: empty or '.' path segment",
                hint=hint if text.endswith("/") else None,
            )
    return text


def _translate_class(body: str) -> str:
    """Translate the inside of ``[...]`` the way :mod:`fnmatch` reads it."""
    negate = body.startswith("!")
    if negate:
        body = body[1:]
    parts: list[str] = []
    k = 0
    while k < len(body):
        if k + 2 < len(body) and body[k + 1] == "-":
            lo, hi = body[k], body[k + 2]
            k += 3
            if lo <= hi:  # fnmatch drops reversed ranges rather than failing
                parts.append(f"{re.escape(lo)}-{re.escape(hi)}")
        else:
            parts.append(re.escape(body[k]))
            k += 1
    if not parts:
        return "." if negate else "(?!)"
    return "[" + ("^" if negate else "") + "".join(parts) + "]"


def _translate(segment: str) -> str:
    """Translate one segment into a regular expression (for ``fullmatch`` with DOTALL)."""
    pieces: list[list[str]] = [[]]  # single-character atoms, split at each run of ``*``
    i, n = 0, len(segment)
    while i < n:
        c = segment[i]
        i += 1
        if c == "*":
            while i < n and segment[i] == "*":
                i += 1
            pieces.append([])
        elif c == "?":
            pieces[-1].append(".")
        elif c == "[":
            j = i
            if j < n and segment[j] == "!":
                j += 1
            if j < n and segment[j] == "]":
                j += 1
            end = segment.find("]", j)
            if end < 0:
                pieces[-1].append(re.escape(c))
            else:
                pieces[-1].append(_translate_class(segment[i:end]))
                i = end + 1
        else:
            pieces[-1].append(re.escape(c))
    if len(pieces) == 1:
        return "".join(pieces[0])
    # Every atom matches exactly one character, so taking the earliest occurrence of each
    # piece between stars is always right; the atomic group stops the backtracking that
    # would let a name chosen by the attacker make matching exponential.
    middle = "".join(f"(?>.*?{''.join(p)})" for p in pieces[1:-1])
    return "".join(pieces[0]) + middle + ".*" + "".join(pieces[-1])


def _compile_segment(segment: str) -> _Segment:
    if segment == "**":
        return None
    if not any(c in segment for c in "*?["):
        return segment
    return re.compile(_translate(segment), re.DOTALL)


@lru_cache(maxsize=256)
def _compile(normalized: str) -> _Pattern:
    segments = tuple(_compile_segment(s) for s in normalized.split("/"))
    closure: list[frozenset[int]] = [frozenset({len(segments)})]
    for i in range(len(segments) - 1, -1, -1):
        here = frozenset({i})
        closure.append(here | closure[-1] if segments[i] is None else here)
    return _Pattern(segments, tuple(reversed(closure)))


def validate_patterns(patterns: Sequence[str]) -> tuple[str, ...]:
    """Check output patterns and return them normalized (without a leading ``./``).

    See the module docstring for the pattern language.

    Raises:
        ConfigError: a pattern is empty, absolute, contains ``..``, an empty or ``.``
            segment, or a NUL character.
    """
    if isinstance(patterns, str):
        raise TypeError("patterns must be a sequence of strings, not a string")
    return tuple(_normalize(p) for p in patterns)


def match_pattern(pattern: str, relpath: str) -> bool:
    """Whether the workspace-relative posix path ``relpath`` matches ``pattern``.

    Pure: nothing is read from the file system. See the module docstring for the
    pattern language.

    Raises:
        ConfigError: the pattern is invalid (see :func:`validate_patterns`).
    """
    compiled = _compile(_normalize(pattern))
    while relpath.startswith("./"):
        relpath = relpath[2:]
    states = compiled.start
    for name in relpath.split("/"):
        states = compiled.step(states, name)
        if not states:
            return False
    return compiled.accepts(states)


# --- collection (touches the file system) ----------------------------------------------


def _join(parts: tuple[str, ...]) -> str:
    return "/".join(parts)


class _OutputTree:
    """Directories under the output directory, opened one component at a time.

    Only the chain of the most recent directory stays open; the walk is depth-first, so
    consecutive outputs mostly share it.
    """

    def __init__(self, root_fd: int, out_dir: Path) -> None:
        self._root_fd = root_fd
        self._out_dir = out_dir
        self._chain: list[tuple[str, int]] = []

    def close(self) -> None:
        for _, fd in self._chain:
            os.close(fd)
        self._chain.clear()

    def dir_fd(self, parts: tuple[str, ...]) -> int:
        """A descriptor for ``out_dir/parts``, creating directories as needed.

        Raises:
            OutputError: a component is a symlink or not a directory, or cannot be made.
        """
        keep = 0
        while keep < len(self._chain) and keep < len(parts) and self._chain[keep][0] == parts[keep]:
            keep += 1
        for _, fd in self._chain[keep:]:
            os.close(fd)
        del self._chain[keep:]
        for name in parts[keep:]:
            parent = self._chain[-1][1] if self._chain else self._root_fd
            shown = _join((*(n for n, _ in self._chain), name))
            try:
                os.mkdir(name, 0o755, dir_fd=parent)
            except FileExistsError:
                pass  # reused if it is a real directory: the open below checks
            except OSError as e:
                raise OutputError(
                    f"cannot create {shown!r} in output directory {str(self._out_dir)!r}: "
                    f"{e.strerror}"
                ) from e
            try:
                fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    msg = "it is a symlink, and outputs are never written through one"
                elif e.errno == errno.ENOTDIR:
                    msg = "it exists and is not a directory"
                else:
                    msg = str(e.strerror)
                raise OutputError(
                    f"cannot use {shown!r} in output directory {str(self._out_dir)!r}: {msg}",
                    hint="remove it, or collect into an empty output directory",
                ) from e
            self._chain.append((name, fd))
        return self._chain[-1][1] if self._chain else self._root_fd


def _copy_hashed(src_fd: int, dst_fd: int, limit: int) -> tuple[int, str]:
    """Copy at most ``limit`` bytes, hashing exactly what is written.

    ``limit`` is the size ``fstat`` reported when the file was opened, so a file the
    attacker keeps appending to cannot make the copy run forever.
    """
    digest = hashlib.sha256()
    total = 0
    while total < limit:
        chunk = os.read(src_fd, min(_CHUNK, limit - total))
        if not chunk:
            break
        digest.update(chunk)
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst_fd, view) :]
        total += len(chunk)
    return total, digest.hexdigest()


@dataclass
class _Dir:
    fd: int
    parts: tuple[str, ...]
    states: tuple[frozenset[int], ...]
    pending: list[tuple[str, tuple[frozenset[int], ...]]] | None = None


@dataclass
class _Collector:
    patterns: tuple[_Pattern, ...]
    out: _OutputTree
    out_dir: Path
    collected: list[CollectedOutput] = field(default_factory=list)
    skipped: list[SkippedOutput] = field(default_factory=list)
    matched: set[int] = field(default_factory=set)
    entries: int = 0

    def walk(self, root_fd: int) -> None:
        start = tuple(p.start for p in self.patterns)
        stack = [_Dir(root_fd, (), start)]
        try:
            while stack:
                here = stack[-1]
                if here.pending is None:
                    here.pending = self._scan(here)
                if here.pending:
                    name, states = here.pending.pop()
                    child = self._open_subdir(here, name)
                    if child is not None:
                        stack.append(_Dir(child, (*here.parts, name), states))
                else:
                    stack.pop()
                    if here.fd != root_fd:
                        os.close(here.fd)
        finally:
            for left in stack:
                if left.fd != root_fd:
                    os.close(left.fd)

    def _entries(self, here: _Dir) -> Iterator[os.DirEntry[str]]:
        shown = _join(here.parts) or "."
        try:
            with os.scandir(here.fd) as it:
                for entry in it:
                    self.entries += 1
                    if self.entries > _MAX_ENTRIES:
                        raise OutputError(
                            f"the workspace has more than {_MAX_ENTRIES:,} entries; "
                            "output collection stopped",
                            hint="make the output patterns more specific so less is searched",
                        )
                    yield entry
        except OSError as e:
            raise OutputError(f"cannot list workspace directory {shown!r}: {e.strerror}") from e

    def _scan(self, here: _Dir) -> list[tuple[str, tuple[frozenset[int], ...]]]:
        """Handle the matching entries of a directory; return the subdirectories to enter."""
        subdirs: list[tuple[str, tuple[frozenset[int], ...]]] = []
        for entry in self._entries(here):
            states = tuple(
                p.step(s, entry.name) for p, s in zip(self.patterns, here.states, strict=True)
            )
            matches = [
                i
                for i, (p, s) in enumerate(zip(self.patterns, states, strict=True))
                if p.accepts(s)
            ]
            descend = any(p.may_match_below(s) for p, s in zip(self.patterns, states, strict=True))
            # d_type is only a hint for saving system calls; what counts is decided on the
            # descriptor that is actually opened.
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError as e:
                shown = _join((*here.parts, entry.name))
                raise OutputError(f"cannot inspect workspace entry {shown!r}: {e.strerror}") from e
            if is_dir:
                if descend:
                    subdirs.append((entry.name, states))
            elif matches:
                self._take(here, entry, matches)
        subdirs.reverse()  # popped from the end: visit in listing order
        return subdirs

    def _open_subdir(self, here: _Dir, name: str) -> int | None:
        parts = (*here.parts, name)
        if len(parts) > _MAX_DEPTH:
            raise OutputError(
                f"the workspace is nested deeper than {_MAX_DEPTH} directories; "
                "output collection stopped",
                hint="make the output patterns more specific so less is searched",
            )
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=here.fd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
                # Swapped for a symlink or a file since it was listed: never entered.
                logger.debug("not entering %r: it changed while collecting outputs", parts)
                return None
            raise OutputError(
                f"cannot open workspace directory {_join(parts)!r}: {e.strerror}"
            ) from e

    def _skip(self, parts: tuple[str, ...], reason: str, matches: list[int]) -> None:
        self.matched.update(matches)
        self.skipped.append(SkippedOutput(_join(parts), reason))
        logger.debug("output %r skipped: %s", _join(parts), reason)

    def _take(self, here: _Dir, entry: os.DirEntry[str], matches: list[int]) -> None:
        parts = (*here.parts, entry.name)
        try:
            is_symlink = entry.is_symlink()
            is_file = entry.is_file(follow_symlinks=False)
        except OSError as e:
            raise OutputError(f"cannot inspect output {_join(parts)!r}: {e.strerror}") from e
        if is_symlink:
            self._skip(parts, "symlink", matches)
            return
        if not is_file:
            # Never open specials: opening a device can have side effects.
            try:
                mode = entry.stat(follow_symlinks=False).st_mode
            except FileNotFoundError:
                self._skip(parts, "vanished during collection", matches)
                return
            except OSError as e:
                raise OutputError(f"cannot inspect output {_join(parts)!r}: {e.strerror}") from e
            if not stat.S_ISREG(mode):
                self._skip(parts, file_kind(mode), matches)
                return
            # Swapped for a regular file since it was listed: opened and checked below.
        try:
            fd = os.open(entry.name, _READ_FLAGS, dir_fd=here.fd)
        except OSError as e:
            # The entry was swapped after it was listed: O_NOFOLLOW refuses a symlink and
            # O_NONBLOCK keeps a fifo from blocking; nothing else is worth retrying.
            reasons = {
                errno.ELOOP: "symlink",
                errno.ENOENT: "vanished during collection",
                errno.ENXIO: "not a regular file",
                errno.EISDIR: "directory",
            }
            if e.errno in reasons:
                self._skip(parts, reasons[e.errno], matches)
                return
            raise OutputError(f"cannot read output {_join(parts)!r}: {e.strerror}") from e
        try:
            try:
                st = os.fstat(fd)
            except OSError as e:
                raise OutputError(f"cannot read output {_join(parts)!r}: {e.strerror}") from e
            if not stat.S_ISREG(st.st_mode):
                self._skip(parts, file_kind(st.st_mode), matches)
                return
            self.collected.append(self._write(fd, st, parts))
            self.matched.update(matches)
        finally:
            os.close(fd)

    def _write(self, src_fd: int, st: os.stat_result, parts: tuple[str, ...]) -> CollectedOutput:
        rel = _join(parts)
        dir_fd = self.out.dir_fd(parts[:-1])
        executable = bool(st.st_mode & 0o111)
        # A fixed-length temporary name: the final name may already be NAME_MAX long.
        tmp = f".buildcell-{os.urandom(8).hex()}.tmp"
        try:
            out_fd = os.open(tmp, _CREATE_FLAGS, 0o600, dir_fd=dir_fd)
        except OSError as e:
            raise OutputError(
                f"cannot collect output {rel!r} into {str(self.out_dir)!r}: {e.strerror}"
            ) from e
        try:
            try:
                size, sha256 = _copy_hashed(src_fd, out_fd, st.st_size)
                # Set explicitly: never setuid/setgid, never what the attacker chose.
                os.fchmod(out_fd, 0o755 if executable else 0o644)
            finally:
                os.close(out_fd)
            os.rename(tmp, parts[-1], src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException as e:
            with suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            if isinstance(e, OSError):
                raise OutputError(
                    f"cannot collect output {rel!r} into {str(self.out_dir)!r}: {e.strerror}"
                ) from e
            raise
        return CollectedOutput(rel, size, sha256, executable)


def _open_workspace(workspace: Path) -> int:
    try:
        return os.open(workspace, _DIR_FLAGS)
    except OSError as e:
        raise OutputError(f"cannot open workspace {str(workspace)!r}: {e.strerror}") from e


def _open_out_dir(out_dir: Path, workspace: Path) -> int:
    try:
        inside = out_dir.resolve().is_relative_to(workspace.resolve())
    except OSError as e:
        raise OutputError(f"cannot resolve output directory {str(out_dir)!r}: {e}") from e
    if inside:
        # The cell controls everything there, including where our writes would land.
        raise OutputError(
            f"output directory {str(out_dir)!r} is inside the workspace",
            hint="choose an output directory outside the workspace",
        )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        return os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise OutputError(f"cannot create output directory {str(out_dir)!r}: {e.strerror}") from e


def collect_outputs(workspace: Path, patterns: Sequence[str], out_dir: Path) -> OutputReport:
    """Copy the regular files of ``workspace`` that match ``patterns`` into ``out_dir``.

    Patterns follow the module docstring. Each output keeps its path relative to the
    workspace; it is written under a temporary name and renamed into place, so no
    half-written file ever has its final name; its mode is 0755 if the source had any
    execute bit, else 0644. Symlinks, fifos, sockets and devices that match are listed in
    ``skipped`` and never read. ``out_dir`` (and its parents) is created if missing; an
    existing file of the same name is replaced, an existing symlink in the way of a
    directory is an error. Only directories that a pattern could still match below are
    entered, never through a symlink.

    Raises:
        ConfigError: a pattern is invalid.
        OutputError: the workspace is deeper than 256 directories or has more than a
            million entries where patterns search, a directory in ``out_dir`` is a symlink
            or a file, or reading or writing failed (names the output and the reason).
    """
    validate_patterns(patterns)
    originals = tuple(dict.fromkeys(patterns))
    compiled = tuple(_compile(p) for p in validate_patterns(originals))
    ws_fd = _open_workspace(workspace)
    try:
        out_fd = _open_out_dir(out_dir, workspace)
        tree = _OutputTree(out_fd, out_dir)
        try:
            collector = _Collector(compiled, tree, out_dir)
            collector.walk(ws_fd)
        finally:
            tree.close()
            os.close(out_fd)
    finally:
        os.close(ws_fd)
    return OutputReport(
        collected=tuple(sorted(collector.collected, key=lambda c: c.path)),
        skipped=tuple(sorted(collector.skipped, key=lambda s: s.path)),
        unmatched=tuple(p for i, p in enumerate(originals) if i not in collector.matched),
    )
