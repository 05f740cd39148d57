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

import hashlib
import os
from pathlib import Path

from buildcell.errors import StateError

__all__ = ["StateDir", "default_state_dir", "process_start_time", "unreachable_ancestor"]


def default_state_dir() -> Path:
    """``$BUILDCELL_STATE_DIR``, else ``/var/lib/buildcell`` for root, else
    ``$XDG_STATE_HOME/buildcell`` (``~/.local/state/buildcell``)."""
    override = os.environ.get("BUILDCELL_STATE_DIR")
    if override:
        return Path(override).absolute()
    if os.geteuid() == 0:
        return Path("/var/lib/buildcell")
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".local" / "state"
    return base / "buildcell"


def unreachable_ancestor(path: Path) -> Path | None:
    """The first ancestor of ``path`` that other users cannot traverse, if any."""
    for parent in reversed(path.parents):
        if not parent.stat().st_mode & 0o001:
            return parent
    return None


class StateDir:
    """An opened state directory.

    Raises:
        StateError: the directory cannot be created or is not a directory we own.
    """

    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or default_state_dir()).absolute()
        # Traversable by the cells' host uid when we are root; private otherwise.
        self.traverse_mode = 0o711 if os.geteuid() == 0 else 0o700
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
        return path


def process_start_time(pid: int) -> int | None:
    """Start time (clock ticks since boot) of ``pid``, to tell it from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[19])
