"""Runs a build spec: inputs -> one fresh cell per step over a shared workspace -> outputs.

Everything that must be trusted happens here, on the host: inputs are fetched and verified
before any step runs, outputs are collected and hashed after the last one. Each step is
``/bin/sh -e -c RUN`` in its own cell (own namespaces, limits, /tmp and home); only the
workspace carries over, and it is erased when the build ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from buildcell import _log
from buildcell._fs import sha256_file
from buildcell._text import show
from buildcell.build.spec import (
    BuildSpec,
    CacheSpec,
    DirRootfsSpec,
    HostRootfsSpec,
    LimitsSpec,
    LoadedSpec,
    StepSpec,
)
from buildcell.cell.config import (
    Bind,
    CellConfig,
    CellSecret,
    DirRootfs,
    HostRootfs,
    Limits,
    OciRootfs,
    Rootfs,
    Variation,
)
from buildcell.cell.storage import CellStorage, new_cell_id
from buildcell.cell.supervisor import Cell, CellResult, bwrap_version, find_bwrap
from buildcell.errors import ConfigError, Error, OutputError, PolicyError, StateError
from buildcell.events import EventLog
from buildcell.secrets import SecretDelivery
from buildcell.settings import (
    DEFAULT_IMAGE_MAX_SIZE,
    DEFAULT_LOG_MAX_SIZE,
    DEFAULT_OUTPUT_MAX_SIZE,
    DefaultLimits,
)
from buildcell.state import StateDir, write_failure
from buildcell.supply.records import BuildRecord, RecordStore, StepRecord
from buildcell.supply.source import SourceInfo, describe_source, tree_digest_at
from buildcell.trees import remove_tree
from buildcell.units import format_size

if TYPE_CHECKING:
    from buildcell.allowlist import AllowEntry, EgressPolicy
    from buildcell.build.admission import Admission
    from buildcell.build.invocation import Invocation
    from buildcell.build.policy import Policy
    from buildcell.build.repro import ReproReport
    from buildcell.egress.audit import EgressSummaryRow
    from buildcell.redact import Scanner, Secret
    from buildcell.supply.caches import CacheLease, CacheScope
    from buildcell.supply.images import UnpackBudget
    from buildcell.supply.outputs import OutputDir
    from buildcell.supply.provenance import KeyFile, SigningKey

__all__ = [
    "DEFAULT_BUILDER_ID",
    "BuildOptions",
    "BuildReporter",
    "BuildResult",
    "check_reproducible",
    "run_build",
]

log = _log.get(__name__)


class BuildReporter(Protocol):
    """Presentation hooks; the CLI implements them (live progress, plain lines, JSON)."""

    def build_started(self, build_id: str, spec: BuildSpec) -> None: ...

    def message(self, text: str) -> None: ...

    def progress(self, text: str) -> None:
        """How far long host-side work has come (an image unpacking); not for ``-q``."""

    def step_started(self, step: StepSpec) -> None: ...

    def step_output(self, step: StepSpec, stream: str, data: bytes) -> None: ...

    def step_finished(self, step: StepSpec, record: StepRecord) -> None: ...


class _Silent:
    def build_started(self, build_id: str, spec: BuildSpec) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def progress(self, text: str) -> None:
        pass

    def step_started(self, step: StepSpec) -> None:
        pass

    def step_output(self, step: StepSpec, stream: str, data: bytes) -> None:
        pass

    def step_finished(self, step: StepSpec, record: StepRecord) -> None:
        pass


@dataclass
class BuildResult:
    """The outcome of a build; ``exit_code`` is the failing step's status, else 0."""

    record: BuildRecord
    record_dir: Path
    out_dir: Path
    warnings: list[str] = field(default_factory=list)
    provenance: Path | None = None
    signed_by: str | None = None

    @property
    def exit_code(self) -> int:
        return self.record.exit_code if self.record.exit_code is not None else 125

    @property
    def build_id(self) -> str:
        return self.record.id

    def egress(self) -> list[EgressSummaryRow]:
        """What every step reached or tried to reach, summed per destination."""
        from buildcell.egress.audit import EgressStats

        return EgressStats.from_records(row for step in self.record.steps for row in step.egress)

    def to_dict(self) -> dict[str, Any]:
        data = self.record.to_dict()
        data["record_dir"] = str(self.record_dir)
        data["warnings"] = self.warnings
        data["egress"] = [row.to_dict() for row in self.egress()]
        data["provenance"] = {
            "path": str(self.provenance) if self.provenance else None,
            "signed": self.signed_by is not None,
            "keyid": self.signed_by,
        }
        return data


def cell_limits(limits: LimitsSpec) -> Limits:
    """The cell's :class:`~buildcell.cell.config.Limits` a spec's limits ask for (the spec is
    data: it knows nothing of cells)."""
    return Limits(
        memory=limits.memory,
        pids=limits.pids,
        cpus=limits.cpus,
        disk=limits.disk,
        timeout=limits.timeout,
    )


def _rootfs(spec: BuildSpec, spec_dir: Path, granted: Sequence[Path]) -> Rootfs:
    """The spec's rootfs: inside the spec's directory (opened confined below it), or a host
    directory the operator granted (``rootfs.allow`` in the configuration file).

    Raises:
        ConfigError: the spec names a host path the operator did not grant.
    """
    rootfs = spec.rootfs
    if isinstance(rootfs, HostRootfsSpec):
        return HostRootfs()
    named = rootfs.dir if isinstance(rootfs, DirRootfsSpec) else rootfs.oci
    path = Path(os.path.abspath(spec_dir / named))
    beneath: Path | None = spec_dir
    if os.path.isabs(named):
        if not any(path == d or path.is_relative_to(d) for d in granted):
            raise ConfigError(
                f"rootfs {named!r}: a spec names only a rootfs inside its own directory; "
                "host directories come from the operator",
                hint="grant it in the configuration file (rootfs: {allow: [DIR]}), "
                "or use a path relative to the spec",
            )
        beneath = None
    if isinstance(rootfs, DirRootfsSpec):
        return DirRootfs(path, beneath=beneath)
    return OciRootfs(path, rootfs.digest, beneath=beneath)


