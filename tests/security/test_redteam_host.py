"""The host side of ``buildcell build`` and ``buildcell run``, attacked where other tests do not.

Each test is one attack, run against the real CLI in a subprocess as root (the way CI runs
buildcell), by one of two attackers:

* a pull request, which controls every file of the checkout and its ``buildcell.yaml``,
  and whatever its cells write (the workspace, caches, outputs, their names);
* another unprivileged local user of the CI host (uid 65534 here).

The containment each test expects is what the README's security model promises: a refusal
is exit 125 with exactly one ``buildcell: error:`` line and no traceback, nothing is
written, read, fetched or run on the host beyond what the operator granted, and nothing
is left half-written. An attack that succeeds today is marked ``xfail(strict=True)`` with
the reason; the test turns green (and must lose its mark) when the hole is closed.

Everything lives in a fresh directory under /tmp with mode 0711 (the cells' unprivileged
uids must traverse it), removed afterwards; nothing is imported from buildcell.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import resource
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import one_error

SRC = Path(__file__).resolve().parents[2] / "src"
BUSYBOX = Path("/bin/busybox")
NOBODY = 65534

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="attacks the host side as CI runs it: buildcell as root"
)
needs_busybox = pytest.mark.skipif(not BUSYBOX.exists(), reason="needs /bin/busybox")


# -- harness -------------------------------------------------------------------------------


@pytest.fixture
def space() -> Iterator[Path]:
    """A private playground under /tmp (0711): the state directory and the checkouts."""
    path = Path(tempfile.mkdtemp(prefix="bc-redteam-", dir="/tmp"))
    os.chmod(path, 0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _env(space: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(space),
        "PYTHONPATH": str(SRC),
        "BUILDCELL_STATE_DIR": str(space / "state"),
        "LANG": "C.UTF-8",
    }
    env.update(extra or {})
    return env


def _nofile(limit: int) -> Any:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    return apply


def bc(
    space: Path,
    *args: str,
    cwd: Path,
    env: dict[str, str] | None = None,
    timeout: float = 180,
    nofile: int | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the real CLI (``python -m buildcell``) as this (root) user."""
    return subprocess.run(
        [sys.executable, "-m", "buildcell", *args],
        cwd=cwd,
        env=_env(space, env),
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        check=False,
        preexec_fn=_nofile(nofile) if nofile else None,
    )


def project(directory: Path, spec: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o755)
    (directory / "buildcell.yaml").write_text(spec)
    return directory


def leftovers(parent: Path) -> list[str]:
    """Staging directories an output directory's owner may have left in ``parent``."""
    return sorted(p.name for p in parent.iterdir() if ".buildcell-" in p.name)


def state_files(space: Path) -> Iterator[Path]:
    for root, _dirs, files in os.walk(space / "state"):
        for name in files:
            yield Path(root, name)


def no_cells_left(space: Path) -> None:
    cells = space / "state" / "cells"
    assert not cells.exists() or list(cells.iterdir()) == [], list(cells.iterdir())


def subjects(out: Path) -> list[dict[str, Any]]:
    import base64

    envelope = json.loads((out / "provenance.intoto.jsonl").read_text().splitlines()[0])
    statement = json.loads(base64.b64decode(envelope["payload"]))
    return list(statement["subject"])


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def host_secret(space: Path, name: str = "host-secret") -> tuple[Path, str]:
    """A root-only host file that looks like /etc/shadow, with a unique token."""
    token = secrets.token_hex(12)
    path = space / name
    path.write_text(f"root:$6${token}:19700:0:99999:7:::\ndaemon:*:19700:0:99999:7:::\n")
    os.chmod(path, 0o600)
    return path, token


class Origin:
    """A loopback HTTP server that records every request line it gets (origin or proxy)."""

    def __init__(self) -> None:
        hits: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hits.append(self.requestline)
                body = b"served by the host's loopback\n"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_CONNECT = do_GET

            def log_message(self, *args: object) -> None:
                pass

        self.hits = hits
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Origin:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def origin() -> Iterator[Origin]:
    with Origin() as served:
        yield served


BUILD = """\
version: 1
name: out
steps:
  - {name: s, run: "mkdir -p dist && echo payload > dist/a"}
outputs: ["dist/*"]
"""


# == repository paths that host code still opens by name =====================================


def test_a_spec_that_is_a_symlink_to_a_host_file_is_not_read(space: Path) -> None:
    shadow, token = host_secret(space)
    proj = space / "p"
    proj.mkdir()
    (proj / "buildcell.yaml").symlink_to(shadow)
    res = bc(space, "build", cwd=proj)
    line = one_error(res)
    assert "buildcell.yaml" in line
    assert token not in res.stdout + res.stderr, "the host file's content is in the error"


