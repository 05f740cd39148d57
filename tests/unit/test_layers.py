"""The package's layers: every import points down (docs/architecture.md).

    cli      parse, call, render
    build    admission, orchestration, the provenance statement
    cell     the sandbox (composes egress and supply: a cell runs its egress, collects)
    egress   one cell's network          supply   repository and artifact data
    base     the modules at the top of the package: errors, settings, events, ...

A module may import its own package and the layers below it; egress and supply, side by
side, do not import each other. Imports inside functions and under TYPE_CHECKING count
too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"

#: Layer of each package; top-level modules are the base.
RANKS = {"base": 0, "egress": 1, "supply": 1, "cell": 2, "build": 3, "cli": 4}
#: The package's face re-exports names lazily from every layer.
FACES = {"buildcell", "buildcell.__main__"}


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 2 and parts[1] in RANKS:
        return parts[1]
    if len(parts) == 2 and parts[1] in RANKS:
        return parts[1]  # the package itself (its __init__)
    return "base"


def _module_name(path: Path, src: Path) -> str:
    rel = path.relative_to(src).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(src: Path, name: str) -> bool:
    where = src.joinpath(*name.split("."))
    return where.with_suffix(".py").is_file() or (where / "__init__.py").is_file()


def _imports(path: Path, module: str, src: Path) -> set[str]:
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("buildcell"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.startswith("buildcell"):
                # ``from buildcell.cell import seccomp`` imports a module of that package;
                # ``from buildcell.cell import Cell`` imports the package.
                names = [f"{target}.{a.name}" for a in node.names]
                modules = [name for name in names if _is_module(src, name)]
                found.update(modules or [target])
    return found


def violations(src: Path) -> list[str]:
    """Every import in the ``buildcell`` package under ``src`` that points the wrong way."""
    problems: list[str] = []
    for path in sorted((src / "buildcell").rglob("*.py")):
        module = _module_name(path, src)
        if module in FACES:
            continue
        mine = _layer(module)
        for target in sorted(_imports(path, module, src)):
            theirs = _layer(target)
            if theirs == mine:
                continue
            if RANKS[theirs] >= RANKS[mine]:
                problems.append(f"{module} ({mine}) imports {target} ({theirs})")
    return problems


def test_every_import_points_down() -> None:
    problems = violations(SRC)
    assert not problems, "imports against the layers (docs/architecture.md):\n" + "\n".join(
        problems
    )


@pytest.mark.parametrize(
    ("where", "line"),
    [
        ("buildcell/errors.py", "from buildcell.cell import supervisor"),  # base -> cell
        ("buildcell/supply/x.py", "from buildcell.egress import proxy"),  # side by side
        ("buildcell/cell/x.py", "import buildcell.build.runner"),  # cell -> build
        ("buildcell/egress/x.py", "from ..cell.netns import Listener"),  # relative, upward
        ("buildcell/build/x.py", "from buildcell import cli"),  # build -> cli
    ],
)
def test_a_wrong_way_import_is_caught(tmp_path: Path, where: str, line: str) -> None:
    for package in ("buildcell", *(f"buildcell/{p}" for p in RANKS if p != "base")):
        (tmp_path / package).mkdir(parents=True, exist_ok=True)
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / where).write_text(f"def f():\n    {line}\n")
    assert len(violations(tmp_path)) == 1


def test_downward_imports_pass(tmp_path: Path) -> None:
    for package in ("buildcell", "buildcell/cli", "buildcell/build", "buildcell/cell"):
        (tmp_path / package).mkdir(parents=True, exist_ok=True)
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "buildcell/cli/x.py").write_text("from buildcell.build import runner\n")
    (tmp_path / "buildcell/build/y.py").write_text("from buildcell.cell import supervisor\n")
    (tmp_path / "buildcell/cell/z.py").write_text("from buildcell import errors\n")
    assert violations(tmp_path) == []


#: Intent is data: the spec and the policy know nothing of how a build is carried out.
DATA_MODULES = ("buildcell.build.spec", "buildcell.build.policy")


@pytest.mark.parametrize("module", DATA_MODULES)
def test_the_spec_and_the_policy_are_data(module: str) -> None:
    path = SRC.joinpath(*module.split(".")).with_suffix(".py")
    lower = {
        target
        for target in _imports(path, module, SRC)
        if _layer(target) in ("cell", "egress", "supply")
    }
    assert not lower, f"{module} imports {sorted(lower)}"
