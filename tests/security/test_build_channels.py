"""Every channel between builds, attacked (SLSA Build L3: "builds cannot influence one another").

Each test plays an untrusted pull request that tries to reach the *next* build, or one
running at the same time, of its own or another project, through something builds share:
the input store, the image and filter caches, output directories, records and logs, what a
cell's host uid leaves behind, ``/dev/shm``, SysV and POSIX IPC, abstract and path sockets,
leftover processes, the egress proxy, per-user kernel quotas, file-access notifications and
the environment. Everything goes through the real CLI and sandbox, as root and (where the
channel differs) as an unprivileged user through ``bc_rootless``.

Concurrent attacks are synchronised on conditions, never on sleeps: the victim cell writes
``/workspace/<token>.ready``, the test finds it below the state directory's ``cells/``,
runs the attacker, then writes ``<token>.go`` next to it to let the victim finish. A victim
that is never released exits 99, so no test passes because the machine was slow.

An attack that succeeds today is ``xfail(strict=True)`` with the reason; the finding's
details are in its docstring.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import IS_ROOT, UNPRIVILEGED, cli_env, read_events
from tests.netservers import http_origin

# The reserved host uid range cells run in as root (BUILDCELL_UID_BASE/COUNT defaults).
UID_BASE = int(os.environ.get("BUILDCELL_UID_BASE", 0x70000000))
UID_COUNT = int(os.environ.get("BUILDCELL_UID_COUNT", 65536))
DEADLINE = 60.0

CLI = subprocess.CompletedProcess[str]


def reserved(uid: int) -> bool:
    return UID_BASE <= uid < UID_BASE + UID_COUNT


# --------------------------------------------------------------------------------------------
# How the CLI is run: as root (cells get reserved host uids) or rootless (as uid 65534).
# --------------------------------------------------------------------------------------------


@dataclass
class Mode:
    """One way of running the CLI, with its state directory and a place for projects."""

    name: str
    cli: Callable[..., CLI]
    state: Path
    base: Path
    owner: int | None = None
    _n: int = 0

    def project(self, name: str, spec: str, **files: str | bytes) -> Path:
        """A checkout with ``buildcell.yaml`` and ``files``, owned by the CLI's user."""
        self._n += 1
        path = self.base / f"{name}-{self._n}"
        path.mkdir(parents=True)
        (path / "buildcell.yaml").write_text(spec)
        for rel, content in files.items():
            target = path / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content)
        if self.owner is not None:
            for p in [path, *path.rglob("*")]:
                os.lchown(p, self.owner, self.owner)
        return path

    def build(self, proj: Path, *args: str, project: str | None = None) -> CLI:
        name = project or proj.name.rsplit("-", 1)[0]
        res = self.cli("build", "--project", name, "--json", *args, cwd=proj)
        return res

    def events(self, res: CLI) -> list[dict[str, Any]]:
        build_id = json.loads(res.stdout)["id"]
        return read_events(self.state / "builds" / build_id / "events.jsonl")

    def host_uids(self, res: CLI) -> set[int]:
        return {e["host_uid"] for e in self.events(res) if e["event"] == "cell.start"}


@pytest.fixture
def root_mode(bc, state_root: Path) -> Mode:  # type: ignore[no-untyped-def]
    if not IS_ROOT:
        pytest.skip("needs buildcell to run as root")
    base = state_root / "projects"
    base.mkdir()
    return Mode("root", bc, state_root / "state", base)


@pytest.fixture
def rootless_mode(bc_rootless) -> Mode:  # type: ignore[no-untyped-def]
    home: Path = bc_rootless.home
    base = home / "projects"
    base.mkdir()
    owner = UNPRIVILEGED if IS_ROOT else None
    if owner is not None:
        os.chown(base, owner, owner)
    return Mode("rootless", bc_rootless, home / "state", base, owner)


@pytest.fixture(params=["root", "rootless"])
def mode(request: pytest.FixtureRequest) -> Mode:
    return request.getfixturevalue(f"{request.param}_mode")  # type: ignore[no-any-return]


class Background:
    """A CLI call running in a thread, for builds that must overlap."""

    def __init__(self, call: Callable[[], CLI]) -> None:
        self.res: CLI | None = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.res = call()
            except BaseException as e:  # noqa: BLE001 - reported by result()
                self.error = e

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def result(self, timeout: float = 120) -> CLI:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the background build did not finish"
        if self.error is not None:
            raise self.error
        assert self.res is not None
        return self.res


def wait_until(what: str, check: Callable[[], Any], *, alive: Background | None = None) -> Any:
    """Poll ``check`` until it returns something truthy; fail at the deadline, or at once if
    the background build it waits for has ended."""
    end = time.monotonic() + DEADLINE
    while True:
        found = check()
        if found:
            return found
        if alive is not None and not alive.running:
            res = alive.result()
            raise AssertionError(f"ended before {what}: {res.returncode}\n{res.stderr}")
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.01)


