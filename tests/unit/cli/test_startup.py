"""``buildcell run`` starts in a few tens of milliseconds of Python: the modules it needs
and no more. A command without a policy, a spec, a network or a terminal never loads the
policy engine, the YAML parser, pydantic or rich (each costs milliseconds to import)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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


def test_a_plain_run_loads_no_more_than_it_needs(state_root: Path, tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-c", _PROBE],
        cwd=tmp_path,
        env=cli_env(state_root / "state"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    shown = json.loads(res.stdout.splitlines()[-1])
    assert shown["code"] == 0, res.stderr[-2000:]
    loaded = [m for m in shown["modules"] if m.split(".")[0] in ("yaml", "rich", "pydantic",
              "celpy", "lark", "buildcell")]  # fmt: skip
    heavy = [m for m in loaded for p in _NOT_ON_RUN if m == p or m.startswith(p + ".")]
    assert not heavy, heavy
