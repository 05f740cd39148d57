"""Read what provenance needs from a git checkout, without running git.

The checkout belongs to whoever wrote the pull request, and so does its git directory:
``config`` can name programs (``core.fsmonitor``, ``gpg.program``, ``core.pager``,
hooks, ``include.path`` to more of them), and a directory laid out as a bare repository
is taken for one by git's discovery. Running git on the host therefore runs the
attacker's programs. This module reads the few things a provenance record needs (the
HEAD commit, its tree, the committer time and whether tracked files were changed) in
pure Python. It executes nothing, reads no configuration at all and follows no link out
of the git directory:

* **Discovery.** Only an entry named ``.git`` that is a *directory* makes a repository:
  in the source directory, else in the nearest ancestor that has one, climbing no
  further than the file system the source is on. A ``.git`` that is a symlink, a
  ``gitdir:`` file (worktrees, submodules) or anything else is reported and not
  followed: its target is a path the checkout chose. The ``.git`` directory must belong
  to the owner of the source directory, to us or to root (git's own ownership rule:
  nobody else's ``/tmp/.git`` describes our source).
* **Object format** comes from the length of the ids in HEAD's refs: 40 hex digits are
  SHA-1, 64 are SHA-256. ``extensions.objectformat`` says the same and is not read.
* **Refs**: ``HEAD`` (a symbolic ref or a detached id), loose refs and ``packed-refs``.
  ``reftable`` storage is not understood (reported, not guessed).
* **Objects**: loose (zlib) and in packs (index version 2, ``OFS_DELTA`` and
  ``REF_DELTA``). Every object read is checked against its id, so a crafted object
  database can make the reader fail but cannot make it report content under an id that
  is not that content's. ``objects/info/alternates`` is not followed; an object that is
  not there (shallow or partial clones, alternates) raises :class:`MissingObjectError`,
  which callers take as "unknown".

The object database is attacker-made, so every size, count and depth is bounded
(``_MAX_*`` below) and malformed data raises :class:`GitReadError` rather than
looping, recursing or allocating without limit. Files of the git directory are opened
``O_PATH|O_NOFOLLOW`` and checked with ``fstat`` before they are read: a fifo or device
is never opened for reading, a symlink never followed, and reads use ``pread`` on the
size ``fstat`` gave (never ``mmap``, whose faults on a truncated file kill the process).

**Dirty** means: some file that HEAD's tree tracks under the source directory differs
from the work tree, comparing raw bytes as a git blob id, the executable bit, and the
kind (a tracked file that is missing, or is now a symlink, directory, fifo or device, is
a difference; a tracked symlink compares by its link text). Untracked files do not
count, nor do submodules (gitlinks). The index is not read, so what git would hide (a
sparse checkout, ``assume-unchanged``, ``core.fileMode=false``, end-of-line or LFS
filters) counts as a difference here: "dirty" may say yes where ``git status`` is
clean, never the other way round. The work tree is walked with directory descriptors
and ``O_NOFOLLOW``: no symlink of the checkout is followed, a fifo is never read, a
file is hashed up to the size ``fstat`` reported.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
import zlib
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from buildcell import _log
from buildcell._fs import Closing, file_kind
from buildcell.confined import UnsafePathError, open_root, reopen
from buildcell.errors import Error

__all__ = [
    "GitHead",
    "GitReadError",
    "MissingObjectError",
    "Repository",
    "read_head",
]

logger = _log.get(__name__)

# --- bounds ---------------------------------------------------------------------------------

_MAX_REF_FILE = 4096  # HEAD and loose refs: one id or "ref: NAME"
_MAX_PACKED_REFS = 64 << 20
_MAX_SYMREF_DEPTH = 5  # as git
_MAX_TAG_DEPTH = 16
# The largest object inflated. Provenance needs commits, trees and tags only: blobs are
# hashed from the work tree, never read from the object database.
_MAX_OBJECT = 64 << 20
# Sum of the bytes inflated and produced while resolving one object: with it a delta
# chain of any shape costs at most a few seconds.
_MAX_WORK = 512 << 20
_MAX_DELTA_DEPTH = 4095  # git's own ceiling for pack.depth
_MAX_PACKS = 4096
_MAX_ANCESTORS = 512  # directories climbed looking for .git
_MAX_TREE_DEPTH = 256  # directory descriptors held at once by the dirty check
_CHUNK = 1 << 20
_INFLATE_CHUNK = 64 << 10

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_GIT = ".git/"  # how messages name the git directory
_CLIMB_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
# O_NONBLOCK: a file swapped for a fifo after the check cannot block the open.
_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
# What opening a tracked path of the work tree reports when it is no longer what the tree
# says: missing, a symlink (never followed) or not a directory.
_GONE = frozenset({errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.ENXIO})

_KINDS = {1: "commit", 2: "tree", 3: "blob", 4: "tag"}
_OFS_DELTA = 6
_REF_DELTA = 7
_ALGORITHMS = {20: "sha1", 32: "sha256"}

_HEX = re.compile(rb"[0-9a-f]{40}(?:[0-9a-f]{24})?")
_PACK_NAME = re.compile(r"pack-([0-9a-f]{40}|[0-9a-f]{64})\.idx")
_IDX_MAGIC = b"\xfftOc"
_IDX_HEADER = 8 + 256 * 4

_MODE_TREE = 0o040000
_MODE_FILE = 0o100644
_MODE_EXEC = 0o100755
_MODE_LINK = 0o120000
_MODE_GITLINK = 0o160000
# 100664 is what very old git wrote for group-writable files; git reads it as 100644.
_MODES = {
    b"40000": _MODE_TREE,
    b"100644": _MODE_FILE,
    b"100664": _MODE_FILE,
    b"100755": _MODE_EXEC,
    b"120000": _MODE_LINK,
    b"160000": _MODE_GITLINK,
}


class GitReadError(Error):
    """A git directory cannot be read: malformed, unsupported, too large, or unsafe."""


class MissingObjectError(GitReadError):
    """An object is not in the repository (a shallow or partial clone, or alternates)."""


@dataclass(frozen=True)
class _TreeEntry:
    """One entry of a tree object: ``mode`` is one of the ``_MODE_*`` values."""

    mode: int
    name: bytes
    oid: bytes


@dataclass(frozen=True)
class GitHead:
    """What a checkout's HEAD says, and whether the work tree still matches it.

    Attributes:
        top: the work tree's top directory (the one holding ``.git``).
        subdirectory: the source directory relative to ``top``; ``""`` for ``top`` itself.
        object_format: ``sha1`` or ``sha256``.
        commit: HEAD's commit id (hex).
        tree: the commit's tree id; ``None`` when the commit object is not there.
        commit_time: the committer time in seconds since 1970, when the commit says.
        dirty: whether a tracked file under the source directory differs from HEAD (see
            the module documentation); ``None`` when it cannot be told.
        dirty_unknown: why ``dirty`` is ``None``, for logs.
    """

    top: Path
    subdirectory: str
    object_format: str
    commit: str
    tree: str | None
    commit_time: int | None
    dirty: bool | None
    dirty_unknown: str | None = None


# --- reading files of the git directory ----------------------------------------------------


class _File:
    """A regular file of the git directory, read with ``pread`` within its ``fstat`` size."""

    def __init__(self, fd: int, size: int, name: str) -> None:
        self.fd = fd
        self.size = size
        self.name = name

    def read(self, offset: int, count: int) -> bytes:
        """Exactly ``count`` bytes at ``offset``.

        Raises:
            GitReadError: they lie beyond the end, or the file shrank.
        """
        if offset < 0 or count < 0 or offset + count > self.size:
            raise GitReadError(f"{self.name} is truncated or has an offset out of range")
        parts: list[bytes] = []
        while count:
            try:
                data = os.pread(self.fd, count, offset)
            except OSError as e:
                raise GitReadError(f"cannot read {self.name}: {e.strerror}") from e
            if not data:
                raise GitReadError(f"{self.name} shrank while it was read")
            parts.append(data)
            offset += len(data)
            count -= len(data)
        return b"".join(parts)

    def read_upto(self, offset: int, count: int) -> bytes:
        """Up to ``count`` bytes at ``offset``, fewer at the end of the file."""
        return self.read(offset, max(0, min(count, self.size - offset)))

    def all(self) -> bytes:
        return self.read(0, self.size)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _open_dir(dir_fd: int, parts: Sequence[str], where: str) -> int | None:
    """Open a directory below ``dir_fd`` with no symlink on the way; ``None`` if missing.

    ``where`` is how messages name ``dir_fd`` (``.git/objects/``).

    Raises:
        GitReadError: a component is a symlink or not a directory.
    """
    fd = os.dup(dir_fd)
    try:
        for i, name in enumerate(parts):
            try:
                sub = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                os.close(fd)
                return None
            except OSError as e:
                shown = where + "/".join(parts[: i + 1])
                raise GitReadError(
                    f"{shown} is a symlink or not a directory; buildcell does not follow it"
                    if e.errno in (errno.ELOOP, errno.ENOTDIR)
                    else f"cannot open {shown}: {e.strerror}"
                ) from e
            os.close(fd)
            fd = sub
    except BaseException:
        with suppress(OSError):
            os.close(fd)
        raise
    return fd


def _open_file(dir_fd: int, parts: Sequence[str], where: str, limit: int) -> _File | None:
    """Open a regular file below ``dir_fd`` for reading; ``None`` if it does not exist.

    The file is opened ``O_PATH`` first and checked with ``fstat``: a symlink, fifo or
    device is refused without being opened for reading.

    Raises:
        GitReadError: it is not a regular file, is larger than ``limit``, or a directory
            on the way is a symlink.
    """
    what = where + "/".join(parts)
    parent = _open_dir(dir_fd, parts[:-1], where)
    if parent is None:
        return None
    try:
        try:
            path_fd = os.open(parts[-1], _PATH_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise GitReadError(f"cannot open {what}: {e.strerror}") from e
    finally:
        os.close(parent)
    try:
        st = os.fstat(path_fd)
        if not stat.S_ISREG(st.st_mode):
            raise GitReadError(
                f"{what} is a {file_kind(st.st_mode)}, not a regular file; "
                "buildcell neither follows nor opens it"
            )
        if st.st_size > limit:
            raise GitReadError(f"{what} is larger than {limit} bytes")
        try:
            fd = reopen(path_fd, _READ_FLAGS)
        except OSError as e:
            raise GitReadError(f"cannot open {what}: {e.strerror}") from e
    finally:
        os.close(path_fd)
    return _File(fd, st.st_size, what)


def _read_small(dir_fd: int, parts: Sequence[str], where: str, limit: int) -> bytes | None:
    f = _open_file(dir_fd, parts, where, limit)
    if f is None:
        return None
    try:
        return f.all()
    finally:
        f.close()


# --- pure parsers ------------------------------------------------------------------------------


def _hex_id(text: bytes, what: str) -> str:
    if not _HEX.fullmatch(text):
        raise GitReadError(f"{what} is not an object id (40 or 64 lowercase hex digits)")
    return text.decode()


def _check_refname(name: bytes, what: str) -> str:
    """A ref name as git's ``check_refname_format`` would accept it, below ``refs/``."""
    try:
        text = name.decode("ascii")
    except UnicodeDecodeError:
        text = ""
    parts = text.split("/")
    bad = (
        not text.startswith("refs/")
        or len(text) > 1024
        or any(c < " " or c in " ~^:?*[\\\x7f" for c in text)
        or "@{" in text
        or ".." in text
        or text.endswith((".", "/", ".lock"))
        or any(not p or p.startswith(".") or p.endswith(".lock") for p in parts)
    )
    if bad:
        raise GitReadError(f"{what} names an invalid ref")
    return text


