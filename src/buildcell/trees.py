"""The workspace: an ephemeral copy of the source tree, and removal of what a cell left.

Both walk with directory file descriptors and never resolve a path below their root, so a
symlink is never followed, whoever made it: the copy keeps symlinks as symlinks for the
sandbox to resolve in its own view, and the removal deletes the link, never its target.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from buildcell import _log
from buildcell._fs import file_kind
from buildcell._text import show
from buildcell.errors import ConfigError, Error, SandboxError
from buildcell.units import format_size

__all__ = ["CopyStats", "copy_tree", "remove_entry", "remove_tree"]

logger = _log.get(__name__)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK and O_NOCTTY: if a file is swapped for a fifo or a tty after it was listed,
# opening it neither hangs nor acquires a controlling terminal; fstat then rejects it.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_FICLONE = 0x40049409  # _IOW(0x94, 9, int): share extents instead of copying data
_COPY_CHUNK = 1 << 30  # per copy_file_range/sendfile call; the kernel moves the data
_READ_CHUNK = 1 << 20
_PROGRESS_EVERY = 0.2  # seconds
# Errors that mean "this copy method is not available here", not "the copy failed".
_UNSUPPORTED = frozenset({errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOTTY})
# Errors that are about the destination running out of room, whatever the call.
_DEST_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


@dataclass(frozen=True)
class CopyStats:
    """What :func:`copy_tree` copied.

    Attributes:
        files: regular files copied.
        dirs: directories created (not counting the destination itself).
        symlinks: symlinks recreated.
        bytes: bytes of file content copied.
        skipped: ``(relpath, reason)`` for entries not copied (fifos, sockets, devices,
            files that vanished while copying), sorted by path.
    """

    files: int
    dirs: int
    symlinks: int
    bytes: int
    skipped: tuple[tuple[str, str], ...]


def _show(path: Path | str) -> str:
    return show(path, None)


def _kind(mode: int) -> str:
    kind = file_kind(mode)
    # A symlink, directory or file where the scan saw something else: it changed under us.
    return "changed during copy" if kind in ("symlink", "directory", "regular file") else kind


@dataclass
class _Frame:
    src_fd: int
    dst_fd: int
    rel: tuple[str, ...]
    mode: int | None  # applied when the directory is complete; None for the root
    pending: list[str] | None = None


#: The unit ``copy_tree``'s ``max_bytes`` counts in: a file system block.
_BLOCK = 4096


@dataclass
class _TreeCopier:
    source: Path
    dest: Path
    excluded: frozenset[tuple[int, int]]
    owner: tuple[int, int] | None
    progress: Callable[[int, int], None] | None
    max_bytes: int | None = None
    #: What the copy has stored, as ``max_bytes`` counts it: whole blocks, and one block
    #: for every entry (a directory or a symlink takes space too).
    charged: int = 0
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    # None: not tried yet. Set by the first file so a file system without reflinks costs
    # one failed ioctl, not one per file.
    reflink: bool | None = None
    bulk: str = "copy_file_range"
    last_report: float = field(default_factory=time.monotonic)

    def _source_error(self, rel: tuple[str, ...], e: OSError) -> ConfigError:
        return ConfigError(f"cannot read {_show(self.source.joinpath(*rel))}: {e.strerror}")

    def _dest_error(self, rel: tuple[str, ...], e: OSError) -> Error:
        if e.errno in _DEST_FULL:
            from buildcell.state import write_failure

            # The copy is the state directory's (a workspace, a cache): a full disk says so.
            return write_failure(self.dest / "x", e, what=f"{_show('/'.join(rel) or '.')} (a copy)")
        return SandboxError(f"cannot write {_show(self.dest.joinpath(*rel))}: {e.strerror}")

    def _charge(self, size: int, rel: tuple[str, ...], *, entry: bool = True) -> None:
        """Count ``size`` bytes (rounded up to blocks), plus one block for the entry unless
        it was counted already, against ``max_bytes``; past it is a :class:`SandboxError`."""
        if self.max_bytes is None:
            return
        self.charged += (_BLOCK if entry else 0) + -(-size // _BLOCK) * _BLOCK
        if self.charged > self.max_bytes:
            raise SandboxError(
                f"the copy would exceed {format_size(self.max_bytes)} at {_show('/'.join(rel))}"
            )

    def _tick(self) -> None:
        if self.progress is not None:
            now = time.monotonic()
            if now - self.last_report >= _PROGRESS_EVERY:
                self.last_report = now
                self.progress(self.files, self.bytes)

    def run(self, src_root: int, dst_root: int) -> None:
        stack = [_Frame(src_root, dst_root, (), None)]
        try:
            while stack:
                frame = stack[-1]
                if frame.pending is None:
                    frame.pending = self._copy_entries(frame)
                if frame.pending:
                    child = self._enter(frame, frame.pending.pop())
                    if child is not None:
                        stack.append(child)
                    continue
                stack.pop()
                if frame.mode is not None:
                    # Last, so that a read-only source directory could still be filled.
                    try:
                        os.fchmod(frame.dst_fd, frame.mode)
                    except OSError as e:
                        raise self._dest_error(frame.rel, e) from e
                    finally:
                        os.close(frame.src_fd)
                        os.close(frame.dst_fd)
        finally:
            for frame in stack:
                if frame.mode is not None:
                    os.close(frame.src_fd)
                    os.close(frame.dst_fd)
        if self.progress is not None:
            self.progress(self.files, self.bytes)

    def _copy_entries(self, frame: _Frame) -> list[str]:
        """Copy everything but subdirectories; return their names, to enter one by one."""
        subdirs: list[str] = []
        try:
            with os.scandir(frame.src_fd) as it:
                for entry in it:
                    rel = (*frame.rel, entry.name)
                    try:
                        if entry.is_symlink():
                            self._copy_symlink(frame, rel)
                        elif entry.is_dir(follow_symlinks=False):
                            subdirs.append(entry.name)
                        elif entry.is_file(follow_symlinks=False):
                            self._copy_file(frame, rel)
                        else:
                            self._skip_special(frame, rel)
                    except FileNotFoundError:
                        self.skipped.append(("/".join(rel), "vanished during copy"))
        except OSError as e:
            raise self._source_error(frame.rel, e) from e
        subdirs.reverse()  # popped from the end: visit in listing order
        return subdirs

    def _skip_special(self, frame: _Frame, rel: tuple[str, ...]) -> None:
        try:
            mode = os.stat(rel[-1], dir_fd=frame.src_fd, follow_symlinks=False).st_mode
        except FileNotFoundError:
            raise
        except OSError as e:
            raise self._source_error(rel, e) from e
        self.skipped.append(("/".join(rel), _kind(mode)))

    def _copy_symlink(self, frame: _Frame, rel: tuple[str, ...]) -> None:
        name = rel[-1]
        try:
            target = os.readlink(name, dir_fd=frame.src_fd)
        except FileNotFoundError:
            raise
        except OSError as e:
            if e.errno == errno.EINVAL:  # no longer a symlink
                self.skipped.append(("/".join(rel), "changed during copy"))
                return
            raise self._source_error(rel, e) from e
        try:
            os.symlink(target, name, dir_fd=frame.dst_fd)
            if self.owner is not None:
                os.chown(name, *self.owner, dir_fd=frame.dst_fd, follow_symlinks=False)
        except OSError as e:
            raise self._dest_error(rel, e) from e
        self._charge(len(target), rel)
        self.symlinks += 1

    def _enter(self, frame: _Frame, name: str) -> _Frame | None:
        rel = (*frame.rel, name)
        try:
            src_fd = os.open(name, _DIR_FLAGS, dir_fd=frame.src_fd)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                self.skipped.append(("/".join(rel), "changed during copy"))
                return None
            raise self._source_error(rel, e) from e
        try:
            st = os.fstat(src_fd)
            if (st.st_dev, st.st_ino) in self.excluded:
                os.close(src_fd)
                return None
            try:
                os.mkdir(name, 0o700, dir_fd=frame.dst_fd)
                dst_fd = os.open(name, _DIR_FLAGS, dir_fd=frame.dst_fd)
            except OSError as e:
                raise self._dest_error(rel, e) from e
            try:
                if self.owner is not None:
                    os.fchown(dst_fd, *self.owner)
            except OSError as e:
                os.close(dst_fd)
                raise self._dest_error(rel, e) from e
        except BaseException:
            os.close(src_fd)
            raise
        self._charge(0, rel)
        self.dirs += 1
        # Special bits are dropped everywhere: nothing in the cell is setuid or setgid.
        return _Frame(src_fd, dst_fd, rel, stat.S_IMODE(st.st_mode) & 0o777)

    def _copy_file(self, frame: _Frame, rel: tuple[str, ...]) -> None:
        name = rel[-1]
        try:
            src_fd = os.open(name, _READ_FLAGS, dir_fd=frame.src_fd)
        except FileNotFoundError:
            raise  # reported as vanished by the caller
        except OSError as e:
            if e.errno == errno.ELOOP:  # swapped for a symlink since it was listed
                self._copy_symlink(frame, rel)
                return
            raise self._source_error(rel, e) from e
        try:
            try:
                st = os.fstat(src_fd)
            except OSError as e:
                raise self._source_error(rel, e) from e
            if not stat.S_ISREG(st.st_mode):
                self.skipped.append(("/".join(rel), _kind(st.st_mode)))
                return
            if (st.st_dev, st.st_ino) in self.excluded:
                return
            # What the copy will store: holes stay holes (see _copy_sparse).
            self._charge(min(st.st_size, st.st_blocks * 512), rel)
            try:
                dst_fd = os.open(name, _CREATE_FLAGS, 0o600, dir_fd=frame.dst_fd)
            except OSError as e:
                raise self._dest_error(rel, e) from e
            try:
                copied = self._copy_data(src_fd, dst_fd, st.st_size, rel)
                try:
                    if self.owner is not None:
                        os.fchown(dst_fd, *self.owner)
                    os.fchmod(dst_fd, stat.S_IMODE(st.st_mode) & 0o777)
                    os.utime(dst_fd, ns=(st.st_atime_ns, st.st_mtime_ns))
                except OSError as e:
                    raise self._dest_error(rel, e) from e
            finally:
                os.close(dst_fd)
        finally:
            os.close(src_fd)
        # A file that grew holes into data while it was copied: counted as it came out.
        self._charge(max(0, copied - min(st.st_size, st.st_blocks * 512)), rel, entry=False)
        self.files += 1
        self.bytes += copied
        self._tick()

    def _copy_data(self, src_fd: int, dst_fd: int, size: int, rel: tuple[str, ...]) -> int:
        """Copy at most ``size`` bytes (the size when opened: a growing file still ends)."""
        try:
            if self.reflink is not False and size > 0:
                try:
                    fcntl.ioctl(dst_fd, _FICLONE, src_fd)
                except OSError as e:
                    if e.errno not in _UNSUPPORTED:
                        raise
                    # The first failure decides for the whole tree; after a success, only
                    # this file (say, on another file system below the source) falls back.
                    if self.reflink is None:
                        self.reflink = False
                else:
                    self.reflink = True
                    return size
            if os.fstat(src_fd).st_blocks * 512 < size:
                return self._copy_sparse(src_fd, dst_fd, size)
            return self._copy_bulk(src_fd, dst_fd, size)
        except OSError as e:
            if e.errno in _DEST_FULL:
                raise self._dest_error(rel, e) from e
            raise self._source_error(rel, e) from e

    def _copy_sparse(self, src_fd: int, dst_fd: int, size: int) -> int:
        """Copy a sparse file's data extents only, so that its holes stay holes: a file of a
        terabyte that stores nothing costs nothing to copy (written out, it would fill the
        disk). Returns the bytes of data copied."""
        copied = offset = 0
        while offset < size:
            try:
                start = os.lseek(src_fd, offset, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break  # only a hole is left
                raise
            end = min(os.lseek(src_fd, start, os.SEEK_HOLE), size)
            os.lseek(src_fd, start, os.SEEK_SET)  # finding the hole moved it there
            os.lseek(dst_fd, start, os.SEEK_SET)
            copied += self._copy_bulk(src_fd, dst_fd, end - start)
            offset = end
        os.ftruncate(dst_fd, size)
        return copied

    def _copy_bulk(self, src_fd: int, dst_fd: int, size: int) -> int:
        copied = 0
        for method in ("copy_file_range", "sendfile"):
            if self.bulk != method:
                continue
            try:
                while copied < size:
                    count = min(_COPY_CHUNK, size - copied)
                    if method == "copy_file_range":
                        n = os.copy_file_range(src_fd, dst_fd, count)
                    else:
                        n = os.sendfile(dst_fd, src_fd, None, count)
                    if n == 0:
                        break
                    copied += n
            except OSError as e:
                if copied or e.errno not in _UNSUPPORTED:
                    raise
                self.bulk = "sendfile" if method == "copy_file_range" else "read"
            else:
                return copied
        while copied < size:
            chunk = os.read(src_fd, min(_READ_CHUNK, size - copied))
            if not chunk:
                break
            view = memoryview(chunk)
            while view:
                view = view[os.write(dst_fd, view) :]
            copied += len(chunk)
        return copied


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConfigError(f"cannot inspect excluded path {_show(path)}: {e.strerror}") from e
    return (st.st_dev, st.st_ino)


def copy_tree(
    source: Path,
    dest: Path,
    *,
    exclude: Sequence[Path] = (),
    owner: tuple[int, int] | None = None,
    progress: Callable[[int, int], None] | None = None,
    max_bytes: int | None = None,
) -> CopyStats:
    """Copy the contents of ``source`` into the existing, empty directory ``dest``.

    Directories keep their permission bits, regular files their content, permission bits
    and atime/mtime (ns); setuid, setgid and sticky bits are dropped. Symlinks are
    recreated with the same target text, never followed, whether absolute, relative or
    dangling. Fifos, sockets and devices are skipped and listed. Hard links become
    independent files. Data is shared with ``FICLONE`` where the file system allows it,
    else copied in the kernel (``copy_file_range``, then ``sendfile``), else in chunks.

    Args:
        source: the directory to copy; symlinks in its own path are followed.
        dest: an existing empty directory; ``dest`` itself is left as it is.
        exclude: absolute paths whose directories or files are not copied, compared by
            (device, inode); ``dest`` is always excluded. Missing paths are ignored.
        owner: ``(uid, gid)`` given to every created entry (needs root).
        progress: called with ``(files_done, bytes_done)`` at most every 0.2 s while
            copying, and once at the end.
        max_bytes: the most file content the copy may store (a file whose allocated data
            would pass it is a :class:`SandboxError`, before it is written); None for no
            bound.

    Raises:
        ConfigError: ``source`` is not a readable directory, an entry in it cannot be
            read, or an ``exclude`` path is relative.
        SandboxError: ``dest`` is not an empty directory or cannot be written.
    """
    excluded: set[tuple[int, int]] = set()
    for path in exclude:
        if not path.is_absolute():
            raise ConfigError(f"excluded path {_show(path)} must be absolute")
        if (ident := _identity(path)) is not None:
            excluded.add(ident)
    try:
        src_fd = os.open(source, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        problem = {
            errno.ENOENT: "it does not exist",
            errno.ENOTDIR: "it is not a directory",
        }.get(e.errno or 0, str(e.strerror))
        raise ConfigError(f"cannot copy source directory {_show(source)}: {problem}") from e
    try:
        try:
            dst_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise SandboxError(f"cannot open workspace {_show(dest)}: {e.strerror}") from e
        try:
            st = os.fstat(dst_fd)
            # A destination inside the source must not be copied into itself.
            excluded.add((st.st_dev, st.st_ino))
            with os.scandir(dst_fd) as it:
                if next(it, None) is not None:
                    raise SandboxError(f"workspace {_show(dest)} is not empty")
            copier = _TreeCopier(source, dest, frozenset(excluded), owner, progress, max_bytes)
            copier.run(src_fd, dst_fd)
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)
    return CopyStats(
        files=copier.files,
        dirs=copier.dirs,
        symlinks=copier.symlinks,
        bytes=copier.bytes,
        skipped=tuple(sorted(copier.skipped)),
    )


# --- removal ---------------------------------------------------------------------------

# Directory descriptors held at once while removing. Deeper subtrees are moved up to the
# root of the removal instead, so an arbitrarily deep tree needs neither recursion nor
# more descriptors, and no ".." is ever walked.
_MAX_HELD_DIRS = 64
# How often a directory may turn out non-empty after it was emptied (something still
# writing into it) before removal gives up.
_MAX_RESCANS = 8


@dataclass
class _RmFrame:
    fd: int
    name: str  # in the parent frame's directory
    scanned: bool = False
    pending: list[str] = field(default_factory=list)
    rescans: int = 0


def _chmod_entry(dir_fd: int, name: str) -> None:
    """Give the owner rwx on a directory entry, unless it is a symlink.

    Needed only without root: removing a directory's entries needs write and search
    permission on it, listing it needs read permission.
    """
    # AT_SYMLINK_NOFOLLOW: the entry may be a symlink swapped in by the cell, and a chmod
    # through it would change the permissions of a host file. Python reports a symlink
    # here as ValueError (the C library refuses to chmod one).
    with suppress(OSError, ValueError, NotImplementedError):
        os.chmod(name, 0o700, dir_fd=dir_fd, follow_symlinks=False)


class _Remover:
    def __init__(self, path: Path, parent_fd: int) -> None:
        self.path = path
        self.parent_fd = parent_fd
        self.device: int | None = None

    def _error(self, what: str, e: OSError) -> SandboxError:
        return SandboxError(f"cannot remove {what} in {_show(self.path)}: {e.strerror}")

    def open_dir(self, parent_fd: int, name: str) -> int | None:
        """Open a directory for removal, making it usable; None if it is not one (now)."""
        for attempt in range(2):
            try:
                fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
                break
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                    return None
                if e.errno != errno.EACCES or attempt:
                    raise self._error(_show(name), e) from e
                _chmod_entry(parent_fd, name)
        try:
            st = os.fstat(fd)
            if self.device is None:
                self.device = st.st_dev
            elif st.st_dev != self.device:
                # Something is mounted here (or a filesystem was bind mounted by mistake):
                # deleting its contents would reach outside the tree.
                raise SandboxError(
                    f"refusing to remove {_show(self.path)}: a file system is mounted "
                    f"inside it at {_show(name)}",
                    hint="unmount it first",
                )
            # Root needs no permission bits; an owner without root does (see _chmod_entry).
            usable = stat.S_IMODE(st.st_mode) & 0o700 == 0o700
            if not usable and os.geteuid() != 0 and st.st_uid == os.geteuid():
                with suppress(OSError):
                    os.fchmod(fd, stat.S_IMODE(st.st_mode) | 0o700)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def clear_files(self, frame: _RmFrame) -> list[str]:
        """Unlink everything in the directory but subdirectories; return those."""
        subdirs: list[str] = []
        try:
            with os.scandir(frame.fd) as it:
                for entry in it:
                    # Removing entries that were already listed is safe while listing;
                    # anything missed is caught by the rescan after rmdir fails.
                    if entry.is_dir(follow_symlinks=False):
                        subdirs.append(entry.name)
                        continue
                    try:
                        os.unlink(entry.name, dir_fd=frame.fd)
                    except FileNotFoundError:
                        pass
                    except IsADirectoryError:
                        subdirs.append(entry.name)  # swapped for a directory meanwhile
        except OSError as e:
            raise self._error(_show(frame.name), e) from e
        return subdirs

    def move_up(self, frame: _RmFrame, name: str, root: _RmFrame) -> str | None:
        """Move a subdirectory that is too deep to the removal's root; return its new name."""
        for attempt in range(2):
            new = f".buildcell-rm-{os.urandom(8).hex()}"
            try:
                os.rename(name, new, src_dir_fd=frame.fd, dst_dir_fd=root.fd)
            except FileNotFoundError:
                return None
            except OSError as e:
                # Moving a directory rewrites its "..", which needs write permission on it.
                if e.errno not in (errno.EACCES, errno.EPERM) or attempt:
                    raise self._error(_show(name), e) from e
                _chmod_entry(frame.fd, name)
            else:
                return new
        return None  # pragma: no cover (the loop returns or raises)

    def run(self, name: str) -> None:
        fd = self.open_dir(self.parent_fd, name)
        if fd is None:
            # Not a directory (any more): a file or symlink is just unlinked.
            with suppress(FileNotFoundError):
                os.unlink(name, dir_fd=self.parent_fd)
            return
        stack = [_RmFrame(fd, name)]
        try:
            while stack:
                frame = stack[-1]
                if not frame.scanned:
                    frame.pending = self.clear_files(frame)
                    frame.scanned = True
                if frame.pending:
                    child = frame.pending.pop()
                    if len(stack) >= _MAX_HELD_DIRS:
                        moved = self.move_up(frame, child, stack[0])
                        if moved is not None:
                            stack[0].pending.append(moved)
                        continue
                    child_fd = self.open_dir(frame.fd, child)
                    if child_fd is None:
                        with suppress(FileNotFoundError, IsADirectoryError):
                            os.unlink(child, dir_fd=frame.fd)
                    else:
                        stack.append(_RmFrame(child_fd, child))
                    continue
                parent_fd = stack[-2].fd if len(stack) > 1 else self.parent_fd
                try:
                    os.rmdir(frame.name, dir_fd=parent_fd)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise self._error(_show(frame.name), e) from e
                    frame.rescans += 1
                    if frame.rescans > _MAX_RESCANS:
                        raise SandboxError(
                            f"cannot remove {_show(self.path)}: {_show(frame.name)} keeps "
                            "getting new entries",
                            hint="stop whatever is still writing there",
                        ) from e
                    frame.scanned = False
                    continue
                stack.pop()
                os.close(frame.fd)
        finally:
            for frame in stack:
                os.close(frame.fd)


