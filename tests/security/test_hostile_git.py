"""A pull request's git metadata, made hostile, against the real ``buildcell build``.

Each test lays out the spec's directory the way an attacker would (a git directory whose
configuration names ``evil.sh`` everywhere git could run a program, links out of the
checkout, fifos where files are read, object databases crafted to loop or explode), runs
the real CLI and asserts containment: the build runs, ``evil.sh`` never ran on the host
(its marker file is absent), and it was all over quickly. What the provenance then says
about the source is checked too: what could not be read safely is reported, never guessed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import struct
import subprocess
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import RunCLI
from tests.git_objects import delta, write_pack

GIT = shutil.which("git")
pytestmark = pytest.mark.skipif(GIT is None, reason="git is not installed")
IS_ROOT = os.geteuid() == 0
EPOCH = 1_700_000_000
EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"

SPEC = """\
version: 1
name: hostile-git
steps:
  - name: build
    run: mkdir -p o && echo built > o/x
outputs: ["o/x"]
"""

# Every place a git configuration can name a program, and more configuration to include.
CONFIG = """\
[core]
\trepositoryformatversion = 0
\tbare = false
\tfsmonitor = ./evil.sh
\thooksPath = ./hooks
\tpager = ./evil.sh
\taskPass = ./evil.sh
\tsshCommand = ./evil.sh
\teditor = ./evil.sh
{worktree}
[log]
\tshowSignature = true
[gpg]
\tprogram = ./evil.sh
[gpg "ssh"]
\tprogram = ./evil.sh
[diff "evil"]
\ttextconv = ./evil.sh
[filter "evil"]
\tclean = ./evil.sh
\tsmudge = ./evil.sh
[credential]
\thelper = !./evil.sh
[include]
\tpath = evil.cfg
[includeIf "gitdir:/"]
\tpath = evil.cfg
[safe]
\tdirectory = *
"""


def git(repo: Path, *args: str, stdin: bytes | None = None) -> str:
    assert GIT is not None
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(repo),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@e",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@e",
        "GIT_AUTHOR_DATE": f"@{EPOCH} +0000",
        "GIT_COMMITTER_DATE": f"@{EPOCH} +0000",
    }
    return (
        subprocess.run(
            [GIT, "-c", "init.defaultBranch=main", "-C", str(repo), *args],
            env=env,
            input=stdin,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .strip()
    )


class Attack:
    """The attacker's files: a spec directory, and a marker evil.sh would create."""

    def __init__(self, tmp_path: Path) -> None:
        self.base = tmp_path
        self.spec_dir = tmp_path / "checkout" / "proj"
        self.spec_dir.mkdir(parents=True)
        (self.spec_dir / "buildcell.yaml").write_text(SPEC)
        self.marker = tmp_path / "PWNED"
        self.evil = f"#!/bin/sh\necho ran as $(id -u) in $PWD >> {self.marker}\n"
        self.plant_evil(self.spec_dir)
        self.scratch = tmp_path / "scratch"
        self.scratch.mkdir()
        git(self.scratch, "init", "-q")

    def plant_evil(self, where: Path) -> None:
        where.mkdir(parents=True, exist_ok=True)
        (where / "evil.sh").write_text(self.evil)
        (where / "evil.sh").chmod(0o755)

    def signed_commit(self) -> str:
        """A commit with a signature header: ``git log`` with showSignature runs gpg on it."""
        body = (
            f"tree {EMPTY_TREE}\nauthor a <a@b> {EPOCH} +0000\ncommitter a <a@b> {EPOCH} +0000\n"
            "gpgsig -----BEGIN PGP SIGNATURE-----\n \n iQEzBAABCAAdFiEE\n"
            " -----END PGP SIGNATURE-----\n\nsigned\n"
        )
        git(self.scratch, "mktree", stdin=b"")
        return git(
            self.scratch, "hash-object", "-t", "commit", "-w", "--stdin", stdin=body.encode()
        )

    def hostile_git_dir(self, where: Path, *, worktree: str | None = None) -> str:
        """Lay out ``where`` as a git directory with a hostile configuration; return HEAD."""
        commit = self.signed_commit()
        shutil.copytree(self.scratch / ".git" / "objects", where / "objects", dirs_exist_ok=True)
        (where / "refs" / "heads").mkdir(parents=True)
        (where / "refs" / "heads" / "main").write_text(commit + "\n")
        (where / "HEAD").write_text("ref: refs/heads/main\n")
        line = f"\tworktree = {worktree}" if worktree else ""
        (where / "config").write_text(CONFIG.format(worktree=line))
        (where / "evil.cfg").write_text(
            "[core]\n\tfsmonitor = ./evil.sh\n[log]\n\tshowSignature = true\n"
        )
        self.plant_evil(where)
        for hook in ("post-checkout", "pre-commit", "post-index-change", "reference-transaction"):
            self.plant_evil(where / "hooks")
            (where / "hooks" / hook).write_text(self.evil)
            (where / "hooks" / hook).chmod(0o755)
        return commit

    def dot_git(self) -> Path:
        git_dir = self.spec_dir / ".git"
        git_dir.mkdir()
        return git_dir


