"""The cell: an ephemeral, least-privilege sandbox for one command."""

from buildcell.cell.config import CellConfig, DirRootfs, HostRootfs, Limits, parse_rootfs
from buildcell.cell.supervisor import Cell, CellResult, TeardownReport, run_cell

__all__ = [
    "Cell",
    "CellConfig",
    "CellResult",
    "DirRootfs",
    "HostRootfs",
    "Limits",
    "TeardownReport",
    "parse_rootfs",
    "run_cell",
]
