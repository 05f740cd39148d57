from __future__ import annotations

import os
from pathlib import Path

import pytest

from buildcell.cell.bwrap import Mount
from buildcell.cell.config import HostRootfs
from buildcell.cell.rootfs import (
    HOST_ETC_ENTRIES,
    MAX_TREE_ENTRIES,
    OpenedTree,
    WritableAreas,
    cell_mounts,
    etc_mounts,
    open_tree,
    rootfs_mounts,
    synthesized_etc,
    tree_mounts,
)
from buildcell.errors import ConfigError

#: Descriptors the synthesized /etc files would be in (planning only looks at the numbers).
ETC_FDS = {name: 100 + i for i, name in enumerate(sorted(synthesized_etc()))}


def _fake_host(root: Path) -> Path:
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "share" / "zoneinfo").mkdir(parents=True)
    (root / "usr" / "share" / "zoneinfo" / "UTC").write_text("")
    (root / "bin").symlink_to("usr/bin")
    (root / "lib64").mkdir()
    for secret in ("root", "home", "var", "run", "opt", "srv", "mnt", "media", "boot"):
        (root / secret).mkdir()
    etc = root / "etc"
    etc.mkdir()
    for name in ("ld.so.cache", "passwd", "shadow", "hosts", "resolv.conf", "ld.so.preload",
                 "machine-id", "sudoers", "os-release"):  # fmt: skip
        (etc / name).write_text(name)
    (etc / "ssl").mkdir()
    (etc / "alternatives").mkdir()
    return root


def test_host_view_is_minimal(tmp_path: Path) -> None:
    host = _fake_host(tmp_path / "host")
    mounts = rootfs_mounts(HostRootfs(), host_root=host) + etc_mounts(ETC_FDS)
    dests = {m.dest: m for m in mounts}
    assert dests["/usr"] == Mount("ro-bind", "/usr", src=str(host / "usr"))
    assert dests["/bin"] == Mount("symlink", "/bin", src="usr/bin")
    assert dests["/lib64"].kind == "ro-bind"
    for absent in ("/root", "/home", "/var", "/run", "/opt", "/srv", "/mnt", "/media", "/boot"):
        assert absent not in dests or dests[absent].kind == "dir"
    assert dests["/var/tmp"] == Mount("symlink", "/var/tmp", src="../tmp")
    for never in ("/etc/shadow", "/etc/ld.so.preload", "/etc/machine-id", "/etc/sudoers"):
        assert never not in dests
    assert dests["/etc/ld.so.cache"].src == str(host / "etc" / "ld.so.cache")
    assert dests["/etc/ssl"].kind == "ro-bind"
    for name in ("passwd", "group", "hosts", "resolv.conf", "hostname", "nsswitch.conf"):
        assert dests[f"/etc/{name}"] == Mount(
            "ro-bind-data", f"/etc/{name}", src=str(ETC_FDS[name]), mode=0o644
        )
    assert all(m.kind in ("ro-bind", "symlink", "dir", "ro-bind-data") for m in mounts)


def test_host_etc_allowlist_is_explicit() -> None:
    assert "shadow" not in HOST_ETC_ENTRIES
    assert "ld.so.preload" not in HOST_ETC_ENTRIES
    assert "passwd" not in HOST_ETC_ENTRIES


def _same(fd_text: str | None, path: Path) -> bool:
    assert fd_text is not None
    a, b = os.fstat(int(fd_text)), os.stat(path, follow_symlinks=False)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _tree(root: Path) -> tuple[OpenedTree, dict[str, Mount]]:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        tree = open_tree(fd, what="rootfs")
    finally:
        os.close(fd)
    return tree, {m.dest: m for m in tree_mounts(tree, etc_files=ETC_FDS)}


