"""`build --keep-failed` and `buildcell shell`, used as a person would: in a terminal (tmux),
typing, reading the screen."""

from __future__ import annotations

import json
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import RunCLI, cli_env

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")

SPEC = """\
version: 1
name: demo
steps:
  - name: prep
    run: echo made-by-prep > made.txt
  - name: test
    secrets: [{name: TOKEN, env: TOKEN}]
    run: echo broken > state.txt; exit 3
"""

TOKEN = "tok-4f9c2a7e1b"


@dataclass
class Failed:
    """A failed build that kept its workspace."""

    proj: Path
    state_dir: Path
    build_id: str
    kept: Path


def _build(bc: RunCLI, proj: Path, spec: str = SPEC, *args: str) -> tuple[str, dict[str, Any]]:
    proj.mkdir(exist_ok=True)
    (proj / "buildcell.yaml").write_text(spec)
    (proj / "src.txt").write_text("source\n")
    r = bc("build", "--json", *args, cwd=proj, env={"TOKEN": TOKEN})
    data = json.loads(r.stdout)
    return r.stderr, data


@pytest.fixture
def failed(bc: RunCLI, tmp_path: Path, state_root: Path) -> Failed:
    _, data = _build(bc, tmp_path / "proj", SPEC, "--keep-failed", "--secret", "TOKEN")
    assert data["status"] == "failed" and data["exit_code"] == 3
    kept = Path(data["kept_workspace"]["path"])
    return Failed(tmp_path / "proj", state_root / "state", data["id"], kept)


