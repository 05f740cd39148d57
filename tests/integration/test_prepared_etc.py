"""The cell's /etc from the prepared copy (buildcell.cell.etcdir), in the real sandbox:
the same /etc as the per-entry mounts give, three mounts, out of every cell's reach, held
while a cell runs."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import RootlessCLI, RunCell

from buildcell.build.gc import collect_garbage
from buildcell.state import StateDir

#: A listing of /etc: every entry's type, mode and content digest (or link target).
LIST_ETC = r"""
import hashlib, os, stat
for top, dirs, files in os.walk("/etc"):
    dirs.sort()
    for name in sorted(dirs + files):
        p = os.path.join(top, name)
        st = os.lstat(p)
        if stat.S_ISLNK(st.st_mode):
            what = "-> " + os.readlink(p)
        elif stat.S_ISREG(st.st_mode):
            try:
                what = hashlib.sha256(open(p, "rb").read()).hexdigest()
            except PermissionError:
                what = "unreadable"
        else:
            try:
                os.listdir(p)
                what = "dir"
            except PermissionError:
                what = "closed dir"
        print(p, what)
"""


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for top, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(dirs + files):
            p = Path(top) / name
            st = p.lstat()
            digest.update(f"{p} {st.st_mode} {st.st_size} {st.st_mtime_ns}\n".encode())
            if p.is_file() and not p.is_symlink():
                digest.update(p.read_bytes())
    return digest.hexdigest()


def _etc_mounts(mountinfo: str) -> list[str]:
    return [ln.split()[4] for ln in mountinfo.splitlines() if ln.split()[4].startswith("/etc")]


def test_a_cell_gets_the_same_etc_from_the_copy_as_from_the_mounts(
    cell: RunCell, state: StateDir
) -> None:
    """Equivalence: the listing of /etc (kinds, contents, link targets, what is closed)
    is the same whether the cell binds the prepared copy or, where there is none, the
    host's entries one by one."""
    argv = ["/usr/bin/python3", "-c", LIST_ETC]
    prepared = cell([*argv])
    assert prepared.result.exit_code == 0, prepared.stderr
    assert not [e for e in prepared.events if e["event"] == "etc.unprepared"]
    assert (state.etc / "current").is_symlink()
    # A state that cannot hold a copy: the per-entry mounts, said in an event.
    os.unlink(state.etc / "current")
    for name in os.listdir(state.etc):
        subprocess.run(["rm", "-rf", str(state.etc / name)], check=True)
    os.rmdir(state.etc)
    state.etc.write_text("not a directory")
    mounted = cell([*argv])
    assert mounted.result.exit_code == 0, mounted.stderr
    [why] = [e["why"] for e in mounted.events if e["event"] == "etc.unprepared"]
    assert "cannot prepare /etc" in why
    assert prepared.stdout == mounted.stdout
    assert "/etc/passwd " in prepared.stdout and "/etc/ld.so.cache " in prepared.stdout


def test_the_copy_is_three_mounts_at_most(cell: RunCell) -> None:
    """What makes a cell cheap: /etc and the two symlink farms, not 25 mounts."""
    ran = cell(["/bin/cat", "/proc/self/mountinfo"])
    mounts = _etc_mounts(ran.stdout)
    assert mounts[0] == "/etc" and len(mounts) <= 3, mounts


