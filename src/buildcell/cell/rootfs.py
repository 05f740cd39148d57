"""The cell's filesystem as a list of mounts (pure), and the synthesized /etc files.

``host`` is deliberately minimal: programs need ``/usr``, the ``/bin``/``/lib*`` entries
(symlinks into ``/usr`` on merged-/usr systems), the dynamic loader's cache, CA
certificates and ``/etc/alternatives``. They do not need the host's users, home
directories, ``/var``, ``/run``, ``/opt``, ``/srv``, ``/mnt`` or its network configuration,
so none of those exist in the cell.
"""

from __future__ import annotations

import os
from pathlib import Path

from buildcell.cell.bwrap import Mount
from buildcell.cell.config import (
    CELL_GID,
    CELL_HOME,
    CELL_HOSTNAME,
    CELL_UID,
    CELL_USER,
    CELL_WORKSPACE,
    DirRootfs,
    HostRootfs,
    Rootfs,
)

__all__ = [
    "HOST_ETC_ENTRIES",
    "HOST_TOP_LEVEL",
    "WritableAreas",
    "cell_mounts",
    "rootfs_mounts",
    "synthesized_etc",
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


def rootfs_mounts(rootfs: Rootfs, *, etc_dir: Path, host_root: Path = Path("/")) -> list[Mount]:
    """The read-only root of the cell, before proc, dev and the writable areas.

    Args:
        rootfs: which root.
        etc_dir: host directory holding the files of ``synthesized_etc`` (bound read-only).
        host_root: the host's ``/``, replaceable in tests.
    """
    mounts: list[Mount] = []
    if isinstance(rootfs, HostRootfs):
        for name in HOST_TOP_LEVEL:
            m = _entry_mount(host_root / name, f"/{name}")
            if m is not None:
                mounts.append(m)
        etc_names: list[str] = list(HOST_ETC_ENTRIES)
        etc_base = host_root / "etc"
        mounts.append(Mount("dir", "/var", mode=0o755))
        mounts.append(Mount("symlink", "/var/tmp", src="../tmp"))
    else:
        assert isinstance(rootfs, DirRootfs)
        base = rootfs.path
        for entry in sorted(os.listdir(base)):
            if entry in _DIR_ROOTFS_SKIP:
                continue
            m = _entry_mount(base / entry, f"/{entry}")
            if m is not None:
                mounts.append(m)
        etc_base = base / "etc"
        etc_names = sorted(os.listdir(etc_base)) if etc_base.is_dir() else []
        if (base / "var" / "tmp").is_dir() and not (base / "var").is_symlink():
            mounts.append(Mount("tmpfs", "/var/tmp", mode=0o1777))
    for name in etc_names:
        if name in _SYNTHESIZED or name == "ld.so.preload":
            continue
        m = _entry_mount(etc_base / name, f"/etc/{name}")
        if m is not None:
            mounts.append(m)
    for name in sorted(synthesized_etc()):
        mounts.append(Mount("ro-bind", f"/etc/{name}", src=str(etc_dir / name)))
    if isinstance(rootfs, HostRootfs) and (host_root / "usr/share/zoneinfo/UTC").exists():
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
