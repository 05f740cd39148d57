"""The prepared /etc: a copy of what a cell gets of the host's /etc, remade whenever the
host's changes, held by running cells, swept when unused (real files, a fake host /etc)."""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from buildcell.cell import etcdir
from buildcell.cell.etcdir import EtcNotPrepared, prepared_etc, sweep
from buildcell.cell.rootfs import HOST_ETC_ENTRIES, synthesized_etc

#: Far enough ahead that nothing the test wrote counts as changing right now.
LATER = time.time() + 3600
#: Long enough for what a test just wrote to count as settled.
RACY = etcdir.RACY_SECONDS + 0.1


def _host(root: Path) -> Path:
    etc = root / "host-etc"
    (etc / "ssl" / "certs").mkdir(parents=True)
    (etc / "ssl" / "openssl.cnf").write_text("[openssl]\n")
    (etc / "ssl" / "certs" / "ca.pem").write_text("CERT\n")
    (etc / "ssl" / "certs" / "link.pem").symlink_to("ca.pem")
    private = etc / "ssl" / "private"
    private.mkdir(mode=0o710)
    os.chmod(private, 0o710)
    (private / "key.pem").write_text("PRIVATE KEY\n")
    (etc / "alternatives").mkdir()
    (etc / "alternatives" / "cc").symlink_to("/usr/bin/gcc-12")
    (etc / "ld.so.cache").write_bytes(b"\x00cache" * 100)
    (etc / "os-release").symlink_to("../usr/lib/os-release")
    (etc / "services").write_text("ssh 22/tcp\n")
    os.chmod(etc / "services", 0o600)  # not for everyone: never copied
    (etc / "shells").write_text("/bin/sh\n")
    os.chmod(etc / "shells", 0o755)
    os.mkfifo(etc / "protocols")
    for name in ("shadow", "machine-id", "ld.so.preload"):  # not in HOST_ETC_ENTRIES
        (etc / name).write_text(name)
    return etc


def _prepare(root: Path, etc: Path, *, now: float = LATER) -> etcdir.PreparedEtc:
    return prepared_etc(root / "state-etc", host_etc=etc, now=now)


def test_the_copy_holds_what_a_cell_gets_and_nothing_else(tmp_path: Path) -> None:
    etc = _host(tmp_path)
    with _prepare(tmp_path, etc) as held:
        tree = held.path
        assert held.mounts()[0].dest == "/etc" and held.mounts()[0].kind == "ro-bind"
        names = set(os.listdir(tree))
        assert names == {
            "ssl", "alternatives", "ld.so.cache", "os-release", "shells", "localtime",
            *synthesized_etc(),
        }  # fmt: skip
        for name, data in synthesized_etc().items():
            assert (tree / name).read_bytes() == data
        assert (tree / "ssl/openssl.cnf").read_text() == "[openssl]\n"
        assert os.readlink(tree / "ssl/certs/link.pem") == "ca.pem"
        assert os.readlink(tree / "alternatives/cc") == "/usr/bin/gcc-12"
        assert os.readlink(tree / "os-release") == "../usr/lib/os-release"
        assert os.readlink(tree / "localtime") == "/usr/share/zoneinfo/UTC"
        # What not everyone may read is not copied: an empty, closed directory.
        assert os.listdir(tree / "ssl/private") == []
        assert stat.S_IMODE(os.lstat(tree / "ssl/private").st_mode) == 0o700
        assert stat.S_IMODE(os.lstat(tree / "shells").st_mode) == 0o755
        assert stat.S_IMODE(os.lstat(tree / "ld.so.cache").st_mode) == 0o644
        assert stat.S_IMODE(os.lstat(tree / "ssl").st_mode) == 0o755


def test_an_unchanged_host_etc_reuses_the_copy(tmp_path: Path) -> None:
    etc = _host(tmp_path)
    with _prepare(tmp_path, etc) as first, _prepare(tmp_path, etc) as second:
        assert first.name == second.name
        assert os.path.samefile(first.path, second.path)
    etcdir._manifests.clear()  # a new process reads the manifest again
    with _prepare(tmp_path, etc) as third:
        assert third.name == first.name


def _change(etc: Path, change: str) -> Path:
    """Make ``change`` to the fake host /etc; return the entry changed."""
    match change:
        case "edit in place, same size":
            target = etc / "ssl" / "openssl.cnf"
            with open(target, "r+") as f:
                f.write("[OPENSSL]\n")
        case "symlink replaced deep down":
            target = etc / "ssl" / "certs"
            (target / "link.pem").unlink()
            (target / "link.pem").symlink_to("other.pem")
        case "entry appears":
            target = etc / "xml"
            target.mkdir()
            (target / "catalog").write_text("<catalog/>")
        case "entry disappears":
            target = etc
            (etc / "ld.so.cache").unlink()
        case "chmod":
            target = etc / "services"
            os.chmod(target, 0o644)
        case "directory made readable":
            target = etc / "ssl" / "private"
            os.chmod(target, 0o755)
        case "file replaced by a directory":
            target = etc / "ssl"
            (etc / "ssl" / "openssl.cnf").unlink()
            (etc / "ssl" / "openssl.cnf").mkdir()
    return target


