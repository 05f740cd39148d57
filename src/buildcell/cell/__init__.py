"""The cell: an ephemeral, least-privilege sandbox for one command."""

from buildcell.cell.config import (
    Bind,
    CellConfig,
    DirRootfs,
    HostRootfs,
    Limits,
    OciRootfs,
    parse_rootfs,
)
from buildcell.cell.supervisor import Cell, CellResult, TeardownReport, run_cell

__all__ = [
    "Bind",
    "Cell",
    "CellConfig",
    "CellResult",
    "DirRootfs",
    "HostRootfs",
    "Limits",
    "OciRootfs",
    "TeardownReport",
    "parse_rootfs",
    "run_cell",
]
