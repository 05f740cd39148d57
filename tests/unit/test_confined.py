"""buildcell.confined: repository paths opened beneath their root, never leaving it.

Every test runs twice: with openat2(2), and with the component walk that stands in for it
on kernels without it (and that explains refusals).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from buildcell import confined
from buildcell.confined import UnsafePathError

# Every test with openat2 and with the component walk (the conftest's fixture).
pytestmark = pytest.mark.usefixtures("resolution")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A root with files, links that stay inside, and links that leave."""
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f").write_text("inside")
    (root / "good").symlink_to("a/b/f")
    (root / "gooddir").symlink_to("a")
    (root / "a" / "up").symlink_to("..")
    (root / "abs").symlink_to("/etc/passwd")
    (root / "absdir").symlink_to("/etc")
    (root / "escape").symlink_to("../../..")
    (root / "a" / "sneaky").symlink_to("../../outside.txt")
    (root / "loop1").symlink_to("loop2")
    (root / "loop2").symlink_to("loop1")
    (root / "magic").symlink_to("/proc/self/root/etc/passwd")
    os.mkfifo(root / "fifo")
    (tmp_path / "outside.txt").write_text("outside")
    return root


def _read(root: Path, rel: str, **kw: object) -> str:
    with confined.opened_root(root, what="root") as fd:
        file_fd, _ = confined.open_file(fd, rel, what=repr(rel), **kw)  # type: ignore[arg-type]
        try:
            return os.read(file_fd, 100).decode()
        finally:
            os.close(file_fd)


@pytest.mark.parametrize(
    "rel", ["a/b/f", "good", "gooddir/b/f", "a/up/a/b/f", "a/../a/b/f", "./a//b/f"]
)
def test_paths_that_stay_inside_resolve(tree: Path, rel: str) -> None:
    assert _read(tree, rel) == "inside"


@pytest.mark.parametrize(
    ("rel", "why"),
    [
        ("abs", "outside the root"),
        ("absdir/passwd", "outside the root"),
        ("escape/etc/passwd", "above the root"),
        ("a/sneaky", "above the root"),
        ("../outside.txt", "above the root"),
        ("a/up/../outside.txt", "above the root"),
        ("loop1", "symbolic links"),
        ("magic", "outside the root"),
        ("missing", "does not exist"),
        ("a/b/f/x", "not a directory"),
    ],
)
def test_paths_that_leave_are_refused_with_a_reason(tree: Path, rel: str, why: str) -> None:
    with pytest.raises(UnsafePathError, match=why):
        _read(tree, rel)


def test_absolute_and_nul_paths_are_refused(tree: Path) -> None:
    for rel in ("/etc/passwd", "a\0b", ""):
        with pytest.raises(UnsafePathError):
            _read(tree, rel)


def test_special_files_are_never_opened_for_reading(tree: Path) -> None:
    # Opening a fifo for reading would block with no writer; it is refused by kind.
    with pytest.raises(UnsafePathError, match="fifo"):
        _read(tree, "fifo")
    with pytest.raises(UnsafePathError, match="directory"):
        _read(tree, "a")


def test_hard_links_are_refused_when_asked(tree: Path, tmp_path: Path) -> None:
    os.link(tmp_path / "outside.txt", tree / "hard")
    assert _read(tree, "hard") == "outside"
    with pytest.raises(UnsafePathError, match="hard link"):
        _read(tree, "hard", single_link=True)


def test_in_root_resolves_absolute_links_inside(tree: Path) -> None:
    (tree / "etc").mkdir()
    (tree / "etc" / "passwd").write_text("image passwd")
    with confined.opened_root(tree, what="root") as fd:
        for rel in ("abs", "escape/etc/passwd", "magic"):
            if rel == "magic":
                with pytest.raises(UnsafePathError):
                    confined.open_file(fd, rel, what=rel, resolve="in_root")
                continue
            file_fd, _ = confined.open_file(fd, rel, what=rel, resolve="in_root")
            assert os.read(file_fd, 100) == b"image passwd"
            os.close(file_fd)
        dir_fd = confined.open_dir(fd, "absdir", what="absdir", resolve="in_root")
        assert sorted(os.listdir(dir_fd)) == ["passwd"]
        os.close(dir_fd)


def test_make_dirs_never_goes_through_a_symlink(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    victim = tmp_path / "victim"
    victim.mkdir()
    (root / "link").symlink_to(victim)
    with confined.opened_root(root, what="root") as fd:
        with pytest.raises(UnsafePathError, match="symlink"):
            confined.make_dirs(fd, ["link", "x"], what="out")
        made_fd, made = confined.make_dirs(fd, ["new", "deeper"], what="out")
        os.close(made_fd)
        assert made
        again_fd, made = confined.make_dirs(fd, ["new", "deeper"], what="out")
        os.close(again_fd)
        assert not made
    assert list(victim.iterdir()) == []


def test_open_host_dir_refuses_a_symlink_on_any_component(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(UnsafePathError, match="symlink") as info:
        confined.open_host_dir(tmp_path / "link" / "out", what="--out", create=True)
    assert info.value.hint is not None
    assert str(tmp_path / "real") in info.value.hint
    assert not (tmp_path / "real" / "out").exists()


def test_a_symlink_swapped_in_never_leads_outside(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_text("inside")
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "f").write_text("SECRET")
    stop = threading.Event()

    def swap() -> None:
        while not stop.is_set():
            try:
                os.rename(root / "d", root / "d.real")
                os.symlink(tmp_path / "secret", root / "d")
                os.unlink(root / "d")
                os.rename(root / "d.real", root / "d")
            except OSError:
                pass

    swapper = threading.Thread(target=swap)
    swapper.start()
    seen: set[str] = set()
    try:
        for _ in range(2000):
            try:
                seen.add(_read(root, "d/f"))
            except UnsafePathError:
                seen.add("refused")
    finally:
        stop.set()
        swapper.join()
    assert "SECRET" not in seen


_NAMES = st.sampled_from(["a", "b", "c", "..", ".", "x"])


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    links=st.lists(
        st.tuples(st.sampled_from(["a", "b", "a/c", "b/d"]), st.lists(_NAMES, max_size=4)),
        max_size=4,
    ),
    path=st.lists(_NAMES, min_size=1, max_size=6),
    absolute=st.booleans(),
)
def test_random_trees_never_escape(
    tmp_path_factory: pytest.TempPathFactory,
    links: list[tuple[str, list[str]]],
    path: list[str],
    absolute: bool,
) -> None:
    base = tmp_path_factory.mktemp("rand")
    root = base / "root"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (base / "x").write_text("OUTSIDE")
    (root / "x").write_text("inside")
    for where, target in links:
        link = root / where
        text = ("/" if absolute else "") + "/".join(target or ["."])
        if not link.exists() and not link.is_symlink() and link.parent.is_dir():
            link.symlink_to(text)
    rel = "/".join(path)
    with confined.opened_root(root, what="root") as fd:
        try:
            file_fd, _ = confined.open_file(fd, rel, what="p")
        except UnsafePathError:
            return
        try:
            assert os.read(file_fd, 100) == b"inside"
        finally:
            os.close(file_fd)
