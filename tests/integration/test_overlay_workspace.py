"""Copy-on-write workspaces: the source seen through an overlay, never copied, never changed.

Each test runs real cells on this host's kernel; the modes are chosen with
``BUILDCELL_WORKSPACE`` (``auto`` overlays a large source, copies a small one).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import (
    IS_ROOT,
    UNPRIVILEGED,
    RootlessCLI,
    RunCLI,
    one_error,
    read_events,
    root_only,
)

from buildcell.cell.storage import SMALL_SOURCE


def _tree(root: Path, files: int = SMALL_SOURCE[0] + 50) -> Path:
    """A source larger than ``auto``'s copy threshold: ``files`` files in 10 directories."""
    for i in range(files):
        d = root / f"d{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_text(f"file {i}\n")
    (root / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (root / "run.sh").chmod(0o755)
    os.chmod(root, 0o755)
    return root


def _snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Everything a build could have changed in a tree: entries, modes, owners, times,
    contents, link targets."""
    seen: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            st = p.lstat()
            body: Any = None
            if stat.S_ISREG(st.st_mode):
                body = hashlib.sha256(p.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                body = os.readlink(p)
            seen[str(p.relative_to(root))] = (
                st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, body,
            )  # fmt: skip
    st = root.lstat()
    seen["."] = (st.st_mode, st.st_uid, st.st_mtime_ns)
    return seen


def _workspace_event(events: Path) -> dict[str, Any]:
    (event,) = [e for e in read_events(events) if e["event"] == "workspace"]
    return event


#: What a build does to its workspace: change, remove, rename, add, chmod, link.
CHANGES = (
    "set -e; echo more >> d0/f0; rm d1/f1; mv d2 moved; mkdir new; echo n > new/n; "
    "chmod 600 d3/f3; ln -s /etc/passwd link; touch d4/f4; ln d5/f5 hard; echo h >> hard; "
    "stat -c '%u %a' . d0/f0 d6; ./run.sh; grep ' /workspace ' /proc/self/mountinfo"
)


def test_a_large_source_is_overlaid_and_left_as_it_was(bc: RunCLI, tmp_path: Path) -> None:
    src = _tree(tmp_path / "src")
    before = _snapshot(src)
    events = tmp_path / "ev.jsonl"
    res = bc("run", "--source", str(src), "--events", str(events), "--", "sh", "-c", CHANGES)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    # The cell owns every file, as it would own a copy's.
    assert lines[:3] == ["1000 700", "1000 644", "1000 755"], lines
    assert "ran" in lines
    mount = lines[-1].split()
    assert mount[mount.index("-") + 1] == "overlay", mount
    assert {"nosuid", "nodev"} <= set(mount[5].split(",")), mount
    assert _snapshot(src) == before
    event = _workspace_event(events)
    assert event["mode"] == "overlay" and "files" not in event, event


def test_rootless_overlay_of_one_s_own_source(bc_rootless: RootlessCLI) -> None:
    src = _tree(bc_rootless.home / "src")
    if IS_ROOT:
        for p in [src, *src.rglob("*")]:
            os.lchown(p, UNPRIVILEGED, UNPRIVILEGED)
    before = _snapshot(src)
    events = bc_rootless.home / "ev.jsonl"
    res = bc_rootless(
        "run", "--source", str(src), "--events", str(events), "--", "sh", "-c", CHANGES
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[:3] == ["1000 700", "1000 644", "1000 755"]
    assert _snapshot(src) == before
    assert _workspace_event(events)["mode"] == "overlay"
    # The lower layer is named by a descriptor: no host path in the cell's mount table.
    assert str(src) not in res.stdout.splitlines()[-1]


def test_a_small_source_is_copied_by_auto(bc: RunCLI, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("a\n")
    events = tmp_path / "ev.jsonl"
    res = bc("run", "--source", str(src), "--events", str(events), "--", "cat", "a",
             env={"BUILDCELL_WORKSPACE": "auto"})  # fmt: skip
    assert res.returncode == 0, res.stderr
    event = _workspace_event(events)
    assert event["mode"] == "copy" and event["files"] == 1, event
    assert "small" in event["why"]


def test_copy_is_chosen_with_the_setting(bc: RunCLI, tmp_path: Path) -> None:
    src = _tree(tmp_path / "src")
    events = tmp_path / "ev.jsonl"
    res = bc("run", "--source", str(src), "--events", str(events), "--", "true",
             env={"BUILDCELL_WORKSPACE": "copy"})  # fmt: skip
    assert res.returncode == 0, res.stderr
    event = _workspace_event(events)
    assert event == {**event, "mode": "copy", "why": "BUILDCELL_WORKSPACE=copy"}
    assert event["files"] == SMALL_SOURCE[0] + 51


def test_an_unknown_workspace_mode_is_one_error(bc: RunCLI, tmp_path: Path) -> None:
    res = bc("run", "--", "true", env={"BUILDCELL_WORKSPACE": "cow"}, cwd=tmp_path)
    line = one_error(res)
    assert "BUILDCELL_WORKSPACE=cow" in line and "auto, overlay, copy" in line


@root_only
def test_files_of_another_owner_make_auto_copy(bc: RunCLI, tmp_path: Path) -> None:
    """An overlay shows only the source owner's files as the cell's: with a file of another
    owner among the first ones seen, auto copies (every file the cell's, as before)."""
    src = _tree(tmp_path / "src")
    os.chown(src / "d0" / "f0", 4242, 4242)
    events = tmp_path / "ev.jsonl"
    res = bc("run", "--source", str(src), "--events", str(events), "--", "sh", "-c",
             "echo x >> d0/f0 && stat -c %u d0/f0")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "1000"
    event = _workspace_event(events)
    assert event["mode"] == "copy" and "uid 4242" in event["why"], event


@root_only
def test_overlay_of_someone_else_s_source_rootless(bc_rootless: RootlessCLI) -> None:
    """Rootless, a source that is not the caller's cannot be overlaid writably: auto copies
    it and says why; a forced overlay is one error line, exit 125."""
    src = _tree(bc_rootless.home / "theirs")  # made by root: root's files
    events = bc_rootless.home / "ev.jsonl"
    res = bc_rootless("run", "--source", str(src), "--events", str(events), "--", "sh", "-c",
                      "echo x >> d0/f0 && cat d0/f0")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout == "file 0\nx\n"
    event = _workspace_event(events)
    assert event["mode"] == "copy" and "belongs to uid 0" in event["why"], event
    res = bc_rootless("run", "--source", str(src), "--", "true",
                      env={"BUILDCELL_WORKSPACE": "overlay"})  # fmt: skip
    line = one_error(res)
    assert "no copy-on-write workspace" in line and "belongs to uid 0" in line, line


@pytest.mark.parametrize("disk", [False, True], ids=["no-budget", "budget"])
def test_state_and_out_dirs_inside_the_source_are_hidden(
    bc: RunCLI, tmp_path: Path, state_root: Path, disk: bool
) -> None:
    src = _tree(state_root / "src")  # reachable by the cells' uids, as a state dir must be
    state = src / ".state"
    out = src / "out"
    events = tmp_path / "ev.jsonl"
    script = (
        "ls -a; ls -a .state out 2>&1; test -e .state && echo STATE-SEEN; "
        "mkdir -p dist && echo built > dist/a.txt"
    )
    res = bc("run", "--source", str(src), "--out", str(out), "--output", "dist/*",
             "--events", str(events), *(["--disk", "64M"] if disk else []),
             "--", "sh", "-c", script,
             env={"BUILDCELL_STATE_DIR": str(state), "BUILDCELL_WORKSPACE": "overlay"})  # fmt: skip
    assert res.returncode == 0, res.stderr
    listed = res.stdout.split()
    assert ".state" not in listed and "out" not in listed, res.stdout
    assert "STATE-SEEN" not in res.stdout
    assert (out / "dist" / "a.txt").read_text() == "built\n"
    assert _workspace_event(events)["mode"] == "overlay"
    assert not list((state / "cells").iterdir())


def test_the_disk_budget_counts_writes_not_the_source(bc: RunCLI, tmp_path: Path) -> None:
    """With an overlay the source is not in the budget: a 24 MiB source runs under
    --disk 8M, and what the build writes is still capped. A copy would not fit at all."""
    src = _tree(tmp_path / "src")
    (src / "big").write_bytes(os.urandom(24 << 20))
    script = (
        "wc -c < big; head -c 16M /dev/zero > filler && echo WROTE; "
        "echo more >> big || echo BIG-FULL"
    )
    res = bc("run", "--source", str(src), "--disk", "8M", "--", "sh", "-c", script,
             env={"BUILDCELL_WORKSPACE": "overlay"})  # fmt: skip
    assert res.returncode == 0, res.stderr
    out = res.stdout.split()
    assert out[0] == str(24 << 20)
    assert "WROTE" not in out
    # Appending to the big file copies it up first: 24 MiB do not fit in 8.
    assert "BIG-FULL" in out
    assert "No space left on device" in res.stderr
    copied = bc("run", "--source", str(src), "--disk", "8M", "--", "true",
                env={"BUILDCELL_WORKSPACE": "copy"})  # fmt: skip
    assert "does not fit in the cell's disk budget" in one_error(copied)


def test_overlay_xattrs_set_by_the_cell_do_not_steer_the_overlay(
    bc_rootless: RootlessCLI,
) -> None:
    """The overlay's own attributes (opaque, redirect, origin, whiteout) would let a build
    hide or reach into the lower layer. Rootless they are ``user.overlay.*``
    (``userxattr``), which a file's owner may set: through the merged view the kernel
    either refuses them (before Linux 6.7) or stores them escaped, as attributes of a
    nested overlay, never its own. A later step still sees every file of the source."""
    src = _tree(bc_rootless.home / "src")
    if IS_ROOT:
        for p in [src, *src.rglob("*")]:
            os.lchown(p, UNPRIVILEGED, UNPRIVILEGED)
    setter = (
        "import os\n"
        "for path, name, value in (('d0', 'user.overlay.opaque', b'y'),\n"
        "                          ('d1', 'user.overlay.redirect', b'/d0'),\n"
        "                          ('d2/f2', 'user.overlay.whiteout', b''),\n"
        "                          ('d3', 'user.overlay.opaque', b'x')):\n"
        "    try:\n"
        "        os.setxattr(path, name, value)\n"
        "    except OSError as e:\n"
        "        print('refused', path, e.errno)\n"
    )
    spec_dir = bc_rootless.home / "spec"
    spec_dir.mkdir()
    (spec_dir / "set.py").write_text(setter)
    (spec_dir / "buildcell.yaml").write_text(
        "version: 1\nname: xattrs\nrootfs: host\nsteps:\n"
        "  - {name: set, run: python3 /workspace/set.py}\n"
        "  - {name: look, run: 'ls d0 | wc -l; ls d1 | wc -l; ls d2; cat d2/f2'}\n"
    )
    (src / "set.py").write_text(setter)
    if IS_ROOT:
        os.lchown(src / "set.py", UNPRIVILEGED, UNPRIVILEGED)
        for p in [spec_dir, *spec_dir.iterdir()]:
            os.lchown(p, UNPRIVILEGED, UNPRIVILEGED)
    res = bc_rootless("build", "-f", str(spec_dir / "buildcell.yaml"), "--source", str(src),
                      env={"BUILDCELL_WORKSPACE": "overlay"})  # fmt: skip
    assert res.returncode == 0, res.stderr
    look = [ln.removeprefix("[look] ") for ln in res.stdout.splitlines() if ln.startswith("[look]")]
    counts = [str(len(list((src / d).iterdir()))) for d in ("d0", "d1")]
    assert look[:2] == counts, look
    assert look[2:-1] == sorted(p.name for p in (src / "d2").iterdir()), look
    assert look[-1] == "file 2"


@root_only
@pytest.mark.workspaces
def test_device_nodes_in_the_source_are_not_devices_in_the_cell(
    bc: RunCLI, tmp_path: Path, workspace_mode: str
) -> None:
    """A source directory may hold what git never would: a device node (here /dev/mem's
    and /dev/null's numbers) is skipped by a copy and unusable (nodev) in an overlay."""
    src = _tree(tmp_path / "src")
    os.mknod(src / "mem", stat.S_IFCHR | 0o666, os.makedev(1, 1))
    os.mknod(src / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    probe = (
        "for f in mem null; do if [ -c $f ] && { head -c 1 $f >/dev/null 2>&1 || "
        "(echo x >> $f) 2>/dev/null; }; then echo OPENED $f; else echo refused $f; fi; done"
    )
    res = bc("run", "--source", str(src), "--", "sh", "-c", probe)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["refused", "mem", "refused", "null"], res.stdout


def test_a_kept_workspace_holds_the_overlay_s_view(bc: RunCLI, tmp_path: Path) -> None:
    src = _tree(tmp_path / "src")
    before = _snapshot(src)
    (tmp_path / "spec").mkdir()
    spec = tmp_path / "spec" / "buildcell.yaml"
    spec.write_text(
        "version: 1\nname: kept\nrootfs: host\nsteps:\n  - name: fail\n    run: echo made > made.txt && "
        "echo changed >> d0/f0 && rm d1/f1 && exit 3\n"
    )
    res = bc("build", "-f", str(spec), "--source", str(src), "--keep-failed", "--json",
             "--out", str(tmp_path / "out"), env={"BUILDCELL_WORKSPACE": "overlay"})  # fmt: skip
    assert res.returncode == 3, res.stderr
    kept = Path(json.loads(res.stdout)["kept_workspace"]["path"])
    assert (kept / "made.txt").read_text() == "made\n"
    assert (kept / "d0" / "f0").read_text() == "file 0\nchanged\n"
    assert not (kept / "d1" / "f1").exists()
    assert (kept / "d9" / "f9").read_text() == "file 9\n"
    assert _snapshot(src) == before


def test_doctor_reports_the_workspace_mode(bc: RunCLI) -> None:
    res = bc("doctor", "--json")
    assert res.returncode == 0, res.stderr
    (check,) = [c for c in json.loads(res.stdout)["checks"] if c["name"] == "workspace"]
    # This host's kernel (5.19+) overlays an idmapped ext4/tmpfs source.
    assert check["ok"] and check["detail"].startswith("copy-on-write overlay"), check
    res = bc("doctor", "--json", env={"BUILDCELL_WORKSPACE": "copy"})
    (check,) = [c for c in json.loads(res.stdout)["checks"] if c["name"] == "workspace"]
    assert check["detail"] == "copy (BUILDCELL_WORKSPACE=copy)"


# -- regressions: what a red-team of the overlay found -------------------------------------


def test_a_kept_overlay_workspace_stays_within_the_budget(
    bc: RunCLI, tmp_path: Path, state_root: Path
) -> None:
    """An overlay's merged view holds the whole source, and a hard link is copied as often
    as it is linked: keeping it copies at most the build's budget, or keeps nothing."""
    src = _tree(tmp_path / "src")
    (src / "blob").write_bytes(os.urandom(2 << 20))
    for i in range(10):
        os.link(src / "blob", src / f"link{i}")
    _assert_not_kept_past_8mib(bc, tmp_path, state_root, src, "false")


def test_a_shell_works_on_a_copy_of_the_kept_workspace(
    state_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kept directory may be removed (gc, --discard) while a shell runs: the shell's
    workspace must be a copy, never an overlay of it."""
    from buildcell.build.shell import _copy_in
    from buildcell.cell.storage import CellStorage, new_cell_id
    from buildcell.cell.supervisor import find_bwrap
    from buildcell.state import StateDir

    monkeypatch.setenv("BUILDCELL_WORKSPACE", "overlay")
    state = StateDir(state_root / "state")
    kept = _tree(tmp_path / "kept")
    with CellStorage(state, cell_id=new_cell_id(), bwrap=find_bwrap(state.host), disk=None) as st:
        _copy_in(st, kept)
        assert st.workspace_mode == "copy"
        for p in sorted(kept.rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        assert (st.workspace / "d0" / "f0").read_text() == "file 0\n"


def test_a_state_path_with_commas_and_colons_still_overlays(
    bc: RunCLI, state_root: Path, tmp_path: Path
) -> None:
    """Overlay options are split at "," and ":": no path of the state directory is in them."""
    src = _tree(tmp_path / "src")
    events = tmp_path / "ev.jsonl"
    state = state_root / "st,a:te"
    res = bc("run", "--source", str(src), "--events", str(events), "--", "sh", "-c",
             "echo x >> d0/f0 && grep ' /workspace ' /proc/self/mountinfo",
             env={"BUILDCELL_WORKSPACE": "overlay", "BUILDCELL_STATE_DIR": str(state)})  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert _workspace_event(events)["mode"] == "overlay"
    assert "lowerdir=/proc/self/fd/" in res.stdout and str(state_root) not in res.stdout


def test_an_unopenable_source_is_one_error(bc: RunCLI, tmp_path: Path) -> None:
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    for mode in ("auto", "overlay", "copy"):
        res = bc("run", "--source", str(loop), "--", "true", env={"BUILDCELL_WORKSPACE": mode})
        assert "loop" in one_error(res), mode


@root_only
def test_a_mount_inside_the_source_makes_auto_copy(bc: RunCLI, tmp_path: Path) -> None:
    """An overlay's lower layer is one mount: it would show what a mount inside the source
    covers, and not the mount. So such a source is copied, as a copy sees it."""
    import subprocess

    src = _tree(tmp_path / "src")
    (src / "m").mkdir()
    (src / "m" / "covered").write_text("covered\n")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "none", str(src / "m")], check=True)
    try:
        (src / "m" / "mounted").write_text("mounted\n")
        events = tmp_path / "ev.jsonl"
        res = bc("run", "--source", str(src), "--events", str(events), "--", "ls", "m")
        assert res.returncode == 0, res.stderr
        assert res.stdout.split() == ["mounted"]
        event = _workspace_event(events)
        assert event["mode"] == "copy" and "mount point inside the source" in event["why"]
        forced = bc("run", "--source", str(src), "--", "true",
                    env={"BUILDCELL_WORKSPACE": "overlay"})  # fmt: skip
        assert "mount point inside the source" in one_error(forced)
    finally:
        subprocess.run(["umount", str(src / "m")], check=True)


def test_a_kept_workspace_counts_directories_and_links_too(
    bc: RunCLI, tmp_path: Path, state_root: Path
) -> None:
    """Entries without content take space as well: 3,000 empty directories the build made
    are past an 8 MiB budget (a block each), and the workspace is not kept."""
    src = _tree(tmp_path / "src")
    run = "mkdir m && cd m && seq 1 3000 | xargs mkdir && false"
    _assert_not_kept_past_8mib(bc, tmp_path, state_root, src, run)


def _assert_not_kept_past_8mib(
    bc: RunCLI, tmp_path: Path, state_root: Path, src: Path, run: str
) -> None:
    """A build of ``src`` with an 8 MiB budget whose one step runs ``run`` and fails, with
    --keep-failed and an overlay: its workspace is too large to keep, and nothing is kept."""
    spec_dir = tmp_path / "spec"
    spec_dir.mkdir()
    (spec_dir / "buildcell.yaml").write_text(
        "version: 1\nname: kept\nrootfs: host\nlimits: {disk: 8MiB}\n"
        f"steps:\n  - {{name: fail, run: {json.dumps(run)}}}\n"
    )
    res = bc("build", "-f", str(spec_dir / "buildcell.yaml"), "--source", str(src),
             "--keep-failed", "--out", str(tmp_path / "out"),
             env={"BUILDCELL_WORKSPACE": "overlay"})  # fmt: skip
    assert res.returncode == 1, res.stderr
    assert "was not kept" in res.stderr and "would exceed 8.0 MiB" in res.stderr, res.stderr
    kept = state_root / "state" / "kept"
    assert not kept.exists() or not list(kept.iterdir()), list(kept.rglob("*"))[:5]


def test_mountinfo_paths_are_unescaped() -> None:
    from buildcell.cell.overlay import unescape_mountinfo

    assert unescape_mountinfo(r"/a\134b/s\040c\011d\012e") == "/a\\b/s c\td\ne"
    assert unescape_mountinfo("/plain/path") == "/plain/path"
