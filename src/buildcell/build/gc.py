"""``buildcell gc``: remove what supervisors that died left in the state directory.

A supervisor killed with SIGKILL cannot clean up, but its cells die with it (death
signals); what remains on disk is its cell directory, and possibly cgroups. Each cell
directory records its supervisor (pid and start time, so a reused pid is not mistaken
for it), its cgroups and its processes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from buildcell.cell.limits import remove_stale_cgroup
from buildcell.state import StateDir, process_start_time
from buildcell.trees import remove_tree

__all__ = ["GcReport", "collect_garbage"]

_CELL_CGROUP = re.compile(r"^([0-9a-f]{8})\.(\d{8}T\d{6}-[0-9a-f]{8})$")
#: A cell directory without its record is being created; leave it alone this long.
_GRACE_SECONDS = 60.0
#: A partial download untouched for this long belongs to a fetch that died.
_PARTIAL_SECONDS = 600.0


@dataclass
class GcReport:
    removed: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)
    killed: int = 0
    cgroups_removed: int = 0
    failed: list[str] = field(default_factory=list)
    leftovers: int = 0
    caches_expired: int = 0
    #: builds whose supervisor was gone, now recorded as interrupted
    finalized: list[str] = field(default_factory=list)
    #: one line each: what gc could not read and left alone
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "removed": self.removed,
            "busy": self.busy,
            "killed": self.killed,
            "cgroups_removed": self.cgroups_removed,
            "failed": self.failed,
            "leftovers": self.leftovers,
            "caches_expired": self.caches_expired,
            "finalized": self.finalized,
            "warnings": self.warnings,
        }

    def summary(self) -> str:
        parts = [f"removed {len(self.removed)} abandoned cell(s)"]
        if self.killed:
            parts.append(f"killed {self.killed} leftover process(es)")
        if self.cgroups_removed:
            parts.append(f"removed {self.cgroups_removed} cgroup(s)")
        if self.leftovers:
            parts.append(f"removed {self.leftovers} leftover(s) of interrupted builds")
        if self.caches_expired:
            parts.append(f"expired {self.caches_expired} cache generation(s) or work copies")
        if self.finalized:
            parts.append(f"recorded {len(self.finalized)} dead build(s) as interrupted")
        parts.append(f"{len(self.busy)} still running")
        if self.failed:
            parts.append("could not remove: " + ", ".join(self.failed))
        return "; ".join(parts)


def _alive(entry: dict[str, Any]) -> bool:
    pid, start = entry.get("pid"), entry.get("start")
    return isinstance(pid, int) and start is not None and process_start_time(pid) == start


def collect_garbage(state: StateDir, *, cache_max_age: float | None = None) -> GcReport:
    """Remove every cell whose supervisor is gone, and expired caches; return what was done.

    Args:
        cache_max_age: build caches unused for longer than this many seconds are removed
            (default: the configuration file's ``caches.max_age``).
    """
    report = GcReport()
    live_cgroups: set[str] = set()
    for cell_dir in sorted(state.cells.iterdir()):
        record_path = cell_dir / "cell.json"
        try:
            record = json.loads(record_path.read_text())
        except FileNotFoundError:
            age = time.time() - cell_dir.lstat().st_mtime
            if age < _GRACE_SECONDS:
                report.busy.append(cell_dir.name)
                continue
            record = {}
        except (OSError, ValueError):
            record = {}
        if _alive(record.get("supervisor", {})):
            report.busy.append(cell_dir.name)
            live_cgroups.update(record.get("cgroups", []))
            continue
        for proc in record.get("processes", []):
            if _alive(proc):
                try:
                    os.kill(proc["pid"], signal.SIGKILL)
                    report.killed += 1
                except ProcessLookupError:
                    pass
        for cg in record.get("cgroups", []):
            if Path(cg).exists() and remove_stale_cgroup(Path(cg)):
                report.cgroups_removed += 1
        remove_tree(cell_dir)
        if cell_dir.exists():
            report.failed.append(cell_dir.name)
        else:
            report.removed.append(cell_dir.name)
    report.cgroups_removed += _orphan_cgroups(state, live_cgroups)
    report.leftovers = _build_leftovers(state, report)
    from buildcell.supply.caches import expire_caches

    if cache_max_age is None:
        from buildcell.settings import load_settings

        cache_max_age = load_settings(host=state.host).cache_max_age
    report.caches_expired = len(expire_caches(state.caches, max_age_seconds=cache_max_age))
    return report


def _build_leftovers(state: StateDir, report: GcReport) -> int:
    """What an interrupted build leaves besides its cell: the output staging directory,
    the second tree of a reproducibility check, partial downloads in the store, and build
    directories that were never completed. Records of dead supervisors are finalized;
    unreadable ones are left alone, with a warning."""
    from buildcell.supply.records import RecordStore, UnreadableRecord

    removed = 0
    builds = state.root / "builds"
    running: set[str] = set()
    if builds.is_dir():
        records = RecordStore(builds)
        for record in records.recent(limit=10**9):
            if isinstance(record, UnreadableRecord):
                report.warnings.append(
                    f"build {record.id}: unreadable, left alone: {record.reason}"
                )
                running.add(record.id)  # what it left cannot be told apart: keep it
                continue
            if record.status == "running":
                running.add(record.id)
            elif (builds / record.id / "staging").exists():
                remove_tree(builds / record.id / "staging")
                removed += 1
        report.finalized.extend(records.finalized)
        removed += _unfinished_build_dirs(builds)
    repro = state.root / "repro"
    if repro.is_dir():
        for scratch in repro.iterdir():
            if scratch.name not in running:
                remove_tree(scratch)
                removed += 1
    store = state.root / "cas" / "sha256"
    if store.is_dir():
        cutoff = time.time() - _PARTIAL_SECONDS
        for fan in store.iterdir():
            for entry in fan.iterdir() if fan.is_dir() else ():
                # Partial downloads are dot-files that a live fetch keeps writing to.
                if entry.name.startswith(".") and entry.lstat().st_mtime < cutoff:
                    entry.unlink(missing_ok=True)
                    removed += 1
    return removed


def _unfinished_build_dirs(builds: Path) -> int:
    """Build directories a build that died was still making (``.new-ID``), and temp files
    of records it was writing."""
    removed = 0
    cutoff = time.time() - _GRACE_SECONDS
    for entry in builds.iterdir():
        try:
            young = entry.lstat().st_mtime >= cutoff
        except FileNotFoundError:
            continue
        if entry.name.startswith(".new-") and not young:
            remove_tree(entry)
            removed += 1
        elif entry.is_dir() and not entry.is_symlink():
            for tmp in entry.glob(".record.json.*.tmp"):
                if tmp.lstat().st_mtime < cutoff:
                    tmp.unlink(missing_ok=True)
                    removed += 1
    return removed


def _orphan_cgroups(state: StateDir, live_cgroups: set[str]) -> int:
    """Cgroups of this state directory's cells that no live cell records.

    Young ones are left alone: a cell records its cgroup just after creating it.
    """
    from buildcell.cell.supervisor import limits_backend

    removed = 0
    tag = state.tag
    for parent in limits_backend(state.host).parents.values():
        if not parent.is_dir():
            continue
        for child in parent.iterdir():
            match = _CELL_CGROUP.match(child.name)
            if (
                child.is_dir()
                and match
                and match.group(1) == tag
                and str(child) not in live_cgroups
                and time.time() - child.stat().st_mtime > _GRACE_SECONDS
                and remove_stale_cgroup(child)
            ):
                removed += 1
    return removed
