"""The workspace copy of the source, and removal of a tree a cell may have made hostile."""

# Odd and permissive modes are the point here: they are what a cell leaves behind.

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import buildcell.trees as workspace_module
from buildcell.errors import ConfigError, SandboxError
from buildcell.trees import CopyStats, copy_tree, remove_tree

MTIME_NS = 1_234_567_890_123_456_789
NOBODY = 65534


@pytest.fixture
def src(tmp_path: Path) -> Path:
    source = tmp_path / "src"
    source.mkdir()
    return source


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    d = tmp_path / "dest"
    d.mkdir()
    return d


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


# --- copy_tree ----------------------------------------------------------------------------


def test_copies_content_modes_and_times(src: Path, dest: Path) -> None:
    (src / "pkg" / "sub").mkdir(parents=True)
    (src / "pkg" / "mod.py").write_bytes(b"print('hi')\n")
    (src / "pkg" / "sub" / "data.bin").write_bytes(os.urandom(5 << 20))
    (src / "empty").write_bytes(b"")
    (src / "run.sh").write_bytes(b"#!/bin/sh\n")
    os.chmod(src / "run.sh", 0o750)
    (src / "suid").write_bytes(b"x")
    os.chmod(src / "suid", 0o4755)
    os.chmod(src / "pkg" / "mod.py", 0o640)
    os.utime(src / "pkg" / "mod.py", ns=(MTIME_NS - 5, MTIME_NS))
    os.chmod(src / "pkg" / "sub", 0o750)
    readonly = src / "readonly"
    readonly.mkdir()
    (readonly / "f").write_bytes(b"in a read-only directory")
    os.chmod(readonly, 0o555)

    stats = copy_tree(src, dest)

    # Before reading it: with relatime, the read below updates the atime.
    copied = (dest / "pkg" / "mod.py").stat()
    assert (copied.st_atime_ns, copied.st_mtime_ns) == (MTIME_NS - 5, MTIME_NS)
    for rel in ["pkg/mod.py", "pkg/sub/data.bin", "empty", "run.sh", "readonly/f"]:
        assert (dest / rel).read_bytes() == (src / rel).read_bytes()
    assert _mode(dest / "run.sh") == 0o750
    assert _mode(dest / "suid") == 0o755  # setuid dropped
    assert _mode(dest / "pkg" / "mod.py") == 0o640
    assert _mode(dest / "pkg" / "sub") == 0o750
    assert _mode(dest / "readonly") == 0o555
    assert stats.files == 6
    assert stats.dirs == 3
    assert stats.symlinks == 0
    assert stats.bytes == sum(
        (src / r).stat().st_size
        for r in ["pkg/mod.py", "pkg/sub/data.bin", "run.sh", "suid", "readonly/f"]
    )
    assert stats.skipped == ()


def test_symlinks_are_copied_verbatim_and_never_followed(src: Path, dest: Path) -> None:
    (src / "dir").mkdir()
    (src / "dir" / "file").write_bytes(b"x")
    links = {
        "relative": "dir/file",
        "up": "../outside",
        "absolute": "/etc/passwd",
        "dangling": "does/not/exist",
        "to_dir": "dir",
        "host_dir": "/etc",
        "self": "self",
    }
    for name, target in links.items():
        (src / name).symlink_to(target)

    stats = copy_tree(src, dest)

    for name, target in links.items():
        assert (dest / name).is_symlink()
        assert os.readlink(dest / name) == target
    assert stats.symlinks == len(links)
    assert stats.files == 1
    assert stats.dirs == 1
    # Nothing was copied through "host_dir" or "to_dir".
    assert sorted(p.name for p in dest.iterdir()) == sorted([*links, "dir"])


