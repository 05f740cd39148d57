"""``buildcell run`` as a library call: one command, admitted like a build, in one cell."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from buildcell.build.admission import check_policy, command_spec
from buildcell.errors import Error, PolicyError
from buildcell.events import EventLog
from buildcell.settings import DEFAULT_LOG_MAX_SIZE

if TYPE_CHECKING:
    from buildcell.build.invocation import Invocation
    from buildcell.build.policy import Policy
    from buildcell.cell.config import CellConfig
    from buildcell.cell.supervisor import CellResult
    from buildcell.state import StateDir
    from buildcell.supply.records import BuildRecord, RecordStore

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
    log_max_size: int = DEFAULT_LOG_MAX_SIZE,
) -> CellResult:
    """Check ``config`` against the operator's policies, then run it in a fresh cell and
    collect its outputs; the cell is gone when this returns.

    The policies see the command as a one-step spec of what the cell will be
    (:func:`~buildcell.build.admission.command_spec`). The run is recorded like a build
    (``kind: run``, one step named ``run``): ``buildcell ls`` lists it, ``show`` and
    ``logs`` show it, its events are in its record too.

    Raises:
        PolicyError: a policy denies it; nothing ran.
        Error: the cell could not be set up (see :func:`buildcell.run_cell`).
    """
    from buildcell.cell import _spawn
    from buildcell.cell.supervisor import Cell
    from buildcell.state import StateDir
    from buildcell.supply.records import RecordStore

    state = state or StateDir()
    store = RecordStore(state.root / "builds")
    log = _RunLog(max_bytes=log_max_size)
    out, err = stdout or _spawn.fd_writer(1), stderr or _spawn.fd_writer(2)
    cell = Cell(config, state=state, events=events, stdout=log.tee(out), stderr=log.tee(err))
    record = _run_record(cell.cell_id, config, invocation)
    record_dir = store.create(record, "")
    log.open(store.log_path(record.id, "run"))
    trail = EventLog(record_dir / "events.jsonl", build=cell.cell_id)
    cell.events.subscribe(trail.append)
    if events is not None:
        events.build = cell.cell_id
    step = record.steps[0]
    try:
        with trail:
            if policies:
                check_policy(policies, command_spec(config), invocation, emit=cell.events.emit)
            step.status, step.started = "running", time.time()
            store.save(record)
            with cell:
                result = cell.run()
                cell.collect()
            step.exit_code, step.reason = result.exit_code, result.reason
            step.status = "succeeded" if result.exit_code == 0 else "failed"
            record.status, record.exit_code = step.status, result.exit_code
            if result.outputs is not None:
                record.outputs = [
                    {"path": o.path, "sha256": o.sha256, "size": o.size}
                    for o in result.outputs.collected
                ]
            trail.check()
    except Error as e:
        record.status = "denied" if isinstance(e, PolicyError) else "error"
        record.error, record.exit_code = e.message, e.exit_code
        raise
    except BaseException:
        record.status = "interrupted"
        raise
    finally:
        log.close()
        _finish(store, record, failing=sys.exc_info()[1] is not None)
    return result


def _run_record(cell_id: str, config: CellConfig, invocation: Invocation) -> BuildRecord:
    from buildcell.supply.records import BuildRecord, StepRecord

    argv = [str(a) for a in config.argv]
    return BuildRecord(
        id=cell_id,
        name="run",
        spec_path="",
        spec_digest="sha256:" + hashlib.sha256(json.dumps(argv).encode()).hexdigest(),
        steps=[StepRecord("run", limits=config.limits.to_dict())],
        rootfs=config.rootfs.describe(),
        out_dir=str(config.resolved_out_dir()) if config.outputs else None,
        project=invocation.project,
        trust=invocation.trust,
        ref=invocation.ref,
        invocation=invocation.to_parameters(),
        kind="run",
        command=argv,
    )


def _finish(store: RecordStore, record: BuildRecord, *, failing: bool) -> None:
    step = record.steps[0]
    if step.started is not None:
        step.duration = time.time() - step.started
    store.finish(record, failing=failing)


class _RunLog:
    """The run's output, kept in its record up to ``max_bytes`` (as a build step's is);
    a log that cannot be written stops being written, and the run goes on."""

    def __init__(self, *, max_bytes: int) -> None:
        self._lock = threading.Lock()
        self._left = max_bytes
        self._fd: int | None = None

    def open(self, path: Path) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            self._fd = os.open(path, flags, 0o600)
        except OSError as e:
            from buildcell.state import write_failure

            raise write_failure(path, e, what="the log of the run") from e

    def tee(self, sink: Callable[[bytes], None]) -> Callable[[bytes], None]:
        def write(data: bytes) -> None:
            self._keep(data)
            sink(data)

        return write

    def _keep(self, data: bytes) -> None:
        with self._lock:
            if self._fd is None or self._left <= 0:
                return
            kept = data[: self._left]
            self._left -= len(kept)
            try:
                view = memoryview(kept)
                while view:
                    view = view[os.write(self._fd, view) :]
            except OSError:
                os.close(self._fd)
                self._fd = None

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
