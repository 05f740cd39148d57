"""What the source of a build was: a git commit and tree, and a digest of the files.

The source directory is the repository's, so nothing here runs a program or follows a path
that it chose. Git metadata is read by :mod:`buildcell.supply.gitread`, which executes nothing
and reads no git configuration (running ``git`` would run the ``core.fsmonitor``,
``gpg.program`` or hooks that a pull request put in a ``.git/config``). The digest walks
the tree with directory descriptors: every name is opened relative to its parent with
``O_NOFOLLOW``, a symlink is recorded by its link text and never followed, and a fifo,
socket or device is recorded by its kind and never opened.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from buildcell import _log
from buildcell.confined import open_root
from buildcell.errors import ConfigError
from buildcell.supply.gitread import GitReadError, read_head

__all__ = ["SourceInfo", "describe_source", "tree_digest", "tree_digest_at"]

logger = _log.get(__name__)

_EXCLUDED = frozenset({".git"})
_CHUNK = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a file swapped for a fifo after the listing opens at once instead of waiting
# for a writer; O_NOCTTY: a terminal never becomes our controlling tty.
_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class SourceInfo:
    """Identity of a source directory, for provenance and ``SOURCE_DATE_EPOCH``.

    Attributes:
        path: the source directory, as opened.
        git_commit: HEAD's commit id when the directory is in a git checkout.
        git_tree: that commit's tree id (``None`` when the commit object is absent).
        commit_time: the commit's committer time (seconds since 1970).
        sha256: :func:`tree_digest` of the files as built.
        dirty: whether a tracked file under ``path`` differs from the commit; ``None``
            when unknown or not a git checkout (see :mod:`buildcell.supply.gitread`).
        annotations: extra facts for provenance (``subdirectory`` of the checkout, why
            git metadata could not be read).
    """

    path: Path
    git_commit: str | None = None
    git_tree: str | None = None
    commit_time: int | None = None
    sha256: str | None = None
    annotations: dict[str, Any] = field(default_factory=dict)
    dirty: bool | None = None

    def to_parameter(self) -> dict[str, Any]:
        """The source as a provenance parameter: uri, digest and annotations."""
        digest: dict[str, str] = {}
        if self.git_commit:
            digest["gitCommit"] = self.git_commit
        if self.git_tree:
            digest["gitTree"] = self.git_tree
        if self.sha256:
            digest["sha256"] = self.sha256
        uri = ("git+" if self.git_commit else "") + self.path.as_uri()
        parameter: dict[str, Any] = {"uri": uri, "digest": digest}
        annotations = dict(self.annotations)
        if self.dirty is not None:
            annotations["dirty"] = self.dirty
        if annotations:
            parameter["annotations"] = annotations
        return parameter


def _identities(paths: tuple[Path, ...]) -> frozenset[tuple[int, int]]:
    """(device, inode) of each path that exists; the operator's paths, so followed."""
    found: set[tuple[int, int]] = set()
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        found.add((st.st_dev, st.st_ino))
    return frozenset(found)


def _special_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode):
        return "char-device"
    if stat.S_ISBLK(mode):
        return "block-device"
    return "unknown"


def _line(text: str) -> bytes:
    return text.encode(errors="surrogateescape")


