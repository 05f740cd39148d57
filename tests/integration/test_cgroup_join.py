"""A cell's bubblewrap is born in the cell's cgroups (the system shell joins them and
execs it, through setpriv as root), and no thread of the supervisor ever enters them: one that did, even for the instant of a vfork, would take one of the
cell's pids (a tight --pids cell then fails to start) and, on cgroup v1, have the whole
supervisor's memory charged there (the cell's OOM killer then picks the supervisor).
Real cgroups, real sandbox."""

from __future__ import annotations

import contextlib
import re
import threading
import time
from pathlib import Path

import pytest
from tests.conftest import RunCell

from buildcell.cell import CellConfig, Limits
from buildcell.cell.limits import CellCgroup
from buildcell.cell.supervisor import Cell, limits_backend, run_cell
from buildcell.errors import SandboxError
from buildcell.state import StateDir


@pytest.fixture
def v1(state: StateDir) -> None:
    if limits_backend(state.host).mode != "cgroup1":
        pytest.skip("this host's limits are not on cgroup v1")


def _own_cgroups() -> str:
    return Path("/proc/thread-self/cgroup").read_text()


def _threads_cgroups() -> set[str]:
    lines: set[str] = set()
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            lines.update((task / "cgroup").read_text().splitlines())
    return lines


@pytest.mark.usefixtures("v1")
def test_bubblewrap_is_born_in_the_cell_and_the_supervisor_never_enters(state: StateDir) -> None:
    before = _own_cgroups()
    limits = Limits(memory=256 << 20, pids=64, cpus=1)
    with Cell(CellConfig(argv=("/bin/sleep", "1"), limits=limits), state=state) as cell:
        runner = threading.Thread(target=cell.run)
        runner.start()
        try:
            deadline = time.monotonic() + 10
            assert cell._cgroup is not None
            dirs = cell._cgroup.dirs
            while time.monotonic() < deadline and (
                cell._proc is None or not (dirs[0] / "tasks").read_text().split()
            ):
                time.sleep(0.01)
            for d in dirs:
                members = {int(p) for p in (d / "tasks").read_text().split()}
                assert cell._proc is not None and cell._proc.pid in members, d
            # No thread of the supervisor is in a cell's cgroup.
            names = {str(d).split("/buildcell/", 1)[1] for d in dirs}
            assert not [ln for ln in _threads_cgroups() if any(n in ln for n in names)]
            assert _own_cgroups() == before
        finally:
            runner.join(timeout=30)
    assert cell.result is not None and cell.result.exit_code == 0


#: Forks until refused, prints how many it had.
FORKS = """
import os, time
children = []
for _ in range(40):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(2)
        os._exit(0)
    children.append(pid)
print(len(children))
"""


@pytest.mark.usefixtures("v1")
def test_cells_started_from_many_threads_at_once_each_get_their_limits(
    cell: RunCell, state: StateDir
) -> None:
    """Eight threads start a cell each: every cell is held to its own pids limit, and
    every thread ends where it began."""
    results: dict[int, tuple[str, str, int]] = {}

    def one(i: int) -> None:
        before = _own_cgroups()
        ran = cell(
            ["/usr/bin/python3", "-c", FORKS],
            limits=Limits(pids=8 + i, memory=128 << 20),
        )
        results[i] = (before, _own_cgroups(), int(ran.stdout.split()[-1]))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 8
    for i, (before, after, started) in results.items():
        assert before == after, i
        # bubblewrap, its init and python count too: fewer children than the limit.
        assert 0 < started < 8 + i, (i, started)


@pytest.mark.usefixtures("v1")
def test_a_tight_pids_limit_is_the_cell_s_alone_while_the_supervisor_is_busy(
    cell: RunCell,
) -> None:
    """Three busy threads in the supervisor (GIL contention delays whatever it does next)
    and cells of --pids 3: bubblewrap, its init and the command fit, every time."""
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(1000))

    spinners = [threading.Thread(target=spin) for _ in range(3)]
    for t in spinners:
        t.start()
    try:
        codes = [cell(["/bin/true"], limits=Limits(pids=3)).result.exit_code for _ in range(6)]
    finally:
        stop.set()
        for t in spinners:
            t.join()
    assert codes == [0] * 6