def test_a_spec_that_is_a_fifo_does_not_block(space: Path) -> None:
    fifo = space / "host-fifo"
    os.mkfifo(fifo)
    proj = space / "p"
    proj.mkdir()
    (proj / "buildcell.yaml").symlink_to(fifo)
    try:
        res = bc(space, "build", cwd=proj, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("buildcell build blocked opening a spec that is a fifo")
    one_error(res)


def test_a_spec_that_is_itself_a_fifo_does_not_block(space: Path) -> None:
    proj = space / "p"
    proj.mkdir()
    os.mkfifo(proj / "buildcell.yaml")
    elsewhere = space / "elsewhere"
    elsewhere.mkdir()
    try:
        res = bc(space, "build", "-f", str(proj / "buildcell.yaml"), cwd=elsewhere, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("buildcell build blocked opening a spec that is a fifo")
    assert "fifo" in one_error(res)


def test_an_absolute_spec_path_that_is_a_symlink_to_a_host_file_is_not_read(space: Path) -> None:
    # -f with an absolute path is not below the working directory, so the CLI's check of
    # the operator's path lets it through: the spec itself is still opened without
    # following its last component.
    shadow, token = host_secret(space)
    proj = space / "p"
    proj.mkdir()
    (proj / "buildcell.yaml").symlink_to(shadow)
    elsewhere = space / "elsewhere"
    elsewhere.mkdir()
    res = bc(space, "build", "-f", str(proj / "buildcell.yaml"), cwd=elsewhere)
    one_error(res)
    assert token not in res.stdout + res.stderr, "the host file's content is in the error"


def test_a_spec_that_links_to_another_file_of_its_repository_is_read(space: Path) -> None:
    # Outside the working directory the spec's own symlink resolves beneath its directory.
    proj = project(space / "p", BUILD)
    (proj / "ci").mkdir()
    os.rename(proj / "buildcell.yaml", proj / "ci" / "build.yaml")
    (proj / "buildcell.yaml").symlink_to("ci/build.yaml")
    elsewhere = space / "elsewhere"
    elsewhere.mkdir()
    spec = str(proj / "buildcell.yaml")
    res = bc(space, "build", "-f", spec, "--out", str(space / "o"), cwd=elsewhere)
    assert res.returncode == 0, res.stderr
    assert (space / "o" / "dist" / "a").read_text() == "payload\n"
    # In the working directory (a checkout) buildcell follows no symlink, and says where
    # this one leads.
    res = bc(space, "build", "--out", str(space / "o2"), cwd=proj)
    assert "symlink" in one_error(res)
    assert str(proj / "ci" / "build.yaml") in res.stderr


def test_run_source_through_a_committed_symlink_is_refused(space: Path) -> None:
    private = space / "host-private"
    private.mkdir(mode=0o700)
    token = secrets.token_hex(12)
    (private / "shadow").write_text(f"root:$6${token}:::\n")
    os.chmod(private / "shadow", 0o600)
    proj = space / "p"
    proj.mkdir()
    (proj / "src").symlink_to(private)
    res = bc(
        space, "run", "--source", "src", "--", "sh", "-c", "cat /workspace/shadow; true", cwd=proj
    )
    assert token not in res.stdout + res.stderr, "a root-only host file reached the cell"
    assert "src" in one_error(res)


def test_build_spec_directory_through_a_committed_symlink_is_refused(space: Path) -> None:
    token = secrets.token_hex(12)
    victim = project(
        space / "victim",
        "version: 1\nname: victim\nsteps:\n  - {name: s, run: 'cat private.txt'}\n",
    )
    (victim / "private.txt").write_text(f"victim-private-{token}\n")
    os.chmod(victim, 0o700)
    proj = space / "p"
    proj.mkdir()
    (proj / "ci").symlink_to(victim)
    res = bc(space, "build", "-f", "ci/buildcell.yaml", cwd=proj)
    assert token not in res.stdout + res.stderr, "another project's files were built"
    one_error(res)


@needs_busybox
def test_run_rootfs_dir_through_a_committed_symlink_is_refused(space: Path) -> None:
    host_dir = space / "host-dir"
    (host_dir / "bin").mkdir(parents=True)
    shutil.copy(BUSYBOX, host_dir / "bin" / "sh")
    token = secrets.token_hex(12)
    (host_dir / "host-data.txt").write_text(token)
    proj = space / "p"
    proj.mkdir()
    (proj / "myroot").symlink_to(host_dir)
    res = bc(
        space,
        "run",
        "--rootfs",
        "dir:myroot",
        "--",
        "/bin/sh",
        "-c",
        "cat /host-data.txt; true",
        cwd=proj,
    )
    assert token not in res.stdout + res.stderr, "a host directory became the cell's root"
    one_error(res)


def test_run_events_file_through_a_committed_symlink_is_refused(space: Path) -> None:
    victim = space / "victim-file"
    victim.write_text("precious\n")
    proj = space / "p"
    proj.mkdir()
    (proj / "events.jsonl").symlink_to(victim)
    res = bc(space, "run", "--events", "events.jsonl", "--", "true", cwd=proj)
    assert victim.read_text() == "precious\n", "root appended events to a host file"
    one_error(res)


def test_init_never_writes_through_a_committed_symlink(space: Path) -> None:
    victim = space / "victim-file"
    victim.write_text("precious\n")
    proj = space / "p"
    proj.mkdir()
    (proj / ".buildcell.yaml.tmp").symlink_to(victim)
    bc(space, "init", cwd=proj)
    assert victim.read_text() == "precious\n", "root wrote through a committed symlink"


def test_planted_staging_names_in_the_checkout_never_reach_the_host(space: Path) -> None:
    # The default --out is ./buildcell-out, so the checkout is the parent in which
    # leftover '.buildcell-out.buildcell-*' directories are cleaned up as root.
    victim = space / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "file").write_text("precious\n")
    (victim / "sub" / "f").write_text("precious\n")
    proj = project(space / "p", BUILD)
    (proj / ".buildcell-out.buildcell-aaaa").symlink_to(victim)
    planted = proj / ".buildcell-out.buildcell-bbbb"
    planted.mkdir()
    (planted / "link").symlink_to(victim / "file")
    (planted / "dir").symlink_to(victim)
    (planted / "deep" / "x").mkdir(parents=True)
    os.link(victim / "file", planted / "deep" / "x" / "hard")
    (proj / ".buildcell-out.buildcell-cccc").write_text("a plain file\n")
    res = bc(space, "build", cwd=proj)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (victim / "file").read_text() == "precious\n"
    assert (victim / "sub" / "f").read_text() == "precious\n"
    assert sorted(p.name for p in victim.rglob("*")) == ["f", "file", "sub"]
    assert (proj / "buildcell-out" / "dist" / "a").read_text() == "payload\n"
    assert leftovers(proj) == []


# == output directories ==========================================================================


def _writer_spec(tag: str) -> str:
    return (
        f"version: 1\nname: {tag}\nsteps:\n"
        f"  - {{name: s, run: 'mkdir -p dist && for i in $(seq 1 150); do echo {tag} > "
        f"dist/f$i; done'}}\noutputs: ['dist/*']\n"
    )


@pytest.mark.timeout(600)
def test_builds_racing_for_one_out_dir_each_publish_whole(space: Path) -> None:
    out = space / "shared-out"
    projects = [project(space / f"b{i}", _writer_spec(f"b{i}")) for i in range(5)]
    for _round in range(2):
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "buildcell", "build", "--out", str(out)],
                cwd=p,
                env=_env(space),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                errors="replace",
            )
            for p in projects
        ]
        results = [(p.communicate(timeout=300), p.returncode) for p in procs]
        for (stdout, stderr), code in results:
            assert code == 0, stderr[-2000:]
            assert "Traceback" not in stdout + stderr
        manifest = json.loads((out / "outputs.json").read_text())
        files = {o["path"]: o["sha256"] for o in manifest["outputs"]}
        assert len(files) == 150
        contents = {(out / path).read_text() for path in files}
        assert contents == {f"{manifest['name']}\n"}, "files of two builds mixed"
        for path, digest in files.items():
            assert sha256((out / path).read_bytes()) == digest
        assert {s["name"]: s["digest"]["sha256"] for s in subjects(out)} == files
        assert leftovers(space) == []


