"""The one way host code opens paths that a repository controls.

A pull request controls every file of its checkout: a name can be a symlink to
``/etc/shadow``, a directory can be a symlink to ``/``, a file can be a fifo that blocks a
reader forever. Host code therefore never hands such a path to the kernel to resolve as it
likes. It opens a *root* (a directory the operator named: the spec's directory, an image,
a rootfs) and resolves everything below it here:

* **beneath**: symlinks are followed only while they stay inside the root; an absolute
  target, a ``..`` above the root or a magic link (``/proc/self/fd/N``) is refused;
* **in root**: the root is the file system's ``/`` for the path, as the cell will see it:
  an absolute target and ``..`` at the top resolve inside the root (``etc -> /`` names the
  root itself); nothing ever leaves it.

Where the kernel has ``openat2(2)`` (Linux 5.6) the resolution is one system call with
``RESOLVE_BENEATH`` or ``RESOLVE_IN_ROOT`` and ``RESOLVE_NO_MAGICLINKS``. Elsewhere, and to
explain a refusal, a component walk does the same: every component is opened relative to
the descriptor of its parent with ``O_NOFOLLOW``, symlinks are read with ``readlinkat`` and
their targets walked the same way, ``..`` pops the walk's own stack and is never passed to
the kernel.

The final object is opened ``O_PATH`` first and checked with ``fstat``: a fifo, socket or
device where a file or directory is expected is refused without ever being opened for
reading (opening a device can have side effects, opening a fifo can block).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Literal

from buildcell._fs import file_kind
from buildcell._text import show
from buildcell.errors import ConfigError

__all__ = [
    "Resolve",
    "UnsafePathError",
    "make_dirs",
    "open_dir",
    "open_file",
    "open_path",
    "open_root",
    "openat2_available",
    "operator_path",
    "reopen",
    "split_relative",
]

Resolve = Literal["beneath", "in_root"]

_MAX_HOPS = 40  # symlinks followed in one resolution, as the kernel allows
_O_PATH_FLAGS = os.O_PATH | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
# O_NONBLOCK: if the file was swapped for a fifo after the check, the open cannot block.
_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC

_RESOLVE_NO_XDEV = 0x01
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_RESOLVE_IN_ROOT = 0x10
_SYS_OPENAT2 = 437  # the same number on every architecture (added after the unification)


class UnsafePathError(ConfigError):
    """A repository path leaves its root, or is not the kind of file expected (exit 125)."""


class _OpenHow(ctypes.Structure):
    _fields_ = (
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    )


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class _Kernel:
    """What was learnt about the kernel (once per process)."""

    openat2: bool | None = None


def _openat2(dir_fd: int, path: str, flags: int, resolve: int) -> int:
    how = _OpenHow(flags, 0, resolve)
    fd = _syscall(
        ctypes.c_long(_SYS_OPENAT2),
        ctypes.c_int(dir_fd),
        ctypes.c_char_p(os.fsencode(path)),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(fd)


def openat2_available() -> bool:
    """Whether this kernel resolves with ``openat2`` (else the component walk is used)."""
    if _Kernel.openat2 is None:
        try:
            fd = _openat2(-100, "/", _O_PATH_FLAGS, _RESOLVE_NO_MAGICLINKS)
        except OSError as e:
            # ENOSYS: an old kernel; EPERM: a seccomp filter (some container runtimes).
            _Kernel.openat2 = e.errno not in (errno.ENOSYS, errno.EPERM)
        else:
            os.close(fd)
            _Kernel.openat2 = True
    return _Kernel.openat2


def _force_walk(enabled: bool) -> None:
    """Use the component walk even where ``openat2`` exists (tests of the fallback)."""
    _Kernel.openat2 = None if not enabled else False


def _show(text: str) -> str:
    return show(text, 120)


def split_relative(rel: str, *, what: str) -> list[str]:
    """The components of a relative path, ``.`` and empty ones dropped.

    Raises:
        UnsafePathError: the path is absolute, empty or holds a NUL byte.
    """
    if not isinstance(rel, str) or not rel:
        raise UnsafePathError(f"{what}: the path is empty")
    if "\0" in rel:
        raise UnsafePathError(f"{what}: the path contains a NUL byte")
    if rel.startswith("/"):
        raise UnsafePathError(f"{what}: {_show(rel)} is absolute; expected a relative path")
    return [part for part in rel.split("/") if part not in ("", ".")]


class _Refusal(Exception):
    """Why the walk stopped, as one line: the component reached and what was wrong."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where} {problem}")
        self.message = f"{where} {problem}"


