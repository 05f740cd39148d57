"""The choke point that starts sandboxes: plans, environment, and reaping what they orphan."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import textwrap
import time
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
# Born in its cgroups without Python: the system shell joins, setpriv drops the uid.
# --------------------------------------------------------------------------------------------


def _plan(argv: list[str], procs: list[Path], **fields: object) -> SpawnPlan:
    fields.setdefault("self_guarded", True)
    return SpawnPlan(argv=argv, cgroup_procs=tuple(map(str, procs)), **fields)  # type: ignore[arg-type]


def _status(tmp_path: Path, procs: list[Path], **fields: object) -> tuple[int, str, str]:
    """The program's /proc/self/status (its ids and capabilities), started in ``procs``."""
    proc = spawn(_plan(["/bin/cat", "/proc/self/status"], procs, **fields))
    out, err = proc.communicate(timeout=10)
    return proc.returncode, out.decode(), err.decode()


def test_a_start_in_cgroups_needs_no_preexec() -> None:
    plan = SpawnPlan(argv=["bwrap"], cgroup_procs=("/x/cgroup.procs",), rlimits=_CORE_OFF,
                     drop_to=(5000, 5000), self_guarded=True)  # fmt: skip
    assert not plan.needs_preexec()


def test_the_shell_joins_each_cgroup_and_execs_the_program_with_nothing_of_its_own(
    tmp_path: Path,
) -> None:
    procs = [tmp_path / "memory.procs", tmp_path / "pids.procs"]
    for p in procs:
        p.write_text("")
    proc = spawn(_plan(["/usr/bin/env"], procs))
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    # "0" is the writer itself: the shell, whose pid the program keeps.
    assert [p.read_text() for p in procs] == ["0\n", "0\n"]
    # No environment at all: not even the shell's PWD.
    assert out == b""


@root_only
def test_setpriv_gives_the_program_the_cell_uid_with_no_groups_and_no_capabilities(
    tmp_path: Path,
) -> None:
    procs = tmp_path / "cgroup.procs"
    procs.write_text("")
    tmp_path.chmod(0o755)
    code, text, err = _status(tmp_path, [procs], drop_to=(65534, 65533))
    assert code == 0, err
    assert "Uid:\t65534\t65534\t65534\t65534\n" in text
    assert "Gid:\t65533\t65533\t65533\t65533\n" in text
    assert "Groups:\t \n" in text  # the kernel prints none as one space
    assert "CapEff:\t0000000000000000" in text and "CapPrm:\t0000000000000000" in text
    assert procs.read_text() == "0\n"  # joined as root, before the uid changed


@pytest.mark.parametrize(
    "name",
    ["with space", "it's", "$(touch INJECTED)", "`touch INJECTED`", "a;touch INJECTED", "-n"],
)
def test_a_cgroup_path_is_never_read_as_shell(tmp_path: Path, name: str) -> None:
    where = tmp_path / name
    where.mkdir()
    procs = where / "cgroup.procs"
    procs.write_text("")
    code, _, err = _status(tmp_path, [procs])
    assert code == 0, err
    assert procs.read_text() == "0\n"
    assert not list(tmp_path.rglob("INJECTED")) and not Path("INJECTED").exists()


def test_a_cgroup_that_cannot_be_joined_stops_the_start_with_exit_125(tmp_path: Path) -> None:
    missing = tmp_path / "gone" / "cgroup.procs"
    code, out, err = _status(tmp_path, [missing])
    assert code == 125
    assert out == ""  # the program never ran
    assert f"buildcell: cannot join the cell cgroup {missing}" in err


def test_without_the_system_shell_the_preexec_joins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from buildcell.cell import _spawn

    monkeypatch.setattr(_spawn, "SYSTEM_DIRS", (str(tmp_path / "empty"),))
    _spawn._system_program.cache_clear()
    try:
        procs = tmp_path / "cgroup.procs"
        procs.write_text("")
        code, out, err = _status(tmp_path, [procs])
    finally:
        _spawn._system_program.cache_clear()
    assert code == 0, err
    assert procs.read_text() == "0"  # written by the preexec, without a newline
    assert f"PPid:\t{os.getpid()}\n" in out


@pytest.mark.parametrize("flaw", ["group-writable", "other-writable", "not-root", "not-exec"])
def test_a_system_program_anyone_else_could_change_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flaw: str
) -> None:
    from buildcell.cell import _spawn

    sh = tmp_path / "sh"
    sh.write_text("#!/bin/false\n")
    mode = {"group-writable": 0o775, "other-writable": 0o757, "not-exec": 0o644}.get(flaw, 0o755)
    sh.chmod(mode)
    if flaw == "not-root":
        if os.geteuid() != 0:
            pytest.skip("needs root to give the file another owner")
        os.chown(sh, 1234, 1234)
    elif os.geteuid() != 0:
        pytest.skip("a file of ours is not root's: every case would be refused for that")
    monkeypatch.setattr(_spawn, "SYSTEM_DIRS", (str(tmp_path),))
    _spawn._system_program.cache_clear()
    try:
        assert _spawn._system_program("sh") is None
        sh.chmod(0o755)
        os.chown(sh, 0, 0)
        _spawn._system_program.cache_clear()
        assert _spawn._system_program("sh") == str(sh)  # the same file, put right, is
    finally:
        _spawn._system_program.cache_clear()