def _check_grants(spec: BuildSpec, grants: Sequence[str]) -> None:
    """A spec names public destinations only; the rest must be granted by the operator.

    Raises:
        ConfigError: a step names a non-public or too broad destination nobody granted.
    """
    from buildcell.allowlist import EgressPolicy, parse_allow, spec_entry_problem

    granted = EgressPolicy.from_strings(grants)
    for step in spec.steps:
        for text in step.network.allow if step.network else ():
            entry = parse_allow(text)
            problem = spec_entry_problem(entry)
            if problem is None or _covered(entry, granted):
                continue
            raise ConfigError(
                f"step {step.name!r}: network.allow: {problem}",
                hint=f"if this build may reach it, grant it: --allow {entry.text} (or network: "
                "{allow: [...]} in the configuration file)",
            )


def _covered(entry: AllowEntry, granted: EgressPolicy) -> bool:
    """Whether an operator entry covers every address and port of ``entry``."""
    for grant in granted.entries:
        if grant.text == entry.text:
            return True
        if (
            grant.kind == "network"
            and entry.network is not None
            and grant.network is not None
            and entry.ports <= grant.ports
            and entry.network.version == grant.network.version
            and entry.network.subnet_of(grant.network)  # type: ignore[arg-type]
        ):
            return True
    return False


def _guard_key(key: object, places: Sequence[Path], rootfs: Rootfs) -> None:
    """Refuse a signing key that lies where a build reaches: its source (the workspace is a
    copy of it, inputs come from it), its rootfs, the state or output directory.

    Raises:
        ProvenanceError: it does, or it cannot be used at all.
    """
    if key is None:  # nothing to guard: and no need to load the signing code
        return
    from buildcell.errors import ProvenanceError
    from buildcell.supply.provenance import KeyFile

    if not isinstance(key, KeyFile):
        return
    key.check()
    where = Path(os.path.realpath(key.path))
    reach = [*places]
    if isinstance(rootfs, DirRootfs | OciRootfs):
        reach.append(rootfs.path)
    else:
        from buildcell.cell.rootfs import HOST_ETC_ENTRIES, HOST_TOP_LEVEL

        # What the host rootfs shows every cell.
        reach += [Path("/", name) for name in HOST_TOP_LEVEL]
        reach += [Path("/etc", name) for name in HOST_ETC_ENTRIES]
    for place in reach:
        real = Path(os.path.realpath(place))
        if where == real or where.is_relative_to(real):
            raise ProvenanceError(
                f"the signing key {key.path} lies inside {place}, within a build's reach",
                hint="keep the key outside every checkout, rootfs and buildcell directory",
            )


def _source_date_epoch(spec: BuildSpec, source: SourceInfo) -> int:
    """The spec's value, else the source's last commit time, else 0."""
    if spec.source_date_epoch is not None:
        return spec.source_date_epoch
    if source.commit_time is not None:
        return source.commit_time
    return 0


DEFAULT_BUILDER_ID = "https://buildcell.dev/builders/local"


@dataclass(frozen=True)
class BuildOptions:
    """How to run a build, beyond its spec.

    Attributes:
        sign_key: sign the provenance with this key; without one it is written unsigned. A
            :class:`~buildcell.supply.provenance.KeyFile` is read only after the build's last cell
            is gone, and refused if it lies where a build can reach it.
        twin_of: the build a ``--check-repro`` twin rebuilds (recorded, so that ``ls``
            groups the two).
        source: the directory the build runs on, its workspace's contents, and described
            in its provenance (default: the spec's directory). Paths the spec names
            (``file:`` inputs, a ``rootfs:``) stay relative to the spec's own directory.
        builder_id: ``runDetails.builder.id`` of the provenance.
        variation: perturbations (``--check-repro`` uses them for its second build).
        provenance: write ``provenance.intoto.jsonl`` next to the outputs.
        secrets: the values bound by the operator (``--secret``), by name.
        pinned_hosts: ``(name, address)`` pairs the egress service resolves without DNS
            (``--add-host``); one that ``allow`` names exactly may reach its address even
            when that is not public, in the steps that name it.
        invocation: project, ref, trust level and bound secrets of this build (default:
            an untrusted build of the project named after the spec's directory).
        policies: the operator policies checked before anything runs (the configuration
            file's and ``--policy``'s): every one must allow the build.
        cache_max_size: a step's cache larger than this is not saved.
        rootfs_dirs: host directories a spec may name as its rootfs (the operator's grant;
            anything else a spec names must lie inside its own directory).
        default_limits: limits a step gets where neither the spec nor the invoker sets one.
        log_max_size: bytes of a step's output kept in its log (the rest is drained).
        output_max_size: bytes all outputs of the build may have together.
        image_max_size: bytes all images of the build may unpack to.
        wait_for_out_dir: wait for another build using the output directory to finish;
            if False, fail at once.
        allow: the operator's grants of non-public destinations that steps may name
            (``--allow``, ``network.allow`` of the configuration file).
        allow_fetch: the operator's grants of non-public destinations for the host's input
            fetches (``--allow-fetch``, ``fetch.allow``).
        keep_failed: keep the workspace of a build that fails (its failing step, or outputs
            that matched nothing) for ``buildcell shell``; the record's ``kept_workspace``
            says where (see :mod:`buildcell.build.kept`).
    """

    sign_key: SigningKey | KeyFile | None = None
    source: Path | None = None
    twin_of: str | None = None
    builder_id: str = DEFAULT_BUILDER_ID
    variation: Variation | None = None
    provenance: bool = True
    secrets: tuple[Secret, ...] = ()
    pinned_hosts: tuple[tuple[str, str], ...] = ()
    invocation: Invocation | None = None
    policies: tuple[Policy, ...] = ()
    cache_max_size: int = 2 << 30
    rootfs_dirs: tuple[Path, ...] = ()
    default_limits: DefaultLimits = field(default_factory=DefaultLimits)
    log_max_size: int = DEFAULT_LOG_MAX_SIZE
    output_max_size: int = DEFAULT_OUTPUT_MAX_SIZE
    image_max_size: int = DEFAULT_IMAGE_MAX_SIZE
    wait_for_out_dir: bool = True
    allow: tuple[str, ...] = ()
    allow_fetch: tuple[str, ...] = ()
    keep_failed: bool = False


