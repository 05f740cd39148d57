"""``buildcell gc``: remove what supervisors that died left in the state directory.

A supervisor killed with SIGKILL cannot clean up, but its cells die with it (death
signals); what remains on disk is its cell directory, and possibly cgroups. Each cell
directory records its supervisor (pid and start time, so a reused pid is not mistaken
for it), its cgroups and its processes.

It also keeps the state directory from growing without bound: build records older than
``records.max_age`` or beyond the newest ``records.keep`` (never a running build's, never
one it cannot read), unpacked images not used for ``images.max_age`` (never one a running
build names or an unpack holds locked), layers no remaining image was made from, and
content store entries that no remaining record lists among its inputs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from buildcell.cell.etcdir import sweep as sweep_etc
from buildcell.cell.limits import remove_stale_cgroup
from buildcell.errors import Error
from buildcell.state import StateDir, process_start_time
from buildcell.trees import remove_tree
from buildcell.units import format_size

if TYPE_CHECKING:
    from buildcell.settings import Settings
    from buildcell.supply.records import BuildRecord, Listed

__all__ = ["GcReport", "collect_garbage"]

_CELL_CGROUP = re.compile(r"^([0-9a-f]{8})\.(\d{8}T\d{6}-[0-9a-f]{8})$")
#: A cell directory without its record is being created; leave it alone this long.
_GRACE_SECONDS = 60.0
#: A partial download untouched for this long belongs to a fetch that died.
_PARTIAL_SECONDS = 600.0
_DIGEST_TEXT = re.compile(r"sha256:[0-9a-f]{64}")
_HEX = re.compile(r"[0-9a-f]{64}")


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
    #: build records removed (too old, or beyond the number kept)
    records_removed: list[str] = field(default_factory=list)
    #: unpacked images removed (digests), and layers no image uses any more
    images_removed: list[str] = field(default_factory=list)
    layers_removed: int = 0
    #: content store entries no record references
    cas_removed: int = 0
    #: bytes of disk given back by removing records, images and store entries
    freed: int = 0
    #: why the content store was not cleaned this time, if it was not
    cas_skipped: str | None = None
    #: kept workspaces (``build --keep-failed``) removed, and those a shell was copying
    kept_removed: list[str] = field(default_factory=list)
    kept_busy: list[str] = field(default_factory=list)
    #: prepared /etc copies of a host /etc that has changed since, no cell using them
    etc_removed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "removed": self.removed,
            "busy": self.busy,
            "killed": self.killed,
            "cgroups_removed": self.cgroups_removed,
            "failed": self.failed,
            "leftovers": self.leftovers,
            "etc_removed": self.etc_removed,
            "caches_expired": self.caches_expired,
            "finalized": self.finalized,
            "warnings": self.warnings,
            "records_removed": self.records_removed,
            "images_removed": self.images_removed,
            "layers_removed": self.layers_removed,
            "cas_removed": self.cas_removed,
            "freed": self.freed,
            "cas_skipped": self.cas_skipped,
            "kept_removed": self.kept_removed,
            "kept_busy": self.kept_busy,
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
        if self.records_removed:
            parts.append(f"removed {len(self.records_removed)} old build record(s)")
        if self.images_removed or self.layers_removed:
            parts.append(
                f"removed {len(self.images_removed)} unused image(s) and "
                f"{self.layers_removed} layer(s)"
            )
        if self.cas_removed:
            parts.append(f"removed {self.cas_removed} unreferenced input(s) from the store")
        if self.etc_removed:
            copies = "copy" if self.etc_removed == 1 else "copies"
            parts.append(f"removed {self.etc_removed} outdated /etc {copies}")
        if self.kept_removed:
            parts.append(f"removed {len(self.kept_removed)} kept workspace(s)")
        if self.freed:
            parts.append(f"freed {format_size(self.freed)}")
        parts.append(f"{len(self.busy)} still running")
        if self.failed:
            parts.append("could not remove: " + ", ".join(self.failed))
        return "; ".join(parts)


def _alive(entry: dict[str, Any]) -> bool:
    pid, start = entry.get("pid"), entry.get("start")
    return isinstance(pid, int) and start is not None and process_start_time(pid) == start


@dataclass(frozen=True)
class Retention:
    """How long what ``gc`` may remove is kept; None takes the configuration file's value.

    Attributes:
        cache_max_age: build caches unused for longer (seconds) are removed.
        records_max_age: build records older than this (seconds, from when the build
            finished, or started) are removed.
        records_keep: at most this many records are kept, the newest.
        images_max_age: unpacked images unused for longer (seconds) are removed.
        kept_max_age: kept workspaces (``build --keep-failed``) are removed this long
            after their build at the latest (they go at their record's ``expires``, 7
            days by default, in any case).
    """

    cache_max_age: float | None = None
    records_max_age: float | None = None
    records_keep: int | None = None
    images_max_age: float | None = None
    kept_max_age: float | None = None

    def resolved(self, settings: Settings) -> _Kept:
        """Every value set: ours where given, else the settings'."""
        return _Kept(
            cache_max_age=_first(self.cache_max_age, settings.cache_max_age),
            records_max_age=_first(self.records_max_age, settings.records_max_age),
            records_keep=_first(self.records_keep, settings.records_keep),
            images_max_age=_first(self.images_max_age, settings.image_max_age),
        )


@dataclass(frozen=True)
class _Kept:
    cache_max_age: float
    records_max_age: float
    records_keep: int
    images_max_age: float


def _first(value: Any, default: Any) -> Any:
    return default if value is None else value


