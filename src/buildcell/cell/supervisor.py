"""A cell from start to finish: prepare, run, collect outputs, tear down, verify."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import resource
import select
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self

from buildcell import _log
from buildcell._text import show
from buildcell.cell import _spawn, reaper
from buildcell.cell.bwrap import Mount, SandboxPlan, bwrap_argv, split_options
from buildcell.cell.config import (
    CELL_GID,
    CELL_HOSTNAME,
    CELL_PATH,
    CELL_UID,
    CELL_WORKSPACE,
    CellConfig,
    DirRootfs,
    HostRootfs,
    OciRootfs,
    Rootfs,
)
from buildcell.cell.etcdir import EtcNotPrepared, PreparedEtc, prepared_etc
from buildcell.cell.limits import (
    CellCgroup,
    LimitsBackend,
    fallback_plan,
    host_backend,
    needs_cgroup,
)
from buildcell.cell.resolve import resolve_command
from buildcell.cell.rootfs import (
    OpenedTree,
    WritableAreas,
    cell_mounts,
    etc_mounts,
    open_tree,
    rootfs_mounts,
    synthesized_etc,
    tree_mounts,
)
from buildcell.cell.storage import CellStorage, Scratch, new_cell_id
from buildcell.errors import (
    CommandNotExecutableError,
    CommandNotFoundError,
    ConfigError,
    SandboxError,
    SeccompError,
)
from buildcell.events import EventLog
from buildcell.host import HostEnv
from buildcell.state import StateDir, unreachable_ancestor

if TYPE_CHECKING:
    import socket

    from buildcell.cell.netns import NetnsPlan
    from buildcell.cell.terminal import Terminal
    from buildcell.egress.audit import EgressSummaryRow
    from buildcell.egress.service import EgressService
    from buildcell.supply.images import UnpackBudget
    from buildcell.supply.outputs import OutputDir, OutputReport

__all__ = [
    "Cell",
    "CellResult",
    "TeardownReport",
    "bwrap_version",
    "find_bwrap",
    "limits_backend",
    "run_cell",
]

log = _log.get(__name__)


def limits_backend(host: HostEnv) -> LimitsBackend:
    """The host's limits backend, detected once per process (and delegated parent)."""
    return _limits_backend(host.cgroup_parent)


@functools.cache
def _limits_backend(delegated: Path | None) -> LimitsBackend:
    return host_backend(delegated)


def find_bwrap(host: HostEnv) -> str:
    """Path of bubblewrap (``host.bwrap``, from ``$BUILDCELL_BWRAP``, or ``bwrap`` on PATH).

    Raises:
        SandboxError: it is not installed.
    """
    path = host.bwrap_path()
    if path is None:
        raise SandboxError(
            "bubblewrap (bwrap) is not installed",
            hint="install it: apt-get install bubblewrap (or dnf install bubblewrap)",
        )
    return path


@functools.cache
def bwrap_version(bwrap: str) -> str:
    """``bubblewrap X.Y.Z`` as the bubblewrap at ``bwrap`` says, or ``unknown``."""
    try:
        out = subprocess.run(
            [bwrap, "--version"], capture_output=True, text=True, timeout=10, env={},
            check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError, SandboxError):
        return "unknown"
    return out.stdout.strip() or "unknown"


@dataclass(frozen=True)
class TeardownReport:
    """What teardown checked after the cell ended."""

    processes_left: int
    killed: int
    cgroups_removed: bool
    workspace_removed: bool
    mounts_left: int
    anchor_stopped: bool
    network_released: bool = True

    @property
    def clean(self) -> bool:
        return (
            self.processes_left == 0
            and self.cgroups_removed
            and self.workspace_removed
            and self.mounts_left == 0
            and self.anchor_stopped
            and self.network_released
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "clean": self.clean,
            "processes_left": self.processes_left,
            "killed": self.killed,
            "cgroups_removed": self.cgroups_removed,
            "workspace_removed": self.workspace_removed,
            "mounts_left": self.mounts_left,
            "anchor_stopped": self.anchor_stopped,
            "network_released": self.network_released,
        }


@dataclass
class CellResult:
    """The outcome of one cell.

    Attributes:
        exit_code: the command's status; 124 on timeout; 128+N when killed by signal N;
            137 on out-of-memory.
        reason: ``exited``, ``signaled``, ``timeout`` or ``oom``.
    """

    cell_id: str
    exit_code: int
    reason: str
    signal: int | None
    duration: float
    warnings: tuple[str, ...] = ()
    outputs: OutputReport | None = None
    teardown: TeardownReport | None = None
    oom_kills: int = 0
    egress: list[EgressSummaryRow] | None = None
    #: forks refused at the pids limit (cgroups only): why a command may have failed
    pids_refused: int = 0


def _etc_memfds() -> dict[str, int]:
    """The synthesized /etc files in memory files of one cell's own (closed at teardown)."""
    fds: dict[str, int] = {}
    try:
        for name, data in synthesized_etc().items():
            fd = os.memfd_create(f"buildcell-etc-{name}", os.MFD_CLOEXEC)
            fds[name] = fd
            os.write(fd, data)
            os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return fds


@functools.cache
def _host_root_mounts(*, etc: bool) -> tuple[Mount, ...]:
    # The host's top-level layout does not change while a supervisor runs; each bind is
    # still resolved afresh by bubblewrap when a cell starts.
    return tuple(rootfs_mounts(HostRootfs(), etc=etc))