def ready(mode: Mode, token: str, alive: Background) -> Path:
    """The workspace of the cell that announced ``token`` (as the host reaches it)."""
    marker: Path = wait_until(
        f"{token}.ready",
        lambda: next(iter(mode.state.glob(f"cells/*/workspace/{token}.ready")), None),
        alive=alive,
    )
    return marker.parent


def release(workspace: Path, token: str) -> None:
    go = workspace / f"{token}.go"
    go.write_text("go")


# In-cell helpers every probe starts with (copied into the probe's file).
PRELUDE = r'''
import ctypes, errno, json, os, socket, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
report = {}

def err(call):
    """'ok' or the errno name of a call that raises OSError or returns -1."""
    try:
        ctypes.set_errno(0)
        r = call()
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    if isinstance(r, int) and r < 0:
        return errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno()))
    return "ok"

def announce(token):
    open(f"/workspace/{token}.ready", "w").close()

def wait_go(token):
    end = time.monotonic() + 60
    while not os.path.exists(f"/workspace/{token}.go"):
        if time.monotonic() > end:
            sys.exit(99)  # never released: the test failed, not the attack
        time.sleep(0.01)

def done(name="report.json"):
    with open(f"/workspace/{name}", "w") as f:
        json.dump(report, f)
'''


def probe(body: str) -> str:
    return PRELUDE + textwrap.dedent(body)


def spec(name: str, run: str, *, extra: str = "", outputs: tuple[str, ...] = ("report.json",),
         step_extra: str = "") -> str:  # fmt: skip
    out = f"outputs: {json.dumps(list(outputs))}\n" if outputs else ""
    return (
        f"version: 1\nname: {name}\n{extra}steps:\n  - name: s\n"
        f"    run: {json.dumps(run)}\n{step_extra}{out}"
    )


def report_of(proj: Path, res: CLI, name: str = "report.json") -> dict[str, Any]:
    assert res.returncode == 0, res.stderr
    return dict(json.loads((proj / "buildcell-out" / name).read_text()))


# --------------------------------------------------------------------------------------------
# A concurrent cell: /dev/shm, SysV and POSIX IPC, abstract and path sockets, signals.
# --------------------------------------------------------------------------------------------

IPC_PRELUDE = r'''
rt = ctypes.CDLL("librt.so.1", use_errno=True)
rt.mq_open.restype = ctypes.c_int
IPC_CREAT = 0o1000
'''

VICTIM = probe(IPC_PRELUDE + r'''
T, KEY, PORT = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
listeners, made = [], {}

def listen(label, family, kind, addr):
    try:
        s = socket.socket(family, kind)
        if family != socket.AF_UNIX:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind(addr)
        if kind == socket.SOCK_STREAM:
            s.listen(16)
        s.setblocking(False)
        listeners.append((label, s))
        made[label] = "ok"
    except OSError as e:
        made[label] = errno.errorcode[e.errno]

listen("abstract", socket.AF_UNIX, socket.SOCK_STREAM, "\0" + T)
listen("abstract-dgram", socket.AF_UNIX, socket.SOCK_DGRAM, "\0" + T + "-dgram")
for d in ("/tmp", "/dev/shm", "/home/builder", "/workspace", "/var/tmp"):
    listen("path:" + d, socket.AF_UNIX, socket.SOCK_STREAM, f"{d}/{T}{d.replace('/', '-')}.sock")
listen("tcp4", socket.AF_INET, socket.SOCK_STREAM, ("0.0.0.0", PORT))
listen("tcp6", socket.AF_INET6, socket.SOCK_STREAM, ("::", PORT))
listen("udp4", socket.AF_INET, socket.SOCK_DGRAM, ("0.0.0.0", PORT))
made["shm"] = err(lambda: libc.shmget(KEY, 4096, IPC_CREAT | 0o666))
made["msg"] = err(lambda: libc.msgget(KEY, IPC_CREAT | 0o666))
made["sem"] = err(lambda: libc.semget(KEY, 1, IPC_CREAT | 0o666))
made["mq"] = err(lambda: rt.mq_open(f"/{T}".encode(), os.O_CREAT | os.O_RDWR, 0o666, None))
for d in ("/dev/shm", "/tmp", "/home/builder", "/var/tmp"):
    with open(f"{d}/{T}{d.replace('/', '-')}.file", "w") as f:
        f.write("victim")
announce(T)
wait_go(T)
contacted = []
for label, s in listeners:
    try:
        if s.type == socket.SOCK_STREAM:
            s.accept()
        else:
            s.recv(64)
        contacted.append(label)
    except BlockingIOError:
        pass
report.update(made=made, contacted=contacted, pid=os.getpid())
done()
''')