def test_dir_rootfs_binds_its_entries_and_synthesizes_identity(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "bin").mkdir(parents=True)
    (root / "proc").mkdir()
    (root / "var" / "tmp").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_text("evil")
    (root / "etc" / "os-release").write_text("ID=x")
    (root / "etc" / "localtime").symlink_to("/usr/share/zoneinfo/Europe/Paris")
    tree, dests = _tree(root)
    try:
        # Bound by the descriptor of what was opened, never by a path bubblewrap resolves.
        assert dests["/bin"].kind == "ro-bind-fd"
        assert _same(dests["/bin"].src, root / "bin")
        assert "/proc" not in dests
        assert dests["/var/tmp"].kind == "tmpfs"
        assert dests["/etc/passwd"].kind == "ro-bind-data"  # the cell's own copy
        assert _same(dests["/etc/os-release"].src, root / "etc" / "os-release")
        assert dests["/etc/localtime"] == Mount(
            "symlink", "/etc/localtime", src="/usr/share/zoneinfo/Europe/Paris"
        )
    finally:
        tree.close()


@pytest.mark.parametrize("target", ["/", "/etc", "..", "../../..", "/proc/self/root/etc"])
def test_dir_rootfs_etc_symlink_resolves_inside_the_root(tmp_path: Path, target: str) -> None:
    root = tmp_path / "rootfs"
    (root / "usr").mkdir(parents=True)
    (root / "usr" / "marker").write_text("image")
    (root / "etc").symlink_to(target)
    tree, dests = _tree(root)
    try:
        for mount in tree_mounts(tree, etc_files=ETC_FDS):
            if mount.kind == "ro-bind-fd":
                assert mount.src is not None
                where = os.readlink(f"/proc/self/fd/{mount.src}")
                assert where.startswith(str(root)), (mount, where)
            assert mount.kind != "ro-bind"  # nothing of the host, by path
        # etc -> / (or above the root) names the root itself, inside the image.
        if target in ("/", "..", "../../.."):
            assert _same(dests["/etc/usr"].src, root / "usr")
    finally:
        tree.close()


def test_dir_rootfs_never_binds_specials_or_follows_entries(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    os.mkfifo(root / "fifo")
    os.mkfifo(root / "etc" / "fifo")
    (root / "usr").symlink_to("/")
    (root / "etc" / "shadow").symlink_to("/etc/shadow")
    (root / "var").symlink_to("/var")
    tree, dests = _tree(root)
    try:
        assert "/fifo" not in dests
        assert "/etc/fifo" not in dests
        assert dests["/usr"] == Mount("symlink", "/usr", src="/")
        assert dests["/etc/shadow"] == Mount("symlink", "/etc/shadow", src="/etc/shadow")
        assert "/var/tmp" not in dests  # var is a link: no tmpfs through it
    finally:
        tree.close()


def test_dir_rootfs_with_too_many_entries_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    for i in range(MAX_TREE_ENTRIES + 1):
        (root / "etc" / f"f{i}").touch()
    with pytest.raises(ConfigError, match="at most"):
        _tree(root)


def test_cell_mounts_end_read_only_with_writable_areas() -> None:
    mounts = cell_mounts([Mount("ro-bind", "/usr", src="/usr")], WritableAreas("/s/ws"))
    kinds = [(m.kind, m.dest) for m in mounts]
    assert kinds[-1] == ("remount-ro", "/")
    assert ("proc", "/proc") in kinds
    assert ("dev", "/dev") in kinds
    assert ("tmpfs", "/tmp") in kinds
    assert ("tmpfs", "/home/builder") in kinds
    assert ("bind", "/workspace") in kinds
    with_disk = cell_mounts([], WritableAreas("/a/ws", tmp="/a/t", home="/a/h"))
    assert Mount("bind", "/tmp", src="/a/t") in with_disk
    assert Mount("bind", "/home/builder", src="/a/h") in with_disk


def test_synthesized_etc_is_fixed() -> None:
    files = synthesized_etc()
    assert files == synthesized_etc()
    assert b"builder:x:1000:1000" in files["passwd"]
    assert files["hostname"] == b"buildcell\n"
    assert b"nameserver 127.0.0.1" in files["resolv.conf"]
    assert not any(
        os.uname().nodename.encode() in v for v in files.values() if len(os.uname().nodename) > 3
    )
