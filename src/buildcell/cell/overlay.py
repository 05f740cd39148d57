"""Copy-on-write workspaces: the source seen through an overlay, never copied.

The workspace of a cell with a source is an overlayfs mounted in the storage anchor's
mount namespace (see ``anchor``): the source directory is its read-only lower layer; every
write lands in the upper layer, which lives on the anchor's size-capped tmpfs when the cell
has a disk budget (so the budget covers it) and in the cell's directory otherwise. Setting
it up costs the same for ten files or a million; the source is never written.

The mount is made by a short-lived child of the supervisor that enters the anchor's
namespaces (as rootless: its user namespace too, where unprivileged overlay mounts are
allowed since Linux 5.11) and makes only system calls. Ownership must look as a copy's
would: every file the cell's uid may change.

- Rootless, the cell's uid is the caller's, and so is (checked) the source's owner.
- As root, the cell runs as a uid of its own (``identity``), so the lower layer is an
  *idmapped* clone of the source mount (Linux 5.12; overlay over one since 5.19) in which
  the source's owner appears as the cell's uid. Files of other owners appear as the
  overflow uid, read-only; a copy (``BUILDCELL_WORKSPACE=copy``) would have made them the
  cell's.

What buildcell excludes from a copy (the output directory, its staging, the state
directory, when they lie inside the source) is hidden by whiteouts in the upper layer.
The overlay is ``nosuid,nodev``, follows no redirects and keeps no index: a hostile source
tree cannot steer it with overlay xattrs of its own.

Where any of this is missing (an old kernel, a file system without idmapped mounts such
as NFS), or the source has a mount point inside it (the lower layer is one mount: it would
show what the mount covers), the workspace is copied as before and ``doctor`` says why.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import signal
import stat
import struct
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from buildcell.cell import _spawn
from buildcell.errors import SandboxError

__all__ = [
    "OverlayPlan",
    "Unavailable",
    "mount_overlay",
    "mount_points",
    "mounts_below",
    "unescape_mountinfo",
    "whiteout_paths",
]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_mount = _libc.mount
_unshare = _libc.unshare

# System call numbers of the new mount API: the same on every architecture since 5.2.
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442
_OPEN_TREE_CLONE = 1
_OPEN_TREE_CLOEXEC = os.O_CLOEXEC
_AT_EMPTY_PATH = 0x1000
_AT_FDCWD = -100
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_NOSUID = 0x2
_MOUNT_ATTR_NODEV = 0x4
_MOUNT_ATTR_IDMAP = 0x100000
_MS_NOSUID = 0x2
_MS_NODEV = 0x4

#: Options that keep a hostile lower layer from steering the overlay: no redirects
#: followed, no index, no metadata-only copies.
_SAFE_OPTIONS = "redirect_dir=nofollow,index=off,metacopy=off"


class Unavailable(Exception):
    """The host cannot give this source a copy-on-write workspace (the reason is str())."""


@dataclass(frozen=True)
class OverlayPlan:
    """Where the overlay's parts are, as the anchor's namespace sees them.

    Attributes:
        base: the directory holding ``upper`` and ``work`` (host disk or the budget tmpfs).
        mounts: the directory holding ``lower`` (the idmapped clone, as root) and the
            merged mount point ``workspace``, on the anchor's tmpfs.
        source: the source directory (absolute).
        source_id: its (device, inode), checked again inside the namespace.
        idmap: as root, (source uid, source gid, cell uid, cell gid); rootless None.
    """

    base: Path
    mounts: Path
    source: Path
    source_id: tuple[int, int]
    idmap: tuple[int, int, int, int] | None

    @property
    def merged(self) -> Path:
        return self.mounts / "workspace"


def whiteout_paths(
    source_fd: int, real_source: Path, exclude: Sequence[Path]
) -> list[tuple[str, ...]]:
    """The paths, relative to the source (the directory ``source_fd``, whose path is
    ``real_source``), at which the overlay must hide ``exclude``.

    Only what the lower layer really holds at that path: each component is looked up from
    the descriptor without following a symlink, and the last one must be the excluded
    directory or file itself (same device and inode). A path reached only through a
    symlink in the source is not in the lower layer there: the cell sees the symlink,
    which leads nowhere outside.

    Raises:
        Unavailable: an excluded path cannot be inspected.
    """
    found: list[tuple[str, ...]] = []
    for path in exclude:
        try:
            want = os.stat(path)
            rel = Path(os.path.realpath(path)).relative_to(real_source).parts
        except (FileNotFoundError, ValueError):  # not there, or not inside the source
            continue
        except OSError as e:
            raise Unavailable(f"cannot inspect {path}: {e.strerror}") from e
        if not rel:
            raise Unavailable(f"the source is itself excluded ({path})")
        if _lower_holds(source_fd, rel, (want.st_dev, want.st_ino)):
            found.append(rel)
    return found


def mount_points() -> list[str]:
    """The mount points of this process's mount namespace, as paths."""
    with open("/proc/self/mountinfo") as f:
        fields = [line.split(" ", 5)[4] for line in f]
    return [unescape_mountinfo(p) if "\\" in p else p for p in fields]