class _Walk:
    """A resolution below ``root_fd`` that holds a descriptor for every directory on the way.

    ``stack[0]`` is the root (a duplicate); ``names`` are the components under it.
    """

    def __init__(self, root_fd: int, mode: Resolve) -> None:
        self.mode = mode
        self.stack = [os.dup(root_fd)]
        self.names: list[str] = []
        self.hops = 0
        self.via: str | None = None  # the last symlink followed, for messages

    def close(self) -> None:
        for fd in self.stack:
            os.close(fd)
        self.stack = []

    @property
    def here(self) -> str:
        return "/".join(self.names) or "."

    def _up(self) -> None:
        if len(self.stack) == 1:
            if self.mode == "in_root":
                return  # '..' of the root is the root, as in the cell
            if self.via is not None:
                raise _Refusal(self.via, "leads above the root")
            raise _Refusal("'..'", "leads above the root")
        os.close(self.stack.pop())
        self.names.pop()

    def _to_root(self) -> None:
        while len(self.stack) > 1:
            os.close(self.stack.pop())
        self.names.clear()

    def _follow(self, parent: int, name: str) -> list[str]:
        """The components a symlink ``name`` stands for (restarting at the root for an
        absolute target in ``in_root`` mode).

        Raises:
            _Refusal: too many links, or (``beneath``) an absolute target.
        """
        target = os.readlink(name, dir_fd=parent)
        self.hops += 1
        shown = "/".join([*self.names, name])
        self.via = f"{_show(shown)} (a symlink to {_show(target)})"
        if self.hops > _MAX_HOPS:
            raise _Refusal(_show(shown), "has too many levels of symbolic links")
        if target.startswith("/"):
            if self.mode == "beneath":
                raise _Refusal(_show(shown), f"is a symlink to {_show(target)}, outside the root")
            self._to_root()
        return [p for p in target.split("/") if p]

    def _enter(self, parent: int, name: str) -> bool:
        """Descend into directory ``name``; False if it was swapped meanwhile (look again).

        Raises:
            _Refusal: it keeps changing.
        """
        try:
            fd = os.open(name, _O_PATH_FLAGS | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent)
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
                raise
            self.hops += 1
            if self.hops > _MAX_HOPS:
                raise _Refusal(_show(self.here), "keeps changing while it is resolved") from e
            return False
        self.stack.append(fd)
        self.names.append(name)
        return True

    def resolve(self, parts: list[str], *, follow_last: bool) -> tuple[int, str]:
        """Walk ``parts``; return (parent descriptor, final name) with the parent held.

        The final name is ``""`` when the path names the root (or, after ``..``, a
        directory already on the stack): then the stack's top is the object itself.
        """
        todo = list(parts)
        while todo:
            name = todo.pop(0)
            if name in ("", "."):
                continue
            if name == "..":
                self._up()
                continue
            last = not todo
            parent = self.stack[-1]
            try:
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                if last:
                    return parent, name
                raise _Refusal(_show("/".join([*self.names, name])), "does not exist") from None
            if stat.S_ISLNK(st.st_mode) and not (last and not follow_last):
                todo = self._follow(parent, name) + todo
                continue
            if last:
                return parent, name
            if not stat.S_ISDIR(st.st_mode):
                raise _Refusal(
                    _show("/".join([*self.names, name])),
                    f"is a {file_kind(st.st_mode)}, not a directory",
                )
            if not self._enter(parent, name):
                todo.insert(0, name)  # swapped while we looked: that component again
        return self.stack[-1], ""


