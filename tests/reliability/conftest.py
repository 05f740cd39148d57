"""What the fault tests share: a working directory the cells' uids can traverse, and the
real command line run in it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import cli_env


@pytest.fixture
def work() -> Iterator[Path]:
    """A fresh directory under /tmp, mode 0711 (as root, cells run as other uids)."""
    path = Path(tempfile.mkdtemp(prefix="bc-faults-", dir="/tmp"))
    os.chmod(path, 0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def cli(
    state: Path, *args: str, cwd: Path, timeout: float = 120, **env: str
) -> subprocess.CompletedProcess[str]:
    """``buildcell ARGS`` with the state directory ``state``."""
    return subprocess.run(
        [sys.executable, "-m", "buildcell", *args],
        cwd=cwd,
        env=cli_env(state, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