def _check_reachable(where: Path) -> None:
    """bubblewrap (0.8 with ``--ro-bind-fd`` backported) binds a descriptor by resolving its
    path again, as the cell's unprivileged uid: every directory above must be traversable.

    Raises:
        ConfigError: one is not.
    """
    blocked = unreachable_ancestor(where / "x")
    if blocked is not None:
        raise ConfigError(
            f"rootfs {where} is not readable by the cell's unprivileged uid: "
            f"{blocked} has mode {blocked.stat().st_mode & 0o7777:04o}",
            hint=f"chmod o+rx {blocked}",
        )


def _open_rootfs(
    rootfs: DirRootfs | OciRootfs,
    state: StateDir,
    budget: UnpackBudget | None,
    warn: Callable[[str], None],
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[OpenedTree, Path]:
    """Open a directory or image rootfs as a tree: every entry by descriptor, no host path
    resolved through anything the rootfs holds.

    Raises:
        ConfigError: the directory is missing, leaves the directory it must be inside, or
            has too many entries.
        ImageError: the image cannot be verified or unpacked.
    """
    from buildcell import confined

    if isinstance(rootfs, OciRootfs):
        from buildcell.supply.images import unpack_image

        what = f"image {rootfs.digest}"
        if rootfs.beneath is None:
            path = unpack_image(
                rootfs.path,
                rootfs.digest,
                cache_dir=state.cache,
                budget=budget,
                warn=warn,
                progress=progress,
            )
        else:
            # A spec's image: opened below the spec's directory, never through a link out.
            rel = os.path.relpath(rootfs.path, rootfs.beneath)
            with confined.opened_root(rootfs.beneath, what="the spec's directory") as spec_fd:
                image_fd = confined.open_path(spec_fd, rel, what=f"rootfs image {rel!r}")
            try:
                path = unpack_image(
                    image_fd,
                    rootfs.digest,
                    cache_dir=state.cache,
                    budget=budget,
                    label=rel,
                    warn=warn,
                    progress=progress,
                )
            finally:
                os.close(image_fd)
        root_fd = confined.open_root(path, what=what)
    else:
        what = f"rootfs {rootfs.describe()}"
        root_fd = rootfs.open()
    try:
        # The path the kernel has for what was opened: no symlink of the rootfs in it.
        where = Path(os.readlink(f"/proc/self/fd/{root_fd}"))
        return open_tree(root_fd, what=what), where
    except OSError as e:
        raise ConfigError(f"cannot read {what}: {e.strerror}") from e
    finally:
        os.close(root_fd)


def _mount_point(ws_fd: int, parts: list[str], owner: tuple[int, int] | None, *, what: str) -> None:
    """Directories ``parts[:-1]`` (made and given to ``owner`` where missing) and an empty
    file ``parts[-1]`` below the workspace, none of them through a symlink."""
    from buildcell import confined

    fd = os.dup(ws_fd)
    try:
        for name in parts[:-1]:
            sub, made = confined.make_dirs(fd, [name], what=what)
            os.close(fd)
            fd = sub
            if made and owner is not None:
                os.fchown(fd, *owner)
        name = parts[-1]
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise ConfigError(
                f"{what}: the workspace has a directory where the input goes",
                hint="choose another path for the input, or remove that directory",
            )
        if st is not None and not stat.S_ISREG(st.st_mode):
            os.unlink(name, dir_fd=fd)  # a link or a fifo: the input is bound in its place
            st = None
        if st is None:
            file_fd = os.open(
                name,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o644,
                dir_fd=fd,
            )
            try:
                if owner is not None:
                    os.fchown(file_fd, *owner)
            finally:
                os.close(file_fd)
    except OSError as e:
        raise ConfigError(f"{what}: cannot prepare its place in the workspace: {e.strerror}") from e
    finally:
        os.close(fd)


def _reachable(mount: Mount, storage: CellStorage) -> Mount:
    """``mount`` with a source the supervisor can reach (for looking the command up)."""
    if mount.kind == "bind" and mount.src is not None:
        return dataclasses.replace(mount, src=str(storage.host_path(mount.src)))
    return mount


def _args_memfd(argv: list[str], more: bytes = b"") -> tuple[int, list[str]]:
    """Move bubblewrap's options into a memory file for ``--args``.

    Returns:
        (the descriptor, the argv that remains: bubblewrap, ``--args FD``, ``--`` and the
        command).
    """
    options, tail = split_options(argv)
    options += more
    fd = os.memfd_create("buildcell-bwrap-args", os.MFD_CLOEXEC)
    try:
        view = memoryview(options)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd, [argv[0], "--args", str(fd), *tail]


def _seccomp_memfd(bpf: bytes) -> int:
    fd = os.memfd_create("buildcell-seccomp", os.MFD_CLOEXEC)
    os.write(fd, bpf)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


@dataclass(frozen=True)
class LaunchPlan:
    """How one cell is started (plain data, from :func:`plan_launch`).

    Attributes:
        sandbox: bubblewrap's plan, with the descriptors it is handed.
        netns: the network namespace to prepare, or ``None`` for no network at all.
        netns_mode: who makes it: the spawning ``thread`` (as root: the fork stays a
            vfork), or the ``child`` between fork and exec (rootless, or inside the
            storage anchor's namespaces).
    """

    sandbox: SandboxPlan
    netns: NetnsPlan | None = None
    netns_mode: Literal["none", "thread", "child"] = "none"


def plan_launch(
    base: SandboxPlan,
    *,
    secret_mounts: Sequence[Mount] = (),
    seccomp_fd: int | None = None,
    status_fd: int | None = None,
    block_fd: int | None = None,
    network_ports: frozenset[int] | None = None,
    rootless: bool = False,
    anchored: bool = False,
) -> LaunchPlan:
    """The launch of a prepared cell, from its sandbox plan and the descriptors it gets.

    Pure: the secret mounts go before the final remount of ``/`` (``/run/secrets`` is a
    tmpfs of this cell alone); a network namespace needs a user namespace to belong to,
    rootless: the anchor's when there is one (the cell enters it first), else one made
    with it.
    """
    mounts = base.mounts
    if secret_mounts:
        mounts = (*mounts[:-1], *secret_mounts, mounts[-1])
    sandbox = dataclasses.replace(
        base,
        mounts=mounts,
        seccomp_fd=seccomp_fd,
        status_fd=status_fd,
        extra=(*base.extra, *(("--block-fd", str(block_fd)) if block_fd is not None else ())),
    )
    if network_ports is None:
        return LaunchPlan(sandbox)
    from buildcell.cell.netns import plan_netns

    netns = plan_netns(network_ports, own_userns=rootless and not anchored)
    mode: Literal["thread", "child"] = (
        "thread" if not netns.own_userns and not anchored else "child"
    )
    return LaunchPlan(sandbox, netns, mode)


class _Descriptors:
    """What one launch hands bubblewrap: closed once it has them, or at the end."""

    def __init__(self) -> None:
        self.passed: list[int] = []  # handed to bubblewrap
        self._owned: list[int] = []  # ours to close once bubblewrap has them
        self.status_r: int | None = None  # kept: read while the cell runs
        self.block_w: int | None = None  # kept: releases the cell once its rlimit is set

    def own(self, fd: int) -> int:
        self._owned.append(fd)
        return fd

    def pass_owned(self, fd: int) -> int:
        self.passed.append(fd)
        return self.own(fd)

    def close_passed(self) -> None:
        for fd in self._owned:
            os.close(fd)
        self._owned = []

    def close_all(self) -> None:
        self.close_passed()
        for attr in ("status_r", "block_w"):
            fd = getattr(self, attr)
            if fd is not None:
                os.close(fd)
                setattr(self, attr, None)


_EXEC_FAILURE = re.compile(rb"bwrap: execvp ([^:\n]*): ([^\n]*)")


class Cell:
    """One sandbox run, as a context manager.

    ``with Cell(config) as cell: result = cell.run()``; outputs are collected by
    ``cell.collect()``; leaving the block kills whatever is left, removes the cgroup,
    the workspace (unless a shared ``storage`` owns it) and emits a ``teardown`` event.

    Args:
        config: what to run.
        state: the state directory (default location if omitted).
        events: where events go (nowhere if omitted).
        step: the build step name stamped on events.
        storage: a workspace shared with other cells of the same build; the cell then
            neither populates nor removes it.
        stdout/stderr: sinks for the cell's output (default: this process's stdout/stderr).

    Raises:
        ConfigError, SandboxError, SeccompError, StateError: on entering, when the cell
            cannot be prepared; CommandNotFoundError/CommandNotExecutableError (127/126).
    """

    def __init__(
        self,
        config: CellConfig,
        *,
        state: StateDir | None = None,
        events: EventLog | None = None,
        step: str | None = None,
        storage: CellStorage | None = None,
        stdout: _spawn.Sink | None = None,
        stderr: _spawn.Sink | None = None,
    ) -> None:
        self.config = config
        self._state = state
        self.cell_id = new_cell_id()
        self.events = events or EventLog(build=self.cell_id)
        self.step = step
        self._shared_storage = storage
        self.storage: CellStorage | None = storage
        self._stdout = stdout or _spawn.fd_writer(1)
        self._stderr = stderr or _spawn.fd_writer(2)
        self._cgroup: CellCgroup | None = None
        self._cgroup_writable = False  # its cgroup.procs files, by the cell's first process
        self._scratch: Scratch | None = None
        self._warnings: list[str] = []
        self._argv: list[str] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._init_pidfd: int | None = None
        self._killed = 0
        self._nproc: int | None = None
        self._affinity: frozenset[int] | None = None
        self._rlimits: tuple[tuple[int, int], ...] = ()
        self._bpf: bytes | None = None
        self._seccomp_info: dict[str, Any] = {}
        self._egress: EgressService | None = None
        self._terminal: Terminal | None = None
        self._tree: OpenedTree | None = None
        self._etc_fds: dict[str, int] = {}
        self._etc: PreparedEtc | None = None
        self._out: OutputDir | None = None
        self._backend_mode = "rlimit"
        self.result: CellResult | None = None

    # -- preparation ---------------------------------------------------------------

    def __enter__(self) -> Self:
        try:
            self._prepare()
        except BaseException:
            self._teardown(emit=False)
            raise
        return self

    def _prepare(self) -> None:
        cfg = self.config
        state = self._state or StateDir()
        bwrap = find_bwrap(state.host)
        self._state = state
        if cfg.outputs and self._shared_storage is None:
            from buildcell.supply.outputs import OutputDir

            # Claimed before anything runs: a busy or unusable directory stops the cell.
            self._out = OutputDir(
                cfg.resolved_out_dir(), lock_dir=state.locks, wait=cfg.wait_for_out_dir
            )
        if self.storage is None:
            self.storage = CellStorage(
                state, cell_id=self.cell_id, bwrap=bwrap, disk=cfg.limits.disk
            )
            source = cfg.resolved_source()
            if source is not None:
                exclude = [cfg.resolved_out_dir(), state.root]
                if self._out is not None:
                    exclude.append(self._out.staging)
                stats = self.storage.populate(source, exclude)
                self.events.emit("workspace", **self.storage.describe(stats), source=str(source))
                for rel, why in stats.skipped if stats is not None else ():
                    self._warn(f"source entry {rel} not copied into the workspace: {why}")
        storage = self.storage
        self._scratch = storage.new_scratch()
        root = self._root_mounts(state, storage)
        self._prepare_mount_points(storage)

        backend = limits_backend(state.host)
        self._backend_mode = backend.mode
        if backend.mode != "rlimit" and needs_cgroup(cfg.limits, backend):
            self._cgroup = CellCgroup(backend, f"{state.tag}.{self.cell_id}", cfg.limits)
            storage.note_cgroups(self._cgroup.dirs)
            identity = storage.identity
            # The cell's first process joins them itself, as the cell's uid (see _spawn).
            self._cgroup_writable = not identity.drop or self._cgroup.let_join(
                identity.uid, identity.gid
            )
        fallback = fallback_plan(cfg.limits, backend, sorted(os.sched_getaffinity(0)))
        self._rlimits, self._nproc, self._affinity = (
            fallback.rlimits,
            fallback.nproc,
            fallback.affinity,
        )
        for warning in fallback.warnings:
            self._warn(warning, event="limit.degraded")

        self._prepare_seccomp()

        mounts = cell_mounts(
            root,
            WritableAreas(
                storage.workspace_bind,
                self._scratch.tmp,
                self._scratch.home,
                tuple((str(b.src), b.dest) for b in cfg.binds),
                tuple((str(b.src), b.dest) for b in cfg.caches),
            ),
        )
        env = cfg.cell_env()
        argv0 = resolve_command(
            cfg.argv[0],
            # The command is looked up where the supervisor reaches what the cell will see:
            # with a disk budget the workspace lives in the anchor's namespace.
            mounts=[_reachable(m, storage) for m in mounts],
            path_env=env.get("PATH", CELL_PATH),
            cwd=CELL_WORKSPACE,
            host_uid=storage.identity.uid,
            host_gid=storage.identity.gid,
        )
        variation = cfg.variation
        ordered = sorted(env.items(), reverse=bool(variation and variation.reverse_env))
        if variation is not None and variation.cpus is not None:
            available = sorted(self._affinity or os.sched_getaffinity(0))
            self._affinity = frozenset(available[: max(1, variation.cpus)])
        argv = (argv0, *cfg.argv[1:])
        if cfg.tty:
            shell = resolve_command(
                TERMINAL_SESSION[0],
                mounts=[_reachable(m, storage) for m in mounts],
                path_env=CELL_PATH,
                cwd=CELL_WORKSPACE,
                host_uid=storage.identity.uid,
                host_gid=storage.identity.gid,
            )
            argv = (shell, *TERMINAL_SESSION[1:], *argv)
        self._plan = SandboxPlan(
            mounts=mounts,
            argv=argv,
            env=tuple(ordered),
            cwd=CELL_WORKSPACE,
            hostname=CELL_HOSTNAME,
            uid=CELL_UID,
            gid=CELL_GID,
            share_net=cfg.has_network,
            # With a terminal too: the command's session, inside the sandbox, takes it.
            extra=("--as-pid-1",) if cfg.tty else (),
        )
        self._bwrap = bwrap

    def _prepare_mount_points(self, storage: CellStorage) -> None:
        """Make the mount points of binds into the workspace, confined.

        bubblewrap before 0.12 follows a symlink on the way to a mount point while it makes
        it, outside the sandbox (CVE-2026-87766): a workspace where ``vendor`` is a link to
        ``/oldroot/etc`` would have it create files on the host. So every directory on the
        way is made here as a real directory (a symlink there is refused) and the mount
        point itself as an empty file, and bubblewrap finds them in place.

        Raises:
            ConfigError: a directory on the way is a symlink or a file, or the mount point
                is a directory.
        """
        from buildcell import confined

        inside = [b for b in self.config.binds if b.dest.startswith(CELL_WORKSPACE + "/")]
        if not inside:
            return
        owner = (storage.identity.uid, storage.identity.gid) if storage.identity.drop else None
        with confined.opened_root(storage.workspace, what="the workspace") as ws:
            for bind in inside:
                parts = bind.dest[len(CELL_WORKSPACE) + 1 :].split("/")
                _mount_point(ws, parts, owner, what=f"input {'/'.join(parts)!r}")

    def _root_mounts(self, state: StateDir, storage: CellStorage) -> list[Mount]:
        """The cell's read-only root: the host's, with the prepared /etc (or its entries
        one by one where there is none), or a directory rootfs opened beneath its root."""
        cfg = self.config
        rootfs: Rootfs = cfg.rootfs
        if isinstance(rootfs, HostRootfs):
            try:
                if os.geteuid() != 0 and not (cfg.seccomp and cfg.seccomp_profile is None):
                    # Rootless the copy is the cell's own uid's: only the built-in filter
                    # keeps it from taking a lease that stalls every other cell's open.
                    raise EtcNotPrepared("rootless without the built-in seccomp profile")
                self._etc = prepared_etc(state.etc, warn=self._warn)
                return [*_host_root_mounts(etc=False), *self._etc.mounts()]
            except EtcNotPrepared as e:
                self.events.emit("etc.unprepared", step=self.step, cell=self.cell_id, why=str(e))
                self._etc_fds = _etc_memfds()
                return [*_host_root_mounts(etc=True), *etc_mounts(self._etc_fds)]
        self._etc_fds = _etc_memfds()
        self._tree, where = _open_rootfs(
            rootfs, state, cfg.image_budget, self._warn, progress=self._unpack_progress
        )
        if storage.identity.drop:
            _check_reachable(where)
        return tree_mounts(self._tree, etc_files=self._etc_fds)

    def _prepare_seccomp(self) -> None:
        from buildcell.cell import seccomp

        cfg = self.config
        if not cfg.seccomp:
            self._warn(
                "--unsafe-no-seccomp: the cell runs without a syscall filter",
                event="security.unsafe",
            )
            self._seccomp_info = {"profile": None, "unsafe": "no-seccomp"}
            return
        if cfg.seccomp_profile is not None:
            profile = seccomp.load_profile(cfg.seccomp_profile)
        else:
            profile = seccomp.default_profile()
        try:
            self._bpf = seccomp.compile_bpf(profile, cache_dir=self._cache_dir(), warn=self._warn)
        except SeccompError:
            raise
        except OSError as e:
            raise SeccompError(f"cannot compile seccomp profile {profile.name}: {e}") from e
        self._seccomp_info = {"profile": profile.name, "digest": profile.digest()}

    def _cache_dir(self) -> Path | None:
        return self._state.cache if self._state is not None else None

    def _unpack_progress(self, report: dict[str, Any]) -> None:
        """An image unpack that takes a while says how far it is (``image.unpack``)."""
        self.events.emit("image.unpack", step=self.step, cell=self.cell_id, **report)

    def _warn(self, message: str, *, event: str = "warning") -> None:
        self._warnings.append(message)
        log.warning("%s", message)
        self.events.emit(event, step=self.step, cell=self.cell_id, message=message)

    # -- running -------------------------------------------------------------------

    def run(self) -> CellResult:
        """Run the command to completion (or timeout) and return the result.

        Raises:
            SandboxError: bubblewrap could not set the sandbox up (exit 125).
            CommandNotFoundError, CommandNotExecutableError: exec failed (127/126).
        """
        assert self.storage is not None, "use Cell as a context manager"
        fds = _Descriptors()
        try:
            launch = self._open_and_plan(fds)
            for port in launch.netns.skipped_ports if launch.netns is not None else ():
                self._warn(
                    f"port {port} is used by the cell's proxy or resolver: connections to it "
                    "go through the proxy only, not transparently"
                )
            self._emit_start()
            started = time.monotonic()
            self._launch(launch, fds)
        except BaseException:
            fds.close_all()
            raise
        fds.close_passed()
        try:
            outcome = self._supervise(fds, started)
        finally:
            fds.close_all()
        self.result = self._classify(outcome)
        return self.result

    def _open_and_plan(self, fds: _Descriptors) -> LaunchPlan:
        """Open what bubblewrap is handed (pipes, memory files), then plan the launch."""
        assert self.storage is not None
        cfg = self.config
        fds.status_r, status_w = os.pipe2(os.O_CLOEXEC)
        fds.pass_owned(status_w)
        seccomp_fd = fds.pass_owned(_seccomp_memfd(self._bpf)) if self._bpf is not None else None
        if self._tree is not None:
            fds.passed += self._tree.fds  # the tree's own, closed at teardown
        fds.passed += self._etc_fds.values()  # closed at teardown too
        secret_mounts: list[Mount] = []
        secret_env = b""
        if cfg.secrets:
            secret_mounts, secret_env = self._secret_fds(fds)
        block_fd = None
        if self._nproc is not None:
            # RLIMIT_NPROC is counted per user namespace level: it must be set on the
            # sandbox's first process after bubblewrap made its namespaces, or every
            # process of the caller on the host would count against it.
            block_r, fds.block_w = os.pipe2(os.O_CLOEXEC)
            block_fd = fds.pass_owned(block_r)
        launch = plan_launch(
            self._plan,
            secret_mounts=secret_mounts,
            seccomp_fd=seccomp_fd,
            status_fd=status_w,
            block_fd=block_fd,
            network_ports=cfg.network.name_ports() if cfg.has_network and cfg.network else None,
            rootless=os.geteuid() != 0,
            anchored=self.storage.anchor is not None,
        )
        # Everything but the command goes through --args: bubblewrap's argv, which every
        # local user and the cell itself (/proc/1/cmdline) can read, names no host path.
        args_fd, self._argv = _args_memfd(bwrap_argv(launch.sandbox, self._bwrap), secret_env)
        fds.pass_owned(args_fd)
        return launch

    def _emit_start(self) -> None:
        assert self.storage is not None
        cfg = self.config
        self.events.emit(
            "cell.start",
            step=self.step,
            cell=self.cell_id,
            argv=list(cfg.argv),
            rootfs=cfg.rootfs.describe(),
            limits=cfg.limits.to_dict(),
            limits_backend=self._backend_mode,
            seccomp=self._seccomp_info,
            network=cfg.network.describe() if cfg.has_network and cfg.network else "none",
            host_uid=self.storage.identity.uid,
        )

    def _launch(self, launch: LaunchPlan, fds: _Descriptors) -> None:
        """Start bubblewrap as planned, and the egress service on its listeners."""
        assert self.storage is not None
        cfg = self.config
        identity, anchor = self.storage.identity, self.storage.anchor
        in_namespace: contextlib.AbstractContextManager[list[socket.socket] | None]
        in_namespace = contextlib.nullcontext()
        in_child: Callable[[], None] | None = None
        channel: tuple[socket.socket, socket.socket] | None = None
        if launch.netns is not None:
            from buildcell.cell import netns

            if launch.netns_mode == "thread":
                # As root, the spawning thread alone enters the namespace and binds the
                # listeners; bubblewrap inherits it, and the fork stays a vfork.
                in_namespace = netns.thread_netns(launch.netns)
            else:
                import socket

                channel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                in_child = netns.child_setup(launch.netns, channel[1])
        if cfg.tty:
            self._terminal = _open_terminal((identity.uid, identity.gid) if identity.drop else None)
        spawn_plan = _spawn.SpawnPlan(
            argv=self._argv,
            pass_fds=tuple(fds.passed),
            cgroup_procs=tuple(map(str, self._cgroup.procs_files())) if self._cgroup else (),
            cgroup_procs_writable=self._cgroup_writable,
            rlimits=self._rlimits,
            affinity=self._affinity,
            setns_fds=anchor.setns_fds if anchor is not None else (),
            drop_to=(identity.uid, identity.gid) if identity.drop else None,
            stdin=0 if cfg.interactive else None,
            umask=cfg.variation.umask if cfg.variation is not None else None,
            in_child=in_child,
            # bwrap_argv always passes --die-with-parent, and the status pipe is ours.
            self_guarded=True,
            terminal=self._terminal.slave if self._terminal is not None else None,
        )
        try:
            with in_namespace as listeners:
                try:
                    self._proc = _spawn.spawn(spawn_plan)
                except (OSError, subprocess.SubprocessError) as e:
                    # SubprocessError: a step between fork and exec failed (joining a
                    # cgroup, the network namespace, the uid switch).
                    why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                    raise SandboxError(f"cannot start bubblewrap: {why}") from e
            if self._terminal is not None:
                self._terminal.start()
            if launch.netns is not None:
                if channel is not None:
                    from buildcell.cell.netns import receive_listeners

                    channel[1].close()
                    listeners = receive_listeners(channel[0], launch.netns)
                assert listeners is not None
                self._start_egress(listeners, launch.netns)
        finally:
            if channel is not None:
                for end in channel:
                    end.close()

    def _supervise(self, fds: _Descriptors, started: float) -> _spawn.PumpResult:
        """Stream the cell's output and wait for it (or its timeout)."""
        assert self._proc is not None
        block_w = fds.block_w

        def on_status(obj: dict[str, object]) -> None:
            pid = obj.get("child-pid")
            if isinstance(pid, int) and self._init_pidfd is None:
                if self._cgroup is not None:
                    # bubblewrap has cloned its sandbox: dash joined before it ran.
                    self._cgroup.take_back()
                with contextlib.suppress(OSError):
                    self._init_pidfd = os.pidfd_open(pid)
                    if self._nproc is not None:
                        resource.prlimit(pid, resource.RLIMIT_NPROC, (self._nproc, self._nproc))
                if block_w is not None:
                    os.write(block_w, b"x")

        assert fds.status_r is not None
        stdout, stderr, flush = self._output_sinks()
        try:
            return _spawn.pump(
                self._proc,
                status_fd=fds.status_r,
                stdout=stdout,
                stderr=stderr,
                timeout=self.config.limits.timeout,
                on_status=on_status,
                kill=self._kill,
                started=started,
                terminal=self._terminal.master if self._terminal is not None else None,
            )
        finally:
            flush()

    def _start_egress(self, socks: list[socket.socket], plan: NetnsPlan) -> None:
        """Serve the listeners bound in the cell's namespace (closed here on failure)."""
        from buildcell.egress.service import EgressService

        cfg = self.config
        assert cfg.network is not None

        def emit(event: str, **fields: Any) -> None:
            self.events.emit(event, step=self.step, cell=self.cell_id, **fields)

        try:
            scrub = _scrubber(cfg)
            self._egress = EgressService(
                cfg.network,
                list(zip(plan.listeners, socks, strict=True)),
                emit=emit,
                pinned=dict(cfg.pinned_hosts),
                scrub=scrub,
            )
        except BaseException:
            for sock in socks:
                sock.close()
            raise

    def _secret_fds(self, fds: _Descriptors) -> tuple[list[Mount], bytes]:
        """Memory file descriptors carrying this cell's secrets into bubblewrap.

        Files: bubblewrap copies each descriptor's content into a read-only file in the
        sandbox's own memory. Environment variables: returned as ``--setenv`` arguments
        for the ``--args`` descriptor, so that no value appears in bubblewrap's argv (which
        any local user can read in /proc).
        """
        cfg = self.config
        mounts = [Mount("tmpfs", "/run/secrets", mode=0o755, size=1 << 20)]
        env_args = bytearray()
        for item in cfg.secrets:
            name, value = item.delivery.name, item.secret.reveal()
            fd = os.memfd_create(f"secret-{name}", os.MFD_CLOEXEC)
            os.write(fd, value)
            os.lseek(fd, 0, os.SEEK_SET)
            fds.pass_owned(fd)
            mounts.append(Mount("ro-bind-data", f"/run/secrets/{name}", src=str(fd), mode=0o400))
            if item.delivery.env is not None:
                env_args += b"--setenv\0" + item.delivery.env.encode() + b"\0" + value + b"\0"
            self.events.emit(
                "secret.mount",
                step=self.step,
                cell=self.cell_id,
                secret=name,
                delivery="file+env" if item.delivery.env else "file",
                path=f"/run/secrets/{name}",
                env=item.delivery.env,
            )
        return mounts, bytes(env_args)

    def _output_sinks(self) -> tuple[_spawn.Sink, _spawn.Sink, Callable[[], None]]:
        """The sinks the cell's output goes through: redacting when there are secrets."""
        if not self.config.redact:
            return self._stdout, self._stderr, lambda: None
        from buildcell.redact import Redactor

        redactor = Redactor(self.config.redact)
        pairs = [(redactor, self._stdout), (redactor.fresh(), self._stderr)]

        def wrap(redactor: Redactor, sink: _spawn.Sink) -> _spawn.Sink:
            def write(data: bytes) -> None:
                out = redactor.feed(data)
                if out:
                    sink(out)

            return write

        def flush() -> None:
            for redactor, sink in pairs:
                rest = redactor.flush()
                if rest:
                    sink(rest)

        return wrap(*pairs[0]), wrap(*pairs[1]), flush

    def _classify(self, outcome: _spawn.PumpResult) -> CellResult:
        exec_status = outcome.status_value("exit-code")
        oom = self._cgroup.oom_kills() if self._cgroup is not None else 0
        warnings = tuple(self._warnings)
        base: dict[str, Any] = {
            "cell_id": self.cell_id,
            "duration": outcome.duration,
            "warnings": warnings,
            "oom_kills": oom,
            "pids_refused": self._cgroup.pids_refused() if self._cgroup is not None else 0,
        }
        if outcome.timed_out:
            result = CellResult(exit_code=124, reason="timeout", signal=signal.SIGKILL, **base)
            self.events.emit(
                "limit.timeout",
                step=self.step,
                cell=self.cell_id,
                timeout=self.config.limits.timeout,
            )
        elif not isinstance(exec_status, int):
            self._raise_setup_failure(outcome)
        elif oom and exec_status != 0:
            result = CellResult(exit_code=137, reason="oom", signal=signal.SIGKILL, **base)
            self.events.emit(
                "limit.oom",
                step=self.step,
                cell=self.cell_id,
                memory=self.config.limits.memory,
                oom_kills=oom,
            )
        elif exec_status > 128:
            result = CellResult(
                exit_code=exec_status, reason="signaled", signal=exec_status - 128, **base
            )
        else:
            result = CellResult(exit_code=exec_status, reason="exited", signal=None, **base)
        if oom and result.reason != "oom":
            self.events.emit(
                "limit.oom",
                step=self.step,
                cell=self.cell_id,
                oom_kills=oom,
                memory=self.config.limits.memory,
            )
        self.events.emit(
            "cell.exit",
            step=self.step,
            cell=self.cell_id,
            exit_code=result.exit_code,
            reason=result.reason,
            signal=result.signal,
            duration_ms=round(result.duration * 1000, 3),
        )
        return result

    def _raise_setup_failure(self, outcome: _spawn.PumpResult) -> None:
        tail = outcome.stderr_tail
        self.events.emit(
            "cell.exit", step=self.step, cell=self.cell_id, exit_code=None, reason="setup-failed"
        )
        match = _EXEC_FAILURE.search(tail)
        if match:
            name = match.group(1).decode(errors="replace")
            why = match.group(2).decode(errors="replace")
            if "No such file" in why:
                raise CommandNotFoundError(f"{name}: command not found in the cell ({why})")
            raise CommandNotExecutableError(f"{name}: cannot execute in the cell ({why})")
        lines = [
            ln
            for ln in tail.decode(errors="replace").splitlines()
            if ln.startswith(("bwrap:", "buildcell:")) or ": exec: " in ln  # dash's exec
        ]
        reason = lines[-1] if lines else f"bubblewrap exited with status {outcome.returncode}"
        raise SandboxError(
            f"the sandbox could not be set up: {reason}",
            hint="run `buildcell doctor` to check this host",
        )

    def _kill(self) -> None:
        """SIGKILL every process of the cell."""
        if self._init_pidfd is not None:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self._init_pidfd, signal.SIGKILL)
                self._killed += 1
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(self._proc.pid, signal.SIGKILL)
        if self._cgroup is not None:
            self._killed += self._cgroup.kill_all(timeout=1.0)

    def collect(self) -> OutputReport | None:
        """Copy the configured outputs out of the workspace into ``out_dir``, replacing its
        contents as a whole (with an ``outputs.json`` manifest).

        Raises:
            OutputError: an output could not be written, or holds a secret's value.
        """
        cfg = self.config
        if not cfg.outputs or self.storage is None or self._out is None:
            return None
        from buildcell.supply.outputs import (
            check_outputs_for_secrets,
            check_reserved_names,
            collect_outputs,
        )

        out = self._out
        report = collect_outputs(
            self.storage.workspace, cfg.outputs, out, max_bytes=cfg.output_max_size
        )
        check_reserved_names(report)

        def emit(event: str, **fields: Any) -> None:
            self.events.emit(event, step=self.step, cell=self.cell_id, **fields)

        check_outputs_for_secrets(report, out, cfg.redact, emit)
        manifest = {
            "build": self.cell_id,
            "name": "run",
            "outputs": [
                {"path": o.path, "sha256": o.sha256, "size": o.size} for o in report.collected
            ],
        }
        out.write_file("outputs.json", (json.dumps(manifest, indent=2) + "\n").encode())
        out.publish()
        for item in report.collected:
            emit("output", path=item.path, size=item.size, sha256=item.sha256)
        for skipped in report.skipped:
            self._warn(
                f"output {show(skipped.path)} not collected: {skipped.reason}",
                event="output.skipped",
            )
        for pattern in report.unmatched:
            self._warn(f"output pattern {pattern!r} matched no file", event="output.unmatched")
        if self.result is not None:
            self.result.outputs = report
            self.result.warnings = tuple(self._warnings)
        return report

    # -- teardown ------------------------------------------------------------------

    def _wait_init_gone(self, timeout: float) -> bool:
        if self._init_pidfd is None:
            return True
        ready, _, _ = select.select([self._init_pidfd], [], [], timeout)
        return bool(ready)

    def _stop_processes(self) -> tuple[int, bool]:
        """Kill and wait for everything the cell started; (processes left, cgroups gone)."""
        if self._proc is not None and self._proc.poll() is None:
            self._kill()
        if self._proc is not None:
            self._proc.wait()
            for stream in (self._proc.stdout, self._proc.stderr):
                if stream is not None:
                    stream.close()
        init_gone = self._wait_init_gone(2.0)
        if not init_gone:
            self._kill()
            init_gone = self._wait_init_gone(2.0)
        processes_left = 0 if init_gone else 1
        cgroups_removed = True
        if self._cgroup is not None:
            left = self._cgroup.pids()
            if left:
                self._killed += self._cgroup.kill_all()
                left = self._cgroup.pids()
            processes_left = max(processes_left, len(left))
            cgroups_removed = self._cgroup.remove()
        if self._init_pidfd is not None:
            # Reparented to us when bubblewrap exited first (we are a child subreaper).
            reaper.reap_pidfd(self._init_pidfd)
            os.close(self._init_pidfd)
            self._init_pidfd = None
        return processes_left, cgroups_removed

    def _release(self) -> bool:
        """Close what the cell held on the host; whether its network is released."""
        if self._terminal is not None:
            self._terminal.close()  # the caller's terminal gets its modes back
            self._terminal = None
        for fd in self._etc_fds.values():
            os.close(fd)
        self._etc_fds = {}
        for attr in ("_tree", "_out", "_etc"):
            held = getattr(self, attr)
            if held is not None:
                held.close()
                setattr(self, attr, None)
        if self._egress is None:
            return True
        self._egress.close()
        if self.result is not None:
            self.result.egress = self._egress.stats.rows()
        return self._egress.closed

    def _remove_storage(self) -> dict[str, bool | int]:
        checks: dict[str, bool | int] = {
            "workspace_removed": True,
            "anchor_stopped": True,
            "mounts_left": 0,
        }
        if self.storage is not None:
            if self._scratch is not None and self._shared_storage is not None:
                with contextlib.suppress(OSError):
                    self.storage.drop_scratch(self._scratch)
            if self._shared_storage is None:
                checks = self.storage.close()
        return checks

    def _teardown(self, *, emit: bool = True) -> TeardownReport:
        started = time.monotonic()
        processes_left, cgroups_removed = self._stop_processes()
        network_released = self._release()
        checks = self._remove_storage()
        reaper.reap_orphans()
        report = TeardownReport(
            processes_left=processes_left,
            killed=self._killed,
            cgroups_removed=cgroups_removed,
            workspace_removed=bool(checks["workspace_removed"]),
            mounts_left=int(checks["mounts_left"]),
            anchor_stopped=bool(checks["anchor_stopped"]),
            network_released=network_released,
        )
        if emit:
            self.events.emit(
                "teardown",
                step=self.step,
                cell=self.cell_id,
                duration_ms=round((time.monotonic() - started) * 1000, 3),
                **report.to_dict(),
            )
            if not report.clean:
                log.error("teardown of cell %s was not clean: %s", self.cell_id, report)
        if self.result is not None:
            self.result.teardown = report
        return report

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._teardown()