class Tmux:
    """One tmux server of our own (its own socket), one window 120x40."""

    def __init__(self, tmp: Path) -> None:
        self.socket = str(tmp / "tmux.sock")
        self.session = "bc"
        self.done = 0

    def tmux(self, *args: str) -> str:
        r = subprocess.run(
            ["tmux", "-S", self.socket, *args],
            capture_output=True,
            text=True,
            check=True,
            timeout=20,
        )
        return r.stdout

    def start(self, command: list[str], *, env: dict[str, str], cwd: Path) -> None:
        # What runs in the window; when it ends the window stays, saying how it ended.
        line = (
            f"cd {shlex.quote(str(cwd))} && env -i {shlex.join(f'{k}={v}' for k, v in env.items())}"
            f" {shlex.join(command)}; echo EXITED=$?; exec sleep 600"
        )
        self.tmux("new-session", "-d", "-s", self.session, "-x", "120", "-y", "40", line)

    def send(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", self.session, *keys)

    def type(self, line: str) -> None:
        self.send("-l", line)
        self.send("Enter")

    def run(self, line: str, timeout: float = 20.0) -> str:
        """Type ``line`` and wait until it is done; the screen from the line on (the marker
        printed after it appears only as output, never as typed text)."""
        self.done += 1
        typed = f"{line}; printf '%s-%s\\n' DONE {self.done}"
        self.type(typed)
        marker = f"DONE-{self.done}\n"
        screen = self.wait_for(marker, timeout)
        # From the end of what was typed (a line of several lines is echoed with the
        # shell's continuation prompts, so only its tail is found as typed).
        tail = f"' DONE {self.done}"
        if tail not in screen:
            raise AssertionError(f"{tail!r} not on the screen:\n{screen}")
        return screen[screen.rindex(tail) + len(tail) : screen.rindex(marker)]

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-J", "-S", "-200", "-t", self.session)

    def wait_for(self, text: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if text in screen:
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not on the screen:\n{screen}")
            time.sleep(0.1)

    def pane_pid(self) -> int:
        return int(self.tmux("display-message", "-p", "-t", self.session, "#{pane_pid}"))

    def close(self) -> None:
        subprocess.run(["tmux", "-S", self.socket, "kill-server"], capture_output=True, check=False)


@pytest.fixture
def term(tmp_path: Path) -> Iterator[Tmux]:
    t = Tmux(tmp_path)
    yield t
    t.close()


def _shell(term: Tmux, failed: Failed, *args: str, env: dict[str, str] | None = None) -> None:
    command = [sys.executable, "-m", "buildcell", "shell", failed.build_id, *args]
    term.start(command, env={**cli_env(failed.state_dir), **(env or {})}, cwd=failed.proj)
    term.wait_for("[test] $ ")


def _descendants(pid: int) -> list[tuple[int, str]]:
    """Every process below ``pid``, with its command line."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            try:
                cmd = (Path("/proc") / str(child) / "cmdline").read_bytes()
            except OSError:
                continue
            found.append((child, cmd.replace(b"\0", b" ").decode(errors="replace")))
            todo.append(child)
    return found


# -- --keep-failed ---------------------------------------------------------------------------


def test_keep_failed_says_where_and_the_record_names_it(
    bc: RunCLI, tmp_path: Path, state_root: Path
) -> None:
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "buildcell.yaml").write_text(SPEC)
    r = bc("build", "--keep-failed", "--secret", "TOKEN", cwd=proj, env={"TOKEN": TOKEN})
    assert r.returncode == 3, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("kept the workspace"))
    ls = json.loads(bc("ls", "--json", cwd=proj).stdout)
    build_id = ls[0]["id"]
    kept = ls[0]["kept_workspace"]
    assert kept["step"] == "test" and kept["removed"] is None
    assert kept["expires"] - kept["kept"] == pytest.approx(7 * 24 * 3600, abs=5)
    where = Path(kept["path"])
    assert where == state_root / "state" / "kept" / build_id / "workspace"
    assert f"step test in {where}" in line and f"buildcell shell {build_id}" in line
    # As the failing step left it: the earlier step's file and the failing step's own.
    assert (where / "made.txt").read_text() == "made-by-prep\n"
    assert (where / "state.txt").read_text() == "broken\n"
    assert not list((state_root / "state" / "cells").iterdir())
    # Private: the state directory's kept/ is the supervisor's alone.
    assert (state_root / "state" / "kept").stat().st_mode & 0o777 == 0o700
    events = [
        json.loads(x)
        for x in (state_root / "state" / "builds" / build_id / "events.jsonl")
        .read_text()
        .splitlines()
    ]
    assert any(e["event"] == "workspace.kept" and e["step"] == "test" for e in events)


def test_without_keep_failed_or_on_success_nothing_is_kept(
    bc: RunCLI, tmp_path: Path, state_root: Path
) -> None:
    _, data = _build(bc, tmp_path / "a", SPEC, "--secret", "TOKEN")
    assert data["status"] == "failed" and data["kept_workspace"] is None
    ok = SPEC.replace("exit 3", "true")
    stderr, data = _build(bc, tmp_path / "b", ok, "--keep-failed", "--secret", "TOKEN")
    assert data["status"] == "succeeded" and data["kept_workspace"] is None, stderr
    kept = state_root / "state" / "kept"
    assert not kept.exists() or not list(kept.iterdir())


def test_keep_failed_keeps_a_build_whose_outputs_matched_nothing(
    bc: RunCLI, tmp_path: Path
) -> None:
    spec = (
        "version: 1\nname: o\noutputs: [dist/*.whl]\nsteps:\n  - name: only\n    run: echo x > y\n"
    )
    _, data = _build(bc, tmp_path / "p", spec, "--keep-failed")
    assert data["status"] == "failed"
    assert data["kept_workspace"]["step"] == "only"
    assert (Path(data["kept_workspace"]["path"]) / "y").read_text() == "x\n"


def test_shell_of_a_build_that_kept_nothing_is_125_with_a_hint(bc: RunCLI, tmp_path: Path) -> None:
    _, data = _build(bc, tmp_path / "p", SPEC, "--secret", "TOKEN")
    r = bc("shell", data["id"], cwd=tmp_path / "p")
    assert r.returncode == 125
    first = r.stderr.splitlines()[0]
    assert first.startswith("buildcell: error: build ") and "kept no workspace" in first
    assert "--keep-failed" in first


def test_shell_discard_removes_it_and_then_says_so(bc: RunCLI, failed: Failed) -> None:
    r = bc("shell", failed.build_id, "--discard", cwd=failed.proj)
    assert r.returncode == 0, r.stderr
    assert not failed.kept.exists()
    record = json.loads(bc("show", failed.build_id, "--json", cwd=failed.proj).stdout)
    assert record["kept_workspace"]["removed"] is not None
    r = bc("shell", failed.build_id, cwd=failed.proj)
    assert r.returncode == 125 and "was removed on" in r.stderr


def test_gc_removes_a_kept_workspace_when_asked_and_with_its_record(
    bc: RunCLI, failed: Failed
) -> None:
    r = bc("gc", "--json", cwd=failed.proj)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["kept_removed"] == [] and failed.kept.exists()  # not due
    time.sleep(1.1)
    r = bc("gc", "--json", "--kept-max-age", "1s", cwd=failed.proj)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["kept_removed"] == [failed.build_id]
    assert not failed.kept.exists()
    assert bc("shell", failed.build_id, cwd=failed.proj).returncode == 125
    # A record removed by gc takes its kept workspace along.
    _, data = _build(bc, failed.proj.parent / "again", SPEC, "--keep-failed", "--secret", "TOKEN")
    kept = Path(data["kept_workspace"]["path"])
    r = bc("gc", "--json", "--records-keep", "0", cwd=failed.proj)
    assert r.returncode == 0, r.stderr
    assert data["id"] in json.loads(r.stdout)["kept_removed"] and not kept.exists()
    r = bc("gc", "--kept-max-age", "soon", cwd=failed.proj)
    assert r.returncode == 125 and len(r.stderr.splitlines()) <= 2, r.stderr


def test_show_says_where_the_workspace_is_kept_and_then_that_it_went(
    bc: RunCLI, failed: Failed
) -> None:
    shown = bc("show", failed.build_id, cwd=failed.proj)
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.split())  # as wrapped to the terminal's width
    assert f"kept workspace of step test: {failed.kept}" in text, text
    assert bc("shell", failed.build_id, "--discard", cwd=failed.proj).returncode == 0
    shown = bc("show", failed.build_id, cwd=failed.proj)
    assert "kept workspace of step test: removed" in " ".join(shown.stdout.split())


def test_shell_needs_a_terminal(bc: RunCLI, failed: Failed) -> None:
    r = bc("shell", failed.build_id, cwd=failed.proj)
    assert r.returncode == 125 and "needs a terminal" in r.stderr


# -- the shell, in a terminal ------------------------------------------------------------------


def test_shell_is_the_failed_steps_cell_on_a_real_terminal(term: Tmux, failed: Failed) -> None:
    _shell(term, failed)
    screen = term.run("ls; cat state.txt; echo pid=$$; tty; id -u; echo cwd=$PWD")
    assert "cwd=/workspace" in screen
    assert "made.txt" in screen and "src.txt" in screen and "state.txt" in screen
    assert "broken" in screen
    assert "pid=1" in screen  # its own pid namespace
    assert "not a tty" not in screen and "/dev/console" in screen
    assert "\n1000\n" in screen
    assert "40 120" in term.run("stty size")


def test_ctrl_c_interrupts_the_command_not_the_shell(term: Tmux, failed: Failed) -> None:
    _shell(term, failed)
    term.type("sleep 100")
    time.sleep(0.5)
    started = time.monotonic()
    term.send("C-c")
    assert "after=130" in term.run("echo after=$?", timeout=10)
    assert time.monotonic() - started < 10
    assert "still-here" in term.run("echo still-here")
    assert "EXITED=" not in term.screen()


def test_window_size_follows(term: Tmux, failed: Failed) -> None:
    _shell(term, failed)
    assert "40 120" in term.run("stty size")
    term.tmux("resize-window", "-t", term.session, "-x", "100", "-y", "30")
    time.sleep(0.3)
    assert "30 100" in term.run("stty size")


def test_exit_ends_it_with_its_status_and_leaves_nothing(term: Tmux, failed: Failed) -> None:
    before = {p.name: p.read_bytes() for p in failed.kept.iterdir()}
    _shell(term, failed)
    pane = term.pane_pid()
    assert any("bwrap" in cmd for _, cmd in _descendants(pane))
    term.type("sleep 1000 & touch new.txt; rm made.txt; echo changed > state.txt; exit 4")
    term.wait_for("EXITED=4")
    left = [cmd for _, cmd in _descendants(pane) if "sleep 600" not in cmd]
    assert left == []
    # The shell worked on a copy: the kept workspace is as the build left it.
    assert {p.name: p.read_bytes() for p in failed.kept.iterdir()} == before
    assert not list((failed.state_dir / "cells").iterdir())
    # The terminal has its modes back: a line typed now is echoed and read as a line.
    term.type("typed-after")
    term.wait_for("typed-after")


def test_a_second_shell_starts_from_the_kept_workspace_again(term: Tmux, failed: Failed) -> None:
    _shell(term, failed)
    term.type("rm made.txt; exit 0")
    term.wait_for("EXITED=0")
    term.close()
    term2 = Tmux(failed.proj.parent / "t2")
    (failed.proj.parent / "t2").mkdir()
    try:
        _shell(term2, failed)
        assert "made-by-prep" in term2.run("cat made.txt")
    finally:
        term2.close()


def test_secret_only_when_bound_again(term: Tmux, failed: Failed, tmp_path: Path) -> None:
    _shell(term, failed)
    screen = term.run('ls /run/secrets 2>&1; echo "token=[$TOKEN]"')
    assert "token=[]" in screen
    assert TOKEN not in screen
    term.type("exit")
    term.wait_for("EXITED=0")
    term.close()
    again = Tmux(tmp_path / "again")
    (tmp_path / "again").mkdir()
    try:
        _shell(again, failed, "--secret", "TOKEN", env={"TOKEN": TOKEN})
        check = 'test "$TOKEN" = "$(cat /run/secrets/TOKEN)" && [ ${#TOKEN} = 14 ] && echo HAVE-IT'
        assert "HAVE-IT" in again.run(check)
        again.run("echo $TOKEN")
        # Present, and still redacted from what the cell prints.
        assert TOKEN not in again.screen().replace(" ", "")
    finally:
        again.close()


def test_shell_has_no_network_beyond_the_steps(term: Tmux, failed: Failed) -> None:
    """The step had no network: neither has the shell, not even the host's loopback."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    try:
        _shell(term, failed)
        screen = term.run("tail -n +3 /proc/net/dev | cut -d: -f1; echo proxy=[$HTTPS_PROXY]")
        assert screen.split() == ["lo", "proxy=[]"]
        probe = (
            "import socket\n"
            f"for a in [('127.0.0.1', {port}), ('192.0.2.1', 80), ('10.0.0.1', 80)]:\n"
            "    try: socket.create_connection(a, timeout=2); print('REACHED', a)\n"
            "    except OSError as e: print('refused', e.errno)\n"
        )
        screen = term.run(f"python3 -c {shlex.quote(probe)}", timeout=30)
        assert "REACHED" not in screen
        assert screen.count("refused") >= 3
        listener.settimeout(0.1)
        with pytest.raises(TimeoutError):
            listener.accept()
    finally:
        listener.close()


def test_shell_gets_the_steps_allowlist(
    bc: RunCLI, term: Tmux, tmp_path: Path, state_root: Path
) -> None:
    spec = (
        "version: 1\nname: n\nsteps:\n  - name: test\n    network: {allow: [pkgs.example.org]}\n"
        "    run: exit 9\n"
    )
    _, data = _build(bc, tmp_path / "p", spec, "--keep-failed")
    failed = Failed(
        tmp_path / "p", state_root / "state", data["id"], Path(data["kept_workspace"]["path"])
    )
    _shell(term, failed)
    assert "proxy=[http://127.0.0.1:3128]" in term.run("echo proxy=[$HTTPS_PROXY]")
    probe = (
        "import urllib.request as u\n"
        "o = u.build_opener(u.ProxyHandler({'http': 'http://127.0.0.1:3128'}))\n"
        "try: o.open('http://other.example.org/', timeout=10); print('FETCHED')\n"
        "except Exception as e: print('denied', getattr(e, 'code', e))\n"
    )
    screen = term.run(f"python3 -c {shlex.quote(probe)}", timeout=30)
    assert "FETCHED" not in screen and "denied" in screen


def test_unknown_step_is_125(bc: RunCLI, failed: Failed, term: Tmux) -> None:
    command = [sys.executable, "-m", "buildcell", "shell", failed.build_id, "--step", "nope"]
    term.start(command, env=cli_env(failed.state_dir), cwd=failed.proj)
    screen = term.wait_for("EXITED=")
    assert "EXITED=125" in screen and "has no step 'nope'" in screen
    assert "its steps are: prep, test" in screen


def test_step_option_opens_that_steps_cell(failed: Failed, term: Tmux) -> None:
    command = [sys.executable, "-m", "buildcell", "shell", failed.build_id, "--step", "prep"]
    term.start(command, env=cli_env(failed.state_dir), cwd=failed.proj)
    term.wait_for("[prep] $ ")
    assert "broken" in term.run(
        "cat state.txt"
    )  # the workspace is the kept one whichever step's cell it is


def test_with_a_disk_budget_the_shell_gets_it_too(
    bc: RunCLI, term: Tmux, tmp_path: Path, state_root: Path
) -> None:
    spec = SPEC.replace("name: demo\n", "name: demo\nlimits: {disk: 32M}\n")
    _, data = _build(bc, tmp_path / "p", spec, "--keep-failed", "--secret", "TOKEN")
    kept = Path(data["kept_workspace"]["path"])
    assert (kept / "state.txt").read_text() == "broken\n"  # copied off the budget's tmpfs
    failed = Failed(tmp_path / "p", state_root / "state", data["id"], kept)
    _shell(term, failed)
    assert "broken" in term.run("cat state.txt")
    screen = term.run("head -c 40000000 /dev/zero 2>&1 >big; echo rc=$?")
    assert "rc=0" not in screen and "No space left" in screen


# -- what a hostile build tries through its kept workspace -------------------------------------


def test_a_sparse_file_is_kept_and_copied_at_what_it_stores(
    bc: RunCLI, term: Tmux, tmp_path: Path, state_root: Path
) -> None:
    """Written out, a ``truncate -s 1T`` file would fill the host disk when kept (a disk
    budget's workspace is copied out of its tmpfs) or copied for a shell."""
    spec = (
        "version: 1\nname: n\nlimits: {disk: 64MiB}\nsteps:\n  - name: test\n"
        "    run: truncate -s 4G sparse.bin; echo tail >> sparse.bin; exit 3\n"
    )
    _, data = _build(bc, tmp_path / "p", spec, "--keep-failed")
    kept = Path(data["kept_workspace"]["path"])
    st = (kept / "sparse.bin").stat()
    assert st.st_size == (4 << 30) + 5 and st.st_blocks * 512 < 1 << 20
    failed = Failed(tmp_path / "p", state_root / "state", data["id"], kept)
    _shell(term, failed)
    assert "blocks=[" in term.run("echo blocks=[$(stat -c %b sparse.bin)]")
    blocks = int(term.run("stat -c %b sparse.bin").split()[0])
    assert blocks * 512 < 1 << 20
    assert "tail" in term.run("tail -c 5 sparse.bin")


def test_the_build_cannot_script_or_disguise_the_shell(
    bc: RunCLI, term: Tmux, tmp_path: Path, state_root: Path
) -> None:
    """The spec's environment names a start-up file the build wrote (``ENV``), a prompt
    like the host's and a command for each prompt; the start-up file sets the window
    title, writes the clipboard (OSC 52) and switches to the alternate screen. None of it
    runs or reaches the operator's terminal, and buildcell says where the shell starts
    and ends."""
    spec = (
        "version: 1\nname: n\nenv: {ENV: /workspace/.rc, PS1: 'root@host:~# ', "
        "PROMPT_COMMAND: 'touch /workspace/prompted', BASH_ENV: /workspace/.rc}\n"
        "steps:\n  - name: test\n"
        "    run: |\n"
        "      printf 'touch /workspace/sourced; printf \"\\\\033]0;PWNED\\\\007\"\\n' > .rc\n"
        "      exit 3\n"
    )
    _, data = _build(bc, tmp_path / "p", spec, "--keep-failed")
    failed = Failed(
        tmp_path / "p", state_root / "state", data["id"], Path(data["kept_workspace"]["path"])
    )
    _shell(term, failed)  # waits for buildcell's own prompt, `[test] $ `
    screen = term.screen()
    assert f"a shell in the cell of step 'test' of build {failed.build_id}" in screen
    assert "root@host" not in screen
    assert "sourced=[no]" in term.run("test -e sourced && echo sourced=[yes] || echo sourced=[no]")
    assert "prompted=[no]" in term.run(
        "test -e prompted && echo prompted=[yes] || echo prompted=[no]"
    )
    # What the cell prints: colours pass, the title and the clipboard do not.
    term.type("printf '\\033]0;PWNED\\007\\033]52;c;cm0K\\007T=[%s]\\n' ok")
    term.wait_for("T=[ok]")
    title = term.tmux("display-message", "-p", "-t", term.session, "#{pane_title}")
    assert "PWNED" not in title
    term.type("exit")
    screen = term.wait_for("EXITED=")
    assert f"left the shell of build {failed.build_id} (exit 0): back on the host" in screen