def mounts_below(real_source: Path) -> list[str]:
    """Mount points strictly inside ``real_source`` (of this process's namespace): an
    overlay's lower layer is one mount, so it would show what they cover, not them."""
    prefix = str(real_source).rstrip("/") + "/"
    return [point for point in mount_points() if point.startswith(prefix)]


def unescape_mountinfo(field: str) -> str:
    """A path as ``/proc/*/mountinfo`` writes it: space, tab, newline and backslash are
    octal escapes (``\\040``, ``\\011``, ``\\012``, ``\\134``)."""
    raw = os.fsencode(field)
    return os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), raw))


def _lower_holds(source_fd: int, rel: tuple[str, ...], want: tuple[int, int]) -> bool:
    fd = source_fd
    try:
        for name in rel:
            try:
                nfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError:
                return False
            if fd != source_fd:
                os.close(fd)
            fd = nfd
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                return False
        st = os.fstat(fd)
        return (st.st_dev, st.st_ino) == want
    finally:
        if fd != source_fd:
            os.close(fd)


def mount_overlay(plan: OverlayPlan, setns_fds: tuple[tuple[int, int], ...]) -> None:
    """Mount the overlay at ``plan.merged`` inside the anchor's namespaces.

    ``plan.base`` must hold empty ``upper`` (with its whiteouts) and ``work`` directories,
    and ``plan.mounts`` empty ``workspace`` and (as root) ``lower`` ones.

    Raises:
        Unavailable: the kernel or the file systems refused (the reason names the call).
    """
    userns = _idmap_userns(plan.idmap) if plan.idmap is not None else None
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        child = _mount_child(plan, userns, w)
        try:
            proc = _spawn.spawn(
                _spawn.SpawnPlan(argv=[_true()], setns_fds=setns_fds, in_child=child, capture=False)
            )
        except (OSError, subprocess.SubprocessError) as e:
            raise Unavailable(f"cannot start the overlay mount: {e}") from e
        os.close(w)
        w = -1
        proc.wait()
        said = os.read(r, 256).decode(errors="replace")
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
        if userns is not None:
            os.close(userns)
    if said != "ok":
        raise Unavailable(_explain(said or f"the mount helper exited with {proc.returncode}"))


def _explain(said: str) -> str:
    call, _, number = said.partition(":")
    if not number.isdigit():
        return said
    code = int(number)
    hint = {
        "mount_setattr": "this file system or kernel has no idmapped mounts (Linux 5.12+; not NFS)",
        "overlay": "the kernel refused the overlay (Linux 5.11+ unprivileged, 5.19+ over "
        "an idmapped layer)",
        "source": "the source changed while the workspace was set up",
    }.get(call, "")
    text = f"{call}: {os.strerror(code) if code else 'failed'}"
    return f"{text} ({hint})" if hint else text