class _StepLog:
    """A step's output: appended to its log file and handed to the reporter, up to
    ``max_bytes``; past that a marker says so and the rest is drained unseen (the cell
    never blocks on a full pipe, and a build cannot fill the disk with output)."""

    def __init__(
        self, path: Path, reporter: BuildReporter, step: StepSpec, *, max_bytes: int
    ) -> None:
        self._path = path
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            self._fd = os.open(path, flags, 0o600)
        except OSError as e:
            raise write_failure(path, e, what=f"the log of step {step.name}") from e
        self._lock = threading.Lock()
        self._reporter = reporter
        self._step = step
        self._left = max_bytes
        self._max = max_bytes
        self.truncated = 0

    def sink(self, stream: str) -> Callable[[bytes], None]:
        def write(data: bytes) -> None:
            with self._lock:
                if self._left <= 0:
                    self.truncated += len(data)
                    return
                kept = data[: self._left]
                self._left -= len(kept)
                self._write(kept)
                marker = b""
                if self._left <= 0:
                    self.truncated += len(data) - len(kept)
                    marker = (
                        f"\n[buildcell: the log of step {self._step.name} stops here, at its "
                        f"limit of {format_size(self._max)}; the rest of the output is not "
                        "kept]\n"
                    ).encode()
                    self._write(marker)
            self._reporter.step_output(self._step, stream, kept + marker)

        return write

    def _write(self, data: bytes) -> None:
        """All of ``data``, or a :class:`StateError`: it stops the cell (the sink raises in
        the supervisor's loop, which tears the cell down) and fails the step."""
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as e:
            self._left = 0  # nothing more is written, or tried
            raise write_failure(self._path, e, what=f"the log of step {self._step.name}") from e

    def close(self) -> None:
        os.close(self._fd)


def run_build(
    loaded: LoadedSpec,
    *,
    out_dir: Path,
    state: StateDir | None = None,
    reporter: BuildReporter | None = None,
    options: BuildOptions | None = None,
) -> BuildResult:
    """Run every step of ``loaded`` and collect its outputs into ``out_dir``.

    A failing step stops the build; its exit status becomes the build's (the result's
    ``exit_code``), and no outputs are collected. The build's record is kept under the
    state directory whatever happens.

    Raises:
        Error: the build could not be run as asked (input digest mismatch, sandbox setup
            failure, ...): exit 125, recorded as status ``error``.
    """
    state = state or StateDir()
    reporter = reporter or _Silent()
    options = options or BuildOptions()
    spec = loaded.spec
    _check_bindings(spec, options.secrets, reporter)
    spec_dir = loaded.path.parent.resolve()
    source_dir = _source_dir(options.source, spec_dir)
    out_dir = out_dir.absolute()
    invocation = _invocation(options, source_dir)
    # Derived once: later uses (cache leases) read it back from the options.
    options = dataclasses.replace(options, invocation=invocation)
    store = RecordStore(state.root / "builds")
    record = _new_record(loaded, invocation, out_dir)
    record.twin_of = options.twin_of
    record_dir = store.create(record, loaded.text)
    result = BuildResult(record, record_dir, out_dir)
    events = EventLog(record_dir / "events.jsonl", build=record.id)
    events.subscribe(lambda e: _collect_warning(e, result, reporter))
    events.subscribe(lambda e: _report_denial(e, reporter))
    events.subscribe(lambda e: _report_unpack(e, reporter))
    out: OutputDir | None = None
    try:
        with events:
            rootfs = _rootfs(spec, spec_dir, options.rootfs_dirs)
            record.rootfs = rootfs.describe()
            _check_grants(spec, options.allow)
            _guard_key(options.sign_key, (spec_dir, source_dir, state.root, out_dir), rootfs)
            # Before anything is announced or run: a denied build only leaves its record.
            _admit(options, spec, invocation, record, events)
            from buildcell.supply.outputs import OutputDir

            out = OutputDir(
                out_dir,
                lock_dir=state.locks,
                wait=options.wait_for_out_dir,
                on_wait=reporter.message,
            )
            reporter.build_started(record.id, spec)
            events.emit(
                "build.start",
                name=spec.name,
                spec=str(loaded.path),
                spec_digest=loaded.digest,
                rootfs=record.rootfs,
                project=record.project,
                trust=record.trust,
                ref=record.ref,
            )
            build = _BuildRun(
                loaded, spec_dir, source_dir, rootfs, state, store, result, events, reporter,
                options, invocation, out,
            )  # fmt: skip
            try:
                build.run()
            finally:
                build.finish()
    except Error as e:
        record.status = "denied" if isinstance(e, PolicyError) else "error"
        record.error = e.message
        record.exit_code = e.exit_code
        raise
    except BaseException:
        record.status = "interrupted"
        raise
    finally:
        if out is not None:
            out.close()
        store.finish(record, failing=sys.exc_info()[1] is not None)
    return result