#: How a cell with a terminal starts its command (``CellConfig.tty``). bubblewrap starts
#: it as the sandbox's pid 1 (``--as-pid-1``) in a new session it leads (``--new-session``:
#: a session outside the sandbox would have process groups the cell cannot name, and a
#: shell could not give the terminal back to the group it started in), and binds the
#: terminal at ``/dev/console``; opening it there makes it that session's controlling
#: terminal, then the command replaces the opener, keeping its pid, session and group.
TERMINAL_SESSION = ("/bin/sh", "-c", 'exec "$@" <>/dev/console >&0 2>&0', "sh")


def _open_terminal(owner: tuple[int, int] | None) -> Terminal:
    """The cell's own pseudo-terminal (``CellConfig.tty``), its slave owned by the cell's
    host uid (``owner``) when the cell runs as one: the cell opens it by name.

    Raises:
        SandboxError: none can be opened.
    """
    from buildcell.cell.terminal import Terminal

    try:
        terminal = Terminal()
    except OSError as e:
        raise SandboxError(f"cannot open a pseudo-terminal for the cell: {e.strerror}") from e
    if owner is not None and terminal.slave is not None:
        try:
            os.fchown(terminal.slave, *owner)
        except OSError as e:
            terminal.close()
            raise SandboxError(f"cannot give the cell its pseudo-terminal: {e.strerror}") from e
    return terminal


