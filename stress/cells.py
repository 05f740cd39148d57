"""Stress checks of the cell lifecycle: leaks over many cells, a SIGKILLed supervisor,
and a full state directory while outputs are collected.

``checks(scale)`` runs each check bounded in count and wall time and reports one ``Row``
per check; it never raises. Everything is local (no network) and every check removes what
it made, also when it fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
AREA = "cells"
CGROUP_ROOT = Path("/sys/fs/cgroup")
# Where cells' cgroups can be: the v1 hierarchies of the limits we use, and v2.
CGROUP_CONTROLLERS = ("memory", "pids", "cpu", "unified")
SEED = 20240601


@dataclass
class Row:
    area: str  # e.g. "cells"
    what: str  # what was tried, e.g. "1000 sequential cells"
    tried: int  # how many trials/cases
    held: bool  # the property held in every trial
    detail: str  # one line: numbers, or what broke


def _log(msg: str) -> None:
    print(f"[stress.cells] {msg}", file=sys.stderr, flush=True)


# -- looking at the host through /proc and cgroupfs ---------------------------------------


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    start: int  # clock ticks since boot: tells a reused pid apart
    comm: str
    uids: tuple[int, ...]


def _read_proc(pid: int) -> Proc | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None  # gone meanwhile
    # comm may hold spaces and parentheses: it ends at the last ')'.
    comm = stat[stat.index("(") + 1 : stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2 :].split()
    uids: tuple[int, ...] = ()
    for line in status.splitlines():
        if line.startswith("Uid:"):
            uids = tuple(int(x) for x in line.split()[1:])
            break
    return Proc(pid, int(fields[1]), int(fields[19]), comm, uids)


def _processes() -> dict[int, Proc]:
    procs: dict[int, Proc] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            p = _read_proc(int(entry))
            if p is not None:
                procs[p.pid] = p
    return procs


def _descendants(procs: dict[int, Proc], root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for p in procs.values():
        children.setdefault(p.ppid, []).append(p.pid)
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _uid_range() -> range:
    from buildcell.host import HostEnv

    base, count = HostEnv.read().uid_range
    return range(base, base + count)


def _in_range(p: Proc, uids: range) -> bool:
    return any(u in uids for u in p.uids)


def _cell_process_keys(uids: range) -> set[tuple[int, int]]:
    """(pid, start) of this process's descendants and of every reserved-uid process."""
    procs = _processes()
    mine = _descendants(procs, os.getpid())
    return {(p.pid, p.start) for p in procs.values() if p.pid in mine or _in_range(p, uids)}


def _tagged_cgroups(tag: str) -> list[Path]:
    """Cgroup directories (up to four levels down) whose name holds the state dir's tag."""
    found: list[Path] = []
    for ctrl in CGROUP_CONTROLLERS:
        todo = [(CGROUP_ROOT / ctrl, 0)]
        while todo:
            here, depth = todo.pop()
            try:
                entries = list(os.scandir(here))
            except OSError:
                continue
            for e in entries:
                if not e.is_dir(follow_symlinks=False):
                    continue
                if tag in e.name:
                    found.append(Path(e.path))
                if depth < 3:
                    todo.append((Path(e.path), depth + 1))
    return found


def _mount_count() -> int:
    return len(Path("/proc/self/mountinfo").read_text().splitlines())


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _state_tag(root: Path) -> str:
    # Same as StateDir.tag, without creating the directory.
    return hashlib.sha256(str(root.absolute()).encode()).hexdigest()[:8]


def _cells_entries(state_root: Path) -> list[str]:
    try:
        return sorted(os.listdir(state_root / "cells"))
    except FileNotFoundError:
        return []


@contextlib.contextmanager
def _temp_root(prefix: str) -> Iterator[Path]:
    # As root the cells' unprivileged uids must traverse the path to the state dir.
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        os.chmod(path, 0o711)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _remove_cgroups(dirs: list[Path]) -> None:
    """Best-effort removal of leaked cgroups (deepest first), so a failed check leaves
    nothing behind."""
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            d.rmdir()


# -- 1. many cells, sequential and concurrent: nothing leaks ------------------------------


@dataclass
class _Counts:
    procs: int
    mounts: int
    cgroups: int
    fds: int
    cells: int

    def diff(self, after: _Counts) -> dict[str, int]:
        return {
            k: getattr(after, k) - getattr(self, k)
            for k in ("procs", "mounts", "cgroups", "fds", "cells")
            if getattr(after, k) != getattr(self, k)
        }