def _walk_open(
    root_fd: int, parts: list[str], flags: int, mode: Resolve, *, follow_last: bool
) -> int:
    walk = _Walk(root_fd, mode)
    try:
        for _attempt in range(_MAX_HOPS):
            parent, name = walk.resolve(parts, follow_last=follow_last)
            if not name:
                return os.open(".", flags & ~os.O_NOFOLLOW, dir_fd=parent)
            try:
                return os.open(name, flags | os.O_NOFOLLOW, dir_fd=parent)
            except OSError as e:
                if e.errno != errno.ELOOP or not follow_last:
                    raise
                # Became a symlink after the look: resolve the whole path again.
                walk.close()
                walk = _Walk(root_fd, mode)
        raise _Refusal(_show("/".join(parts)), "keeps changing while it is resolved")
    finally:
        walk.close()


def _explain(root_fd: int, parts: list[str], mode: Resolve, *, follow_last: bool) -> str | None:
    """Why a resolution fails, from the component walk; None if the walk succeeds."""
    try:
        fd = _walk_open(root_fd, parts, _O_PATH_FLAGS, mode, follow_last=follow_last)
    except _Refusal as r:
        return r.message
    except FileNotFoundError:
        return f"{_show('/'.join(parts))} does not exist"
    except OSError as e:
        return e.strerror or str(e)
    os.close(fd)
    return None


def open_path(
    root_fd: int,
    rel: str | Sequence[str],
    *,
    what: str,
    resolve: Resolve = "beneath",
    follow_last: bool = True,
    flags: int = _O_PATH_FLAGS,
) -> int:
    """Open ``rel`` below the directory ``root_fd`` without leaving it.

    Args:
        root_fd: a directory descriptor; the root of the resolution.
        rel: a relative path, or its components.
        what: how messages name the path ("input 'vendor/x.tar'").
        resolve: ``beneath`` (absolute symlinks and ``..`` above the root are refused) or
            ``in_root`` (they resolve inside the root, as in a chroot).
        follow_last: whether a symlink as the last component is followed; if not, the
            symlink itself is opened (with ``O_PATH``).
        flags: ``open`` flags of the final component (``O_PATH`` by default).

    Returns:
        A new descriptor; the caller closes it.

    Raises:
        UnsafePathError: the path leaves the root, or a component is missing or is not a
            directory.
    """
    parts = split_relative(rel, what=what) if isinstance(rel, str) else list(rel)
    flags |= os.O_CLOEXEC
    if not follow_last:
        flags |= os.O_NOFOLLOW
    if openat2_available():
        how = _RESOLVE_NO_MAGICLINKS | (
            _RESOLVE_BENEATH if resolve == "beneath" else _RESOLVE_IN_ROOT
        )
        try:
            return _openat2(root_fd, "/".join(parts) or ".", flags, how)
        except OSError as e:
            if e.errno in (errno.EXDEV, errno.ELOOP, errno.ENOENT, errno.ENOTDIR, errno.EAGAIN):
                why = _explain(root_fd, parts, resolve, follow_last=follow_last)
                if e.errno == errno.ENOENT and why is None:
                    why = "does not exist"
                raise UnsafePathError(f"{what}: {why or e.strerror}") from e
            raise UnsafePathError(f"{what}: {e.strerror}") from e
    try:
        return _walk_open(root_fd, parts, flags, resolve, follow_last=follow_last)
    except _Refusal as r:
        raise UnsafePathError(f"{what}: {r.message}") from None
    except FileNotFoundError as e:
        raise UnsafePathError(f"{what}: {_show('/'.join(parts))} does not exist") from e
    except OSError as e:
        raise UnsafePathError(f"{what}: {e.strerror}") from e


def reopen(fd: int, flags: int) -> int:
    """Open the object an ``O_PATH`` descriptor holds, with ``flags`` (never by name)."""
    return os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC)


