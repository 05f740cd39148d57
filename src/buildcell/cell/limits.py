"""Resource limits: cgroup v2, cgroup v1 or rlimits, chosen at run time.

Detection is pure (it reads text and asks one question, "may I write here?"), so it is
tested against synthetic cgroup trees. Per controller the order of preference is:
cgroup v2 where the controller is available and the tree is writable (root, or a
delegated subtree), cgroup v1 where that hierarchy is mounted and writable (root on a
hybrid host), else the rlimit fallback, which says what it cannot enforce.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import resource
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from buildcell import _log
from buildcell.cell.config import Limits
from buildcell.errors import SandboxError

__all__ = [
    "CellCgroup",
    "CgroupLayout",
    "LimitsBackend",
    "detect_backend",
    "fallback_plan",
    "host_backend",
    "needs_cgroup",
    "parse_cgroup_layout",
    "remove_stale_cgroup",
    "with_defaults",
]

log = _log.get(__name__)

CONTROLLERS = ("memory", "pids", "cpu")
CPU_PERIOD_US = 100_000


@dataclass(frozen=True)
class CgroupLayout:
    """Where cgroups are mounted and where this process sits in them."""

    v2_mount: Path | None
    v2_path: str | None
    v1_mounts: dict[str, Path] = field(default_factory=dict)
    v1_paths: dict[str, str] = field(default_factory=dict)


def parse_cgroup_layout(mountinfo: str, proc_cgroup: str) -> CgroupLayout:
    """Parse ``/proc/self/mountinfo`` and ``/proc/self/cgroup``."""
    v2_mount: Path | None = None
    v1_mounts: dict[str, Path] = {}
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields = left.split()
        rfields = right.split()
        if len(fields) < 5 or len(rfields) < 3:
            continue
        fstype, opts = rfields[0], rfields[2].split(",")
        mountpoint = Path(fields[4].replace("\\040", " "))
        if fstype == "cgroup2" and v2_mount is None:
            v2_mount = mountpoint
        elif fstype == "cgroup":
            for ctrl in CONTROLLERS:
                if ctrl in opts and ctrl not in v1_mounts:
                    v1_mounts[ctrl] = mountpoint
    v2_path: str | None = None
    v1_paths: dict[str, str] = {}
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, ctrls, path = parts
        if ctrls == "":
            v2_path = path
        for ctrl in ctrls.split(","):
            if ctrl in CONTROLLERS:
                v1_paths[ctrl] = path
    return CgroupLayout(v2_mount, v2_path, v1_mounts, v1_paths)


def favors_dynamic_modifications(mountinfo: str) -> bool:
    """Whether a cgroup hierarchy is mounted with ``favordynmods`` (``/proc/self/mountinfo``).

    Moving a process into a cgroup takes a lock that, unless some hierarchy is mounted so
    (or the kernel is built with ``CONFIG_CGROUP_FAVOR_DYNMODS``), first waits for an RCU
    grace period when no move happened in the last one: a cell with limits that starts
    after a pause waits ≈ 10 ms on this VM to join its cgroups; cells started back to back
    do not. The option makes forks and exits a little dearer everywhere, which is the host
    owner's choice: ``buildcell doctor`` reports it, buildcell never sets it.
    """
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if not sep or len(fields) < 6 or len(rfields) < 3:
            continue
        options = (*fields[5].split(","), *rfields[2].split(","))
        if rfields[0] in ("cgroup", "cgroup2") and "favordynmods" in options:
            return True
    return False


@dataclass(frozen=True)
class LimitsBackend:
    """How limits are enforced on this host.

    Attributes:
        mode: ``cgroup2``, ``cgroup1`` or ``rlimit``.
        parents: the cgroup directories cell cgroups are created under (one for v2, one
            per controller for v1).
        controllers: the controllers usable in that mode.
        reason: a sentence for ``buildcell doctor`` saying why this mode was chosen.
    """

    mode: str
    parents: dict[str, Path]
    controllers: tuple[str, ...]
    reason: str
    enable_in: tuple[Path, ...] = ()

    def enforcement(self) -> dict[str, str]:
        """Per limit, the mechanism that enforces it (``doctor`` prints this)."""
        how: dict[str, str] = {}
        for ctrl, limit in (("memory", "memory"), ("pids", "pids"), ("cpu", "cpus")):
            if ctrl in self.controllers:
                how[limit] = f"{self.mode} {ctrl} controller"
            else:
                how[limit] = {
                    "memory": "RLIMIT_AS (address space, not resident memory; no oom event)",
                    "pids": "RLIMIT_NPROC inside the cell's user namespace",
                    "cpus": "CPU affinity (whole CPUs only; fractions not enforced)",
                }[limit]
        how["disk"] = "size-capped tmpfs for /workspace, /tmp and home"
        how["timeout"] = "supervisor wall clock"
        return how


def _usable_v2(
    parent: Path, writable: Callable[[Path], bool], read: Callable[[Path], str]
) -> tuple[str, ...]:
    try:
        available = read(parent / "cgroup.controllers").split()
    except OSError:
        return ()
    if not writable(parent):
        return ()
    return tuple(c for c in CONTROLLERS if c in available)


def detect_backend(
    layout: CgroupLayout,
    *,
    euid: int,
    writable: Callable[[Path], bool] = lambda p: os.access(p, os.W_OK),
    read: Callable[[Path], str] = lambda p: p.read_text(),
    delegated_parent: Path | None = None,
) -> LimitsBackend:
    """Choose how to enforce limits.

    Args:
        layout: from ``parse_cgroup_layout``.
        euid: our effective uid.
        writable/read: filesystem probes (replaced in tests).
        delegated_parent: a cgroup v2 directory delegated to us
            (``$BUILDCELL_CGROUP_PARENT``), for rootless hosts that have one.
    """
    reasons: list[str] = []
    if layout.v2_mount is not None:
        if delegated_parent is not None:
            parent = delegated_parent
        elif euid == 0:
            parent = layout.v2_mount
        else:
            parent = layout.v2_mount / (layout.v2_path or "/").lstrip("/")
        ctrls = _usable_v2(parent, writable, read)
        if set(ctrls) == set(CONTROLLERS) or (ctrls and not layout.v1_mounts):
            # As root, cells live under /buildcell and the controllers are switched on in
            # the root and in /buildcell; a delegated parent already holds its own.
            enable_in: tuple[Path, ...]
            if euid == 0 and delegated_parent is None:
                base, enable_in = parent / "buildcell", (parent, parent / "buildcell")
            else:
                base, enable_in = parent, (parent,)
            return LimitsBackend(
                "cgroup2",
                {"unified": base},
                ctrls,
                f"cgroup v2 at {parent} is writable",
                enable_in,
            )
        if ctrls:
            reasons.append(f"cgroup v2 at {parent} has only {', '.join(ctrls)}")
        elif not writable(parent):
            reasons.append(f"cgroup v2 at {parent} is not writable (not delegated to us)")
        else:
            reasons.append(f"cgroup v2 at {parent} has none of {', '.join(CONTROLLERS)}")
    v1: dict[str, Path] = {}
    for ctrl, mount in layout.v1_mounts.items():
        own = mount / layout.v1_paths.get(ctrl, "/").lstrip("/")
        if writable(own):
            v1[ctrl] = own / "buildcell"
    if v1:
        ctrls = tuple(c for c in CONTROLLERS if c in v1)
        return LimitsBackend("cgroup1", v1, ctrls, "cgroup v1 hierarchies are writable")
    if layout.v1_mounts:
        reasons.append("cgroup v1 hierarchies are not writable (needs root)")
    if not reasons:
        reasons.append("no cgroup filesystem is mounted")
    return LimitsBackend("rlimit", {}, (), "; ".join(reasons))


def host_backend(delegated_parent: Path | None = None) -> LimitsBackend:
    """Detect the backend for this process (reads /proc; cheap, but cache the result).

    ``delegated_parent`` is a cgroup v2 directory delegated to us
    (``BUILDCELL_CGROUP_PARENT``).
    """
    layout = parse_cgroup_layout(
        Path("/proc/self/mountinfo").read_text(), Path("/proc/self/cgroup").read_text()
    )
    return detect_backend(layout, euid=os.geteuid(), delegated_parent=delegated_parent)


@dataclass(frozen=True)
class FallbackPlan:
    """Limits enforced without cgroups, applied around bubblewrap's start."""

    rlimits: tuple[tuple[int, int], ...]
    nproc: int | None
    affinity: frozenset[int] | None
    warnings: tuple[str, ...]


