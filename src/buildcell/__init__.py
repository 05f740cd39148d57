"""buildcell: run every build in its own ephemeral, least-privilege cell.

The public API::

    from buildcell import CellConfig, Limits, run_cell
    result = run_cell(CellConfig(argv=("make",), source=Path("."), outputs=("hello",)))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "Cell",
    "CellConfig",
    "CellResult",
    "DirRootfs",
    "Error",
    "EventLog",
    "HostRootfs",
    "Limits",
    "__version__",
    "run_cell",
]

if TYPE_CHECKING:
    from buildcell.cell import Cell, CellConfig, CellResult, DirRootfs, HostRootfs, Limits, run_cell
    from buildcell.errors import Error
    from buildcell.events import EventLog

_LAZY = {
    "Cell": "buildcell.cell",
    "CellConfig": "buildcell.cell",
    "CellResult": "buildcell.cell",
    "DirRootfs": "buildcell.cell",
    "HostRootfs": "buildcell.cell",
    "Limits": "buildcell.cell",
    "run_cell": "buildcell.cell",
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
