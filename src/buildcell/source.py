"""What the source of a build was: a git commit and tree, or a digest of the files.

The source is untrusted: git is run with its configuration hardened (no fsmonitor, no
system or global config, no pager, no hooks are involved in plumbing commands), and only
plumbing commands that execute nothing from the repository are used.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["SourceInfo", "describe_source", "tree_digest"]

_EXCLUDED = frozenset({".git"})


@dataclass(frozen=True)
class SourceInfo:
    """Identity of a source directory, for provenance and ``SOURCE_DATE_EPOCH``."""

    path: Path
    git_commit: str | None = None
    git_tree: str | None = None
    commit_time: int | None = None
    sha256: str | None = None
    annotations: dict[str, Any] = field(default_factory=dict)

    def to_parameter(self) -> dict[str, Any]:
        digest: dict[str, str] = {}
        if self.git_commit:
            digest["gitCommit"] = self.git_commit
        if self.git_tree:
            digest["gitTree"] = self.git_tree
        if self.sha256:
            digest["sha256"] = self.sha256
        uri = ("git+" if self.git_commit else "") + self.path.as_uri()
        return {"uri": uri, "digest": digest}


def _git(path: Path, *args: str) -> str | None:
    git = shutil.which("git")
    if git is None:
        return None
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "GIT_TERMINAL_PROMPT": "0",
        "HOME": "/nonexistent",
        "LANG": "C",
    }
    try:
        res = subprocess.run(
            [
                git,
                "-c",
                "core.fsmonitor=false",
                "-c",
                f"safe.directory={path}",
                "-C",
                str(path),
                "--no-pager",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=10,
            env=env,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def tree_digest(root: Path, *, exclude: tuple[Path, ...] = ()) -> str:
    """sha256 over a sorted listing of the tree: each entry's path, kind, executable bit,
    and content digest (or symlink target). Independent of mtimes, owners and order."""
    excluded = {p.resolve() for p in exclude}
    lines: list[bytes] = []
    stack = [(root, "")]
    while stack:
        directory, prefix = stack.pop()
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            rel = f"{prefix}{entry.name}"
            if (not prefix and entry.name in _EXCLUDED) or Path(entry.path).resolve() in excluded:
                continue
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                lines.append(f"d {rel}".encode(errors="surrogateescape"))
                stack.append((Path(entry.path), rel + "/"))
            elif stat.S_ISLNK(st.st_mode):
                target = os.readlink(entry.path)
                lines.append(f"l {rel} {target}".encode(errors="surrogateescape"))
            elif stat.S_ISREG(st.st_mode):
                h = hashlib.sha256()
                with open(entry.path, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
                mode = "x" if st.st_mode & 0o111 else "-"
                lines.append(f"f {rel} {mode} {h.hexdigest()}".encode(errors="surrogateescape"))
    lines.sort()
    return hashlib.sha256(b"\n".join(lines) + b"\n").hexdigest()


def describe_source(path: Path, *, exclude: tuple[Path, ...] = ()) -> SourceInfo:
    """Identify ``path``: a git checkout's HEAD commit, tree and commit time, else a digest
    of its files (excluding ``.git`` and ``exclude``)."""
    path = path.resolve()
    top = _git(path, "rev-parse", "--show-toplevel")
    commit = _git(path, "rev-parse", "--verify", "HEAD^{commit}") if top else None
    if top and commit:
        tree = _git(path, "rev-parse", "HEAD^{tree}")
        when = _git(path, "log", "-1", "--format=%ct", "HEAD")
        annotations: dict[str, Any] = {}
        if Path(top).resolve() != path:
            annotations["subdirectory"] = str(path.relative_to(Path(top).resolve()))
        return SourceInfo(
            path=path,
            git_commit=commit,
            git_tree=tree,
            commit_time=int(when) if when and when.isdigit() else None,
            # The files as built: a checkout may differ from its commit.
            sha256=tree_digest(path, exclude=exclude),
            annotations=annotations,
        )
    return SourceInfo(path=path, sha256=tree_digest(path, exclude=exclude))