class _Digest:
    """The listing of one tree, built by walking it with directory descriptors."""

    def __init__(self, root: Path, excluded: frozenset[tuple[int, int]]) -> None:
        self.root = root
        self.excluded = excluded
        self.lines: list[bytes] = []

    def _error(self, rel: str, e: OSError) -> ConfigError:
        return ConfigError(f"cannot read {str(self.root / rel)!r} of the source: {e.strerror}")

    def walk(self, root_fd: int) -> None:
        # One descriptor per level of the current path, not per pending directory: a
        # wide tree cannot exhaust descriptors.
        stack: list[tuple[int, str, list[str]]] = []
        try:
            entries = self._entries(root_fd, "")
            stack.append((os.dup(root_fd), "", entries))
            while stack:
                fd, prefix, pending = stack[-1]
                if not pending:
                    os.close(fd)
                    stack.pop()
                    continue
                name = pending.pop()
                rel = prefix + name
                try:
                    sub = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
                        self._other(fd, name, rel)  # replaced since it was listed
                        continue
                    raise self._error(rel, e) from e
                try:
                    st = os.fstat(sub)
                    if (st.st_dev, st.st_ino) in self.excluded:
                        os.close(sub)
                        continue
                    self.lines.append(_line(f"d {rel}"))
                    entries = self._entries(sub, rel + "/")
                except BaseException:
                    os.close(sub)
                    raise
                stack.append((sub, rel + "/", entries))
        finally:
            for fd, _, _ in stack:
                os.close(fd)

    def _entries(self, fd: int, prefix: str) -> list[str]:
        """Record every entry of ``fd`` but its subdirectories; return their names."""
        subdirs: list[str] = []
        try:
            with os.scandir(fd) as it:
                # The kinds come from the listing (d_type): a regular file is opened with
                # O_NOFOLLOW at once, anything else is looked at with lstat first.
                listed = [
                    (e.name, e.is_dir(follow_symlinks=False), e.is_file(follow_symlinks=False))
                    for e in it
                ]
        except OSError as e:
            raise self._error(prefix or ".", e) from e
        for name, is_dir, is_file in listed:
            if not prefix and name in _EXCLUDED:
                continue
            if is_dir:
                subdirs.append(name)
            elif is_file:
                try:
                    self._file(fd, name, prefix + name)
                except FileNotFoundError:
                    continue  # vanished since it was listed
                except OSError as e:
                    raise self._error(prefix + name, e) from e
            else:
                self._other(fd, name, prefix + name)
        return subdirs

    def _other(self, fd: int, name: str, rel: str) -> None:
        """Record a file, symlink or special file (never a directory: those are walked)."""
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if (st.st_dev, st.st_ino) in self.excluded:
                return
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(name, dir_fd=fd)
                self.lines.append(_line(f"l {rel} {target}"))
            elif stat.S_ISREG(st.st_mode):
                self._file(fd, name, rel)
            elif stat.S_ISDIR(st.st_mode):
                # A directory swapped in after the listing: recorded, not descended, so
                # the walk's shape never depends on the race.
                self.lines.append(_line(f"d {rel}"))
            else:
                self.lines.append(_line(f"s {rel} {_special_kind(st.st_mode)}"))
        except FileNotFoundError:
            return  # vanished since it was listed
        except OSError as e:
            raise self._error(rel, e) from e

    def _file(self, fd: int, name: str, rel: str) -> None:
        try:
            file_fd = os.open(name, _READ_FLAGS, dir_fd=fd)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            # Replaced by a symlink since it was listed: recorded as the symlink it is now.
            target = os.readlink(name, dir_fd=fd)
            self.lines.append(_line(f"l {rel} {target}"))
            return
        try:
            st = os.fstat(file_fd)
            if not stat.S_ISREG(st.st_mode):
                self.lines.append(_line(f"s {rel} {_special_kind(st.st_mode)}"))
                return
            if (st.st_dev, st.st_ino) in self.excluded:
                return
            h = hashlib.sha256()
            # At most the size fstat gave: a file that keeps growing still ends.
            left = st.st_size
            while left:
                chunk = os.read(file_fd, min(_CHUNK, left))
                if not chunk:
                    break
                h.update(chunk)
                left -= len(chunk)
        finally:
            os.close(file_fd)
        mode = "x" if st.st_mode & 0o111 else "-"
        self.lines.append(_line(f"f {rel} {mode} {h.hexdigest()}"))


def tree_digest(root: Path, *, exclude: tuple[Path, ...] = ()) -> str:
    """sha256 over a sorted listing of the tree below ``root``.

    One line per entry: ``d PATH`` for a directory, ``l PATH TARGET`` for a symlink (its
    link text; never followed), ``f PATH x|- SHA256`` for a regular file (any execute bit,
    content digest), ``s PATH KIND`` for a fifo, socket or device (never opened). Lines
    are sorted bytewise and joined with newlines, with a final newline. The digest does
    not depend on mtimes, owners or listing order. ``.git`` at the top and the entries
    that are ``exclude`` paths (compared by device and inode) are left out.

    Raises:
        ConfigError: ``root`` is not a directory, or an entry cannot be read.
    """
    root_fd = open_root(root, what="source directory")
    try:
        return tree_digest_at(root_fd, label=root, exclude=exclude)
    finally:
        os.close(root_fd)


def tree_digest_at(root_fd: int, *, label: Path, exclude: tuple[Path, ...] = ()) -> str:
    """:func:`tree_digest` of the directory ``root_fd`` holds (opened confined by the
    caller: a repository's rootfs); ``label`` names it in errors."""
    walker = _Digest(label, _identities(exclude))
    walker.walk(root_fd)
    lines = sorted(walker.lines)
    return hashlib.sha256(b"\n".join(lines) + b"\n").hexdigest()


def describe_source(path: Path, *, exclude: tuple[Path, ...] = ()) -> SourceInfo:
    """Identify ``path``: a digest of its files (less ``.git`` and ``exclude``) and, in a
    git checkout, HEAD's commit, tree, commit time and whether tracked files changed.

    A repository whose metadata cannot be read safely is described by its files only,
    with the reason as the ``gitUnreadable`` annotation: nothing the checkout holds can
    make this fail or run anything.

    Raises:
        ConfigError: ``path`` is not a directory, or an entry cannot be read.
    """
    real = Path(os.path.realpath(path))
    digest = tree_digest(path, exclude=exclude)
    try:
        head = read_head(path)
    except GitReadError as e:
        logger.warning("source %s: git metadata not used: %s", real, e.message)
        return SourceInfo(path=real, sha256=digest, annotations={"gitUnreadable": e.message})
    if head is None:
        return SourceInfo(path=real, sha256=digest)
    if head.dirty is None:
        logger.info(
            "source %s: cannot tell whether it differs from its commit: %s",
            real,
            head.dirty_unknown,
        )
    annotations: dict[str, Any] = {}
    if head.subdirectory:
        annotations["subdirectory"] = head.subdirectory
    return SourceInfo(
        path=real,
        git_commit=head.commit,
        git_tree=head.tree,
        commit_time=head.commit_time,
        # The files as built: a checkout may differ from its commit.
        sha256=digest,
        annotations=annotations,
        dirty=head.dirty,
    )