def _varint(data: bytes | bytearray, pos: int) -> tuple[int, int]:
    """The little-endian base-128 number of a delta header at ``pos``; (value, next pos)."""
    value = shift = 0
    for _ in range(10):
        if pos >= len(data):
            break
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos
    raise GitReadError("malformed delta: truncated or overlong size")


def _apply_delta(base: bytes, delta: bytes, *, limit: int = _MAX_OBJECT) -> bytes:
    """Apply a git delta (copy and insert instructions) to ``base``.

    Raises:
        GitReadError: the delta is malformed, does not fit ``base``, or its result would
            be larger than ``limit``.
    """
    source_size, pos = _varint(delta, 0)
    target_size, pos = _varint(delta, pos)
    if source_size != len(base):
        raise GitReadError("malformed delta: it was made for a base of another size")
    if target_size > limit:
        raise GitReadError(f"delta result larger than {limit} bytes")
    out = bytearray()
    end = len(delta)
    try:
        while pos < end:
            op = delta[pos]
            pos += 1
            if op & 0x80:
                offset = size = 0
                for i in range(4):
                    if op & (1 << i):
                        offset |= delta[pos] << (8 * i)
                        pos += 1
                for i in range(3):
                    if op & (0x10 << i):
                        size |= delta[pos] << (8 * i)
                        pos += 1
                size = size or 0x10000
                if offset + size > len(base) or len(out) + size > target_size:
                    raise GitReadError("malformed delta: a copy reaches outside its base")
                out += base[offset : offset + size]
            elif op:
                if pos + op > end or len(out) + op > target_size:
                    raise GitReadError("malformed delta: an insert is truncated or too long")
                out += delta[pos : pos + op]
                pos += op
            else:
                raise GitReadError("malformed delta: reserved instruction 0")
    except IndexError as e:
        raise GitReadError("malformed delta: truncated instruction") from e
    if len(out) != target_size:
        raise GitReadError("malformed delta: the result has another size than announced")
    return bytes(out)


