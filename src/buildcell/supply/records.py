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

Records are read by one typed reader (:func:`parse_record`): every field is validated, and
a record that does not validate is an :class:`UnreadableRecord` that says why, listed like
any other, never a crash and never left out. Records are written whole (temp file, fsync,
rename, directory fsync), and a build appears in ``builds/`` only once its directory is
complete. A record still ``running`` whose supervisor is gone is finalized when it is read:
the build and its running steps become ``interrupted``, on disk.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import stat
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from buildcell.errors import ConfigError, Error, StateError
from buildcell.state import fsync_dir, process_start_time, write_atomic, write_failure

if TYPE_CHECKING:
    from pydantic import TypeAdapter

__all__ = [
    "BUILD_STATUSES",
    "DEFAULT_PROJECT",
    "STEP_STATUSES",
    "BuildRecord",
    "Listed",
    "RecordStore",
    "StepRecord",
    "UnreadableRecord",
    "parse_record",
    "project_name",
    "with_twins",
]

BUILD_STATUSES = frozenset({"running", "succeeded", "failed", "error", "denied", "interrupted"})
STEP_STATUSES = frozenset({"pending", "running", "succeeded", "failed", "skipped", "interrupted"})
#: A record larger than this is not one buildcell wrote.
MAX_RECORD_BYTES = 16 << 20
_BUILD_ID = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]{0,127}")
_STEP_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")

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
    # --keep-failed: the failed step's workspace, kept for `buildcell shell` (build.kept):
    # path, step, kept and expires (times), removed (a time, once gc or --discard removed it)
    kept_workspace: dict[str, Any] | None = None
    kind: str = "build"  # or "run": one command, `buildcell run`
    command: list[str] | None = None  # what `buildcell run` ran
    twin_of: str | None = None  # the build a --check-repro twin rebuilt
    reproducible: bool | None = None  # what --check-repro found (on the first build)

    @property
    def duration(self) -> float | None:
        return None if self.finished is None else self.finished - self.started

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["duration"] = self.duration
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BuildRecord:
        """The record ``data`` (as :meth:`to_dict` gives it) describes, validated.

        Raises:
            ValueError: it is not a valid record; the message names the field.
        """
        return parse_record(json.dumps(data).encode(), build_id=str(data.get("id", "")))


@dataclass(frozen=True)
class UnreadableRecord:
    """A build directory whose record does not validate, and why (no value of it is
    repeated: the reason names fields and kinds only)."""

    id: str
    reason: str
    project: str | None = None
    status: ClassVar[str] = "unreadable"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": "unreadable",
            "error": self.reason,
            "project": self.project,
        }


#: What a store lists: records, and build directories whose record is unreadable.
Listed = BuildRecord | UnreadableRecord


@functools.cache
def _adapter() -> TypeAdapter[BuildRecord]:
    from pydantic import TypeAdapter

    return TypeAdapter(BuildRecord)


def parse_record(data: bytes, *, build_id: str) -> BuildRecord:
    """Validate the bytes of a ``record.json`` for the build ``build_id``.

    Raises:
        ValueError: it is not a record buildcell wrote; the message says which field is
            wrong and how, without repeating its value.
    """
    from pydantic import ValidationError

    if not data.strip():
        raise ValueError("record.json is empty")
    if len(data) > MAX_RECORD_BYTES:
        raise ValueError(f"record.json is larger than {MAX_RECORD_BYTES >> 20} MiB")
    try:
        record = _adapter().validate_json(data, strict=True)
    except ValidationError as e:
        first = e.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "the record"
        kind = "not JSON" if first["type"] == "json_invalid" else first["msg"].lower()
        raise ValueError(f"record.json: {where}: {kind}") from None
    problem = _record_problem(record, build_id)
    if problem is not None:
        raise ValueError(f"record.json: {problem}")
    return record