def test_a_cell_cannot_change_the_copy_other_cells_get(cell: RunCell, state: StateDir) -> None:
    """Every cell binds the same files: a build that could write one would reach the
    next build's /etc. Writes, creations, renames, links, chmods, timestamps and
    extended attributes are all refused, and the copy on the host is unchanged."""
    first = cell(["/bin/true"])
    assert first.result.exit_code == 0
    copy = state.etc / os.readlink(state.etc / "current")
    before = _tree_digest(copy)
    attack = r"""
import os, errno, fcntl
tries = {
    "write passwd": lambda: open("/etc/passwd", "a").write("evil::0:0::/:/bin/sh\n"),
    "truncate hosts": lambda: os.truncate("/etc/hosts", 0),
    "create": lambda: open("/etc/ld.so.preload", "w").write("/tmp/evil.so\n"),
    "mkdir": lambda: os.mkdir("/etc/profile.d"),
    "rename": lambda: os.rename("/etc/resolv.conf", "/etc/resolv.old"),
    "unlink": lambda: os.unlink("/etc/nsswitch.conf"),
    "symlink": lambda: os.symlink("/tmp/x", "/etc/ssl/openssl.cnf.d"),
    "hard link": lambda: os.link("/etc/passwd", "/tmp/passwd-link"),
    "chmod": lambda: os.chmod("/etc/passwd", 0o666),
    "utime": lambda: os.utime("/etc/passwd", (0, 0)),
    "xattr": lambda: os.setxattr("/etc/passwd", "user.evil", b"1"),
    "write in a bound dir": lambda: os.symlink("/tmp/cc", "/etc/alternatives/evil"),
    "read a private key": lambda: os.listdir("/etc/ssl/private"),
    "read lease": lambda: fcntl.fcntl(os.open("/etc/passwd", os.O_RDONLY), 1024, 0),
    "write lease": lambda: fcntl.fcntl(os.open("/etc/ld.so.cache", os.O_RDONLY), 1024, 1),
}
for name, act in tries.items():
    try:
        act()
        print("DONE", name)
    except OSError as e:
        print("refused", name, errno.errorcode.get(e.errno))
"""
    ran = cell(["/usr/bin/python3", "-c", attack])
    assert ran.result.exit_code == 0, ran.stderr
    assert "DONE" not in ran.stdout, ran.stdout
    assert ran.stdout.count("refused") == 15, ran.stdout
    assert _tree_digest(copy) == before
    again = cell(["/bin/cat", "/etc/passwd"])
    assert "evil" not in again.stdout and "builder:x:1000" in again.stdout


def test_a_running_cell_keeps_its_copy_through_gc(state: StateDir) -> None:
    """A copy that is no longer current (the host's /etc changed) is removed by gc only
    once no cell holds it: a long build keeps the /etc it started with."""
    script = (
        "from pathlib import Path\n"
        "from buildcell.cell import CellConfig\n"
        "from buildcell.cell.supervisor import run_cell\n"
        "from buildcell.state import StateDir\n"
        f"run_cell(CellConfig(argv=('/bin/sleep', '60')), state=StateDir(Path({str(state.root)!r})))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"))
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.monotonic() + 20
        while not (state.etc / "current").is_symlink() and time.monotonic() < deadline:
            time.sleep(0.05)
        held = os.readlink(state.etc / "current")
        time.sleep(0.5)  # the cell holds it from before the link is read
        # The host's /etc changed since: another copy is current (an empty one, here).
        (state.etc / "newer").mkdir()
        os.symlink("newer", state.etc / "current.new")
        os.rename(state.etc / "current.new", state.etc / "current")
        assert collect_garbage(state).etc_removed == 0
        assert (state.etc / held / "etc" / "hostname").exists()
    finally:
        proc.kill()  # the supervisor, SIGKILLed: its cell dies with it, the lock goes
        proc.wait(timeout=30)
    assert collect_garbage(state).etc_removed == 1
    assert sorted(os.listdir(state.etc)) == ["current", "newer"]


LEASE = r"""
import fcntl, os, errno
for path in ("/etc/passwd", "/etc/ld.so.cache", "/etc/nsswitch.conf"):
    fd = os.open(path, os.O_RDONLY)
    for kind in (0, 1):  # F_RDLCK, F_WRLCK
        try:
            fcntl.fcntl(fd, 1024, kind)
            print("LEASED", path, kind)
        except OSError as e:
            print("refused", path, errno.errorcode[e.errno])
"""


def test_a_rootless_cell_cannot_lease_the_shared_etc(bc_rootless: RootlessCLI) -> None:
    """Rootless, the copy belongs to the invoking user, which the cell runs as: a lease
    on it would stall every other cell's open of /etc/ld.so.cache for 45 s. The built-in
    filter refuses leases; without it (another profile, none) the cell does not share
    the copy at all."""
    ran = bc_rootless("run", "--", "python3", "-c", LEASE)
    assert ran.returncode == 0, ran.stderr
    assert "LEASED" not in ran.stdout and ran.stdout.count("refused") == 6, ran.stdout
    assert ran.stdout.count("EPERM") == 6
    log = bc_rootless.home / "ev.jsonl"
    own = bc_rootless(
        "run", "--unsafe-no-seccomp", "--events", str(log), "--", "python3", "-c", LEASE
    )
    assert own.returncode == 0, own.stderr
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert any(
        e.get("event") == "etc.unprepared" and "seccomp" in e.get("why", "") for e in events
    ), own.stdout[-3000:]