#: Less than this left where the workspace lives, and a failed step is the disk's doing.
_FULL_BELOW = 64 << 10


def _failure_reason(result: CellResult, storage: CellStorage) -> str:
    """Why the step ended: the cell's reason (``exited``, ``signaled``, ``timeout``,
    ``oom``), or for a command that failed on its own, the limit it ran into: ``pids``
    (forks were refused) or ``disk`` (the disk budget is used up)."""
    if result.exit_code == 0 or result.reason != "exited":
        return result.reason
    if result.pids_refused:
        return "pids"
    if storage.disk is not None:
        from buildcell.state import free_space

        free = free_space(storage.workspace)
        if free is not None and free < _FULL_BELOW:
            return "disk"
    return result.reason


def _check_workspace_space(workspace: Path, step: str) -> None:
    """A step that failed while the file system of its workspace (the state directory's,
    without a disk limit) had no room left failed for the host's sake, not its own: that is
    an error of the build's environment (exit 125), not a failed build.

    Raises:
        StateError: the file system is full.
    """
    from buildcell.state import free_space

    free = free_space(workspace)
    if free is not None and free < _FULL_BELOW:
        raise write_failure(
            workspace / "x",
            OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
            what=f"the workspace of step {step}, which failed",
        )


def _new_record(loaded: LoadedSpec, invocation: Invocation, out_dir: Path) -> BuildRecord:
    spec = loaded.spec
    return BuildRecord(
        id=new_cell_id(),
        name=spec.name,
        spec_path=str(loaded.path),
        spec_digest=loaded.digest,
        steps=[StepRecord(s.name) for s in spec.steps],
        out_dir=str(out_dir),
        project=invocation.project,
        trust=invocation.trust,
        ref=invocation.ref,
        cache_scope=invocation.cache_scope(),
    )


def _admit(
    options: BuildOptions,
    spec: BuildSpec,
    invocation: Invocation,
    record: BuildRecord,
    events: EventLog,
) -> None:
    """The operator's policies, recorded either way; raises on denial."""
    if not options.policies:
        return
    from buildcell.build.admission import check_policy

    def keep(admission: Admission) -> None:
        record.policy = admission.to_record()

    check_policy(options.policies, spec, invocation, emit=events.emit, record=keep)


def _source_dir(source: Path | None, spec_dir: Path) -> Path:
    """The directory a build runs on: ``source`` (the operator's), else the spec's.

    Raises:
        ConfigError: ``source`` is not a directory.
    """
    if source is None:
        return spec_dir
    where = Path(os.path.abspath(source))
    if not where.is_dir():
        raise ConfigError(
            f"--source {show(str(source))} is not a directory",
            hint="give the directory to build (default: the spec's directory)",
        )
    return where


def _invocation(options: BuildOptions, spec_dir: Path) -> Invocation:
    if options.invocation is not None:
        return options.invocation
    from buildcell.build.admission import invocation_for

    return invocation_for(source=spec_dir, secrets=[s.name for s in options.secrets])


def _check_bindings(spec: BuildSpec, secrets: Sequence[Secret], reporter: BuildReporter) -> None:
    """Every declared secret must be bound before anything runs; extra bindings warn."""
    bound = {s.name for s in secrets}
    declared: dict[str, str] = {}
    for step in spec.steps:
        for use in step.secrets:
            declared.setdefault(use.name, step.name)
    for name, step_name in declared.items():
        if name not in bound:
            raise ConfigError(
                f"step {step_name!r} needs secret {name!r}, which is not bound",
                hint=f"bind it: --secret {name}=env:VARIABLE or --secret {name}=file:PATH",
            )
    for name in sorted(bound - set(declared)):
        reporter.message(f"warning: secret {name!r} is bound but no step declares it")


def _collect_warning(event: dict[str, Any], result: BuildResult, reporter: BuildReporter) -> None:
    if event["event"] == "output.unmatched" and not event.get("optional"):
        return  # the build fails for it, and says so
    if event["event"] in (
        "warning",
        "limit.degraded",
        "security.unsafe",
        "output.skipped",
        "output.unmatched",
    ):
        message = str(event.get("message", ""))
        if message not in result.warnings:
            result.warnings.append(message)
            reporter.message(f"warning: {message}")


def _report_unpack(event: dict[str, Any], reporter: BuildReporter) -> None:
    if event["event"] == "image.unpack":
        from buildcell.supply.images import unpack_line

        reporter.progress(f"[{event.get('step')}] {unpack_line(event)}")


def _report_denial(event: dict[str, Any], reporter: BuildReporter) -> None:
    """The first denial of each destination of a step, as it happens."""
    if event["event"] == "net.deny" and event.get("first"):
        from buildcell.egress.audit import denial_line

        reporter.message(f"[{event.get('step')}] {denial_line(event, spec=True)}")


