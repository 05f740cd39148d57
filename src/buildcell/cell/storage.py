"""Where a cell's writable directories live on the host, and their removal.

One ``CellStorage`` backs one cell (``buildcell run``) or every step of one build: the
workspace carries over between the cells that share it; /tmp and home are fresh per cell.
Without a disk budget the workspace is a directory under the state directory and /tmp
and home are tmpfs mounts inside each sandbox. With one, all three live on the anchor's
size-capped tmpfs (see ``anchor``).

A workspace made from a source is a copy-on-write overlay of it where the host allows one
(see ``overlay``): mounted in the anchor's namespace (an anchor with a tiny tmpfs for its
mount points is started for it when the cell has no disk budget), with the upper layer on
the budget's tmpfs or, without a budget, in the cell's directory. Elsewhere it is a copy.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from buildcell._fs import Closing
from buildcell.cell.anchor import StorageAnchor
from buildcell.cell.identity import HostIdentity, acquire_identity
from buildcell.cell.overlay import (
    OverlayPlan,
    Unavailable,
    mount_overlay,
    mount_points,
    mounts_below,
    whiteout_paths,
)
from buildcell.errors import ConfigError, SandboxError, StateError
from buildcell.state import StateDir, process_start_time, write_atomic
from buildcell.trees import CopyStats, copy_tree, remove_entry, remove_tree
from buildcell.units import format_size

__all__ = ["CellStorage", "Scratch", "new_cell_id"]


def new_cell_id() -> str:
    """A sortable, unique id: UTC time plus randomness (``20261128T170501-1f3a2c1d``).

    The first three hex digits after the dash are the millisecond, so ids made within one
    second still sort in the order they were made (``ls`` lists the newest first); five
    random ones follow."""
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
    millis = min(int((now % 1) * 1000), 999)
    return f"{stamp}-{millis:03x}{os.urandom(3).hex()[:5]}"


@dataclass(frozen=True)
class Scratch:
    """One cell's fresh /tmp and home (bind paths as the sandbox's bubblewrap sees them)."""

    tmp: str | None
    home: str | None


class CellStorage(Closing):
    """The cell directory, the workspace, and (with a disk budget) the anchor.

    Raises:
        SandboxError: the anchor could not be started.
        StateError: the state directory is unusable.
    """

    def __init__(
        self,
        state: StateDir,
        *,
        cell_id: str,
        bwrap: str,
        disk: int | None,
        identity: HostIdentity | None = None,
    ) -> None:
        self.state = state
        self.cell_id = cell_id
        self._owns_identity = identity is None
        self.identity = identity or acquire_identity(
            state.ids if os.geteuid() == 0 else None, state.host.uid_range
        )
        self.dir = state.cells / cell_id
        self.anchor: StorageAnchor | None = None
        self.disk = disk
        self._bwrap = bwrap
        #: ``copy`` or ``overlay`` once populated; why an overlay was not used.
        self.workspace_mode: str | None = None
        self.copy_reason: str | None = None
        self._scratch_n = 0
        self._record: dict[str, Any] = {
            "id": cell_id,
            "supervisor": {"pid": os.getpid(), "start": process_start_time(os.getpid())},
            "created": time.time(),
            "uid": self.identity.uid,
            "cgroups": [],
            "processes": [],
        }
        try:
            self.dir.mkdir(mode=state.traverse_mode)
            self.write_record()
            owner = self._owner()
            if disk is not None:
                rw = self.dir / "rw"
                rw.mkdir(mode=0o711)
                self.anchor = StorageAnchor(bwrap=bwrap, mountpoint=rw, size=disk)
                self.note_process("anchor", self.anchor.pid)
                self._mkdir(rw / "workspace", 0o700, owner)
                self._mkdir(rw / "scratch", 0o711, None)
                self.workspace_bind = str(rw / "workspace")
            else:
                # Private: only the cell's uid (and buildcell) may enter its workspace.
                self._mkdir(self.dir / "workspace", 0o700, owner)
                self.workspace_bind = str(self.dir / "workspace")
        except BaseException:
            self.close()
            raise

    def _owner(self) -> tuple[int, int] | None:
        return (self.identity.uid, self.identity.gid) if self.identity.drop else None

    def host_path(self, bind_path: str) -> Path:
        """Where the supervisor reaches a path that the sandbox binds."""
        if self.anchor is not None:
            return self.anchor.path(Path(bind_path))
        return Path(bind_path)

    def _mkdir(self, bind_path: Path, mode: int, owner: tuple[int, int] | None) -> None:
        path = self.host_path(str(bind_path))
        path.mkdir(mode=mode)
        os.chmod(path, mode)
        if owner is not None:
            os.chown(path, *owner)

    @property
    def workspace(self) -> Path:
        """The workspace as the supervisor reaches it."""
        return self.host_path(self.workspace_bind)

    def populate(
        self, source: Path, exclude: list[Path], *, mode: str | None = None
    ) -> CopyStats | None:
        """Make the (empty) workspace from ``source``: a copy-on-write overlay of it, or a
        copy (``BUILDCELL_WORKSPACE``, default ``auto``: the overlay where it works). Returns
        what was copied, None for an overlay; ``workspace_mode`` and ``copy_reason`` say
        which it was and why. ``mode`` overrides the setting (``copy`` for a copy that
        must not depend on ``source`` once made).

        Raises:
            ConfigError: the source does not fit in the disk budget, or
                ``BUILDCELL_WORKSPACE=overlay`` and the host cannot give one.
            SandboxError: the copy failed for another reason.
        """
        asked = mode
        mode = mode or self.state.host.workspace
        why = _survey(source) if mode == "auto" else None
        if why is not None:
            self.copy_reason = why
        elif mode != "copy":
            try:
                self._overlay(source, exclude)
                self.workspace_mode = "overlay"
                return None
            except Unavailable as e:
                if mode == "overlay":
                    raise ConfigError(
                        f"no copy-on-write workspace for {source}: {e}",
                        hint="unset BUILDCELL_WORKSPACE (or set it to auto) to copy instead",
                    ) from e
                self.copy_reason = str(e)
        else:
            self.copy_reason = "asked for a copy" if asked else "BUILDCELL_WORKSPACE=copy"
        self.workspace_mode = "copy"
        try:
            return copy_tree(source, self.workspace, exclude=exclude, owner=self._owner())
        except (SandboxError, StateError) as e:
            cause = e.__cause__
            if (
                self.disk is not None
                and isinstance(cause, OSError)
                and (cause.errno == errno.ENOSPC)
            ):
                raise ConfigError(
                    f"the source {source} does not fit in the cell's disk budget "
                    f"({format_size(self.disk or 0)})",
                    hint="raise --disk, or exclude what the build does not need",
                ) from e
            raise

    def describe(self, stats: CopyStats | None) -> dict[str, Any]:
        """The ``workspace`` event's fields for what :meth:`populate` made."""
        if stats is None:
            return {"mode": self.workspace_mode}
        return {
            "mode": self.workspace_mode,
            "why": self.copy_reason,
            "files": stats.files,
            "bytes": stats.bytes,
        }

    def _overlay(self, source: Path, exclude: list[Path]) -> None:
        """Mount the overlay of ``source`` as the workspace, or leave everything as it was.

        The source is pinned by a descriptor first: its identity, the whiteouts and the
        check the mount helper makes inside the namespace all refer to that directory.

        Raises:
            Unavailable: the host cannot, or the source is not the caller's (rootless).
        """
        try:
            src_fd = os.open(source, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise Unavailable(f"cannot open the source: {e.strerror}") from e
        try:
            self._overlay_of(src_fd, exclude)
        finally:
            os.close(src_fd)

    def _overlay_of(self, src_fd: int, exclude: list[Path]) -> None:
        try:
            st = os.fstat(src_fd)
            real = Path(os.readlink(f"/proc/self/fd/{src_fd}"))
            below = mounts_below(real)
        except OSError as e:
            raise Unavailable(f"cannot inspect the source: {e.strerror}") from e
        if below:
            raise Unavailable(
                f"{below[0]} is a mount point inside the source: copied, as a copy sees it"
            )
        rootless = os.geteuid() != 0
        if rootless and st.st_uid != os.getuid():
            raise Unavailable(
                f"the source belongs to uid {st.st_uid}, not to this user: the build could "
                "not change its files"
            )
        whiteouts = whiteout_paths(src_fd, real, exclude)
        rw = self.dir / "rw"
        started = self.anchor is None
        try:
            if self.anchor is None:
                rw.mkdir(mode=0o711)
                # Only mount points live on it: the upper layer is in the cell's directory.
                self.anchor = StorageAnchor(bwrap=self._bwrap, mountpoint=rw, size=1 << 20)
                self.note_process("anchor", self.anchor.pid)
                base = self.dir / "overlay"
                self._mkdir(rw / "workspace", 0o700, None)
            else:
                base = rw / "overlay"
            owner = self._owner()
            self._mkdir(base, 0o700, None)
            self._mkdir(base / "upper", 0o700, owner)
            self._mkdir(base / "work", 0o700, None)
            if not rootless:
                self._mkdir(rw / "lower", 0o700, None)
            upper = self.host_path(str(base / "upper"))
            for rel in whiteouts:
                _whiteout(Path(f"/proc/self/fd/{src_fd}"), upper, rel, owner)
            mount_overlay(
                OverlayPlan(
                    base=base,
                    mounts=rw,
                    source=real,
                    source_id=(st.st_dev, st.st_ino),
                    idmap=None
                    if rootless
                    else (st.st_uid, st.st_gid, self.identity.uid, self.identity.gid),
                ),
                self.anchor.setns_fds,
            )
        except (Unavailable, OSError, SandboxError) as e:
            self._undo_overlay(started)
            if isinstance(e, Unavailable):
                raise
            raise Unavailable(
                e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            ) from e
        if started:
            with contextlib.suppress(OSError):
                (self.dir / "workspace").rmdir()  # the copy's, empty and unused
        self.workspace_bind = str(rw / "workspace")

    def _undo_overlay(self, started: bool) -> None:
        if started:
            if self.anchor is not None:
                self.anchor.close()
                self.anchor = None
            remove_tree(self.dir / "overlay")
            remove_tree(self.dir / "rw")
        else:
            remove_tree(self.host_path(str(self.dir / "rw" / "overlay")))
            lower = self.host_path(str(self.dir / "rw" / "lower"))
            with contextlib.suppress(OSError):
                lower.rmdir()

    def new_scratch(self) -> Scratch:
        """Fresh /tmp and home for the next cell (on the anchor's tmpfs when it has one)."""
        if self.disk is None:
            return Scratch(None, None)
        self._scratch_n += 1
        base = self.dir / "rw" / "scratch" / str(self._scratch_n)
        owner = self._owner()
        self._mkdir(base, 0o711, None)
        self._mkdir(base / "tmp", 0o1777, owner)
        self._mkdir(base / "home", 0o755, owner)
        return Scratch(str(base / "tmp"), str(base / "home"))

    def drop_scratch(self, scratch: Scratch) -> None:
        if scratch.tmp is not None:
            remove_tree(self.host_path(str(Path(scratch.tmp).parent)))

    def note_cgroups(self, dirs: list[Path]) -> None:
        self._record["cgroups"] += [str(d) for d in dirs]
        self.write_record()

    def note_process(self, role: str, pid: int | None) -> None:
        if pid is not None:
            self._record["processes"].append(
                {"role": role, "pid": pid, "start": process_start_time(pid)}
            )
            self.write_record()

    def write_record(self) -> None:
        """Record what ``buildcell gc`` must undo if this supervisor dies."""
        write_atomic(
            self.dir / "cell.json",
            json.dumps(self._record).encode(),
            what="the cell's record",
            durable=False,  # its processes do not outlive a reboot either
        )

    def keep_workspace(self, dest: Path, *, max_bytes: int | None = None) -> None:
        """Move the workspace to ``dest``, a new directory on the state directory's file
        system, where :meth:`close` does not remove it (``build --keep-failed``).

        A copied workspace without a disk budget is renamed there, at no cost; one on the
        anchor's tmpfs or an overlay (which end with the storage) is copied out as every
        hostile tree is: never following a link, skipping fifos and devices, and at most
        ``max_bytes`` of content (an overlay's view holds the whole source, a hard link
        is copied as often as it is linked).

        Raises:
            StateError: it cannot be moved or copied there.
        """
        try:
            if self.anchor is None:
                os.rename(self.workspace, dest)
                return
            dest.mkdir(mode=0o700)
        except OSError as e:
            raise StateError(f"cannot keep the workspace in {dest}: {e.strerror}") from e
        try:
            copy_tree(self.workspace, dest, max_bytes=max_bytes)
        except (ConfigError, SandboxError) as e:
            remove_tree(dest)
            raise StateError(f"cannot keep the workspace in {dest}: {e.message}") from e

    def close(self) -> dict[str, bool | int]:
        """Remove everything; return what was checked. Idempotent."""
        workspace_removed = True
        anchor_stopped = True
        if self.anchor is not None:
            self.anchor.close()
            anchor_stopped = not self.anchor.alive()
        if self.dir.exists():
            _remove_record_last(self.dir)
            workspace_removed = not self.dir.exists()
        if self._owns_identity:
            self.identity.close()
        return {
            "workspace_removed": workspace_removed,
            "anchor_stopped": anchor_stopped,
            "mounts_left": mounts_under(self.dir),
        }


#: ``auto`` copies a source of at most this many entries and bytes (its copy costs less
#: than mounting an overlay, a few milliseconds), and looks at no more entries than that.
SMALL_SOURCE = (256, 4 << 20)


def _survey(source: Path) -> str | None:
    """Why ``auto`` copies ``source`` rather than overlay it, or None.

    A walk that stops after :data:`SMALL_SOURCE` entries, so it costs the same for any
    larger tree: a tree within it is small (quicker to copy); one whose entries seen so
    far have owners other than the source directory's would show those files read-only
    in an overlay (only the source's owner becomes the cell's). Symlinks are not
    followed; a tree that cannot be read is left to the copy to report."""
    entries, size = SMALL_SOURCE
    try:
        owner = os.stat(source).st_uid
        pending = [str(source)]
        while pending:
            with os.scandir(pending.pop()) as it:
                for entry in it:
                    st = entry.stat(follow_symlinks=False)
                    if st.st_uid != owner:
                        return (
                            f"{entry.path} belongs to uid {st.st_uid}, the source to uid "
                            f"{owner}: copied, so that the build may change every file"
                        )
                    entries -= 1
                    if stat.S_ISREG(st.st_mode):
                        size -= st.st_size
                    if entries < 0 or size < 0:
                        return None
                    if stat.S_ISDIR(st.st_mode):
                        pending.append(entry.path)
    except OSError:
        return "the source cannot be read: copied (the copy says what it could not read)"
    return "a small source: copied, which is quicker than an overlay"


def _whiteout(
    source: Path, upper: Path, rel: tuple[str, ...], owner: tuple[int, int] | None
) -> None:
    """Hide ``source/rel`` from the overlay: a whiteout at ``upper/rel``, under directories
    made with the lower ones' modes (the merged view shows the upper directory's)."""
    lower = source
    where = upper
    for name in rel[:-1]:
        lower = lower / name
        where = where / name
        if not where.exists():
            mode = stat.S_IMODE(os.lstat(lower).st_mode)
            where.mkdir(mode=0o700)
            os.chmod(where, mode)
            if owner is not None:
                os.chown(where, *owner)
    os.mknod(where / rel[-1], stat.S_IFCHR | 0o600, os.makedev(0, 0))


def _remove_record_last(cell_dir: Path) -> None:
    """Remove the cell's directory, its ``cell.json`` last: a supervisor killed midway
    leaves the record that tells ``gc`` the rest is its to remove (a directory without one
    is taken for a cell still being made)."""
    try:
        fd = os.open(cell_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise SandboxError(f"cannot remove {cell_dir}: {e.strerror}") from e
    try:
        for name in os.listdir(fd):
            if name != "cell.json":
                remove_entry(fd, name, shown=cell_dir / name)
    finally:
        os.close(fd)
    remove_tree(cell_dir)


def mounts_under(path: Path) -> int:
    """How many mounts of our mount namespace lie at or under ``path``."""
    prefix = str(path)
    return sum(1 for p in mount_points() if p == prefix or p.startswith(prefix + "/"))