def _record_problem(record: BuildRecord, build_id: str) -> str | None:
    """What the types alone do not say: ids, names, statuses and times that make sense."""
    if record.id != build_id:
        return "id: not the id of its directory"
    if _PROJECT.fullmatch(record.project) is None:
        return "project: not a project name"
    if record.kind not in ("build", "run"):
        return "kind: not 'build' or 'run'"
    if record.twin_of is not None and _BUILD_ID.fullmatch(record.twin_of) is None:
        return "twin_of: not a build id"
    if record.status not in BUILD_STATUSES:
        return f"status: not one of {', '.join(sorted(BUILD_STATUSES))}"
    for name, value in (("started", record.started), ("finished", record.finished)):
        if value is not None and not (math.isfinite(value) and 0 <= value < 2**33):
            return f"{name}: not a time"
    names = set()
    for i, step in enumerate(record.steps):
        if _STEP_NAME.fullmatch(step.name) is None or step.name in names:
            return f"steps.{i}.name: not a step name, or given twice"
        names.add(step.name)
        if step.status not in STEP_STATUSES:
            return f"steps.{i}.status: not one of {', '.join(sorted(STEP_STATUSES))}"
        for what, value in (("started", step.started), ("duration", step.duration)):
            if value is not None and not (math.isfinite(value) and 0 <= value < 2**33):
                return f"steps.{i}.{what}: not a time"
    return None


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
        #: builds whose dead supervisor this store found, and finalized as interrupted
        self.finalized: list[str] = []
        try:
            root.mkdir(mode=0o700, exist_ok=True)
        except OSError as e:
            raise write_failure(root, e, what="the build records") from e

    def create(self, record: BuildRecord, spec_text: str) -> Path:
        """Make the build's directory, complete (spec, logs/, record), then put it in place:
        a build that cannot be recorded leaves nothing in ``builds/``.

        Raises:
            StateError: it cannot be written (a full disk says so, with the free space).
        """
        from buildcell.trees import remove_tree

        final = self.root / record.id
        new = self.root / f".new-{record.id}"
        record.supervisor = {"pid": os.getpid(), "start": process_start_time(os.getpid())}
        try:
            new.mkdir(mode=0o700)
            (new / "logs").mkdir(mode=0o700)
            write_atomic(new / "spec.yaml", spec_text.encode(), what="the build's spec")
            write_atomic(new / "record.json", _encode(record), what="the build record")
            os.rename(new, final)
            fsync_dir(self.root)
        except OSError as e:
            with suppress(Exception):
                remove_tree(new)
            raise write_failure(new, e, what="the build record") from e
        except Error:
            with suppress(Exception):
                remove_tree(new)
            raise
        return final

    def dir(self, build_id: str) -> Path:
        return self.root / build_id

    def save(self, record: BuildRecord, *, durable: bool = True) -> None:
        """Replace the record on disk as a whole; ``durable=False`` does not wait for the
        disk (what a reboot may lose: a step shown pending instead of running).

        Raises:
            StateError: it cannot be written; the previous record stays.
        """
        write_atomic(
            self.root / record.id / "record.json",
            _encode(record),
            what="the build record",
            durable=durable,
        )

    def finish(self, record: BuildRecord, *, failing: bool) -> None:
        """Write the record's last state: finished now, steps that never ran ``skipped``,
        a step still running ``interrupted``. If even that cannot be written (a full disk)
        while an error is ``failing`` the build, the previous record stays whole and that
        error is the one the caller raises."""
        record.finished = time.time()
        for step in record.steps:
            if step.status in ("pending", "running"):
                step.status = "skipped" if step.status == "pending" else "interrupted"
        try:
            self.save(record)
        except StateError:
            if not failing:
                raise

    def load(self, build_id: str) -> Listed:
        """Load one record by id or unique id prefix (an unreadable one says why).

        Raises:
            Error: no build, or an ambiguous prefix.
        """
        matches = sorted(
            p.name for p in self._build_dirs() if p.name.startswith(build_id) and self._visible(p)
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

    def load_record(self, build_id: str) -> BuildRecord:
        """:meth:`load`, for what needs the record itself (its logs, its steps).

        Raises:
            Error: no build, an ambiguous prefix, or its record is unreadable.
        """
        found = self.load(build_id)
        if isinstance(found, UnreadableRecord):
            raise Error(
                f"the record of build {found.id} is unreadable: {found.reason}",
                hint="`buildcell show` says the same; `buildcell gc` leaves it alone",
            )
        return found

    def _build_dirs(self) -> Iterator[Path]:
        """Every build directory: dot-names are directories still being made."""
        try:
            names = os.listdir(self.root)
        except OSError:
            return
        for name in names:
            if not name.startswith(".") and _BUILD_ID.fullmatch(name):
                yield self.root / name

    def _read(self, path: Path) -> Listed:
        data, problem = _read_bytes(path / "record.json")
        if data is None:
            return UnreadableRecord(
                path.name, problem or "record.json is missing", _project_of(b"")
            )
        try:
            record = parse_record(data, build_id=path.name)
        except ValueError as e:
            return UnreadableRecord(path.name, str(e), _project_of(data))
        if record.status == "running" and not _supervisor_alive(record.supervisor):
            # Read again now that the supervisor is known to be gone: it may have written
            # its last record after the first read, and nothing can write after it now.
            again, _ = _read_bytes(path / "record.json")
            try:
                record = parse_record(again or b"", build_id=path.name)
            except ValueError as e:
                return UnreadableRecord(path.name, str(e), _project_of(again or b""))
            if record.status == "running":
                self._finalize(record, path)
        return record

    def _finalize(self, record: BuildRecord, path: Path) -> None:
        """A build whose supervisor died: it, and its running steps, were interrupted."""
        record.status = "interrupted"
        record.error = record.error or "its supervisor is gone: the build was interrupted"
        if record.finished is None:
            with suppress(OSError):
                record.finished = max(record.started, os.stat(path / "record.json").st_mtime)
        for step in record.steps:
            if step.status == "running":
                step.status = "interrupted"
            elif step.status == "pending":
                step.status = "skipped"
        with suppress(Error):  # a read never fails for want of space: it is finalized later
            self.save(record)
        self.finalized.append(record.id)

    def _visible(self, path: Path) -> bool:
        """Whether ``path`` is a record of this store's project (any, without one); one
        whose project cannot be read is shown to every project, as unreadable."""
        if self.project is None:
            return True
        data, _ = _read_bytes(path / "record.json")
        project = _project_of(data or b"")
        return project is None or project == self.project

    def recent(self, limit: int = 20) -> list[Listed]:
        """The ``limit`` newest builds of the project, unreadable ones included."""
        found: list[Listed] = []
        for path in sorted(self._build_dirs(), reverse=True):
            if self._visible(path):
                found.append(self._read(path))
            if len(found) >= limit:
                break
        return found

    def log_path(self, build_id: str, step: str) -> Path:
        return self.root / build_id / "logs" / f"{step}.log"

    def read_log(self, build_id: str, step: str) -> bytes | None:
        """The log of ``step``; None if the step wrote none.

        Raises:
            Error: the log is not a regular file, or cannot be read.
        """
        path = self.log_path(build_id, step)
        data, problem = _read_bytes(path, limit=None)
        if data is None and problem is not None and "missing" not in problem:
            raise Error(f"the log of step {step!r} of build {build_id} is unreadable: {problem}")
        return data

    def remove(self, build_id: str) -> None:
        """Delete the record of ``build_id`` and all its build directory holds (logs,
        events, kept outputs): renamed out of sight first (``.gone-ID``), so that a
        removal cut short is never read as a record; ``buildcell gc`` finishes it.

        Raises:
            StateError: it cannot be removed.
        """
        from buildcell.trees import remove_tree

        if not _BUILD_ID.fullmatch(build_id):
            raise StateError(f"refusing to remove {build_id!r}: not a build id")
        gone = self.root / f".gone-{build_id}"
        try:
            os.rename(self.root / build_id, gone)
        except FileNotFoundError:
            return
        except OSError as e:
            raise StateError(f"cannot remove build {build_id}: {e.strerror}") from e
        try:
            remove_tree(gone)
        except Error as e:
            raise StateError(f"cannot remove build {build_id}: {e.message}") from e


def with_twins(records: list[Listed]) -> list[tuple[Listed, BuildRecord | None]]:
    """Each record with the ``--check-repro`` twin that rebuilt it (if listed too); the
    twins themselves are not listed on their own."""
    twins = {r.twin_of: r for r in records if isinstance(r, BuildRecord) and r.twin_of is not None}
    return [
        (r, twins.get(r.id))
        for r in records
        if not (isinstance(r, BuildRecord) and r.twin_of is not None and r.twin_of in _ids(records))
    ]


def _ids(records: list[Listed]) -> set[str]:
    return {r.id for r in records}


def _encode(record: BuildRecord) -> bytes:
    return json.dumps(record.to_dict(), indent=2).encode()


def _supervisor_alive(supervisor: dict[str, int | None]) -> bool:
    pid = supervisor.get("pid")
    return isinstance(pid, int) and pid > 0 and process_start_time(pid) == supervisor.get("start")


def _read_bytes(
    path: Path, *, limit: int | None = MAX_RECORD_BYTES
) -> tuple[bytes | None, str | None]:
    """A state file's bytes, or None and why not: never through a symlink, never a fifo."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, f"{path.name} is missing"
    except OSError as e:
        return None, f"{path.name}: {e.strerror}"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            from buildcell._fs import file_kind

            return None, f"{path.name} is a {file_kind(st.st_mode)}, not a file"
        if limit is not None and st.st_size > limit:
            return None, f"{path.name} is larger than {limit >> 20} MiB"
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks), None
    except OSError as e:
        return None, f"{path.name}: {e.strerror}"
    finally:
        os.close(fd)


def _project_of(data: bytes) -> str | None:
    """The project a record names, if that much of it can be read."""
    try:
        parsed = json.loads(data)
    except ValueError:
        return None
    project = parsed.get("project", DEFAULT_PROJECT) if isinstance(parsed, dict) else None
    return project if isinstance(project, str) and _PROJECT.fullmatch(project) else None