def _kind_error(what: str, st: os.stat_result, expected: str) -> UnsafePathError:
    return UnsafePathError(f"{what} is a {file_kind(st.st_mode)}, not a {expected}")


def open_file(
    root_fd: int,
    rel: str | Sequence[str],
    *,
    what: str,
    resolve: Resolve = "beneath",
    single_link: bool = False,
) -> tuple[int, os.stat_result]:
    """Open a regular file below ``root_fd`` for reading.

    Args:
        single_link: refuse a file with more than one hard link (a repository path is
            only ever a file of its own; a hard link may be another file of the host).

    Returns:
        (descriptor opened ``O_RDONLY|O_NONBLOCK``, its ``fstat``).

    Raises:
        UnsafePathError: it leaves the root, does not exist, or is not a regular file.
    """
    path_fd = open_path(root_fd, rel, what=what, resolve=resolve)
    try:
        st = os.fstat(path_fd)
        if not stat.S_ISREG(st.st_mode):
            raise _kind_error(what, st, "regular file")
        if single_link and st.st_nlink > 1:
            raise UnsafePathError(
                f"{what} is a hard link ({st.st_nlink} names for one file); "
                "buildcell reads repository files only when they are the only name of their file"
            )
        fd = reopen(path_fd, _READ_FLAGS)
    finally:
        os.close(path_fd)
    after = os.fstat(fd)
    if (after.st_dev, after.st_ino) != (st.st_dev, st.st_ino):  # pragma: no cover
        os.close(fd)
        raise UnsafePathError(f"{what} changed while it was opened")
    return fd, st


def open_dir(
    root_fd: int, rel: str | Sequence[str], *, what: str, resolve: Resolve = "beneath"
) -> int:
    """Open a directory below ``root_fd`` (``O_RDONLY|O_DIRECTORY``).

    Raises:
        UnsafePathError: it leaves the root, does not exist, or is not a directory.
    """
    path_fd = open_path(root_fd, rel, what=what, resolve=resolve)
    try:
        st = os.fstat(path_fd)
        if not stat.S_ISDIR(st.st_mode):
            raise _kind_error(what, st, "directory")
        return reopen(path_fd, _DIR_FLAGS)
    finally:
        os.close(path_fd)


def open_root(path: Path, *, what: str) -> int:
    """Open the directory ``path`` as a root (``O_RDONLY|O_DIRECTORY``).

    ``path`` itself comes from the operator (the spec's directory, ``--source``); symlinks
    in it are followed as the operator's shell would. Only what lies below is confined.

    Raises:
        UnsafePathError: it does not exist or is not a directory.
    """
    try:
        return os.open(path, _DIR_FLAGS)
    except OSError as e:
        problem = {
            errno.ENOENT: "does not exist",
            errno.ENOTDIR: "is not a directory",
        }.get(e.errno or 0, str(e.strerror))
        raise UnsafePathError(f"{what} {_show(str(path))} {problem}") from e


@contextmanager
def opened_root(path: Path, *, what: str) -> Iterator[int]:
    """:func:`open_root` as a context manager."""
    fd = open_root(path, what=what)
    try:
        yield fd
    finally:
        os.close(fd)