def run_build(bc: RunCLI, attack: Attack) -> dict[str, Any]:
    """Build the attacker's spec as root would in CI; return the source parameter."""
    out = attack.base / "out"
    start = time.monotonic()
    res = bc(
        "build",
        "-f",
        str(attack.spec_dir / "buildcell.yaml"),
        "--out",
        str(out),
        "--json",
        cwd=attack.base,
        timeout=120,
    )
    elapsed = time.monotonic() - start
    assert not attack.marker.exists(), f"evil.sh ran on the host: {attack.marker.read_text()}"
    assert res.returncode == 0, res.stderr
    assert elapsed < 60
    assert (out / "o" / "x").read_text() == "built\n"
    envelope = json.loads((out / "provenance.intoto.jsonl").read_text())
    statement = json.loads(base64.b64decode(envelope["payload"]))
    source: dict[str, Any] = statement["predicate"]["buildDefinition"]["externalParameters"][
        "source"
    ]
    return source


@pytest.fixture
def attack(tmp_path: Path) -> Attack:
    return Attack(tmp_path)


def unreadable(source: dict[str, Any], reason: str) -> None:
    assert "gitCommit" not in source["digest"]
    assert "sha256" in source["digest"]
    assert reason in source.get("annotations", {}).get("gitUnreadable", ""), source


# --- the layout is a real attack ----------------------------------------------------------


def test_the_layout_runs_evil_sh_through_git_itself(attack: Attack) -> None:
    """Control: what ``describe_source`` used to run, on this layout, runs evil.sh."""
    assert GIT is not None
    attack.hostile_git_dir(attack.base / "fake")
    (attack.spec_dir / ".git").write_text("gitdir: ../../fake\n")
    env = {
        "PATH": "/usr/bin:/bin",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "HOME": "/nonexistent",
    }
    hardened = ["-c", "core.fsmonitor=false", "-c", f"safe.directory={attack.spec_dir}"]
    subprocess.run(
        [GIT, *hardened, "-C", str(attack.spec_dir), "--no-pager", "log", "-1", "--format=%ct"],
        env=env,
        capture_output=True,
        check=False,
    )
    assert attack.marker.exists()


# --- configuration never runs -------------------------------------------------------------


def test_the_spec_directory_laid_out_as_a_bare_repository(bc: RunCLI, attack: Attack) -> None:
    attack.hostile_git_dir(attack.spec_dir, worktree=".")
    source = run_build(bc, attack)
    # Not a repository at all: only a directory named .git makes one.
    assert set(source["digest"]) == {"sha256"}
    assert not source["uri"].startswith("git+")


def test_a_hostile_dot_git_directory_is_read_not_run(bc: RunCLI, attack: Attack) -> None:
    commit = attack.hostile_git_dir(attack.dot_git(), worktree="/")
    source = run_build(bc, attack)
    assert source["digest"]["gitCommit"] == commit
    assert source["digest"]["gitTree"] == EMPTY_TREE
    assert source["annotations"]["dirty"] is False  # the commit tracks nothing


def test_a_config_that_is_a_fifo_is_never_opened(bc: RunCLI, attack: Attack) -> None:
    git_dir = attack.dot_git()
    commit = attack.hostile_git_dir(git_dir)
    (git_dir / "config").unlink()
    os.mkfifo(git_dir / "config")
    (git_dir / "evil.cfg").unlink()
    os.mkfifo(git_dir / "evil.cfg")
    assert run_build(bc, attack)["digest"]["gitCommit"] == commit


# --- links and special files where git metadata is expected -------------------------------


