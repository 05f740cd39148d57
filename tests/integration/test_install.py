"""The README's Install section, followed as written by a normal user on a fresh clone:
pipx, and a virtual environment (opt-in: ``BUILDCELL_TEST_INSTALL=1``; it installs the
Python dependencies from pip's configured index, so it needs that index and a minute).

As root the steps run as ``nobody`` (uid 65534) under ``setpriv``: no user is made, so
none is left behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.conftest import IS_ROOT, REPO, UNPRIVILEGED

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.skipif(
        os.environ.get("BUILDCELL_TEST_INSTALL") != "1",
        reason="installs from pip's configured index: opt in with BUILDCELL_TEST_INSTALL=1",
    ),
]


@dataclass(frozen=True)
class User:
    """A normal user with a fresh clone of this repository in its own home."""

    home: Path
    clone: Path

    def __call__(
        self, argv: Sequence[str], cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` as the user, in a new shell's environment (nothing of ours)."""
        env = {"HOME": str(self.home), "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
        prefix: list[str] = []
        if IS_ROOT:
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                pytest.skip("needs setpriv (util-linux) to act as a normal user")
            prefix = [setpriv, f"--reuid={UNPRIVILEGED}", f"--regid={UNPRIVILEGED}",
                      "--clear-groups", "--"]  # fmt: skip
        return subprocess.run(
            [*prefix, *argv],
            cwd=cwd or self.clone,
            env=env,
            capture_output=True,
            text=True,
            timeout=540,
            check=False,
        )


@pytest.fixture
def user() -> Iterator[User]:
    if shutil.which("git") is None:
        pytest.skip("needs git for a fresh clone")
    home = Path(tempfile.mkdtemp(prefix="bc-install-", dir="/tmp"))
    clone = home / "buildcell"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    if IS_ROOT:
        for root, dirs, files in os.walk(home):
            for name in (root, *(os.path.join(root, n) for n in dirs + files)):
                os.lchown(name, UNPRIVILEGED, UNPRIVILEGED)
    yield User(home, clone)
    shutil.rmtree(home, ignore_errors=True)


def _ok(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def _works(user: User, buildcell: str) -> None:
    assert _ok(user([buildcell, "--version"])).startswith("buildcell ")
    _ok(user([buildcell, "doctor"]))


def test_virtual_environment_install(user: User) -> None:
    _ok(user(["sh", "-c", "python3 -m venv .venv && .venv/bin/pip install -q ."]))
    _works(user, str(user.clone / ".venv" / "bin" / "buildcell"))
    # The README's way onto PATH, in a new shell.
    out = _ok(
        user(["sh", "-c", ". .venv/bin/activate && command -v buildcell && buildcell --version"])
    )
    assert out.splitlines()[0] == str(user.clone / ".venv" / "bin" / "buildcell")


def test_pipx_install(user: User) -> None:
    if shutil.which("pipx") is None:
        pytest.skip("needs pipx (apt-get install pipx)")
    _ok(user(["pipx", "install", "."]))
    _works(user, str(user.home / ".local" / "bin" / "buildcell"))
    _ok(user(["pipx", "ensurepath"]))
    # A new login shell finds it on PATH.
    out = _ok(user(["bash", "-lc", "command -v buildcell && buildcell --version"], cwd=user.home))
    assert out.splitlines()[0] == str(user.home / ".local" / "bin" / "buildcell")