def _scrubber(config: CellConfig) -> Callable[[str], str]:
    """Redacts secret values from names and paths before they reach an event."""
    if not config.redact:
        return lambda text: text
    from buildcell.redact import Redactor, Secret

    # Host names reach the egress service lowercased (DNS is case-insensitive), so each
    # secret is also looked for in lowercase.
    redactors = [
        Redactor(config.redact),
        Redactor([Secret(s.name, s.reveal().lower()) for s in config.redact]),
    ]
    lock = threading.Lock()

    def scrub(text: str) -> str:
        data = text.encode()
        with lock:
            data = redactors[0].redact(data)
            lowered = redactors[1].redact(data.lower())
        if lowered != data.lower():
            # A secret in another case: the lowercased, redacted text is what is kept.
            data = lowered
        return data.decode(errors="replace")

    return scrub


def run_cell(
    config: CellConfig,
    *,
    state: StateDir | None = None,
    events: EventLog | None = None,
    stdout: _spawn.Sink | None = None,
    stderr: _spawn.Sink | None = None,
) -> CellResult:
    """Run ``config.argv`` in a fresh cell, collect its outputs, destroy the cell.

    Returns:
        The result, with ``outputs`` and ``teardown`` filled in.

    Raises:
        ConfigError, SandboxError, SeccompError, StateError, OutputError: buildcell could
            not do what was asked (exit 125).
        CommandNotFoundError, CommandNotExecutableError: exit 127 / 126.
    """
    with Cell(config, state=state, events=events, stdout=stdout, stderr=stderr) as cell:
        result = cell.run()
        cell.collect()
    return result