def _mount_child(plan: OverlayPlan, userns: int | None, report: int) -> Callable[[], None]:
    """What the child runs inside the anchor's namespaces: system calls only, prepared
    here (the paths as bytes, the options string), then it exits without an exec."""
    mounts = os.fsencode(plan.mounts)
    merged = os.fsencode(plan.merged)
    base = os.fsencode(plan.base)
    source = os.fsencode(plan.source)
    source_id = plan.source_id
    attr = None
    if userns is not None:
        flags = _MOUNT_ATTR_IDMAP | _MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV
        attr = ctypes.create_string_buffer(struct.pack("QQQQ", flags, 0, 0, userns), 32)
    rootless = plan.idmap is None
    extra = ",userxattr" if rootless else ""

    def fail(call: str, code: int) -> None:
        os.write(report, f"{call}:{code}".encode())
        os._exit(1)

    def child() -> None:
        try:
            src = os.open(source, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            fail("source", e.errno or 0)
            return
        st = os.fstat(src)
        if (st.st_dev, st.st_ino) != source_id:
            fail("source", errno.ESTALE)
        if attr is not None:
            tree = _libc.syscall(
                ctypes.c_long(_SYS_OPEN_TREE), src, b"",
                _OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC | _AT_EMPTY_PATH,
            )  # fmt: skip
            if tree < 0:
                fail("open_tree", ctypes.get_errno())
            if _libc.syscall(
                ctypes.c_long(_SYS_MOUNT_SETATTR), int(tree), b"", _AT_EMPTY_PATH, attr, 32
            ) != 0:  # fmt: skip
                fail("mount_setattr", ctypes.get_errno())
            lower = mounts + b"/lower"
            if _libc.syscall(
                ctypes.c_long(_SYS_MOVE_MOUNT), int(tree), b"", _AT_FDCWD, lower,
                _MOVE_MOUNT_F_EMPTY_PATH,
            ) != 0:  # fmt: skip
                fail("move_mount", ctypes.get_errno())
            # Named by a descriptor, as rootless: the state directory's path may hold a
            # "," or ":" that the options would split at, and the cell's mount table
            # shows no host path.
            try:
                moved = os.open(lower, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as e:
                fail("move_mount", e.errno or 0)
                return
            lowerdir = f"/proc/self/fd/{moved}".encode()
        else:
            # The descriptor opened here, in the anchor's namespace: overlay takes only
            # layers of the mounter's own namespace.
            lowerdir = f"/proc/self/fd/{src}".encode()
        try:
            os.chdir(base)
        except OSError as e:
            fail("chdir", e.errno or 0)
        options = b"lowerdir=" + lowerdir + b",upperdir=upper,workdir=work,"
        options += (_SAFE_OPTIONS + extra).encode()
        if _mount(b"overlay", merged, b"overlay", _MS_NOSUID | _MS_NODEV,
                  options) != 0:  # fmt: skip
            fail("overlay", ctypes.get_errno())
        os.write(report, b"ok")
        os._exit(0)

    return child


def _idmap_userns(idmap: tuple[int, int, int, int]) -> int:
    """A user namespace (its descriptor) mapping the source's owner onto the cell's uid
    and its group onto the cell's gid, and nothing else: what the idmapped lower layer
    is seen through. Made by a child that unshares and waits; root writes its maps."""
    src_uid, src_gid, uid, gid = idmap

    def unshare_user() -> None:
        if _unshare(_spawn.CLONE_NEWUSER) != 0:
            os._exit(1)

    try:
        proc = _spawn.spawn(
            _spawn.SpawnPlan(argv=[_sleep(), "infinity"], in_child=unshare_user, capture=False)
        )
    except (OSError, subprocess.SubprocessError) as e:
        raise Unavailable(f"cannot make the idmapping's user namespace: {e}") from e
    try:
        try:
            with open(f"/proc/{proc.pid}/uid_map", "w") as f:
                f.write(f"{src_uid} {uid} 1\n")
            with open(f"/proc/{proc.pid}/gid_map", "w") as f:
                f.write(f"{src_gid} {gid} 1\n")
            return os.open(f"/proc/{proc.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise Unavailable(f"cannot map the source's owner: {e.strerror}") from e
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def _program(name: str) -> str:
    found = shutil.which(name, path="/usr/bin:/bin")
    if found is None:
        raise SandboxError(f"{name} is not installed in /usr/bin or /bin (coreutils)")
    return found


def _true() -> str:
    return _program("true")


def _sleep() -> str:
    return _program("sleep")
