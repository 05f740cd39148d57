"""``buildcell run`` as a library call: one command, admitted like a build, in one cell."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from buildcell.build.admission import check_policy, command_spec

if TYPE_CHECKING:
    from buildcell.build.policy import Invocation, Policy
    from buildcell.cell.config import CellConfig
    from buildcell.cell.supervisor import CellResult
    from buildcell.events import EventLog
    from buildcell.state import StateDir

__all__ = ["run_command"]


def run_command(
    config: CellConfig,
    *,
    invocation: Invocation,
    policies: Sequence[Policy] = (),
    state: StateDir | None = None,
    events: EventLog | None = None,
    stdout: Callable[[bytes], None] | None = None,
    stderr: Callable[[bytes], None] | None = None,
) -> CellResult:
    """Check ``config`` against the operator's policies, then run it in a fresh cell and
    collect its outputs; the cell is gone when this returns.

    The policies see the command as a one-step spec of what the cell will be
    (:func:`~buildcell.build.admission.command_spec`).

    Raises:
        PolicyError: a policy denies it; nothing ran.
        Error: the cell could not be set up (see :func:`buildcell.run_cell`).
    """
    from buildcell.cell.supervisor import Cell

    cell = Cell(config, state=state, events=events, stdout=stdout, stderr=stderr)
    if events is not None:
        events.build = cell.cell_id
    if policies:
        check_policy(policies, command_spec(config), invocation, emit=cell.events.emit)
    with cell:
        result = cell.run()
        cell.collect()
    return result