def _parse_tree(data: bytes, hash_len: int) -> list[_TreeEntry]:
    """The entries of a tree object's content.

    Raises:
        GitReadError: an entry is malformed, has an unknown mode, or an unsafe name
            (empty, ``.``, ``..``, or containing ``/``).
    """
    entries: list[_TreeEntry] = []
    pos, end = 0, len(data)
    while pos < end:
        space = data.find(b" ", pos, pos + 8)
        nul = data.find(b"\0", space + 1) if space >= 0 else -1
        if space < 0 or nul < 0 or nul + 1 + hash_len > end:
            raise GitReadError("malformed tree object: truncated entry")
        mode = _MODES.get(data[pos:space])
        if mode is None:
            raise GitReadError("malformed tree object: unknown file mode")
        name = data[space + 1 : nul]
        if name in (b"", b".", b"..") or b"/" in name:
            raise GitReadError("malformed tree object: unsafe entry name")
        entries.append(_TreeEntry(mode, name, data[nul + 1 : nul + 1 + hash_len]))
        pos = nul + 1 + hash_len
    return entries


@dataclass(frozen=True)
class _Commit:
    tree: str
    commit_time: int | None


def _parse_commit(data: bytes) -> _Commit:
    """The tree and committer time of a commit object's content.

    Raises:
        GitReadError: it does not start with a ``tree`` line.
    """
    header, _, _ = data.partition(b"\n\n")
    lines = header.split(b"\n")
    if not lines[0].startswith(b"tree "):
        raise GitReadError("malformed commit object: no tree line")
    tree = _hex_id(lines[0][5:], "the commit's tree")
    when: int | None = None
    for line in lines[1:]:
        if line.startswith(b"committer "):
            # "committer NAME <EMAIL> SECONDS ZONE": the time follows the last '>'.
            fields = line.rpartition(b">")[2].split()
            if fields and fields[0].isdigit() and len(fields[0]) <= 18:
                when = int(fields[0])
            break
    return _Commit(tree, when)


def _parse_tag_target(data: bytes) -> str:
    first = data.split(b"\n", 1)[0]
    if not first.startswith(b"object "):
        raise GitReadError("malformed tag object: no object line")
    return _hex_id(first[7:], "the tag's object")