@dataclass
class _BuildRun:
    """One build in progress: the context every phase needs."""

    loaded: LoadedSpec
    spec_dir: Path
    source_dir: Path
    rootfs: Rootfs
    state: StateDir
    store: RecordStore
    result: BuildResult
    events: EventLog
    reporter: BuildReporter
    options: BuildOptions
    invocation: Invocation
    out: OutputDir
    source: SourceInfo | None = None
    sde: int = 0
    output_budget: int | None = None
    scope: CacheScope | None = None
    image_budget: UnpackBudget | None = None
    missing_outputs: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.rootfs, OciRootfs):
            from buildcell.supply.images import UnpackBudget

            # One budget for every image the build unpacks, cached or not.
            self.image_budget = UnpackBudget(self.options.image_max_size)

    @property
    def record(self) -> BuildRecord:
        return self.result.record

    def run(self) -> None:
        spec = self.loaded.spec
        # Not the source: what buildcell itself writes (outputs, their staging, the state).
        own = (self.result.out_dir, self.out.staging, self.state.root)
        self.source = describe_source(self.source_dir, exclude=own)
        self.sde = _source_date_epoch(spec, self.source)
        self.record.source = self.source.to_parameter()
        self.record.source_date_epoch = self.sde
        self.record.invocation = self.invocation.to_parameters()
        self._measure_platform()
        binds = self._inputs()
        if any(s.limits is not None and s.limits.disk is not None for s in spec.steps):
            self.events.emit(
                "warning",
                message="disk is a budget for the whole build's "
                "workspace; a step's own disk limit is ignored",
            )
        bwrap = find_bwrap(self.state.host)
        disk = (
            spec.limits.disk if spec.limits.disk is not None else self.options.default_limits.disk
        )
        # A sparse file claims what it likes: what is copied out is bounded by the budget.
        self.output_budget = disk if disk is not None else self.options.output_max_size
        with CellStorage(self.state, cell_id=self.record.id, bwrap=bwrap, disk=disk) as storage:
            stats = storage.populate(self.source_dir, list(own))
            self.events.emit("workspace", **storage.describe(stats), source=str(self.source_dir))
            for step, step_record in zip(spec.steps, self.record.steps, strict=True):
                if not self._step(step, step_record, storage, binds):
                    self._keep_failed(storage, step.name)
                    return
            if spec.outputs:
                self._collect(storage)
                if self.missing_outputs:
                    self._fail_missing_outputs()
                    self._keep_failed(storage, spec.steps[-1].name)
                    return
        if spec.archive is not None:
            self._archive(spec.archive)
        # Provenance attests artifacts: a build that publishes none has nothing to attest.
        if self.options.provenance and self.record.outputs:
            self._provenance()
        # An audit trail with a hole is not published as a build's.
        self.events.check()
        if spec.outputs:
            # Outputs, manifest and provenance replace the directory's contents at once.
            self.out.publish()
        self.record.status = "succeeded"
        self.record.exit_code = 0
        self.events.emit("build.finish", status="succeeded", exit_code=0)

    def _keep_failed(self, storage: CellStorage, step: str) -> None:
        """With ``keep_failed``, move the workspace of this failed build out of the storage
        before it is removed, and name it in the record; a workspace that cannot be kept is
        a warning, not a second failure."""
        if not self.options.keep_failed:
            return
        from buildcell.build.kept import keep_workspace

        try:
            kept = keep_workspace(
                storage, self.state, self.record.id, step, max_bytes=self.output_budget
            )
        except StateError as e:
            self._warn(f"the workspace of step {step} was not kept: {e.message}")
            return
        self.record.kept_workspace = kept.to_record()
        self.store.save(self.record)
        self.events.emit(
            "workspace.kept", step=step, path=str(kept.path), expires=round(kept.expires)
        )

    def _inputs(self) -> tuple[Bind, ...]:
        from buildcell.supply.inputs import ContentStore, FetchPolicy, InputRequest, resolve_inputs

        inputs = self.loaded.spec.inputs
        if not inputs:
            return ()
        self.reporter.message(f"verifying {len(inputs)} input(s)")
        resolved = resolve_inputs(
            [
                InputRequest.local(self.spec_dir, i.file, sha256=i.sha256, path=i.path)
                if i.file is not None
                else InputRequest(uri=i.uri(self.spec_dir), sha256=i.sha256, path=i.path)
                for i in inputs
            ],
            ContentStore(
                self.state.root / "cas",
                warn=self._warn,
            ),
            events=self.events,
            fetch_policy=FetchPolicy.from_strings(self.options.allow_fetch),
            # A digest another project (or another ref) fetched is not this build's to have.
            scope=f"{self.invocation.project}\0{self._input_scope()}",
        )
        for r in resolved:
            self.record.inputs.append(
                {
                    "uri": r.uri,
                    "sha256": r.sha256,
                    "path": r.path,
                    "size": r.size,
                    "source": "fetched" if r.fetched else "store",
                }
            )
        self.store.save(self.record)
        return tuple(Bind(r.store_path, f"/workspace/{r.path}") for r in resolved)

    def _step(
        self, step: StepSpec, step_record: StepRecord, storage: CellStorage, binds: tuple[Bind, ...]
    ) -> bool:
        """Run one step in its own cell; False when it failed (the build stops)."""
        by_name = {s.name: s for s in self.options.secrets}
        with contextlib.ExitStack() as leases:
            caches = [
                (cache, leases.enter_context(self._lease(step, cache, storage)))
                for cache in step.caches
            ]
            ok = self._run_step(
                step, step_record, storage, binds=binds, caches=caches, by_name=by_name
            )
            if ok:
                for cache, lease in caches:
                    self._save_cache(step, cache, lease)
        return ok

    def _save_cache(self, step: StepSpec, cache: CacheSpec, lease: CacheLease) -> None:
        """Publish a step's cache copy unless it holds a secret; one event either way."""
        # Measured first: a copy too large or deep to publish is not scanned at all, so a
        # step cannot make the supervisor read without end.
        size, reason = lease.measure()
        published = False
        if reason is None:
            leaked = _secrets_in_tree(lease.work, self.options.secrets)
            if leaked is None:
                reason = "it cannot be read whole to check it for secrets"
            elif leaked:
                # A cache outlives the step and reaches later builds (untrusted ones start
                # from the trusted cache): a secret must not ride along.
                reason = f"it holds the value of secret {', '.join(leaked)}"
            else:
                saved = lease.commit()
                published, size, reason = saved.published, saved.size, saved.reason
        self.events.emit(
            "cache.save",
            step=step.name,
            key=cache.key,
            path=cache.path,
            trust=lease.trust,
            published=published,
            size=size,
            reason=reason,
        )
        if not published:
            self.events.emit(
                "warning", step=step.name, message=f"cache {cache.key!r} not saved: {reason}"
            )

    def _lease(self, step: StepSpec, cache: CacheSpec, storage: CellStorage) -> CacheLease:
        from buildcell.supply.caches import CacheStore

        identity = storage.identity
        invocation = self.invocation
        scope = self._cache_scope()
        lease = CacheStore(self.state.caches, max_bytes=self.options.cache_max_size).lease(
            invocation.project,
            cache.key,
            scope,
            owner=(identity.uid, identity.gid) if identity.drop else None,
        )
        self.events.emit(
            "cache.restore",
            step=step.name,
            key=cache.key,
            path=cache.path,
            trust=lease.trust,
            scope=scope.describe(),
            source=lease.source,
        )
        return lease

    def _warn(self, message: str) -> None:
        """A repair or a degradation the user should hear of: a warning event (shown)."""
        self.events.emit("warning", message=message)

    def _input_scope(self) -> str:
        """Whose store hits these are: as for caches, a ref's or (no ref) this build's."""
        from buildcell.supply.caches import cache_scope

        invocation = self.invocation
        return cache_scope(invocation.trust, ref=invocation.ref, build_id=self.record.id).name

    def _cache_scope(self) -> CacheScope:
        from buildcell.supply.caches import cache_scope

        if self.scope is None:
            invocation = self.invocation
            self.scope = cache_scope(invocation.trust, ref=invocation.ref, build_id=self.record.id)
            if self.scope.ephemeral:
                self.events.emit(
                    "warning",
                    message="caches of this untrusted build last for this build only: "
                    "give --ref REF to keep them for later builds of the same ref",
                )
        return self.scope

    def finish(self) -> None:
        """After the build, whatever happened: what lasts for this build alone goes, and the
        record keeps what the images cost."""
        self.drop_ephemeral_caches()
        if self.image_budget is not None:
            budget = self.image_budget
            self.record.images = {
                "limit": budget.limit,
                "used": budget.used,
                "images": dict(budget.images),
            }

    def drop_ephemeral_caches(self) -> None:
        """Remove the caches of a build that kept them for itself alone."""
        if self.scope is not None and self.scope.ephemeral:
            from buildcell.supply.caches import CacheStore

            with contextlib.suppress(Error):
                CacheStore(self.state.caches).drop_scope(self.invocation.project, self.scope)

    def _run_step(
        self,
        step: StepSpec,
        step_record: StepRecord,
        storage: CellStorage,
        *,
        binds: tuple[Bind, ...],
        caches: list[tuple[CacheSpec, CacheLease]],
        by_name: dict[str, Secret],
    ) -> bool:
        spec = self.loaded.spec
        config = CellConfig(
            argv=("/bin/sh", "-e", "-c", step.run),
            rootfs=self.rootfs,
            env={**spec.env, **step.env},
            limits=self._limits(step),
            source_date_epoch=self.sde,
            binds=binds,
            variation=self.options.variation,
            # Only the secrets this step declares; every bound value is redacted.
            secrets=tuple(
                CellSecret(SecretDelivery(use.name, use.env), by_name[use.name])
                for use in step.secrets
            ),
            redact=self.options.secrets,
            network=_step_policy(step, self.options),
            pinned_hosts=self.options.pinned_hosts,
            caches=tuple(Bind(lease.work, cache.path) for cache, lease in caches),
            image_budget=self.image_budget,
        )
        step_record.status = "running"
        step_record.started = time.time()
        step_record.limits = config.limits.to_dict()
        step_record.network = list(step.network.allow) if step.network else []
        step_record.secrets = [use.name for use in step.secrets]
        # Not synced: after a crash the build is interrupted whatever this said, and the
        # step's end (below) is; a full disk still fails here.
        self.store.save(self.record, durable=False)
        self.reporter.step_started(step)
        step_log = _StepLog(
            self.store.log_path(self.record.id, step.name),
            self.reporter,
            step,
            max_bytes=self.options.log_max_size,
        )
        try:
            with Cell(
                config,
                state=self.state,
                events=self.events,
                step=step.name,
                storage=storage,
                stdout=step_log.sink("stdout"),
                stderr=step_log.sink("stderr"),
            ) as cell:
                cell_result = cell.run()
        except StateError:
            # Its log (or the audit trail) cannot be written: the cell is gone, the step
            # failed; the build ends with the error.
            step_record.status = "failed"
            step_record.reason = "state"
            raise
        finally:
            step_log.close()
            step_record.duration = time.time() - step_record.started
        step_record.exit_code = cell_result.exit_code
        step_record.reason = _failure_reason(cell_result, storage)
        step_record.egress = [row.to_dict() for row in cell_result.egress or ()]
        step_record.status = "succeeded" if cell_result.exit_code == 0 else "failed"
        self.events.check()
        self.store.save(self.record)
        self.reporter.step_finished(step, step_record)
        if cell_result.exit_code == 0:
            return True
        if storage.disk is None:  # with a budget, a full workspace is the build's own doing
            _check_workspace_space(storage.workspace, step.name)
        self.record.status = "failed"
        self.record.exit_code = cell_result.exit_code
        self.events.emit("build.finish", status="failed", exit_code=self.record.exit_code)
        return False

    def _limits(self, step: StepSpec) -> Limits:
        """What ``step`` runs with: its own limits, the build's, then the operator's defaults."""
        from buildcell.cell.limits import with_defaults
        from buildcell.cell.supervisor import limits_backend

        return with_defaults(
            cell_limits(self.loaded.spec.step_limits(step)),
            self.options.default_limits,
            limits_backend(self.state.host),
        )

    def _collect(self, storage: CellStorage) -> None:
        from buildcell.supply.outputs import (
            check_outputs_for_secrets,
            check_reserved_names,
            collect_outputs,
            validate_patterns,
        )

        record, events = self.record, self.events
        patterns = validate_patterns(self.loaded.spec.output_patterns)
        report = collect_outputs(
            storage.workspace, patterns, self.out, max_bytes=self.output_budget
        )
        check_reserved_names(report)
        check_outputs_for_secrets(report, self.out, self.options.secrets, events.emit)
        for out in report.collected:
            events.emit("output", path=out.path, size=out.size, sha256=out.sha256)
            record.outputs.append({"path": out.path, "sha256": out.sha256, "size": out.size})
        for skipped in report.skipped:
            events.emit(
                "output.skipped",
                path=skipped.path,
                message=f"output {show(skipped.path)} not collected: {skipped.reason}",
            )
        optional = self.loaded.spec.optional_outputs
        for pattern in report.unmatched:
            events.emit(
                "output.unmatched",
                pattern=pattern,
                optional=pattern in optional,
                message=f"output pattern {show(pattern)} matched no file",
            )
        self.missing_outputs = [p for p in report.unmatched if p not in optional]
        self._write_manifest()

    def _fail_missing_outputs(self) -> None:
        """A declared output the build did not make: the build failed (exit 1), and
        publishes nothing."""
        names = ", ".join(show(p) for p in self.missing_outputs)
        self.record.status = "failed"
        self.record.exit_code = 1
        self.record.error = (
            f"output pattern {names} matched no file (a pattern that may match nothing is "
            "written {path: PATTERN, optional: true})"
        )
        self.reporter.message(f"error: {self.record.error}")
        self.events.emit("build.finish", status="failed", exit_code=1, error=self.record.error)

    def _archive(self, name: str) -> None:
        from buildcell.build.repro import write_reproducible_tar_gz

        out_dir = self.out.staging
        members = [o["path"] for o in self.record.outputs]
        from buildcell.supply.outputs import RESERVED_NAMES

        taken = {m.split("/", 1)[0] for m in members} | RESERVED_NAMES
        if name in taken:
            # Two subjects of one name: a verifier would take either file for the build's.
            raise OutputError(
                f"archive {name!r} would take the name of an output or of buildcell's own files",
                hint="name the archive after none of the outputs",
            )
        target = out_dir / name
        digest = write_reproducible_tar_gz(out_dir, members, target, mtime=self.sde)
        size = target.stat().st_size
        self.record.outputs.append({"path": name, "sha256": digest, "size": size})
        self.events.emit("output", path=name, size=size, sha256=digest, archive=True)
        self._write_manifest()

    def _write_manifest(self) -> None:
        record = self.record
        manifest = {
            "build": record.id,
            "name": record.name,
            "spec_digest": record.spec_digest,
            "outputs": record.outputs,
        }
        text = json.dumps(manifest, indent=2) + "\n"
        self.out.write_file("outputs.json", text.encode())
        (self.store.dir(record.id) / "outputs.json").write_text(text)

    def _measure_platform(self) -> None:
        """Record what the platform is and what the rootfs holds, for provenance."""
        from buildcell import __version__
        from buildcell.cell import seccomp

        profile = seccomp.default_profile()
        uname = os.uname()
        self.record.platform = {
            "buildcell": __version__,
            "bubblewrap": bwrap_version(find_bwrap(self.state.host)),
            "kernel": f"{uname.sysname} {uname.release} {uname.machine}",
            "seccomp": {"name": profile.name, "digest": profile.digest()},
        }
        if isinstance(self.rootfs, HostRootfs):
            from buildcell.cell.rootfs import host_rootfs_digest

            digest, covers = host_rootfs_digest()
            dependency: dict[str, Any] = {
                "uri": "host:/usr",
                "sha256": digest,
                "annotations": {"covers": covers},
            }
        elif isinstance(self.rootfs, DirRootfs):
            # The same listing digest as a source tree: paths, kinds, modes, contents; of
            # the directory opened confined (a spec's rootfs is the repository's path).
            root_fd = self.rootfs.open()
            try:
                digest = tree_digest_at(root_fd, label=self.rootfs.path)
            finally:
                os.close(root_fd)
            dependency = {"uri": self.record.rootfs, "sha256": digest}
        else:
            assert isinstance(self.rootfs, OciRootfs)
            dependency = {
                "uri": f"oci:{self.rootfs.path}",
                "sha256": self.rootfs.digest.removeprefix("sha256:"),
            }
        self.record.rootfs_dependency = dependency

    def _provenance(self) -> None:
        from buildcell.build.statement import provenance_statement
        from buildcell.supply.provenance import (
            KeyFile,
            assert_no_values,
            sign_statement,
            unsigned_envelope,
            write_bundle,
            write_provenance,
        )

        record = self.record
        record_dir = self.store.dir(record.id)
        record.byproducts = [
            {
                "uri": f"logs/{s.name}.log",
                "sha256": sha256_file(record_dir / "logs" / f"{s.name}.log"),
            }
            for s in record.steps
            if (record_dir / "logs" / f"{s.name}.log").exists()
        ]
        record.byproducts.append(
            {"uri": "events.jsonl", "sha256": sha256_file(record_dir / "events.jsonl")}
        )
        statement = provenance_statement(
            record,
            self.loaded.text,
            builder_id=self.options.builder_id,
            finished=datetime.now(UTC),
        )
        assert_no_values(statement, {s.name: s.reveal() for s in self.options.secrets})
        # Only now, with every cell of the build gone, is the key read.
        key = self.options.sign_key
        if isinstance(key, KeyFile):
            key = key.load()
        envelope = sign_statement(statement, key) if key else unsigned_envelope(statement)
        write_provenance(self.out.staging / "provenance.intoto.jsonl", envelope)
        if key:
            # The same envelope as a Sigstore bundle, for @sigstore/verify and cosign.
            write_bundle(self.out.staging / "provenance.sigstore.json", envelope, key.public)
        path = self.result.out_dir / "provenance.intoto.jsonl"
        self.result.provenance = path
        self.result.signed_by = key.keyid if key else None
        self.events.emit(
            "provenance", path=str(path), signed=key is not None, keyid=key.keyid if key else None
        )


