"""`buildcell run` and `run_cell` against the real sandbox."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from tests.conftest import IS_ROOT, RootlessCLI, RunCell, RunCLI, read_events, root_only

from buildcell.cell import DirRootfs, Limits
from buildcell.errors import CommandNotExecutableError, CommandNotFoundError
from buildcell.state import StateDir


def test_cell_identity_and_environment(cell: RunCell, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOST_ONLY_CANARY", "must-not-leak")
    ran = cell(["/bin/sh", "-c", "id -u; id -g; id -un; pwd; hostname; env | sort"])
    lines = ran.stdout.splitlines()
    assert lines[:5] == ["1000", "1000", "builder", "/workspace", "buildcell"]
    env = dict(line.split("=", 1) for line in lines[5:])
    assert env == {
        "HOME": "/home/builder",
        "LANG": "C.UTF-8",
        "LOGNAME": "builder",
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "PWD": "/workspace",
        "SOURCE_DATE_EPOCH": "0",
        "TZ": "UTC",
        "USER": "builder",
    }
    assert ran.result.exit_code == 0


def test_env_and_source_date_epoch(cell: RunCell) -> None:
    ran = cell(
        ["/bin/sh", "-c", 'echo "$A|$SOURCE_DATE_EPOCH"'],
        env={"A": "b c"},
        source_date_epoch=1700000000,
    )
    assert ran.stdout == "b c|1700000000\n"


def test_synthesized_etc_and_minimal_root(cell: RunCell) -> None:
    ran = cell(["/bin/sh", "-c", "cat /etc/passwd /etc/hosts /etc/resolv.conf; ls /"])
    assert "builder:x:1000:1000:builder:/home/builder:/bin/sh" in ran.stdout
    assert "127.0.0.1\tlocalhost buildcell" in ran.stdout
    top = set(ran.stdout.split("\n\n")[-1].split()) if False else set(ran.stdout.split())
    for absent in ("root", "mnt", "media", "srv", "opt", "boot", "run", "sys"):
        assert absent not in top
    for present in ("usr", "etc", "tmp", "workspace", "proc", "dev", "home"):
        assert present in top


def test_root_is_read_only_but_workspace_tmp_home_are_writable(cell: RunCell) -> None:
    script = (
        "touch /etc/x 2>/dev/null && echo etc-writable; "
        "touch /newfile 2>/dev/null && echo root-writable; "
        "touch /workspace/w /tmp/t $HOME/h && echo writable-ok"
    )
    ran = cell(["/bin/sh", "-c", script])
    assert ran.stdout.strip() == "writable-ok"


def test_source_is_copied_and_never_modified(cell: RunCell, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "keep.txt").write_text("original")
    (src / "link").symlink_to("/etc/hostname")
    ran = cell(
        [
            "/bin/sh",
            "-c",
            "cat keep.txt; readlink link; echo changed > keep.txt; rm link; mkdir new; touch new/f",
        ],
        source=src,
    )
    assert ran.stdout == "original/etc/hostname\n"
    assert (src / "keep.txt").read_text() == "original"
    assert (src / "link").is_symlink()
    assert sorted(p.name for p in src.iterdir()) == ["keep.txt", "link"]


def test_outputs_are_collected_with_digests(cell: RunCell, tmp_path: Path) -> None:
    out = tmp_path / "collected"
    ran = cell(
        [
            "/bin/sh",
            "-c",
            "mkdir -p dist/sub && echo a > dist/a.txt && echo b > dist/sub/b.txt && echo c > c.log",
        ],
        outputs=("dist/**", "*.log"),
        out_dir=out,
    )
    assert (out / "dist" / "a.txt").read_text() == "a\n"
    assert (out / "dist" / "sub" / "b.txt").read_text() == "b\n"
    assert (out / "c.log").read_text() == "c\n"
    paths = sorted(e["path"] for e in ran.of("output"))
    assert paths == ["c.log", "dist/a.txt", "dist/sub/b.txt"]
    assert all(len(e["sha256"]) == 64 for e in ran.of("output"))


@pytest.mark.parametrize(
    ("script", "code", "reason"),
    [
        ("exit 42", 42, "exited"),
        ("kill -TERM $$", 143, "signaled"),
        ("kill -KILL $$", 137, "signaled"),
    ],
)
def test_exit_status_is_the_commands(cell: RunCell, script: str, code: int, reason: str) -> None:
    ran = cell(["/bin/sh", "-c", script])
    assert (ran.result.exit_code, ran.result.reason) == (code, reason)
    assert ran.of("cell.exit")[0]["exit_code"] == code


def test_command_not_found_and_not_executable(cell: RunCell) -> None:
    with pytest.raises(CommandNotFoundError) as e:
        cell(["no-such-command-xyz"])
    assert e.value.exit_code == 127
    with pytest.raises(CommandNotExecutableError) as e2:
        cell(["/etc/passwd"])
    assert e2.value.exit_code == 126
    with pytest.raises(CommandNotExecutableError):
        cell(["/usr"])


def test_timeout_kills_and_reports(cell: RunCell) -> None:
    started = time.monotonic()
    ran = cell(["/bin/sleep", "30"], limits=Limits(timeout=1))
    assert time.monotonic() - started < 10
    assert ran.result.exit_code == 124
    assert ran.of("limit.timeout")
    assert ran.result.teardown is not None and ran.result.teardown.clean


def test_stdin_is_dev_null(cell: RunCell) -> None:
    ran = cell(["/bin/sh", "-c", "cat; echo done; readlink /proc/self/fd/0"])
    assert ran.stdout.startswith("done\n")


def test_stdout_and_stderr_are_separate(cell: RunCell) -> None:
    ran = cell(["/bin/sh", "-c", "echo out; echo err >&2"])
    assert (ran.stdout, ran.stderr) == ("out\n", "err\n")


def test_teardown_event_and_state_left_empty(cell: RunCell, state: StateDir) -> None:
    ran = cell(["/bin/true"])
    (teardown,) = ran.of("teardown")
    assert teardown["clean"] is True
    assert teardown["processes_left"] == 0
    assert teardown["mounts_left"] == 0
    assert list(state.cells.iterdir()) == []


def test_event_contract(cell: RunCell) -> None:
    ran = cell(["/bin/true"])
    names = [e["event"] for e in ran.events]
    assert names[0] == "cell.start" and "cell.exit" in names and names[-1] == "teardown"
    for e in ran.events:
        assert {"ts", "build", "event"} <= set(e)
        assert e["ts"].endswith("Z")
    start = ran.of("cell.start")[0]
    assert start["network"] == "none"
    assert start["seccomp"]["digest"].startswith("sha256:")


def test_disk_budget_is_enforced_and_shared(cell: RunCell) -> None:
    script = (
        "dd if=/dev/zero of=/workspace/a bs=1M count=6 2>/dev/null; echo ws=$?; "
        "dd if=/dev/zero of=/tmp/b bs=1M count=6 2>/dev/null; echo tmp=$?; "
        "df -k /workspace | tail -1"
    )
    ran = cell(["/bin/sh", "-c", script], limits=Limits(disk=8 * 1024 * 1024))
    assert "ws=0" in ran.stdout
    assert "tmp=1" in ran.stdout  # the second file does not fit in what is left
    assert ran.result.teardown is not None and ran.result.teardown.clean


def test_outputs_from_a_disk_limited_cell(cell: RunCell, tmp_path: Path) -> None:
    out = tmp_path / "o"
    cell(
        ["/bin/sh", "-c", "echo hi > r.txt"],
        limits=Limits(disk=4 << 20),
        outputs=("r.txt",),
        out_dir=out,
    )
    assert (out / "r.txt").read_text() == "hi\n"


def _static_binary(tmp_path: Path) -> Path | None:
    src = tmp_path / "hello.c"
    src.write_text('#include <stdio.h>\nint main(void){puts("static hello");return 0;}\n')
    binary = tmp_path / "hello"
    res = subprocess.run(
        ["cc", "-static", "-O1", "-o", str(binary), str(src)], capture_output=True, check=False
    )
    return binary if res.returncode == 0 else None


def test_dir_rootfs(cell: RunCell, tmp_path: Path, state_root: Path) -> None:
    binary = _static_binary(tmp_path)
    if binary is None:
        pytest.skip("no static C toolchain (cc -static)")
    root = state_root / "rootfs"  # reachable by the cell's unprivileged host uid
    (root / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "etc" / "os-release").write_text("ID=tiny\n")
    (root / "etc" / "passwd").write_text("evil:x:0:0::/:/bin/sh\n")
    (root / "bin" / "hello").write_bytes(binary.read_bytes())
    os.chmod(root / "bin" / "hello", 0o755)
    ran = cell(["/bin/hello"], rootfs=DirRootfs(root))
    assert ran.stdout == "static hello\n"
    with pytest.raises(CommandNotFoundError):
        cell(["sh", "-c", "true"], rootfs=DirRootfs(root))


@root_only
def test_dir_rootfs_unreachable_by_the_cell_uid_is_a_clear_error(
    cell: RunCell, tmp_path: Path
) -> None:
    from buildcell.errors import ConfigError

    root = tmp_path / "private" / "rootfs"
    (root / "bin").mkdir(parents=True)
    os.chmod(tmp_path / "private", 0o700)
    with pytest.raises(ConfigError, match="not readable by the cell's unprivileged uid"):
        cell(["/bin/true"], rootfs=DirRootfs(root))


# -- the CLI ---------------------------------------------------------------------------


def test_cli_run_streams_and_returns_status(bc: RunCLI, tmp_path: Path) -> None:
    res = bc("run", "--source", str(tmp_path), "--", "sh", "-c", "echo hi; echo err >&2; exit 3")
    assert (res.returncode, res.stdout, res.stderr) == (3, "hi\n", "err\n")


def test_cli_outputs_and_events(bc: RunCLI, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "main.c").write_text("int main(void){return 0;}\n")
    events = tmp_path / "events.jsonl"
    res = bc(
        "run",
        "--output",
        "prog",
        "--out",
        str(tmp_path / "out"),
        "--events",
        str(events),
        "--",
        "cc",
        "-o",
        "prog",
        "main.c",
        cwd=src,
    )
    assert res.returncode == 0, res.stderr
    assert os.access(tmp_path / "out" / "prog", os.X_OK)
    assert "collected 1 output" in res.stderr
    names = [e["event"] for e in read_events(events)]
    assert names == ["workspace", "cell.start", "cell.exit", "output", "teardown"]
    # A one-file source is copied (quicker than an overlay), and the event says so.
    assert read_events(events)[0] == {
        **read_events(events)[0], "mode": "copy", "files": 1, "source": str(src),
    }  # fmt: skip
    assert len({e["build"] for e in read_events(events)}) == 1
    assert not (src / "prog").exists()


def test_cli_default_out_dir_is_not_copied_into_the_next_workspace(
    bc: RunCLI, tmp_path: Path
) -> None:
    (tmp_path / "f").write_text("x")
    assert bc("run", "--output", "f", "--", "true", cwd=tmp_path).returncode == 0
    assert (tmp_path / "buildcell-out" / "f").exists()
    res = bc("run", "--", "ls", cwd=tmp_path)
    assert res.stdout.split() == ["f"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--bogus", "--", "true"], "unrecognized arguments"),
        (["run"], "no command given"),
        (["run", "--memory", "lots", "--", "true"], "invalid --memory 'lots'"),
        (["run", "--timeout", "-5", "--", "true"], "invalid --timeout"),
        (["run", "--pids", "x", "--", "true"], "invalid --pids"),
        (["run", "--cpus", "0", "--", "true"], "invalid cpus"),
        (["run", "--rootfs", "vm:x", "--", "true"], "invalid rootfs"),
        (["run", "--source", "/nonexistent-dir", "--", "true"], "is not a directory"),
        (["run", "--output", "/etc/passwd", "--", "true"], "/etc/passwd"),
        (["run", "--env", "NOEQUALS", "--", "true"], "invalid --env"),
        (["run", "--seccomp-profile", "/nonexistent.json", "--", "true"], "nonexistent.json"),
        (["bogus-command"], "invalid choice"),
    ],
)
def test_cli_usage_errors_exit_125_with_one_line(
    bc: RunCLI, tmp_path: Path, args: list[str], message: str
) -> None:
    res = bc(*args, cwd=tmp_path)
    assert res.returncode == 125, res.stderr
    first = res.stderr.splitlines()[0]
    assert first.startswith("buildcell: error: ")
    assert message in first
    assert len([ln for ln in res.stderr.splitlines() if not ln.startswith("  hint:")]) == 1


def test_cli_exit_codes_127_126(bc: RunCLI, tmp_path: Path) -> None:
    assert bc("run", "--", "no-such-cmd", cwd=tmp_path).returncode == 127
    (tmp_path / "script.sh").write_text("echo hi\n")
    res = bc("run", "--", "./script.sh", cwd=tmp_path)
    assert res.returncode == 126
    assert "not executable" in res.stderr


def test_cli_help_teaches(bc: RunCLI) -> None:
    res = bc("run", "--help")
    assert res.returncode == 0
    for needle in ("--source", "--output", "--memory", "exit status", "124", "examples:"):
        assert needle in res.stdout


def test_cli_interactive_stdin(bc: RunCLI, tmp_path: Path) -> None:
    res = bc("run", "-i", "--", "tr", "a-z", "A-Z", cwd=tmp_path, input="hello\n")
    assert res.stdout == "HELLO\n"


def test_cli_unsafe_no_seccomp_warns_and_is_recorded(bc: RunCLI, tmp_path: Path) -> None:
    events = tmp_path / "ev.jsonl"
    res = bc(
        "run",
        "--unsafe-no-seccomp",
        "--events",
        str(events),
        "--",
        "grep",
        "^Seccomp:",
        "/proc/self/status",
        cwd=tmp_path,
    )
    assert res.stdout.split() == ["Seccomp:", "0"]
    assert "warning: --unsafe-no-seccomp" in res.stderr
    assert any(e["event"] == "security.unsafe" for e in read_events(events))


def test_cli_docker_seccomp_profile(bc: RunCLI, tmp_path: Path) -> None:
    from tests.conftest import seccomp_asset

    profile = seccomp_asset()
    res = bc(
        "run",
        "--seccomp-profile",
        str(profile),
        "--",
        "sh",
        "-c",
        "grep ^Seccomp: /proc/self/status; unshare -U true 2>/dev/null || echo denied",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["Seccomp:", "2", "denied"]


def test_cli_podman_default_seccomp_profile(bc: RunCLI, tmp_path: Path) -> None:
    from tests.conftest import PODMAN_SECCOMP

    if not PODMAN_SECCOMP.is_file():
        pytest.skip(
            f"{PODMAN_SECCOMP} is missing (apt-get install golang-github-containers-common)"
        )
    res = bc(
        "run", "--seccomp-profile", str(PODMAN_SECCOMP), "--", "grep", "^Seccomp:",
        "/proc/self/status", cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["Seccomp:", "2"]


def test_doctor(bc: RunCLI) -> None:
    res = bc("doctor", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    import json

    report = json.loads(res.stdout)
    assert report["cell_ok"] is True
    assert {c["name"] for c in report["checks"]} >= {
        "bubblewrap",
        "user namespaces",
        "seccomp",
        "limits backend",
        "state directory",
        "cell",
        "egress",
    }
    egress = next(c for c in report["checks"] if c["name"] == "egress")
    assert egress["ok"] is True, egress
    backend = next(c for c in report["checks"] if c["name"] == "limits backend")
    if not backend["detail"].startswith("rlimit"):
        moves = next(c for c in report["checks"] if c["name"] == "cgroup moves")
        assert moves["ok"] is True and "favordynmods" in moves["detail"], moves
    assert set(report["limits"]) == {"memory", "pids", "cpus", "disk", "timeout"}


def test_sigterm_to_the_cli_tears_the_cell_down(
    bc: RunCLI, state_root: Path, tmp_path: Path
) -> None:
    import sys

    from tests.conftest import cli_env

    marker = f"bc-term-{os.getpid()}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "buildcell",
            "run",
            "--",
            "bash",
            "-c",
            f"exec -a {marker} sleep 60",
        ],
        cwd=tmp_path,
        env=cli_env(state_root / "state"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert _wait_for(lambda: _find(marker)), "the cell never started"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 143, err
    assert _wait_for(lambda: not _find(marker))
    assert list((state_root / "state" / "cells").iterdir()) == []


def _find(marker: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] == marker.encode():
                    found.append(int(pid))
            except OSError:
                continue
    return found


def _wait_for(cond: Callable[[], object], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("disk", [None, "8M"])
def test_supervisor_sigkill_leaves_nothing_running_and_gc_cleans(
    bc: RunCLI, state_root: Path, tmp_path: Path, disk: str | None
) -> None:
    import sys

    from tests.conftest import cli_env

    marker = f"bc-kill-{os.getpid()}-{disk}"
    extra = ["--disk", disk] if disk else []
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "buildcell",
            "run",
            *extra,
            "--",
            "bash",
            "-c",
            f"(setsid bash -c 'exec -a {marker} sleep 300' &); exec -a {marker} sleep 300",
        ],
        cwd=tmp_path,
        env=cli_env(state_root / "state"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert _wait_for(lambda: len(_find(marker)) == 2), "the cell never started"
    proc.kill()
    proc.wait()
    assert _wait_for(lambda: not _find(marker)), "a cell process outlived its supervisor"
    cells = state_root / "state" / "cells"
    assert len(list(cells.iterdir())) == 1  # what a killed supervisor leaves behind
    res = bc("gc", "--json")
    assert res.returncode == 0, res.stderr
    import json

    report = json.loads(res.stdout)
    assert len(report["removed"]) == 1 and report["failed"] == []
    assert list(cells.iterdir()) == []
    assert bc("gc").stdout.startswith("removed 0 abandoned cell(s)")


def test_gc_leaves_running_cells_alone(bc: RunCLI, state_root: Path, tmp_path: Path) -> None:
    import sys

    from tests.conftest import cli_env

    marker = f"bc-busy-{os.getpid()}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "buildcell",
            "run",
            "--",
            "bash",
            "-c",
            f"exec -a {marker} sleep 60",
        ],
        cwd=tmp_path,
        env=cli_env(state_root / "state"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert _wait_for(lambda: _find(marker))
        import json

        report = json.loads(bc("gc", "--json").stdout)
        assert len(report["busy"]) == 1 and report["removed"] == []
        assert _find(marker)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@root_only
def test_root_cells_run_as_an_unprivileged_host_uid(cell: RunCell) -> None:
    from buildcell.host import HostEnv

    ran = cell(["/bin/sh", "-c", "cat /proc/self/uid_map; touch f; stat -c %u f"])
    base, count = HostEnv.read().uid_range
    assert ran.stdout.splitlines()[-1] == "1000"
    host_uid = ran.of("cell.start")[0]["host_uid"]
    assert base <= host_uid < base + count


@root_only
def test_root_cells_keep_no_way_back_to_root(cell: RunCell) -> None:
    # Every id the cell's processes hold (real, effective, saved, filesystem) is the
    # cell's: an id still 0 on the host would show as the overflow id 65534 in here.
    groups = os.getgroups()
    os.setgroups([0, 4])  # supplementary groups the supervisor has must not reach the cell
    try:
        ran = cell(["/bin/sh", "-c", "grep -E '^(Uid|Gid|Groups):' /proc/self/status"])
    finally:
        os.setgroups(groups)
    lines = dict(line.split(":", 1) for line in ran.stdout.splitlines())
    assert lines["Uid"].split() == ["1000"] * 4
    assert lines["Gid"].split() == ["1000"] * 4
    assert lines["Groups"].split() == []


@root_only
def test_root_spawning_thread_gets_its_credentials_back(cell: RunCell) -> None:
    import ctypes

    libc = ctypes.CDLL(None)
    before = (os.getresuid(), os.getresgid(), os.getgroups(), libc.prctl(3, 0, 0, 0, 0))
    pdeathsig = ctypes.c_int(0)
    libc.prctl(1, 10, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGUSR1: must survive the switch
    try:
        assert cell(["/bin/true"]).result.exit_code == 0
        libc.prctl(2, ctypes.byref(pdeathsig), 0, 0, 0)
        after = (os.getresuid(), os.getresgid(), os.getgroups(), libc.prctl(3, 0, 0, 0, 0))
    finally:
        libc.prctl(1, 0, 0, 0, 0)
    assert after == before
    assert pdeathsig.value == 10


@root_only
def test_root_concurrent_cells_get_distinct_host_uids(state: StateDir) -> None:
    from buildcell.cell.identity import acquire_identity

    uids = state.host.uid_range
    with acquire_identity(state.ids, uids) as a, acquire_identity(state.ids, uids) as b:
        assert a.uid != b.uid and a.drop and b.drop
    with acquire_identity(state.ids, uids) as c:
        assert c.uid == a.uid  # released slots are reused


def test_rootless_cli(bc_rootless: RootlessCLI) -> None:
    res = bc_rootless(
        "run",
        "--memory",
        "256M",
        "--pids",
        "64",
        "--cpus",
        "1",
        "--disk",
        "8M",
        "--",
        "sh",
        "-c",
        "id -u; grep ^Seccomp: /proc/self/status; "
        "dd if=/dev/zero of=x bs=1M count=20 2>/dev/null || echo disk-full",
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["1000", "Seccomp:", "2", "disk-full"]
    if IS_ROOT:
        # The hybrid host's cgroup v1 is not writable by an unprivileged user.
        assert "RLIMIT_AS" in res.stderr and "RLIMIT_NPROC" in res.stderr


def test_rootless_pids_limit_counts_only_the_cell(bc_rootless: RootlessCLI) -> None:
    from tests.conftest import UNPRIVILEGED

    res = bc_rootless(
        "run", "--pids", "16", "--", "sh", "-c", "for i in $(seq 40); do sleep 2 & done; wait"
    )
    assert res.returncode != 0
    assert "Cannot fork" in res.stderr
    # The same user's processes outside the cell do not count against the cell's limit.
    prefix = ["setpriv", f"--reuid={UNPRIVILEGED}", "--regid=65534", "--clear-groups"]
    hogs = [subprocess.Popen([*(prefix if IS_ROOT else []), "sleep", "30"]) for _ in range(20)]
    try:
        res = bc_rootless(
            "run",
            "--pids",
            "16",
            "--",
            "sh",
            "-c",
            "for i in 1 2 3 4 5; do sleep 0.1 & done; wait; echo ok",
        )
        assert res.stdout == "ok\n", res.stderr
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def test_source_larger_than_the_disk_budget_is_a_clear_error(bc: RunCLI, tmp_path: Path) -> None:
    """A copied source is in the budget (an overlaid one is not: only what the build
    writes is, see test_overlay_workspace)."""
    (tmp_path / "big").write_bytes(b"\0" * (6 << 20))
    res = bc("run", "--disk", "4M", "--", "true", cwd=tmp_path,
             env={"BUILDCELL_WORKSPACE": "copy"})  # fmt: skip
    assert res.returncode == 125
    assert "does not fit in the cell's disk budget (4.0 MiB)" in res.stderr
    res = bc("run", "--disk", "4M", "--", "true", cwd=tmp_path)
    assert res.returncode == 0, res.stderr  # auto: 6 MiB is large enough to overlay


def test_gc_removes_leftovers_of_interrupted_builds(bc: RunCLI, state_root: Path) -> None:
    import json

    from buildcell.state import StateDir
    from buildcell.supply.records import BuildRecord, RecordStore, StepRecord

    state = StateDir(state_root / "state").root
    store = RecordStore(state / "builds")
    record = BuildRecord(
        id="20261128T120000-deadbeef",
        name="n",
        spec_path="/x",
        spec_digest="sha256:" + "0" * 64,
        steps=[StepRecord("s")],
    )
    store.create(record, "")
    record.supervisor = {"pid": 2**22 + 4321, "start": 1}  # a supervisor that is gone
    store.save(record)
    (store.dir(record.id) / "staging" / "dist").mkdir(parents=True)
    (state / "repro" / record.id).mkdir(parents=True)
    fan = state / "cas" / "sha256" / "ab"
    fan.mkdir(parents=True)
    partial = fan / ".abcdef.partial"
    partial.write_bytes(b"half")
    os.utime(partial, (time.time() - 3600, time.time() - 3600))
    fresh = fan / ".fresh.partial"
    fresh.write_bytes(b"in progress")
    report = json.loads(bc("gc", "--json").stdout)
    assert report["leftovers"] == 3
    assert not (store.dir(record.id) / "staging").exists()
    assert not (state / "repro" / record.id).exists()
    assert not partial.exists()
    assert fresh.exists()
    assert (store.dir(record.id) / "record.json").exists()  # records are history, kept


def test_cells_cannot_dump_core(cell: RunCell) -> None:
    # Soft and hard limit: a build cannot raise it back and write its memory to disk.
    ran = cell(["/bin/sh", "-c", "ulimit -S -c; ulimit -H -c"])
    assert ran.stdout.split() == ["0", "0"]


def test_bwrap_started_for_a_dead_supervisor_never_runs_the_command(tmp_path: Path) -> None:
    # The spawn path without Python between fork and exec relies on this: were the
    # supervisor gone before bubblewrap armed its death signal, bubblewrap's first status
    # report (to a pipe nobody reads any more) kills it before the command may start.
    from buildcell.cell import _spawn
    from buildcell.cell.supervisor import find_bwrap
    from buildcell.host import HostEnv

    marker = tmp_path / f"ran-{os.getpid()}"
    r, w = os.pipe()
    os.close(r)  # the supervisor's end, gone
    argv = [find_bwrap(HostEnv.read()), "--unshare-all", "--die-with-parent", "--dev-bind", "/", "/",
            "--json-status-fd", str(w), "--", "sh", "-c", f"touch {marker}"]  # fmt: skip
    blocked: list[int] = []
    try:
        plan = _spawn.SpawnPlan(argv=argv, pass_fds=(w,), capture=False, self_guarded=True)
        proc = _spawn.spawn(plan)
        os.close(w)
        assert proc.wait(timeout=30) == -signal.SIGPIPE
        # bubblewrap's half-made sandbox process stays, blocked, still bubblewrap: wait
        # until it is seen so (not for a while, hoping nothing happens meanwhile).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not blocked:
            blocked = [pid for pid in _pids_with(str(marker)) if _is_blocked_bwrap(pid)]
            time.sleep(0.01)
        assert blocked, "the sandbox process was never seen waiting"
        assert not marker.exists()
    finally:
        # It is ours to remove, by the pid it has.
        for pid in blocked or _pids_with(str(marker)):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)


def _pids_with(text: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if text.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
    return found


def _is_blocked_bwrap(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return False
    return state == "S" and exe.endswith("bwrap")
