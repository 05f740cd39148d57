"""The state directory's file system full at each point of a build: exit 125 with one line
that names the directory and the free space, or success; never a traceback, never state
that a later command trips over. Runs as root (it mounts a small tmpfs)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from tests.conftest import one_error, root_only
from tests.reliability.conftest import cli

pytestmark = [root_only, pytest.mark.slow]

SIZE = 6 << 20
SPEC = """\
version: 1
name: filling
steps:
  - name: talk
    run: for i in $(seq 1 3000); do echo "line $i of a step that talks a lot, padded"; done
  - name: write
    run: mkdir -p dist && head -c 131072 /dev/urandom > dist/blob && echo ok > dist/ok
outputs: ["dist/*"]
"""


@pytest.fixture
def small_disk(work: Path) -> Iterator[Path]:
    """A 6 MiB tmpfs, mounted for the test and unmounted after."""
    mnt = work / "disk"
    mnt.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SIZE},mode=0711", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(mnt: Path, leave: int) -> Path:
    """A file that takes all but ``leave`` bytes of the file system."""
    filler = mnt / "filler"
    with filler.open("wb") as f:
        chunk = b"\0" * (64 << 10)
        while True:
            st = os.statvfs(mnt)
            free = st.f_bavail * st.f_frsize
            if free <= leave:
                break
            try:
                f.write(chunk[: max(4096, min(len(chunk), free - leave))])
                f.flush()
            except OSError:
                break
    return filler


def _records(state: Path, cwd: Path) -> list[dict[str, Any]]:
    ls = cli(state, "ls", "--json", "--project", "filling", cwd=cwd)
    assert ls.returncode == 0, ls.stderr[-2000:]
    assert "Traceback" not in ls.stderr
    return cast("list[dict[str, Any]]", json.loads(ls.stdout))


@pytest.mark.parametrize("leave", [0, 16 << 10, 96 << 10, 192 << 10, 256 << 10, 320 << 10, 2 << 20])
def test_a_build_on_a_full_state_directory(work: Path, small_disk: Path, leave: int) -> None:
    src = work / "src"
    src.mkdir(mode=0o755)
    (src / "buildcell.yaml").write_text(SPEC)
    state = small_disk / "state"
    out = work / "out"
    args = ("build", "--out", str(out), "--project", "filling")
    warm = cli(state, "ls", cwd=src)  # the state directory exists before the disk fills
    assert warm.returncode == 0, warm.stderr
    filler = _fill(small_disk, leave)

    res = cli(state, *args, cwd=src)
    assert "Traceback" not in res.stdout + res.stderr, res.stderr[-3000:]
    if res.returncode != 0:
        line = one_error(res)
        assert "no space left in " + str(small_disk) in line, line
        assert " free)" in line, line
    # Nothing half-done: every record reads, none still runs, gc leaves no cell.
    for record in _records(state, src):
        assert record["status"] != "running", record
        assert record["status"] != "unreadable", record
    gc = cli(state, "gc", "--json", cwd=src)
    assert gc.returncode == 0, gc.stderr[-2000:]
    assert json.loads(gc.stdout)["warnings"] == []
    assert not any((state / "cells").iterdir()), "a cell was left behind"
    if res.returncode != 0:
        assert not out.exists(), "a failed build published outputs"

    # With room again, the next build succeeds and everything before it still reads.
    filler.unlink()
    again = cli(state, *args, cwd=src)
    assert again.returncode == 0, again.stderr[-2000:]
    statuses = [r["status"] for r in _records(state, src)]
    assert statuses[0] == "succeeded"
    assert (out / "dist" / "ok").read_text() == "ok\n"
    leftovers = [
        p.name for p in (state / "builds").iterdir() if p.name.startswith(".") or p.is_file()
    ]
    assert leftovers == [], leftovers