def _counts(state_root: Path, tag: str, uids: range) -> _Counts:
    return _Counts(
        procs=len(_cell_process_keys(uids)),
        mounts=_mount_count(),
        cgroups=len(_tagged_cgroups(tag)),
        fds=_fd_count(),
        cells=len(_cells_entries(state_root)),
    )


def _settled_counts(
    before: _Counts, state_root: Path, tag: str, uids: range, wait: float = 3.0
) -> _Counts:
    # Reaped processes and closed fds may take a moment to disappear from /proc.
    deadline = time.monotonic() + wait
    while True:
        after = _counts(state_root, tag, uids)
        if not before.diff(after) or time.monotonic() > deadline:
            return after
        time.sleep(0.1)


def _check_many_cells(scale: float) -> Row:  # noqa: C901, PLR0915 -- one scenario, read top to bottom
    from buildcell.cell import CellConfig, Limits
    from buildcell.cell.supervisor import run_cell
    from buildcell.events import EventLog
    from buildcell.state import StateDir

    n_seq = max(1, round(1000 * scale))
    n_conc = max(1, round(100 * scale))
    n_lim = max(2, round(20 * scale))
    what = f"{n_seq} sequential + {n_conc} concurrent + {n_lim} limited cells"
    budget = 60 + 900 * scale  # seconds for the whole check
    uids = _uid_range()

    def sink(_data: bytes) -> None:
        return None

    with _temp_root("bc-stress-cells-") as tmp:
        state = StateDir(tmp / "state")
        tag = state.tag
        before = _counts(state.root, tag, uids)
        deadline = time.monotonic() + budget
        unclean: list[str] = []
        failures: list[str] = []
        done = 0
        backends: set[str] = set()
        peak_cgroups = 0

        def one(cfg: CellConfig, events: EventLog | None = None) -> None:
            nonlocal done
            try:
                result = run_cell(cfg, state=state, events=events, stdout=sink, stderr=sink)
            except Exception as e:  # a crash of one cell is a finding, not the end
                failures.append(f"{type(e).__name__}: {e}")
                return
            done += 1
            if result.exit_code != 0:
                failures.append(f"exit {result.exit_code} ({result.reason})")
            if result.teardown is None or not result.teardown.clean:
                td = result.teardown.to_dict() if result.teardown else None
                unclean.append(str(td))

        # A wall clock for /bin/true costs nothing and keeps a wedged cell bounded.
        plain = CellConfig(argv=("/bin/true",), limits=Limits(timeout=60))
        t0 = time.monotonic()
        for i in range(n_seq):
            if time.monotonic() > deadline:
                failures.append(f"deadline hit after {i} sequential cells")
                break
            one(plain)
            if (i + 1) % max(1, n_seq // 5) == 0:
                _log(f"sequential cells: {i + 1}/{n_seq}")
        seq_s = time.monotonic() - t0

        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=n_conc, thread_name_prefix="stress-cell") as pool:
            futures = [pool.submit(one, plain) for _ in range(n_conc)]
            _, pending = wait_futures(futures, timeout=max(10.0, deadline - time.monotonic()))
            if pending:
                failures.append(f"{len(pending)} concurrent cells did not finish in time")
        conc_s = time.monotonic() - t0
        _log(f"concurrent cells: {n_conc} in {conc_s:.1f}s")

        # Limited cells run long enough that their cgroups can be seen while they exist.
        limited = CellConfig(
            argv=("/bin/sleep", "0.3"), limits=Limits(memory=64 << 20, pids=64, timeout=60)
        )
        stop = threading.Event()

        def watch() -> None:
            nonlocal peak_cgroups
            while not stop.is_set():
                peak_cgroups = max(peak_cgroups, len(_tagged_cgroups(tag)))
                stop.wait(0.05)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            for _ in range(n_lim):
                if time.monotonic() > deadline:
                    failures.append("deadline hit in limited cells")
                    break
                log = EventLog(build="stress")

                def seen(event: dict[str, Any]) -> None:
                    if event.get("event") == "cell.start":
                        backends.add(str(event.get("limits_backend")))

                log.subscribe(seen)
                one(limited, log)
        finally:
            stop.set()
            watcher.join(timeout=2)
        _log(f"limited cells: {n_lim}, backend {sorted(backends)}, peak cgroups {peak_cgroups}")

        after = _settled_counts(before, state.root, tag, uids)
        diff = before.diff(after)
        leaked = _tagged_cgroups(tag)
        _remove_cgroups(leaked)

    total = n_seq + n_conc + n_lim
    cgroups_used = peak_cgroups > 0 or backends <= {"rlimit"}
    held = not diff and not unclean and not failures and done == total and cgroups_used
    parts = [
        f"{done}/{total} ran",
        f"seq {seq_s / max(1, n_seq) * 1000:.0f} ms/cell",
        f"{n_conc} concurrent in {conc_s:.1f}s",
        f"limits backend {','.join(sorted(backends)) or '?'} peak cgroups {peak_cgroups}",
        f"before procs={before.procs} mounts={before.mounts} cgroups={before.cgroups} "
        f"fds={before.fds} cells={before.cells}",
        f"delta {diff or 'none'}",
        f"unclean teardowns {len(unclean)}",
    ]
    if not cgroups_used:
        parts.append("limited cells made no cgroup")
    if unclean:
        parts.append(f"first unclean: {unclean[0]}")
    if failures:
        parts.append(f"{len(failures)} failures, first: {failures[0]}")
    return Row(AREA, what, total, held, "; ".join(parts))


