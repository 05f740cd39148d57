"""A supervisor killed with SIGKILL at a random moment of a build: the state stays readable,
the next ``gc`` (or ``ls``) finalizes the record on disk, and the next build succeeds.

``make test`` runs a few trials; ``make stress`` runs fifty (``BUILDCELL_KILL_TRIALS``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

import pytest
from tests.conftest import cli_env
from tests.reliability.conftest import cli

TRIALS = int(os.environ.get("BUILDCELL_KILL_TRIALS", "3"))
SEED = int(os.environ.get("BUILDCELL_KILL_SEED", "20261207"))

SPEC = """\
version: 1
name: killed
steps:
  - name: one
    run: sleep 0.2; mkdir -p out; for i in $(seq 1 20); do echo "one $i" > out/one-$i; done
  - name: two
    run: sleep 0.3; head -c 262144 /dev/urandom > out/two
  - name: three
    run: sleep 0.2; echo three > out/three
outputs: ["out/*"]
"""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _out_dir_problem(out: Path) -> str | None:
    """The output directory holds one build's files, all of them, as its manifest says."""
    if not out.exists():
        return None
    manifest = json.loads((out / "outputs.json").read_text())
    listed = {o["path"]: o["sha256"] for o in manifest["outputs"]}
    own = {"outputs.json", "provenance.intoto.jsonl", "provenance.sigstore.json"}
    present = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - own
    if present != set(listed):
        return f"files {sorted(present ^ set(listed))[:3]} are not as the manifest lists"
    for rel, digest in listed.items():
        if _sha256(out / rel) != digest:
            return f"{rel} does not match its digest in outputs.json"
    return None


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(TRIALS))
def test_a_supervisor_killed_at_a_random_moment(work: Path, trial: int) -> None:
    rng = random.Random(SEED + trial)
    tmp_path = work
    src = tmp_path / "src"
    src.mkdir(mode=0o755)
    (src / "buildcell.yaml").write_text(SPEC)
    state = tmp_path / "state"
    out = tmp_path / "out"
    args = ("build", "--out", str(out), "--project", "killed")
    # A first build that completes: the output directory then holds its files, which a
    # killed build must leave whole.
    first = cli(state, *args, cwd=src)
    assert first.returncode == 0, first.stderr[-2000:]
    before = (out / "outputs.json").read_bytes()

    delay = rng.uniform(0.0, 1.2)
    proc = subprocess.Popen(
        [sys.executable, "-m", "buildcell", *args],
        cwd=src,
        env=cli_env(state),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # A random moment of the build: once its record exists (the interpreter's start-up
    # takes longer on a loaded machine), then up to the length of its steps.
    deadline = time.monotonic() + 30
    while len(list((state / "builds").iterdir())) < 2 and proc.poll() is None:
        assert time.monotonic() < deadline, "the second build never started"
        time.sleep(0.005)
    time.sleep(delay)
    finished_first = proc.poll() is not None
    if not finished_first:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)

    # Readable straight away, with no crash: ls and show finalize on read.
    ls = cli(state, "ls", "--json", "--project", "killed", cwd=src)
    assert ls.returncode == 0, ls.stderr[-2000:]
    records = cast("list[dict[str, Any]]", json.loads(ls.stdout))
    assert len(records) == 2, records
    latest = records[0]
    assert latest["status"] in ("succeeded", "interrupted"), latest
    show = cli(state, "show", latest["id"], "--json", "--project", "killed", cwd=src)
    assert show.returncode == 0, show.stderr[-2000:]
    shown = json.loads(show.stdout)
    assert all(s["status"] != "running" for s in shown["steps"]), shown["steps"]

    gc = cli(state, "gc", "--json", cwd=src)
    assert gc.returncode == 0, gc.stderr[-2000:]
    assert not list((state / "cells").iterdir()), "gc left a cell behind"
    on_disk = json.loads((state / "builds" / latest["id"] / "record.json").read_text())
    assert on_disk["status"] == latest["status"], "the record was not finalized on disk"
    assert all(s["status"] not in ("running", "pending") for s in on_disk["steps"])

    problem = _out_dir_problem(out)
    assert problem is None, problem
    if latest["status"] == "interrupted":
        assert (out / "outputs.json").read_bytes() == before, "a killed build published"

    again = cli(state, *args, cwd=src)
    assert again.returncode == 0, again.stderr[-2000:]
    assert _out_dir_problem(out) is None
    # The staging directory a killed build left next to the output is gone too.
    assert [p.name for p in tmp_path.iterdir() if ".buildcell-" in p.name] == []