def remove_tree(path: Path) -> None:
    """Delete ``path`` and everything below it, however hostile; a missing path is fine.

    Symlinks are deleted, never followed; directories without permissions are made
    usable (u+rwx) first when we own them; depth is unlimited. Removal refuses to cross
    into another mounted file system. Safe to call again after a failure.

    Raises:
        SandboxError: an entry cannot be removed (permissions, a mount, or something
            still writing into the tree).
    """
    name = path.name
    if name in ("", ".", ".."):
        raise SandboxError(f"refusing to remove {_show(path)}: not a plain directory path")
    try:
        # O_PATH: only a handle for the *at calls; the parent is ours, not the cell's.
        parent_fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as e:
        raise SandboxError(f"cannot remove {_show(path)}: {e.strerror}") from e
    try:
        _Remover(path, parent_fd).run(name)
    finally:
        os.close(parent_fd)


def remove_entry(dir_fd: int, name: str, *, shown: Path) -> None:
    """Delete ``name`` in the directory ``dir_fd``, and all below it if it is a directory:
    as :func:`remove_tree`, relative to a descriptor the caller holds.

    Raises:
        SandboxError: an entry cannot be removed.
    """
    if name in ("", ".", "..") or "/" in name:
        raise SandboxError(f"refusing to remove {_show(name)}: not a plain name")
    _Remover(shown, dir_fd).run(name)
