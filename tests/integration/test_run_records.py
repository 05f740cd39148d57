"""`buildcell run` leaves a record like a build's, and a --check-repro twin is listed
under the build it rebuilt."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

from tests.conftest import RunCLI


def _ls(bc: RunCLI, cwd: Path) -> list[dict[str, Any]]:
    res = bc("ls", "--json", cwd=cwd)
    assert res.returncode == 0, res.stderr
    return cast("list[dict[str, Any]]", json.loads(res.stdout))


def test_a_run_is_recorded_and_listed(bc: RunCLI, tmp_path: Path) -> None:
    (tmp_path / "data.txt").write_text("hello\n")
    ok = bc("run", "--", "sh", "-c", "cat data.txt; echo to-stderr >&2", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    bad = bc("run", "--", "sh", "-c", "exit 7", cwd=tmp_path)
    assert bad.returncode == 7
    listed = _ls(bc, tmp_path)
    assert [r["status"] for r in listed] == ["failed", "succeeded"]
    assert [r["kind"] for r in listed] == ["run", "run"]
    assert listed[0]["exit_code"] == 7
    assert listed[1]["command"] == ["sh", "-c", "cat data.txt; echo to-stderr >&2"]
    logs = bc("logs", listed[1]["id"], cwd=tmp_path)
    assert logs.returncode == 0, logs.stderr
    assert "[run] hello" in logs.stdout and "[run] to-stderr" in logs.stdout
    shown = json.loads(bc("show", listed[1]["id"], "--json", cwd=tmp_path).stdout)
    assert shown["steps"][0]["status"] == "succeeded"
    assert shown["steps"][0]["limits"]["pids"] is not None  # what it ran with
    table = bc("ls", cwd=tmp_path).stdout
    assert "run sh -c 'exit 7'" in table


def test_a_denied_run_is_recorded_as_denied(bc: RunCLI, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "version: 1\nrules:\n  - name: memory-capped\n"
        "    expr: spec.steps.all(s, s.limits.memory != null && s.limits.memory <= 1048576)\n"
    )
    res = bc("run", "--policy", str(policy), "--", "sh", "-c", "true", cwd=tmp_path)
    assert res.returncode == 125, res.stderr
    assert "memory-capped" in res.stderr
    listed = _ls(bc, tmp_path)
    assert listed[0]["status"] == "denied"
    assert listed[0]["steps"][0]["status"] == "skipped"


def test_a_check_repro_twin_is_listed_under_its_build(bc: RunCLI, tmp_path: Path) -> None:
    proj = tmp_path / "p"
    proj.mkdir()
    (proj / "buildcell.yaml").write_text(
        "version: 1\nname: twins\nsteps:\n  - {name: a, run: 'mkdir -p d && echo same > d/f'}\n"
        "outputs: ['d/*']\n"
    )
    res = bc("build", "--check-repro", cwd=proj)
    assert res.returncode == 0, res.stderr[-2000:]
    listed = _ls(bc, proj)
    assert len(listed) == 1, listed  # not two separate successes
    assert listed[0]["reproducible"] is True
    twin = listed[0]["twin"]
    assert twin["twin_of"] == listed[0]["id"] and twin["status"] == "succeeded"
    table = bc("ls", cwd=proj).stdout
    assert "(reproducible)" in table and "its --check-repro rebuild" in table
