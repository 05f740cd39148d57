"""The git reader: real repositories made with git at test time, and hostile object databases.

Every answer about a real repository is compared with what ``git`` itself says. Hostile
inputs (crafted packs, indexes, loose objects, refs) must end in :class:`GitReadError`,
quickly, and never in another exception.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import struct
import subprocess
import time
import zlib
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.git_objects import Entry, delta, oid_of, write_pack

from buildcell.supply import gitread
from buildcell.supply.gitread import (
    GitHead,
    GitReadError,
    MissingObjectError,
    Repository,
    read_head,
)

GIT = shutil.which("git")
pytestmark = pytest.mark.skipif(GIT is None, reason="git is not installed")
IS_ROOT = os.geteuid() == 0
EPOCH = 1_700_000_000
FUZZ = settings(
    deadline=timedelta(seconds=5),
    max_examples=int(os.environ.get("GITREAD_FUZZ_EXAMPLES", "150")),
    suppress_health_check=[HealthCheck.too_slow],
)


# --- making repositories with git ---------------------------------------------------------


def git(repo: Path, *args: str, when: int = EPOCH, stdin: bytes | None = None) -> str:
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(repo.parent),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.org",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.org",
        "GIT_AUTHOR_DATE": f"@{when} +0000",
        "GIT_COMMITTER_DATE": f"@{when} +0100",
    }
    assert GIT is not None
    res = subprocess.run(
        [GIT, "-c", "init.defaultBranch=main", "-C", str(repo), *args],
        env=env,
        input=stdin,
        capture_output=True,
        check=True,
    )
    return res.stdout.decode().strip()


def write(path: Path, data: bytes | str, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    path.chmod(mode)
    return path


def make_repo(path: Path, *, object_format: str = "sha1", commits: int = 4) -> Path:
    """A repository with files, an executable, a symlink, nested directories and history
    whose objects delta well (a big file changed a little in every commit)."""
    path.mkdir(parents=True)
    git(path, "init", "-q", f"--object-format={object_format}")
    write(path / "README", "hello\n")
    write(path / "bin" / "tool", "#!/bin/sh\necho tool\n", 0o755)
    write(path / "src" / "deep" / "er" / "b.txt", "deep\n")
    (path / "link").symlink_to("README")
    (path / "srclink").symlink_to("src")
    big = "".join(f"line {i} of a file that changes a little\n" for i in range(3000))
    for n in range(commits):
        write(path / "src" / "a.c", big + f"/* revision {n} */\n")
        for i in range(30):
            write(path / "src" / "many" / f"f{i}.txt", f"{i} {n if i == n else 0}\n")
        git(path, "add", "-A")
        git(path, "commit", "-q", "-m", f"commit {n}", when=EPOCH + n)
    return path


def expected(repo: Path) -> tuple[str, str, int]:
    return (
        git(repo, "rev-parse", "HEAD"),
        git(repo, "rev-parse", "HEAD^{tree}"),
        int(git(repo, "log", "-1", "--format=%ct")),
    )


def head(path: Path) -> GitHead:
    found = read_head(path)
    assert found is not None
    return found


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_repo(tmp_path / "repo", commits=2)


# --- HEAD, commit, tree, time -------------------------------------------------------------


@pytest.mark.parametrize(
    ("object_format", "pack"),
    [
        ("sha1", None),
        ("sha1", ["gc", "-q"]),
        ("sha1", ["gc", "-q", "--aggressive"]),
        ("sha1", ["repack", "-a", "-d", "-f", "--depth=250", "--window=250"]),
        ("sha256", None),
        ("sha256", ["gc", "-q", "--aggressive"]),
    ],
)
def test_head_matches_git(tmp_path: Path, object_format: str, pack: list[str] | None) -> None:
    repo = make_repo(tmp_path / "r", object_format=object_format)
    if pack:
        git(repo, *pack)
        git(repo, "prune-packed")
        assert list((repo / ".git" / "objects" / "pack").glob("*.idx"))
    commit, tree, when = expected(repo)
    found = head(repo)
    assert (found.commit, found.tree, found.commit_time) == (commit, tree, when)
    assert found.commit_time == EPOCH + 3
    assert found.object_format == object_format
    assert found.top == repo
    assert found.subdirectory == ""
    assert found.dirty is False


def _all_objects(repo: Path) -> Iterator[tuple[str, str, bytes]]:
    assert GIT is not None
    out = subprocess.run(
        [GIT, "-C", str(repo), "cat-file", "--batch-all-objects", "--batch"],
        capture_output=True,
        check=True,
    ).stdout
    pos = 0
    while pos < len(out):
        line_end = out.index(b"\n", pos)
        oid, kind, size = out[pos:line_end].decode().split()
        start = line_end + 1
        yield oid, kind, out[start : start + int(size)]
        pos = start + int(size) + 1


@pytest.mark.parametrize("object_format", ["sha1", "sha256"])
def test_every_object_of_a_deltified_pack_reads_as_git_reads_it(
    tmp_path: Path, object_format: str
) -> None:
    repo = make_repo(tmp_path / "r", object_format=object_format, commits=12)
    git(repo, "repack", "-a", "-d", "-f", "--depth=50", "--window=50")
    git(repo, "prune-packed")
    (idx,) = (repo / ".git" / "objects" / "pack").glob("*.idx")
    chains = git(repo, "verify-pack", "-v", str(idx))
    assert "chain length = 2" in chains  # deltas of deltas are there to resolve
    count = 0
    with Repository.open(repo / ".git") as r:
        for oid, kind, data in _all_objects(repo):
            assert r.read_object(oid) == (kind, data)
            count += 1
    assert count > 100


def test_detached_head(repo: Path) -> None:
    first = git(repo, "rev-list", "--max-parents=0", "HEAD")
    git(repo, "checkout", "-q", "--detach", first)
    assert (repo / ".git" / "HEAD").read_text().strip() == first
    found = head(repo)
    assert found.commit == first
    assert found.commit_time == EPOCH
    assert found.tree == git(repo, "rev-parse", "HEAD^{tree}")
    assert found.dirty is False


def test_packed_refs(repo: Path) -> None:
    git(repo, "tag", "v1")
    git(repo, "pack-refs", "--all", "--prune")
    assert not (repo / ".git" / "refs" / "heads" / "main").exists()
    assert "refs/heads/main" in (repo / ".git" / "packed-refs").read_text()
    assert head(repo).commit == git(repo, "rev-parse", "HEAD")


def test_head_on_an_annotated_tag_is_peeled(repo: Path) -> None:
    git(repo, "tag", "-a", "-m", "release", "v1")
    tag = git(repo, "rev-parse", "v1")
    (repo / ".git" / "HEAD").write_text(tag + "\n")
    assert head(repo).commit == git(repo, "rev-parse", "v1^{commit}")


def test_a_branch_without_commits_is_no_head(tmp_path: Path) -> None:
    repo = tmp_path / "empty"
    repo.mkdir()
    git(repo, "init", "-q")
    assert read_head(repo) is None


def test_a_subdirectory_is_described_by_its_checkout(repo: Path) -> None:
    found = head(repo / "src" / "deep")
    assert found.top == repo
    assert found.subdirectory == "src/deep"
    assert found.commit == git(repo, "rev-parse", "HEAD")


def test_a_directory_outside_any_checkout_is_no_repository(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    assert read_head(tmp_path / "plain") is None


def test_the_committer_time_is_read_even_after_a_signature(tmp_path: Path) -> None:
    repo = tmp_path / "r"
    repo.mkdir()
    git(repo, "init", "-q")
    tree = git(repo, "mktree", stdin=b"")
    body = (
        f"tree {tree}\nauthor a <a@b> 5 +0000\ncommitter Some One <x@y> 1234567890 -0700\n"
        "gpgsig -----BEGIN PGP SIGNATURE-----\n \n -----END PGP SIGNATURE-----\n\nsigned\n"
    )
    commit = git(repo, "hash-object", "-t", "commit", "-w", "--stdin", stdin=body.encode())
    (repo / ".git" / "HEAD").write_text(commit + "\n")
    found = head(repo)
    assert (found.commit, found.tree, found.commit_time) == (commit, tree, 1234567890)
    assert found.commit_time == int(git(repo, "log", "-1", "--format=%ct", "--no-show-signature"))


# --- dirty --------------------------------------------------------------------------------


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _replace_dir_by_file(path: Path) -> None:
    shutil.rmtree(path)
    path.write_text("now a file\n")


def _retarget(path: Path, target: str) -> None:
    path.unlink()
    path.symlink_to(target)


def _socket(path: Path) -> None:
    path.unlink()
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()


def _file_to_symlink_to_a_copy(r: Path) -> None:
    write(r / "copy", "hello\n")
    (r / "README").unlink()
    (r / "README").symlink_to("copy")


def _dir_to_symlink_to_a_copy(r: Path) -> None:
    shutil.copytree(r / "src" / "deep", r / "elsewhere", symlinks=True)
    shutil.rmtree(r / "src" / "deep")
    (r / "src" / "deep").symlink_to("../elsewhere")


def _symlink_to_file_with_its_text(r: Path) -> None:
    (r / "link").unlink()
    (r / "link").write_text("README")


MUTATIONS: dict[str, tuple[Callable[[Path], object], bool]] = {
    "content changed": (lambda r: (r / "README").write_text("changed\n"), True),
    "same size, other bytes": (lambda r: (r / "README").write_text("HELLO\n"), True),
    "exec bit dropped": (lambda r: (r / "bin" / "tool").chmod(0o644), True),
    "exec bit added": (lambda r: (r / "README").chmod(0o744), True),
    "file deleted": (lambda r: (r / "src" / "deep" / "er" / "b.txt").unlink(), True),
    "directory deleted": (lambda r: shutil.rmtree(r / "src" / "deep"), True),
    "file replaced by a symlink to the same bytes": (_file_to_symlink_to_a_copy, True),
    "file replaced by a fifo": (lambda r: _fifo(r / "src" / "a.c"), True),
    "file replaced by a socket": (lambda r: _socket(r / "README"), True),
    "directory replaced by a file": (lambda r: _replace_dir_by_file(r / "src" / "many"), True),
    "directory replaced by a symlink to a copy": (_dir_to_symlink_to_a_copy, True),
    "symlink retargeted": (lambda r: _retarget(r / "link", "bin/tool"), True),
    "symlink replaced by a file with its text": (_symlink_to_file_with_its_text, True),
    "untracked file": (lambda r: write(r / "src" / "new.o", "object"), False),
    "untracked directory": (lambda r: write(r / "build" / "x" / "y", "y"), False),
    "untracked fifo": (lambda r: os.mkfifo(r / "pipe"), False),
    "mtime only": (lambda r: os.utime(r / "README", (1, 1)), False),
    "group write bit only": (lambda r: (r / "README").chmod(0o664), False),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_dirty(repo: Path, name: str) -> None:
    mutate, dirty = MUTATIONS[name]
    assert head(repo).dirty is False
    mutate(repo)
    start = time.monotonic()
    assert head(repo).dirty is dirty
    assert time.monotonic() - start < 10
    # git agrees (on tracked files; a fifo git would try to read, so not asked then).
    if "fifo" not in name and "socket" not in name:
        status = git(repo, "status", "--porcelain", "--untracked-files=no")
        assert bool(status) is dirty


@pytest.mark.parametrize("packed", [False, True])
def test_dirty_after_gc_and_in_sha256(tmp_path: Path, packed: bool) -> None:
    repo = make_repo(tmp_path / "r", object_format="sha256")
    if packed:
        git(repo, "gc", "-q", "--aggressive")
    assert head(repo).dirty is False
    (repo / "src" / "many" / "f3.txt").write_text("other\n")
    assert head(repo).dirty is True


def test_dirty_is_about_the_source_directory_only(repo: Path) -> None:
    (repo / "README").write_text("changed outside src\n")
    assert head(repo).dirty is True
    assert head(repo / "src").dirty is False
    (repo / "src" / "deep" / "er" / "b.txt").write_text("changed inside\n")
    assert head(repo / "src").dirty is True
    assert head(repo / "src" / "many").dirty is False


def test_an_untracked_source_directory_is_dirty(repo: Path) -> None:
    write(repo / "scratch" / "file", "x")
    found = head(repo / "scratch")
    assert found.subdirectory == "scratch"
    assert found.dirty is True


def test_submodules_are_skipped(repo: Path) -> None:
    other = git(repo, "rev-parse", "HEAD")
    git(repo, "update-index", "--add", "--cacheinfo", f"160000,{other},vendor/sub")
    git(repo, "commit", "-q", "-m", "gitlink")
    assert "160000" in git(repo, "ls-tree", "HEAD", "vendor/")
    # An uninitialized submodule is an empty directory; a checked-out one anything at all.
    (repo / "vendor" / "sub").mkdir(parents=True)
    assert head(repo).dirty is False
    write(repo / "vendor" / "sub" / "file", "whatever")
    assert head(repo).dirty is False


def test_a_symlinked_work_tree_directory_is_never_followed(repo: Path, tmp_path: Path) -> None:
    # The tracked directory becomes a link to a tree with identical content elsewhere:
    # comparing through it would call the checkout clean.
    outside = tmp_path / "outside"
    shutil.copytree(repo / "src", outside, symlinks=True)
    shutil.rmtree(repo / "src")
    (repo / "src").symlink_to(outside)
    assert head(repo).dirty is True


# --- discovery ----------------------------------------------------------------------------


def test_a_bare_repository_layout_is_not_a_repository(tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    git(bare, "init", "-q", "--bare")
    assert (bare / "HEAD").is_file()
    assert read_head(bare) is None


@pytest.mark.parametrize("kind", ["symlink", "gitdir file", "fifo"])
def test_a_dot_git_that_is_no_directory_is_never_followed(
    repo: Path, tmp_path: Path, kind: str
) -> None:
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    if kind == "symlink":
        (checkout / ".git").symlink_to(repo / ".git")
    elif kind == "gitdir file":
        (checkout / ".git").write_text(f"gitdir: {repo / '.git'}\n")
    else:
        os.mkfifo(checkout / ".git")
    with pytest.raises(GitReadError, match=r"only a \.git directory is read"):
        read_head(checkout)


@pytest.mark.skipif(not IS_ROOT, reason="needs root to make files of another owner")
def test_a_dot_git_of_another_owner_is_refused(repo: Path) -> None:
    os.chown(repo / ".git", 65534, 65534)
    with pytest.raises(GitReadError, match="belongs to uid 65534"):
        read_head(repo / "src")


@pytest.mark.parametrize(
    "name", ["HEAD", "packed-refs", "refs/heads/main", "objects", "objects/pack"]
)
@pytest.mark.parametrize("kind", ["fifo", "symlink out", "symlink in"])
def test_git_metadata_that_is_not_a_plain_file_is_refused(
    repo: Path, tmp_path: Path, name: str, kind: str
) -> None:
    commit = git(repo, "rev-parse", "HEAD")
    git(repo, "gc", "-q")  # a pack, and the refs packed
    if name != "packed-refs":
        write(repo / ".git" / "refs" / "heads" / "main", commit + "\n")
    target = repo / ".git" / name
    if target.is_dir():
        shutil.move(target, tmp_path / "moved")
    else:
        target.rename(tmp_path / "moved")
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "symlink out":
        target.symlink_to(tmp_path / "moved")
    else:
        shutil.move(tmp_path / "moved", repo / ".git" / "elsewhere")
        target.symlink_to(repo / ".git" / "elsewhere")
    start = time.monotonic()
    with pytest.raises(GitReadError, match=r"symlink|fifo"):
        read_head(repo)
    assert time.monotonic() - start < 5


def test_head_without_a_git_directory_head_is_an_error(repo: Path) -> None:
    (repo / ".git" / "HEAD").unlink()
    with pytest.raises(GitReadError, match="HEAD does not exist"):
        read_head(repo)


@pytest.mark.parametrize(
    "content",
    [
        b"ref: refs/heads/../../../etc/passwd\n",
        b"ref: /etc/passwd\n",
        b"ref: HEAD\n",
        b"ref: refs/heads/a\x00b\n",
        b"not an id\n",
        b"ABCDEF" * 8 + b"\n",
    ],
)
def test_a_malformed_head_is_an_error(repo: Path, content: bytes) -> None:
    (repo / ".git" / "HEAD").write_bytes(content)
    with pytest.raises(GitReadError):
        read_head(repo)


def test_a_symref_loop_ends(repo: Path) -> None:
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/a\n")
    write(repo / ".git" / "refs" / "heads" / "a", "ref: refs/heads/b\n")
    write(repo / ".git" / "refs" / "heads" / "b", "ref: refs/heads/a\n")
    with pytest.raises(GitReadError, match="chain of more than"):
        read_head(repo)


def test_reftable_storage_is_reported(repo: Path) -> None:
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/.invalid\n")
    (repo / ".git" / "reftable").mkdir()
    with pytest.raises(GitReadError, match="reftable"):
        read_head(repo)


# --- missing objects: unknown, not a crash -------------------------------------------------


def _loose(repo: Path, oid: str) -> Path:
    return repo / ".git" / "objects" / oid[:2] / oid[2:]


def test_a_missing_tree_makes_dirty_unknown(repo: Path) -> None:
    deep = git(repo, "rev-parse", "HEAD:src/deep")
    _loose(repo, deep).unlink()
    found = head(repo)
    assert found.tree == git(repo, "rev-parse", "HEAD^{tree}")
    assert found.dirty is None
    assert found.dirty_unknown is not None and "not in the repository" in found.dirty_unknown


def test_a_missing_commit_leaves_only_its_id(repo: Path) -> None:
    commit = git(repo, "rev-parse", "HEAD")
    _loose(repo, commit).unlink()
    found = head(repo)
    assert (found.commit, found.tree, found.commit_time, found.dirty) == (commit, None, None, None)


def test_alternates_are_not_followed(repo: Path, tmp_path: Path) -> None:
    assert GIT is not None
    shared = tmp_path / "shared"
    subprocess.run([GIT, "clone", "-q", "--shared", str(repo), str(shared)], check=True)
    assert (shared / ".git" / "objects" / "info" / "alternates").exists()
    found = head(shared)
    assert found.commit == git(repo, "rev-parse", "HEAD")
    assert found.tree is None


def test_a_shallow_clone_is_fully_described(repo: Path, tmp_path: Path) -> None:
    assert GIT is not None
    shallow = tmp_path / "shallow"
    subprocess.run([GIT, "clone", "-q", "--depth", "1", f"file://{repo}", str(shallow)], check=True)
    assert (shallow / ".git" / "shallow").exists()
    found = head(shallow)
    assert (found.commit, found.tree, found.commit_time) == expected(repo)
    assert found.dirty is False


def test_a_forged_object_is_refused(repo: Path) -> None:
    # The loose file of the root tree now holds another (valid) object.
    tree = git(repo, "rev-parse", "HEAD^{tree}")
    blob = git(repo, "rev-parse", "HEAD:README")
    path = _loose(repo, tree)
    path.chmod(0o644)
    path.write_bytes(_loose(repo, blob).read_bytes())
    found = head(repo)
    assert found.dirty is None
    assert found.dirty_unknown is not None and "does not match its id" in found.dirty_unknown


# --- hostile object databases ---------------------------------------------------------------


def fake_git_dir(root: Path, head: bytes) -> Path:
    """A minimal git directory whose HEAD names ``head`` (raw id), with no objects yet."""
    git_dir = root / ".git"
    (git_dir / "objects").mkdir(parents=True)
    (git_dir / "refs" / "heads").mkdir(parents=True)
    (git_dir / "HEAD").write_text(head.hex() + "\n")
    return git_dir


def timed_read(git_dir: Path, oid: bytes) -> tuple[str, bytes]:
    start = time.monotonic()
    try:
        with Repository.open(git_dir) as r:
            return r.read_object(oid.hex())
    finally:
        assert time.monotonic() - start < 10


def test_a_pack_with_large_offsets_reads(tmp_path: Path) -> None:
    data = b"hello\n"
    oid = oid_of("blob", data)
    git_dir = fake_git_dir(tmp_path, oid)
    write_pack(git_dir / "objects", [(oid, 3, data, None)], large=True)
    assert timed_read(git_dir, oid) == ("blob", data)


def test_ofs_and_ref_deltas_resolve(tmp_path: Path) -> None:
    base = b"0123456789" * 10
    one = base + b"one"
    two = b"two" + one
    oids = [oid_of("blob", x) for x in (base, one, two)]
    git_dir = fake_git_dir(tmp_path, oids[2])
    d1 = delta(len(base), len(one), b"\x90\x64" + b"\x03one")  # copy 100 bytes, insert
    d2 = delta(len(one), len(two), b"\x03two" + b"\x90" + bytes([len(one)]))
    write_pack(
        git_dir / "objects",
        [(oids[0], 3, base, None), (oids[1], 3, d1, 0), (oids[2], 3, d2, oids[1])],
    )
    assert timed_read(git_dir, oids[2]) == ("blob", two)


def test_an_index_claiming_billions_of_objects_is_refused(tmp_path: Path) -> None:
    oid = oid_of("blob", b"x")
    git_dir = fake_git_dir(tmp_path, oid)
    pack_dir = git_dir / "objects" / "pack"
    pack_dir.mkdir()
    idx = b"\xfftOc" + struct.pack(">I", 2) + struct.pack(">256I", *([0xFFFFFFFF] * 256))
    (pack_dir / f"pack-{'0' * 40}.idx").write_bytes(idx + b"\0" * 4096)
    (pack_dir / f"pack-{'0' * 40}.pack").write_bytes(b"PACK" + struct.pack(">II", 2, 0xFFFFFFFF))
    with pytest.raises(GitReadError, match="claims more objects"):
        timed_read(git_dir, oid)


def test_a_ref_delta_loop_ends(tmp_path: Path) -> None:
    a, b = oid_of("blob", b"a"), oid_of("blob", b"b")
    git_dir = fake_git_dir(tmp_path, a)
    write_pack(
        git_dir / "objects",
        [(a, 3, delta(1, 1, b"\x01a"), b), (b, 3, delta(1, 1, b"\x01b"), a)],
    )
    with pytest.raises(GitReadError, match="delta chain longer than"):
        timed_read(git_dir, a)


def test_a_very_long_delta_chain_ends(tmp_path: Path) -> None:
    entries: list[Entry] = [(oid_of("blob", b"x"), 3, b"x", None)]
    for i in range(1, 4200):
        entries.append(
            (
                hashlib.sha1(b"%d" % i, usedforsecurity=False).digest(),
                3,
                delta(1, 1, b"\x01x"),
                i - 1,
            )
        )
    git_dir = fake_git_dir(tmp_path, entries[-1][0])
    write_pack(git_dir / "objects", entries)
    with pytest.raises(GitReadError, match="delta chain longer than"):
        timed_read(git_dir, entries[-1][0])


def test_a_delta_chain_that_grows_is_stopped_by_the_work_budget(tmp_path: Path) -> None:
    # Each delta copies its whole base twice: small deltas, exploding results.
    size = 1 << 16
    entries: list[Entry] = [(oid_of("blob", b"x"), 3, b"x" * size, None)]
    for i in range(1, 20):
        copy = b"\xb0" + struct.pack("<H", 0)  # copy 0x10000 bytes from offset 0
        ops = copy * (2**i)
        entries.append(
            (
                hashlib.sha1(b"%d" % i, usedforsecurity=False).digest(),
                3,
                delta(size * 2 ** (i - 1), size * 2**i, ops),
                i - 1,
            )
        )
    git_dir = fake_git_dir(tmp_path, entries[-1][0])
    write_pack(git_dir / "objects", entries)
    with pytest.raises(GitReadError, match=r"larger than|work"):
        timed_read(git_dir, entries[-1][0])


def test_a_zlib_bomb_is_stopped(tmp_path: Path) -> None:
    size = (64 << 20) + 1
    comp = zlib.compressobj(9)
    parts = [comp.compress(f"blob {size}\0".encode())]
    zeros = bytes(1 << 20)
    for _ in range(65):
        parts.append(comp.compress(zeros))
    parts.append(comp.flush())
    oid = hashlib.sha1(b"bomb", usedforsecurity=False).digest()
    git_dir = fake_git_dir(tmp_path, oid)
    write(git_dir / "objects" / oid.hex()[:2] / oid.hex()[2:], b"".join(parts))
    with pytest.raises(GitReadError, match="larger than"):
        timed_read(git_dir, oid)


def test_a_pack_entry_announcing_an_enormous_size_is_refused(tmp_path: Path) -> None:
    oid = oid_of("blob", b"x")
    git_dir = fake_git_dir(tmp_path, oid)
    write_pack(git_dir / "objects", [(oid, 3, b"x", None)])
    (pack,) = (git_dir / "objects" / "pack").glob("*.pack")
    data = bytearray(pack.read_bytes())
    data[12:13] = b"\xbf\xff\xff\xff\xff\xff\xff\xff\x7f"  # blob of about 2**60 bytes
    pack.write_bytes(bytes(data))
    with pytest.raises(GitReadError):
        timed_read(git_dir, oid)


def test_huge_ref_files_are_not_read(repo: Path) -> None:
    with open(repo / ".git" / "HEAD", "wb") as f:
        f.truncate(10 << 30)  # sparse: 10 GiB of zeros
    with pytest.raises(GitReadError, match="larger than"):
        read_head(repo)


@pytest.mark.parametrize(
    ("tree", "problem"),
    [
        (b"100644 ../x\0" + b"\1" * 20, "unsafe entry name"),
        (b"100644 a/b\0" + b"\1" * 20, "unsafe entry name"),
        (b"100644 \0" + b"\1" * 20, "unsafe entry name"),
        (b"100645 a\0" + b"\1" * 20, "unknown file mode"),
        (b"100644 a\0" + b"\1" * 19, "truncated"),
    ],
)
def test_malformed_trees_are_refused(tree: bytes, problem: str) -> None:
    with pytest.raises(GitReadError, match=problem):
        gitread._parse_tree(tree, 20)


# --- fuzzing: arbitrary bytes end in GitReadError, never elsewhere --------------------------


@pytest.fixture(scope="module")
def packed_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    repo = make_repo(tmp_path_factory.mktemp("fuzz") / "r", commits=3)
    git(repo, "repack", "-a", "-d", "-f", "--depth=50", "--window=50")
    git(repo, "prune-packed")
    wanted = {oid: data for oid, kind, data in _all_objects(repo) if kind in ("commit", "tree")}
    return repo, wanted


def _fresh_git_dir(base: Path) -> Path:
    n = 0
    while (base / f"g{n}").exists():
        n += 1
    git_dir = base / f"g{n}" / ".git"
    (git_dir / "objects" / "pack").mkdir(parents=True)
    return git_dir


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("scratch")


def _must_fail_cleanly(read: Callable[[], object]) -> None:
    start = time.monotonic()
    with contextlib.suppress(GitReadError):
        read()
    assert time.monotonic() - start < 5


@FUZZ
@given(data=st.binary(max_size=2048))
def test_fuzz_loose_objects(scratch: Path, data: bytes) -> None:
    oid = hashlib.sha1(data, usedforsecurity=False).digest()
    git_dir = _fresh_git_dir(scratch)
    write(git_dir / "objects" / oid.hex()[:2] / oid.hex()[2:], data)
    with Repository.open(git_dir) as r:
        _must_fail_cleanly(lambda: r.read_object(oid.hex()))


@FUZZ
@given(data=st.binary(max_size=512), header=st.sampled_from([b"blob", b"tree", b"commit", b"x"]))
def test_fuzz_loose_object_contents(scratch: Path, data: bytes, header: bytes) -> None:
    # Well-formed zlib around arbitrary (and arbitrarily wrong) headers and bodies.
    oid = hashlib.sha1(header + data, usedforsecurity=False).digest()
    git_dir = _fresh_git_dir(scratch)
    write(git_dir / "objects" / oid.hex()[:2] / oid.hex()[2:], zlib.compress(header + data))
    with Repository.open(git_dir) as r:
        _must_fail_cleanly(lambda: r.read_object(oid.hex()))


@FUZZ
@given(idx=st.binary(max_size=4096), pack=st.binary(max_size=4096), first=st.integers(0, 255))
def test_fuzz_pack_and_index_bytes(scratch: Path, idx: bytes, pack: bytes, first: int) -> None:
    git_dir = _fresh_git_dir(scratch)
    # A valid header in front, so the fuzzing reaches the tables and entries.
    idx_data = b"\xfftOc\0\0\0\2" + idx
    (git_dir / "objects" / "pack" / f"pack-{'1' * 40}.idx").write_bytes(idx_data)
    (git_dir / "objects" / "pack" / f"pack-{'1' * 40}.pack").write_bytes(b"PACK" + pack)
    oid = bytes([first]) + hashlib.sha1(idx, usedforsecurity=False).digest()[1:]

    def read() -> object:
        with Repository.open(git_dir) as r:
            return r.read_object(oid.hex())

    start = time.monotonic()
    with pytest.raises(GitReadError):
        read()
    assert time.monotonic() - start < 5


@FUZZ
@given(
    target=st.sampled_from(["pack", "idx"]),
    edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.one_of(st.none(), st.integers(0, 1 << 20)),
)
def test_fuzz_mutated_real_pack(
    scratch: Path,
    packed_repo: tuple[Path, dict[str, bytes]],
    target: str,
    edits: list[tuple[int, int]],
    cut: int | None,
) -> None:
    repo, wanted = packed_repo
    git_dir = _fresh_git_dir(scratch)
    for original in (repo / ".git" / "objects" / "pack").glob("pack-*"):
        if original.suffix not in (".pack", ".idx"):
            continue
        data = bytearray(original.read_bytes())
        if original.suffix == f".{target}":
            for pos, value in edits:
                data[pos % len(data)] = value
            if cut is not None:
                del data[cut % len(data) :]
        (git_dir / "objects" / "pack" / original.name).write_bytes(bytes(data))
    start = time.monotonic()
    try:
        with Repository.open(git_dir) as r:
            for oid, content in wanted.items():
                try:
                    _, data_read = r.read_object(oid)
                except MissingObjectError:
                    continue
                # Whatever still reads is the true object: ids are checked.
                assert data_read == content
    except GitReadError:
        pass
    assert time.monotonic() - start < 10


@FUZZ
@given(base=st.binary(max_size=300), ops=st.binary(max_size=300), size=st.integers(0, 1 << 70))
def test_fuzz_deltas(base: bytes, ops: bytes, size: int) -> None:
    for d in (ops, delta(len(base), size, ops), delta(len(base), len(ops), ops)):
        try:
            out = gitread._apply_delta(base, d)
        except GitReadError:
            continue
        assert len(out) <= 64 << 20


@FUZZ
@given(data=st.binary(max_size=600), hash_len=st.sampled_from([20, 32]))
def test_fuzz_trees(data: bytes, hash_len: int) -> None:
    try:
        entries = gitread._parse_tree(data, hash_len)
    except GitReadError:
        return
    for entry in entries:
        assert entry.name not in (b"", b".", b"..") and b"/" not in entry.name
        assert len(entry.oid) == hash_len


@FUZZ
@given(head=st.binary(max_size=200), packed=st.binary(max_size=400))
def test_fuzz_refs(scratch: Path, head: bytes, packed: bytes) -> None:
    git_dir = _fresh_git_dir(scratch)
    (git_dir / "HEAD").write_bytes(b"ref: refs/heads/main\n" if head[:1] == b"r" else head)
    (git_dir / "packed-refs").write_bytes(packed)
    with Repository.open(git_dir) as r:
        try:
            found = r.head()
        except GitReadError:
            return
    assert found is None or len(found) in (40, 64)