# -- helpers for driving the CLI ----------------------------------------------------------


def _private_uid_env() -> tuple[dict[str, str], range]:
    """A small uid range of our own, so a process left by *our* cells is told apart from
    cells other people run on this host at the same time."""
    from buildcell.host import DEFAULT_UID_BASE, DEFAULT_UID_COUNT

    count = 64
    base = DEFAULT_UID_BASE + DEFAULT_UID_COUNT + (os.getpid() % 4096) * count
    return (
        {"BUILDCELL_UID_BASE": str(base), "BUILDCELL_UID_COUNT": str(count)},
        range(base, base + count),
    )


def _cli_env(state_dir: Path, **extra: str) -> dict[str, str]:
    # The environment the CLI tests give it: one definition serves both.
    from tests.conftest import cli_env

    return cli_env(state_dir, **extra)


def _bc(
    env: dict[str, str], *args: str, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "buildcell", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- 2. the supervisor SIGKILLed mid-build ------------------------------------------------

SPEC = """\
version: 1
name: stress-kill
limits: {memory: 256MiB, pids: 128, timeout: 60s}
steps:
  - name: one
    run: sleep 0.3; mkdir -p out; echo x > out/a
  - name: two
    run: sleep 0.3; head -c 65536 /dev/zero > out/b
  - name: three
    run: sleep 0.3; echo z > out/c
outputs: ["out/*"]
"""


def _manifest_problem(out_dir: Path) -> str | None:
    manifest = out_dir / "outputs.json"
    if not manifest.exists():
        return None
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError) as e:
        return f"outputs.json unreadable: {e}"
    for entry in data.get("outputs", []):
        path = out_dir / entry["path"]
        if not path.is_file():
            return f"manifest lists missing {entry['path']}"
        if _sha256(path) != entry["sha256"]:
            return f"manifest digest mismatch for {entry['path']}"
    return None