def _secrets_in_tree(root: Path, secrets: Sequence[Secret]) -> list[str] | None:
    """Names of the secrets whose value (in any encoding) is in a name, link or file of
    ``root``, a tree a cell wrote; ``None`` if it cannot be read whole (then nothing in it
    may be trusted to be free of them).

    Walked by directory descriptor, one held per level, never following a link; each file
    read only as far as the size it had when opened. The caller bounds the tree first
    (depth, size): a cache is measured before it is scanned.
    """
    if not secrets:
        return []
    from buildcell.redact import Scanner

    index = Scanner(secrets)  # built once; a fresh scan for each name, link and file
    found: set[str] = set()
    try:
        top = os.open(root, _DIR_NOFOLLOW)
    except OSError:
        return None
    stack: list[tuple[int, list[str] | None]] = [(top, None)]
    try:
        while stack:
            dir_fd, pending = stack[-1]
            if pending is None:
                pending = _scan_directory(dir_fd, index, found)
                stack[-1] = (dir_fd, pending)
            if not pending:
                stack.pop()
                os.close(dir_fd)
                continue
            stack.append((os.open(pending.pop(), _DIR_NOFOLLOW, dir_fd=dir_fd), None))
    except OSError:
        return None
    finally:
        for fd, _ in stack:
            os.close(fd)
    return sorted(found)


