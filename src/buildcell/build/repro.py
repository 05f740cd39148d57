"""Reproducibility: compare two builds' outputs bit for bit, and write archives that only
depend on their content.

Comparing never follows a symlink: the trees are walked with directory file descriptors,
every path component is opened relative to its parent with ``O_NOFOLLOW``, and a file is
read only after ``lstat`` said it is a regular file and ``fstat`` of the open descriptor
agrees. Files are streamed in 1 MiB chunks: memory use does not grow with their size.

The outputs are the build's, so an attacker's: diffoscope, which unpacks and parses them
with dozens of tools, runs in a cell on copies of the two files, never on the host.

A reproducible archive (:func:`write_reproducible_tar_gz`) is a function of the members'
paths, kinds, executable bits, symlink targets and bytes, and of ``SOURCE_DATE_EPOCH``:
creation order, mtimes, owners, umask and hard links in the source tree do not show.
"""

from __future__ import annotations

import bz2
import errno
import gzip
import hashlib
import io
import lzma
import math
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

from buildcell import _log
from buildcell._fs import file_kind
from buildcell._text import show
from buildcell.errors import ConfigError, OutputError

if TYPE_CHECKING:
    from buildcell.state import StateDir

__all__ = [
    "ArchiveDiff",
    "FileDiff",
    "MemberDiff",
    "ReproReport",
    "archive_kind",
    "clamp_mtimes",
    "compare_trees",
    "first_difference",
    "write_reproducible_tar_gz",
]

logger = _log.get(__name__)

_CHUNK = 1 << 20
# Below this many bytes the first difference is found by a plain scan; above, by bisecting
# with slice comparisons, which run at memcmp speed instead of one Python step per byte.
_SCAN = 64
# Files in an output directory that describe the build rather than being its product, and
# legitimately differ between two builds (build id, start time, signature).
_BUILD_METADATA = frozenset({"outputs.json", "provenance.intoto.jsonl", "provenance.sigstore.json"})
_SUMMARY_LIMIT = 4096
# diffoscope's cell: wall clock (seconds, start-up included), memory and tasks.
_DIFFOSCOPE_TIMEOUT = 60.0
_DIFFOSCOPE_MEMORY = 2 << 30
_DIFFOSCOPE_PIDS = 256
# Room for its unpacking, beyond the two files themselves (the workspace, /tmp, home).
_DIFFOSCOPE_SCRATCH = 1 << 30
# Larger files get no summary: copying them for a report that would not finish in time
# is not worth their disk space.
_DIFFOSCOPE_MAX_INPUT = 512 << 20

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a fifo swapped in after the lstat opens at once instead of waiting for a
# writer; O_NOCTTY: a terminal can never become our controlling tty.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
# What opening a path component reports when the component is missing, is a symlink (we
# never follow one) or is not a directory: for a comparison, the file is not there.
_ABSENT = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP})

_FILE_MODE = 0o644
_EXEC_MODE = 0o755
_DIR_MODE = 0o755
_LINK_MODE = 0o777


@dataclass(frozen=True)
class FileDiff:
    """One path whose content differs between build A and build B.

    Attributes:
        path: posix path relative to the output directories.
        size_a: size in build A, or ``None`` when it is not a regular file there (missing,
            or a symlink, directory or special file).
        size_b: the same for build B.
        first_difference: byte offset of the first differing byte; when one file is a
            prefix of the other, the shorter length; ``None`` when a side is missing.
        summary: diffoscope's text report (at most about 4 KiB), when diffoscope is
            installed, was asked for, and succeeded; else ``None``.
        archive: for a tar (plain, .gz, .xz, .bz2), zip or wheel on both sides, which of
            its members differ and how; else ``None``.
    """

    path: str
    size_a: int | None
    size_b: int | None
    first_difference: int | None
    summary: str | None = None
    archive: ArchiveDiff | None = None