def _kill_trial(  # noqa: C901, PLR0915 -- one scenario, read top to bottom
    rng: random.Random, trial: int
) -> tuple[str | None, float, str, int]:
    """One SIGKILL trial; returns (what broke or None, delay, the record's status, how many
    sandbox processes (bwrap, sh, sleep) were seen before the kill)."""
    delay = rng.uniform(0.0, 2.0)
    uid_env, own_uids = _private_uid_env()
    all_uids = _uid_range()
    with _temp_root("bc-stress-kill-") as tmp:
        src = tmp / "src"
        src.mkdir()
        (src / "buildcell.yaml").write_text(SPEC)
        state_root = tmp / "state"
        out_dir = tmp / "out"
        project = f"stress-kill-{trial}"
        env = _cli_env(state_root, **uid_env)
        tag = _state_tag(state_root)
        seen: dict[tuple[int, int], str] = {}
        baseline = {(p.pid, p.start) for p in _processes().values() if _in_range(p, all_uids)}
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "buildcell",
                "build",
                "-f",
                str(src / "buildcell.yaml"),
                "--out",
                str(out_dir),
                "--project",
                project,
            ],
            env=env,
            cwd=src,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            # Remember every descendant we see while it runs, to look for them afterwards.
            end = time.monotonic() + delay
            while True:
                procs = _processes()
                for pid in _descendants(procs, proc.pid):
                    p = procs[pid]
                    seen[(p.pid, p.start)] = p.comm
                if time.monotonic() >= end or proc.poll() is not None:
                    break
                time.sleep(min(0.05, max(0.0, end - time.monotonic())))
            finished_first = proc.poll() is not None
            sandboxed = [k for k, comm in seen.items() if comm in {"bwrap", "sh", "sleep"}]
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)

            def survivors() -> list[str]:
                left = []
                for p in _processes().values():
                    key = (p.pid, p.start)
                    if key in seen or _in_range(p, own_uids):
                        left.append(f"{p.pid}:{p.comm}")
                    elif _in_range(p, all_uids) and key not in baseline:
                        left.append(f"{p.pid}:{p.comm}(uid {p.uids[0]})")
                return left

            deadline = time.monotonic() + 5.0
            left = survivors()
            while left and time.monotonic() < deadline:
                time.sleep(0.1)
                left = survivors()
            if left:
                # Leave nothing behind even when the property failed.
                for item in left:
                    with contextlib.suppress(OSError):
                        os.kill(int(item.split(":")[0]), signal.SIGKILL)
                return f"survivors after 5s: {', '.join(left[:5])}", delay, "?", len(sandboxed)

            gc = _bc(env, "gc", "--json", cwd=src)
            problems: list[str] = []
            if gc.returncode != 0:
                problems.append(f"gc exit {gc.returncode}: {gc.stderr.strip()[-200:]}")
            cells_left = _cells_entries(state_root)
            if cells_left:
                problems.append(f"cells/ not empty after gc: {cells_left[:3]}")
            cg = _tagged_cgroups(tag)
            if cg:
                problems.append(f"{len(cg)} cgroups left after gc: {cg[0]}")
                _remove_cgroups(cg)
            bad = _manifest_problem(out_dir)
            if bad:
                problems.append(bad)
            ls = _bc(env, "ls", "--json", "--project", project, cwd=src)
            status = "none"
            if ls.returncode != 0:
                problems.append(f"ls exit {ls.returncode}: {ls.stderr.strip()[-200:]}")
            else:
                records = json.loads(ls.stdout or "[]")
                statuses = [r.get("status") for r in records]
                status = ",".join(str(s) for s in statuses) or "none"
                if "running" in statuses:
                    problems.append("record still 'running'")
                if finished_first and "succeeded" not in statuses:
                    problems.append(f"build finished before the kill but status {status}")
            return ("; ".join(problems) or None), delay, status, len(sandboxed)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


def _check_supervisor_kill(scale: float) -> Row:
    trials = max(3, round(20 * scale))
    rng = random.Random(SEED)
    what = f"supervisor SIGKILLed at a random point of a 3-step build (seed {SEED})"
    broken: list[str] = []
    statuses: dict[str, int] = {}
    deadline = time.monotonic() + 60 + 30 * trials
    done = 0
    sandbox_seen = 0
    for i in range(trials):
        if time.monotonic() > deadline:
            broken.append(f"deadline hit after {i} trials")
            break
        try:
            problem, delay, status, nseen = _kill_trial(rng, i)
        except Exception as e:
            problem, delay, status, nseen = f"{type(e).__name__}: {e}", -1.0, "?", 0
        sandbox_seen += nseen > 0
        done += 1
        statuses[status] = statuses.get(status, 0) + 1
        _log(
            f"kill trial {i + 1}/{trials}: delay {delay:.2f}s, {nseen} sandbox procs seen, "
            f"status {status}, {problem or 'ok'}"
        )
        if problem:
            broken.append(f"trial {i} (delay {delay:.2f}s): {problem}")
    detail = (
        f"{done}/{trials} trials, {sandbox_seen} killed with sandbox processes running; "
        f"record status {dict(sorted(statuses.items()))}"
    )
    if broken:
        detail += f"; {len(broken)} broken, first: {broken[0]}"
    else:
        detail += "; no survivors, gc left no cells/cgroups, manifests verified"
    return Row(AREA, what, trials, not broken and done == trials, detail)


# -- 3. the state directory fills up while outputs are collected --------------------------