ATTACKER = probe(IPC_PRELUDE + r'''
import signal
T, KEY, PORT = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

def connect(family, kind, addr):
    s = socket.socket(family, kind)
    s.settimeout(5)
    try:
        if kind == socket.SOCK_DGRAM:
            s.sendto(b"attacker", addr)
        else:
            s.connect(addr)
            s.sendall(b"attacker")
    finally:
        s.close()

tries = {
    "abstract": lambda: connect(socket.AF_UNIX, socket.SOCK_STREAM, "\0" + T),
    "abstract-dgram": lambda: connect(socket.AF_UNIX, socket.SOCK_DGRAM, "\0" + T + "-dgram"),
    "tcp4": lambda: connect(socket.AF_INET, socket.SOCK_STREAM, ("127.0.0.1", PORT)),
    "tcp6": lambda: connect(socket.AF_INET6, socket.SOCK_STREAM, ("::1", PORT)),
    "shm": lambda: libc.shmget(KEY, 0, 0),
    "msg": lambda: libc.msgget(KEY, 0),
    "sem": lambda: libc.semget(KEY, 0, 0),
    "mq": lambda: rt.mq_open(f"/{T}".encode(), os.O_RDWR, 0, None),
}
for d in ("/tmp", "/dev/shm", "/home/builder", "/workspace", "/var/tmp"):
    name = T + d.replace("/", "-")
    tries["path:" + d] = lambda d=d, n=name: connect(socket.AF_UNIX, socket.SOCK_STREAM, f"{d}/{n}.sock")
    tries["file:" + d] = lambda d=d, n=name: os.stat(f"{d}/{n}.file")
for label, call in tries.items():
    report[label] = err(call)
# UDP says nothing to the sender: the victim reports whether it arrived.
connect(socket.AF_INET, socket.SOCK_DGRAM, ("127.0.0.1", PORT))
report["dev_shm"] = sorted(os.listdir("/dev/shm"))
# Every process this cell can name, and a SIGKILL to all of them at once.
mine = {int(p) for p in os.listdir("/proc") if p.isdigit()}
others = []
for pid in range(1, 1 << 16):
    if pid not in mine and err(lambda: os.kill(pid, 0)) != "ESRCH":
        others.append(pid)
report["signalable_others"] = others
report["kill_all"] = err(lambda: os.kill(-1, signal.SIGKILL))
done()
''')


def test_a_concurrent_cell_shares_no_ipc_shm_or_socket(mode: Mode) -> None:
    """B listens on an abstract, five path, TCP and UDP sockets, creates SysV shm, message
    queue and semaphore sets and a POSIX mqueue, and leaves files in /dev/shm, /tmp, home
    and /var/tmp; A (another project, running meanwhile) looks for and connects to each,
    and SIGKILLs every process it can signal. Nothing reaches B and B lives on."""
    token = "bc" + secrets.token_hex(6)
    key = 0x5EC00000 + secrets.randbelow(1 << 16)
    port = 20000 + secrets.randbelow(20000)
    args = f"{token} {key} {port}"
    victim = mode.project("victim", spec("victim", f"exec python3 victim.py {args}"),
                          **{"victim.py": VICTIM})  # fmt: skip
    attacker = mode.project("attacker", spec("attacker", f"exec python3 attacker.py {args}"),
                            **{"attacker.py": ATTACKER})  # fmt: skip
    bg = Background(lambda: mode.build(victim, "--trust", "untrusted"))
    workspace = ready(mode, token, bg)
    res_a = mode.build(attacker, "--trust", "untrusted", "--ref", "refs/pull/1/merge")
    release(workspace, token)
    res_b = bg.result()
    seen = report_of(attacker, res_a)
    got = report_of(victim, res_b)
    assert {k: v for k, v in got["made"].items() if v != "ok"} == {}  # the victim had all
    assert got["contacted"] == [], "the attacker reached the victim's sockets"
    refused = {"ECONNREFUSED", "ENOENT"}
    for label in ("abstract", "abstract-dgram", "tcp4", "tcp6", "shm", "msg", "sem", "mq"):
        assert seen[label] in refused, (label, seen[label])
    for d in ("/tmp", "/dev/shm", "/home/builder", "/workspace", "/var/tmp"):
        assert seen["path:" + d] == "ENOENT", d
        assert seen["file:" + d] == "ENOENT", d
    assert seen["dev_shm"] == []
    assert seen["signalable_others"] == []
    # kill(-1) finds nothing to signal but itself (ESRCH), or only its own cell.
    assert seen["kill_all"] in ("ok", "ESRCH")
    if mode.name == "root":
        # One uid slot per running cell: the two cells were never the same host user.
        assert mode.host_uids(res_a).isdisjoint(mode.host_uids(res_b))
