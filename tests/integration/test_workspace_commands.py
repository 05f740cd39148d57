"""A command that lives in the workspace (``./ci.sh``, ``/workspace/ci.sh``) runs under every
limit and in every workspace mode: the command is looked up where the cell will see it.

The README's limits example once exited 127 with ``--disk``: the workspace then lives on a
budgeted filesystem that the host-side lookup did not reach.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tests.conftest import IS_ROOT, UNPRIVILEGED, RootlessCLI, RunCLI

#: Each test runs with the copy and with the copy-on-write overlay.
pytestmark = pytest.mark.workspaces

SCRIPT = '#!/bin/sh\necho "ci.sh ran in $(pwd) as $(id -u)"\n'
RAN = "ci.sh ran in /workspace as 1000"

LIMITS = {
    "memory": ("--memory", "1G"),
    "pids": ("--pids", "256"),
    "cpus": ("--cpus", "1.5"),
    "disk": ("--disk", "2G"),
    "timeout": ("--timeout", "10m"),
}
MODES = ("default", "disk", "source")
COMMANDS = ("./ci.sh", "/workspace/ci.sh")
#: The README's limits example, word for word.
README_LIMITS = ("--memory", "1G", "--pids", "256", "--cpus", "1.5", "--disk", "2G",
                 "--timeout", "10m")  # fmt: skip


def _project(base: Path, owner: int | None = None) -> Path:
    """A checkout with an executable ci.sh at its top and another under src/."""
    proj = base / "proj"
    for where in (proj, proj / "src"):
        where.mkdir(parents=True)
        (where / "ci.sh").write_text(SCRIPT)
        (where / "ci.sh").chmod(0o755)
    if owner is not None:
        for path in (proj, proj / "src", proj / "ci.sh", proj / "src" / "ci.sh"):
            os.chown(path, owner, owner)
    return proj


def _mode_args(mode: str) -> tuple[str, ...]:
    return {"default": (), "disk": ("--disk", "1G"), "source": ("--source", "src")}[mode]


def _args(mode: str, *limits: str) -> tuple[str, ...]:
    """The options of ``mode`` with ``limits`` (``--disk`` once, the limit's value winning)."""
    args = [*_mode_args(mode)]
    for name in limits:
        flag, value = LIMITS[name]
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    return tuple(args)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("limit", sorted(LIMITS))
def test_workspace_command_runs_under_each_limit_and_mode(
    bc: RunCLI, tmp_path: Path, limit: str, mode: str, command: str
) -> None:
    proj = _project(tmp_path)
    res = bc("run", "-q", *_args(mode, limit), "--", command, cwd=proj)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == RAN


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_limits_example_runs_a_workspace_script(
    bc: RunCLI, tmp_path: Path, command: str
) -> None:
    res = bc("run", *README_LIMITS, "--", command, cwd=_project(tmp_path))
    assert res.returncode == 0, res.stderr
    assert RAN in res.stdout


@pytest.mark.parametrize("mode", MODES)
def test_missing_workspace_command_is_127_with_the_hint(
    bc: RunCLI, tmp_path: Path, mode: str
) -> None:
    res = bc("run", *_mode_args(mode), "--", "./nope.sh", cwd=_project(tmp_path))
    assert res.returncode == 127
    lines = res.stderr.splitlines()
    assert lines[0] == "buildcell: error: ./nope.sh: command not found in the cell", lines
    assert "hint: the cell sees only /usr, /bin, /lib*, /workspace" in res.stderr


@pytest.mark.parametrize("mode", MODES)
def test_non_executable_workspace_command_is_126(bc: RunCLI, tmp_path: Path, mode: str) -> None:
    proj = _project(tmp_path)
    for script in (proj / "ci.sh", proj / "src" / "ci.sh"):
        script.chmod(0o644)
    res = bc("run", *_mode_args(mode), "--", "./ci.sh", cwd=proj)
    assert res.returncode == 126, res.stderr
    assert "./ci.sh: not executable in the cell (/workspace/ci.sh is not executable)" in res.stderr


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("mode", MODES)
def test_workspace_command_rootless(bc_rootless: RootlessCLI, mode: str, command: str) -> None:
    base = bc_rootless.home / f"{mode}-{len(command)}"
    base.mkdir()
    owner = UNPRIVILEGED if IS_ROOT else None
    if owner is not None:
        os.chown(base, owner, owner)
    proj = _project(base, owner)
    res = bc_rootless("run", *_args(mode, *sorted(LIMITS)), "--", command, cwd=proj)
    assert res.returncode == 0, res.stderr
    assert RAN in res.stdout
