from __future__ import annotations

import os
from pathlib import Path

from buildcell.cell.bwrap import Mount
from buildcell.cell.config import DirRootfs, HostRootfs
from buildcell.cell.rootfs import (
    HOST_ETC_ENTRIES,
    WritableAreas,
    cell_mounts,
    rootfs_mounts,
    synthesized_etc,
)


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
    mounts = rootfs_mounts(HostRootfs(), etc_dir=Path("/state/etc"), host_root=host)
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
        assert dests[f"/etc/{name}"].src == f"/state/etc/{name}"
    assert all(m.kind in ("ro-bind", "symlink", "dir") for m in mounts)


def test_host_etc_allowlist_is_explicit() -> None:
    assert "shadow" not in HOST_ETC_ENTRIES
    assert "ld.so.preload" not in HOST_ETC_ENTRIES
    assert "passwd" not in HOST_ETC_ENTRIES


def test_dir_rootfs_binds_its_entries_and_synthesizes_identity(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "bin").mkdir(parents=True)
    (root / "proc").mkdir()
    (root / "var" / "tmp").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_text("evil")
    (root / "etc" / "os-release").write_text("ID=x")
    (root / "etc" / "localtime").symlink_to("/usr/share/zoneinfo/Europe/Paris")
    mounts = rootfs_mounts(DirRootfs(root), etc_dir=Path("/s"))
    dests = {m.dest: m for m in mounts}
    assert dests["/bin"].src == str(root / "bin")
    assert "/proc" not in dests
    assert dests["/var/tmp"].kind == "tmpfs"
    assert dests["/etc/passwd"].src == "/s/passwd"
    assert dests["/etc/os-release"].src == str(root / "etc" / "os-release")
    assert dests["/etc/localtime"] == Mount(
        "symlink", "/etc/localtime", src="/usr/share/zoneinfo/Europe/Paris"
    )


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
