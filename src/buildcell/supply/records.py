"""Build records: what each build ran, printed, produced, and how it ended.

Layout under the state directory::

    builds/<build-id>/record.json    summary, rewritten atomically as the build progresses
    builds/<build-id>/spec.yaml      the spec exactly as run
    builds/<build-id>/events.jsonl   the audit trail
    builds/<build-id>/logs/<step>.log  each step's output (stdout and stderr, in order)
    builds/<build-id>/outputs.json   the outputs manifest

Every record belongs to a project; a ``RecordStore`` opened for one project lists, loads
and finds only that project's builds, so no buildcell command shows one project another's
records, logs or outputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from buildcell.errors import ConfigError, Error
from buildcell.state import process_start_time

__all__ = ["DEFAULT_PROJECT", "BuildRecord", "RecordStore", "StepRecord", "project_name"]

DEFAULT_PROJECT = "default"
_PROJECT = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def project_name(text: str, *, derived: bool = False) -> str:
    """A valid project name: ``text`` itself, or (``derived``) made from a directory path.

    Raises:
        ConfigError: ``text`` is not a valid name (and was not derived).
    """
    if derived:
        # The directory's name, made valid, plus a short digest of its whole path: two
        # checkouts that happen to share a name are still two projects.
        base = re.sub(r"[^a-z0-9._-]+", "-", os.path.basename(text.rstrip("/")).lower())
        base = base.strip("-._")[:56] or "project"
        return f"{base}-{hashlib.sha256(text.encode()).hexdigest()[:6]}"
    if _PROJECT.fullmatch(text) is None:
        raise ConfigError(
            f"invalid project name {text!r}: expected lowercase letters, digits, '.', '_' or "
            "'-' (at most 64), starting with a letter or digit",
            hint="for example --project acme-api",
        )
    return text


@dataclass
class StepRecord:
    name: str
    status: str = "pending"  # pending, running, succeeded, failed, skipped
    exit_code: int | None = None
    reason: str | None = None
    started: float | None = None
    duration: float | None = None
    egress: list[dict[str, Any]] = field(default_factory=list)
    limits: dict[str, Any] | None = None  # the effective limits the step ran with
    network: list[str] = field(default_factory=list)  # its egress allowlist
    secrets: list[str] = field(default_factory=list)  # the names of the secrets it got


@dataclass
class BuildRecord:
    id: str
    name: str
    spec_path: str
    spec_digest: str
    status: str = "running"  # running, succeeded, failed, error, interrupted
    exit_code: int | None = None
    error: str | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None
    steps: list[StepRecord] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    inputs: list[dict[str, Any]] = field(default_factory=list)
    rootfs: str = "host"
    out_dir: str | None = None
    supervisor: dict[str, int | None] = field(default_factory=dict)
    project: str = DEFAULT_PROJECT
    trust: str = "untrusted"
    ref: str | None = None
    policy: dict[str, Any] | None = None
    cache_scope: str | None = None
    images: dict[str, Any] | None = None  # the unpack budget: limit, used, per image
    # What provenance says, measured while the build ran (build.statement reads only this):
    invocation: dict[str, Any] | None = None  # what the invoker chose
    source: dict[str, Any] | None = None  # the source's description (uri, digests)
    source_date_epoch: int | None = None
    rootfs_dependency: dict[str, Any] | None = None  # uri, sha256, annotations
    platform: dict[str, Any] | None = None  # buildcell, bubblewrap, kernel, seccomp
    byproducts: list[dict[str, Any]] = field(default_factory=list)  # logs, events: digests

    @property
    def duration(self) -> float | None:
        return None if self.finished is None else self.finished - self.started

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["duration"] = self.duration
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BuildRecord:
        data = dict(data)
        data.pop("duration", None)
        steps = [StepRecord(**s) for s in data.pop("steps", [])]
        return cls(**data, steps=steps)


class RecordStore:
    """The ``builds/`` directory of a state directory, seen from one project.

    Args:
        root: the ``builds/`` directory.
        project: only this project's records are listed and loaded; ``None`` for all
            (used by the build that writes them and by ``gc``).
    """

    def __init__(self, root: Path, *, project: str | None = None) -> None:
        self.root = root
        self.project = project
        root.mkdir(mode=0o700, exist_ok=True)

    def create(self, record: BuildRecord, spec_text: str) -> Path:
        path = self.root / record.id
        path.mkdir(mode=0o700)
        (path / "logs").mkdir(mode=0o700)
        (path / "spec.yaml").write_text(spec_text)
        record.supervisor = {"pid": os.getpid(), "start": process_start_time(os.getpid())}
        self.save(record)
        return path

    def dir(self, build_id: str) -> Path:
        return self.root / build_id

    def save(self, record: BuildRecord) -> None:
        path = self.root / record.id
        tmp = path / ".record.json.tmp"
        tmp.write_text(json.dumps(record.to_dict(), indent=2))
        os.replace(tmp, path / "record.json")

    def load(self, build_id: str) -> BuildRecord:
        """Load one record by id or unique id prefix.

        Raises:
            Error: no build, or an ambiguous prefix.
        """
        matches = sorted(
            p.name for p in self.root.iterdir() if p.name.startswith(build_id) and self._visible(p)
        )
        if build_id in matches:
            matches = [build_id]
        if not matches:
            where = f" in project {self.project!r}" if self.project is not None else ""
            raise Error(
                f"no build {build_id!r}{where}",
                hint="`buildcell ls` lists recent builds (--project NAME for another project)",
            )
        if len(matches) > 1:
            raise Error(
                f"build id {build_id!r} is ambiguous: {', '.join(matches[:5])}",
                hint="give more characters of the id",
            )
        return self._read(self.root / matches[0])

    def _read(self, path: Path) -> BuildRecord:
        try:
            record = BuildRecord.from_dict(json.loads((path / "record.json").read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise Error(f"build record {path.name} is unreadable: {e}") from e
        if record.status == "running":
            sup = record.supervisor
            pid = sup.get("pid")
            if not (isinstance(pid, int) and process_start_time(pid) == sup.get("start")):
                record.status = "interrupted"
        return record

    def _visible(self, path: Path) -> bool:
        """Whether ``path`` is a record of this store's project (any, without one)."""
        if self.project is None:
            return True
        try:
            data = json.loads((path / "record.json").read_text())
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and data.get("project", DEFAULT_PROJECT) == self.project

    def recent(self, limit: int = 20) -> list[BuildRecord]:
        records = []
        for path in sorted(self.root.iterdir(), reverse=True):
            if (path / "record.json").exists() and self._visible(path):
                try:
                    records.append(self._read(path))
                except Error:
                    continue
            if len(records) >= limit:
                break
        return records

    def log_path(self, build_id: str, step: str) -> Path:
        return self.root / build_id / "logs" / f"{step}.log"