@pytest.mark.parametrize("target", ["../../fake", "/FAKE", "fake-inside"])
def test_a_gitdir_file_is_not_followed(bc: RunCLI, attack: Attack, target: str) -> None:
    if target == "fake-inside":
        fake = attack.spec_dir / "fake-inside"
    elif target == "/FAKE":
        fake = attack.base / "abs-fake"
        target = str(fake)
    else:
        fake = attack.base / "fake"
    fake.mkdir()
    attack.hostile_git_dir(fake)
    (attack.spec_dir / ".git").write_text(f"gitdir: {target}\n")
    unreadable(run_build(bc, attack), "gitdir file")


@pytest.mark.parametrize("target", ["/", "fake", "/proc/self/cwd", "/dev/zero"])
def test_a_dot_git_symlink_is_not_followed(bc: RunCLI, attack: Attack, target: str) -> None:
    if target == "fake":
        attack.hostile_git_dir(attack.base / "fake")
        target = str(attack.base / "fake")
    (attack.spec_dir / ".git").symlink_to(target)
    unreadable(run_build(bc, attack), "symlink")


@pytest.mark.parametrize(
    ("name", "how", "reason"),
    [
        ("HEAD", "fifo", "HEAD is a fifo"),
        ("packed-refs", "fifo", "packed-refs is a fifo"),
        ("refs/heads/main", "fifo", "is a fifo"),
        ("HEAD", "/etc/shadow", "HEAD is a symlink"),
        ("objects", "/", ".git/objects is a symlink"),
        ("refs", "/", ".git/refs is a symlink"),
        ("objects/pack", "/proc/self/fd", "objects/pack is a symlink"),
    ],
)
def test_links_and_fifos_inside_dot_git(
    bc: RunCLI, attack: Attack, name: str, how: str, reason: str
) -> None:
    git_dir = attack.dot_git()
    attack.hostile_git_dir(git_dir)
    if name == "packed-refs":
        # HEAD names a branch that only packed-refs could hold.
        (git_dir / "refs" / "heads" / "main").unlink()
    path = git_dir / name
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    if how == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to(how)
    unreadable(run_build(bc, attack), reason)


@pytest.mark.skipif(not IS_ROOT, reason="needs root to make files of another owner")
def test_a_dot_git_above_the_checkout_of_another_owner(bc: RunCLI, attack: Attack) -> None:
    # Another local user's /tmp/.git would otherwise describe every build below /tmp.
    outer = attack.spec_dir.parent / ".git"
    outer.mkdir()
    attack.hostile_git_dir(outer)
    for path in [outer, *outer.rglob("*")]:
        os.chown(path, 65534, 65534, follow_symlinks=False)
    unreadable(run_build(bc, attack), "belongs to uid 65534")


# --- object databases crafted to loop, explode or lie -------------------------------------


def _fake_id(n: int) -> bytes:
    return hashlib.sha256(b"%d" % n).digest()[:20]


def _crafted(attack: Attack, head: bytes) -> Path:
    git_dir = attack.dot_git()
    attack.hostile_git_dir(git_dir)
    (git_dir / "refs" / "heads" / "main").write_text(head.hex() + "\n")
    return git_dir


def test_a_pack_index_claiming_billions_of_objects(bc: RunCLI, attack: Attack) -> None:
    git_dir = _crafted(attack, _fake_id(0))
    pack_dir = git_dir / "objects" / "pack"
    pack_dir.mkdir(exist_ok=True)
    header = b"\xfftOc" + struct.pack(">I", 2) + struct.pack(">256I", *([0xFFFFFFFF] * 256))
    (pack_dir / f"pack-{'f' * 40}.idx").write_bytes(header + bytes(1 << 16))
    (pack_dir / f"pack-{'f' * 40}.pack").write_bytes(b"PACK" + struct.pack(">II", 2, 0xFFFFFFFF))
    unreadable(run_build(bc, attack), "claims more objects")


def test_a_looping_delta_chain(bc: RunCLI, attack: Attack) -> None:
    a, b = _fake_id(1), _fake_id(2)
    git_dir = _crafted(attack, a)
    write_pack(
        git_dir / "objects", [(a, 1, delta(1, 1, b"\x01a"), b), (b, 1, delta(1, 1, b"\x01b"), a)]
    )
    unreadable(run_build(bc, attack), "delta chain longer than")


def test_a_huge_delta_chain(bc: RunCLI, attack: Attack) -> None:
    entries: list[tuple[bytes, int, bytes, int | bytes | None]] = [(_fake_id(0), 1, b"x", None)]
    entries += [(_fake_id(i), 1, delta(1, 1, b"\x01x"), i - 1) for i in range(1, 5000)]
    git_dir = _crafted(attack, entries[-1][0])
    write_pack(git_dir / "objects", entries)
    unreadable(run_build(bc, attack), "delta chain longer than")


