"""The choke point that starts sandboxes: plans, environment, and reaping what they orphan."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import root_only

from buildcell.cell import reaper
from buildcell.cell._spawn import SpawnPlan, pump, spawn

_CORE_OFF = ((resource.RLIMIT_CORE, 0),)


def test_a_plain_guarded_cell_needs_no_preexec() -> None:
    plan = SpawnPlan(argv=["bwrap"], rlimits=_CORE_OFF, drop_to=(5000, 5000), umask=0o22,
                     self_guarded=True)  # fmt: skip
    assert not plan.needs_preexec()


@pytest.mark.parametrize(
    "extra",
    [
        {"self_guarded": False},  # nothing else would set the death signal
        {"rlimits": ((resource.RLIMIT_AS, 1 << 30),)},
        {"rlimits": ((resource.RLIMIT_CORE, 1),)},
        {"affinity": frozenset({0})},
        {"setns_fds": ((8, 0),)},
        {"in_child": lambda: None},
    ],
)
def test_anything_more_needs_preexec(extra: dict[str, object]) -> None:
    fields: dict[str, object] = {"rlimits": _CORE_OFF, "self_guarded": True, **extra}
    assert SpawnPlan(argv=["bwrap"], **fields).needs_preexec()  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# The environment: bubblewrap starts with none.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("self_guarded", [True, False], ids=["no-preexec", "preexec"])
def test_the_program_starts_with_an_empty_environment(
    monkeypatch: pytest.MonkeyPatch, self_guarded: bool
) -> None:
    monkeypatch.setenv("BUILDCELL_SUPERVISOR_CANARY", "canary-value")
    proc = spawn(SpawnPlan(argv=["/bin/sleep", "5"], self_guarded=self_guarded))
    try:
        # What the cell would read as /proc/1/environ (its init is a fork of this process).
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
    finally:
        proc.kill()
        proc.communicate()
    assert environ == b""


def test_a_bare_program_name_is_found_on_the_supervisors_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    program = tmp_path / "fake-bwrap"
    program.write_text('#!/bin/sh\necho "$0 [$(env | wc -l)]"\n')
    program.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    proc = spawn(SpawnPlan(argv=["fake-bwrap"], self_guarded=True))
    out, _ = proc.communicate(timeout=10)
    # Started by absolute path; the shell's own PWD (and nothing else) is all it has.
    assert out.decode().strip() == f"{program} [1]"
    assert proc.returncode == 0


def test_a_missing_program_is_an_oserror(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(FileNotFoundError):
        spawn(SpawnPlan(argv=["bwrap"], self_guarded=True))


# --------------------------------------------------------------------------------------------
# Reaping: the supervisor is a child subreaper and reaps only what nobody waits for.
# --------------------------------------------------------------------------------------------


def _state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2 :].split()[0].decode()


def _until(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail("timed out")
        time.sleep(0.005)


def _orphan(seconds: float) -> int:
    """Start a grandchild that outlives its parent; returns its pid once it is ours."""
    parent = subprocess.run(
        ["/bin/sh", "-c", f"/bin/sleep {seconds} >/dev/null 2>&1 & echo $!"],
        capture_output=True,
        text=True,
        check=True,
    )
    pid = int(parent.stdout)
    _until(lambda: _ppid(pid) in (os.getpid(), None))
    return pid


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return int(stat[stat.rfind(b")") + 2 :].split()[1])


def test_becoming_a_subreaper_is_idempotent() -> None:
    assert reaper.become_subreaper()
    assert reaper.become_subreaper()
    assert reaper.is_subreaper()


def test_spawn_makes_the_supervisor_a_subreaper_in_a_fresh_process() -> None:
    code = textwrap.dedent("""
        from buildcell.cell import reaper
        from buildcell.cell._spawn import SpawnPlan, spawn
        before = reaper.is_subreaper()
        spawn(SpawnPlan(argv=["/bin/true"], self_guarded=True)).wait()
        print(before, reaper.is_subreaper())
    """)
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == ["False", "True"]


def test_orphans_are_reaped_but_exit_statuses_are_not_stolen() -> None:
    assert reaper.become_subreaper()
    waited = subprocess.Popen(["/bin/sh", "-c", "exit 3"])
    forked = os.fork()
    if forked == 0:  # pragma: no cover - the child
        os._exit(4)
    orphan = _orphan(0.01)
    for pid in (waited.pid, forked, orphan):
        _until(lambda pid=pid: _state(pid) == "Z")
    assert reaper.reap_orphans(known={forked}) == 1
    assert _state(orphan) is None
    # The Popen and the raw fork still get their own statuses.
    assert waited.wait(timeout=5) == 3
    assert os.waitstatus_to_exitcode(os.waitpid(forked, 0)[1]) == 4


def test_a_spawned_process_that_fails_at_once_keeps_its_status() -> None:
    proc = spawn(SpawnPlan(argv=["/bin/sh", "-c", "exit 7"], self_guarded=True, capture=False))
    _until(lambda: _state(proc.pid) == "Z")
    reaper.reap_orphans()
    assert proc.wait(timeout=5) == 7


def test_an_expected_orphan_is_waited_for_and_reaped_through_its_pidfd() -> None:
    assert reaper.become_subreaper()
    orphan = _orphan(0.3)
    reaper.expect_orphan(orphan)
    assert _state(orphan) in ("S", "R")
    assert reaper.settle(10.0, pids=[orphan]) >= 1
    assert _state(orphan) is None


def test_reap_pidfd_reaps_only_its_own_zombie_child() -> None:
    assert reaper.become_subreaper()
    orphan = _orphan(0.01)
    fd = os.pidfd_open(orphan)
    try:
        _until(lambda: _state(orphan) == "Z")
        assert reaper.reap_pidfd(fd)
        assert _state(orphan) is None
        assert not reaper.reap_pidfd(fd)  # already gone: nothing to do, no error
    finally:
        os.close(fd)
    proc = subprocess.Popen(["/bin/sleep", "5"])
    fd = os.pidfd_open(os.getppid())
    try:
        assert not reaper.reap_pidfd(fd)  # not our child
    finally:
        os.close(fd)
        proc.kill()
        proc.wait()


def test_pump_reaps_the_init_that_bubblewrap_leaves_behind(tmp_path: Path) -> None:
    # A stand-in for bubblewrap: report a child that outlives it, exit with the command's
    # status at once (as bubblewrap's monitor does on its event fd).
    fake = tmp_path / "fake-bwrap"
    fake.write_text(
        "#!/bin/bash\n"
        # The child holds none of the pipes, so the output is done when the stand-in exits.
        '( eval "exec $1>&-"; exec /bin/sleep 0.3 ) </dev/null >/dev/null 2>&1 &\n'
        'printf \'{"child-pid": %d}\' $! >&"$1"\n'
        "exit 5\n"
    )
    fake.chmod(0o755)
    status_r, status_w = os.pipe()
    try:
        proc = spawn(
            SpawnPlan(argv=[str(fake), str(status_w)], pass_fds=(status_w,), self_guarded=True)
        )
    finally:
        os.close(status_w)
    seen: list[dict[str, object]] = []
    result = pump(
        proc,
        status_fd=status_r,
        stdout=lambda data: None,
        stderr=lambda data: None,
        timeout=30,
        on_status=seen.append,
        kill=proc.kill,
        started=time.monotonic(),
    )
    os.close(status_r)
    for stream in (proc.stdout, proc.stderr):
        assert stream is not None
        stream.close()
    assert result.returncode == 5
    init = seen[0]["child-pid"]
    assert isinstance(init, int)
    assert _state(init) is None, "the orphaned init was not reaped"


# --------------------------------------------------------------------------------------------
# Born in its cgroups without Python: dash joins by path, as the program's own ids.
# --------------------------------------------------------------------------------------------


def _plan(argv: list[str], procs: list[Path], **fields: object) -> SpawnPlan:
    fields.setdefault("self_guarded", True)
    fields.setdefault("cgroup_procs_writable", True)
    return SpawnPlan(argv=argv, cgroup_procs=tuple(map(str, procs)), **fields)  # type: ignore[arg-type]


def _run(argv: list[str], procs: list[Path], **fields: object) -> tuple[int, str, str]:
    proc = spawn(_plan(argv, procs, **fields))
    out, err = proc.communicate(timeout=10)
    return proc.returncode, out.decode(), err.decode()


def _procs(base: Path, *names: str) -> list[Path]:
    """Regular files standing in for cgroup.procs: what is written to them is seen."""
    files = []
    for name in names:
        (base / name).mkdir(parents=True, exist_ok=True)
        f = base / name / "cgroup.procs"
        f.write_text("")
        files.append(f)
    return files


def test_a_start_in_cgroups_needs_no_preexec() -> None:
    plan = SpawnPlan(argv=["bwrap"], cgroup_procs=("/x/cgroup.procs",), rlimits=_CORE_OFF,
                     drop_to=(5000, 5000), self_guarded=True)  # fmt: skip
    assert not plan.needs_preexec()


def test_dash_joins_each_cgroup_and_execs_the_program_with_nothing_of_its_own(
    tmp_path: Path,
) -> None:
    procs = _procs(tmp_path, "memory", "pids", "cpu")
    code, out, err = _run(["/usr/bin/env"], procs)
    assert code == 0, err
    # "0" is the writer itself: dash, whose pid the program keeps.
    assert [p.read_text() for p in procs] == ["0\n"] * 3
    assert out == ""  # no environment at all: not even dash's PWD


def test_no_descriptor_of_the_supervisor_reaches_the_program(tmp_path: Path) -> None:
    procs = _procs(tmp_path, "memory", "pids")
    keep_r, keep_w = os.pipe()
    stray = os.open(procs[0], os.O_WRONLY)  # as a cgroup.procs the supervisor holds
    try:
        code, out, err = _run(["/bin/ls", "/proc/self/fd"], procs, pass_fds=(keep_w,))
    finally:
        for fd in (keep_r, keep_w, stray):
            os.close(fd)
    assert code == 0, err
    listed = {int(fd) for fd in out.split()}
    # stdin, stdout, stderr, the passed descriptor, and the one ls reads /proc/self/fd by.
    assert {0, 1, 2, keep_w} <= listed and len(listed - {0, 1, 2, keep_w}) == 1, out


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """A directory under /run, root's and closed to others on the way, open to all itself."""
    base = Path(tempfile.mkdtemp(prefix="bc-spawn-", dir="/run"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base)


@root_only
def test_the_cell_uid_is_a_number_no_user_database_can_turn_into_root(run_dir: Path) -> None:
    """The ids are never looked up by name, by the supervisor or by what joins the
    cgroups: a user database with an account called "65000" of uid 0 (an LDAP or sssd
    entry) changes nothing. Run in a mount namespace of its own, where /etc/passwd and
    /etc/group hold such entries."""
    (run_dir / "passwd").write_text("root:x:0:0::/root:/bin/sh\n65000:x:0:0::/:/bin/sh\n")
    (run_dir / "group").write_text("root:x:0:\n65001:x:0:\n")
    procs = _procs(run_dir, "pids")[0]
    procs.parent.chmod(0o755)
    os.chown(procs, 65000, 65001)  # given to the cell's uid, as on cgroup v1
    probe = textwrap.dedent(f"""
        import subprocess, sys
        for f in ("passwd", "group"):
            subprocess.run(["mount", "--bind", {str(run_dir)!r} + "/" + f, "/etc/" + f],
                           check=True)
        from buildcell.cell._spawn import SpawnPlan, spawn
        proc = spawn(SpawnPlan(argv=["/bin/cat", "/proc/self/status"], self_guarded=True,
                               cgroup_procs=({str(procs)!r},), cgroup_procs_writable=True,
                               drop_to=(65000, 65001)))
        out, err = proc.communicate(timeout=10)
        sys.stdout.write(out.decode()); sys.stderr.write(err.decode())
        sys.exit(proc.returncode)
    """)
    res = subprocess.run(
        ["unshare", "-m", "--propagation", "private", sys.executable, "-c", probe],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "Uid:\t65000\t65000\t65000\t65000\n" in res.stdout
    assert "Gid:\t65001\t65001\t65001\t65001\n" in res.stdout
    assert "Groups:\t \n" in res.stdout  # the kernel prints none as one space
    assert "CapEff:\t0000000000000000" in res.stdout
    assert "CapPrm:\t0000000000000000" in res.stdout
    assert procs.read_text() == "0\n"  # joined by dash, as uid 65000


@pytest.mark.parametrize(
    "name",
    ["with space", "it's", "$(touch INJECTED)", "`touch INJECTED`", "a;touch INJECTED", "-n"],
)
def test_a_cgroup_path_is_never_read_as_shell(tmp_path: Path, name: str) -> None:
    procs = _procs(tmp_path, name)
    code, _, err = _run(["/bin/true"], procs)
    assert code == 0, err
    assert procs[0].read_text() == "0\n"
    assert not list(tmp_path.rglob("INJECTED")) and not Path("INJECTED").exists()


@pytest.mark.parametrize("how", ["gone", "refusing"])
def test_a_cgroup_that_cannot_be_joined_stops_the_start_with_exit_125(
    tmp_path: Path, how: str
) -> None:
    """One removed meanwhile, or one that refuses the write."""
    bad = tmp_path / "gone" / "cgroup.procs" if how == "gone" else Path("/dev/full")
    code, out, err = _run(["/bin/echo", "ran"], [*_procs(tmp_path, "memory"), bad])
    assert code == 125
    assert out == ""  # the program never ran
    assert f"buildcell: cannot join the cell cgroup {bad}" in err


def test_a_deleted_working_directory_says_nothing_into_the_cell(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    code, out, err = _run(["/bin/echo", "ran"], _procs(tmp_path, "pids"))
    assert (code, out, err) == (0, "ran\n", "")


@pytest.mark.parametrize("why", ["no dash", "files not writable by the program"])
def test_otherwise_the_preexec_joins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, why: str
) -> None:
    from buildcell.cell import _spawn

    if why == "no dash":
        monkeypatch.setattr(_spawn, "SYSTEM_DIRS", (str(tmp_path / "empty"),))
    _spawn._system_program.cache_clear()
    try:
        procs = _procs(tmp_path, "pids")
        code, out, err = _run(
            ["/bin/cat", "/proc/self/status"], procs, cgroup_procs_writable=why == "no dash"
        )
    finally:
        _spawn._system_program.cache_clear()
    assert code == 0, err
    assert procs[0].read_text() == "0"  # written by the preexec, without a newline
    assert f"PPid:\t{os.getpid()}\n" in out  # dash did not exec it


@root_only
@pytest.mark.parametrize(
    "flaw",
    ["group-writable", "other-writable", "not-root", "not-exec", "writable-dir", "other-program"],
)
def test_a_system_program_anyone_else_could_change_is_not_used(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, flaw: str
) -> None:
    from buildcell.cell import _spawn

    # Under /run (root's, closed to others), so that only the flaw can be the reason.
    bindir = run_dir / "bin"
    bindir.mkdir(mode=0o755)
    dash = bindir / "dash"
    dash.write_text("#!/bin/false\n")
    mode = {"group-writable": 0o775, "other-writable": 0o757, "not-exec": 0o644}
    dash.chmod(mode.get(flaw, 0o755))
    if flaw == "not-root":
        os.chown(dash, 1234, 1234)
    if flaw == "writable-dir":
        bindir.chmod(0o777)  # anyone could swap the file for another
    if flaw == "other-program":  # a multi-call binary by another name
        dash.rename(bindir / "busybox")
        dash.symlink_to("busybox")
    monkeypatch.setattr(_spawn, "SYSTEM_DIRS", (str(bindir),))
    _spawn._system_program.cache_clear()
    try:
        assert _spawn._system_program("dash") is None
        if flaw == "other-program":
            dash.unlink()
            (bindir / "busybox").rename(dash)
        dash.chmod(0o755)
        os.chown(dash, 0, 0)
        bindir.chmod(0o755)
        _spawn._system_program.cache_clear()
        assert _spawn._system_program("dash") == str(dash)  # the same file, put right, is
    finally:
        _spawn._system_program.cache_clear()


def test_a_program_on_a_terminal_starts_without_a_controlling_one(tmp_path: Path) -> None:
    """A session on the cell's terminal is joined in the preexec: a shell there could take
    the terminal as its session's controlling one, and the cell's command could not."""
    master, slave = os.openpty()
    try:
        proc = spawn(_plan(["/bin/sleep", "5"], _procs(tmp_path, "pids"), terminal=slave))
        try:
            _until(lambda: Path(f"/proc/{proc.pid}/cmdline").read_bytes().startswith(b"/bin/sl"))
            stat = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            assert stat[4] == "0"  # tty_nr: no controlling terminal
        finally:
            proc.kill()
            proc.wait()
    finally:
        os.close(master)
        os.close(slave)


def test_a_supervisor_started_with_its_stdin_closed_still_joins(tmp_path: Path) -> None:
    """The preexec's descriptor of a cgroup.procs never lands on 0, 1 or 2 (the child's
    stdin, stdout and stderr are put there first): with stdin closed it would have been 0,
    and the join a write to /dev/null."""
    procs = _procs(tmp_path, "pids")[0]
    probe = textwrap.dedent(f"""
        import os
        os.close(0)
        from buildcell.cell._spawn import SpawnPlan, spawn
        proc = spawn(SpawnPlan(argv=["/bin/true"], self_guarded=True,
                               cgroup_procs=({str(procs)!r},)))
        proc.communicate(timeout=10)
        raise SystemExit(proc.returncode)
    """)
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=30)
    assert procs.read_text() == "0"  # by the preexec (the files are not the child's)