# --- object storage ----------------------------------------------------------------------------


def _inflate(read: Callable[[], bytes], limit: int, exact: int | None, what: str) -> bytes:
    """Inflate one zlib stream fed by ``read`` (``b""`` once it has no more input).

    The result must be exactly ``exact`` bytes when that is given, else at most ``limit``.

    Raises:
        GitReadError: the stream is corrupt, truncated, or yields a size not allowed.
    """
    bound = limit if exact is None else exact
    d = zlib.decompressobj()
    out: list[bytes] = []
    got = 0
    pending = b""
    try:
        while not d.eof:
            if not pending:
                pending = read()
            # max_length one past the bound: more than allowed shows at once. It is never
            # 0 (which would mean "unlimited").
            part = d.decompress(pending, bound + 1 - got)
            got += len(part)
            if got > bound:
                raise GitReadError(f"{what}: an object is larger than announced or allowed")
            tail = d.unconsumed_tail
            if not part and len(tail) == len(pending) and not d.eof:
                raise GitReadError(f"{what}: compressed data is truncated")
            out.append(part)
            pending = tail
    except zlib.error as e:
        raise GitReadError(f"{what}: corrupt compressed data ({e})") from e
    if exact is not None and got != exact:
        raise GitReadError(f"{what}: an object is smaller than announced")
    return b"".join(out)


def _reader(source: _File, offset: int, end: int) -> Callable[[], bytes]:
    """Successive chunks of ``source`` from ``offset`` up to ``end``, then ``b""``."""
    position = [offset]

    def read() -> bytes:
        chunk = source.read_upto(position[0], min(_INFLATE_CHUNK, end - position[0]))
        position[0] += len(chunk)
        return chunk

    return read


class _Pack:
    """One ``pack-*.pack`` with its version 2 index."""

    def __init__(self, idx: _File, pack: _File, hash_len: int) -> None:
        self.idx = idx
        self.pack = pack
        self.hash_len = hash_len
        header = idx.read(0, min(idx.size, _IDX_HEADER))
        if len(header) < _IDX_HEADER or header[:4] != _IDX_MAGIC:
            raise GitReadError(f"{idx.name}: not a version 2 pack index")
        if int.from_bytes(header[4:8], "big") != 2:
            raise GitReadError(f"{idx.name}: unsupported pack index version")
        fanout = [int.from_bytes(header[8 + 4 * i : 12 + 4 * i], "big") for i in range(256)]
        if any(fanout[i] > fanout[i + 1] for i in range(255)):
            raise GitReadError(f"{idx.name}: corrupt fan-out table")
        count = fanout[-1]
        # The file's size bounds the count: an index cannot claim more objects than it
        # has room for (names, CRCs, offsets and two checksums).
        fixed = _IDX_HEADER + 2 * hash_len
        if count > (idx.size - fixed) // (hash_len + 8):
            raise GitReadError(f"{idx.name}: claims more objects than the file holds")
        rest = idx.size - fixed - count * (hash_len + 8)
        if rest % 8 or rest // 8 > count:
            raise GitReadError(f"{idx.name}: corrupt large-offset table")
        self.fanout = fanout
        self.count = count
        self.large = rest // 8
        self.names_at = _IDX_HEADER
        self.offsets_at = _IDX_HEADER + count * (hash_len + 4)
        self.large_at = self.offsets_at + count * 4
        head = pack.read_upto(0, 12)
        if len(head) < 12 or head[:4] != b"PACK" or int.from_bytes(head[4:8], "big") not in (2, 3):
            raise GitReadError(f"{pack.name}: not a pack file")
        if int.from_bytes(head[8:12], "big") != count or pack.size < 12 + hash_len:
            raise GitReadError(f"{pack.name}: does not match its index")
        self.data_end = pack.size - hash_len

    def find(self, oid: bytes) -> int | None:
        """The offset of ``oid`` in the pack, or ``None``."""
        lo = self.fanout[oid[0] - 1] if oid[0] else 0
        hi = self.fanout[oid[0]]
        size = self.hash_len
        while lo < hi:
            mid = (lo + hi) // 2
            name = self.idx.read(self.names_at + mid * size, size)
            if name == oid:
                return self._offset(mid)
            if name < oid:
                lo = mid + 1
            else:
                hi = mid
        return None

    def _offset(self, i: int) -> int:
        small = int.from_bytes(self.idx.read(self.offsets_at + 4 * i, 4), "big")
        if small & 0x80000000:
            j = small & 0x7FFFFFFF
            if j >= self.large:
                raise GitReadError(f"{self.idx.name}: large offset out of range")
            small = int.from_bytes(self.idx.read(self.large_at + 8 * j, 8), "big")
        if not 12 <= small < self.data_end:
            raise GitReadError(f"{self.idx.name}: object offset out of range")
        return small

    def entry(self, offset: int) -> tuple[int, int, int, int | bytes | None]:
        """(type, size, offset of the zlib data, delta base: offset, id or ``None``).

        Raises:
            GitReadError: the entry header is malformed.
        """
        if not 12 <= offset < self.data_end:
            raise GitReadError(f"{self.pack.name}: object offset out of range")
        head = self.pack.read_upto(offset, 20 + self.hash_len)
        byte = head[0]
        kind = (byte >> 4) & 7
        size = byte & 0x0F
        shift, pos = 4, 1
        while byte & 0x80:
            if pos >= len(head) or shift > 60:
                raise GitReadError(f"{self.pack.name}: malformed object header")
            byte = head[pos]
            pos += 1
            size |= (byte & 0x7F) << shift
            shift += 7
        base: int | bytes | None = None
        if kind == _OFS_DELTA:
            if pos >= len(head):
                raise GitReadError(f"{self.pack.name}: truncated delta header")
            byte = head[pos]
            pos += 1
            distance = byte & 0x7F
            for _ in range(9):
                if not byte & 0x80:
                    break
                if pos >= len(head):
                    raise GitReadError(f"{self.pack.name}: truncated delta header")
                byte = head[pos]
                pos += 1
                distance = ((distance + 1) << 7) | (byte & 0x7F)
            else:
                raise GitReadError(f"{self.pack.name}: overlong delta offset")
            # Bases lie before their deltas: an OFS_DELTA chain always ends.
            if not 0 < distance <= offset - 12:
                raise GitReadError(f"{self.pack.name}: delta base offset out of range")
            base = offset - distance
        elif kind == _REF_DELTA:
            if pos + self.hash_len > len(head):
                raise GitReadError(f"{self.pack.name}: truncated delta header")
            base = head[pos : pos + self.hash_len]
            pos += self.hash_len
        elif kind not in _KINDS:
            raise GitReadError(f"{self.pack.name}: unknown object type {kind}")
        return kind, size, offset + pos, base

    def inflate(self, offset: int, size: int) -> bytes:
        # zlib never makes data much larger than stored blocks would: twice the size
        # plus a chunk is beyond any encoder, and stops a stream of empty blocks early.
        end = min(self.data_end, offset + 2 * size + _INFLATE_CHUNK)
        return _inflate(_reader(self.pack, offset, end), size, size, self.pack.name)

    def close(self) -> None:
        self.idx.close()
        self.pack.close()


