"""buildcell: run every build in its own ephemeral, least-privilege cell.

The public API::

    from buildcell import CellConfig, run_cell
    result = run_cell(CellConfig(argv=("make",), source=Path("."), outputs=("hello",)))

    from buildcell import load_spec, run_build
    result = run_build(load_spec(Path("buildcell.yaml")), out_dir=Path("buildcell-out"))

    from buildcell import verify
    report = verify(Path("provenance.intoto.jsonl"), key=load_public_key(Path("k.pub")))

Everything else is private to the package and may change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "BuildOptions",
    "BuildResult",
    "Cell",
    "CellConfig",
    "CellResult",
    "DirRootfs",
    "Error",
    "EventLog",
    "HostRootfs",
    "Invocation",
    "Limits",
    "OciRootfs",
    "__version__",
    "check_policy",
    "load_policy",
    "load_public_key",
    "load_spec",
    "run_build",
    "run_cell",
    "run_command",
    "verify",
]

if TYPE_CHECKING:
    from buildcell.build.admission import check_policy
    from buildcell.build.command import run_command
    from buildcell.build.invocation import Invocation
    from buildcell.build.policy import load_policy
    from buildcell.build.runner import BuildOptions, BuildResult, run_build
    from buildcell.build.spec import load_spec
    from buildcell.cell import (
        Cell,
        CellConfig,
        CellResult,
        DirRootfs,
        HostRootfs,
        Limits,
        OciRootfs,
        run_cell,
    )
    from buildcell.errors import Error
    from buildcell.events import EventLog
    from buildcell.supply.provenance import load_public_key, verify

_LAZY = {
    "Cell": "buildcell.cell",
    "CellConfig": "buildcell.cell",
    "CellResult": "buildcell.cell",
    "DirRootfs": "buildcell.cell",
    "HostRootfs": "buildcell.cell",
    "Limits": "buildcell.cell",
    "OciRootfs": "buildcell.cell",
    "run_cell": "buildcell.cell",
    "BuildOptions": "buildcell.build.runner",
    "BuildResult": "buildcell.build.runner",
    "run_build": "buildcell.build.runner",
    "check_policy": "buildcell.build.admission",
    "run_command": "buildcell.build.command",
    "Invocation": "buildcell.build.invocation",
    "load_policy": "buildcell.build.policy",
    "load_spec": "buildcell.build.spec",
    "verify": "buildcell.supply.provenance",
    "load_public_key": "buildcell.supply.provenance",
    "Error": "buildcell.errors",
    "EventLog": "buildcell.events",
}


def __getattr__(name: str) -> Any:
    # Lazy so that `buildcell --help` and `buildcell run` import only what they use.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'buildcell' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
