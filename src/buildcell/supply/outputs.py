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
import fcntl
import hashlib
import os
import re
import stat
from collections.abc import Callable, Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from buildcell import _log
from buildcell._fs import file_kind
from buildcell._text import show
from buildcell.errors import ConfigError, Error, OutputError

if TYPE_CHECKING:
    from buildcell.redact import Secret

__all__ = [
    "RESERVED_NAMES",
    "CollectedOutput",
    "OutputDir",
    "OutputReport",
    "SkippedOutput",
    "check_outputs_for_secrets",
    "check_reserved_names",
    "collect_outputs",
    "match_pattern",
    "validate_patterns",
]

logger = _log.get(__name__)

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
    max_bytes: int | None = None
    total: int = 0

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
            if self.max_bytes is not None and self.total + st.st_size > self.max_bytes:
                from buildcell.units import format_size

                raise OutputError(
                    f"outputs exceed {format_size(self.max_bytes)} at {_join(parts)!r} "
                    f"({format_size(st.st_size)}); nothing was published",
                    hint="collect less, or raise the limit (--disk, or outputs.max_size in "
                    "the configuration file)",
                )
            self.total += st.st_size
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
    from buildcell import confined

    return confined.open_host_dir(out_dir, what="output directory", create=True)


def collect_outputs(
    workspace: Path,
    patterns: Sequence[str],
    out_dir: Path | OutputDir,
    *,
    max_bytes: int | None = None,
) -> OutputReport:
    """Copy the regular files of ``workspace`` that match ``patterns`` into ``out_dir``.

    Patterns follow the module docstring. Each output keeps its path relative to the
    workspace; it is written under a temporary name and renamed into place, so no
    half-written file ever has its final name; its mode is 0755 if the source had any
    execute bit, else 0644. Symlinks, fifos, sockets and devices that match are listed in
    ``skipped`` and never read. A path ``out_dir`` (and its parents) is created if missing,
    with no symlink on any component; an :class:`OutputDir` is written in its private
    staging directory. An existing file of the same name is replaced, an existing symlink
    in the way of a directory is an error. Only directories that a pattern could still
    match below are entered, never through a symlink.

    Args:
        max_bytes: the most bytes all outputs together may have (by their size, so a
            sparse file counts what it claims); more is an error before it is copied.

    Raises:
        ConfigError: a pattern is invalid.
        OutputError: the workspace is deeper than 256 directories or has more than a
            million entries where patterns search, a directory in ``out_dir`` is a symlink
            or a file, the outputs exceed ``max_bytes``, or reading or writing failed
            (names the output and the reason).
    """
    validate_patterns(patterns)
    originals = tuple(dict.fromkeys(patterns))
    compiled = tuple(_compile(p) for p in validate_patterns(originals))
    ws_fd = _open_workspace(workspace)
    try:
        if isinstance(out_dir, OutputDir):
            out_fd, shown = os.dup(out_dir.staging_fd), out_dir.path
        else:
            out_fd, shown = _open_out_dir(out_dir, workspace), out_dir
        tree = _OutputTree(out_fd, shown)
        try:
            collector = _Collector(compiled, tree, shown, max_bytes=max_bytes)
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