def _run_tool(*argv: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which(argv[0])
    if tool is None:
        raise RuntimeError(f"{argv[0]} not found")
    return subprocess.run(
        [tool, *argv[1:]], capture_output=True, text=True, timeout=30, check=False
    )


def _check_disk_full(_scale: float) -> Row:
    what = "state dir on a 2 MiB tmpfs, 8 MiB output collected into it"
    if os.geteuid() != 0:
        return Row(AREA, what, 0, True, "skipped: needs root")
    uid_env, _ = _private_uid_env()
    with _temp_root("bc-stress-disk-") as tmp:
        mnt = tmp / "full"
        mnt.mkdir()
        mounted = _run_tool("mount", "-t", "tmpfs", "-o", "size=2m,mode=0711", "tmpfs", str(mnt))
        if mounted.returncode != 0:
            return Row(AREA, what, 0, False, f"mount failed: {mounted.stderr.strip()}")
        try:
            return _disk_full_in(mnt, uid_env, what)
        finally:
            if _run_tool("umount", str(mnt)).returncode != 0:
                _run_tool("umount", "-l", str(mnt))


def _disk_full_in(mnt: Path, uid_env: dict[str, str], what: str) -> Row:
    os.chmod(mnt, 0o711)
    state_root = mnt / "state"
    out_dir = mnt / "out"
    src = mnt / "src"
    src.mkdir()
    env = _cli_env(state_root, **uid_env)
    problems: list[str] = []
    ran = _bc(
        env,
        "run",
        "--source",
        str(src),
        "--disk",
        "32M",
        "--output",
        "big",
        "--out",
        str(out_dir),
        "--",
        "sh",
        "-c",
        "head -c 8388608 /dev/zero > big",
        cwd=src,
        timeout=120,
    )
    errors = [ln for ln in ran.stderr.splitlines() if ln.startswith("buildcell: error:")]
    error = errors[0] if errors else ""
    if ran.returncode != 125:
        problems.append(f"exit {ran.returncode}, not 125")
    if len(errors) != 1:
        problems.append(f"{len(errors)} error lines: {ran.stderr.strip()[-200:]!r}")
    elif "space" not in error.lower() and "big" not in error:
        problems.append(f"error does not say what failed: {error}")
    if "Traceback" in ran.stderr:
        problems.append("traceback on stderr")
    leftovers = []
    if out_dir.exists():
        leftovers = [
            str(p.relative_to(mnt))
            for p in out_dir.rglob("*")
            if p.name == "big" or p.name.endswith(".tmp")
        ]
    if leftovers:
        problems.append(f"partial outputs left: {leftovers[:3]}")
    if _cells_entries(state_root):
        problems.append(f"cells/ not empty: {_cells_entries(state_root)[:3]}")
    usage = shutil.disk_usage(mnt)
    after_true = _bc(env, "run", "--source", str(src), "--", "true", cwd=src)
    if after_true.returncode != 0:
        problems.append(f"next `run -- true` exit {after_true.returncode}")
    gc = _bc(env, "gc", "--json", cwd=src)
    if gc.returncode != 0:
        problems.append(f"gc exit {gc.returncode}: {gc.stderr.strip()[-200:]}")
    _remove_cgroups(_tagged_cgroups(_state_tag(state_root)))
    detail = (
        f"exit {ran.returncode}; {error or 'no error line'}; "
        f"tmpfs used {usage.used // 1024} KiB after; next run exit {after_true.returncode}; "
        f"gc exit {gc.returncode}"
    )
    if problems:
        detail += f"; broken: {'; '.join(problems)}"
    _log(f"disk full: {'ok' if not problems else problems[0]}")
    return Row(AREA, what, 1, not problems, detail)


# -- entry point --------------------------------------------------------------------------


def _guarded(name: str, check: Callable[[float], Row], scale: float) -> Row:
    _log(f"{name}: start (scale {scale})")
    t0 = time.monotonic()
    try:
        row = check(scale)
    except Exception as e:
        tb = traceback.extract_tb(e.__traceback__)
        where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
        row = Row(AREA, name, 0, False, f"crashed: {type(e).__name__}: {e}{where}")
    _log(f"{name}: {'held' if row.held else 'BROKE'} in {time.monotonic() - t0:.1f}s")
    return row


def checks(scale: float) -> list[Row]:
    """Run the cell stress checks; ``scale`` 1.0 is the full suite, 0.05 a smoke run."""
    for path in (str(REPO / "src"), str(REPO)):
        if path not in sys.path:
            sys.path.insert(0, path)
    return [
        _guarded("many cells", _check_many_cells, scale),
        _guarded("supervisor SIGKILL", _check_supervisor_kill, scale),
        _guarded("disk full", _check_disk_full, scale),
    ]