class _ObjectStore:
    """The ``objects`` directory of one object format: packs first, then loose objects."""

    def __init__(self, git_fd: int, hash_len: int) -> None:
        self.hash_len = hash_len
        self.algorithm = _ALGORITHMS[hash_len]
        objects = _open_dir(git_fd, ["objects"], _GIT)
        if objects is None:
            raise GitReadError(f"{_GIT}objects does not exist")
        self.objects_fd = objects
        self.packs: list[_Pack] = []
        try:
            self._load_packs()
        except BaseException:
            self.close()
            raise

    def _load_packs(self) -> None:
        pack_dir = _open_dir(self.objects_fd, ["pack"], f"{_GIT}objects/")
        if pack_dir is None:
            return
        where = f"{_GIT}objects/pack/"
        try:
            try:
                names = sorted(n for n in os.listdir(pack_dir) if _PACK_NAME.fullmatch(n))
            except OSError as e:
                raise GitReadError(f"cannot list {where}: {e.strerror}") from e
            if len(names) > _MAX_PACKS:
                raise GitReadError(f"{where} holds more than {_MAX_PACKS} packs")
            for name in names:
                if len(name) - len("pack-.idx") != 2 * self.hash_len:
                    raise GitReadError(f"{where}{name} is of another object format")
                limit = 1 << 62  # read in pieces; only the index's own size bounds it
                idx = _open_file(pack_dir, [name], where, limit)
                if idx is None:
                    continue
                pack_name = name[:-4] + ".pack"
                try:
                    pack = _open_file(pack_dir, [pack_name], where, limit)
                except BaseException:
                    idx.close()
                    raise
                if pack is None:  # an index without its pack is ignored, as by git
                    idx.close()
                    continue
                try:
                    self.packs.append(_Pack(idx, pack, self.hash_len))
                except BaseException:
                    idx.close()
                    pack.close()
                    raise
        finally:
            os.close(pack_dir)

    def close(self) -> None:
        for pack in self.packs:
            pack.close()
        self.packs = []
        if self.objects_fd >= 0:
            os.close(self.objects_fd)
            self.objects_fd = -1

    def _find_packed(self, oid: bytes) -> tuple[_Pack, int] | None:
        for pack in self.packs:
            offset = pack.find(oid)
            if offset is not None:
                return pack, offset
        return None

    def read(self, oid: bytes) -> tuple[str, bytes]:
        """(kind, content) of an object, checked against its id.

        Raises:
            MissingObjectError: it is not in this repository.
            GitReadError: it is malformed, too large or does not match its id.
        """
        if len(oid) != self.hash_len:
            raise GitReadError("object id of another object format")
        budget = [_MAX_WORK]
        found = self._find_packed(oid)
        if found is not None:
            kind, data = self._read_packed(*found, budget)
        else:
            loose = self._read_loose(oid)
            if loose is None:
                raise MissingObjectError(f"object {oid.hex()} is not in the repository")
            kind, data = loose
        digest = hashlib.new(self.algorithm, b"%s %d\0" % (kind.encode(), len(data)))
        digest.update(data)
        if digest.digest() != oid:
            raise GitReadError(f"object {oid.hex()} does not match its id (corrupt or forged)")
        return kind, data

    def _read_loose(self, oid: bytes) -> tuple[str, bytes] | None:
        name = oid.hex()
        where = f"{_GIT}objects/"
        f = _open_file(
            self.objects_fd, [name[:2], name[2:]], where, 2 * _MAX_OBJECT + _INFLATE_CHUNK
        )
        if f is None:
            return None
        try:
            return _parse_loose(f)
        finally:
            f.close()

    def _read_packed(self, pack: _Pack, offset: int, budget: list[int]) -> tuple[str, bytes]:
        deltas: list[bytes] = []
        for _ in range(_MAX_DELTA_DEPTH + 1):
            kind, size, at, base = pack.entry(offset)
            if size > _MAX_OBJECT:
                raise GitReadError(
                    f"{pack.pack.name}: an object is larger than {_MAX_OBJECT} bytes"
                )
            _spend(budget, size)
            if base is None:
                data = pack.inflate(at, size)
                break
            deltas.append(pack.inflate(at, size))
            if isinstance(base, int):
                offset = base
                continue
            found = self._find_packed(base)
            if found is None:
                # A REF_DELTA base outside the packs (a thin pack completed by hand).
                loose = self._read_loose(base)
                if loose is None:
                    raise MissingObjectError(f"delta base {base.hex()} is not in the repository")
                kind_name, data = loose
                _spend(budget, len(data))
                return kind_name, _apply_all(data, deltas, budget)
            pack, offset = found
        else:
            raise GitReadError(f"delta chain longer than {_MAX_DELTA_DEPTH}")
        return _KINDS[kind], _apply_all(data, deltas, budget)