def fallback_plan(
    limits: Limits, backend: LimitsBackend, cpus_available: Sequence[int]
) -> FallbackPlan:
    """What to do with the limits the cgroup backend cannot take (pure).

    Core dumps are always disabled: a crashing build must not write its memory (which may
    hold secrets) into the workspace.
    """
    rlimits: list[tuple[int, int]] = [(resource.RLIMIT_CORE, 0)]
    warnings: list[str] = []
    nproc: int | None = None
    affinity: frozenset[int] | None = None
    if limits.memory is not None and "memory" not in backend.controllers:
        rlimits.append((resource.RLIMIT_AS, limits.memory))
        warnings.append(
            "memory: no usable cgroup memory controller; capping address space with "
            "RLIMIT_AS instead (allocations fail rather than an OOM kill; no limit.oom event)"
        )
    if limits.pids is not None and "pids" not in backend.controllers:
        nproc = limits.pids
        warnings.append(
            "pids: no usable cgroup pids controller; using RLIMIT_NPROC in the cell's user "
            "namespace instead"
        )
    if limits.cpus is not None and "cpu" not in backend.controllers:
        count = max(1, min(len(cpus_available), math.ceil(limits.cpus)))
        affinity = frozenset(sorted(cpus_available)[:count])
        if count != limits.cpus:
            warnings.append(
                f"cpus: no usable cgroup cpu controller; pinning to {count} CPU(s), the "
                f"fraction {limits.cpus} is not enforced"
            )
        else:
            warnings.append(
                f"cpus: no usable cgroup cpu controller; pinning to {count} CPU(s) instead"
            )
    return FallbackPlan(tuple(rlimits), nproc, affinity, tuple(warnings))