def make_dirs(
    root_fd: int,
    parts: Sequence[str],
    *,
    what: str,
    mode: int = 0o755,
    create: bool = True,
    hint: str | None = None,
    shown_root: str = "",
) -> tuple[int, bool]:
    """Open directory ``parts`` below ``root_fd``, creating what is missing.

    No component may be a symlink, whatever its target: a directory opened here is one the
    caller will write into.

    Args:
        create: make missing directories (with ``mode``); without it a missing one is an
            error.
        hint: the hint of the error raised for a symlink on the way.
        shown_root: what messages put before the components (``/`` for absolute paths).

    Returns:
        (descriptor ``O_RDONLY|O_DIRECTORY`` of the last directory, whether it was made).

    Raises:
        UnsafePathError: a component is a symlink or not a directory, or cannot be made.
    """
    fd = os.dup(root_fd)
    made = False
    try:
        for i, name in enumerate(parts):
            if name in ("", ".", "..") or "/" in name or "\0" in name:
                raise UnsafePathError(f"{what}: invalid path component {_show(name)}")
            shown = shown_root + "/".join(parts[: i + 1])
            made = False
            if create:
                try:
                    os.mkdir(name, mode, dir_fd=fd)
                    made = True
                except FileExistsError:
                    pass
                except OSError as e:
                    raise UnsafePathError(
                        f"{what}: cannot create {_show(shown)}: {e.strerror}"
                    ) from e
            try:
                sub = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as e:
                link = False
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    with suppress(OSError):
                        link = stat.S_ISLNK(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode)
                if link:
                    target = ""
                    with suppress(OSError):
                        target = f" (to {_show(os.readlink(name, dir_fd=fd))})"
                    problem = f"is a symlink{target}; buildcell never writes through one"
                    raise UnsafePathError(f"{what}: {_show(shown)} {problem}", hint=hint) from e
                if e.errno == errno.ENOTDIR:
                    problem = "exists and is not a directory"
                elif e.errno == errno.ENOENT:
                    problem = "does not exist"
                else:
                    problem = str(e.strerror)
                raise UnsafePathError(f"{what}: {_show(shown)} {problem}") from e
            os.close(fd)
            fd = sub
    except BaseException:
        os.close(fd)
        raise
    return fd, made


def open_host_dir(path: Path, *, what: str, create: bool = False, mode: int = 0o755) -> int:
    """Open (or make) an absolute directory with no symlink on any component.

    For directories that buildcell writes into, as root too (the output directory): no
    component of ``path`` may be a symlink, so that a link committed in a checkout can never
    redirect the write.

    Raises:
        UnsafePathError: a component is a symlink or not a directory, or (without
            ``create``) the directory does not exist.
    """
    absolute = Path(os.path.abspath(path))
    root = os.open("/", _DIR_FLAGS)
    try:
        fd, _ = make_dirs(
            root,
            ["", *absolute.parts[1:]][1:],
            what=what,
            mode=mode,
            create=create,
            hint=f"give a path without symlinks, e.g. the resolved {os.path.realpath(absolute)}",
            shown_root="/",
        )
        return fd
    finally:
        os.close(root)


def entries(dir_fd: int) -> list[tuple[str, os.stat_result]]:
    """The names in a directory with their ``lstat``, sorted; vanished entries left out."""
    result: list[tuple[str, os.stat_result]] = []
    for name in sorted(os.listdir(dir_fd)):
        with suppress(FileNotFoundError):
            result.append((name, os.stat(name, dir_fd=dir_fd, follow_symlinks=False)))
    return result


def operator_path(path: Path, *, what: str) -> Path:
    """An operator's path as an absolute path, refused if it leads through a symlink of the
    checkout.

    A path given on the command line is the operator's, but where it is relative to the
    working directory (a checkout, in CI), the components below that directory are the
    repository's: ``--source src`` with ``src -> /root/secrets`` would copy root's files
    into a cell. So no existing component below the working directory may be a symlink;
    what lies above it, and absolute paths elsewhere, are the operator's own.

    Raises:
        UnsafePathError: a component below the working directory is a symlink.
    """
    absolute = Path(os.path.abspath(path))
    cwd = Path(os.getcwd())
    if absolute != cwd and not absolute.is_relative_to(cwd):
        return absolute
    current = cwd
    for part in absolute.relative_to(cwd).parts:
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            break
        except OSError as e:
            raise UnsafePathError(
                f"{what}: cannot inspect {_show(str(current))}: {e.strerror}"
            ) from e
        if stat.S_ISLNK(st.st_mode):
            try:
                leads = os.path.realpath(current)
            except OSError:  # changed again since: the path it leads to is not known
                leads = "(it keeps changing)"
            raise UnsafePathError(
                f"{what}: {_show(str(current.relative_to(cwd)))} is a symlink in the working "
                "directory; buildcell follows none there",
                hint=f"give the path it leads to, if that is meant: {leads}",
            )
    return absolute