def _scan_directory(dir_fd: int, index: Scanner, found: set[str]) -> list[str]:
    """Scan one directory's names, links and files into ``found``; return its subdirectories.

    Raises:
        OSError: an entry cannot be read.
    """
    subdirs: list[str] = []
    with os.scandir(dir_fd) as it:
        for entry in it:
            _scan_entry(entry, dir_fd, index, found, subdirs)
    return subdirs


def _scan_entry(
    entry: os.DirEntry[str], dir_fd: int, index: Scanner, found: set[str], subdirs: list[str]
) -> None:
    named = index.fresh()
    named.feed(entry.name.encode(errors="surrogateescape"))
    found |= named.found
    scanner = index.fresh()
    if entry.is_symlink():
        scanner.feed(os.readlink(entry.name, dir_fd=dir_fd).encode(errors="surrogateescape"))
    elif entry.is_dir(follow_symlinks=False):
        subdirs.append(entry.name)
    elif entry.is_file(follow_symlinks=False):
        fd = os.open(entry.name, _FILE_NOFOLLOW, dir_fd=dir_fd)
        with os.fdopen(fd, "rb") as f:
            left = os.fstat(f.fileno()).st_size
            while left > 0 and (chunk := f.read(min(1 << 20, left))):
                scanner.feed(chunk)
                left -= len(chunk)
    found |= scanner.found


