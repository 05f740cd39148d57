"""The repository is hostile on the host side too: its symlinks, rootfs and outputs.

Each test plays a pull request that controls the checkout (its files and buildcell.yaml)
while CI runs ``buildcell build`` or ``buildcell run`` with default settings, as root where
the suite runs as root. The attack must be refused with one clear line (exit 125) or be
contained, and the host must show no effect.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import IS_ROOT, UNPRIVILEGED, RunCell, RunCLI, cli_env, root_only

from buildcell.cell import CellConfig, DirRootfs
from buildcell.errors import ConfigError

#: Each test runs with the copy and with the copy-on-write overlay.
pytestmark = pytest.mark.workspaces

BUSYBOX = Path("/bin/busybox")
needs_busybox = pytest.mark.skipif(
    not BUSYBOX.exists(), reason="/bin/busybox (busybox-static) is not installed"
)


def _project(directory: Path, spec: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "buildcell.yaml").write_text(spec)
    return directory


def _one_line(stderr: str) -> str:
    """The one error line buildcell printed (progress lines and a hint may surround it)."""
    assert "Traceback" not in stderr
    errors = [ln for ln in stderr.splitlines() if ln.startswith("buildcell: error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def _victim(tmp_path: Path) -> Path:
    """A directory outside the checkout that the attacker wants root to write into."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "outputs.json").write_text("precious\n")
    (victim / "provenance.intoto.jsonl").write_text("precious\n")
    return victim


def _unchanged(victim: Path) -> None:
    assert sorted(p.name for p in victim.iterdir()) == ["outputs.json", "provenance.intoto.jsonl"]
    for p in victim.iterdir():
        assert p.read_text() == "precious\n"


BUILD = """\
version: 1
name: out
steps:
  - {name: s, run: "mkdir -p dist && echo payload > dist/a && echo payload > top.txt"}
outputs: ["dist/*", "top.txt"]
"""


# -- the output directory ----------------------------------------------------------------


def test_committed_out_symlink_is_refused(bc: RunCLI, tmp_path: Path) -> None:
    victim = _victim(tmp_path)
    proj = _project(tmp_path / "p", BUILD)
    (proj / "buildcell-out").symlink_to(victim)  # the default --out
    res = bc("build", cwd=proj)
    assert res.returncode == 125
    assert "symlink" in _one_line(res.stderr)
    assert "buildcell-out" in res.stderr
    _unchanged(victim)
    res = bc("run", "--output", "dist/*", "--", "sh", "-c", "mkdir dist; echo x > dist/a", cwd=proj)
    assert res.returncode == 125
    assert "symlink" in _one_line(res.stderr)
    _unchanged(victim)


def test_symlinked_parent_of_out_is_refused(bc: RunCLI, tmp_path: Path) -> None:
    victim = _victim(tmp_path)
    proj = _project(tmp_path / "p", BUILD)
    (proj / "artifacts").symlink_to(victim)
    for out in ("artifacts/release", "artifacts/../artifacts/x", str(proj / "artifacts" / "y")):
        res = bc("build", "--out", out, cwd=proj)
        assert res.returncode == 125, out
        assert "'artifacts'" in res.stderr or "artifacts" in _one_line(res.stderr)
        assert "symlink" in res.stderr
    _unchanged(victim)


@pytest.mark.parametrize(
    "planted", [".outputs.json.tmp", "outputs.json", "provenance.intoto.jsonl", "dist/a", "dist"]
)
def test_planted_symlinks_in_an_existing_out_dir_are_refused(
    bc: RunCLI, tmp_path: Path, planted: str
) -> None:
    victim = _victim(tmp_path)
    target = victim / "outputs.json"
    proj = _project(tmp_path / "p", BUILD)
    out = proj / "buildcell-out"
    out.mkdir()
    (out / "outputs.json").write_text("{}\n") if planted != "outputs.json" else None
    link = out / planted
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target if planted != "dist" else victim)
    res = bc("build", cwd=proj)
    assert res.returncode == 125
    line = _one_line(res.stderr)
    assert "symlink" in line
    assert planted in line
    _unchanged(victim)
    assert link.is_symlink()  # refused, not silently replaced


