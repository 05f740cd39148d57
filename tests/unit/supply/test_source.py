"""Source identity: the tree digest's format and its walk, and describe_source on checkouts."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from buildcell.errors import ConfigError
from buildcell.supply.source import SourceInfo, describe_source, tree_digest

GIT = shutil.which("git")
IS_ROOT = os.geteuid() == 0
REPO = Path(__file__).resolve().parents[2]


def write(path: Path, data: str, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data)
    path.chmod(mode)
    return path


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def digest_of(lines: list[str]) -> str:
    return hashlib.sha256(b"\n".join(sorted(x.encode() for x in lines)) + b"\n").hexdigest()


@pytest.fixture
def plain(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    write(root / "a.txt", "alpha\n")
    write(root / "bin" / "run", "#!/bin/sh\n", 0o755)
    write(root / "bin" / "group-exec", "g\n", 0o654)
    (root / "empty").mkdir()
    (root / "link").symlink_to("a.txt")
    (root / "dangling").symlink_to("../../nowhere")
    write(root / ".git" / "HEAD", "ref: refs/heads/main\n")  # left out at the top only
    write(root / "sub" / ".git" / "x", "nested\n")
    return root


def test_the_digest_format_is_unchanged(plain: Path) -> None:
    # Written out by hand: provenance made before stays comparable.
    lines = [
        "d bin",
        "d empty",
        "d sub",
        "d sub/.git",
        f"f a.txt - {sha('alpha' + chr(10))}",
        f"f bin/group-exec x {sha('g' + chr(10))}",
        f"f bin/run x {sha('#!/bin/sh' + chr(10))}",
        f"f sub/.git/x - {sha('nested' + chr(10))}",
        "l dangling ../../nowhere",
        "l link a.txt",
    ]
    text = "\n".join(sorted(lines)) + "\n"
    assert tree_digest(plain) == hashlib.sha256(text.encode()).hexdigest()


def test_the_digest_ignores_mtimes_modes_and_creation_order(plain: Path, tmp_path: Path) -> None:
    before = tree_digest(plain)
    other = tmp_path / "other"
    other.mkdir()
    for rel in sorted((p.relative_to(plain) for p in plain.rglob("*")), reverse=True):
        src = plain / rel
        dest = other / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            dest.symlink_to(os.readlink(src))
        elif src.is_dir():
            dest.mkdir(exist_ok=True)
        else:
            shutil.copyfile(src, dest)
            dest.chmod(0o700 if src.stat().st_mode & 0o111 else 0o600)
    os.utime(other / "a.txt", (1, 1))
    assert tree_digest(other) == before
    (other / "a.txt").chmod(0o755)
    assert tree_digest(other) != before


def test_a_fifo_is_listed_by_kind_and_never_blocks(tmp_path: Path) -> None:
    root = tmp_path / "src"
    write(root / "f", "x")
    os.mkfifo(root / "pipe")
    (root / "d").mkdir()
    os.mkfifo(root / "d" / "inner")
    start = time.monotonic()
    value = tree_digest(root)
    assert time.monotonic() - start < 5
    assert value == digest_of([f"f f - {sha('x')}", "s pipe fifo", "d d", "s d/inner fifo"])


def test_a_socket_is_listed_by_kind(tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(root / "sock"))
    try:
        assert tree_digest(root) == digest_of(["s sock socket"])
    finally:
        s.close()


@pytest.mark.skipif(not IS_ROOT, reason="needs root to make device nodes")
def test_devices_are_listed_by_kind(tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(root / "loop", stat.S_IFBLK | 0o600, os.makedev(7, 200))
    assert tree_digest(root) == digest_of(["s null char-device", "s loop block-device"])


def test_symlinks_are_recorded_never_followed(tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    (root / "etc").symlink_to("/etc")
    (root / "shadow").symlink_to("/etc/shadow")
    (root / "self").symlink_to(".")
    assert tree_digest(root) == digest_of(["l etc /etc", "l shadow /etc/shadow", "l self ."])


def test_excluded_paths_are_compared_by_identity(tmp_path: Path) -> None:
    root = tmp_path / "src"
    write(root / "keep", "k")
    write(root / "buildcell-out" / "artifact", "a")
    write(root / "state" / "cells" / "x", "x")
    write(root / "secret.txt", "s")
    (root / "out-link").symlink_to("buildcell-out")
    (tmp_path / "alias").symlink_to(root)
    # The excluded paths spelled through a symlinked parent still name the same entries.
    value = tree_digest(
        root,
        exclude=(
            tmp_path / "alias" / "buildcell-out",
            root / "state",
            tmp_path / "alias" / "secret.txt",
            tmp_path / "missing",
        ),
    )
    # A symlink to an excluded directory is an entry of its own: listed, not followed.
    assert value == digest_of([f"f keep - {sha('k')}", "l out-link buildcell-out"])


def test_the_root_must_be_a_directory(tmp_path: Path) -> None:
    write(tmp_path / "file", "x")
    with pytest.raises(ConfigError):
        tree_digest(tmp_path / "file")
    with pytest.raises(ConfigError):
        tree_digest(tmp_path / "missing")


def test_deep_trees_are_walked(tmp_path: Path) -> None:
    root = tmp_path / "src"
    here = root
    lines = []
    for i in range(300):
        here = here / "d"
        lines.append("d " + "/".join(["d"] * (i + 1)))
    here.mkdir(parents=True)
    write(here / "leaf", "x")
    lines.append(f"f {'/'.join(['d'] * 300)}/leaf - {sha('x')}")
    assert tree_digest(root) == digest_of(lines)


def test_a_wide_tree_needs_few_descriptors(tmp_path: Path) -> None:
    root = tmp_path / "src"
    for i in range(300):
        write(root / f"dir{i}" / "f", str(i))
    expected = tree_digest(root)
    code = (
        "import resource, sys; from pathlib import Path\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))\n"
        "from buildcell.supply.source import tree_digest\n"
        "print(tree_digest(Path(sys.argv[1])))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(root)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    assert out.stdout.strip() == expected


# --- describe_source ---------------------------------------------------------------------


def git(repo: Path, *args: str) -> str:
    assert GIT is not None
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(repo.parent),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@e",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@e",
        "GIT_AUTHOR_DATE": "@1700000000 +0000",
        "GIT_COMMITTER_DATE": "@1700000000 +0000",
    }
    return subprocess.run(
        [GIT, "-C", str(repo), *args], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    if GIT is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "repo"
    write(repo / "README", "hello\n")
    write(repo / "app" / "main.c", "int main(void) { return 0; }\n")
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "one")
    return repo


def test_describe_a_checkout_without_running_anything(checkout: Path) -> None:
    commit = git(checkout, "rev-parse", "HEAD")
    tree = git(checkout, "rev-parse", "HEAD^{tree}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", "/nonexistent")
        mp.setattr(subprocess.Popen, "__init__", _refuse)
        info = describe_source(checkout)
    assert (info.git_commit, info.git_tree, info.commit_time) == (commit, tree, 1700000000)
    assert info.dirty is False
    assert info.sha256 == tree_digest(checkout)
    assert info.path == checkout.resolve()
    assert info.to_parameter() == {
        "uri": "git+" + checkout.resolve().as_uri(),
        "digest": {"gitCommit": commit, "gitTree": tree, "sha256": info.sha256},
        "annotations": {"dirty": False},
    }


def _refuse(*args: object, **kwargs: object) -> None:
    raise AssertionError(f"a program was run: {args!r}")


def test_a_changed_checkout_is_dirty(checkout: Path) -> None:
    (checkout / "app" / "main.c").write_text("changed\n")
    info = describe_source(checkout)
    assert info.dirty is True
    assert info.to_parameter()["annotations"] == {"dirty": True}


def test_a_subdirectory_is_annotated(checkout: Path) -> None:
    info = describe_source(checkout / "app")
    assert info.annotations == {"subdirectory": "app"}
    assert info.to_parameter()["annotations"] == {"subdirectory": "app", "dirty": False}
    assert info.sha256 == tree_digest(checkout / "app")


def test_a_plain_directory_has_only_its_digest(plain: Path) -> None:
    shutil.rmtree(plain / ".git")
    info = describe_source(plain)
    assert (info.git_commit, info.git_tree, info.commit_time, info.dirty) == (None,) * 4
    assert info.to_parameter() == {
        "uri": plain.resolve().as_uri(),
        "digest": {"sha256": info.sha256},
    }


@pytest.mark.parametrize("layout", ["symlink", "gitdir", "garbage"])
def test_unreadable_git_metadata_leaves_the_digest(
    checkout: Path, tmp_path: Path, layout: str
) -> None:
    source = tmp_path / "source"
    write(source / "file", "x")
    if layout == "symlink":
        (source / ".git").symlink_to(checkout / ".git")
    elif layout == "gitdir":
        write(source / ".git", f"gitdir: {checkout / '.git'}\n")
    else:
        write(source / ".git" / "HEAD", "garbage\n")
    info = describe_source(source)
    assert info.git_commit is None
    assert info.sha256 == digest_of([f"f file - {sha('x')}"])
    assert "gitUnreadable" in info.annotations
    assert info.to_parameter()["annotations"] == info.annotations


def test_source_info_without_git_has_no_annotations(tmp_path: Path) -> None:
    info = SourceInfo(path=tmp_path, sha256="0" * 64)
    assert "annotations" not in info.to_parameter()