_DIR_NOFOLLOW = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_NOFOLLOW = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _step_policy(step: StepSpec, options: BuildOptions) -> EgressPolicy | None:
    """The step's allowlist (the spec's), with the operator's pins that the operator's own
    grants (``--allow``, ``network.allow`` of the configuration file) allow exactly: a
    spec can name a pinned name, never grant it."""
    if step.network is None or not step.network.allow:
        return None
    from buildcell.allowlist import EgressPolicy

    policy = EgressPolicy.from_strings(step.network.allow)
    if not options.pinned_hosts:
        return policy
    return policy.with_pins(options.pinned_hosts, granted=EgressPolicy.from_strings(options.allow))


def check_reproducible(
    loaded: LoadedSpec,
    *,
    out_dir: Path,
    state: StateDir | None = None,
    reporter: BuildReporter | None = None,
    options: BuildOptions | None = None,
) -> tuple[BuildResult, BuildResult | None, ReproReport | None]:
    """Build twice in fresh cells and workspaces, varying what a build should not depend
    on (start time, build id, environment order, umask, number of CPUs), and compare the
    outputs bit for bit. The first build's outputs land in ``out_dir``.

    Returns:
        Both results and the comparison; the second result and the report are ``None``
        when the first build failed.

    Raises:
        Error: a build could not be run as asked.
    """
    from buildcell.build.repro import compare_trees

    state = state or StateDir()
    options = options or BuildOptions()
    first = run_build(loaded, out_dir=out_dir, state=state, reporter=reporter, options=options)
    if first.exit_code != 0:
        return first, None, None
    scratch = state.root / "repro" / first.build_id
    scratch.parent.mkdir(mode=0o700, exist_ok=True)
    try:
        variation = Variation(reverse_env=True, umask=0o002, cpus=1)
        second = run_build(
            loaded,
            out_dir=scratch,
            state=state,
            reporter=reporter,
            options=dataclasses.replace(
                options, variation=variation, sign_key=None, twin_of=first.build_id
            ),
        )
        report = None
        if second.exit_code == 0:
            paths = [o["path"] for o in first.record.outputs]
            report = compare_trees(out_dir, scratch, paths=paths, state=state)
            first.record.reproducible = report.reproducible
            RecordStore(state.root / "builds").save(first.record)
    finally:
        remove_tree(scratch)
    return first, second, report