def test_run_outputs_never_write_through_a_planted_symlink(bc: RunCLI, tmp_path: Path) -> None:
    victim = _victim(tmp_path)
    proj = tmp_path / "p"
    out = proj / "buildcell-out"
    out.mkdir(parents=True)
    (out / "outputs.json").write_text("{}\n")
    (out / "a").symlink_to(victim / "outputs.json")
    res = bc("run", "--output", "a", "--", "sh", "-c", "echo x > a", cwd=proj)
    assert res.returncode == 125
    assert "'a'" in _one_line(res.stderr)
    _unchanged(victim)


def test_an_out_dir_holding_other_files_is_not_replaced(bc: RunCLI, tmp_path: Path) -> None:
    proj = _project(tmp_path / "p", BUILD)
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work\n")
    res = bc("build", "--out", str(home), cwd=proj)
    assert res.returncode == 125
    assert "not a previous build's outputs" in _one_line(res.stderr)
    assert (home / "thesis.tex").read_text() == "years of work\n"
    assert sorted(p.name for p in home.iterdir()) == ["thesis.tex"]


def test_outputs_replace_the_directory_as_a_whole(bc: RunCLI, tmp_path: Path) -> None:
    proj = _project(tmp_path / "p", BUILD)
    assert bc("build", cwd=proj).returncode == 0
    out = proj / "buildcell-out"
    assert (out / "dist" / "a").read_text() == "payload\n"
    (proj / "buildcell.yaml").write_text(BUILD.replace('"dist/*", ', "").replace("dist/a", "b"))
    assert bc("build", cwd=proj).returncode == 0
    assert not (out / "dist").exists()  # the previous build's files went with it
    manifest = json.loads((out / "outputs.json").read_text())
    assert {o["path"] for o in manifest["outputs"]} == {"top.txt"}
    leftovers = [p.name for p in proj.iterdir() if p.name.startswith(".buildcell-out.")]
    assert leftovers == []


# -- inputs placed below a workspace symlink (bubblewrap < 0.12 follows it) ---------------


@pytest.mark.parametrize("link_target", ["/oldroot{victim}", "{victim}", "../../{name}"])
def test_input_below_a_workspace_symlink_never_touches_the_host(
    bc: RunCLI, tmp_path: Path, link_target: str
) -> None:
    victim = tmp_path / "victim-dir"
    victim.mkdir()
    os.chmod(victim, 0o777)  # writable even by a cell's uid: nothing may land here anyway
    payload = b"pinned input\n"
    import hashlib

    digest = hashlib.sha256(payload).hexdigest()
    proj = tmp_path / "p"
    proj.mkdir()
    (proj / "in.bin").write_bytes(payload)
    target = link_target.format(victim=victim, name=victim.name)
    (proj / "vendor").symlink_to(target)
    _project(
        proj,
        f"""\
version: 1
name: cve
inputs:
  - {{file: in.bin, sha256: {digest}, path: vendor/deep/x.bin}}
steps:
  - {{name: s, run: "cat vendor/deep/x.bin"}}
""",
    )
    res = bc("build", cwd=proj)
    assert res.returncode == 125, res.stdout + res.stderr
    line = _one_line(res.stderr)
    assert "vendor" in line
    assert "symlink" in line
    assert list(victim.iterdir()) == []


def test_input_over_a_workspace_symlink_is_bound_in_its_place(bc: RunCLI, tmp_path: Path) -> None:
    import hashlib

    payload = b"pinned input\n"
    proj = tmp_path / "p"
    proj.mkdir()
    (proj / "in.bin").write_bytes(payload)
    (proj / "vendor").mkdir()
    (proj / "vendor" / "x.bin").symlink_to("/etc/shadow")
    _project(
        proj,
        f"""\
version: 1
name: over
inputs:
  - {{file: in.bin, sha256: {hashlib.sha256(payload).hexdigest()}, path: vendor/x.bin}}
steps:
  - {{name: s, run: "cat vendor/x.bin"}}
""",
    )
    res = bc("build", cwd=proj)
    assert res.returncode == 0, res.stderr
    assert "[s] pinned input" in res.stdout
    assert (proj / "vendor" / "x.bin").is_symlink()  # the checkout is never modified