class LimitValues(Protocol):
    """Anything with the fields of :class:`Limits` (the configuration file's defaults)."""

    @property
    def memory(self) -> int | None: ...
    @property
    def pids(self) -> int | None: ...
    @property
    def cpus(self) -> float | None: ...
    @property
    def disk(self) -> int | None: ...
    @property
    def timeout(self) -> float | None: ...


def with_defaults(limits: Limits, defaults: LimitValues, backend: LimitsBackend) -> Limits:
    """``limits`` with what it leaves unset taken from ``defaults`` (the operator's).

    A default memory cap is taken only where a cgroup memory controller enforces it: the
    address-space rlimit that stands in for an explicit limit breaks programs that reserve
    address space they never touch, which no one asked for here.
    """

    def default(name: str) -> Any:
        value = getattr(limits, name)
        return value if value is not None else getattr(defaults, name)

    memory = limits.memory
    if memory is None and "memory" in backend.controllers:
        memory = defaults.memory
    return Limits(
        memory=memory,
        pids=default("pids"),
        cpus=default("cpus"),
        disk=default("disk"),
        timeout=default("timeout"),
    )


def needs_cgroup(limits: Limits, backend: LimitsBackend) -> bool:
    """Whether any requested limit is one the cgroup backend enforces."""
    wanted = {
        "memory": limits.memory is not None,
        "pids": limits.pids is not None,
        "cpu": limits.cpus is not None,
    }
    return any(wanted[c] for c in backend.controllers)


