"""Where a cell's writable directories live on the host, and their removal.

One ``CellStorage`` backs one cell (``buildcell run``) or every step of one build: the
workspace carries over between the cells that share it; /tmp and home are fresh per cell.
Without a disk budget the workspace is a directory under the state directory and /tmp
and home are tmpfs mounts inside each sandbox. With one, all three live on the anchor's
size-capped tmpfs (see ``anchor``).
"""

from __future__ import annotations

import errno
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from buildcell._fs import Closing
from buildcell.cell.anchor import StorageAnchor
from buildcell.cell.identity import HostIdentity, acquire_identity
from buildcell.errors import ConfigError, SandboxError, StateError
from buildcell.state import StateDir, process_start_time, write_atomic
from buildcell.trees import CopyStats, copy_tree, remove_tree
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

    def populate(self, source: Path, exclude: list[Path]) -> CopyStats:
        """Copy ``source`` into the (empty) workspace.

        Raises:
            ConfigError: the source does not fit in the disk budget.
            SandboxError: the copy failed for another reason.
        """
        try:
            return copy_tree(source, self.workspace, exclude=exclude, owner=self._owner())
        except (SandboxError, StateError) as e:
            cause = e.__cause__
            if (
                self.anchor is not None
                and isinstance(cause, OSError)
                and (cause.errno == errno.ENOSPC)
            ):
                raise ConfigError(
                    f"the source {source} does not fit in the cell's disk budget "
                    f"({format_size(self.disk or 0)})",
                    hint="raise --disk, or exclude what the build does not need",
                ) from e
            raise

    def new_scratch(self) -> Scratch:
        """Fresh /tmp and home for the next cell (on the anchor's tmpfs when it has one)."""
        if self.anchor is None:
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

    def keep_workspace(self, dest: Path) -> None:
        """Move the workspace to ``dest``, a new directory on the state directory's file
        system, where :meth:`close` does not remove it (``build --keep-failed``).

        Without a disk budget it is renamed there, at no cost; with one it lives on the
        anchor's tmpfs, which ends with the storage, so it is copied out (as every hostile
        tree is: never following a link, skipping fifos and devices).

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
            copy_tree(self.workspace, dest)
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
            remove_tree(self.dir)
            workspace_removed = not self.dir.exists()
        if self._owns_identity:
            self.identity.close()
        return {
            "workspace_removed": workspace_removed,
            "anchor_stopped": anchor_stopped,
            "mounts_left": mounts_under(self.dir),
        }


def mounts_under(path: Path) -> int:
    """How many mounts of our mount namespace lie at or under ``path``."""
    prefix = str(path)
    count = 0
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mountpoint = line.split()[4].replace("\\040", " ")
            if mountpoint == prefix or mountpoint.startswith(prefix + "/"):
                count += 1
    return count