def test_no_wait_fails_at_once_while_another_build_holds_the_out_dir(space: Path) -> None:
    out = space / "held-out"
    slow = project(space / "slow", BUILD.replace("mkdir -p dist", "sleep 6 && mkdir -p dist"))
    fast = project(space / "fast", BUILD)
    holder = subprocess.Popen(
        [sys.executable, "-m", "buildcell", "build", "--out", str(out)],
        cwd=slow,
        env=_env(space),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not leftovers(space) and time.monotonic() < deadline:
            time.sleep(0.05)  # the staging directory appears once the lock is held
        assert leftovers(space), "the first build never claimed the output directory"
        started = time.monotonic()
        res = bc(space, "build", "--out", str(out), "--no-wait", cwd=fast)
        assert time.monotonic() - started < 30
        assert "in use" in one_error(res)
    finally:
        _, stderr = holder.communicate(timeout=120)
    assert holder.returncode == 0, stderr[-2000:]
    assert (out / "dist" / "a").read_text() == "payload\n"
    assert leftovers(space) == []


def test_another_user_cannot_hold_the_output_directory_lock(space: Path) -> None:
    python = "/usr/bin/python3"
    setpriv = shutil.which("setpriv")
    if setpriv is None or not os.access(python, os.X_OK):
        pytest.skip("needs setpriv and /usr/bin/python3")
    proj = project(space / "p", BUILD)
    assert bc(space, "build", cwd=proj).returncode == 0
    out = proj / "buildcell-out"
    locker = subprocess.Popen(
        [
            setpriv,
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            python,
            "-c",
            "import fcntl, os, sys\n"
            f"fd = os.open({str(out)!r}, os.O_RDONLY | os.O_DIRECTORY)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('locked', flush=True)\nsys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert locker.stdout is not None
        assert locker.stdout.readline().strip() == "locked"
        res = bc(space, "build", "--no-wait", cwd=proj, timeout=60)
        assert res.returncode == 0, "another local user blocks builds: " + res.stderr[-500:]
    finally:
        locker.communicate(input="", timeout=30)


def test_a_committed_out_dir_whose_manifest_is_a_fifo_is_refused_unopened(space: Path) -> None:
    proj = project(space / "p", BUILD)
    (proj / "buildcell-out").mkdir()
    os.mkfifo(proj / "buildcell-out" / "outputs.json")
    res = bc(space, "build", cwd=proj, timeout=60)
    assert "buildcell-out" in one_error(res)
    assert stat.S_ISFIFO(os.lstat(proj / "buildcell-out" / "outputs.json").st_mode)
    assert leftovers(proj) == []


def test_another_user_swapping_a_pre_made_out_dir_for_a_link(space: Path) -> None:
    # --out in a world-writable sticky directory that another local user got to first: they
    # own the directory buildcell locks, and swap it for a symlink to a victim mid-build.
    python, setpriv = "/usr/bin/python3", shutil.which("setpriv")
    if setpriv is None or not os.access(python, os.X_OK):
        pytest.skip("needs setpriv and /usr/bin/python3")
    public = space / "public"
    public.mkdir()
    os.chmod(public, 0o1777)
    victim = space / "victim"
    victim.mkdir()
    os.chmod(victim, 0o777)
    out = public / "out"
    slow = project(space / "p", BUILD.replace("mkdir -p dist", "sleep 3 && mkdir -p dist"))
    swapper = subprocess.Popen(
        [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", python, "-c",
         "import os, sys, time\n"
         f"public, out, victim = {str(public)!r}, {str(out)!r}, {str(victim)!r}\n"
         "os.mkdir(out)\nprint('made', flush=True)\n"
         "deadline = time.monotonic() + 60\n"
         "while not any('.buildcell-' in n for n in os.listdir(public)):\n"
         "    if time.monotonic() > deadline: sys.exit(3)\n"
         "    time.sleep(0.01)\n"
         "os.rename(out, out + '.mine')\nos.symlink(victim, out)\nprint('swapped', flush=True)\n"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert swapper.stdout is not None
        assert swapper.stdout.readline().strip() == "made"
        res = bc(space, "build", "--out", str(out), cwd=slow, timeout=120)
    finally:
        rest, _ = swapper.communicate(timeout=90)
    assert "swapped" in rest, "the other user never got to swap the directory"
    assert "Traceback" not in res.stdout + res.stderr
    assert list(victim.iterdir()) == [], "root wrote through the other user's symlink"
    if res.returncode == 0:
        assert not out.is_symlink() and os.lstat(out).st_uid == 0
        assert (out / "dist" / "a").read_text() == "payload\n"
    else:
        one_error(res)
    assert leftovers(public) == []


# == what the supervisor does with cell-written data: outputs ====================================


@pytest.mark.parametrize(
    ("command", "name"),
    [("build", ".outputs.json.tmp"), ("run", ".outputs.json.tmp"), ("build", "outputs.json/x")],
)
def test_outputs_that_take_the_manifest_s_working_names(
    space: Path, command: str, name: str
) -> None:
    make = f"mkdir -p $(dirname {name}) && echo x > {name} && echo y > a"
    proj = project(
        space / "p",
        f"version: 1\nname: n\nsteps:\n  - {{name: s, run: '{make}'}}\noutputs: ['{name}', 'a']\n",
    )
    if command == "build":
        res = bc(space, "build", cwd=proj)
    else:
        (proj / "buildcell.yaml").unlink()
        res = bc(space, "run", "--output", name, "--output", "a", "--", "sh", "-c", make, cwd=proj)
    one_error(res)
    assert not (proj / "buildcell-out").exists()
    assert leftovers(proj) == []


_DEEP = """\
import os
os.mkdir("dist")
fd = os.open("dist", os.O_RDONLY)
for i in range(20):
    name = ("d%02d" % i) * 80
    os.mkdir(name, dir_fd=fd)
    sub = os.open(name, os.O_RDONLY, dir_fd=fd)
    os.close(fd)
    fd = sub
leaf = os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
os.write(leaf, b"no secret here\\n")
"""


@pytest.mark.parametrize("command", ["build", "run"])
def test_a_deep_output_path_with_a_secret_bound(space: Path, command: str) -> None:
    proj = space / "p"
    proj.mkdir()
    (proj / "deep.py").write_text(_DEEP)
    env = {"TOK": "s3cr3t-" + secrets.token_hex(8)}
    if command == "build":
        project(
            proj,
            "version: 1\nname: deep\nsteps:\n"
            "  - {name: s, secrets: [tok], run: 'python3 deep.py'}\noutputs: ['dist/**']\n",
        )
        res = bc(space, "build", "--secret", "tok=env:TOK", cwd=proj, env=env)
    else:
        res = bc(
            space,
            "run",
            "--secret",
            "TOK",
            "--output",
            "dist/**",
            "--",
            "python3",
            "deep.py",
            cwd=proj,
            env=env,
        )
    out = res.stdout + res.stderr
    assert "Traceback" not in out, out[-1500:]
    assert res.returncode in (0, 125), out[-1500:]
    if res.returncode == 125:
        one_error(res)


def test_an_archive_cannot_take_the_name_of_an_output(space: Path) -> None:
    proj = project(
        space / "p",
        "version: 1\nname: arc\nsteps:\n"
        "  - {name: s, run: 'echo forged > all.tar.gz; echo real > b.txt'}\n"
        "outputs: [all.tar.gz, b.txt]\narchive: all.tar.gz\n",
    )
    res = bc(space, "build", cwd=proj)
    if res.returncode == 125:
        one_error(res)
        return
    assert res.returncode == 0, res.stderr[-2000:]
    out = proj / "buildcell-out"
    names = [s["name"] for s in subjects(out)]
    assert len(names) == len(set(names)), f"two subjects share a name: {names}"
    for subject in subjects(out):
        assert sha256((out / subject["name"]).read_bytes()) == subject["digest"]["sha256"]


def test_non_utf8_output_names_are_refused_in_one_line(space: Path) -> None:
    make = 'python3 -c \'open(b"dist/\\xff\\xfe.bin", "wb").write(b"x")\''
    proj = project(
        space / "p",
        "version: 1\nname: u\nsteps:\n"
        f"  - name: s\n    run: mkdir -p dist && {make}\noutputs: ['dist/*']\n",
    )
    for args in (["build"], ["build", "--json"]):
        res = bc(space, *args, cwd=proj)
        one_error(res)
        assert not (proj / "buildcell-out").exists()
        assert leftovers(proj) == []


def test_output_names_cannot_forge_lines_in_an_error(space: Path) -> None:
    forged = "buildcell: FORGED build succeeded"
    proj = project(
        space / "p",
        "version: 1\nname: nl\nsteps:\n  - name: s\n"
        "    secrets: [tok]\n    run: |\n      mkdir -p dist\n"
        f"      cat /run/secrets/tok > \"$(printf 'dist/a\\n{forged}')\"\n"
        "outputs: ['dist/*']\n",
    )
    res = bc(
        space,
        "build",
        "--secret",
        "tok=env:TOK",
        cwd=proj,
        env={"TOK": "s3cr3t-" + secrets.token_hex(8)},
    )
    one_error(res)
    lines = (res.stdout + res.stderr).splitlines()
    assert not any(ln.startswith(forged) for ln in lines), "a file name forged a log line"


def test_output_names_cannot_forge_lines_in_warnings_or_the_summary(space: Path) -> None:
    forged = "buildcell: FORGED"
    proj = project(
        space / "p",
        "version: 1\nname: nl\nsteps:\n  - name: s\n    run: |\n"
        "      mkdir -p dist\n"
        f"      echo x > \"$(printf 'dist/f\\n{forged} file')\"\n"
        f"      ln -s /etc/shadow \"$(printf 'dist/l\\n{forged} link')\"\n"
        "      ln -s /etc/shadow \"$(printf 'dist/e\\033[2J\\033]0;title')\"\n"
        "outputs: ['dist/*']\n",
    )
    res = bc(space, "build", cwd=proj)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = (res.stdout + res.stderr).splitlines()
    assert not any(ln.startswith(forged) for ln in lines), "a file name forged a log line"
    # The cell printed nothing: every line here is buildcell's own.
    assert "\x1b" not in res.stdout + res.stderr, "a file name sent escape sequences"


@pytest.mark.timeout(600)
def test_a_huge_number_of_outputs(space: Path) -> None:
    count = 20_000
    proj = project(
        space / "p",
        "version: 1\nname: many\nsteps:\n"
        f"  - {{name: s, run: 'mkdir -p dist && cd dist && seq 1 {count} | xargs touch'}}\n"
        "outputs: ['dist/*']\n",
    )
    started = time.monotonic()
    res = bc(space, "build", cwd=proj, timeout=540)
    assert res.returncode == 0, res.stderr[-2000:]
    assert time.monotonic() - started < 540
    manifest = json.loads((proj / "buildcell-out" / "outputs.json").read_text())
    assert len(manifest["outputs"]) == count
    assert len(os.listdir(proj / "buildcell-out" / "dist")) == count
    assert len(subjects(proj / "buildcell-out")) == count


def test_hostile_names_in_the_workspace_are_collected_as_they_are(space: Path) -> None:
    names = [
        "nl\nname",
        "x" * 255,
        "...",
        "-rf",
        "--bind",
        " lead",
        "back\\slash",
        "star*",
        "q?",
        "[set]",
        "ünï",
        "tab\tname",
        ".hidden",
    ]
    script = "import os\nos.makedirs('names')\n" + "".join(
        f"open(os.path.join('names', {n!r}), 'w').write({n!r})\n" for n in names
    )
    proj = project(
        space / "p",
        "version: 1\nname: names\nsteps:\n"
        "  - {name: s, run: 'python3 mk.py'}\noutputs: ['names/*']\n",
    )
    (proj / "mk.py").write_text(script)
    res = bc(space, "build", cwd=proj)
    assert res.returncode == 0, res.stderr[-2000:]
    out = proj / "buildcell-out"
    manifest = json.loads((out / "outputs.json").read_text())
    assert sorted(o["path"] for o in manifest["outputs"]) == sorted(f"names/{n}" for n in names)
    for n in names:
        assert (out / "names" / n).read_text() == n


def test_a_deep_workspace_is_refused_and_removed(space: Path) -> None:
    script = (
        "import os\n"
        "for base in ('/workspace/deep', '/home/builder/c/deep'):\n"
        "    os.makedirs(base)\n    os.chdir(base)\n"
        "    for i in range(20000):\n        os.mkdir('d')\n        os.chdir('d')\n"
        "    open('leaf', 'w').write('x')\n"
    )
    proj = project(
        space / "p",
        "version: 1\nname: deep\nsteps:\n  - name: s\n"
        "    caches: [{path: /home/builder/c, key: k}]\n    run: python3 mk.py\n"
        "outputs: ['deep/**']\n",
    )
    (proj / "mk.py").write_text(script)
    res = bc(space, "build", cwd=proj, timeout=110)
    assert "deeper than 256" in one_error(res)
    assert not (proj / "buildcell-out").exists()
    assert leftovers(proj) == []
    no_cells_left(space)


def test_the_source_digest_does_not_depend_on_the_staging_directory(space: Path) -> None:
    proj = project(space / "p", BUILD)
    digests = []
    for _ in range(2):
        assert bc(space, "build", cwd=proj).returncode == 0
        text = (proj / "buildcell-out" / "provenance.intoto.jsonl").read_text()
        envelope = json.loads(text.splitlines()[0])
        import base64

        statement = json.loads(base64.b64decode(envelope["payload"]))
        source = statement["predicate"]["buildDefinition"]["externalParameters"]["source"]
        digests.append(source["digest"]["sha256"])
    assert digests[0] == digests[1], "the same checkout got two source digests"


def test_a_cell_of_run_does_not_see_the_staging_directory(space: Path) -> None:
    proj = space / "p"
    proj.mkdir()
    os.chmod(proj, 0o755)
    (proj / "src.txt").write_text("x\n")
    res = bc(
        space,
        "run", "--source", ".", "--output", "listing", "--out", "o", "--",
        "sh", "-c", "ls -a /workspace > /workspace/listing",
        cwd=proj,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    listing = (proj / "o" / "listing").read_text().split()
    assert "src.txt" in listing
    assert [n for n in listing if "buildcell" in n] == [], listing


# == caches and the secret scan ==================================================================

_FILL_CACHE = """\
import os
big = "/home/builder/c/big"
os.makedirs(big)
for i in range(2500):
    os.mkdir(f"{big}/d{i}")
order = os.listdir(big)   # the order the host's scandir will see too
value = open("/run/secrets/tok", "rb").read()
for name in order[1500:]:
    with open(f"{big}/{name}/f", "wb") as f:
        f.write(value)
"""


@pytest.mark.timeout(300)
def test_a_cache_scan_that_runs_out_of_descriptors_still_finds_the_secret(space: Path) -> None:
    proj = project(
        space / "p",
        "version: 1\nname: fds\nsteps:\n  - name: fill\n"
        "    secrets: [tok]\n    caches: [{path: /home/builder/c, key: k}]\n"
        "    run: python3 fill.py\n  - name: read\n"
        "    caches: [{path: /home/builder/c, key: k}]\n"
        "    run: 'echo \"restored=$(ls /home/builder/c/big/*/f 2>/dev/null | wc -l)\"'\n",
    )
    (proj / "fill.py").write_text(_FILL_CACHE)
    res = bc(
        space,
        "build",
        "--secret",
        "tok=env:TOK",
        cwd=proj,
        nofile=1024,
        timeout=280,
        env={"TOK": "s3cr3t-" + secrets.token_hex(8)},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "[read] restored=0" in res.stdout, "a cache holding the secret was published"
    assert "cache 'k' not saved" in res.stderr


@pytest.mark.timeout(300)
def test_the_cache_secret_scan_is_bounded(space: Path) -> None:
    proj = project(
        space / "p",
        "version: 1\nname: sparse\nsteps:\n  - name: s\n"
        "    secrets: [tok]\n    caches: [{path: /home/builder/c, key: k}]\n"
        "    limits: {timeout: 60s}\n    run: truncate -s 1T /home/builder/c/zeros\n",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "buildcell", "build", "--secret", "tok=env:TOK"],
        cwd=proj,
        env=_env(space, {"TOK": "s3cr3t-" + secrets.token_hex(8)}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
    )
    try:
        _, stderr = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # buildcell unwinds and tears the cell down
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        pytest.fail("the supervisor was still scanning the cache 90 s after the step")
    assert proc.returncode == 0, stderr[-2000:]
    assert "cache 'k' not saved" in stderr


def test_cell_written_cache_entries_stay_inert_when_restored(space: Path) -> None:
    shadow, token = host_secret(space)
    proj = project(
        space / "p",
        "version: 1\nname: inert\nsteps:\n  - name: fill\n"
        "    caches: [{path: /home/builder/c, key: k}]\n    run: |\n"
        "      cd /home/builder/c\n"
        f"      ln -s {shadow} link\n"
        "      mkfifo pipe\n"
        "      echo x > suid && chmod 4755 suid\n"
        "      echo y > a && ln a b\n"
        "  - name: read\n    caches: [{path: /home/builder/c, key: k}]\n"
        "    run: |\n      cd /home/builder/c\n"
        '      echo "link=$(readlink link) pipe=$(test -p pipe && echo yes || echo no)"\n'
        '      echo "suid=$(stat -c %a suid) a=$(cat a) b=$(cat b)"\n'
        "      cat link || true\n",
    )
    res = bc(space, "build", "--ref", "refs/pull/1/head", cwd=proj)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"[read] link={shadow} pipe=no" in res.stdout
    assert "[read] suid=755 a=y b=y" in res.stdout
    assert token not in res.stdout + res.stderr
    for path in state_files(space):
        if path.is_file() and not path.is_symlink() and path.stat().st_size < 1 << 20:
            assert token.encode() not in path.read_bytes(), path


def test_an_empty_ref_is_not_a_shared_cache_scope(space: Path) -> None:
    spec = (
        "version: 1\nname: c\nsteps:\n  - name: s\n"
        "    caches: [{path: /home/builder/c, key: k}]\n"
        "    run: 'cat /home/builder/c/left 2>/dev/null || true; echo TAG > /home/builder/c/left'\n"
    )
    first = project(space / "pr1", spec.replace("TAG", "left-by-pr-1"))
    second = project(space / "pr2", spec.replace("TAG", "left-by-pr-2"))
    for ref in ("", " ", "\t"):
        res = bc(space, "build", "--project", "shared", "--ref", ref, cwd=first)
        if res.returncode == 125:
            assert "--ref" in one_error(res)
            continue
        assert res.returncode == 0, res.stderr[-2000:]
        res = bc(space, "build", "--project", "shared", "--ref", ref, cwd=second)
        assert res.returncode == 0, res.stderr[-2000:]
        assert "left-by-pr-1" not in res.stdout, "two builds with an empty ref shared a cache"


def test_a_ref_that_looks_like_a_path_never_reaches_the_trusted_cache(space: Path) -> None:
    spec = (
        "version: 1\nname: c\nsteps:\n  - name: s\n"
        "    caches: [{path: /home/builder/c, key: k}]\n"
        "    run: 'echo \"seen=$(cat /home/builder/c/v 2>/dev/null)\"; echo TAG > /home/builder/c/v'\n"
    )
    main = project(space / "main", spec.replace("TAG", "trusted-value"))
    pr = project(space / "pr", spec.replace("TAG", "poisoned"))
    common = ("--project", "shared")
    assert bc(space, "build", *common, "--trust", "trusted", "--ref", "refs/heads/main",
              cwd=main).returncode == 0  # fmt: skip
    for ref in ("../../trusted", "../trusted/k", "/", "..", "refs/heads/main",
                "refs/pull/1/head\n../../trusted", "\udcff"):  # fmt: skip
        res = bc(space, "build", *common, "--ref", ref, cwd=pr)
        if "\n" in ref:  # refused as no ref at all: a control character
            assert "--ref" in one_error(res)
            continue
        assert res.returncode == 0, (ref, res.stderr[-1500:])
    res = bc(space, "build", *common, "--trust", "trusted", "--ref", "refs/heads/main", cwd=main)
    assert res.returncode == 0, res.stderr[-1500:]
    assert "[s] seen=trusted-value" in res.stdout, "an untrusted build wrote the trusted cache"


# == the workspace between steps: mount points ===================================================


@pytest.mark.parametrize("replaced", ["vendor", "vendor/deep"])
@pytest.mark.parametrize(
    "link",
    [
        "/oldroot{victim}",
        "{victim}",
        "../../../../../../..{victim}",
        "/proc/self/root{victim}",
        "chain",
        "file",
    ],
)
def test_a_step_turns_an_input_s_parents_into_a_symlink_farm(
    space: Path, replaced: str, link: str
) -> None:
    # Step 1 renames a directory on the way to an input's mount point away (it holds a
    # mount point, so it cannot be removed, but it can be renamed) and puts a link to the
    # host in its place; step 2's mount points would be made through it by bubblewrap < 0.12.
    victim = space / "victim-dir"
    victim.mkdir()
    os.chmod(victim, 0o777)
    payload = b"pinned input\n"
    if link == "chain":
        up = "../" * replaced.count("/")
        plant = f"ln -s /oldroot{victim} hop && ln -s {up}hop {replaced}"
    elif link == "file":
        plant = f"echo not-a-dir > {replaced}"
    else:
        plant = f"ln -s {link.format(victim=victim)} {replaced}"
    proj = project(
        space / "p",
        "version: 1\nname: farm\ninputs:\n"
        f"  - {{file: in.bin, sha256: {sha256(payload)}, path: vendor/deep/x.bin}}\n"
        "steps:\n"
        f"  - {{name: farm, run: 'mv {replaced} moved && {plant}'}}\n"
        "  - {name: use, run: 'cat vendor/deep/x.bin'}\n",
    )
    (proj / "in.bin").write_bytes(payload)
    res = bc(space, "build", cwd=proj)
    line = one_error(res)
    assert "vendor" in line
    assert list(victim.iterdir()) == [], "bubblewrap made a mount point on the host"
    no_cells_left(space)


# == rootfs and images from the repository =======================================================


def _busybox_rootfs(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    (root / "bin" / "sh").symlink_to("busybox")
    return root


def _odd(root: Path, layout: str) -> None:
    if layout == "var-file":
        (root / "var").write_text("var is a file\n")
    elif layout == "var-tmp-link":
        (root / "var").mkdir()
        (root / "var" / "tmp").symlink_to("/proc/self/root/tmp")
    elif layout == "etc-fifo":
        os.mkfifo(root / "etc")
    elif layout == "etc-socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(root / "etc"))
        sock.close()
    elif layout == "etc-chain":
        (root / "etc").symlink_to("a")
        (root / "a").symlink_to("b/../../../../../..")
        (root / "b").mkdir()
    elif layout == "links-everywhere":
        (root / "usr").symlink_to("/")
        (root / "lib").symlink_to("/proc/self/root")
        (root / "w2").symlink_to("/")
        (root / "var").symlink_to("/tmp")
        (root / "home").symlink_to("/")
        (root / "workspace").symlink_to("/")
        (root / "run").symlink_to("/proc/1/root")


@needs_busybox
@pytest.mark.parametrize(
    "layout",
    ["var-file", "var-tmp-link", "etc-fifo", "etc-socket", "etc-chain", "links-everywhere"],
)
def test_a_rootfs_with_odd_entries_never_shows_the_host(space: Path, layout: str) -> None:
    canary = space / "host-canary"
    token = secrets.token_hex(12)
    canary.write_text(token + "\n")
    os.chmod(canary, 0o644)  # readable by anyone who reaches it
    proj = project(
        space / "p",
        "version: 1\nname: odd\nrootfs: {dir: root}\nsteps:\n"
        "  - {name: s, run: /bin/sh probe.sh}\n",
    )
    _odd(_busybox_rootfs(proj / "root"), layout)
    probes = [
        f"{prefix}{canary}"
        for prefix in (
            "",
            "/etc",
            "/usr",
            "/lib",
            "/w2",
            "/var",
            "/home",
            "/run",
            "/etc/etc",
            "/var/tmp",
        )
    ]
    (proj / "probe.sh").write_text(
        "for p in " + " ".join(probes) + '; do busybox cat "$p" 2>/dev/null; done\n'
        "busybox ls / /etc /var 2>&1; echo probed\n"
    )
    res = bc(space, "build", cwd=proj)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "[s] probed" in res.stdout
    assert token not in res.stdout + res.stderr, "a host file was visible in the cell"


@needs_busybox
@pytest.mark.parametrize("where", ["top", "etc"])
def test_a_rootfs_with_too_many_entries_is_one_line(space: Path, where: str) -> None:
    proj = project(
        space / "p",
        "version: 1\nname: many\nrootfs: {dir: root}\nsteps:\n  - {name: s, run: 'true'}\n",
    )
    root = _busybox_rootfs(proj / "root")
    base = root if where == "top" else root / "etc"
    base.mkdir(exist_ok=True)
    for i in range(5000):
        (base / f"e{i}").touch()
    res = bc(space, "build", cwd=proj)
    assert "at most 4096" in one_error(res)
    no_cells_left(space)


def _blob(layout: Path, data: bytes) -> tuple[str, int]:
    digest = sha256(data)
    path = layout / "blobs" / "sha256" / digest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return f"sha256:{digest}", len(data)


def _busybox_layout(layout: Path) -> str:
    """A one-layer OCI image layout with busybox as /bin/sh; returns the manifest digest."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        bindir = tarfile.TarInfo("bin")
        bindir.type, bindir.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(bindir)
        data = BUSYBOX.read_bytes()
        member = tarfile.TarInfo("bin/busybox")
        member.size, member.mode = len(data), 0o755
        tar.addfile(member, io.BytesIO(data))
        link = tarfile.TarInfo("bin/sh")
        link.type, link.linkname = tarfile.SYMTYPE, "busybox"
        tar.addfile(link)
    layer, layer_size = _blob(layout, buf.getvalue())
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
    config, config_size = _blob(
        layout,
        json.dumps(
            {
                "architecture": arch,
                "os": "linux",
                "config": {},
                "rootfs": {"type": "layers", "diff_ids": [layer]},
            }
        ).encode(),
    )
    manifest, manifest_size = _blob(
        layout,
        json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": config,
                    "size": config_size,
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": layer,
                        "size": layer_size,
                    }
                ],
            }
        ).encode(),
    )
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text(
        json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [
                    {
                        "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "digest": manifest,
                        "size": manifest_size,
                    }
                ],
            }
        )
    )
    return manifest


@needs_busybox
@pytest.mark.parametrize(
    ("plant", "expected"),
    [
        ("inside", None),
        ("absolute-inside", "outside the root"),
        ("up-and-back", "above the root"),
        ("fifo", "fifo"),
        ("hard-linked-archive", "hard link"),
        ("dir-link-out", "outside the root"),
    ],
)
def test_an_image_path_in_the_spec_reached_through_links(
    space: Path, plant: str, expected: str | None
) -> None:
    proj = space / "p"
    proj.mkdir(mode=0o755)
    digest = _busybox_layout(proj / "layouts" / "real")
    img = proj / "img"
    if plant == "inside":
        img.symlink_to("layouts/real")
    elif plant == "absolute-inside":
        img.symlink_to(proj / "layouts" / "real")
    elif plant == "up-and-back":
        img.symlink_to("../p/layouts/real")
    elif plant == "fifo":
        os.mkfifo(img)
    elif plant == "hard-linked-archive":
        archive = proj / "image.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(proj / "layouts" / "real", arcname=".")
        os.link(archive, img)
    elif plant == "dir-link-out":
        outside = space / "outside-images"
        shutil.copytree(proj / "layouts", outside)
        (proj / "images").symlink_to(outside)
        img = proj / "images" / "real"
    rel = img.relative_to(proj)
    project(
        proj,
        f"version: 1\nname: img\nrootfs: {{oci: {rel}, digest: '{digest}'}}\n"
        "steps:\n  - {name: s, run: 'echo in-the-image'}\n",
    )
    started = time.monotonic()
    res = bc(space, "build", cwd=proj, timeout=60)
    assert time.monotonic() - started < 50
    if expected is None:
        assert res.returncode == 0, res.stderr[-2000:]
        assert "[s] in-the-image" in res.stdout
    else:
        assert expected in one_error(res)
        no_cells_left(space)


# == inputs ======================================================================================


def test_a_file_input_that_is_a_socket_is_refused_unread(space: Path) -> None:
    proj = project(
        space / "p",
        "version: 1\nname: sock\ninputs:\n"
        f"  - {{file: vendor.sock, sha256: {'a' * 64}, path: vendor/x}}\n"
        "steps:\n  - {name: s, run: 'true'}\n",
    )
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(proj / "vendor.sock"))
    listener.listen(1)
    listener.settimeout(0.1)
    try:
        res = bc(space, "build", cwd=proj, timeout=60)
        with pytest.raises(TimeoutError):
            listener.accept()  # nobody connected to it
    finally:
        listener.close()
    assert "socket" in one_error(res)


@pytest.mark.parametrize(
    "form",
    [
        "0",
        "[::127.0.0.1]",
        "[0:0:0:0:0:ffff:7f00:0001]",
        "[2002:7f00:1::1]",
        "127.000.000.001",
        "[::ffff:0:7f00:1]",
        "[64:ff9b:1::7f00:1]",
        "[fe80::1%25lo]",
        "localhost.",
        "LocalHost",
        "[::ffff:127.0.0.1%25lo]",
        "0x7f.0.0.1",
    ],
)
def test_url_inputs_in_exotic_loopback_forms(space: Path, origin: Origin, form: str) -> None:
    url = f"http://{form}:{origin.port}/x"
    proj = project(
        space / "p",
        "version: 1\nname: url\ninputs:\n"
        f"  - {{url: '{url}', sha256: {'a' * 64}, path: vendor/x}}\n"
        "steps:\n  - {name: s, run: 'true'}\n",
    )
    res = bc(space, "build", cwd=proj, timeout=60)
    one_error(res)
    assert origin.hits == [], "the host fetched from its own loopback"


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "https_proxy"])
def test_proxies_from_the_environment_never_see_a_guarded_target(
    space: Path, variable: str
) -> None:
    with Origin() as target, Origin() as proxy:
        scheme = "https" if variable == "https_proxy" else "http"
        url = f"{scheme}://127.0.0.1:{target.port}/x"
        proj = project(
            space / "p",
            "version: 1\nname: url\ninputs:\n"
            f"  - {{url: '{url}', sha256: {'a' * 64}, path: vendor/x}}\n"
            "steps:\n  - {name: s, run: 'true'}\n",
        )
        res = bc(
            space, "build", cwd=proj, timeout=60, env={variable: f"http://127.0.0.1:{proxy.port}"}
        )
        assert "loopback" in one_error(res)
        assert proxy.hits == [] and target.hits == []


#: Addresses no operator pin opens: the guard holds even for the operator's own name.
@pytest.mark.parametrize(
    "pin", ["169.254.169.254", "::ffff:169.254.169.254", "0.0.0.0", "::", "224.0.0.1",
            "64:ff9b::a9fe:a9fe"]  # the last: the metadata address through NAT64
)  # fmt: skip
def test_add_host_pins_to_guarded_addresses_stay_denied(
    space: Path, origin: Origin, pin: str
) -> None:
    """A pin the operator also allows opens a private or loopback mirror by its name
    (tests/integration/test_egress_explained.py); never the metadata service, an
    unspecified or a multicast address, and the denial offers no pin to try."""
    proj = space / "p"
    proj.mkdir()
    res = bc(
        space,
        "run",
        "--allow",
        f"evil.test:{origin.port}",
        "--add-host",
        f"evil.test:{pin}",
        "--",
        "curl",
        "-sS",
        "-m",
        "10",
        "-o",
        "/dev/null",
        "-w",
        "code=%{http_code}\\n",
        f"http://evil.test:{origin.port}/",
        cwd=proj,
        timeout=90,
    )
    assert "Traceback" not in res.stdout + res.stderr
    assert "code=403" in res.stdout, res.stdout + res.stderr[-1500:]
    assert origin.hits == []
    denial = next(line for line in res.stderr.splitlines() if "egress denied" in line)
    assert "to allow" not in denial and "--add-host" not in denial, denial


@pytest.mark.parametrize(
    "entry",
    [
        "[::ffff:7f00:1]:{port}",
        "[::ffff:0:7f00:1]:{port}",
        "0x7f000001:{port}",
        "2130706433:{port}",
        "127.1:{port}",
        "[::]:{port}",
        "0.0.0.0:{port}",
        "localhost:{port}",
        "x.localhost:{port}",
        "ip6-localhost:{port}",
        "[2002:7f00:1::]:{port}",
        "[64:ff9b::7f00:1]:{port}",
        "100.100.100.200:80",
        "1.0.0.0/23:443",
        "*.localhost:{port}",
    ],
)
def test_spec_network_entries_in_exotic_forms_never_reach_loopback(
    space: Path, origin: Origin, entry: str
) -> None:
    text = entry.format(port=origin.port)
    host = text.rsplit(":", 1)[0].split("/")[0].replace("*", "a")
    proj = project(
        space / "p",
        "version: 1\nname: net\nsteps:\n  - name: s\n"
        f"    network: {{allow: ['{text}']}}\n"
        f'    run: "curl -sS -m 10 -o /dev/null http://{host}:{origin.port}/ || true"\n',
    )
    res = bc(space, "build", cwd=proj, timeout=90)
    assert "Traceback" not in res.stdout + res.stderr
    if res.returncode != 0:
        one_error(res)
    assert origin.hits == [], "a spec reached the host's loopback"


# == the signing key =============================================================================


def test_a_signing_key_below_the_state_or_output_directory_is_refused(space: Path) -> None:
    proj = project(space / "p", BUILD)
    keys = space / "keys"
    res = bc(space, "keygen", "--out", str(keys), cwd=proj)
    assert res.returncode == 0, res.stderr
    (space / "state").mkdir(exist_ok=True)
    for where in (
        space / "state" / "cache" / "k.key",
        proj / "buildcell-out" / "k.key",
        proj / "sub" / "k.key",
    ):
        where.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(keys / "buildcell.key", where)
        os.chmod(where, 0o600)
        res = bc(space, "build", "--sign-key", str(where), cwd=proj)
        assert "signing key" in one_error(res)
        where.unlink()
    # The same key through a symlink outside: its real path is what counts.
    (space / "elsewhere").mkdir()
    inside = proj / "sub" / "k.key"
    shutil.copy(keys / "buildcell.key", inside)
    os.chmod(inside, 0o600)
    (space / "elsewhere" / "k.key").symlink_to(inside)
    res = bc(space, "build", "--sign-key", str(space / "elsewhere" / "k.key"), cwd=proj)
    assert "signing key" in one_error(res)