@dataclass(frozen=True)
class ReproReport:
    """The result of :func:`compare_trees`.

    Attributes:
        reproducible: whether no compared path differs.
        compared: how many paths were compared.
        differences: the paths that differ, sorted by path.
    """

    reproducible: bool
    compared: int
    differences: tuple[FileDiff, ...]

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (the shape ``--json`` prints)."""
        return {
            "reproducible": self.reproducible,
            "compared": self.compared,
            "differences": [
                {
                    "path": d.path,
                    "size_a": d.size_a,
                    "size_b": d.size_b,
                    "first_difference": d.first_difference,
                    "summary": d.summary,
                    **({} if d.archive is None else {"archive": d.archive.to_dict()}),
                }
                for d in self.differences
            ],
        }


# --- pure helpers -----------------------------------------------------------------------


def _common_prefix(x: bytes, y: bytes) -> int:
    """Length of the longest common prefix of ``x`` and ``y``."""
    mx, my = memoryview(x), memoryview(y)
    lo, hi = 0, min(len(x), len(y))
    # Invariant: x[:lo] == y[:lo], and the first difference lies in [lo, hi) unless hi is
    # the shorter length and there is none.
    while hi - lo > _SCAN:
        mid = (lo + hi) // 2
        if mx[lo:mid] == my[lo:mid]:
            lo = mid
        else:
            hi = mid
    for i in range(lo, hi):
        if x[i] != y[i]:
            return i
    return hi


def _check_relpath(path: str, what: str) -> tuple[str, ...]:
    """Split a relative posix path into its components.

    Raises:
        ConfigError: the path is empty, absolute, has an empty, ``.`` or ``..`` component,
            or contains a NUL character.
    """
    if not isinstance(path, str) or not path:
        raise ConfigError(f"invalid {what} {path!r}: expected a non-empty relative path")
    if "\0" in path:
        raise ConfigError(f"invalid {what} {path!r}: it contains a NUL character")
    if path.startswith("/"):
        raise ConfigError(f"invalid {what} {path!r}: it must be relative")
    parts = tuple(path.split("/"))
    if any(p in ("", ".", "..") for p in parts):
        raise ConfigError(f"invalid {what} {path!r}: empty, '.' or '..' path component")
    return parts


def _check_epoch(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(
            f"invalid SOURCE_DATE_EPOCH {value!r}: expected whole seconds since 1970 (>= 0)"
        )
    return value


def _archive_order(members: Sequence[str]) -> list[str]:
    """Every member and every parent directory of one, each once, sorted bytewise.

    A path sorts before every path it is a prefix of, so a directory always precedes its
    contents. Sorting the encoded bytes keeps the order independent of the locale and of
    how undecodable names were decoded.
    """
    paths: set[str] = set()
    for member in members:
        parts = _check_relpath(member, "archive member")
        paths.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    return sorted(paths, key=os.fsencode)


def _tar_info(name: str, mode: int, size: int, linkname: str, mtime: int) -> tarfile.TarInfo:
    """A header that depends only on ``name``, the kind and exec bits of ``mode``, ``size``,
    ``linkname`` and ``mtime``.

    Raises:
        OutputError: ``mode`` is not a regular file, directory or symlink.
    """
    info = tarfile.TarInfo(name)
    if stat.S_ISREG(mode):
        info.type = tarfile.REGTYPE
        info.mode = _EXEC_MODE if mode & 0o111 else _FILE_MODE
        info.size = size
    elif stat.S_ISDIR(mode):
        info.type = tarfile.DIRTYPE
        info.mode = _DIR_MODE
    elif stat.S_ISLNK(mode):
        info.type = tarfile.SYMTYPE
        info.mode = _LINK_MODE
        info.linkname = linkname
    else:
        raise OutputError(
            f"cannot archive {name!r}: it is a {file_kind(mode)}; only regular files, "
            "directories and symlinks are archived"
        )
    info.mtime = mtime
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _reason(e: OSError) -> str:
    return e.strerror or str(e)


# --- reading without following symlinks -------------------------------------------------


def _open_root(root: Path, what: str) -> int:
    """Open a directory the caller named (the caller's path is taken as given).

    Raises:
        OutputError: it cannot be opened as a directory.
    """
    try:
        return os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise OutputError(f"cannot open {what} {str(root)!r}: {_reason(e)}") from e


def _open_dir_at(root_fd: int, parts: Sequence[str]) -> int:
    """A new descriptor for ``root/parts``, refusing symlinks at every component.

    Raises:
        OSError: a component is missing, a symlink (ELOOP) or not a directory (ENOTDIR).
    """
    fd = os.dup(root_fd)
    try:
        for name in parts:
            child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_regular(name: str, dir_fd: int) -> int | None:
    """Open ``name`` in ``dir_fd`` for reading if it is a regular file, else ``None``.

    The lstat comes first so that a device or fifo is never opened at all.

    Raises:
        OSError: it cannot be read, or was replaced between the lstat and the open.
    """
    try:
        before = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError as e:
        if e.errno in _ABSENT:
            return None
        raise
    if not stat.S_ISREG(before.st_mode):
        return None
    return _open_as_stated(name, dir_fd, before)


def _open_as_stated(name: str | Path, dir_fd: int | None, before: os.stat_result) -> int:
    """Open the regular file ``before`` describes, checking that it is still that file.

    Raises:
        OSError: it cannot be opened, or was replaced since ``before`` was taken.
    """
    fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
    after = os.fstat(fd)
    if not stat.S_ISREG(after.st_mode) or (after.st_dev, after.st_ino) != (
        before.st_dev,
        before.st_ino,
    ):
        os.close(fd)
        raise OSError(errno.ESTALE, "it was replaced while being opened")
    return fd


def _open_member(root_fd: int, parts: Sequence[str]) -> int | None:
    """Open ``root/parts`` as a regular file; ``None`` if it is not one (or not there).

    Raises:
        OSError: it cannot be read for another reason.
    """
    try:
        parent = _open_dir_at(root_fd, parts[:-1])
    except OSError as e:
        if e.errno in _ABSENT:
            return None
        raise
    try:
        return _open_regular(parts[-1], parent)
    finally:
        os.close(parent)


def _read_full(fd: int, size: int) -> bytes:
    """Read ``size`` bytes, fewer only at end of file."""
    first = os.read(fd, size)
    if len(first) == size or not first:
        return first
    parts = [first]
    got = len(first)
    while got < size:
        more = os.read(fd, size - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _first_difference_fds(fd_a: int, size_a: int, fd_b: int, size_b: int) -> int | None:
    """Offset of the first differing byte of two open files, ``None`` if equal.

    Reads at most the sizes ``fstat`` gave, so a file that keeps growing cannot make the
    comparison run forever.
    """
    offset = 0
    while True:
        chunk_a = _read_full(fd_a, min(_CHUNK, size_a - offset))
        chunk_b = _read_full(fd_b, min(_CHUNK, size_b - offset))
        if chunk_a != chunk_b:
            return offset + _common_prefix(chunk_a, chunk_b)
        if not chunk_a:
            return None
        offset += len(chunk_a)


def _walk(root_fd: int) -> Iterator[tuple[tuple[str, ...], int, os.DirEntry[str]]]:
    """Every entry below ``root_fd`` as (parent's path parts, parent's fd, entry), never
    descending a symlink. The parent's fd is open only while its entries are yielded.

    Directories are reopened from the root one component at a time rather than kept open,
    so a wide tree cannot exhaust file descriptors.

    Raises:
        OSError: a directory cannot be read.
    """
    pending: list[tuple[str, ...]] = [()]
    while pending:
        parts = pending.pop()
        fd = _open_dir_at(root_fd, parts)
        try:
            with os.scandir(fd) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        pending.append((*parts, entry.name))
                    yield parts, fd, entry
        finally:
            os.close(fd)


def _regular_files(root_fd: int) -> set[str]:
    """Relative paths of the regular files below ``root_fd``, not descending symlinks.

    Raises:
        OSError: a directory cannot be read.
    """
    return {
        "/".join((*parts, entry.name))
        for parts, _, entry in _walk(root_fd)
        if entry.is_file(follow_symlinks=False) and (parts or entry.name not in _BUILD_METADATA)
    }


# --- diffoscope, in a cell ---------------------------------------------------------------


def _copy_member(root: Path, parts: Sequence[str], dest_fd: int, name: str) -> bool:
    """Copy the regular file ``root/parts`` to ``name`` in ``dest_fd``; ``False`` if it is
    not a regular file (any more). Nothing on the way is followed; at most the size
    ``fstat`` gave is copied, into a new file (``O_EXCL``), never through a link.

    Raises:
        OSError: it cannot be read or written.
        OutputError: ``root`` cannot be opened.
    """
    root_fd = _open_root(root, "output directory")
    try:
        src = _open_member(root_fd, parts)
    finally:
        os.close(root_fd)
    if src is None:
        return False
    try:
        size = os.fstat(src).st_size
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        dst = os.open(name, flags, 0o600, dir_fd=dest_fd)
        try:
            left = size
            while left:
                chunk = os.read(src, min(_CHUNK, left))
                if not chunk:
                    break
                view = memoryview(chunk)
                while view:
                    view = view[os.write(dst, view) :]
                left -= len(chunk)
        finally:
            os.close(dst)
    finally:
        os.close(src)
    return True


def _stage(tool: str, a: Path, b: Path, parts: Sequence[str], staging: Path) -> str | None:
    """Lay out ``staging`` as the cell's workspace: ``a/NAME``, ``b/NAME`` and, when the
    cell cannot see ``tool`` where it is, a copy of it. Returns the command to run.

    The cell's root is a read-only view of the host's ``/usr``, ``/bin`` and ``/lib*``: a
    diffoscope installed there runs as it is; one elsewhere (a single-file script in a
    home directory) is copied into the workspace.

    Raises:
        OSError: a file cannot be read or written.
        OutputError: an output directory cannot be opened.
    """
    from buildcell.cell.config import CELL_WORKSPACE
    from buildcell.cell.rootfs import HOST_TOP_LEVEL

    name = parts[-1]
    fd = os.open(staging, _DIR_FLAGS)
    try:
        for side, root in (("a", a), ("b", b)):
            os.mkdir(side, 0o700, dir_fd=fd)
            side_fd = os.open(side, _DIR_FLAGS, dir_fd=fd)
            try:
                if not _copy_member(root, parts, side_fd, name):
                    return None
            finally:
                os.close(side_fd)
    finally:
        os.close(fd)
    real = Path(os.path.realpath(tool))
    if len(real.parts) > 2 and real.parts[1] in HOST_TOP_LEVEL:
        return str(real)
    # Private modes are enough: the workspace copy belongs to the cell's uid.
    (staging / "bin").mkdir(mode=0o700)
    shutil.copyfile(real, staging / "bin" / "diffoscope")
    os.chmod(staging / "bin" / "diffoscope", 0o700)
    return f"{CELL_WORKSPACE}/bin/diffoscope"


def _tree_size(root: Path) -> int:
    """Bytes of the regular files below ``root`` (a staging directory of our own)."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def _diffoscope_summary(
    tool: str, a: Path, b: Path, parts: Sequence[str], state: StateDir | None = None
) -> str | None:
    """diffoscope's text report on ``parts`` under the roots ``a`` and ``b``, truncated;
    ``None`` if it fails.

    The files are attacker-made (a build's outputs) and diffoscope unpacks and parses
    them with dozens of tools, so it runs in a cell: no network, bounded memory, tasks
    and time, the cell's unprivileged uid when buildcell is root. Its workspace is a
    copy of a private staging directory holding copies of the two files (copied without
    following links), never the output directories themselves.
    """
    from buildcell.cell import CellConfig, Limits, run_cell
    from buildcell.errors import Error

    report = bytearray()

    def keep(data: bytes) -> None:
        # Only the first few KiB are kept; the rest is still drained by the cell.
        room = _SUMMARY_LIMIT + 1 - len(report)
        if room > 0:
            report.extend(data[:room])

    staging = Path(tempfile.mkdtemp(prefix="buildcell-diffoscope-"))  # mode 0700
    try:
        try:
            argv0 = _stage(tool, a, b, parts, staging)
        except (OSError, OutputError) as e:
            logger.warning("cannot stage %s for diffoscope: %s", "/".join(parts), e)
            return None
        if argv0 is None:
            return None
        name = parts[-1]
        config = CellConfig(
            # Relative paths below the workspace: never read as options, and the report
            # names the files a/NAME and b/NAME. Names, not /proc/self/fd links:
            # diffoscope picks comparators by file name.
            argv=(argv0, "--text", "-", "--no-progress", f"a/{name}", f"b/{name}"),
            source=staging,
            out_dir=staging / "out",  # nothing is collected
            limits=Limits(
                memory=_DIFFOSCOPE_MEMORY,
                pids=_DIFFOSCOPE_PIDS,
                timeout=_DIFFOSCOPE_TIMEOUT,
                disk=_DIFFOSCOPE_SCRATCH + 2 * _tree_size(staging),
            ),
        )
        try:
            result = run_cell(config, state=state, stdout=keep, stderr=lambda _data: None)
        except Error as e:
            logger.warning("cannot run diffoscope in a cell on %s: %s", "/".join(parts), e)
            return None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    # 0: no differences found, 1: differences found; anything else is a failure.
    if result.reason != "exited" or result.exit_code not in (0, 1):
        logger.warning(
            "diffoscope ended with %s (%d) on %s; no summary",
            result.reason,
            result.exit_code,
            "/".join(parts),
        )
        return None
    data = bytes(report)
    if not data.strip():
        return None
    text = data[:_SUMMARY_LIMIT].decode("utf-8", errors="replace")
    return text + "\n[... truncated]" if len(data) > _SUMMARY_LIMIT else text