CHANGES: dict[str, Callable[[Path], bool]] = {
    "edit in place, same size": lambda t: (t / "ssl/openssl.cnf").read_text() == "[OPENSSL]\n",
    "symlink replaced deep down": lambda t: os.readlink(t / "ssl/certs/link.pem") == "other.pem",
    "entry appears": lambda t: (t / "xml/catalog").read_text() == "<catalog/>",
    "entry disappears": lambda t: not (t / "ld.so.cache").exists(),
    "chmod": lambda t: (t / "services").read_text() == "ssh 22/tcp\n",
    "directory made readable": lambda t: (t / "ssl/private/key.pem").read_text() == "PRIVATE KEY\n",
    "file replaced by a directory": lambda t: (t / "ssl/openssl.cnf").is_dir(),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_any_change_to_the_host_etc_makes_a_new_copy(tmp_path: Path, change: str) -> None:
    etc = _host(tmp_path)
    with _prepare(tmp_path, etc) as before:
        old = before.path
    target = _change(etc, change)
    # Made within the same clock tick as the copy, a change could keep the timestamps it
    # was copied with: its mtime is set an hour ahead (the copy's `now` is later still).
    for touched in (target, *((target.parent,) if target != etc else ())):
        os.utime(touched, (LATER - 60, LATER - 60), follow_symlinks=False)
    with _prepare(tmp_path, etc, now=LATER + 3600) as after:
        assert after.path != old
        assert CHANGES[change](after.path)
        assert os.readlink(tmp_path / "state-etc" / "current") == after.name
    # The old copy was not in use: it is gone.
    assert not old.exists()


def test_an_entry_changing_right_now_is_not_trusted(tmp_path: Path) -> None:
    """As git's racy index: a copy of an entry modified within its timestamp's granularity
    may miss a change stamped the same; it is never published, the cell binds entries."""
    etc = _host(tmp_path)
    with pytest.raises(EtcNotPrepared, match="changed in the last"):
        _prepare(tmp_path, etc, now=time.time())
    root = tmp_path / "state-etc"
    assert not (root / "current").exists()
    assert os.listdir(root) == []  # nothing half-made is left


def test_a_copy_in_use_survives_the_sweep_and_goes_when_released(tmp_path: Path) -> None:
    etc = _host(tmp_path)
    root = tmp_path / "state-etc"
    held_old = _prepare(tmp_path, etc)
    (etc / "shells").write_text("/bin/bash\n")
    os.utime(etc / "shells", (LATER - 60, LATER - 60))
    with _prepare(tmp_path, etc, now=LATER + 3600) as new:
        assert new.name != held_old.name
        assert sweep(root) == 0  # the old one is held by its cell, the new one is current
        assert (held_old.path / "shells").read_text() == "/bin/sh\n"
        held_old.close()
        assert sweep(root) == 1
        assert sorted(os.listdir(root)) == sorted(["current", new.name])
        assert sweep(root) == 0  # the current copy is never swept, held or not


def test_a_damaged_copy_is_made_again(tmp_path: Path) -> None:
    """A crash before the data reached the disk (an empty file), a lost file, a broken
    manifest: the next process makes a new copy instead of giving cells a broken /etc."""
    etc = _host(tmp_path)
    root = tmp_path / "state-etc"
    for damage in ("truncate", "remove", "manifest"):
        with _prepare(tmp_path, etc) as held:
            tree, name = held.path, held.name
        match damage:
            case "truncate":
                os.truncate(tree / "ld.so.cache", 0)
            case "remove":
                (tree / "passwd").unlink()
            case "manifest":
                (root / name / "manifest").write_text("{not json")
        etcdir._manifests.clear()
        with _prepare(tmp_path, etc) as again:
            assert (again.path / "ld.so.cache").read_bytes() == b"\x00cache" * 100
            assert (again.path / "passwd").read_bytes() == synthesized_etc()["passwd"]
            assert json.loads((root / again.name / "manifest").read_text())["format"] == 1


def test_a_state_that_cannot_hold_a_copy_says_why(tmp_path: Path) -> None:
    etc = _host(tmp_path)
    (tmp_path / "state-etc").write_text("not a directory")
    with pytest.raises(EtcNotPrepared, match="cannot prepare /etc"):
        _prepare(tmp_path, etc)


def test_a_host_etc_past_the_limits_is_bound_entry_by_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = _host(tmp_path)
    monkeypatch.setattr(etcdir, "MAX_ENTRIES", 3)
    with pytest.raises(EtcNotPrepared, match="bound one by one"):
        _prepare(tmp_path, etc)
    assert os.listdir(tmp_path / "state-etc") == []


def test_a_preparation_that_died_is_swept_after_a_while(tmp_path: Path) -> None:
    root = tmp_path / "state-etc"
    (root / ".new-deadbeef" / "etc").mkdir(parents=True)
    assert sweep(root, now=time.time()) == 0
    assert sweep(root, now=time.time() + 3600) == 1
    assert not (root / ".new-deadbeef").exists()


def test_every_host_entry_is_watched(tmp_path: Path) -> None:
    """Each name of HOST_ETC_ENTRIES is in the manifest, present or not: one installed
    later (a new /etc/pki) is noticed."""
    etc = _host(tmp_path)
    with _prepare(tmp_path, etc) as held:
        manifest = json.loads((held.path.parent / "manifest").read_text())
    top = {rel for rel, _ in manifest["entries"] if "/" not in rel}
    assert top == set(HOST_ETC_ENTRIES)


def test_a_large_directory_is_bound_live_from_the_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/etc/alternatives holds hundreds of symlinks: bound over an empty directory of the
    copy, so what changes inside it needs no new copy; replaced by a file, it does."""
    monkeypatch.setattr(etcdir, "BIND_ENTRIES", 3)  # /etc/ssl has 3
    etc = _host(tmp_path)
    for tool in ("c++", "ld", "as"):
        (etc / "alternatives" / tool).symlink_to(f"/usr/bin/{tool}-12")
    with _prepare(tmp_path, etc) as held:
        first = held.name
        assert held.binds == ("alternatives",)
        assert [(m.kind, m.dest, m.src) for m in held.mounts()] == [
            ("ro-bind", "/etc", str(held.path)),
            ("ro-bind", "/etc/alternatives", str(etc / "alternatives")),
        ]
        assert os.listdir(held.path / "alternatives") == []  # the mount point
        assert (held.path / "ssl/certs/ca.pem").exists()  # two entries: copied
    (etc / "alternatives" / "cc").unlink()
    (etc / "alternatives" / "cc").symlink_to("/usr/bin/clang")
    with _prepare(tmp_path, etc, now=LATER + 3600) as held:
        assert held.name == first
    for link in os.listdir(etc / "alternatives"):
        (etc / "alternatives" / link).unlink()
    (etc / "alternatives").rmdir()
    (etc / "alternatives").write_text("a file now")
    with _prepare(tmp_path, etc, now=LATER + 3600) as held:
        assert held.name != first and held.binds == ()
        assert (held.path / "alternatives").read_text() == "a file now"


# -- regressions of the red-team round ------------------------------------------------------


def test_a_restrictive_umask_does_not_close_the_copy_to_the_cells(tmp_path: Path) -> None:
    """Made under umask 027, the directories were 0750: no cell uid could reach the copy,
    and every later cell failed. Modes are set explicitly; a copy closed by an older
    version is made again."""
    etc = _host(tmp_path)
    old = os.umask(0o027)
    try:
        with _prepare(tmp_path, etc) as held:
            assert stat.S_IMODE(os.lstat(held.path).st_mode) == 0o755
            assert stat.S_IMODE(os.lstat(held.path.parent).st_mode) == 0o755
            expected = 0o711 if os.geteuid() == 0 else 0o700
            assert stat.S_IMODE(os.lstat(tmp_path / "state-etc").st_mode) == expected
            os.chmod(held.path.parent, 0o750)
    finally:
        os.umask(old)
    etcdir._manifests.clear()
    warnings: list[str] = []
    with prepared_etc(tmp_path / "state-etc", host_etc=etc, now=LATER, warn=warnings.append):
        pass
    assert warnings and "not open to the cells" in warnings[0]


def test_a_file_changed_between_the_look_and_the_copy_is_not_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An admin makes a file private and writes a secret into it while the copy is made:
    the copy holds the new content under the old, open mode. It is never published."""
    etc = _host(tmp_path)
    target = etc / "ssl" / "openssl.cnf"
    copy_file = etcdir._Copier.copy_file

    def racing(self: etcdir._Copier, rel: str, st: os.stat_result, mode: int) -> None:
        if rel == "ssl/openssl.cnf":
            os.chmod(target, 0o600)
            target.write_text("SECRET\n")
        copy_file(self, rel, st, mode)

    monkeypatch.setattr(etcdir._Copier, "copy_file", racing)
    with pytest.raises(EtcNotPrepared, match=r"ssl/openssl\.cnf changed"):
        _prepare(tmp_path, etc)
    assert os.listdir(tmp_path / "state-etc") == []


@pytest.mark.parametrize(
    "manifest",
    [
        "[]",
        '{"format": 1, "entries": [], "digests": []}',
        '{"format": 1, "entries": [["ld.so.cache", [33188, 1]]], "digests": {}}',
        '{"format": 1, "entries": [["alternatives", [4095]]], "digests": {}}',
        '{"format": 1, "entries": "x", "digests": {}}',
    ],
)
def test_a_malformed_manifest_is_made_again_not_a_crash(tmp_path: Path, manifest: str) -> None:
    etc = _host(tmp_path)
    with _prepare(tmp_path, etc) as held:
        (held.path.parent / "manifest").write_text(manifest)
    etcdir._manifests.clear()
    warnings: list[str] = []
    with prepared_etc(
        tmp_path / "state-etc", host_etc=etc, now=LATER, warn=warnings.append
    ) as again:
        assert (again.path / "ld.so.cache").read_bytes() == b"\x00cache" * 100
    assert len(warnings) == 1 and "is damaged" in warnings[0]


@pytest.mark.parametrize("name", ["passwd", "ld.so.cache", "ssl/openssl.cnf"])
def test_a_same_size_change_to_the_copy_is_found(tmp_path: Path, name: str) -> None:
    """A bit flipped in a copied or synthesized file keeps its size: each is checked by
    content once per process."""
    etc = _host(tmp_path)
    with _prepare(tmp_path, etc) as held:
        path = held.path / name
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x20
        path.write_bytes(bytes(data))
    etcdir._manifests.clear()
    warnings: list[str] = []
    with prepared_etc(
        tmp_path / "state-etc", host_etc=etc, now=LATER, warn=warnings.append
    ) as again:
        assert (again.path / name).read_bytes() != bytes(data)
    assert len(warnings) == 1 and name in warnings[0]


def test_a_copy_is_held_before_it_is_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gc that read `current` just before a new copy was published took the new one for
    an old one: the copy is locked by its maker before its name exists."""
    etc = _host(tmp_path)
    root = tmp_path / "state-etc"
    publish = etcdir._publish
    retired: list[bool] = []

    def with_a_sweep_in_the_window(root_: Path, name: str) -> None:
        retired.append(etcdir._retire(root_, name))  # gc, with `current` not yet this
        publish(root_, name)

    monkeypatch.setattr(etcdir, "_publish", with_a_sweep_in_the_window)
    with _prepare(tmp_path, etc) as held:
        assert retired == [False]
        assert (held.path / "passwd").exists()
        assert os.readlink(root / "current") == held.name


def test_a_manifest_larger_than_a_mebibyte_is_read_whole(tmp_path: Path) -> None:
    etc = _host(tmp_path)
    with _prepare(tmp_path, etc) as held:
        manifest = held.path.parent / "manifest"
        data = json.loads(manifest.read_text())
        data["padding"] = "x" * (2 << 20)  # a host /etc of some 8,000 entries has as much
        manifest.write_text(json.dumps(data))
        name = held.name
    etcdir._manifests.clear()
    warnings: list[str] = []
    with prepared_etc(
        tmp_path / "state-etc", host_etc=etc, now=LATER, warn=warnings.append
    ) as again:
        assert again.name == name
    assert warnings == []


def test_an_mtime_in_the_future_is_not_taken_for_a_change_in_progress(tmp_path: Path) -> None:
    """mtimes can be set to anything (a restored backup, `touch -d`): the racy rule looks
    at the ctime, which only moves with a change."""
    etc = _host(tmp_path)
    future = time.time() + 86400 * 365
    os.utime(etc / "shells", (future, future))
    time.sleep(RACY)
    with prepared_etc(tmp_path / "state-etc", host_etc=etc) as held:
        assert (held.path / "shells").exists()


def test_a_deep_tree_is_bound_entry_by_entry_not_a_crash(tmp_path: Path) -> None:
    etc = _host(tmp_path)
    deep = etc / "xml"
    for i in range(etcdir.MAX_DEPTH + 2):
        deep = deep / f"d{i}"
    deep.mkdir(parents=True)
    with pytest.raises(EtcNotPrepared, match="nested deeper"):
        _prepare(tmp_path, etc)


def test_a_current_that_is_a_directory_is_replaced(tmp_path: Path) -> None:
    etc = _host(tmp_path)
    root = tmp_path / "state-etc"
    (root / "current").mkdir(parents=True)
    with _prepare(tmp_path, etc) as held:
        assert os.readlink(root / "current") == held.name
    assert sorted(os.listdir(root)) == sorted(["current", held.name])
