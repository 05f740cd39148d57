"""The package's face: a small public surface, every name importable, lazily."""

from __future__ import annotations

import subprocess
import sys

import buildcell


def test_every_public_name_resolves() -> None:
    for name in buildcell.__all__:
        assert getattr(buildcell, name) is not None, name


def test_the_library_api_is_the_documented_one() -> None:
    expected = {"run_cell", "run_build", "run_command", "check_policy", "verify", "CellConfig",
                "Error"}  # fmt: skip
    assert expected <= set(buildcell.__all__)


def test_importing_the_package_imports_no_layer() -> None:
    code = (
        "import sys, buildcell\nprint(sorted(m for m in sys.modules if m.startswith('buildcell.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