# --- archives: which member differs, and how ---------------------------------------------


@dataclass(frozen=True)
class MemberDiff:
    """One member of an archive that differs between build A and build B.

    Attributes:
        name: the member's name in the archive (the archive's author chose it: escape it
            before showing it).
        differs: what differs, each as ``"WHAT A vs B"`` (``mode 0644 vs 0755``,
            ``mtime 1700000000 vs 1700000060``, ``size 3 vs 4``, ``content``,
            ``uid/gid 0/0 vs 1000/1000``, ``position 1 vs 2``), or ``only in A``/``only in B``.
    """

    name: str
    differs: tuple[str, ...]


@dataclass(frozen=True)
class ArchiveDiff:
    """How two archives with the same name differ, member by member.

    Attributes:
        kind: ``tar``, ``tar.gz``, ``tar.xz``, ``tar.bz2`` or ``zip``.
        members: the members that differ, in the order of archive A (then B's own), at
            most :data:`_MAX_MEMBER_DIFFS` of them.
        note: why the comparison is incomplete (a limit was reached, a side could not be
            read as an archive, more members differ than are listed), else ``None``.
    """

    kind: str
    members: tuple[MemberDiff, ...]
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "members": [{"name": m.name, "differs": list(m.differs)} for m in self.members],
            "note": self.note,
        }


