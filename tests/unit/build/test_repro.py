"""Reproducibility: comparing two builds' outputs, and archives that depend only on content."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import shutil
import stat
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal
from unittest import mock

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from buildcell.build import repro
from buildcell.build.repro import (
    FileDiff,
    ReproReport,
    clamp_mtimes,
    compare_trees,
    first_difference,
    write_reproducible_tar_gz,
)
from buildcell.errors import ConfigError, OutputError

MiB = 1 << 20
SECRET = b"TOPSECRET host content"
IS_ROOT = os.geteuid() == 0


def write(path: Path, data: bytes = b"", mode: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mode is not None:
        path.chmod(mode)
    return path


def pair(tmp_path: Path, a: bytes, b: bytes) -> tuple[Path, Path]:
    return write(tmp_path / "a", a), write(tmp_path / "b", b)


def naive_first_difference(a: bytes, b: bytes) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


# --- first_difference --------------------------------------------------------------------


def test_identical_files_have_no_difference(tmp_path: Path) -> None:
    data = random.Random(1).randbytes(2 * MiB + 12345)
    assert first_difference(*pair(tmp_path, data, data)) is None


def test_difference_at_the_first_byte(tmp_path: Path) -> None:
    assert first_difference(*pair(tmp_path, b"abc", b"xbc")) == 0


def test_difference_in_the_middle_of_the_second_chunk(tmp_path: Path) -> None:
    data = bytearray(random.Random(2).randbytes(3 * MiB))
    offset = MiB + MiB // 2 + 12345
    other = bytearray(data)
    other[offset] ^= 0xFF
    other[offset + 1000] ^= 0xFF  # only the first difference counts
    assert first_difference(*pair(tmp_path, bytes(data), bytes(other))) == offset


@pytest.mark.parametrize("length", [0, 1, 100, MiB - 1, MiB, MiB + 1, 2 * MiB])
def test_a_prefix_differs_at_its_length(tmp_path: Path, length: int) -> None:
    data = b"\x00" * length
    longer = data + b"\x00tail"
    assert first_difference(*pair(tmp_path, data, longer)) == length
    assert first_difference(*pair(tmp_path, longer, data)) == length


def test_empty_files(tmp_path: Path) -> None:
    assert first_difference(*pair(tmp_path, b"", b"")) is None
    assert first_difference(*pair(tmp_path, b"", b"x")) == 0


def test_first_difference_refuses_symlinks_and_special_files(tmp_path: Path) -> None:
    host = write(tmp_path / "host", SECRET)
    real = write(tmp_path / "real", SECRET)
    (tmp_path / "link").symlink_to(host)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(OutputError, match="symlink"):
        first_difference(real, tmp_path / "link")
    with pytest.raises(OutputError, match="fifo"):
        first_difference(tmp_path / "fifo", real)
    with pytest.raises(OutputError, match="No such file"):
        first_difference(real, tmp_path / "missing")
    (tmp_path / "dir").mkdir()
    with pytest.raises(OutputError, match="directory"):
        first_difference(tmp_path / "dir", real)


@settings(max_examples=300, deadline=None)
@given(
    prefix=st.binary(max_size=200),
    repeat=st.integers(min_value=1, max_value=40),
    tail_a=st.binary(max_size=40),
    tail_b=st.binary(max_size=40),
    chunk=st.sampled_from([1, 3, 64, 65, 1000, MiB]),
)
@example(prefix=b"x", repeat=1, tail_a=b"", tail_b=b"", chunk=MiB)
@example(prefix=b"", repeat=1, tail_a=b"a", tail_b=b"", chunk=1)
def test_first_difference_agrees_with_a_naive_scan(
    prefix: bytes, repeat: int, tail_a: bytes, tail_b: bytes, chunk: int
) -> None:
    # A shared prefix long enough for the bisection, across chunk boundaries of any size.
    a, b = prefix * repeat + tail_a, prefix * repeat + tail_b
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(repro, "_CHUNK", chunk):
        assert first_difference(*pair(Path(tmp), a, b)) == naive_first_difference(a, b)


@given(st.binary(max_size=300), st.binary(max_size=300))
def test_common_prefix_agrees_with_a_naive_scan(x: bytes, y: bytes) -> None:
    expected = naive_first_difference(x, y)
    assert repro._common_prefix(x, y) == (len(x) if expected is None else expected)


# --- compare_trees ------------------------------------------------------------------------


def make_outputs(root: Path) -> Path:
    write(root / "app.whl", b"wheel " * 1000)
    write(root / "docs" / "index.html", b"<html></html>")
    write(root / "docs" / "deep" / "er" / "x.bin", bytes(range(256)) * 10)
    write(root / "empty")
    return root


@pytest.fixture
def trees(tmp_path: Path) -> tuple[Path, Path]:
    return make_outputs(tmp_path / "a"), make_outputs(tmp_path / "b")


def test_identical_trees_are_reproducible(trees: tuple[Path, Path]) -> None:
    report = compare_trees(*trees, diffoscope=False)
    assert report == ReproReport(reproducible=True, compared=4, differences=())


def test_one_differing_file(trees: tuple[Path, Path]) -> None:
    a, b = trees
    write(b / "docs" / "index.html", b"<html>!</html>")
    report = compare_trees(a, b, diffoscope=False)
    assert not report.reproducible
    assert report.compared == 4
    assert report.differences == (FileDiff("docs/index.html", 13, 14, 6, None),)


def test_a_file_on_one_side_only(trees: tuple[Path, Path]) -> None:
    a, b = trees
    write(a / "only-a", b"12345")
    write(b / "docs" / "only-b", b"1")
    report = compare_trees(a, b, diffoscope=False)
    assert report.compared == 6
    assert report.differences == (
        FileDiff("docs/only-b", None, 1, None, None),
        FileDiff("only-a", 5, None, None, None),
    )


def test_differences_are_sorted_and_serializable(trees: tuple[Path, Path]) -> None:
    a, b = trees
    for name in ("z", "m", "a/b"):
        write(a / name, b"1")
        write(b / name, b"2")
    report = compare_trees(a, b, diffoscope=False)
    assert [d.path for d in report.differences] == ["a/b", "m", "z"]
    data = json.loads(json.dumps(report.to_dict()))
    assert data["reproducible"] is False
    assert data["compared"] == 7
    assert data["differences"][0] == {
        "path": "a/b",
        "size_a": 1,
        "size_b": 1,
        "first_difference": 0,
        "summary": None,
    }


@contextmanager
def counting_reads() -> Iterator[list[int]]:
    """Count the bytes the repro module reads through ``os.read``."""
    sizes: list[int] = []
    real_read = os.read

    def read(fd: int, n: int) -> bytes:
        data = real_read(fd, n)
        sizes.append(len(data))
        return data

    with mock.patch("buildcell.build.repro.os.read", read):
        yield sizes


def test_symlinks_are_neither_compared_nor_followed(
    trees: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = trees
    host = write(tmp_path / "host" / "big", SECRET * (4 * MiB // len(SECRET)))
    (a / "link").symlink_to(host)
    (b / "link").symlink_to(tmp_path / "host" / "elsewhere")
    (a / "linkdir").symlink_to(host.parent, target_is_directory=True)
    with counting_reads() as sizes:
        report = compare_trees(a, b, diffoscope=False)
    assert report == ReproReport(reproducible=True, compared=4, differences=())
    assert sum(sizes) < MiB  # the outputs are small; the host file was never read

    # Named explicitly, a symlink is still not read: it counts as no regular file.
    with counting_reads() as sizes:
        report = compare_trees(a, b, paths=["link", "linkdir/big"], diffoscope=False)
    assert sum(sizes) == 0
    assert report.differences == (
        FileDiff("link", None, None, None, None),
        FileDiff("linkdir/big", None, None, None, None),
    )


def test_a_symlink_against_a_regular_file(trees: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = trees
    host = write(tmp_path / "host.txt", SECRET)
    (a / "thing").symlink_to(host)
    write(b / "thing", SECRET)
    report = compare_trees(a, b, diffoscope=False)
    assert report.differences == (FileDiff("thing", None, len(SECRET), None, None),)


def test_special_files_are_not_opened(trees: tuple[Path, Path]) -> None:
    a, b = trees
    os.mkfifo(a / "pipe")  # opening it for reading without O_NONBLOCK would hang
    write(b / "pipe", b"x")
    report = compare_trees(a, b, paths=["pipe"], diffoscope=False)
    assert report.differences == (FileDiff("pipe", None, 1, None, None),)


def test_paths_restrict_the_comparison(trees: tuple[Path, Path]) -> None:
    a, b = trees
    write(b / "docs" / "index.html", b"changed")
    write(a / "unlisted", b"1")
    report = compare_trees(a, b, paths=["app.whl", "docs/deep/er/x.bin"], diffoscope=False)
    assert report == ReproReport(reproducible=True, compared=2, differences=())
    report = compare_trees(a, b, paths=["app.whl", "docs/index.html"], diffoscope=False)
    assert [d.path for d in report.differences] == ["docs/index.html"]


def test_a_path_missing_on_both_sides_is_a_difference(trees: tuple[Path, Path]) -> None:
    report = compare_trees(*trees, paths=["nowhere/out.bin"], diffoscope=False)
    assert not report.reproducible
    assert report.differences == (FileDiff("nowhere/out.bin", None, None, None, None),)


@pytest.mark.parametrize("bad", ["", "/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a\0b"])
def test_paths_must_be_clean_relative_paths(trees: tuple[Path, Path], bad: str) -> None:
    with pytest.raises(ConfigError, match="invalid path to compare"):
        compare_trees(*trees, paths=[bad], diffoscope=False)


def test_build_metadata_is_ignored(trees: tuple[Path, Path]) -> None:
    a, b = trees
    write(a / "outputs.json", b'{"build": "1"}')
    write(b / "outputs.json", b'{"build": "2"}')
    write(a / "provenance.intoto.jsonl", b"signed 1")
    report = compare_trees(a, b, diffoscope=False)
    assert report == ReproReport(reproducible=True, compared=4, differences=())
    # Only at the top: a build's own file of that name is an output like any other.
    write(a / "sub" / "outputs.json", b"1")
    write(b / "sub" / "outputs.json", b"2")
    report = compare_trees(a, b, diffoscope=False)
    assert [d.path for d in report.differences] == ["sub/outputs.json"]
    # Named explicitly, it is compared.
    report = compare_trees(a, b, paths=["outputs.json"], diffoscope=False)
    assert [d.path for d in report.differences] == ["outputs.json"]


def test_a_tree_that_is_not_a_directory(trees: tuple[Path, Path], tmp_path: Path) -> None:
    a, _ = trees
    with pytest.raises(OutputError, match="cannot open output directory"):
        compare_trees(a, tmp_path / "missing", diffoscope=False)
    with pytest.raises(OutputError, match="cannot open output directory"):
        compare_trees(a / "app.whl", a, diffoscope=False)


# --- diffoscope ----------------------------------------------------------------------------


def fake_diffoscope(bin_dir: Path, body: str) -> Path:
    """A ``diffoscope`` on PATH that logs its arguments and then runs ``body``."""
    log = bin_dir / "calls.log"
    script = f'#!/bin/sh\nprintf "%s\\n" "$*" >> {log}\n{body}\n'
    write(bin_dir / "diffoscope", script.encode(), mode=0o755)
    return log


@pytest.fixture
def fake_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    return bin_dir


def differing(trees: tuple[Path, Path]) -> tuple[Path, Path]:
    a, b = trees
    write(b / "app.whl", b"other wheel")
    write(b / "only-b", b"1")
    return a, b


def test_without_diffoscope_there_is_no_summary(
    trees: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    report = compare_trees(*differing(trees))
    assert [d.summary for d in report.differences] == [None, None]


def test_diffoscope_report_becomes_the_summary(trees: tuple[Path, Path], fake_bin: Path) -> None:
    fake_diffoscope(fake_bin, 'echo "args: $*"; echo "--- a/app.whl"; echo "+++ b/app.whl"; exit 1')
    a, b = differing(trees)
    report = compare_trees(a, b)
    whl, only_b = report.differences
    # Exactly one call, for the file on both sides, run in a cell on copies of the two
    # (a/NAME and b/NAME in its workspace), never on the host's paths.
    assert whl.summary == (
        "args: --text - --no-progress a/app.whl b/app.whl\n--- a/app.whl\n+++ b/app.whl\n"
    )
    assert only_b.summary is None  # diffoscope needs both files


@pytest.fixture
def cells_started(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every cell repro starts (diffoscope runs in one), still run for real."""
    import buildcell.cell

    started: list[object] = []
    real = buildcell.cell.run_cell

    def spy(config: object, **kw: object) -> object:
        started.append(config)
        return real(config, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(buildcell.cell, "run_cell", spy)
    return started


def test_diffoscope_is_not_run_when_not_asked(
    trees: tuple[Path, Path], fake_bin: Path, cells_started: list[object]
) -> None:
    fake_diffoscope(fake_bin, "echo report; exit 1")
    report = compare_trees(*differing(trees), diffoscope=False)
    assert [d.summary for d in report.differences] == [None, None]
    assert cells_started == []


def test_diffoscope_is_not_run_for_identical_trees(
    trees: tuple[Path, Path], fake_bin: Path, cells_started: list[object]
) -> None:
    fake_diffoscope(fake_bin, "echo report; exit 1")
    assert compare_trees(*trees).reproducible
    assert cells_started == []
    compare_trees(*differing(trees))
    assert len(cells_started) == 1  # the spy does see diffoscope's cell


def test_a_long_diffoscope_report_is_truncated(trees: tuple[Path, Path], fake_bin: Path) -> None:
    fake_diffoscope(fake_bin, "yes 0123456789abcdef | head -c 100000; exit 1")
    summary = compare_trees(*differing(trees)).differences[0].summary
    assert summary is not None
    assert summary.startswith("0123456789abcdef\n")
    assert summary.endswith("\n[... truncated]")
    assert len(summary) <= 4096 + 20


@pytest.mark.parametrize(
    "body", ["echo 'Traceback: boom' >&2; exit 2", "echo partial; kill -9 $$", "exit 0"]
)
def test_a_failing_diffoscope_leaves_no_summary(
    trees: tuple[Path, Path], fake_bin: Path, body: str
) -> None:
    fake_diffoscope(fake_bin, body)
    report = compare_trees(*differing(trees))
    assert report.differences[0].first_difference == 0
    assert [d.summary for d in report.differences] == [None, None]


def test_a_hanging_diffoscope_is_killed(
    trees: tuple[Path, Path], fake_bin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A helper in the background keeps the output open: the group is killed, not waited on.
    fake_diffoscope(fake_bin, "echo started; sleep 30 & sleep 30; exit 1")
    monkeypatch.setattr(repro, "_DIFFOSCOPE_TIMEOUT", 0.5)
    start = time.monotonic()
    report = compare_trees(*differing(trees))
    assert time.monotonic() - start < 10
    assert [d.summary for d in report.differences] == [None, None]


@pytest.mark.skipif(shutil.which("diffoscope") is None, reason="diffoscope is not installed")
def test_the_real_diffoscope_is_used(trees: tuple[Path, Path]) -> None:
    a, b = trees
    write(a / "notes.txt", b"one\ntwo\nthree\n")
    write(b / "notes.txt", b"one\n2\nthree\n")
    (diff,) = compare_trees(a, b).differences
    assert diff.first_difference == 4
    assert diff.summary is not None
    assert "notes.txt" in diff.summary


# --- write_reproducible_tar_gz ------------------------------------------------------------

EPOCH = 1_700_000_000
LONG = "l" * 120 + ".txt"  # longer than a ustar name field: needs a PAX path header
FILES: dict[str, tuple[bytes, bool]] = {
    "bin/tool": (b"#!/bin/sh\necho hi\n", True),
    "data/a.txt": (b"alpha\n", False),
    "data/sub/b.bin": (bytes(range(256)) * 100, False),
    "data/\u00fcn\u00efc\u00f6de.txt": (b"unicode\n", False),
    f"data/{LONG}": (b"long\n", False),
    "data-x": (b"sorts between data and data/", False),
    "zz": (b"", False),
}
LINKS = {"latest": "data/a.txt", "dangling": "../../nowhere/\u00e9"}
MEMBERS = [*FILES, *LINKS, "copy.txt", "emptydir"]


def build_tree(root: Path, *, reverse: bool, umask: int, mtime: int, owner: int | None) -> None:
    """The same content, created in a different order and with different metadata."""
    old = os.umask(umask)
    try:
        root.mkdir()
        order = list(FILES.items())
        for path, (data, executable) in reversed(order) if reverse else order:
            target = root / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            if executable:
                target.chmod(0o777 & ~umask)
        for name, link in sorted(LINKS.items(), reverse=reverse):
            (root / name).symlink_to(link)
        if reverse:
            os.link(root / "data/a.txt", root / "copy.txt")  # a hard link: stored as a file
        else:
            (root / "copy.txt").write_bytes(FILES["data/a.txt"][0])
        (root / "emptydir").mkdir()
    finally:
        os.umask(old)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            entry = Path(dirpath, name)
            os.utime(entry, (mtime, mtime + random.randrange(10**6)), follow_symlinks=False)
            if owner is not None:
                os.lchown(entry, owner, owner)


def read_archive(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path, "r:gz") as tar:
        return tar.getmembers()


@pytest.fixture
def two_trees(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "a", tmp_path / "b"
    build_tree(a, reverse=False, umask=0o022, mtime=1_000_000_000, owner=None)
    build_tree(b, reverse=True, umask=0o077, mtime=2_000_000_000, owner=12345 if IS_ROOT else None)
    return a, b


def test_archives_of_the_same_content_are_identical(
    two_trees: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = two_trees
    shuffled = list(MEMBERS)
    random.Random(3).shuffle(shuffled)
    digest_a = write_reproducible_tar_gz(a, MEMBERS, tmp_path / "a.tar.gz", mtime=EPOCH)
    digest_b = write_reproducible_tar_gz(b, [*shuffled, "zz"], tmp_path / "b.tar.gz", mtime=EPOCH)
    data = (tmp_path / "a.tar.gz").read_bytes()
    assert data == (tmp_path / "b.tar.gz").read_bytes()
    assert digest_a == digest_b == hashlib.sha256(data).hexdigest()
    # A different SOURCE_DATE_EPOCH is a different archive.
    other = write_reproducible_tar_gz(a, MEMBERS, tmp_path / "c.tar.gz", mtime=EPOCH + 1)
    assert other != digest_a


@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT, reason="changing owners needs root")
def test_owners_do_not_show(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    build_tree(a, reverse=False, umask=0o022, mtime=EPOCH, owner=0)
    build_tree(b, reverse=False, umask=0o022, mtime=EPOCH, owner=4242)
    assert write_reproducible_tar_gz(
        a, MEMBERS, tmp_path / "a.tar.gz", mtime=EPOCH
    ) == write_reproducible_tar_gz(b, MEMBERS, tmp_path / "b.tar.gz", mtime=EPOCH)


def test_gzip_header_has_no_time_and_no_name(two_trees: tuple[Path, Path], tmp_path: Path) -> None:
    target = tmp_path / "out.tar.gz"
    write_reproducible_tar_gz(two_trees[0], MEMBERS, target, mtime=EPOCH)
    header = target.read_bytes()[:10]
    assert header[:3] == b"\x1f\x8b\x08"  # gzip, deflate
    assert header[3] == 0  # flags: no FNAME, FCOMMENT, FEXTRA
    assert header[4:8] == b"\x00\x00\x00\x00"  # mtime
    assert header[8] == 2  # XFL: maximum compression
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_tar_members_are_normalized(two_trees: tuple[Path, Path], tmp_path: Path) -> None:
    _, b = two_trees
    target = tmp_path / "out.tar.gz"
    write_reproducible_tar_gz(b, MEMBERS, target, mtime=EPOCH)
    members = read_archive(target)
    names = [m.name for m in members]
    assert names == sorted(names, key=os.fsencode)
    assert len(set(names)) == len(names)
    expected = set(MEMBERS) | {"bin", "data", "data/sub"}
    assert set(names) == expected
    for m in members:
        assert (m.uid, m.gid, m.uname, m.gname) == (0, 0, "", "")
        assert m.mtime == EPOCH
        assert set(m.pax_headers) <= {"path", "linkpath"}  # no atime, ctime, mtime
        parent = m.name.rpartition("/")[0]
        if parent:
            assert names.index(parent) < names.index(m.name)
        if m.isdir():
            assert m.mode == 0o755
        elif m.issym():
            assert m.linkname == LINKS[m.name]
        else:
            assert m.isreg()
            executable = FILES.get(m.name, (b"", False))[1]
            assert m.mode == (0o755 if executable else 0o644)
    by_name = {m.name: m for m in members}
    assert by_name["data"].name < by_name["data-x"].name < by_name["data/a.txt"].name
    with tarfile.open(target, "r:gz") as tar:
        for path, (data, _) in FILES.items():
            extracted = tar.extractfile(path)
            assert extracted is not None
            assert extracted.read() == data
        copy = tar.extractfile("copy.txt")
        assert copy is not None
        assert copy.read() == FILES["data/a.txt"][0]


def test_a_symlink_member_is_not_followed(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    host = write(tmp_path / "host", SECRET)
    (src / "link").symlink_to(host)
    target = tmp_path / "out.tar.gz"
    write_reproducible_tar_gz(src, ["link"], target, mtime=EPOCH)
    (member,) = read_archive(target)
    assert member.issym()
    assert member.linkname == str(host)
    assert SECRET not in gzip.decompress(target.read_bytes())


def test_refuses_a_member_below_a_symlinked_directory(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write(tmp_path / "host" / "secret", SECRET)
    src.mkdir()
    (src / "dir").symlink_to(tmp_path / "host", target_is_directory=True)
    with pytest.raises(OutputError, match="parent directory is a symlink"):
        write_reproducible_tar_gz(src, ["dir/secret"], tmp_path / "out.tar.gz", mtime=EPOCH)


def test_refuses_a_fifo_and_leaves_no_partial_target(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write(src / "a.txt", b"a")
    os.mkfifo(src / "b.fifo")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    target = out_dir / "out.tar.gz"
    with pytest.raises(OutputError, match=r"'b\.fifo'.*fifo"):
        write_reproducible_tar_gz(src, ["a.txt", "b.fifo"], target, mtime=EPOCH)
    assert list(out_dir.iterdir()) == []
    # An existing archive is left as it was.
    target.write_bytes(b"previous")
    with pytest.raises(OutputError):
        write_reproducible_tar_gz(src, ["a.txt", "b.fifo"], target, mtime=EPOCH)
    assert list(out_dir.iterdir()) == [target]
    assert target.read_bytes() == b"previous"


def test_refuses_a_missing_member(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(OutputError, match="'gone'"):
        write_reproducible_tar_gz(src, ["gone"], tmp_path / "out.tar.gz", mtime=EPOCH)
    assert list(tmp_path.glob("*.tar.gz*")) == []
    assert list(tmp_path.glob(".out.tar.gz*")) == []


@pytest.mark.parametrize("bad", ["", "/abs", "../up", "a/./b", "a/"])
def test_refuses_unclean_member_paths(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ConfigError, match="invalid archive member"):
        write_reproducible_tar_gz(tmp_path, [bad], tmp_path / "out.tar.gz", mtime=EPOCH)


def test_refuses_a_negative_epoch(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="SOURCE_DATE_EPOCH"):
        write_reproducible_tar_gz(tmp_path, [], tmp_path / "out.tar.gz", mtime=-1)


def test_an_empty_archive(tmp_path: Path) -> None:
    target = tmp_path / "out.tar.gz"
    digest = write_reproducible_tar_gz(tmp_path, [], target, mtime=0)
    assert read_archive(target) == []
    assert digest == hashlib.sha256(target.read_bytes()).hexdigest()


def test_reads_through_a_real_tar_reader_byte_for_byte(tmp_path: Path) -> None:
    src = tmp_path / "src"
    data = random.Random(4).randbytes(3 * MiB + 7)
    write(src / "big.bin", data)
    target = tmp_path / "out.tar.gz"
    write_reproducible_tar_gz(src, ["big.bin"], target, mtime=EPOCH)
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(target.read_bytes()))) as tar:
        (member,) = tar.getmembers()
        assert member.size == len(data)
        extracted = tar.extractfile(member)
        assert extracted is not None
        assert extracted.read() == data


# --- clamp_mtimes --------------------------------------------------------------------------


def mtime_ns(path: Path) -> int:
    return os.stat(path, follow_symlinks=False).st_mtime_ns


def test_clamp_mtimes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    host = write(tmp_path / "host" / "file", SECRET)
    write(root / "new.txt")
    write(root / "old.txt")
    write(root / "sub" / "deeper" / "new.bin")
    (root / "link").symlink_to(host)
    (root / "linkdir").symlink_to(host.parent, target_is_directory=True)
    future = EPOCH + 1000
    for path in [host, host.parent, *root.rglob("*")]:
        os.utime(path, (future, future), follow_symlinks=False)
    os.utime(root / "old.txt", ns=(5, 123_456_789))
    os.utime(root, (future, future))

    clamp_mtimes(root, EPOCH)

    clamped = [root, root / "new.txt", root / "sub", root / "sub" / "deeper"]
    clamped += [root / "sub" / "deeper" / "new.bin", root / "link", root / "linkdir"]
    for path in clamped:
        assert mtime_ns(path) == EPOCH * 10**9, path
    assert mtime_ns(root / "old.txt") == 123_456_789
    assert os.stat(root / "old.txt").st_atime_ns == 5
    # What the symlinks point to is untouched.
    assert mtime_ns(host) == future * 10**9
    assert mtime_ns(host.parent) == future * 10**9


def test_clamp_mtimes_refuses_a_symlinked_root(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    with pytest.raises(OutputError, match="symlink"):
        clamp_mtimes(tmp_path / "link", EPOCH)
    with pytest.raises(ConfigError):
        clamp_mtimes(real, -5)


# --- archives: the differing member and what differs -----------------------------------------

Member = tuple[str, bytes, int, int]  # name, content, mode, mtime
BASE: list[Member] = [
    ("pkg/", b"", 0o755, 1000),
    ("pkg/a.txt", b"alpha\n", 0o644, 1000),
    ("pkg/b.bin", b"\x00\x01" * 50, 0o644, 1000),
    ("pkg/run.sh", b"#!/bin/sh\n", 0o755, 1000),
]


TAR_MODES: dict[str, Literal["w", "w:gz", "w:xz", "w:bz2"]] = {
    "": "w",
    "gz": "w:gz",
    "xz": "w:xz",
    "bz2": "w:bz2",
}


def tar_bytes(members: list[Member], compression: str = "", uid: int = 0) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=TAR_MODES[compression], format=tarfile.PAX_FORMAT) as tar:
        for name, data, mode, mtime in members:
            info = tarfile.TarInfo(name.rstrip("/"))
            info.mode, info.mtime, info.uid, info.gid = mode, mtime, uid, uid
            if name.endswith("/"):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def zip_bytes(members: list[Member]) -> bytes:
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data, mode, mtime in members:
            info = zipfile.ZipInfo(name, time.gmtime(mtime + 315532800)[:6])
            info.external_attr = ((0o040000 if name.endswith("/") else 0o100000) | mode) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    return buf.getvalue()


def changed(index: int, **what: object) -> list[Member]:
    members = list(BASE)
    name, data, mode, mtime = members[index]
    members[index] = (
        name,
        bytes(what.get("data", data)),  # type: ignore[call-overload]
        int(what.get("mode", mode)),  # type: ignore[call-overload]
        int(what.get("mtime", mtime)),  # type: ignore[call-overload]
    )
    return members


def archive_diff(tmp_path: Path, name: str, a: bytes, b: bytes) -> FileDiff:
    write(tmp_path / "A" / name, a)
    write(tmp_path / "B" / name, b)
    report = compare_trees(tmp_path / "A", tmp_path / "B", diffoscope=False)
    (diff,) = report.differences
    assert diff.first_difference is not None  # the byte offset is still given
    return diff


def member_diffs(diff: FileDiff) -> dict[str, tuple[str, ...]]:
    assert diff.archive is not None
    return {m.name: m.differs for m in diff.archive.members}


@pytest.mark.parametrize(
    ("name", "compression"),
    [
        ("out.tar", ""),
        ("out.tar.gz", "gz"),
        ("out.tgz", "gz"),
        ("out.tar.xz", "xz"),
        ("out.tar.bz2", "bz2"),
    ],
)
def test_tar_members_that_differ_by_mtime_mode_and_content(
    tmp_path: Path, name: str, compression: str
) -> None:
    a = tar_bytes(BASE, compression)
    diff = archive_diff(tmp_path / "mtime", name, a, tar_bytes(changed(1, mtime=2000), compression))
    assert diff.archive is not None and diff.archive.kind == name.split(".", 1)[1].replace(
        "tgz", "tar.gz"
    )
    assert member_diffs(diff) == {"pkg/a.txt": ("mtime 1000 vs 2000",)}
    assert diff.archive.note is None

    diff = archive_diff(tmp_path / "mode", name, a, tar_bytes(changed(3, mode=0o700), compression))
    assert member_diffs(diff) == {"pkg/run.sh": ("mode 0755 vs 0700",)}

    diff = archive_diff(
        tmp_path / "content", name, a, tar_bytes(changed(2, data=b"\x00\x02" * 50), compression)
    )
    assert member_diffs(diff) == {"pkg/b.bin": ("content",)}

    diff = archive_diff(
        tmp_path / "size", name, a, tar_bytes(changed(1, data=b"alpha!\n"), compression)
    )
    assert member_diffs(diff) == {"pkg/a.txt": ("size 6 vs 7", "content")}

    diff = archive_diff(tmp_path / "owner", name, a, tar_bytes(BASE, compression, uid=1000))
    assert set(member_diffs(diff)) == {m[0].rstrip("/") for m in BASE}
    assert all(d == ("uid/gid 0/0 vs 1000/1000",) for d in member_diffs(diff).values())


def test_tar_member_order_and_an_added_member(tmp_path: Path) -> None:
    swapped = [BASE[0], BASE[2], BASE[1], BASE[3]]
    diff = archive_diff(
        tmp_path / "order", "x.tar.gz", tar_bytes(BASE, "gz"), tar_bytes(swapped, "gz")
    )
    assert member_diffs(diff) == {
        "pkg/a.txt": ("position 2 vs 3",),
        "pkg/b.bin": ("position 3 vs 2",),
    }

    added = [*BASE, ("pkg/new.txt", b"new", 0o644, 1000)]
    diff = archive_diff(
        tmp_path / "added", "x.tar.gz", tar_bytes(BASE, "gz"), tar_bytes(added, "gz")
    )
    assert member_diffs(diff) == {"pkg/new.txt": ("only in B",)}
    diff = archive_diff(
        tmp_path / "removed", "x.tar.gz", tar_bytes(added, "gz"), tar_bytes(BASE, "gz")
    )
    assert member_diffs(diff) == {"pkg/new.txt": ("only in A",)}


@pytest.mark.parametrize("name", ["out.zip", "demo-1.0-py3-none-any.whl"])
def test_zip_and_wheel_members(tmp_path: Path, name: str) -> None:
    a = zip_bytes(BASE)
    diff = archive_diff(tmp_path / "mtime", name, a, zip_bytes(changed(1, mtime=1000 + 3600)))
    assert diff.archive is not None and diff.archive.kind == "zip"
    ((member, (what,)),) = member_diffs(diff).items()
    assert member == "pkg/a.txt" and what.startswith("mtime 1980-01-01 00:16:")
    diff = archive_diff(tmp_path / "mode", name, a, zip_bytes(changed(3, mode=0o700)))
    assert member_diffs(diff) == {"pkg/run.sh": ("mode 100755 vs 100700",)}
    diff = archive_diff(tmp_path / "content", name, a, zip_bytes(changed(2, data=b"\x00\x02" * 50)))
    assert member_diffs(diff) == {"pkg/b.bin": ("content",)}
    swapped = [BASE[0], BASE[2], BASE[1], BASE[3]]
    diff = archive_diff(tmp_path / "order", name, a, zip_bytes(swapped))
    assert member_diffs(diff) == {
        "pkg/a.txt": ("position 2 vs 3",),
        "pkg/b.bin": ("position 3 vs 2",),
    }
    added = [*BASE, ("pkg/new.txt", b"new", 0o644, 1000)]
    diff = archive_diff(tmp_path / "added", name, a, zip_bytes(added))
    assert member_diffs(diff) == {"pkg/new.txt": ("only in B",)}


def test_archive_differences_are_serialized(tmp_path: Path) -> None:
    write(tmp_path / "A/x.tar", tar_bytes(BASE))
    write(tmp_path / "B/x.tar", tar_bytes(changed(1, mtime=5)))
    data = compare_trees(tmp_path / "A", tmp_path / "B", diffoscope=False).to_dict()
    assert json.loads(json.dumps(data))["differences"][0]["archive"] == {
        "kind": "tar",
        "members": [{"name": "pkg/a.txt", "differs": ["mtime 1000 vs 5"]}],
        "note": None,
    }


def test_same_members_different_bytes(tmp_path: Path) -> None:
    """Only the container differs (here gzip's header time): said so, no member named."""
    raw = tar_bytes(BASE)
    a = gzip.compress(raw, mtime=1)
    b = gzip.compress(raw, mtime=2)
    diff = archive_diff(tmp_path, "x.tar.gz", a, b)
    assert diff.archive is not None and diff.archive.members == ()
    assert diff.archive.note is not None and "headers or padding" in diff.archive.note


def test_a_corrupt_archive_is_a_note_not_an_error(tmp_path: Path) -> None:
    good = tar_bytes(BASE, "gz")
    diff = archive_diff(tmp_path / "garbage", "x.tar.gz", good, b"not gzip at all")
    assert diff.archive is not None and diff.archive.note is not None
    assert diff.archive.note.startswith("B: cannot be read as a tar.gz archive after 0 members")
    diff = archive_diff(tmp_path / "cut", "x.zip", zip_bytes(BASE), zip_bytes(BASE)[:-30])
    assert diff.archive is not None and diff.archive.note is not None
    assert "B: cannot be read as a zip archive" in diff.archive.note


def test_nothing_is_extracted_and_links_are_not_followed(tmp_path: Path) -> None:
    evil = [("../../escape.txt", b"x", 0o644, 1), ("/abs.txt", b"y", 0o644, 1)]
    diff = archive_diff(tmp_path, "x.tar", tar_bytes(evil), tar_bytes(evil[:1]))
    assert member_diffs(diff) == {"/abs.txt": ("only in A",)}
    assert not (tmp_path.parent / "escape.txt").exists() and not Path("/abs.txt").exists()


def test_an_archive_bomb_stops_at_the_byte_cap(tmp_path: Path) -> None:
    """A tar.gz of a few KiB that decompresses to more than the cap is read up to the cap."""
    big = [("zeros", bytes(8 * MiB), 0o644, 1), ("after", b"x", 0o644, 1)]
    other = [("zeros", bytes(8 * MiB), 0o644, 2), ("after", b"y", 0o644, 1)]
    with mock.patch.object(repro, "_MAX_ARCHIVE_BYTES", 4 * MiB):
        diff = archive_diff(tmp_path, "bomb.tar.gz", tar_bytes(big, "gz"), tar_bytes(other, "gz"))
    assert diff.archive is not None and diff.archive.note is not None
    assert "A: stopped after 4 MiB of its data" in diff.archive.note
    assert "B: stopped after 4 MiB of its data" in diff.archive.note
    assert "after" not in member_diffs(diff)  # past the cap: not read


def test_the_member_count_cap(tmp_path: Path) -> None:
    many = [(f"f{i:03d}", b"", 0o644, 1) for i in range(50)]
    with mock.patch.object(repro, "_MAX_ARCHIVE_MEMBERS", 10):
        diff = archive_diff(tmp_path, "many.zip", zip_bytes(many), zip_bytes(many[:-1]))
    assert diff.archive is not None and diff.archive.note is not None
    assert "A: stopped after 10 members" in diff.archive.note
    assert member_diffs(diff) == {}  # the one difference is past the cap


def test_at_most_so_many_members_are_listed(tmp_path: Path) -> None:
    a = [(f"f{i:03d}", b"a", 0o644, 1) for i in range(80)]
    b = [(n, b"b", m, t) for n, _, m, t in a]
    diff = archive_diff(tmp_path, "x.tar", tar_bytes(a), tar_bytes(b))
    assert diff.archive is not None
    assert len(diff.archive.members) == 50
    assert diff.archive.note == "30 more differing members not listed"


def test_a_non_archive_name_gets_no_member_comparison(tmp_path: Path) -> None:
    diff = archive_diff(tmp_path, "x.bin", tar_bytes(BASE), tar_bytes(changed(1, mtime=2)))
    assert diff.archive is None


def test_hostile_pax_times_are_shown_not_fatal(tmp_path: Path) -> None:
    def one(mtime: str) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo("t")
            info.pax_headers = {"mtime": mtime}
            tar.addfile(info)
        return buf.getvalue()

    diff = archive_diff(tmp_path / "inf", "x.tar", one("inf"), one("1.5"))
    assert member_diffs(diff) == {"t": ("mtime inf vs 1.5",)}
