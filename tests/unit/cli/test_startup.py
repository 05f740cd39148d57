"""``buildcell run`` starts in a few tens of milliseconds of Python: the modules it needs
and no more. A command without a policy, a spec, a network or a terminal never loads the
policy engine, the YAML parser, pydantic or rich (each costs milliseconds to import)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import cli_env

_PROBE = """
import json, sys
from buildcell.cli.commands import main
code = None
try:
    code = main(["run", "-q", "--", "true"])
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""

#: What a plain ``run`` must not import (module name prefixes).
_NOT_ON_RUN = ("yaml", "rich", "pydantic", "celpy", "lark", "buildcell.build.policy",
               "buildcell.build.spec", "buildcell.build.runner", "buildcell.egress",
               "buildcell.supply.images", "buildcell.cell.terminal")  # fmt: skip


def _modules_after(probe: str, *args: str, state_root: Path, cwd: Path) -> list[str]:
    """The modules a command (``probe`` in a fresh interpreter) had loaded once done."""
    res = subprocess.run(
        [sys.executable, "-c", probe, *args],
        cwd=cwd,
        env=cli_env(state_root / "state"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    shown = json.loads(res.stdout.splitlines()[-1])
    assert shown["code"] == 0, res.stderr[-2000:]
    modules: list[str] = shown["modules"]
    return modules


def test_a_plain_run_loads_no_more_than_it_needs(state_root: Path, tmp_path: Path) -> None:
    modules = _modules_after(_PROBE, state_root=state_root, cwd=tmp_path)
    loaded = [m for m in modules if m.split(".")[0] in ("yaml", "rich", "pydantic",
              "celpy", "lark", "buildcell")]  # fmt: skip
    heavy = [m for m in loaded for p in _NOT_ON_RUN if m == p or m.startswith(p + ".")]
    assert not heavy, heavy


_BUILD_PROBE = """
import json, sys
from buildcell.cli.commands import main
code = main(["build", "-q", "-f", sys.argv[1], "--out", sys.argv[2]])
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def test_a_build_without_a_signing_key_never_loads_the_cryptography_library(
    state_root: Path, tmp_path: Path
) -> None:
    spec = tmp_path / "buildcell.yaml"
    spec.write_text("version: 1\nname: tiny\nsteps:\n  - name: one\n    run: echo hi > out.txt\n"
                    "outputs:\n  - out.txt\n")  # fmt: skip
    modules = _modules_after(
        _BUILD_PROBE, str(spec), str(tmp_path / "out"), state_root=state_root, cwd=tmp_path
    )
    assert "buildcell.supply.provenance" in modules  # the statement is made
    assert not [m for m in modules if m.split(".")[0] == "cryptography"]


def test_no_installed_package_s_pydantic_plugin_is_loaded_into_the_command(
    state_root: Path, tmp_path: Path
) -> None:
    """An installed distribution declaring a ``pydantic`` entry point would have its code
    run by the first model pydantic builds: the command turns plugins off."""
    flag = tmp_path / "plugin-ran"
    site = tmp_path / "site"
    (site / "evil-1.0.dist-info").mkdir(parents=True)
    (site / "evil-1.0.dist-info" / "METADATA").write_text("Name: evil\nVersion: 1.0\n")
    (site / "evil-1.0.dist-info" / "entry_points.txt").write_text(
        "[pydantic]\nevil = evilplugin:plugin\n"
    )
    (site / "evilplugin.py").write_text(f"open({str(flag)!r}, 'w').close()\nplugin = object()\n")
    env = cli_env(state_root / "state")
    env["PYTHONPATH"] = f"{site}:{env.get('PYTHONPATH', '')}"
    env.pop("PYDANTIC_DISABLE_PLUGINS", None)
    # Without the command, a model of pydantic's does load it: the attack is real.
    subprocess.run(
        [sys.executable, "-W", "ignore", "-c",
         "from pydantic import BaseModel\nclass M(BaseModel):\n    x: int"],
        env=env, check=False, capture_output=True, timeout=60,
    )  # fmt: skip
    assert flag.exists()  # (it then fails, being no plugin: its code has run by then)
    flag.unlink()
    res = subprocess.run(
        [sys.executable, "-m", "buildcell", "schema"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout)["title"]
    assert not flag.exists()


@pytest.mark.parametrize("closed", ["stdout", "stdin", "stderr"])
def test_a_closed_standard_stream_is_dev_null_not_the_first_file_opened(
    state_root: Path, tmp_path: Path, closed: str
) -> None:
    """``buildcell run ... >&-``: the command succeeds, the cell's output goes nowhere,
    and none of the state directory's files takes the closed stream's number."""
    src = tmp_path / "src"
    src.mkdir()
    src.chmod(0o755)
    redirect = {"stdin": "<&-", "stdout": ">&-", "stderr": "2>&-"}[closed]
    marker = "OUTPUT-OF-THE-CELL"
    res = subprocess.run(
        ["/bin/sh", "-c", f'exec "$@" {redirect}', "sh", sys.executable, "-m", "buildcell",
         "run", "--source", str(src), "--", "/bin/sh", "-c", f"echo {marker}; echo {marker} >&2"],
        env=cli_env(state_root / "state"), capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    state = state_root / "state"
    for f in state.rglob("*"):
        if f.is_file() and f.name not in ("run.log", "events.jsonl", "record.json"):
            assert marker.encode() not in f.read_bytes(), f
    for record in state.rglob("record.json"):
        assert json.loads(record.read_text())["status"] == "succeeded"