@pytest.mark.timeout(10)
def test_fifo_and_socket_are_skipped(
    src: Path, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    os.mkfifo(src / "pipe")
    (src / "keep").write_bytes(b"k")
    monkeypatch.chdir(src)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind("sock")
        stats = copy_tree(src, dest)

    assert stats.skipped == (("pipe", "fifo"), ("sock", "socket"))
    assert sorted(p.name for p in dest.iterdir()) == ["keep"]


def test_exclude_by_identity(src: Path, dest: Path, tmp_path: Path) -> None:
    (src / "buildcell-out").mkdir()
    (src / "buildcell-out" / "old.whl").write_bytes(b"old")
    (src / "secret.env").write_bytes(b"TOKEN")
    (src / "keep").write_bytes(b"k")
    alias = tmp_path / "alias"
    alias.symlink_to(src / "buildcell-out")  # compared after resolving

    stats = copy_tree(src, dest, exclude=[alias, src / "secret.env", tmp_path / "missing"])

    assert sorted(p.name for p in dest.iterdir()) == ["keep"]
    assert stats.files == 1


def test_dest_inside_source_is_not_copied_into_itself(src: Path) -> None:
    (src / "a").write_bytes(b"a")
    inner = src / ".cell" / "workspace"
    inner.mkdir(parents=True)

    copy_tree(src, inner)

    assert (inner / "a").read_bytes() == b"a"
    assert (inner / ".cell").is_dir()
    assert list((inner / ".cell").iterdir()) == []


def test_hard_links_become_independent_copies(src: Path, dest: Path) -> None:
    (src / "a").write_bytes(b"shared")
    os.link(src / "a", src / "b")

    copy_tree(src, dest)

    a, b = (dest / "a").stat(), (dest / "b").stat()
    assert a.st_ino != b.st_ino
    assert a.st_nlink == b.st_nlink == 1
    (dest / "a").write_bytes(b"changed")
    assert (dest / "b").read_bytes() == b"shared"
    assert (src / "a").read_bytes() == b"shared"


def test_odd_names(src: Path, dest: Path) -> None:
    raw = os.fsencode(src) + b"/caf\xe9"
    with open(raw, "wb") as f:
        f.write(b"latin-1")
    (src / "new\nline").write_bytes(b"nl")

    copy_tree(src, dest)

    with open(os.fsencode(dest) + b"/caf\xe9", "rb") as f:
        assert f.read() == b"latin-1"
    assert (dest / "new\nline").read_bytes() == b"nl"


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_owner_is_applied_to_every_entry(src: Path, dest: Path) -> None:
    (src / "d").mkdir()
    (src / "d" / "f").write_bytes(b"f")
    (src / "link").symlink_to("/etc/passwd")
    passwd = os.stat("/etc/passwd")

    copy_tree(src, dest, owner=(12345, 23456))

    for rel in ["d", "d/f", "link"]:
        st = (dest / rel).lstat()
        assert (st.st_uid, st.st_gid) == (12345, 23456), rel
    assert (os.stat("/etc/passwd").st_uid, os.stat("/etc/passwd").st_gid) == (
        passwd.st_uid,
        passwd.st_gid,
    )


def test_progress_reports_totals(src: Path, dest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workspace_module, "_PROGRESS_EVERY", 0.0)
    for i in range(5):
        (src / f"f{i}").write_bytes(b"x" * (i + 1))
    calls: list[tuple[int, int]] = []

    stats = copy_tree(src, dest, progress=lambda files, done: calls.append((files, done)))

    assert calls[-1] == (stats.files, stats.bytes) == (5, 15)
    assert calls == sorted(calls)  # monotonic


def test_progress_is_rate_limited(src: Path, dest: Path) -> None:
    for i in range(300):
        (src / f"f{i}").write_bytes(b"x")
    calls: list[float] = []

    start = time.monotonic()
    copy_tree(src, dest, progress=lambda _f, _b: calls.append(time.monotonic()))
    elapsed = time.monotonic() - start

    assert 1 <= len(calls) <= elapsed / 0.2 + 2


@pytest.mark.parametrize("broken", ["copy_file_range", "sendfile"])
def test_falls_back_when_kernel_copy_is_unavailable(
    src: Path, dest: Path, monkeypatch: pytest.MonkeyPatch, broken: str
) -> None:
    def unavailable(*_args: object) -> int:
        raise OSError(errno.EXDEV if broken == "copy_file_range" else errno.ENOSYS, "no")

    monkeypatch.setattr(os, "copy_file_range", unavailable)
    if broken == "sendfile":
        monkeypatch.setattr(os, "sendfile", unavailable)
    data = os.urandom(3 << 20)
    (src / "a").write_bytes(data)
    (src / "b").write_bytes(data[:100])

    stats = copy_tree(src, dest)

    assert (dest / "a").read_bytes() == data
    assert (dest / "b").read_bytes() == data[:100]
    assert stats.bytes == len(data) + 100


def test_missing_source_is_a_config_error(tmp_path: Path, dest: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        copy_tree(tmp_path / "nope", dest)


def test_file_source_is_a_config_error(tmp_path: Path, dest: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(ConfigError, match="not a directory"):
        copy_tree(tmp_path / "file", dest)


def test_non_empty_dest_is_refused(src: Path, dest: Path) -> None:
    (dest / "stale").write_bytes(b"")
    with pytest.raises(SandboxError, match="not empty"):
        copy_tree(src, dest)


def test_relative_exclude_is_refused(src: Path, dest: Path) -> None:
    with pytest.raises(ConfigError, match="absolute"):
        copy_tree(src, dest, exclude=[Path("relative")])


def test_copy_result_type(src: Path, dest: Path) -> None:
    assert copy_tree(src, dest) == CopyStats(files=0, dirs=0, symlinks=0, bytes=0, skipped=())


# --- remove_tree --------------------------------------------------------------------------


def _make_outside(base: Path) -> Path:
    host = base / "host"
    (host / "dir").mkdir(parents=True)
    (host / "dir" / "precious").write_bytes(b"keep me")
    (host / "file").write_bytes(b"keep me too")
    os.chmod(host / "dir", 0o751)
    os.chmod(host / "file", 0o640)
    return host


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    return _make_outside(tmp_path)


def _hostile_tree(root: Path, outside: Path) -> None:
    (root / "locked" / "inner").mkdir(parents=True)
    (root / "locked" / "inner" / "f").write_bytes(b"x")
    (root / "locked" / "f").write_bytes(b"x")
    (root / "readonly").mkdir()
    (root / "readonly" / "f").write_bytes(b"x")
    os.chmod(root / "readonly" / "f", 0o400)
    (root / "link_dir").symlink_to(outside / "dir")
    (root / "link_file").symlink_to(outside / "file")
    (root / "readonly" / "link_up").symlink_to("../../host/dir")
    os.mkfifo(root / "fifo")
    os.chmod(root / "readonly", 0o500)
    os.chmod(root / "locked" / "inner", 0)
    os.chmod(root / "locked", 0)
    os.chmod(root, 0o500)


def _assert_outside_intact(outside: Path) -> None:
    assert (outside / "dir" / "precious").read_bytes() == b"keep me"
    assert (outside / "file").read_bytes() == b"keep me too"
    # The u+rwx that removal gives directories never reaches a symlink's target.
    assert _mode(outside / "dir") == 0o751
    assert _mode(outside / "file") == 0o640


@pytest.mark.timeout(30)
def test_remove_hostile_tree(tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "ws"
    root.mkdir()
    _hostile_tree(root, outside)

    remove_tree(root)

    assert not root.exists()
    _assert_outside_intact(outside)


def _unprivileged(func: Callable[[], None]) -> None:
    """Run ``func`` without root: as is, or in a forked child that switched to nobody.

    Without root the permission bits are in the way, which is the point: this is the path
    that makes directories usable (u+rwx) before removing them.
    """
    if os.geteuid() != 0:
        func()
        return
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (child)
        status = 0
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            func()
        except BaseException:
            os.write(write_end, traceback.format_exc().encode())
            status = 1
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        failure = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, failure


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[Path]:
    """A directory the unprivileged user can write (pytest's are private to root)."""
    if os.geteuid() != 0:
        yield tmp_path
        return
    base = Path(tempfile.mkdtemp(prefix="buildcell-test-"))
    os.chmod(base, 0o777)
    try:
        yield base
    finally:
        shutil.rmtree(base)


@pytest.mark.timeout(30)
def test_remove_hostile_tree_without_root(shared: Path) -> None:
    root = shared / "ws"
    outside: list[Path] = []

    def build_and_remove() -> None:
        # Made by the same user: a chmod through one of the symlinks would succeed.
        outside.append(_make_outside(shared))
        # Deeper than the directories removal holds open: these get moved up, which
        # needs write permission on each of them.
        chain = [root / "chain"]
        for _ in range(100):
            chain.append(chain[-1] / "d")
        chain[-1].mkdir(parents=True)
        for path in reversed(chain):
            os.chmod(path, 0o500)
        _hostile_tree(root, outside[0])
        remove_tree(root)
        _assert_outside_intact(outside[0])

    _unprivileged(build_and_remove)

    assert not root.exists()
    _assert_outside_intact(shared / "host")


def test_unreadable_source_entry_is_a_config_error(shared: Path) -> None:
    def attempt() -> None:
        (shared / "src").mkdir()
        (shared / "dest").mkdir()
        (shared / "src" / "locked").write_bytes(b"x")
        os.chmod(shared / "src" / "locked", 0)
        with pytest.raises(ConfigError, match="locked"):
            copy_tree(shared / "src", shared / "dest")

    _unprivileged(attempt)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("depth", [300, 3000])
def test_remove_very_deep_tree(tmp_path: Path, depth: int) -> None:
    root = tmp_path / "deep"
    root.mkdir()
    # Built with directory descriptors: the full path would exceed PATH_MAX.
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
    finally:
        os.close(fd)

    remove_tree(root)

    assert not root.exists()
    assert list(tmp_path.iterdir()) == []


def test_remove_missing_path_and_idempotence(tmp_path: Path) -> None:
    remove_tree(tmp_path / "missing")
    remove_tree(tmp_path / "missing" / "deeper")
    root = tmp_path / "ws"
    (root / "a").mkdir(parents=True)
    remove_tree(root)
    remove_tree(root)
    assert not root.exists()


def test_remove_symlink_root_removes_only_the_link(tmp_path: Path, outside: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(outside / "dir")

    remove_tree(link)

    assert not link.is_symlink()
    _assert_outside_intact(outside)


def test_remove_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    remove_tree(tmp_path / "f")
    assert not (tmp_path / "f").exists()


@pytest.mark.root
@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="mounting needs root"
)
def test_remove_refuses_to_cross_a_mount(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    (root / "mnt").mkdir(parents=True)
    (root / "other").write_bytes(b"")
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from buildcell.trees import remove_tree\n"
        "from buildcell.errors import SandboxError\n"
        "try:\n"
        "    remove_tree(Path(sys.argv[1]))\n"
        "except SandboxError as e:\n"
        "    print(e, (Path(sys.argv[1]) / 'mnt' / 'f').exists())\n"
        "    sys.exit(3)\n"
    )
    # A private mount namespace: the tmpfs cannot outlive the test.
    shell = 'mount -t tmpfs none "$1/mnt" || exit 42; echo x > "$1/mnt/f"; exec "$2" -c "$3" "$1"'
    result = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            shell,
            "sh",
            str(root),
            sys.executable,
            script,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode == 42:
        pytest.skip("cannot mount a tmpfs here")
    assert result.returncode == 3, result.stderr
    assert "mounted inside it" in result.stdout
    assert result.stdout.strip().endswith("True")  # nothing on the mount was deleted


def test_remove_refuses_dot_paths(tmp_path: Path) -> None:
    with pytest.raises(SandboxError):
        remove_tree(tmp_path / "..")
    with pytest.raises(SandboxError):
        remove_tree(Path("/"))


@pytest.mark.parametrize("size", [1 << 40, (1 << 30) + 4097])
def test_sparse_files_keep_their_holes(src: Path, dest: Path, size: int) -> None:
    """A workspace holding a terabyte that stores nothing (``truncate -s 1T``) is copied
    (kept, or given to a shell) at what it stores: written out, it would fill the disk."""
    with open(src / "sparse.bin", "wb") as f:
        f.truncate(size)
        f.seek(size // 2)
        f.write(b"middle")
        f.seek(size - 3)
        f.write(b"end")
    copy_tree(src, dest)
    copied = dest / "sparse.bin"
    st = copied.stat()
    assert st.st_size == size
    assert st.st_blocks * 512 < 1 << 20  # the data extents only
    with open(copied, "rb") as f:
        f.seek(size // 2)
        assert f.read(6) == b"middle"
        f.seek(size - 3)
        assert f.read() == b"end"
        f.seek(4096)
        assert f.read(4096) == bytes(4096)


def test_copy_bound_counts_every_entry_a_block(tmp_path: Path) -> None:
    """``max_bytes`` bounds what the copy stores: empty directories and symlinks take a
    block each, so 100 of them do not fit in 50 blocks."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(100):
        (src / f"d{i}").mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(SandboxError, match="would exceed"):
        copy_tree(src, dest, max_bytes=50 * 4096)
    dest2 = tmp_path / "dest2"
    dest2.mkdir()
    copy_tree(src, dest2, max_bytes=101 * 4096)
    assert len(list(dest2.iterdir())) == 100
