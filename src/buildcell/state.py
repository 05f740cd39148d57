"""The state directory: everything buildcell keeps on disk lives under one root.

Layout (``buildcell gc`` relies on it)::

    <root>/cells/<cell-id>/cell.json    a running or abandoned cell: who owns it, what to undo
    <root>/cells/<cell-id>/workspace/   its writable workspace
    <root>/ids/<slot>.lock              host uid slots held by running cells (root only)
    <root>/cache/                       content that is safe to share (synthesized /etc, ...)
    <root>/caches/<project>/<trust>/<key>/  build caches, one generation current at a time

As root the directories a cell's unprivileged host uid must traverse are ``0711``: the
cell can reach its own workspace by path, nobody can list what is there.
"""

from __future__ import annotations

import errno
import hashlib
import os
from contextlib import suppress
from pathlib import Path

from buildcell.errors import StateError
from buildcell.host import HostEnv

__all__ = [
    "StateDir",
    "default_state_dir",
    "fsync_dir",
    "process_start_time",
    "unreachable_ancestor",
    "write_atomic",
    "write_failure",
]

#: The errors of a file system with no room left (blocks, or the user's quota).
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


def default_state_dir(host: HostEnv | None = None) -> Path:
    """``$BUILDCELL_STATE_DIR``, else ``/var/lib/buildcell`` for root, else
    ``$XDG_STATE_HOME/buildcell`` (``~/.local/state/buildcell``)."""
    return (host or HostEnv.read()).default_state_dir()


def unreachable_ancestor(path: Path) -> Path | None:
    """The first ancestor of ``path`` that other users cannot traverse, if any."""
    for parent in reversed(path.parents):
        if not parent.stat().st_mode & 0o001:
            return parent
    return None


class StateDir:
    """An opened state directory, and the host settings it was opened under.

    ``host`` defaults to :meth:`HostEnv.read` of this process's environment; the command
    line reads it once and passes it.

    Raises:
        StateError: the directory cannot be created or is not a directory we own.
    """

    def __init__(self, root: Path | None = None, *, host: HostEnv | None = None) -> None:
        #: the host's settings this state directory was opened under (read once)
        self.host = host if host is not None else HostEnv.read()
        self.root = (root or self.host.default_state_dir()).absolute()
        # Traversable by the cells' host uid when we are root; private otherwise.
        self.traverse_mode = 0o711 if os.geteuid() == 0 else 0o700
        self._ensured: set[Path] = set()
        self._ensure(self.root, self.traverse_mode)
        if os.geteuid() == 0:
            self._check_reachable()

    @property
    def tag(self) -> str:
        """A short name for this state directory, prefixed to its cells' cgroups."""
        return hashlib.sha256(str(self.root).encode()).hexdigest()[:8]

    @property
    def cells(self) -> Path:
        return self._ensure(self.root / "cells", self.traverse_mode)

    @property
    def ids(self) -> Path:
        return self._ensure(self.root / "ids", 0o700)

    @property
    def locks(self) -> Path:
        """Lock files of what builds use one at a time (output directories), private."""
        return self._ensure(self.root / "locks", 0o700)

    @property
    def cache(self) -> Path:
        return self._ensure(self.root / "cache", self.traverse_mode)

    @property
    def etc(self) -> Path:
        """Prepared copies of the cells' /etc (:mod:`buildcell.cell.etcdir`); created
        there when first needed."""
        return self.root / "etc"

    @property
    def caches(self) -> Path:
        """Build caches (``caches:`` of steps), per project, trust level and key."""
        return self._ensure(self.root / "caches", self.traverse_mode)

    def _check_reachable(self) -> None:
        # Cells run as unprivileged host uids and bubblewrap opens their workspace by path.
        blocked = unreachable_ancestor(self.root)
        if blocked is not None:
            raise StateError(
                f"state directory {self.root} is not reachable by the cells' uids: "
                f"{blocked} has mode {blocked.stat().st_mode & 0o7777:04o}",
                hint=f"chmod o+x {blocked}, or set BUILDCELL_STATE_DIR elsewhere",
            )

    def _ensure(self, path: Path, mode: int) -> Path:
        if path in self._ensured:
            return path  # checked once: a state directory's parts are not removed under us
        try:
            path.mkdir(mode=mode, parents=True, exist_ok=True)
            st = path.lstat()
        except OSError as e:
            raise StateError(
                f"cannot use state directory {path}: {e.strerror}",
                hint="set BUILDCELL_STATE_DIR to a writable directory",
            ) from e
        if not path.is_dir() or path.is_symlink():
            raise StateError(f"state path {path} is not a directory")
        if st.st_uid != os.geteuid():
            raise StateError(
                f"state directory {path} belongs to uid {st.st_uid}, not to us",
                hint="set BUILDCELL_STATE_DIR to a directory you own",
            )
        if st.st_mode & 0o7777 != mode:
            os.chmod(path, mode)
        self._ensured.add(path)
        return path


def free_space(path: Path) -> int | None:
    """Bytes an unprivileged writer may still use on the file system of ``path`` (or of
    its nearest existing ancestor)."""
    for where in (path, *path.parents):
        try:
            st = os.statvfs(where)
        except OSError:
            continue
        return st.f_bavail * st.f_frsize
    return None


def write_failure(path: Path, error: OSError, *, what: str) -> StateError:
    """The one-line error for a state file that could not be written: a full disk names
    the directory and what is left on it."""
    from buildcell.units import format_size

    if error.errno in NO_SPACE:
        free = free_space(path.parent)
        left = "nothing" if not free else format_size(free)
        return StateError(
            f"no space left in {path.parent} ({left} free): cannot write {what}",
            hint="free space on that file system (`buildcell gc` removes what dead builds "
            "left), or set BUILDCELL_STATE_DIR to a larger one",
        )
    return StateError(f"cannot write {what} ({path}): {error.strerror or error}")


def fsync_dir(path: Path) -> None:
    """Make the names in ``path`` durable (a rename is only on disk once its directory is)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(
    path: Path, data: bytes, *, what: str, mode: int = 0o600, durable: bool = True
) -> None:
    """Replace ``path`` with ``data`` as a whole: a fresh temp file next to it, written,
    fsynced, renamed over it, and the directory fsynced. Readers see the old file or the
    new one, never a part; a failure leaves the old one and no temp file.

    ``durable=False`` skips the two fsyncs, for what has no meaning after a reboot (a live
    cell's record of its processes): the rename alone keeps readers from a part.

    Raises:
        StateError: it cannot be written (a full disk says so: :func:`write_failure`).
    """
    tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    except OSError as e:
        with suppress(OSError):
            os.unlink(tmp)
        raise write_failure(path, e, what=what) from e


def process_start_time(pid: int) -> int | None:
    """Start time (clock ticks since boot) of ``pid``, to tell it from a reused pid."""
    own = pid == os.getpid()
    if own and pid in _own_start:
        return _own_start[pid]
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    start = int(stat.rpartition(")")[2].split()[19])
    if own:
        _own_start[pid] = start  # asked for every cell: read once (a fork asks again)
    return start


#: The supervisor's own start time, by pid.
_own_start: dict[int, int] = {}
