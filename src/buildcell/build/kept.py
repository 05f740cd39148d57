"""Kept workspaces: what a failed step left in the workspace, kept for ``buildcell shell``.

``buildcell build --keep-failed`` moves the workspace of a build whose step failed to
``<state>/kept/<build-id>/workspace`` instead of removing it, and the build's record says so
(``kept_workspace``: its path, the step, when it was kept and until when). Like the
workspace it was, it is private: ``kept/`` and everything in it is the supervisor's alone
(mode 0700); no cell reaches it.

How long one stays (``buildcell gc`` decides, every time it runs):

- until its record's ``expires``: :data:`DEFAULT_KEEP` (7 days) after the build; with
  ``gc --kept-max-age DURATION``, no longer than that after the build either;
- it goes at once when its build's record no longer names it (the record was removed, or
  the build was interrupted before its record said so);
- with an unreadable record, it goes once its directory is older than :data:`DEFAULT_KEEP`;
- it stays while its build is still running, and while a ``buildcell shell`` is copying
  it (a shared lock on its directory: gc takes it exclusively, without waiting).

When gc or ``shell --discard`` removes one, its record keeps the time (``removed``), so
``show`` and ``shell`` can say what became of it.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from buildcell.errors import Error, StateError
from buildcell.state import StateDir
from buildcell.trees import remove_tree

if TYPE_CHECKING:
    from buildcell.cell.storage import CellStorage
    from buildcell.supply.records import BuildRecord, RecordStore

__all__ = [
    "DEFAULT_KEEP",
    "KeptReport",
    "KeptWorkspace",
    "discard_kept",
    "expire_kept",
    "keep_workspace",
    "kept_dir",
    "using_kept",
]

#: How long a kept workspace stays by default: seconds after the build.
DEFAULT_KEEP = 7 * 24 * 3600.0

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class KeptWorkspace:
    """A kept workspace as its build's record names it.

    Attributes:
        path: the workspace directory (``kept/<build-id>/workspace``).
        step: the step that failed in it (``shell``'s default step).
        kept: when it was kept (seconds since the epoch).
        expires: when ``gc`` removes it.
        removed: when ``gc`` or ``shell --discard`` removed it; None while it is there.
    """

    path: Path
    step: str
    kept: float
    expires: float
    removed: float | None = None

    def to_record(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "step": self.step,
            "kept": self.kept,
            "expires": self.expires,
            "removed": self.removed,
        }

    @classmethod
    def from_record(cls, data: dict[str, Any] | None) -> KeptWorkspace | None:
        """What ``kept_workspace`` of a record says; None when it says nothing usable."""
        if not data:
            return None
        path, step = data.get("path"), data.get("step")
        kept, expires, removed = data.get("kept"), data.get("expires"), data.get("removed")
        if not (isinstance(path, str) and isinstance(step, str)):
            return None
        if not (_is_time(kept) and _is_time(expires)) or not (removed is None or _is_time(removed)):
            return None
        return cls(Path(path), step, float(kept), float(expires), removed)  # type: ignore[arg-type]


def _is_time(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and 0 <= value < 2**33
    )


def _kept_root(state: StateDir) -> Path:
    root = state.root / "kept"
    try:
        root.mkdir(mode=0o700, exist_ok=True)
        st = root.lstat()
    except OSError as e:
        raise StateError(f"cannot use {root} for kept workspaces: {e.strerror}") from e
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise StateError(f"{root} is not a directory of ours")
    if st.st_mode & 0o777 != 0o700:
        os.chmod(root, 0o700)
    return root


def kept_dir(state: StateDir, build_id: str) -> Path:
    """Where the workspace of build ``build_id`` is kept (whether or not it is)."""
    return state.root / "kept" / build_id / "workspace"


def keep_workspace(
    storage: CellStorage,
    state: StateDir,
    build_id: str,
    step: str,
    *,
    keep_for: float = DEFAULT_KEEP,
    max_bytes: int | None = None,
) -> KeptWorkspace:
    """Keep the workspace of ``storage`` (whose step ``step`` failed) for ``keep_for``
    seconds, copying at most ``max_bytes`` where it must be copied; the caller records it
    in the build's record.

    Raises:
        StateError: it cannot be kept (nothing is then left in ``kept/``).
    """
    where = _kept_root(state) / build_id
    try:
        where.mkdir(mode=0o700)
    except OSError as e:
        raise StateError(f"cannot keep the workspace in {where}: {e.strerror}") from e
    try:
        storage.keep_workspace(where / "workspace", max_bytes=max_bytes)
    except BaseException:
        remove_tree(where)
        raise
    now = time.time()
    return KeptWorkspace(where / "workspace", step, now, now + keep_for)


def _gone(build_id: str, when: float | None) -> Error:
    date = time.strftime(" on %Y-%m-%d %H:%M UTC", time.gmtime(when)) if when else ""
    return Error(
        f"the kept workspace of build {build_id} was removed{date}: rebuild with "
        "`buildcell build --keep-failed` to keep a failed step's workspace"
    )


@contextlib.contextmanager
def using_kept(state: StateDir, record: BuildRecord) -> Iterator[KeptWorkspace]:
    """The kept workspace of ``record``, held against ``gc`` for the block.

    Raises:
        Error: the build kept none (exit 125, saying to rebuild with ``--keep-failed``), or
            it was removed.
    """
    kept = KeptWorkspace.from_record(record.kept_workspace)
    if kept is None:
        raise Error(
            f"build {record.id} kept no workspace: rebuild with `buildcell build "
            "--keep-failed` to keep the workspace of a step that fails"
        )
    if kept.removed is not None:
        raise _gone(record.id, kept.removed)
    # Where it is, by the state directory's layout (the record only says so).
    path = kept_dir(state, record.id)
    try:
        fd = os.open(path.parent, _DIR_FLAGS)
    except OSError as e:
        raise _gone(record.id, None) from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _gone(record.id, time.time()) from None  # gc is removing it now
        if os.fstat(fd).st_nlink == 0 or not path.is_dir():
            raise _gone(record.id, None)
        yield KeptWorkspace(path, kept.step, kept.kept, kept.expires)
    finally:
        os.close(fd)


def discard_kept(state: StateDir, store: RecordStore, record: BuildRecord) -> bool:
    """Remove the kept workspace of ``record`` now (``shell --discard``), and say so in its
    record; False if another shell is using it (it then stays until ``gc``)."""
    where = kept_dir(state, record.id).parent
    if not _remove_unless_used(where):
        return False
    _note_removed(store, record)
    return True


def _remove_unless_used(where: Path) -> bool:
    try:
        fd = os.open(where, _DIR_FLAGS)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        remove_tree(where)
        return not where.exists()
    finally:
        os.close(fd)


def _note_removed(store: RecordStore, record: BuildRecord) -> None:
    if record.kept_workspace:
        record.kept_workspace = {**record.kept_workspace, "removed": time.time()}
        with contextlib.suppress(Error):  # the workspace is gone either way
            store.save(record)


@dataclass
class KeptReport:
    """What :func:`expire_kept` did: build ids whose workspace it removed, left, or found
    in use."""

    removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)


def expire_kept(state: StateDir, *, max_age: float | None = None) -> KeptReport:
    """Remove the kept workspaces that are due (see the module documentation).

    Args:
        max_age: also remove those kept longer than this many seconds ago.
    """
    from buildcell.supply.records import RecordStore

    report = KeptReport()
    root = state.root / "kept"
    if not root.is_dir():
        return report
    store = RecordStore(state.root / "builds")
    now = time.time()
    for entry in sorted(root.iterdir()):
        due, record = _due(store, entry, now, max_age)
        if not due:
            report.kept.append(entry.name)
        elif _remove_unless_used(entry):
            report.removed.append(entry.name)
            if record is not None:
                _note_removed(store, record)
        else:
            report.busy.append(entry.name)
    return report


def _due(
    store: RecordStore, entry: Path, now: float, max_age: float | None
) -> tuple[bool, BuildRecord | None]:
    """Whether the kept workspace ``entry`` is due for removal, and the record naming it."""
    from buildcell.supply.records import UnreadableRecord

    try:
        st = entry.lstat()
    except FileNotFoundError:
        return False, None
    if not stat.S_ISDIR(st.st_mode) or entry.name.startswith("."):
        return True, None  # not one buildcell kept
    try:
        found = store.load(entry.name)
    except Error:
        return True, None  # its build's record is gone
    if found.id != entry.name:
        return True, None
    if isinstance(found, UnreadableRecord):
        return now - st.st_mtime >= (DEFAULT_KEEP if max_age is None else max_age), None
    if found.status == "running":
        return False, None  # the build is keeping it right now
    kept = KeptWorkspace.from_record(found.kept_workspace)
    if kept is None or kept.removed is not None:
        return True, None
    if now >= kept.expires or (max_age is not None and now - kept.kept >= max_age):
        return True, found
    return False, None