def _write(path: Path, value: str) -> None:
    # O_CREAT is harmless on cgroupfs (its files exist or cannot be created) and lets the
    # same code run against a plain directory tree in tests.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


class CellCgroup:
    """The cgroup(s) of one cell: create, limit, join, observe, kill, remove.

    For cgroup v1 there is one directory per limited controller. Cells without cgroup
    limits get no cgroup at all: making, joining and removing one costs time, and the pid
    namespace already guarantees that nothing outlives the cell.

    Raises:
        SandboxError: a cgroup could not be created or limited.
    """

    def __init__(self, backend: LimitsBackend, cell_id: str, limits: Limits) -> None:
        self.backend = backend
        self._given = False  # the cgroup.procs files are the cell uid's (let_join)
        self.dirs: list[Path] = []
        self._by_ctrl: dict[str, Path] = {}
        if backend.mode == "cgroup2":
            d = backend.parents["unified"] / cell_id
            self._by_ctrl = dict.fromkeys(backend.controllers, d)
            self._mkdir_v2(d, backend.controllers)
            self.dirs = [d]
        elif backend.mode == "cgroup1":
            wanted = set()
            if limits.pids is not None:
                wanted.add("pids")
            if limits.memory is not None:
                wanted.add("memory")
            if limits.cpus is not None:
                wanted.add("cpu")
            for ctrl in sorted(wanted & set(backend.controllers)):
                d = backend.parents[ctrl] / cell_id
                self._mkdir(d)
                self.dirs.append(d)
                self._by_ctrl[ctrl] = d
        try:
            self._apply(limits)
        except BaseException:
            self.remove()
            raise

    def _mkdir(self, d: Path) -> None:
        try:
            d.parent.mkdir(exist_ok=True)
            d.mkdir()
        except OSError as e:
            raise SandboxError(f"cannot create cgroup {d}: {e.strerror}") from e

    def _mkdir_v2(self, d: Path, ctrls: Sequence[str]) -> None:
        parent = d.parent
        try:
            parent.mkdir(exist_ok=True)
            enable = " ".join(f"+{c}" for c in ctrls)
            for where in self.backend.enable_in if enable else ():
                _write(where / "cgroup.subtree_control", enable)
        except OSError as e:
            raise SandboxError(
                f"cannot enable cgroup v2 controllers under {parent}: {e.strerror}",
                hint="run `buildcell doctor`; a delegated cgroup must not contain processes",
            ) from e
        self._mkdir(d)

    def _apply(self, limits: Limits) -> None:
        v2 = self.backend.mode == "cgroup2"
        settings: list[tuple[str, str, str, bool]] = []
        if limits.memory is not None and "memory" in self._by_ctrl:
            if v2:
                settings += [
                    ("memory", "memory.max", str(limits.memory), True),
                    ("memory", "memory.swap.max", "0", False),
                ]
            else:
                settings += [
                    ("memory", "memory.limit_in_bytes", str(limits.memory), True),
                    ("memory", "memory.memsw.limit_in_bytes", str(limits.memory), False),
                    ("memory", "memory.swappiness", "0", False),
                ]
        if limits.pids is not None and "pids" in self._by_ctrl:
            settings.append(("pids", "pids.max", str(limits.pids), True))
        if limits.cpus is not None and "cpu" in self._by_ctrl:
            quota = max(1000, round(limits.cpus * CPU_PERIOD_US))
            if v2:
                settings.append(("cpu", "cpu.max", f"{quota} {CPU_PERIOD_US}", True))
            else:
                settings += [
                    ("cpu", "cpu.cfs_period_us", str(CPU_PERIOD_US), True),
                    ("cpu", "cpu.cfs_quota_us", str(quota), True),
                ]
        for ctrl, name, value, required in settings:
            path = self._by_ctrl[ctrl] / name
            try:
                _write(path, value)
            except OSError as e:
                if required:
                    raise SandboxError(f"cannot set {path} to {value}: {e.strerror}") from e
                log.debug("optional cgroup setting %s=%s failed: %s", path, value, e)

    def procs_files(self) -> list[Path]:
        """The ``cgroup.procs`` files a process writes ``0`` into to join the cell."""
        return [d / "cgroup.procs" for d in self.dirs]

    def let_join(self, uid: int, gid: int) -> bool:
        """Give the cell's ``cgroup.procs`` files (and nothing else of its cgroups) to the
        cell's host uid, so that its first process joins them itself; whether it can.

        On cgroup v1 a process may move into a cgroup whose ``cgroup.procs`` it may write,
        and only processes of its own uid: the cell's uid, one cell's alone, can put its
        own processes there and no other (the limits and every other file stay root's).
        cgroup v2 also asks for write access to the common ancestor of the old and the
        new cgroup: no use, and nothing is changed.
        """
        if self.backend.mode != "cgroup1":
            return False
        self._given = True
        try:
            for procs in self.procs_files():
                os.chown(procs, uid, gid)
        except OSError as e:
            log.debug("cannot give the cell's cgroup.procs to uid %d: %s", uid, e)
            self.take_back()
            return False
        return True

    def take_back(self) -> None:
        """Give the ``cgroup.procs`` files back to root once the cell has joined (or when
        it ends): the uid is another cell's later, and a cgroup left behind (a supervisor
        killed, a failed removal) must not be one its processes could move into."""
        if self._given:
            for procs in self.procs_files():
                _take_back(procs)
            self._given = False

    def pids(self) -> set[int]:
        found: set[int] = set()
        for d in self.dirs:
            try:
                found.update(int(x) for x in (d / "cgroup.procs").read_text().split())
            except FileNotFoundError:
                continue
        return found

    def oom_kills(self) -> int:
        d = self._by_ctrl.get("memory")
        if d is None:
            return 0
        name = "memory.events" if self.backend.mode == "cgroup2" else "memory.oom_control"
        try:
            for line in (d / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            return 0
        return 0

    def pids_refused(self) -> int:
        """How many times a fork or clone was refused at the pids limit (``pids.events``,
        in cgroup v2 and in the v1 pids controller alike)."""
        d = self._by_ctrl.get("pids")
        if d is None:
            return 0
        try:
            for line in (d / "pids.events").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "max":
                    return int(value)
        except (OSError, ValueError):
            return 0
        return 0

    def kill_all(self, timeout: float = 5.0) -> int:
        """SIGKILL every process in the cell's cgroups; return how many were signalled."""
        killed = 0
        if self.backend.mode == "cgroup2" and self.dirs:
            # cgroup.kill (Linux 5.14+) kills atomically; older kernels need the loop below.
            with contextlib.suppress(OSError):
                _write(self.dirs[0] / "cgroup.kill", "1")
        deadline = time.monotonic() + timeout
        while True:
            pids = self.pids()
            if not pids:
                return killed
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                return killed
            time.sleep(0.005)

    def remove(self) -> bool:
        """Remove the cgroup directories; ``True`` if none is left."""
        ok = True
        self.take_back()
        for d in self.dirs:
            for attempt in range(200):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY or attempt == 199:
                        log.warning("cannot remove cgroup %s: %s", d, e.strerror)
                        ok = False
                        break
                    time.sleep(0.005)
        return ok


def _take_back(procs: Path) -> None:
    with contextlib.suppress(OSError):
        if os.lstat(procs).st_uid != 0:
            os.chown(procs, 0, 0, follow_symlinks=False)


def remove_stale_cgroup(path: Path) -> bool:
    """Kill whatever is left in a cgroup directory found by ``gc`` and remove it."""
    procs = path / "cgroup.procs"
    if os.geteuid() == 0:
        _take_back(procs)  # a dead cell's, perhaps still its uid's (CellCgroup.let_join)
    deadline = time.monotonic() + 5
    while procs.exists() and time.monotonic() < deadline:
        pids = [int(x) for x in procs.read_text().split()]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)
    try:
        path.rmdir()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True
