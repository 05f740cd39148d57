"""Which host uid a cell's processes run as.

Unprivileged, bubblewrap maps the cell's uid 1000 onto the caller's own uid. As root that
would be host uid 0, so the supervisor first drops to an unprivileged uid of a reserved
range, one per running cell: anything a cell's process reached on the host would meet
ordinary permissions, and two cells never share a uid. The range starts at
``BUILDCELL_UID_BASE`` (default 0x70000000 = 1879048192, above the ranges distributions
give to users, /etc/subuid and systemd containers) and has ``BUILDCELL_UID_COUNT`` ids.
A slot is held by an flock on ``/run/buildcell/ids/<uid>.lock`` (named by the uid, in one
place for the whole host, so that two supervisors with different state directories never
hand out one uid at the same time), which the kernel releases if the supervisor dies.
Where ``/run`` cannot be used, the state directory's ``ids/`` holds the locks instead.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from buildcell._fs import Closing
from buildcell.errors import SandboxError

__all__ = ["HostIdentity", "acquire_identity"]


@dataclass
class HostIdentity(Closing):
    """The host uid/gid of a cell; ``drop`` is True when the supervisor must switch to it."""

    uid: int
    gid: int
    drop: bool
    slot: int | None = None
    _lock_fd: int | None = None

    def close(self) -> None:
        """Release the uid slot. Idempotent."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


#: Where uid slots are locked for the whole host (a tmpfs, emptied at boot).
HOST_LOCKS = Path("/run/buildcell/ids")


def _lock_dir(fallback: Path | None) -> Path:
    """The host-wide lock directory, made private to root; else ``fallback``."""
    try:
        HOST_LOCKS.parent.mkdir(mode=0o700, exist_ok=True)
        HOST_LOCKS.mkdir(mode=0o700, exist_ok=True)
        st = HOST_LOCKS.lstat()
        if st.st_uid == 0 and st.st_mode & 0o077 == 0 and HOST_LOCKS.is_dir():
            return HOST_LOCKS
    except OSError:
        pass
    if fallback is None:
        raise SandboxError(f"cannot use {HOST_LOCKS} to hold the cells' uids")
    return fallback


def acquire_identity(ids_dir: Path | None, uid_range: tuple[int, int]) -> HostIdentity:
    """The identity for a new cell: the caller's own ids, or (as root) a free slot of
    ``uid_range`` (base, count).

    Raises:
        SandboxError: every slot of the range is taken.
    """
    if os.geteuid() != 0:
        return HostIdentity(os.getuid(), os.getgid(), drop=False)
    locks = _lock_dir(ids_dir)
    base, count = uid_range
    for slot in range(count):
        fd = os.open(
            locks / f"{base + slot}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )  # fmt: skip
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return HostIdentity(base + slot, base + slot, drop=True, slot=slot, _lock_fd=fd)
    raise SandboxError(
        f"all {count} cell uids from {base} are in use",
        hint="raise BUILDCELL_UID_COUNT or run fewer cells at once",
    )