def _open_below(dir_fd: int, rel: str) -> int:
    """Open a collected output of the staging directory one component at a time (its
    path may be longer than the kernel takes in one call), never through a symlink."""
    parts = rel.split("/")
    fd = os.dup(dir_fd)
    try:
        for name in parts[:-1]:
            sub = os.open(name, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = sub
        return os.open(parts[-1], _READ_FLAGS, dir_fd=fd)
    finally:
        os.close(fd)


#: Files buildcell writes at the top of an output directory: no output may take their name.
RESERVED_NAMES = frozenset({"outputs.json", "provenance.intoto.jsonl", "provenance.sigstore.json"})


def check_reserved_names(report: OutputReport) -> None:
    """Refuse an output at the top of the directory with the name of buildcell's own files.

    Raises:
        OutputError: one is (the manifest or the provenance would replace it).
    """
    paths = [c.path for c in report.collected] + [s.path for s in report.skipped]
    for path in paths:
        top = path.split("/", 1)[0]
        if top in RESERVED_NAMES or (top.startswith(".") and top.endswith(".tmp")):
            raise OutputError(
                f"output {show(path)} takes the name of a file buildcell writes there itself",
                hint="collect it under another name or in a subdirectory",
            )


def check_outputs_for_secrets(
    report: OutputReport,
    out: OutputDir,
    secrets: Sequence[Secret],
    emit: Callable[..., object],
) -> None:
    """Refuse to publish outputs whose name or content holds a secret's value (or an
    encoding of it). Names are checked first, before anything reaches a record, an event or
    a manifest.

    Raises:
        OutputError: an output holds a secret; nothing is published.
    """
    if not secrets:
        return
    from buildcell.redact import Scanner

    # One index of the secrets' forms, a fresh scan per name and file.
    index = Scanner(secrets)
    for name in [*(c.path for c in report.collected), *(s.path for s in report.skipped)]:
        scanner = index.fresh()
        scanner.feed(name.encode(errors="surrogateescape"))
        if scanner.found:
            names = ", ".join(sorted(scanner.found))
            emit("secret.leak", path=None, secrets=sorted(scanner.found), where="name")
            raise OutputError(
                f"the name of an output contains the value of secret {names}; "
                "nothing was published",
                hint="a build must not copy secrets into its outputs",
            )
    for item in report.collected:
        scanner = index.fresh()
        fd = _open_below(out.staging_fd, item.path)
        with os.fdopen(fd, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                scanner.feed(chunk)
        if scanner.found:
            names = ", ".join(sorted(scanner.found))
            emit("secret.leak", path=item.path, secrets=sorted(scanner.found))
            raise OutputError(
                f"output {show(item.path)} contains the value of secret {names}; "
                "nothing was published",
                hint="a build must not copy secrets into its outputs",
            )


# --- the output directory ----------------------------------------------------------------

_RENAME_EXCHANGE = 2
_MAX_PREVIOUS_ENTRIES = 1_000_000
_STAGING_INFIX = ".buildcell-"


def _renameat2(old_dir: int, old: str, new_dir: int, new: str, flags: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(old_dir, os.fsencode(old), new_dir, os.fsencode(new), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class OutputDir:
    """One build's exclusive use of an output directory, and its replacement as a whole.

    The directory is created if missing, with no symlink on any component of its path.
    An exclusive ``flock`` is held from :meth:`claim` to :meth:`close` on a lock file in
    ``lock_dir`` (the private state directory: not on the directory itself, which every
    local user may open and lock), named after the directory's absolute path: a second build
    on the same directory waits (or, with ``wait=False``, fails at once). Outputs, their
    manifest and the provenance are written into a private staging directory next to it
    (``.NAME.buildcell-RANDOM``, mode 0700, itself locked while its build lives, so a build
    of another state directory never removes it as a leftover) and :meth:`publish` swaps the
    two with one ``renameat2(RENAME_EXCHANGE)``: at every moment the directory holds one
    build's files, complete, and a build killed midway leaves the previous ones untouched.

    The directory belongs to buildcell: an existing one must be empty or hold a previous
    build's outputs (an ``outputs.json``), and must contain no symlink, which no build ever
    writes there.

    Raises:
        UnsafePathError: a component of the path is a symlink.
        OutputError: the directory is busy (``wait=False``), holds something else, or
            cannot be created or written.
    """

    def __init__(
        self,
        path: Path,
        *,
        lock_dir: Path,
        wait: bool = True,
        on_wait: Callable[[str], None] | None = None,
    ) -> None:
        from buildcell import confined

        self.path = Path(os.path.abspath(path))
        if self.path == Path("/"):
            raise OutputError("the output directory cannot be /")
        self._name = self.path.name
        self._parent_fd = confined.open_host_dir(
            self.path.parent, what="output directory", create=True
        )
        self._fd = -1
        self._lock_fd = -1
        self.staging_fd = -1
        self._staging: str | None = None
        self._created = False
        self.published = False
        try:
            self._lock(lock_dir, wait, on_wait)
            self._fd, self._created = confined.make_dirs(
                self._parent_fd, [self._name], what="output directory"
            )
            self._check_previous()
            self._remove_leftovers()
            self._staging = f".{self._name}{_STAGING_INFIX}{os.urandom(6).hex()}"
            os.mkdir(self._staging, 0o700, dir_fd=self._parent_fd)
            self.staging_fd = os.open(self._staging, _DIR_FLAGS, dir_fd=self._parent_fd)
            fcntl.flock(self.staging_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            self.close()
            raise OutputError(
                f"cannot prepare output directory {str(self.path)!r}: {e.strerror}"
            ) from e
        except BaseException:
            self.close()
            raise

    @property
    def staging(self) -> Path:
        """The private staging directory, as a path (it is ours, made exclusively)."""
        assert self._staging is not None
        return self.path.parent / self._staging

    def _lock(self, lock_dir: Path, wait: bool, on_wait: Callable[[str], None] | None) -> None:
        key = hashlib.sha256(os.fsencode(self.path)).hexdigest()[:32]
        try:
            fd = os.open(
                lock_dir / f"out-{key}.lock",
                os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
            )
        except OSError as e:
            raise OutputError(
                f"cannot lock output directory {str(self.path)!r}: {lock_dir}: {e.strerror}"
            ) from e
        self._lock_fd = fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise OutputError(
                    f"output directory {str(self.path)!r} is in use by another build",
                    hint="wait for it (without --no-wait), or choose another --out",
                ) from None
            if on_wait is not None:
                on_wait(f"waiting for another build to finish with {self.path}")
            fcntl.flock(fd, fcntl.LOCK_EX)

    def _check_previous(self) -> None:
        """Refuse a directory that holds a symlink, or files that are not a build's."""
        names = os.listdir(self._fd)
        if names and not self._is_manifest("outputs.json"):
            raise OutputError(
                f"output directory {str(self.path)!r} holds files that are not a previous "
                "build's outputs (no outputs.json); it is replaced as a whole",
                hint="choose a new or empty --out directory",
            )
        link = _find_symlink(self._fd)
        if link is not None:
            raise OutputError(
                f"output directory {str(self.path)!r} holds a symlink, {link!r}; "
                "buildcell writes only regular files there and never through a link",
                hint=f"remove {str(self.path / link)!r}",
            )

    def _is_manifest(self, name: str) -> bool:
        try:
            return stat.S_ISREG(os.stat(name, dir_fd=self._fd, follow_symlinks=False).st_mode)
        except FileNotFoundError:
            return False

    def _remove_leftovers(self) -> None:
        # Only the holder of the lock makes staging directories for this name: any other
        # is what a killed build left.
        from buildcell.trees import remove_tree

        prefix = f".{self._name}{_STAGING_INFIX}"
        for entry in os.listdir(self._parent_fd):
            if entry.startswith(prefix) and not _in_use(self._parent_fd, entry):
                remove_tree(self.path.parent / entry)

    def write_file(self, name: str, data: bytes) -> None:
        """Write ``name`` (top level) into the staging directory, atomically.

        Raises:
            OutputError: it cannot be written (an output took the name, the disk is full).
        """
        tmp = f".{name}.{os.urandom(6).hex()}.tmp"
        try:
            fd = os.open(tmp, _CREATE_FLAGS, 0o644, dir_fd=self.staging_fd)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=self.staging_fd, dst_dir_fd=self.staging_fd)
        except OSError as e:
            with suppress(OSError):
                os.unlink(tmp, dir_fd=self.staging_fd)
            raise OutputError(f"cannot write {name} into {str(self.path)!r}: {e.strerror}") from e

    def publish(self) -> None:
        """Put the staged files in place of the directory's contents, at once.

        Raises:
            OutputError: the exchange failed (the previous contents then stay).
        """
        from buildcell.trees import remove_tree

        assert self._staging is not None, "already published"
        try:
            os.fchmod(self.staging_fd, 0o755)
            os.fsync(self.staging_fd)
            _renameat2(
                self._parent_fd, self._staging, self._parent_fd, self._name, _RENAME_EXCHANGE
            )
        except OSError as e:
            raise OutputError(
                f"cannot publish outputs into {str(self.path)!r}: {e.strerror}"
            ) from e
        self.published = True
        with suppress(OSError):
            os.fsync(self._parent_fd)
        # What was there before is now under the staging name.
        remove_tree(self.staging)
        self._staging = None

    def close(self) -> None:
        """Discard what was staged (unless published) and release the lock. Idempotent."""
        from buildcell.trees import remove_tree

        if self.staging_fd >= 0:
            os.close(self.staging_fd)
            self.staging_fd = -1
        if self._staging is not None:
            with suppress(Error):
                remove_tree(self.staging)
            self._staging = None
        if self._created and not self.published and self._fd >= 0:
            # Nothing was published into a directory this build made: it goes again (a
            # failed build leaves no output directory behind).
            with suppress(OSError):
                os.rmdir(self._name, dir_fd=self._parent_fd)
        for attr in ("_fd", "_parent_fd", "_lock_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)

    def __enter__(self) -> OutputDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _in_use(parent_fd: int, name: str) -> bool:
    """Whether the staging directory ``name`` is locked by a live build (of another state
    directory: builds of this one wait for the output directory's lock first)."""
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _find_symlink(root_fd: int) -> str | None:
    """The first symlink below ``root_fd`` (a relative path), walking without following."""
    stack: list[tuple[int, str]] = [(os.dup(root_fd), "")]
    seen = 0
    try:
        while stack:
            fd, prefix = stack.pop()
            try:
                with os.scandir(fd) as it:
                    for entry in it:
                        seen += 1
                        if seen > _MAX_PREVIOUS_ENTRIES:
                            return None
                        rel = prefix + entry.name
                        if entry.is_symlink():
                            return rel
                        if entry.is_dir(follow_symlinks=False):
                            with suppress(OSError):
                                stack.append(
                                    (os.open(entry.name, _DIR_FLAGS, dir_fd=fd), rel + "/")
                                )
            finally:
                os.close(fd)
    finally:
        for fd, _ in stack:
            os.close(fd)
    return None