@pytest.mark.usefixtures("v1")
@pytest.mark.parametrize("how", ["gone", "refusing"])
def test_a_cgroup_the_cell_cannot_join_stops_it_before_its_command_runs(
    state: StateDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """The join is checked: a cell that could not be put in its cgroups (one gone from
    under it, or one refusing the write) fails to start before bubblewrap does, with a
    line that names it."""
    seen: list[Path] = []
    real = CellCgroup.procs_files
    bad = tmp_path / "gone" / "cgroup.procs" if how == "gone" else Path("/dev/full")

    def first_one_bad(self: CellCgroup) -> list[Path]:
        files = real(self)
        seen.extend(files)
        return [bad, *files[1:]]

    monkeypatch.setattr(CellCgroup, "procs_files", first_one_bad)
    with pytest.raises(SandboxError, match=f"cannot join the cell cgroup {re.escape(str(bad))}"):
        run_cell(
            CellConfig(
                argv=("/bin/sh", "-c", "echo ran > /workspace/ran"),
                limits=Limits(pids=64, memory=128 << 20),
            ),
            state=state,
        )
    assert seen
    for procs in seen:  # and the cell's cgroups are removed
        assert not procs.exists()


@pytest.mark.usefixtures("v1")
def test_only_the_cell_s_cgroup_procs_files_are_given_to_its_uid(state: StateDir) -> None:
    """As root on cgroup v1 the cell's first process joins by itself: its cgroup.procs
    files are the cell uid's, every limit and every other file stays root's, and the
    parents (where a move out would be written) are root's."""
    limits = Limits(memory=256 << 20, pids=64, cpus=1)
    with Cell(CellConfig(argv=("/bin/true",), limits=limits), state=state) as cell:
        assert cell._cgroup is not None and cell.storage is not None
        uid = cell.storage.identity.uid
        for d in cell._cgroup.dirs:
            owners = {f.name: f.stat().st_uid for f in d.iterdir() if f.is_file()}
            assert owners.pop("cgroup.procs") == uid, d
            assert set(owners.values()) == {0}, (d, owners)
            assert (d.parent / "cgroup.procs").stat().st_uid == 0
        result = cell.run()
    assert result.exit_code == 0


@pytest.mark.usefixtures("v1")
def test_the_files_are_root_s_again_once_the_cell_has_joined(state: StateDir) -> None:
    """The uid is another cell's later, and a cgroup left behind (a supervisor killed, a
    failed removal) must not be one a later cell of that uid could move into."""
    limits = Limits(pids=64, memory=128 << 20)
    with Cell(CellConfig(argv=("/bin/sleep", "2"), limits=limits), state=state) as cell:
        assert cell._cgroup is not None
        files = cell._cgroup.procs_files()
        runner = threading.Thread(target=cell.run)
        runner.start()
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and cell._init_pidfd is None:
                time.sleep(0.005)
            assert cell._init_pidfd is not None
            members = set((files[0]).read_text().split())
            assert cell._proc is not None and str(cell._proc.pid) in members
            assert {f.stat().st_uid for f in files} == {0}
        finally:
            runner.join(timeout=30)
    assert cell.result is not None and cell.result.exit_code == 0


@pytest.mark.usefixtures("v1")
def test_gc_takes_back_a_dead_cell_s_files_even_where_it_cannot_remove_the_cgroup(
    state: StateDir,
) -> None:
    from buildcell.cell.limits import remove_stale_cgroup

    backend = limits_backend(state.host)
    cg = CellCgroup(backend, f"{state.tag}.stale-test", Limits(pids=8))
    procs = cg.procs_files()[0]
    child = procs.parent / "held"  # a child cgroup: the removal fails (EBUSY)
    try:
        assert cg.let_join(65534, 65534)  # as a supervisor killed before the cell joined
        assert procs.stat().st_uid == 65534
        child.mkdir()
        assert not remove_stale_cgroup(procs.parent)
        assert procs.exists() and procs.stat().st_uid == 0
    finally:
        with contextlib.suppress(FileNotFoundError):
            child.rmdir()
        cg.remove()