def collect_garbage(
    state: StateDir,
    *,
    cache_max_age: float | None = None,
    retention: Retention | None = None,
    now: float | None = None,
) -> GcReport:
    """Remove every cell whose supervisor is gone, expired caches, old build records,
    unused images and unreferenced store entries; return what was done.

    Args:
        cache_max_age: build caches unused for longer than this many seconds are removed
            (default: the configuration file's ``caches.max_age``); overrides
            ``retention.cache_max_age``.
        retention: how long records, images and caches are kept; what it leaves unset
            comes from the configuration file.
        now: the time to measure ages from (default: now).

    Raises:
        ConfigError: the configuration file is malformed.
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
    from buildcell.settings import Settings, load_settings
    from buildcell.supply.caches import expire_caches

    wanted = retention or Retention()
    if cache_max_age is not None:
        wanted = dataclasses.replace(wanted, cache_max_age=cache_max_age)
    settings = Settings() if _complete(wanted) else load_settings(host=state.host)
    keep = wanted.resolved(settings)
    report.caches_expired = len(expire_caches(state.caches, max_age_seconds=keep.cache_max_age))
    _sweep_state(state, keep, report, time.time() if now is None else now)
    # After the records: a kept workspace whose record is gone goes with it.
    from buildcell.build.kept import expire_kept

    kept = expire_kept(state, max_age=wanted.kept_max_age)
    report.kept_removed, report.kept_busy = kept.removed, kept.busy
    return report


def _complete(retention: Retention) -> bool:
    return None not in (
        retention.cache_max_age,
        retention.records_max_age,
        retention.records_keep,
        retention.images_max_age,
    )


def _sweep_state(state: StateDir, keep: _Kept, report: GcReport, now: float) -> None:
    """Old records first, then what only they kept alive: images, then store entries."""
    from buildcell.supply.images import sweep_images
    from buildcell.supply.records import RecordStore, UnreadableRecord

    builds = state.root / "builds"
    listed: list[Listed] = []
    if builds.is_dir():
        store = RecordStore(builds)
        listed = store.recent(limit=10**9)
        doomed = _old_records(listed, keep.records_max_age, keep.records_keep, now)
        for record in doomed:
            size = _disk_use(builds / record.id)
            try:
                store.remove(record.id)
            except Error as e:
                report.failed.append(f"build {record.id}: {e.message}")
                continue
            report.records_removed.append(record.id)
            report.freed += size
        gone = {r.id for r in doomed}
        listed = [r for r in listed if r.id not in gone]
    readable = [r for r in listed if not isinstance(r, UnreadableRecord)]
    running = [r for r in readable if r.status == "running"]
    in_use = _digests(json.dumps([r.rootfs, r.images, r.rootfs_dependency]) for r in running)
    sweep = sweep_images(state.cache, max_age=keep.images_max_age, in_use=in_use, now=now)
    report.images_removed = sweep.images
    report.layers_removed = sweep.layers
    report.leftovers += sweep.leftovers
    report.failed.extend(sweep.failed)
    report.freed += sweep.freed
    report.etc_removed = sweep_etc(state.etc)
    if len(readable) < len(listed):
        # (Its own warning already says gc leaves it alone.)
        report.cas_skipped = "a build record is unreadable: the inputs it lists are unknown"
    elif any(all(step.status == "pending" for step in r.steps) for r in running):
        # Not started a step: it may be fetching inputs that its record does not list yet.
        report.cas_skipped = "a running build may be fetching inputs it has not recorded yet"
    else:
        referenced = {
            str(i.get("sha256", "")).removeprefix("sha256:") for r in readable for i in r.inputs
        }
        _sweep_store(state.root / "cas" / "sha256", referenced, report, now)


def _old_records(listed: list[Listed], max_age: float, keep: int, now: float) -> list[BuildRecord]:
    """The records to remove, newest first: beyond the newest ``keep``, or finished (or
    started) longer than ``max_age`` ago. Running and unreadable ones never are."""
    from buildcell.supply.records import UnreadableRecord

    doomed: list[BuildRecord] = []
    for index, record in enumerate(listed):
        if isinstance(record, UnreadableRecord) or record.status == "running":
            continue
        ended = record.finished if record.finished is not None else record.started
        if index >= keep or now - ended > max_age:
            doomed.append(record)
    return doomed


def _digests(texts: Iterable[str]) -> set[str]:
    return {m.group(0) for text in texts for m in _DIGEST_TEXT.finditer(text)}


def _sweep_store(store: Path, referenced: set[str], report: GcReport, now: float) -> None:
    """Remove content store entries no record lists; young ones may be a live fetch's."""
    if not store.is_dir() or store.is_symlink():
        return
    for fan in sorted(store.iterdir()):
        if not fan.is_dir() or fan.is_symlink():
            continue
        for entry in sorted(fan.iterdir()):
            if not _HEX.fullmatch(entry.name) or entry.name in referenced:
                continue
            try:
                st = entry.lstat()
            except FileNotFoundError:
                continue
            if now - st.st_mtime < _GRACE_SECONDS or not entry.is_file():
                continue
            entry.unlink(missing_ok=True)
            report.cas_removed += 1
            report.freed += st.st_blocks * 512


def _disk_use(root: Path) -> int:
    total = 0
    for _top, _dirs, files, top_fd in os.fwalk(root, follow_symlinks=False):
        for name in files:
            try:
                total += os.stat(name, dir_fd=top_fd, follow_symlinks=False).st_blocks * 512
            except OSError:
                continue
    return total


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
        if entry.name.startswith(".gone-"):
            remove_tree(entry)  # a removal (RecordStore.remove) cut short
            removed += 1
        elif entry.name.startswith(".new-") and not young:
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