def _spend(budget: list[int], amount: int) -> None:
    budget[0] -= amount
    if budget[0] < 0:
        raise GitReadError(f"resolving one object needs more than {_MAX_WORK} bytes of work")


def _apply_all(data: bytes, deltas: list[bytes], budget: list[int]) -> bytes:
    for delta in reversed(deltas):
        data = _apply_delta(data, delta)
        _spend(budget, len(data))
    return data


def _parse_loose(f: _File) -> tuple[str, bytes]:
    """(kind, content) of a loose object file: zlib of ``KIND SIZE\\0CONTENT``.

    Raises:
        GitReadError: it is malformed or larger than allowed.
    """
    data = _inflate(_reader(f, 0, f.size), _MAX_OBJECT + 32, None, f.name)
    nul = data.find(b"\0", 0, 32)
    kind, _, size = data[: max(nul, 0)].partition(b" ")
    if nul < 0 or kind.decode("ascii", "replace") not in _KINDS.values() or not size.isdigit():
        raise GitReadError(f"{f.name}: malformed loose object header")
    if int(size) != len(data) - nul - 1:
        raise GitReadError(f"{f.name}: object size does not match its header")
    return kind.decode(), data[nul + 1 :]


# --- the repository ----------------------------------------------------------------------------


class Repository(Closing):
    """A git directory opened for reading (see the module documentation).

    Args:
        git_fd: a descriptor of the git directory; it is duplicated, the caller keeps its own.
    """

    def __init__(self, git_fd: int) -> None:
        self._fd = os.dup(git_fd)
        self._stores: dict[int, _ObjectStore] = {}

    @classmethod
    def open(cls, git_dir: Path) -> Repository:
        """Open the git directory ``git_dir`` (itself not a symlink).

        Raises:
            GitReadError: it is not a directory.
        """
        try:
            fd = os.open(git_dir, _DIR_FLAGS)
        except OSError as e:
            raise GitReadError(f"cannot open git directory {git_dir}: {e.strerror}") from e
        try:
            return cls(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        for store in self._stores.values():
            store.close()
        self._stores = {}
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # refs

    def head(self) -> str | None:
        """HEAD's object id (hex), or ``None`` when HEAD names a branch with no commit yet.

        Raises:
            GitReadError: HEAD is missing or malformed, or names an invalid ref.
        """
        content = _read_small(self._fd, ["HEAD"], _GIT, _MAX_REF_FILE)
        if content is None:
            raise GitReadError(f"{_GIT}HEAD does not exist: this is no git directory")
        for _ in range(_MAX_SYMREF_DEPTH):
            value = content.rstrip(b" \t\r\n")
            if not value.startswith(b"ref:"):
                return _hex_id(value, "HEAD")
            target = value[4:].strip(b" \t")
            # What git writes in HEAD when the refs live in a reftable.
            if target == b"refs/heads/.invalid" or self._has("reftable"):
                raise GitReadError("the repository keeps its refs in a reftable (not read)")
            found = self._ref(_check_refname(target, "HEAD"))
            if found is None:
                return None
            content = found
        raise GitReadError(f"HEAD is a chain of more than {_MAX_SYMREF_DEPTH} symbolic refs")

    def _has(self, name: str) -> bool:
        try:
            os.stat(name, dir_fd=self._fd, follow_symlinks=False)
        except OSError:
            return False
        return True

    def _ref(self, name: str) -> bytes | None:
        loose = _read_small(self._fd, name.split("/"), _GIT, _MAX_REF_FILE)
        if loose is not None:
            return loose
        packed = _open_file(self._fd, ["packed-refs"], _GIT, _MAX_PACKED_REFS)
        if packed is None:
            return None
        try:
            data = packed.all()
        finally:
            packed.close()
        wanted = name.encode()
        for line in data.split(b"\n"):
            if not line or line.startswith((b"#", b"^")):
                continue
            oid, sep, ref = line.rstrip(b"\r").partition(b" ")
            if not sep:
                raise GitReadError("packed-refs has a malformed line")
            if ref == wanted:
                return oid
        return None

    # objects

    def _store(self, hash_len: int) -> _ObjectStore:
        store = self._stores.get(hash_len)
        if store is None:
            if self._stores:
                raise GitReadError("the repository mixes object formats")
            store = self._stores[hash_len] = _ObjectStore(self._fd, hash_len)
        return store

    def read_object(self, oid: str) -> tuple[str, bytes]:
        """(kind, content) of the object ``oid`` (hex): ``commit``, ``tree``, ``blob``, ``tag``.

        Raises:
            MissingObjectError: the object is not in the repository.
            GitReadError: it, or the object database, is malformed or too large.
        """
        raw = bytes.fromhex(_hex_id(oid.encode(), "object id"))
        return self._store(len(raw)).read(raw)

    def _read_kind(self, oid: str, kind: str) -> bytes:
        found, data = self.read_object(oid)
        if found != kind:
            raise GitReadError(f"object {oid} is a {found}, not a {kind}")
        return data

    def commit_of(self, oid: str) -> str:
        """The commit ``oid`` names: itself, or the target of a (chain of) annotated tags.

        Raises:
            MissingObjectError, GitReadError: as :meth:`read_object`; or it is no commit.
        """
        for _ in range(_MAX_TAG_DEPTH):
            kind, data = self.read_object(oid)
            if kind == "commit":
                return oid
            if kind != "tag":
                raise GitReadError(f"HEAD names a {kind}, not a commit")
            oid = _parse_tag_target(data)
        raise GitReadError(f"more than {_MAX_TAG_DEPTH} tags in a row")

    def read_commit(self, oid: str) -> tuple[str, int | None]:
        """(tree id, committer time) of the commit ``oid``.

        Raises:
            MissingObjectError, GitReadError: as :meth:`read_object`.
        """
        commit = _parse_commit(self._read_kind(oid, "commit"))
        return commit.tree, commit.commit_time

    def _read_tree(self, oid: str) -> list[_TreeEntry]:
        """The entries of the tree ``oid``.

        Raises:
            MissingObjectError, GitReadError: as :meth:`read_object`.
        """
        return _parse_tree(self._read_kind(oid, "tree"), len(oid) // 2)

    # the work tree

    def _subtree(self, tree: str, parts: Sequence[str]) -> str | None:
        """The id of the tree at ``parts`` below ``tree``; ``None`` if it has none there.

        Raises:
            MissingObjectError, GitReadError: as :meth:`read_object`.
        """
        for name in parts:
            wanted = os.fsencode(name)
            entry = next((e for e in self._read_tree(tree) if e.name == wanted), None)
            if entry is None or entry.mode != _MODE_TREE:
                return None
            tree = entry.oid.hex()
        return tree

    def worktree_differs(self, tree: str, dir_fd: int) -> bool:
        """Whether a file tracked by ``tree`` differs from the directory ``dir_fd``.

        Stops at the first difference (see the module documentation for what counts).

        Raises:
            MissingObjectError: a tree object is not in the repository.
            GitReadError: a tree is malformed, nested too deeply, or a tracked file
                cannot be read.
        """
        return self._differs(tree, dir_fd, "", 0)

    def _differs(self, tree: str, dir_fd: int, where: str, depth: int) -> bool:
        if depth >= _MAX_TREE_DEPTH:
            raise GitReadError(f"the tree nests deeper than {_MAX_TREE_DEPTH} directories")
        entries = self._read_tree(tree)
        try:
            with os.scandir(dir_fd) as it:
                present = {os.fsencode(e.name): e for e in it}
        except OSError as e:
            raise GitReadError(f"cannot list {where or '.'}: {e.strerror}") from e
        algorithm = _ALGORITHMS[len(tree) // 2]
        for entry in entries:
            if entry.mode == _MODE_GITLINK:
                continue
            found = present.get(entry.name)
            if found is None:
                return True
            rel = f"{where}{os.fsdecode(entry.name)}"
            try:
                if self._entry_differs(entry, found, algorithm, dir_fd, rel=rel, depth=depth):
                    return True
            except OSError as e:
                if e.errno in _GONE:
                    return True
                raise GitReadError(f"cannot read the tracked file {rel!r}: {e.strerror}") from e
        return False

    def _entry_differs(
        self,
        entry: _TreeEntry,
        found: os.DirEntry[str],
        algorithm: str,
        dir_fd: int,
        *,
        rel: str,
        depth: int,
    ) -> bool:
        """Whether one tracked entry differs from what the work tree has in its place."""
        if entry.mode == _MODE_TREE:
            if not found.is_dir(follow_symlinks=False):
                return True
            try:
                sub = os.open(entry.name, _DIR_FLAGS, dir_fd=dir_fd)
            except OSError as e:
                if e.errno in _GONE:
                    return True
                raise
            try:
                return self._differs(entry.oid.hex(), sub, rel + "/", depth + 1)
            finally:
                os.close(sub)
        if entry.mode == _MODE_LINK:
            if not found.is_symlink():
                return True
            return _blob_id(algorithm, os.readlink(entry.name, dir_fd=dir_fd)) != entry.oid
        return not found.is_file(follow_symlinks=False) or _file_differs(algorithm, entry, dir_fd)


def _blob_id(algorithm: str, data: bytes) -> bytes:
    digest = hashlib.new(algorithm, b"blob %d\0" % len(data))
    digest.update(data)
    return digest.digest()


def _file_differs(algorithm: str, entry: _TreeEntry, dir_fd: int) -> bool:
    """Whether the work tree's regular file for ``entry`` differs from its blob.

    Raises:
        OSError: it cannot be opened or read.
    """
    fd = os.open(entry.name, _READ_FLAGS | os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return True  # swapped for a fifo or device since the listing: never read
        if bool(st.st_mode & stat.S_IXUSR) != (entry.mode == _MODE_EXEC):
            return True
        digest = hashlib.new(algorithm, b"blob %d\0" % st.st_size)
        left = st.st_size
        while left:
            chunk = os.read(fd, min(_CHUNK, left))
            if not chunk:
                return True  # shrank while read
            digest.update(chunk)
            left -= len(chunk)
        return digest.digest() != entry.oid
    finally:
        os.close(fd)


# --- discovery ---------------------------------------------------------------------------------


@dataclass
class _Found:
    top_fd: int
    git_fd: int
    top: Path
    subdirectory: tuple[str, ...]

    def close(self) -> None:
        os.close(self.git_fd)
        os.close(self.top_fd)


def _discover(path: Path) -> _Found | None:
    """The work tree holding ``path`` and its ``.git`` directory, climbing from ``path``.

    Raises:
        GitReadError: the nearest ``.git`` is not a directory, belongs to someone else,
            or the climb met a directory that changed under it.
        UnsafePathError: ``path`` is not a directory.
    """
    fd = open_root(path, what="source directory")
    try:
        source_owner = os.fstat(fd).st_uid
        try:
            here = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # no /proc: the same path, resolved by name
            here = os.path.realpath(path)
        names: list[str] = []
        for _ in range(_MAX_ANCESTORS):
            try:
                st: os.stat_result | None = os.stat(".git", dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            except OSError as e:
                # An ancestor we may not search (rootless, a 0711 parent): the climb ends.
                logger.debug("looking for .git in %s: %s", here, e.strerror)
                return None
            if st is not None:
                shown = os.path.join(here, ".git")
                if not stat.S_ISDIR(st.st_mode):
                    kind = "gitdir file" if stat.S_ISREG(st.st_mode) else file_kind(st.st_mode)
                    raise GitReadError(
                        f"{shown} is a {kind}; only a .git directory is read, never followed"
                    )
                if st.st_uid not in (source_owner, os.geteuid(), 0):
                    raise GitReadError(
                        f"{shown} belongs to uid {st.st_uid}, not to the source's owner"
                    )
                try:
                    git_fd = os.open(".git", _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    raise GitReadError(f"cannot open {shown}: {e.strerror}") from e
                found = _Found(fd, git_fd, Path(here), tuple(reversed(names)))
                fd = -1
                return found
            current = os.fstat(fd)
            try:
                # O_PATH: climbing needs no read permission on the ancestors.
                parent = os.open("..", _CLIMB_FLAGS, dir_fd=fd)
            except OSError as e:
                logger.debug("climbing above %s: %s", here, e.strerror)
                return None
            above = os.fstat(parent)
            name = os.path.basename(here)
            same_dir = (above.st_dev, above.st_ino) == (current.st_dev, current.st_ino)
            # Like git, discovery stays on the source's file system.
            if same_dir or above.st_dev != current.st_dev or not name:
                os.close(parent)
                return None
            try:
                named = os.stat(name, dir_fd=parent, follow_symlinks=False)
            except OSError:
                named = None
            if named is None or (named.st_dev, named.st_ino) != (current.st_dev, current.st_ino):
                os.close(parent)
                raise GitReadError(f"{here} moved while its repository was looked for")
            names.append(name)
            here = os.path.dirname(here)
            os.close(fd)
            fd = parent
        return None
    finally:
        if fd >= 0:
            os.close(fd)


def read_head(path: Path) -> GitHead | None:
    """Describe the git checkout holding the directory ``path``.

    Returns:
        ``None`` when ``path`` is in no git work tree, or its HEAD has no commit yet.

    Raises:
        GitReadError: the repository cannot be read safely (the message says why).
    """
    try:
        found = _discover(path)
    except UnsafePathError as e:
        raise GitReadError(e.message) from e
    if found is None:
        return None
    try:
        with Repository(found.git_fd) as repo:
            head = repo.head()
            if head is None:
                return None
            fmt = _ALGORITHMS[len(head) // 2]
            sub = "/".join(found.subdirectory)
            try:
                commit = repo.commit_of(head)
                tree, when = repo.read_commit(commit)
            except MissingObjectError as e:
                return GitHead(found.top, sub, fmt, head, None, None, None, str(e))
            try:
                dirty, why = _dirty(repo, tree, found), None
            except GitReadError as e:
                dirty, why = None, e.message
            return GitHead(found.top, sub, fmt, commit, tree, when, dirty, why)
    finally:
        found.close()


def _dirty(repo: Repository, tree: str, found: _Found) -> bool:
    subtree = repo._subtree(tree, found.subdirectory)
    if subtree is None:
        return True  # the source directory is not part of the commit at all
    # "." last: the top may be held as an O_PATH descriptor, which cannot be listed.
    fd = _open_dir(found.top_fd, [*found.subdirectory, "."], "source ")
    if fd is None:
        raise GitReadError("the source directory vanished")
    try:
        return repo.worktree_differs(subtree, fd)
    finally:
        os.close(fd)
