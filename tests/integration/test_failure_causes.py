"""A step ended by a limit says which, in words, in the step line and the summary."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import RunCLI, root_only


def _build(bc: RunCLI, tmp_path: Path, step: str, limits: str) -> tuple[str, str, dict[str, Any]]:
    proj = tmp_path / "p"
    proj.mkdir()
    (proj / "buildcell.yaml").write_text(
        f"version: 1\nname: limited\nlimits: {limits}\nsteps:\n  - name: s\n    run: {step}\n"
    )
    res = bc("build", cwd=proj, timeout=120)
    assert res.returncode not in (0, 125), res.stderr[-2000:]
    shown = bc("show", "--json", json.loads(bc("ls", "--json", cwd=proj).stdout)[0]["id"], cwd=proj)
    return res.stdout, res.stderr, json.loads(shown.stdout)


def test_a_timeout_says_so(bc: RunCLI, tmp_path: Path) -> None:
    out, err, shown = _build(bc, tmp_path, "'sleep 30'", "{timeout: 1s}")
    assert "[s] failed (exit 124: timed out after 1s)" in err
    assert "timed out after 1s" in out  # the summary table
    steps = shown["steps"]
    assert isinstance(steps, list) and steps[0]["reason"] == "timeout"


@root_only
def test_out_of_memory_says_so_with_the_limit(bc: RunCLI, tmp_path: Path) -> None:
    hog = "'python3 -c \"b = bytearray(256 << 20); print(len(b))\"'"
    out, err, shown = _build(bc, tmp_path, hog, "{memory: 64MiB}")
    assert "killed: out of memory (limit 64.0 MiB)" in err, err[-2000:]
    assert "out of memory" in out
    assert shown["steps"][0]["reason"] == "oom"


@root_only
def test_running_out_of_processes_says_so(bc: RunCLI, tmp_path: Path) -> None:
    forks = "'for i in $(seq 1 64); do sleep 3 & done; wait'"
    out, err, shown = _build(bc, tmp_path, forks, "{pids: 16}")
    assert "out of processes: forks were refused (limit 16)" in err, err[-2000:]
    assert "out of processes" in out
    assert shown["steps"][0]["reason"] == "pids"


def test_a_full_disk_budget_says_so(bc: RunCLI, tmp_path: Path) -> None:
    fill = "'head -c 16777216 /dev/zero > big'"
    out, err, shown = _build(bc, tmp_path, fill, "{disk: 4MiB}")
    assert "out of disk: the workspace is full (limit 4.0 MiB)" in err, err[-2000:]
    assert "out of disk" in out
    assert shown["steps"][0]["reason"] == "disk"


def test_a_command_that_fails_on_its_own_gets_no_cause(bc: RunCLI, tmp_path: Path) -> None:
    out, err, shown = _build(bc, tmp_path, "'exit 3'", "{timeout: 1m}")
    assert "[s] failed (exit 3) in" in err
    assert "out of" not in out + err and "timed out" not in out + err
    assert shown["steps"][0]["reason"] == "exited"


@pytest.mark.parametrize(
    ("seconds", "text"), [(1, "1s"), (90, "1m30s"), (600, "10m"), (5400, "1h30m"), (0, "0s")]
)
def test_durations_read_as_a_spec_writes_them(seconds: float, text: str) -> None:
    from buildcell.cli.console import _seconds

    assert _seconds(seconds) == text


def test_quiet_build_prints_one_line_and_what_failed(bc: RunCLI, tmp_path: Path) -> None:
    proj = tmp_path / "q"
    proj.mkdir()
    (proj / "buildcell.yaml").write_text(
        "version: 1\nname: quiet\nsteps:\n  - {name: a, run: 'echo chatty'}\n"
        "  - {name: b, run: 'echo noisy; exit 4'}\n"
    )
    res = bc("build", "-q", cwd=proj)
    assert res.returncode == 4
    assert "chatty" not in res.stdout + res.stderr and "noisy" not in res.stdout
    (line,) = res.stdout.splitlines()
    assert re.fullmatch(r"quiet \S+: failed in [0-9.]+s \(exit 4\)", line), line
    assert "[b] failed (exit 4) in" in res.stderr
    assert "[a]" not in res.stderr


def test_an_output_that_matches_nothing_fails_the_build(bc: RunCLI, tmp_path: Path) -> None:
    proj = tmp_path / "o"
    proj.mkdir()
    spec = (
        "version: 1\nname: outs\nsteps:\n  - {name: a, run: 'mkdir -p dist && echo x > dist/a'}\n"
        "outputs: ['dist/*', 'dist/*.whl', {path: 'coverage/*', optional: true}]\n"
    )
    (proj / "buildcell.yaml").write_text(spec)
    res = bc("build", "--json", cwd=proj)
    assert res.returncode == 1, res.stderr[-2000:]
    result = json.loads(res.stdout)
    assert result["status"] == "failed"
    assert "'dist/*.whl' matched no file" in result["error"]
    assert "coverage" not in result["error"]
    assert "optional: true" in result["error"]
    assert not (proj / "buildcell-out").exists(), "a build that failed published outputs"
    # Optional alone: the build succeeds, with a warning for the empty pattern.
    (proj / "buildcell.yaml").write_text(spec.replace("'dist/*.whl', ", ""))
    ok = bc("build", "--json", cwd=proj)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert any("'coverage/*' matched no file" in w for w in json.loads(ok.stdout)["warnings"])
    assert (proj / "buildcell-out" / "dist" / "a").read_text() == "x\n"