# The archives are a build's outputs, so an attacker's: members are read from the two files
# as streams (never extracted), and both the number of members and the bytes decompressed
# are bounded, so an archive bomb ends the comparison with a note instead of a full disk
# or memory.
_MAX_ARCHIVE_MEMBERS = 100_000
_MAX_ARCHIVE_BYTES = 1 << 30
_MAX_MEMBER_DIFFS = 50
_ARCHIVE_SUFFIXES = (
    (".tar", "tar"),
    (".tar.gz", "tar.gz"),
    (".tgz", "tar.gz"),
    (".tar.xz", "tar.xz"),
    (".txz", "tar.xz"),
    (".tar.bz2", "tar.bz2"),
    (".tbz2", "tar.bz2"),
    (".zip", "zip"),
    (".whl", "zip"),
    (".jar", "zip"),
)


class _ArchiveLimit(Exception):
    """A bound on what is read from an archive was reached."""


@dataclass(frozen=True)
class _Member:
    """What an archive says about one member: its attributes, and its content's digest."""

    position: int
    attributes: tuple[tuple[str, str], ...]  # (what, value) in a fixed order
    digest: str


@dataclass
class _Listing:
    members: dict[str, _Member]
    note: str | None = None


class _Budget:
    """Bytes of decompressed data still allowed, shared by the reads of one archive."""

    def __init__(self, limit: int) -> None:
        self.left = limit

    def take(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise _ArchiveLimit(f"stopped after {_MAX_ARCHIVE_BYTES >> 20} MiB of its data")


class _Bounded(io.RawIOBase):
    """A read-only stream over ``raw`` that stops the read once ``budget`` is spent."""

    def __init__(self, raw: IO[bytes], budget: _Budget) -> None:
        self._raw = raw
        self._budget = budget

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._raw.read(len(buffer))
        self._budget.take(len(data))
        buffer[: len(data)] = data
        return len(data)


def archive_kind(path: str) -> str | None:
    """The kind of archive the name ``path`` says it is (``tar.gz``, ``zip``...), or None."""
    lower = path.lower()
    return next((kind for suffix, kind in _ARCHIVE_SUFFIXES if lower.endswith(suffix)), None)


def _decompressed(f: IO[bytes], kind: str) -> IO[bytes]:
    if kind == "tar.gz":
        return cast(IO[bytes], gzip.GzipFile(fileobj=f, mode="rb"))
    if kind == "tar.xz":
        return lzma.LZMAFile(f, mode="rb")
    if kind == "tar.bz2":
        return bz2.BZ2File(f, mode="rb")
    return f


def _digest(stream: IO[bytes] | None, budget: _Budget | None) -> str:
    """The sha256 of what ``stream`` holds (of nothing, for None), counted on ``budget``."""
    h = hashlib.sha256()
    while stream is not None and (chunk := stream.read(_CHUNK)):
        if budget is not None:
            budget.take(len(chunk))
        h.update(chunk)
    return h.hexdigest()


def _key(members: dict[str, _Member], name: str) -> str:
    """``name``, or ``name (#N)`` for its N-th occurrence: an archive may repeat a name."""
    if name not in members:
        return name
    n = 2
    while f"{name} (#{n})" in members:
        n += 1
    return f"{name} (#{n})"


def _tar_listing(f: IO[bytes], kind: str, listing: _Listing) -> None:
    budget = _Budget(_MAX_ARCHIVE_BYTES)
    stream = io.BufferedReader(_Bounded(_decompressed(f, kind), budget), _CHUNK)
    # "r|": a stream, read once from the front; nothing is ever seeked or extracted.
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for info in tar:
            if len(listing.members) >= _MAX_ARCHIVE_MEMBERS:
                raise _ArchiveLimit(f"stopped after {_MAX_ARCHIVE_MEMBERS} members")
            attributes = (
                ("type", _TAR_TYPES.get(info.type, repr(info.type))),
                ("mode", f"{info.mode:04o}"),
                ("mtime", _seconds(info.mtime)),
                ("size", str(info.size)),
                ("uid/gid", f"{info.uid}/{info.gid}"),
                ("owner", f"{show(info.uname, 40)}/{show(info.gname, 40)}"),
                ("link target", show(info.linkname)),
            )
            # Counted by the stream below tarfile already: no budget of its own.
            digest = _digest(tar.extractfile(info) if info.isreg() else None, None)
            position = len(listing.members)
            listing.members[_key(listing.members, info.name)] = _Member(
                position, attributes, digest
            )


def _seconds(mtime: float) -> str:
    """A tar mtime as written: whole seconds, or with the fraction a PAX header gives."""
    # A hostile PAX header can say inf or nan, which int() refuses.
    if not math.isfinite(mtime) or mtime != int(mtime):
        return repr(float(mtime))
    return str(int(mtime))


_TAR_TYPES = {
    tarfile.REGTYPE: "file",
    tarfile.AREGTYPE: "file",
    tarfile.DIRTYPE: "directory",
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hard link",
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.FIFOTYPE: "fifo",
}


def _zip_listing(f: IO[bytes], listing: _Listing) -> None:
    budget = _Budget(_MAX_ARCHIVE_BYTES)
    with zipfile.ZipFile(f) as zf:
        for info in zf.infolist():
            if len(listing.members) >= _MAX_ARCHIVE_MEMBERS:
                raise _ArchiveLimit(f"stopped after {_MAX_ARCHIVE_MEMBERS} members")
            attributes = (
                ("mode", f"{info.external_attr >> 16:06o}"),
                ("mtime", "{:04d}-{:02d}-{:02d} {:02d}:{:02d}:{:02d}".format(*info.date_time)),
                ("size", str(info.file_size)),
                ("compression", str(info.compress_type)),
                ("extra field", info.extra.hex()[:64]),
                ("comment", show(info.comment)),
            )
            if info.filename.endswith("/"):  # a directory entry (ZipInfo.is_dir)
                digest = _digest(None, budget)
            else:
                with zf.open(info) as member:
                    digest = _digest(member, budget)
            position = len(listing.members)
            listing.members[_key(listing.members, info.filename)] = _Member(
                position, attributes, digest
            )


def _listing(fd: int, kind: str) -> _Listing:
    """The members of the archive open at ``fd``, as far as they can be read within bounds."""
    listing = _Listing({})
    os.lseek(fd, 0, os.SEEK_SET)
    with os.fdopen(fd, "rb", closefd=False) as f:
        try:
            if kind == "zip":
                _zip_listing(f, listing)
            else:
                _tar_listing(f, kind, listing)
        except _ArchiveLimit as e:
            listing.note = str(e)
        except (
            tarfile.TarError,
            zipfile.BadZipFile,
            zlib.error,
            lzma.LZMAError,
            EOFError,
            OSError,
            ValueError,
            NotImplementedError,
            RuntimeError,
        ) as e:
            # RuntimeError: zipfile's "encrypted, password required"; NotImplementedError:
            # a compression method it lacks.
            listing.note = (
                f"cannot be read as a {kind} archive after {len(listing.members)} members: "
                f"{_reason_of(e)}"
            )
    return listing


def _reason_of(e: BaseException) -> str:
    text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return show(text or type(e).__name__, 120)


def _member_diffs(a: _Listing, b: _Listing) -> list[MemberDiff]:
    """The members that differ, in A's order and then B's."""
    common = [n for n in a.members if n in b.members]
    rank_a = {n: i for i, n in enumerate(common)}
    rank_b = {n: i for i, n in enumerate(sorted(common, key=lambda n: b.members[n].position))}
    diffs: list[MemberDiff] = []
    for name, member in a.members.items():
        other = b.members.get(name)
        if other is None:
            diffs.append(MemberDiff(name, ("only in A",)))
            continue
        differs = [
            f"{what} {x} vs {y}"
            for (what, x), (_, y) in zip(member.attributes, other.attributes, strict=True)
            if x != y
        ]
        if member.digest != other.digest:
            differs.append("content")
        if rank_a[name] != rank_b[name]:
            differs.append(f"position {rank_a[name] + 1} vs {rank_b[name] + 1}")
        if differs:
            diffs.append(MemberDiff(name, tuple(differs)))
    diffs += [MemberDiff(n, ("only in B",)) for n in b.members if n not in a.members]
    return diffs


def _compare_archives(kind: str, fd_a: int, fd_b: int) -> ArchiveDiff:
    """Compare two archives of ``kind`` member by member, reading each file once."""
    a, b = _listing(fd_a, kind), _listing(fd_b, kind)
    diffs = _member_diffs(a, b)
    notes = [f"{side}: {x.note}" for side, x in (("A", a), ("B", b)) if x.note]
    if not diffs and not notes:
        notes.append("every member is the same: the archives differ in their headers or padding")
    if len(diffs) > _MAX_MEMBER_DIFFS:
        notes.append(f"{len(diffs) - _MAX_MEMBER_DIFFS} more differing members not listed")
    return ArchiveDiff(kind, tuple(diffs[:_MAX_MEMBER_DIFFS]), "; ".join(notes) or None)


# --- public API -------------------------------------------------------------------------


def first_difference(a: Path, b: Path) -> int | None:
    """Byte offset of the first difference between two files; ``None`` if identical.

    When one file is a prefix of the other, the offset is the shorter length. Neither path
    is followed if it is a symlink.

    Raises:
        OutputError: a file is missing, a symlink, not a regular file, or unreadable.
    """
    fds: list[int] = []
    try:
        for path in (a, b):
            try:
                before = os.stat(path, follow_symlinks=False)
                if not stat.S_ISREG(before.st_mode):
                    kind = file_kind(before.st_mode)
                    raise OutputError(f"cannot compare {str(path)!r}: it is a {kind}")
                fds.append(_open_as_stated(path, None, before))
            except OSError as e:
                raise OutputError(f"cannot compare {str(path)!r}: {_reason(e)}") from e
        fd_a, fd_b = fds
        try:
            return _first_difference_fds(fd_a, os.fstat(fd_a).st_size, fd_b, os.fstat(fd_b).st_size)
        except OSError as e:
            raise OutputError(f"cannot compare {str(a)!r} with {str(b)!r}: {_reason(e)}") from e
    finally:
        for fd in fds:
            os.close(fd)


def compare_trees(
    a: Path,
    b: Path,
    *,
    paths: Sequence[str] | None = None,
    diffoscope: bool = True,
    state: StateDir | None = None,
) -> ReproReport:
    """Compare the regular files of two output directories byte for byte.

    Without ``paths``, the union of the regular files in both trees is compared, except
    ``outputs.json`` and ``provenance.intoto.jsonl`` at the top, which describe the build
    and always differ. Symlinks, directories and special files are never compared nor
    followed. With ``paths``, exactly those are compared; a path that is not a regular
    file on either side is a difference too, so asking about an output nobody produced
    does not pass.

    When ``diffoscope`` is true and a ``diffoscope`` program is on ``PATH``, each file
    that exists on both sides and differs gets its text report as the summary. diffoscope
    runs in a cell (``state`` is where it keeps its files; the default state directory
    otherwise), never on the host: it may take up to a minute per file.

    Raises:
        ConfigError: an entry of ``paths`` is not a clean relative path.
        OutputError: a tree is not a readable directory, or a file cannot be read.
    """
    wanted = None if paths is None else {p: _check_relpath(p, "path to compare") for p in paths}
    tool = shutil.which("diffoscope") if diffoscope else None
    fd_a = _open_root(a, "output directory")
    try:
        fd_b = _open_root(b, "output directory")
        try:
            if wanted is None:
                try:
                    names = _regular_files(fd_a) | _regular_files(fd_b)
                except OSError as e:
                    raise OutputError(
                        f"cannot list the outputs in {str(a)!r} and {str(b)!r}: {_reason(e)}"
                    ) from e
                wanted = {name: tuple(name.split("/")) for name in names}
            differences: list[FileDiff] = []
            for path in sorted(wanted):
                diff = _compare_one(((fd_a, a), (fd_b, b)), path, wanted[path])
                if diff is not None:
                    differences.append(diff)
        finally:
            os.close(fd_b)
    finally:
        os.close(fd_a)
    if tool is not None:
        differences = [_with_summary(tool, d, a, b, state) for d in differences]
    return ReproReport(
        reproducible=not differences, compared=len(wanted), differences=tuple(differences)
    )


def _compare_one(
    roots: Sequence[tuple[int, Path]], path: str, parts: tuple[str, ...]
) -> FileDiff | None:
    """Compare ``path`` under the two ``(descriptor, path)`` roots.

    Raises:
        OutputError: it cannot be read on a side.
    """
    opened: list[tuple[int, int] | None] = []
    try:
        for root_fd, root in roots:
            try:
                fd = _open_member(root_fd, parts)
            except OSError as e:
                raise OutputError(
                    f"cannot compare {path!r}: cannot read it in {str(root)!r}: {_reason(e)}"
                ) from e
            opened.append(None if fd is None else (fd, os.fstat(fd).st_size))
        side_a, side_b = opened
        if side_a is None or side_b is None:
            return FileDiff(
                path,
                None if side_a is None else side_a[1],
                None if side_b is None else side_b[1],
                None,
            )
        try:
            offset = _first_difference_fds(*side_a, *side_b)
        except OSError as e:
            raise OutputError(f"cannot compare {path!r}: {_reason(e)}") from e
        if offset is None:
            return None
        kind = archive_kind(path)
        archive = None if kind is None else _compare_archives(kind, side_a[0], side_b[0])
        return FileDiff(path, side_a[1], side_b[1], offset, archive=archive)
    finally:
        for side in opened:
            if side is not None:
                os.close(side[0])


def _with_summary(
    tool: str, diff: FileDiff, a: Path, b: Path, state: StateDir | None = None
) -> FileDiff:
    if diff.size_a is None or diff.size_b is None:
        return diff  # diffoscope needs both files; "missing" says all there is to say
    if max(diff.size_a, diff.size_b) > _DIFFOSCOPE_MAX_INPUT:
        logger.info("%s is too large for a diffoscope summary", diff.path)
        return diff
    summary = _diffoscope_summary(tool, a, b, tuple(diff.path.split("/")), state)
    return FileDiff(
        diff.path, diff.size_a, diff.size_b, diff.first_difference, summary, diff.archive
    )


def write_reproducible_tar_gz(
    source_dir: Path, members: Sequence[str], target: Path, *, mtime: int
) -> str:
    """Pack ``members`` of ``source_dir`` into a .tar.gz that depends only on content.

    Entries are sorted bytewise by path, and every parent directory of a member is
    included before its contents. Each entry has mtime ``mtime`` (SOURCE_DATE_EPOCH),
    uid and gid 0, empty owner names, and mode 0644, or 0755 for directories and for files
    with any execute bit. Symlinks are stored as symlinks with their target verbatim; hard
    links as regular files. A directory member adds only its own entry: list its contents
    to include them. The format is PAX with no extended headers beyond those a long or
    non-ASCII name needs; the gzip header has mtime 0 and no file name; the compression
    level is 9. Nothing in ``source_dir`` is read through a symlink.

    The archive is written to a temporary file next to ``target`` and renamed over it, so
    ``target`` is either untouched or complete; it gets mode 0644.

    Returns:
        The sha256 hex digest of the archive as written.

    Raises:
        ConfigError: a member is not a clean relative path, or ``mtime`` is negative.
        OutputError: a member is missing, is not a regular file, directory or symlink, has
            a symlink among its parents, or cannot be read; or ``target`` cannot be
            written.
    """
    epoch = _check_epoch(mtime)
    explicit = set(members)
    order = _archive_order(members)
    root_fd = _open_root(source_dir, "directory to archive")
    try:
        with _atomic_target(target) as out:
            # mtime=0 and filename="": the gzip header carries no time and no name.
            with (
                gzip.GzipFile(fileobj=out, mode="wb", mtime=0, filename="", compresslevel=9) as gz,
                tarfile.open(
                    fileobj=gz, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8"
                ) as tar,
            ):
                for path in order:
                    if path in explicit:
                        _add_member(tar, root_fd, path, epoch, source_dir)
                    else:
                        tar.addfile(_tar_info(path, stat.S_IFDIR, 0, "", epoch))
            out.flush()
            out.seek(0)
            return hashlib.file_digest(out, "sha256").hexdigest()
    finally:
        os.close(root_fd)


def _add_member(tar: tarfile.TarFile, root_fd: int, path: str, epoch: int, source: Path) -> None:
    parts = path.split("/")
    where = f"{path!r} in {str(source)!r}"
    try:
        parent = _open_dir_at(root_fd, parts[:-1])
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise OutputError(
                f"cannot archive {where}: a parent directory is a symlink or not a directory"
            ) from e
        raise OutputError(f"cannot archive {where}: {_reason(e)}") from e
    try:
        name = parts[-1]
        try:
            mode = os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode
            if stat.S_ISLNK(mode):
                tar.addfile(_tar_info(path, mode, 0, os.readlink(name, dir_fd=parent), epoch))
            elif stat.S_ISDIR(mode):
                tar.addfile(_tar_info(path, mode, 0, "", epoch))
            elif stat.S_ISREG(mode):
                fd = _open_regular(name, parent)
                if fd is None:
                    raise OSError(errno.ESTALE, "it was replaced while being opened")
                with open(fd, "rb", closefd=True) as f:
                    info = os.fstat(fd)
                    # A file that shrinks while being read makes addfile raise; one that
                    # grows is cut at the size in the header.
                    tar.addfile(_tar_info(path, info.st_mode, info.st_size, "", epoch), f)
            else:
                _tar_info(path, mode, 0, "", epoch)  # raises: not archivable
        except OSError as e:
            raise OutputError(f"cannot archive {where}: {_reason(e)}") from e
    finally:
        os.close(parent)


@contextmanager
def _atomic_target(target: Path) -> Iterator[io.BufferedRandom]:
    """A temporary file beside ``target`` that replaces it only if the block succeeds.

    Raises:
        OutputError: the file cannot be created, written or renamed.
    """
    # Same directory as the target: the rename is atomic and never crosses devices.
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as e:
        raise OutputError(f"cannot write {str(target)!r}: {_reason(e)}") from e
    try:
        with open(fd, "w+b") as out:
            yield out
            out.flush()
            os.fchmod(out.fileno(), 0o644)
            os.fsync(out.fileno())
        os.replace(name, target)
    except BaseException as e:
        with suppress(OSError):
            os.unlink(name)
        if isinstance(e, OSError):
            raise OutputError(f"cannot write {str(target)!r}: {_reason(e)}") from e
        raise


def clamp_mtimes(root: Path, epoch: int) -> None:
    """Set the mtime of ``root`` and of every entry below it to at most ``epoch``.

    Entries already older keep their mtime; access times are kept. Symlinks are changed
    themselves, never followed, and symlinked directories are not descended.

    Raises:
        ConfigError: ``epoch`` is negative.
        OutputError: ``root`` is not a directory (a symlink is not followed), or an entry
            cannot be read or changed.
    """
    limit = _check_epoch(epoch) * 1_000_000_000
    try:
        root_fd = os.open(root, _DIR_FLAGS)
    except OSError as e:
        # With O_DIRECTORY, a symlink can fail with ENOTDIR rather than ELOOP.
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            why = "it is a symlink or not a directory"
        else:
            why = _reason(e)
        raise OutputError(f"cannot clamp mtimes under {str(root)!r}: {why}") from e
    try:
        top = os.fstat(root_fd)
        if top.st_mtime_ns > limit:
            os.utime(root_fd, ns=(top.st_atime_ns, limit))
        for _, fd, entry in _walk(root_fd):
            st = entry.stat(follow_symlinks=False)
            if st.st_mtime_ns > limit:
                os.utime(entry.name, ns=(st.st_atime_ns, limit), dir_fd=fd, follow_symlinks=False)
    except OSError as e:
        raise OutputError(f"cannot clamp mtimes under {str(root)!r}: {_reason(e)}") from e
    finally:
        os.close(root_fd)