def test_an_exploding_delta_chain(bc: RunCLI, attack: Attack) -> None:
    # Every delta doubles its base with 64 KiB copies: tiny deltas, gigabytes of result.
    size = 1 << 16
    entries: list[tuple[bytes, int, bytes, int | bytes | None]] = [
        (_fake_id(0), 1, b"x" * size, None)
    ]
    for i in range(1, 16):
        ops = (b"\xb0\x00\x00") * (2**i)
        entries.append((_fake_id(i), 1, delta(size * 2 ** (i - 1), size * 2**i, ops), i - 1))
    git_dir = _crafted(attack, entries[-1][0])
    write_pack(git_dir / "objects", entries)
    unreadable(run_build(bc, attack), "larger than")


def test_a_zlib_bomb_as_the_head_commit(bc: RunCLI, attack: Attack) -> None:
    oid = _fake_id(7)
    git_dir = _crafted(attack, oid)
    size = 1 << 30
    comp = zlib.compressobj(9)
    parts = [comp.compress(f"commit {size}\0".encode())]
    zeros = bytes(1 << 20)
    parts += [comp.compress(zeros) for _ in range(80)]  # 80 MiB of it is enough to refuse
    parts.append(comp.flush())
    path = git_dir / "objects" / oid.hex()[:2] / oid.hex()[2:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(parts))
    unreadable(run_build(bc, attack), "larger than")


def test_a_forged_commit_is_not_believed(bc: RunCLI, attack: Attack) -> None:
    # A loose object under the id HEAD names, holding a commit that is not that id.
    oid = _fake_id(9)
    git_dir = _crafted(attack, oid)
    body = f"tree {EMPTY_TREE}\ncommitter a <a@b> 1 +0000\n\nforged\n".encode()
    path = git_dir / "objects" / oid.hex()[:2] / oid.hex()[2:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(zlib.compress(b"commit %d\0" % len(body) + body))
    unreadable(run_build(bc, attack), "does not match its id")


def test_alternates_are_not_followed(bc: RunCLI, attack: Attack) -> None:
    # The objects live in a host repository that alternates would reach.
    host_repo = attack.base / "host-repo"
    host_repo.mkdir()
    git(host_repo, "init", "-q")
    (host_repo / "secret").write_text("host data\n")
    git(host_repo, "add", "-A")
    git(host_repo, "commit", "-q", "-m", "host")
    git_dir = attack.dot_git()
    attack.hostile_git_dir(git_dir)
    head = git(host_repo, "rev-parse", "HEAD")
    (git_dir / "refs" / "heads" / "main").write_text(head + "\n")
    info = git_dir / "objects" / "info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "alternates").write_text(f"{host_repo / '.git' / 'objects'}\n")
    source = run_build(bc, attack)
    assert source["digest"]["gitCommit"] == head  # what HEAD says, nothing more
    assert "gitTree" not in source["digest"]
    assert "dirty" not in source.get("annotations", {})


# --- the work tree ------------------------------------------------------------------------


def test_a_tracked_file_replaced_by_a_fifo(bc: RunCLI, attack: Attack) -> None:
    (attack.spec_dir / "data.txt").write_text("tracked\n")
    git(attack.spec_dir, "init", "-q")
    git(attack.spec_dir, "add", "-A")
    git(attack.spec_dir, "commit", "-q", "-m", "x")
    (attack.spec_dir / "data.txt").unlink()
    os.mkfifo(attack.spec_dir / "data.txt")
    source = run_build(bc, attack)
    assert source["digest"]["gitCommit"] == git(attack.spec_dir, "rev-parse", "HEAD")
    assert source["annotations"]["dirty"] is True


def test_a_tracked_directory_swapped_for_a_link_to_the_host(bc: RunCLI, attack: Attack) -> None:
    (attack.spec_dir / "etc").mkdir()
    (attack.spec_dir / "etc" / "hostname").write_text("x\n")
    git(attack.spec_dir, "init", "-q")
    git(attack.spec_dir, "add", "-A")
    git(attack.spec_dir, "commit", "-q", "-m", "x")
    shutil.rmtree(attack.spec_dir / "etc")
    (attack.spec_dir / "etc").symlink_to("/etc")
    source = run_build(bc, attack)
    assert source["annotations"]["dirty"] is True
