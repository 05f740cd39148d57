"""The cell's filesystem as a list of mounts (pure), and the synthesized /etc files.

``host`` is deliberately minimal: programs need ``/usr``, the ``/bin``/``/lib*`` entries
(symlinks into ``/usr`` on merged-/usr systems), the dynamic loader's cache, CA
certificates and ``/etc/alternatives``. They do not need the host's users, home
directories, ``/var``, ``/run``, ``/opt``, ``/srv``, ``/mnt`` or its network configuration,
so none of those exist in the cell.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from buildcell.cell.bwrap import Mount
from buildcell.cell.config import (
    CELL_GID,
    CELL_HOME,
    CELL_HOSTNAME,
    CELL_UID,
    CELL_USER,
    CELL_WORKSPACE,
    HostRootfs,
)
from buildcell.errors import ConfigError

__all__ = [
    "HOST_ETC_ENTRIES",
    "HOST_TOP_LEVEL",
    "MAX_TREE_ENTRIES",
    "OpenedTree",
    "TreeEntry",
    "WritableAreas",
    "cell_mounts",
    "etc_mounts",
    "host_rootfs_digest",
    "open_tree",
    "rootfs_mounts",
    "synthesized_etc",
    "tree_mounts",
]

#: Top-level host entries bound (read-only) or re-created as the same symlink.
HOST_TOP_LEVEL = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")

#: The parts of the host's /etc that programs need. Everything naming users, hosts,
#: resolvers or services of the host is synthesized instead (see ``synthesized_etc``);
#: ``ld.so.preload`` is excluded on purpose: it would inject host libraries.
HOST_ETC_ENTRIES = (
    "alternatives",  # /usr/bin/cc -> /etc/alternatives/cc -> gcc-12
    "ca-certificates",
    "ca-certificates.conf",
    "crypto-policies",  # Fedora/RHEL TLS defaults
    "debian_version",
    "gai.conf",
    "host.conf",
    "ld.so.cache",  # the dynamic loader's cache
    "ld.so.conf",
    "ld.so.conf.d",
    "locale.alias",
    "lsb-release",
    "mime.types",
    "os-release",
    "pki",  # CA bundles on Fedora/RHEL/SUSE
    "protocols",
    "rpc",
    "services",
    "shells",
    "ssl",  # CA bundles and openssl.cnf
    "xml",  # XML catalogs (docbook builds)
)

#: Names under /etc that always come from ``synthesized_etc`` and never from a rootfs.
_SYNTHESIZED = frozenset(
    {"passwd", "group", "hosts", "resolv.conf", "hostname", "nsswitch.conf", "timezone"}
)

#: Top-level names of a directory rootfs that the cell provides itself.
_DIR_ROOTFS_SKIP = frozenset({"proc", "dev", "sys", "tmp", "home", "run", "etc", "workspace"})


def synthesized_etc() -> dict[str, bytes]:
    """The /etc files every cell gets, identical on every host (reproducible builds)."""
    passwd = (
        "root:x:0:0:root:/root:/bin/sh\n"
        f"{CELL_USER}:x:{CELL_UID}:{CELL_GID}:{CELL_USER}:{CELL_HOME}:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    )
    group = f"root:x:0:\n{CELL_USER}:x:{CELL_GID}:\nnogroup:x:65534:\n"
    hosts = f"127.0.0.1\tlocalhost {CELL_HOSTNAME}\n::1\tlocalhost ip6-localhost ip6-loopback\n"
    return {
        "passwd": passwd.encode(),
        "group": group.encode(),
        "hosts": hosts.encode(),
        # Nothing answers here unless a network policy starts the cell's resolver.
        "resolv.conf": b"nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
        "hostname": f"{CELL_HOSTNAME}\n".encode(),
        "nsswitch.conf": b"passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n",
        "timezone": b"Etc/UTC\n",
    }


def _entry_mount(host_path: Path, dest: str) -> Mount | None:
    """A read-only bind, or the same symlink, for one host entry; ``None`` if absent."""
    try:
        if host_path.is_symlink():
            return Mount("symlink", dest, src=os.readlink(host_path))
        if host_path.exists():
            return Mount("ro-bind", dest, src=str(host_path))
    except OSError:
        return None
    return None


#: Most entries a directory rootfs may have at its top and in its /etc: each one is a
#: descriptor held while the cell starts.
MAX_TREE_ENTRIES = 4096


@dataclass(frozen=True)
class TreeEntry:
    """One entry of a directory rootfs, as opened confined: bound by descriptor, never by
    path, or recreated as the same symlink (which then resolves inside the cell)."""

    name: str
    kind: Literal["dir", "file", "symlink"]
    fd: int | None = None
    target: str | None = None

    def mount(self, dest: str) -> Mount:
        if self.kind == "symlink":
            assert self.target is not None
            return Mount("symlink", dest, src=self.target)
        assert self.fd is not None
        return Mount("ro-bind-fd", dest, src=str(self.fd))


@dataclass(frozen=True)
class OpenedTree:
    """A directory rootfs opened beneath its root: what :func:`tree_mounts` plans from.

    Attributes:
        top: the entries at its top level that the cell gets (not proc, dev, tmp, ...).
        etc: the entries of its ``/etc``, resolved inside the root (``etc -> /`` names
            the root itself; no host path is ever reached through it).
        var_tmp: ``var`` and ``var/tmp`` are real directories (a fresh tmpfs goes there).
    """

    top: tuple[TreeEntry, ...]
    etc: tuple[TreeEntry, ...]
    var_tmp: bool
    fds: tuple[int, ...]

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def _tree_entries(
    dir_fd: int, *, what: str, skip: frozenset[str], fds: list[int]
) -> list[TreeEntry]:
    names = sorted(os.listdir(dir_fd))
    if len(names) > MAX_TREE_ENTRIES:
        raise ConfigError(
            f"{what} has {len(names)} entries; a rootfs may have at most {MAX_TREE_ENTRIES} there"
        )
    result: list[TreeEntry] = []
    for name in names:
        if name in skip:
            continue
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                result.append(TreeEntry(name, "symlink", target=os.readlink(name, dir_fd=dir_fd)))
                continue
            if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
                continue  # fifos, sockets, devices: never bound
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        except FileNotFoundError:
            continue
        fds.append(fd)
        after = os.fstat(fd)
        kind: Literal["dir", "file"] = "dir" if stat.S_ISDIR(after.st_mode) else "file"
        if not (stat.S_ISDIR(after.st_mode) or stat.S_ISREG(after.st_mode)):
            continue  # swapped since the look
        result.append(TreeEntry(name, kind, fd=fd))
    return result


def open_tree(root_fd: int, *, what: str) -> OpenedTree:
    """Open the entries of a directory rootfs below ``root_fd``, never following a symlink
    out of it.

    Raises:
        ConfigError: the rootfs (or its ``/etc``) has too many entries, or its ``/etc`` is
            not a directory.
        OSError: the tree cannot be read.
    """
    from buildcell import confined

    fds: list[int] = []
    try:
        top = _tree_entries(root_fd, what=what, skip=_DIR_ROOTFS_SKIP, fds=fds)
        etc: list[TreeEntry] = []
        try:
            etc_fd = confined.open_dir(root_fd, "etc", what=f"{what}: etc", resolve="in_root")
        except confined.UnsafePathError:
            etc_fd = None  # no /etc at all: the synthesized files alone
        if etc_fd is not None:
            try:
                skip = _SYNTHESIZED | {"ld.so.preload"}
                etc = _tree_entries(etc_fd, what=f"{what}: /etc", skip=skip, fds=fds)
            finally:
                os.close(etc_fd)
        var = next((e for e in top if e.name == "var"), None)
        var_tmp = False
        if var is not None and var.kind == "dir" and var.fd is not None:
            with contextlib.suppress(OSError):
                var_tmp = stat.S_ISDIR(os.stat("tmp", dir_fd=var.fd, follow_symlinks=False).st_mode)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return OpenedTree(tuple(top), tuple(etc), var_tmp, tuple(fds))


def etc_mounts(files: Mapping[str, int]) -> list[Mount]:
    """The synthesized /etc files, each copied by bubblewrap from a descriptor into the
    sandbox's own memory: every cell has its own, so no cell sees another open them (an
    inotify watch on a shared file would) and no bytes changed on disk reach a cell."""
    return [
        Mount("ro-bind-data", f"/etc/{name}", src=str(fd), mode=0o644)
        for name, fd in sorted(files.items())
    ]


def tree_mounts(tree: OpenedTree, *, etc_files: Mapping[str, int]) -> list[Mount]:
    """The read-only root of a cell on a directory rootfs (pure: the tree is opened)."""
    mounts = [entry.mount(f"/{entry.name}") for entry in tree.top]
    if tree.var_tmp:
        mounts.append(Mount("tmpfs", "/var/tmp", mode=0o1777))
    mounts += [entry.mount(f"/etc/{entry.name}") for entry in tree.etc]
    return mounts + etc_mounts(etc_files)


def rootfs_mounts(
    rootfs: HostRootfs, *, host_root: Path = Path("/"), etc: bool = True
) -> list[Mount]:
    """The read-only root of a cell on the host's ``/usr``, before the synthesized /etc
    files (:func:`etc_mounts`), proc, dev and the writable areas (a directory rootfs is
    planned by :func:`tree_mounts`).

    Args:
        rootfs: the host rootfs.
        host_root: the host's ``/``, replaceable in tests.
        etc: with the host's /etc entries bound one by one; without, the caller binds a
            prepared /etc (:mod:`buildcell.cell.etcdir`).
    """
    assert isinstance(rootfs, HostRootfs)
    mounts: list[Mount] = []
    for name in HOST_TOP_LEVEL:
        m = _entry_mount(host_root / name, f"/{name}")
        if m is not None:
            mounts.append(m)
    mounts.append(Mount("dir", "/var", mode=0o755))
    mounts.append(Mount("symlink", "/var/tmp", src="../tmp"))
    if not etc:
        return mounts
    etc_base = host_root / "etc"
    for name in HOST_ETC_ENTRIES:
        m = _entry_mount(etc_base / name, f"/etc/{name}")
        if m is not None:
            mounts.append(m)
    if (host_root / "usr/share/zoneinfo/UTC").exists():
        mounts.append(Mount("symlink", "/etc/localtime", src="/usr/share/zoneinfo/UTC"))
    return mounts


class WritableAreas:
    """Where the cell's writable directories come from.

    ``workspace`` is always a host directory. ``tmp`` and ``home`` are host directories
    when the cell has a disk budget (all three then live on one size-capped tmpfs), or
    ``None`` for a fresh tmpfs inside the sandbox. ``binds`` are (host path, cell path)
    pairs bound read-only after the workspace (pinned inputs inside it); ``caches`` the
    same, bound read-write (build caches, possibly inside home or the workspace).
    """

    def __init__(
        self,
        workspace: str,
        tmp: str | None = None,
        home: str | None = None,
        binds: tuple[tuple[str, str], ...] = (),
        caches: tuple[tuple[str, str], ...] = (),
    ):
        self.workspace = workspace
        self.tmp = tmp
        self.home = home
        self.binds = binds
        self.caches = caches


def cell_mounts(root: list[Mount], areas: WritableAreas) -> tuple[Mount, ...]:
    """The complete mount sequence: root, kernel filesystems, writable areas, then the root
    remounted read-only (the writable areas are separate mounts and stay writable)."""
    mounts = list(root)
    mounts += [
        Mount("proc", "/proc"),
        Mount("dev", "/dev"),
        Mount("tmpfs", "/dev/shm", size=64 * 1024 * 1024, mode=0o1777),
    ]
    if areas.tmp is None:
        mounts.append(Mount("tmpfs", "/tmp", mode=0o1777))
    else:
        mounts.append(Mount("bind", "/tmp", src=areas.tmp))
    if areas.home is None:
        mounts.append(Mount("tmpfs", CELL_HOME, mode=0o755))
    else:
        mounts.append(Mount("bind", CELL_HOME, src=areas.home))
    mounts.append(Mount("bind", CELL_WORKSPACE, src=areas.workspace))
    mounts += [Mount("ro-bind", dest, src=src) for src, dest in areas.binds]
    mounts += [Mount("bind", dest, src=src) for src, dest in areas.caches]
    mounts.append(Mount("remount-ro", "/"))
    return tuple(mounts)


#: Package databases that list what is installed under /usr, by distribution family.
_PACKAGE_DATABASES = (
    "var/lib/dpkg/status",  # Debian, Ubuntu
    "var/lib/rpm/rpmdb.sqlite",  # Fedora, RHEL 9+
    "var/lib/rpm/Packages",  # older RPM
    "lib/apk/db/installed",  # Alpine
    "var/lib/pacman/local/ALPM_DB_VERSION",  # Arch (a marker; the directory is listed)
)


def host_rootfs_digest(host_root: Path = Path("/")) -> tuple[str, str]:
    """A digest of what the ``host`` rootfs gives a cell, and what the digest covers.

    The host's package database (dpkg's ``status`` file, RPM's database, apk's list) names
    every installed package with its version: when a package is installed, removed or
    upgraded, the digest changes. Files changed under /usr without the package manager are
    not covered. Without a known database, a listing of ``/usr`` (path, size, mtime) is
    hashed instead.

    Returns:
        (``sha256`` hex digest, what it covers).
    """
    import hashlib

    for rel in _PACKAGE_DATABASES:
        path = host_root / rel
        try:
            with open(path, "rb") as f:  # the host's own database, not repository content
                digest = hashlib.sha256()
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
        except OSError:
            continue
        return digest.hexdigest(), f"/{rel}: the packages installed on the host"
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(host_root / "usr"):
        dirnames.sort()
        for name in sorted(filenames):
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(dirpath, name))
                digest.update(f"{dirpath}/{name} {st.st_size} {st.st_mtime_ns}\n".encode())
    return digest.hexdigest(), "/usr: a listing of every file's path, size and mtime"