# -- the rootfs ----------------------------------------------------------------------------


def _busybox_root(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    (root / "bin" / "sh").symlink_to("busybox")
    return root


@needs_busybox
@pytest.mark.parametrize("etc", ["/", "/etc", "..", "../../../../..", "/proc/self/root/etc"])
def test_rootfs_etc_symlink_never_shows_the_host(
    cell: RunCell, state_root: Path, etc: str, tmp_path: Path
) -> None:
    canary = Path("/tmp") / f"buildcell-canary-{secrets.token_hex(6)}"
    canary.write_text("host tmp\n")
    try:
        root = _busybox_root(state_root / "rootfs")  # reachable by the cell's uid
        (root / "etc").symlink_to(etc)
        script = (
            f"busybox cat /etc/{canary.relative_to('/')} /etc/tmp/{canary.name} 2>&1; "
            "busybox ls /etc /etc/etc /etc/proc /etc/home /etc/root 2>&1; "
            "busybox cat /etc/etc/shadow /etc/shadow 2>&1; true"
        )
        ran = cell(["/bin/sh", "-c", script], rootfs=DirRootfs(root))
        assert "host tmp" not in ran.stdout
        # No shadow or passwd line of the host (the cell's own passwd is synthesized).
        assert not re.search(r"^root:[^\s]", ran.stdout.replace("root:x:0:0:root", ""), re.M)
        listing = ran.stdout
        # The cell's own root has bin, dev, etc, home, proc, tmp and workspace: anything else
        # in a listing would be the host's.
        for host_only in ("usr", "root", "srv", "boot", "var", "opt", "sys", "lib"):
            assert f"\n{host_only}\n" not in f"\n{listing}"
    finally:
        canary.unlink()


def test_spec_rootfs_outside_its_directory_is_refused(bc: RunCLI, tmp_path: Path) -> None:
    proj = tmp_path / "p"
    proj.mkdir()
    (proj / "escape").symlink_to("/")
    (proj / "inside").mkdir()
    (proj / "inside" / "up").symlink_to("../..")
    for rootfs in ("{dir: /}", "{dir: /usr}", "{dir: ../}", "{dir: escape}", "{dir: inside/up}",
                   '{oci: /srv/image, digest: "sha256:' + "a" * 64 + '"}',
                   '{oci: escape/srv/image, digest: "sha256:' + "a" * 64 + '"}'):  # fmt: skip
        _project(
            proj, f"version: 1\nname: r\nrootfs: {rootfs}\nsteps: [{{name: s, run: 'true'}}]\n"
        )
        res = bc("build", cwd=proj)
        assert res.returncode == 125, rootfs
        line = _one_line(res.stderr)
        assert "rootfs" in line or "image" in line, (rootfs, line)


def test_cell_rootfs_beneath_refuses_symlinks_out(tmp_path: Path, cell: RunCell) -> None:
    proj = tmp_path / "p"
    proj.mkdir()
    (proj / "myroot").symlink_to("/")
    with pytest.raises(ConfigError, match="outside the root"):
        cell(["/bin/true"], rootfs=DirRootfs(proj / "myroot", beneath=proj))


# -- private state and bubblewrap's visible argv -----------------------------------------


def _bwrap_cmdlines() -> list[bytes]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            data = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if data.split(b"\0", 1)[0].endswith(b"bwrap"):
            found.append(data)
    return found


def test_bwrap_argv_and_pid1_carry_no_host_path(
    bc: RunCLI, tmp_path: Path, state_root: Path
) -> None:
    proj = tmp_path / "p"
    proj.mkdir()
    (proj / "marker").write_text("m")
    seen: list[bytes] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.extend(_bwrap_cmdlines())
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        res = bc(
            "run", "--disk", "64M", "--", "sh", "-c",
            "cat /proc/1/cmdline | tr '\\0' ' '; echo; sleep 0.5", cwd=proj,
        )  # fmt: skip
    finally:
        stop.set()
        watcher.join()
    assert res.returncode == 0, res.stderr
    state = str(state_root).encode()
    assert seen, "no bubblewrap process was seen"
    for cmdline in seen:
        assert state not in cmdline, cmdline
        assert str(proj).encode() not in cmdline
    assert str(state_root) not in res.stdout
    assert "--args" in res.stdout


@root_only
def test_another_user_cannot_read_a_running_workspace(
    bc: RunCLI, tmp_path: Path, state_root: Path
) -> None:
    """What a build has in its workspace, copied from the source or written by it, is out
    of other users' reach wherever it lives: the copy, the overlay's upper layer, or the
    merged view through the anchor's /proc root."""
    proj = tmp_path / "p"
    proj.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(proj, 0o700)  # the operator keeps the checkout private
    (proj / "secret.txt").write_text("workspace content\n")
    env = cli_env(state_root / "state")
    proc = subprocess.Popen(
        [sys.executable, "-m", "buildcell", "run", "--", "sh", "-c",
         "echo written content > made.txt; sleep 3"],
        cwd=proj, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        cells = state_root / "state" / "cells"
        deadline = time.monotonic() + 10
        targets: list[Path] = []
        while time.monotonic() < deadline and not targets:
            targets = [t for t in _workspace_files(cells) if t.name == "made.txt"]
            time.sleep(0.05)
        assert targets, "the running workspace was not found"
        targets = [t.with_name(n) for t in targets for n in ("made.txt", "secret.txt")]
        probe = (
            "import sys\n"
            "for p in sys.argv[1:]:\n"
            "    try:\n"
            "        print(open(p).read())\n"
            "    except OSError as e:\n"
            "        print('denied', e.errno)\n"
        )
        res = subprocess.run(
            ["setpriv", f"--reuid={UNPRIVILEGED}", f"--regid={UNPRIVILEGED}", "--clear-groups",
             "/usr/bin/python3", "-c", probe, *map(str, targets)],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert "content" not in res.stdout
        assert res.stdout.count("denied") == len(targets), res.stdout
    finally:
        proc.communicate(timeout=30)


def _workspace_files(cells: Path) -> list[Path]:
    """Where a running cell's workspace files are reachable on the host (as root sees it)."""
    found: list[Path] = []
    for cell_dir in cells.glob("*"):
        places = [cell_dir / "workspace", cell_dir / "overlay" / "upper"]
        try:
            record = json.loads((cell_dir / "cell.json").read_text())
        except (OSError, ValueError):
            record = {}
        for p in record.get("processes", []):
            if p.get("role") == "anchor":
                root = Path(f"/proc/{p['pid']}/root")
                places.append(root / cell_dir.relative_to("/") / "rw" / "workspace")
        for place in places:
            with contextlib.suppress(OSError):
                found += [place / n for n in os.listdir(place)]
    return found


# -- bounded by default --------------------------------------------------------------------


def test_default_pids_limit_applies_without_flags(
    cell_cli_events: Callable[[list[str]], list[dict[str, Any]]],
) -> None:
    events = cell_cli_events(["run", "--", "true"])
    (start,) = [e for e in events if e["event"] == "cell.start"]
    assert start["limits"]["pids"] == 4096


@pytest.fixture
def cell_cli_events(bc: RunCLI, tmp_path: Path) -> Callable[[list[str]], list[dict[str, Any]]]:
    def run(args: list[str]) -> list[dict[str, Any]]:
        events = tmp_path / "events.jsonl"
        res = bc(args[0], "--events", str(events), *args[1:], cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        return [json.loads(line) for line in events.read_text().splitlines()]

    return run


def test_step_logs_are_capped_and_the_rest_drained(bc: RunCLI, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("logs: {max_size: 1MiB}\n")
    proj = _project(
        tmp_path / "p",
        "version: 1\nname: noisy\nsteps:\n"
        "  - {name: s, run: \"head -c 8000000 /dev/zero | tr '\\\\0' x; echo; echo done >&2\"}\n",
    )
    res = bc("build", "--json", cwd=proj, env={"BUILDCELL_CONFIG": str(config)})
    assert res.returncode == 0, res.stderr[-2000:]
    record_dir = Path(json.loads(res.stdout)["record_dir"])
    log = (record_dir / "logs" / "s.log").read_bytes()
    assert len(log) < (1 << 20) + 1024
    assert b"the log of step s stops here" in log


def test_sparse_outputs_cannot_fill_the_disk(bc: RunCLI, tmp_path: Path) -> None:
    proj = _project(
        tmp_path / "p",
        "version: 1\nname: sparse\nsteps:\n"
        "  - {name: s, run: 'mkdir dist && truncate -s 64G dist/big && echo x > dist/small'}\n"
        "outputs: ['dist/*']\n",
    )
    res = bc("build", cwd=proj)
    assert res.returncode == 125
    assert "outputs exceed" in _one_line(res.stderr)
    assert not (proj / "buildcell-out").exists()
    res = bc("run", "--disk", "32M", "--output", "big", "--", "truncate", "-s", "1G", "big",
             cwd=tmp_path)  # fmt: skip
    assert res.returncode == 125
    assert "outputs exceed 32" in _one_line(res.stderr)


# -- secrets everywhere output goes ------------------------------------------------------


def test_run_outputs_are_leak_scanned(bc: RunCLI, tmp_path: Path) -> None:
    value = "s3cr3t-" + secrets.token_hex(8)
    env = {"TOKEN": value}
    res = bc(
        "run", "--secret", "TOKEN", "--output", "leak.txt", "--", "sh", "-c",
        "cat /run/secrets/TOKEN > leak.txt", cwd=tmp_path, env=env,
    )  # fmt: skip
    assert res.returncode == 125
    assert "secret TOKEN" in _one_line(res.stderr)
    assert value not in res.stderr
    assert not (tmp_path / "buildcell-out").exists()


def test_a_secret_in_an_output_name_is_caught_before_anything_is_written(
    bc: RunCLI, tmp_path: Path, state_root: Path
) -> None:
    value = "n4me-" + secrets.token_hex(8)
    events = tmp_path / "events.jsonl"
    res = bc(
        "run", "--secret", "TOKEN", "--events", str(events), "--output", "out/*", "--", "sh",
        "-c", 'mkdir out; echo harmless > "out/$(cat /run/secrets/TOKEN)"',
        cwd=tmp_path, env={"TOKEN": value},
    )  # fmt: skip
    assert res.returncode == 125
    assert "name of an output" in _one_line(res.stderr)
    assert value not in events.read_text()
    assert not (tmp_path / "buildcell-out").exists()
    for path in (state_root / "state").rglob("*"):
        assert value not in path.name
        if path.is_file() and not path.is_symlink():
            assert value.encode() not in path.read_bytes()


def test_library_default_cell_config_has_an_output_bound() -> None:
    assert CellConfig(argv=("true",)).output_max_size is not None


@pytest.mark.skipif(not IS_ROOT, reason="the private-state check reads as another user")
def test_cell_json_is_private(cell: RunCell, state: object) -> None:
    from buildcell.state import StateDir

    assert isinstance(state, StateDir)
    ran = cell(["sh", "-c", "ls -ld /workspace"])
    assert ran.result.exit_code == 0
    assert ran.stdout.startswith("drwx------")


@pytest.mark.parametrize(
    "name", ["outputs.json", "provenance.intoto.jsonl", "provenance.sigstore.json"]
)
def test_an_output_cannot_take_the_name_of_buildcell_s_own_files(
    bc: RunCLI, tmp_path: Path, name: str
) -> None:
    proj = _project(
        tmp_path / "p",
        f"version: 1\nname: r\nsteps: [{{name: s, run: 'echo forged > {name}'}}]\n"
        f"outputs: ['{name}']\n",
    )
    res = bc("build", cwd=proj)
    assert res.returncode == 125
    assert "name of a file buildcell writes" in _one_line(res.stderr)
    res = bc("run", "--output", name, "--", "sh", "-c", f"echo forged > {name}", cwd=proj)
    assert res.returncode == 125
