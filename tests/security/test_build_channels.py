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

import hashlib
import json
import os
import secrets
import socket
import struct
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
from tests.conftest import IS_ROOT, UNPRIVILEGED, RootlessCLI, RunCLI, cli_env, read_events
from tests.netservers import http_origin
from tests.oci_images import TarEntry, make_host_tools_layout

# As root, these tests give their cells a private range of host uids (BUILDCELL_UID_BASE
# and BUILDCELL_UID_COUNT, the operator's settings): above the default range, so that no
# cell of another state directory on this host, a test suite running beside this one
# among them, ever shares a uid with them, or its per-uid kernel quotas.
UID_COUNT = 64
UID_BASE = 0x70000000 + 0x10000 + UID_COUNT * secrets.randbelow(1 << 16)
UID_ENV = {"BUILDCELL_UID_BASE": str(UID_BASE), "BUILDCELL_UID_COUNT": str(UID_COUNT)}
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
    _cli: Callable[..., CLI]
    state: Path
    base: Path
    owner: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    _n: int = 0

    def cli(self, *args: str, cwd: Path, env: dict[str, str] | None = None) -> CLI:
        """The CLI with ``args``, in ``cwd``, with ``env`` added to its environment."""
        extra = {**self.env, **(env or {})}
        if extra:
            return self._cli(*args, cwd=cwd, env=extra)
        return self._cli(*args, cwd=cwd)

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
        self.own(path)
        return path

    def own(self, path: Path) -> None:
        """Give ``path`` and everything below it to the CLI's user."""
        if self.owner is not None:
            for p in [path, *path.rglob("*")]:
                os.lchown(p, self.owner, self.owner)

    def build(self, proj: Path, *args: str, project: str | None = None) -> CLI:
        name = project or proj.name.rsplit("-", 1)[0]
        return self.cli("build", "--project", name, "--json", *args, cwd=proj)

    def events(self, res: CLI) -> list[dict[str, Any]]:
        build_id = json.loads(res.stdout)["id"]
        return read_events(self.state / "builds" / build_id / "events.jsonl")

    def host_uids(self, res: CLI) -> set[int]:
        return {e["host_uid"] for e in self.events(res) if e["event"] == "cell.start"}


@pytest.fixture
def root_mode(bc: RunCLI, state_root: Path) -> Mode:
    if not IS_ROOT:
        pytest.skip("needs buildcell to run as root")
    base = state_root / "projects"
    base.mkdir()
    return Mode("root", bc, state_root / "state", base, env=dict(UID_ENV))


@pytest.fixture
def rootless_mode(bc_rootless: RootlessCLI) -> Mode:
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
            except BaseException as e:
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


def spec(
    name: str,
    run: str,
    *,
    extra: str = "",
    outputs: tuple[str | dict[str, object], ...] = ("report.json",),
    step_extra: str = "",
) -> str:
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

IPC_PRELUDE = r"""
rt = ctypes.CDLL("librt.so.1", use_errno=True)
rt.mq_open.restype = ctypes.c_int
IPC_CREAT = 0o1000
"""

VICTIM = probe(
    IPC_PRELUDE
    + r"""
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
for d in ("/dev/shm", "/tmp", "/home/builder", "/workspace", "/var/tmp"):
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
"""
)

ATTACKER = probe(
    IPC_PRELUDE
    + r"""
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
    # Without a policy there is no proxy, resolver or synthetic address of anyone's.
    "proxy": lambda: connect(socket.AF_INET, socket.SOCK_STREAM, ("127.0.0.1", 3128)),
    "dns": lambda: connect(socket.AF_INET, socket.SOCK_STREAM, ("127.0.0.1", 53)),
    "synthetic": lambda: connect(socket.AF_INET, socket.SOCK_STREAM, ("127.77.0.1", PORT)),
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
"""
)


def test_a_concurrent_cell_shares_no_ipc_shm_or_socket(mode: Mode) -> None:
    """B listens on an abstract, five path, TCP and UDP sockets, creates SysV shm, message
    queue and semaphore sets and a POSIX mqueue, and leaves files in /dev/shm, /tmp, home
    and /var/tmp; A (another project, running meanwhile) looks for and connects to each,
    and SIGKILLs every process it can signal. Nothing reaches B and B lives on."""
    token = "bc" + secrets.token_hex(6)
    key = 0x5EC00000 + secrets.randbelow(1 << 16)
    port = 20000 + secrets.randbelow(20000)
    args = f"{token} {key} {port}"
    victim = mode.project(
        "victim", spec("victim", f"exec python3 victim.py {args}"), **{"victim.py": VICTIM}
    )
    attacker = mode.project(
        "attacker",
        spec("attacker", f"exec python3 attacker.py {args}"),
        **{"attacker.py": ATTACKER},
    )
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
    for label in (
        "abstract",
        "abstract-dgram",
        "tcp4",
        "tcp6",
        "proxy",
        "dns",
        "synthetic",
        "shm",
        "msg",
        "sem",
        "mq",
    ):
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


# --------------------------------------------------------------------------------------------
# Kernel quotas kept per host uid: inotify instances, POSIX message queue bytes.
# --------------------------------------------------------------------------------------------

HOG = probe(
    IPC_PRELUDE
    + r"""
T = sys.argv[1]
held = {"inotify": [], "mq": []}
while len(held["inotify"]) < 100000:
    fd = libc.inotify_init1(0)
    if fd < 0:
        break
    held["inotify"].append(fd)
attr = (ctypes.c_long * 8)(0, 10, 8192, 0)  # flags, maxmsg, msgsize, curmsgs
while len(held["mq"]) < 10000:
    name = f"/{T}-{len(held['mq'])}".encode()
    fd = rt.mq_open(name, os.O_CREAT | os.O_RDWR, 0o600, attr)
    if fd < 0:
        break
    held["mq"].append(fd)
report.update({k: len(v) for k, v in held.items()})
announce(T)
wait_go(T)
done()
"""
)

STARVED = probe(
    IPC_PRELUDE
    + r"""
T = sys.argv[1]
report["inotify"] = err(lambda: libc.inotify_init1(0))
attr = (ctypes.c_long * 8)(0, 10, 8192, 0)
report["mq"] = err(lambda: rt.mq_open(f"/{T}-b".encode(), os.O_CREAT | os.O_RDWR, 0o600, attr))
done()
"""
)

ROOTLESS_UID = (
    "rootless, every cell runs as the invoking user: per-uid kernel quotas (inotify "
    "instances, mqueue bytes) are shared by all of them and by the user's own processes"
)


@pytest.mark.parametrize(
    "case",
    [
        "one-state-dir",
        "two-state-dirs",
        pytest.param("rootless", marks=pytest.mark.xfail(strict=True, reason=ROOTLESS_UID)),
    ],
)
def test_a_cell_cannot_use_up_another_cell_s_per_user_quotas(
    request: pytest.FixtureRequest, case: str, state_root: Path
) -> None:
    """A holds every inotify instance and all the POSIX message queue bytes it can get;
    B, running meanwhile, must still get one of each.

    Linux counts these per user, and charges a user namespace's use to its owner's uid at
    every level above it (``ucounts``): every cell running as the same host uid draws from
    one pool (128 inotify instances and 800 KiB of mqueues by default). As root each cell
    has its own uid, also across state directories (two runners, or any two
    ``BUILDCELL_STATE_DIR``: slots are locked host-wide); rootless they do not, and one
    build can break another's file watching or message queues.
    """
    mode: Mode = request.getfixturevalue("rootless_mode" if case == "rootless" else "root_mode")
    token = "bc" + secrets.token_hex(6)
    hog = mode.project("hog", spec("hog", f"exec python3 hog.py {token}"), **{"hog.py": HOG})
    starved = mode.project(
        "starved", spec("starved", f"exec python3 starved.py {token}"), **{"starved.py": STARVED}
    )
    bg = Background(lambda: mode.build(hog, "--trust", "untrusted"))
    workspace = ready(mode, token, bg)
    if case == "two-state-dirs":
        other = state_root / "other-runner"
        res_b = mode.cli(
            "build",
            "--project",
            "starved",
            "--json",
            cwd=starved,
            env={"BUILDCELL_STATE_DIR": str(other)},
        )
    else:
        res_b = mode.build(starved, "--trust", "untrusted")
    release(workspace, token)
    res_a = bg.result()
    held = report_of(hog, res_a)
    assert held["inotify"] > 0 and held["mq"] > 0, held
    if case == "one-state-dir":
        assert mode.host_uids(res_a).isdisjoint(mode.host_uids(res_b))
    assert report_of(starved, res_b) == {"inotify": "ok", "mq": "ok"}


# --------------------------------------------------------------------------------------------
# The egress proxy: one cell reaching another's listeners, synthetic addresses or proxy.
# --------------------------------------------------------------------------------------------

NET_PRELUDE = r'''
def raw(addr, data=b"", timeout=10):
    """Connect, send, read until the peer closes: (errno name or 'ok', bytes read)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(addr)
        s.sendall(data)
        got = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                return "ok", got
            got += chunk
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e)), b""
    finally:
        s.close()

def status(reply):
    return reply.split(b"\r\n", 1)[0].decode(errors="replace")

def get(host, port, path):
    return b"GET %s HTTP/1.1\r\nHost: %s:%d\r\nConnection: close\r\n\r\n" % (
        path.encode(), host.encode(), port)
'''

NET_VICTIM = probe(
    NET_PRELUDE
    + r"""
T, PB, PH, PX = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
synthetic = socket.gethostbyname("b.test")
report["transparent"] = status(raw((synthetic, PB), get("b.test", PB, "/b-transparent"))[1])
report["proxied"] = status(raw(("127.0.0.1", 3128), get("b.test", PB, "http://b.test:%d/b-proxied" % PB))[1])
listeners = []
for port in (PH, PX):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(16)
    s.setblocking(False)
    listeners.append((port, s))
with open(f"/workspace/{T}.addr", "w") as f:
    f.write(synthetic)
announce(T)
wait_go(T)
contacted = []
for port, s in listeners:
    try:
        s.accept()
        contacted.append(port)
    except BlockingIOError:
        pass
report.update(synthetic=synthetic, contacted=contacted)
done()
"""
)

NET_ATTACKER = probe(
    NET_PRELUDE
    + r"""
SB, PB, PA, PH, PX = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
PROXY = ("127.0.0.1", 3128)

def connect_via_proxy(target):
    return status(raw(PROXY, b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\nfrom-a" % (
        target.encode(), target.encode()), timeout=10)[1])

# Before anything is resolved here: B's synthetic address means nothing to this cell.
report["synthetic:PB"] = raw((SB, PB), get("b.test", PB, "/steal-synthetic"))[0]
report["synthetic:PA"] = raw((SB, PA), get("b.test", PB, "/steal-synthetic-pa"))[1].decode()
report["direct:PH"] = raw(("127.0.0.1", PH), b"from-a-direct")[0]
report["direct:PX"] = raw(("127.0.0.1", PX), b"from-a-direct")[0]
# Through this cell's own proxy, by name, by B's synthetic address, by loopback.
report["connect b.test"] = connect_via_proxy(f"b.test:{PB}")
report["get b.test"] = status(raw(PROXY, get("b.test", PB, "http://b.test:%d/steal-get" % PB))[1])
report["connect synthetic"] = connect_via_proxy(f"{SB}:{PB}")
report["connect proxy"] = connect_via_proxy("127.0.0.1:3128")
report["connect PX"] = connect_via_proxy(f"127.0.0.1:{PX}")
# Granted by the operator: the host's 127.0.0.1:PH, never the other cell's.
report["connect PH"] = connect_via_proxy(f"127.0.0.1:{PH}")
report["own"] = status(raw(PROXY, get("a.test", PA, "http://a.test:%d/a-ok" % PA))[1])
done()
"""
)


@dataclass
class HostListener:
    """A TCP listener on the host's loopback that records what each connection sent."""

    sock: socket.socket = field(default_factory=socket.socket)
    received: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                data = b""
                try:
                    while b"from-a" not in data:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                except OSError:
                    pass
                self.received.append(data)


@pytest.fixture
def host_listener() -> Iterator[HostListener]:
    listener = HostListener()
    yield listener
    listener.sock.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_cell_cannot_reach_another_cell_through_egress(
    mode: Mode, host_listener: HostListener
) -> None:
    """B, with a policy, resolves its allowed name to a synthetic address, reaches its
    origin both ways, and listens inside its namespace on a port the operator also granted
    A on the host's loopback, and on one nobody granted. A, with a policy of its own,
    tries B's synthetic address, B's name, B's ports and the proxy port, directly and
    through its proxy. A reaches its own origin and the host's granted port, nothing of B.
    """
    token = "bc" + secrets.token_hex(6)
    ph, px = host_listener.port, _free_port()
    with http_origin("a") as origin_a, http_origin("b") as origin_b:
        pa, pb = origin_a.port, origin_b.port
        b_net = f"    network: {{allow: ['b.test:{pb}', '127.0.0.1:{pb}']}}\n"
        victim = mode.project(
            "victim",
            spec("victim", f"exec python3 victim.py {token} {pb} {ph} {px}", step_extra=b_net),
            **{"victim.py": NET_VICTIM},
        )
        bg = Background(
            lambda: mode.build(
                victim,
                "--trust",
                "untrusted",
                "--add-host",
                "b.test:127.0.0.1",
                "--allow",
                f"127.0.0.1:{pb}",
            )
        )
        workspace = ready(mode, token, bg)
        synthetic = (workspace / f"{token}.addr").read_text()
        assert synthetic.startswith("127.77.")
        a_net = f"    network: {{allow: ['a.test:{pa}', '127.0.0.1:{pa}', '127.0.0.1:{ph}']}}\n"
        args = f"{synthetic} {pb} {pa} {ph} {px}"
        attacker = mode.project(
            "attacker",
            spec("attacker", f"exec python3 attacker.py {args}", step_extra=a_net),
            **{"attacker.py": NET_ATTACKER},
        )
        res_a = mode.build(
            attacker,
            "--trust",
            "untrusted",
            "--ref",
            "refs/pull/2/merge",
            "--add-host",
            "a.test:127.0.0.1",
            "--allow",
            f"127.0.0.1:{pa}",
            "--allow",
            f"127.0.0.1:{ph}",
        )
        release(workspace, token)
        res_b = bg.result()
    got = report_of(victim, res_b)
    seen = report_of(attacker, res_a)
    # B's own paths worked, and nothing arrived at its listeners.
    assert got["transparent"].endswith("200 OK") and got["proxied"].endswith("200 OK"), got
    assert got["contacted"] == []
    # A reached its own origin and, as granted, the host's port: never B's.
    assert seen["own"].endswith("200 OK"), seen
    assert " 200 " in seen["connect PH"] or seen["connect PH"].endswith(" 200"), seen
    assert [d for d in host_listener.received if b"from-a" in d]  # the host's, as granted
    assert seen["synthetic:PB"] == "ECONNREFUSED", seen
    assert seen["synthetic:PA"] == "", seen  # A's own listener, no name behind it: closed
    for label in ("direct:PH", "direct:PX"):
        assert seen[label] in ("ECONNREFUSED", "ok"), seen  # "ok": A's own listener closed
    for label in (
        "connect b.test",
        "get b.test",
        "connect synthetic",
        "connect proxy",
        "connect PX",
    ):
        assert " 403 " in seen[label] or seen[label].endswith(" 403"), (label, seen[label])
    assert origin_b.hits == ["/b-transparent", "/b-proxied"]
    assert origin_a.hits == ["/a-ok"]


# --------------------------------------------------------------------------------------------
# Leftover processes: daemons that try to outlive their step, or their build.
# --------------------------------------------------------------------------------------------

PLANT = probe(r'''
import signal, subprocess
T = sys.argv[1]
MARK = "daemon-" + T
CLONE_NEWPID, CLONE_NEWUSER = 0x20000000, 0x10000000
report["unshare_pid"] = err(lambda: libc.unshare(CLONE_NEWPID))
report["unshare_user_pid"] = err(lambda: libc.unshare(CLONE_NEWUSER | CLONE_NEWPID))
report["unshare_cmd"] = subprocess.run(["unshare", "--pid", "--fork", "true"],
                                       capture_output=True).returncode

def daemon(program, argv):
    """Double fork, new session, every signal it can ignore ignored, no descriptors."""
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
                signal.signal(sig, signal.SIG_IGN)
            fd = os.open("/dev/null", os.O_RDWR)
            for n in (0, 1, 2):
                os.dup2(fd, n)
            os.closerange(3, 1 << 16)
            os.execv(program, argv)
        os._exit(0)
    os.wait()

daemon("/usr/bin/sleep", [MARK, "100000"])  # argv[0] is the mark
daemon("/bin/sh", ["sh", "-c",
       "while :; do date +%s%N >> /workspace/beat; sleep 0.02; done # " + MARK])
subprocess.Popen(["nohup", "sh", "-c", "sleep 100000 # " + MARK], start_new_session=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
done("plant.json")
announce(T + "-planted")  # the test sees the daemons alive now, then lets the step end
wait_go(T + "-planted")
''')

CHECK = probe(r"""
T = sys.argv[1]
beats = open("/workspace/beat").read().split() if os.path.exists("/workspace/beat") else []
announce(T)
wait_go(T)
after = open("/workspace/beat").read().split() if os.path.exists("/workspace/beat") else []
report["beats_while_waiting"] = len(after) - len(beats)
report["visible"] = sorted(
    open(f"/proc/{p}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    for p in os.listdir("/proc") if p.isdigit())
done()
""")


def processes_with(marker: str) -> list[str]:
    """Host processes whose command line holds ``marker``."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if marker.encode() in cmdline:
            found.append(f"{pid}: {cmdline.decode(errors='replace')}")
    return found


def test_a_daemon_does_not_survive_into_the_next_step_or_build(mode: Mode) -> None:
    """Step 1 daemonizes three ways (double fork with setsid and ignored signals, a shell
    loop writing heartbeats into the shared workspace, nohup in a new session) and tries
    to get a pid namespace of its own. While step 2 of the same build runs, and after the
    build, no such process exists on the host, and no heartbeat arrives."""
    token = "bc" + secrets.token_hex(6)
    text = (
        "version: 1\nname: daemons\nsteps:\n"
        f"  - name: plant\n    run: exec python3 plant.py {token}\n"
        f"  - name: check\n    run: exec python3 check.py {token}\n"
        "outputs: [report.json, plant.json]\n"
    )
    proj = mode.project("daemons", text, **{"plant.py": PLANT, "check.py": CHECK})
    bg = Background(lambda: mode.build(proj, "--trust", "untrusted"))
    workspace = ready(mode, token + "-planted", bg)
    # While step 1 lives its daemons do: three of them, seen from the host.
    planted = wait_until("three daemons", lambda: len(processes_with("daemon-" + token)) >= 3)
    release(workspace, token + "-planted")
    workspace = ready(mode, token, bg)
    during = processes_with("daemon-" + token)
    release(workspace, token)
    res = bg.result()
    after = processes_with("daemon-" + token)
    report = report_of(proj, res)
    plant = report_of(proj, res, "plant.json")
    assert planted and during == [] and after == []
    assert report["beats_while_waiting"] == 0
    assert not [p for p in report["visible"] if "daemon-" in p], report["visible"]
    assert plant["unshare_pid"] == "EPERM" and plant["unshare_user_pid"] == "EPERM", plant
    assert plant["unshare_cmd"] != 0


# --------------------------------------------------------------------------------------------
# As root: what a cell's host uid could leave for the next cell given the same uid slot.
# --------------------------------------------------------------------------------------------

LEAVE = probe(
    IPC_PRELUDE
    + r"""
T, KEY = sys.argv[1], int(sys.argv[2])
for d in ("/tmp", "/var/tmp", "/dev/shm", "/home/builder", "/workspace",
          "/home/builder/.cache/tool"):
    path = f"{d}/{T}{d.replace('/', '-')}"
    with open(path, "w") as f:
        f.write("left behind")
    os.chmod(path, 0o6777)
    os.mkdir(path + ".d", 0o777)
    os.chmod(path + ".d", 0o777)
os.mkfifo(f"/workspace/{T}.fifo", 0o666)
sock = socket.socket(socket.AF_UNIX)
sock.bind(f"/home/builder/.cache/tool/{T}.sock")
report["shm"] = err(lambda: libc.shmget(KEY, 4096, IPC_CREAT | 0o666))
report["msg"] = err(lambda: libc.msgget(KEY, IPC_CREAT | 0o666))
report["sem"] = err(lambda: libc.semget(KEY, 1, IPC_CREAT | 0o666))
report["mq"] = err(lambda: rt.mq_open(f"/{T}".encode(), os.O_CREAT | os.O_RDWR, 0o666, None))
KEY_SPEC_SESSION, KEY_SPEC_USER = -3, -4
report["add_key"] = err(lambda: libc.syscall(248, b"user", T.encode(), b"x", 1, KEY_SPEC_USER))
report["keyctl"] = err(lambda: libc.syscall(250, 0, KEY_SPEC_SESSION, 0))  # GET_KEYRING_ID
report["request_key"] = err(lambda: libc.syscall(249, b"user", T.encode(), None, 0))
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv("/usr/bin/sleep", ["daemon-" + T, "100000"])
    os._exit(0)
os.wait()
report["cgroup"] = open("/proc/self/cgroup").read().split()
done("leave.json")
announce(T)
wait_go(T)
"""
)

LOOK = probe(
    IPC_PRELUDE
    + r"""
T, KEY = sys.argv[1], int(sys.argv[2])
report["dirs"] = {d: sorted(os.listdir(d)) for d in ("/tmp", "/var/tmp", "/dev/shm",
                                                     "/home/builder")}
report["workspace"] = sorted(n for n in os.listdir("/workspace") if T in n)
report["shm"] = err(lambda: libc.shmget(KEY, 0, 0))
report["msg"] = err(lambda: libc.msgget(KEY, 0))
report["sem"] = err(lambda: libc.semget(KEY, 0, 0))
report["mq"] = err(lambda: rt.mq_open(f"/{T}".encode(), os.O_RDWR, 0, None))
done()
"""
)


def _sysvipc_uids() -> dict[str, list[tuple[int, int]]]:
    """(key, uid) of every SysV IPC object of the host's IPC namespace."""
    found: dict[str, list[tuple[int, int]]] = {}
    for kind in ("shm", "msg", "sem"):
        lines = Path(f"/proc/sysvipc/{kind}").read_text().splitlines()
        header = lines[0].split()
        rows = [dict(zip(header, line.split(), strict=False)) for line in lines[1:]]
        found[kind] = [(int(r["key"]), int(r["uid"])) for r in rows]
    return found


def _host_mqueue_exists(name: str) -> bool:
    import ctypes

    rt = ctypes.CDLL("librt.so.1", use_errno=True)
    fd = rt.mq_open(name.encode(), os.O_RDONLY, 0, None)
    if fd >= 0:
        os.close(fd)
        return True
    return False


def _key_user_uids() -> set[int]:
    return {int(line.split(":")[0]) for line in Path("/proc/key-users").read_text().splitlines()}


def _reachable_by(path: Path, uid: int) -> bool:
    """Whether ``uid`` (no groups) can reach ``path`` by name: search every ancestor."""
    for parent in reversed(path.parents):
        st = parent.stat()
        bit = 0o100 if st.st_uid == uid else 0o001
        if not st.st_mode & bit:
            return False
    return True


def _owned_by_cells(top: Path, *, recurse: bool = True) -> list[tuple[Path, int]]:
    found = []
    entries = top.rglob("*") if recurse else top.iterdir()
    for p in entries:
        try:
            st = p.lstat()
        except OSError:
            continue
        if reserved(st.st_uid):
            found.append((p, st.st_uid))
    return found


@pytest.mark.skipif(not IS_ROOT, reason="host uid slots are handed out as root only")
def test_nothing_of_a_cell_s_uid_reaches_the_next_cell_with_that_uid(root_mode: Mode) -> None:
    """A pull request's cell leaves what it can owned by its host uid: setuid files and
    0777 directories in /tmp, /var/tmp, /dev/shm, home, the workspace and its cache; a
    fifo and a socket; SysV shm, message queue and semaphore sets and a POSIX mqueue; a
    key (refused); a daemon. The next build is given the same uid slot (its uid is reused)
    and finds none of it; on the host, nothing of it is left that uid could reach: no
    process, no IPC object or key, no cgroup, no file outside a root-only directory."""
    mode = root_mode
    token = "bc" + secrets.token_hex(6)
    key = 0x5EC00000 + secrets.randbelow(1 << 16)
    cache = "    caches: [{path: /home/builder/.cache/tool, key: tool}]\n"
    evil = mode.project(
        "evil",
        spec(
            "evil",
            f"exec python3 leave.py {token} {key}",
            outputs=("leave.json",),
            step_extra=cache,
        ),
        **{"leave.py": LEAVE},
    )
    bg = Background(lambda: mode.build(evil, "--trust", "untrusted", "--ref", "refs/pull/3/merge"))
    workspace = ready(mode, token, bg)
    # While it runs: its cgroups exist, and its IPC objects live in its namespace only.
    cgroups = [Path(p) for p in json.loads((workspace.parent / "cell.json").read_text())["cgroups"]]
    assert all(p.is_dir() for p in cgroups)  # none on a host without usable cgroups
    uid = workspace.stat().st_uid
    assert reserved(uid)
    assert all(k != key for rows in _sysvipc_uids().values() for k, _ in rows)
    assert not _host_mqueue_exists(f"/{token}")
    wait_until("its daemon", lambda: processes_with("daemon-" + token), alive=bg)
    release(workspace, token)
    res1 = bg.result()
    left = report_of(evil, res1, "leave.json")
    assert {left[k] for k in ("shm", "msg", "sem", "mq")} == {"ok"}, left
    assert {left[k] for k in ("add_key", "keyctl", "request_key")} == {"EPERM"}, left
    # Its own cgroup namespace: every hierarchy (v1 or v2) is "/" for it, no host path.
    assert left["cgroup"] and all(line.endswith(":/") for line in left["cgroup"]), left
    assert mode.host_uids(res1) == {uid}

    # On the host, after the build.
    assert processes_with("daemon-" + token) == []
    assert not [p for p in cgroups if p.exists()]
    assert not [(k, u) for rows in _sysvipc_uids().values() for k, u in rows if reserved(u)]
    assert not _host_mqueue_exists(f"/{token}")
    assert not [u for u in _key_user_uids() if reserved(u)]
    assert list((mode.state / "cells").iterdir()) == []  # workspaces gone
    owned = _owned_by_cells(mode.state)
    for top in (Path("/tmp"), Path("/var/tmp"), Path("/dev/shm")):
        owned += [(p, u) for p, u in _owned_by_cells(top, recurse=False) if token in p.name]
    reachable = [str(p) for p, u in owned if _reachable_by(p, u)]
    assert reachable == []
    # What is left is the published cache (the cell's files, still its uid's), below a
    # generation directory that is root's alone.
    assert owned and all("/caches/" in str(p) for p, _ in owned), owned

    # The next build, of another project, gets that uid again and finds nothing.
    look = mode.project(
        "acme", spec("acme", f"exec python3 look.py {token} {key}"), **{"look.py": LOOK}
    )
    res2 = mode.build(look, "--trust", "untrusted", "--ref", "refs/pull/4/merge")
    assert mode.host_uids(res2) == {uid}, "the uid slot was not reused: nothing was shown"
    seen = report_of(look, res2)
    assert seen["dirs"] == {"/tmp": [], "/var/tmp": [], "/dev/shm": [], "/home/builder": []}
    assert seen["workspace"] == []
    assert {seen[k] for k in ("shm", "msg", "sem", "mq")} == {"ENOENT"}, seen


# --------------------------------------------------------------------------------------------
# The input store (cas/): reached, rewritten or planted by a build, for the next build.
# --------------------------------------------------------------------------------------------

TAMPER = probe(r"""
import hashlib
STATE = sys.argv[1]  # where the state directory is on the host: guessable, given here
INPUT = "/workspace/vendor/dep.bin"
report["read"] = open(INPUT, "rb").read().decode()
report["open_rw"] = err(lambda: open(INPUT, "r+b"))
report["append"] = err(lambda: open(INPUT, "ab"))
report["chmod"] = err(lambda: os.chmod(INPUT, 0o666))
report["utime"] = err(lambda: os.utime(INPUT, (0, 0)))
report["truncate"] = err(lambda: os.truncate(INPUT, 0))
fd = os.open(INPUT, os.O_PATH)
report["reopen_rw"] = err(lambda: os.open(f"/proc/self/fd/{fd}", os.O_RDWR))
report["unlink"] = err(lambda: os.unlink(INPUT))
report["rename"] = err(lambda: os.rename(INPUT, "/workspace/vendor/other"))
report["link"] = err(lambda: os.link(INPUT, "/workspace/linked"))
report["mount"] = err(lambda: libc.mount(b"/workspace", INPUT.encode(), None, 0x1000, None))
# The entry at its host path (which mountinfo may even name): the cell has no such path.
digest = hashlib.sha256(open(INPUT, "rb").read()).hexdigest()
entry = f"{STATE}/cas/sha256/{digest[:2]}/{digest}"
report["mountinfo_names_it"] = entry in open("/proc/self/mountinfo").read()
report["host_open"] = err(lambda: open(entry, "r+b"))
report["host_read"] = err(lambda: open(entry, "rb"))
report["host_store"] = err(lambda: os.listdir(f"{STATE}/cas"))
report["after"] = open(INPUT, "rb").read().decode()
done()
""")

COPY_INPUT = "cp vendor/dep.bin got.txt"


def _input_spec(
    name: str, digest: str, run: str, *, source: str, outputs: tuple[str, ...] = ("got.txt",)
) -> str:
    """A spec with one input, ``{source, sha256: digest}`` at /workspace/vendor/dep.bin."""
    text = spec(name, run, outputs=outputs)
    inputs = f'inputs:\n  - {{{source}, sha256: "{digest}", path: vendor/dep.bin}}\n'
    return text.replace("steps:\n", inputs + "steps:\n", 1)


def _store_entries(state: Path) -> dict[str, str]:
    """Every entry of the input store: its name and the sha256 of its content."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in (state / "cas" / "sha256").glob("*/*")
        if not p.name.startswith(".")
    }


def test_a_cell_cannot_rewrite_or_reach_an_entry_of_the_input_store(mode: Mode) -> None:
    """A pull request's step attacks the store entry bound at its input's path (open for
    write, chmod, truncate, reopen through /proc, unlink, rename, hard link, mount over it),
    then looks for the store itself at its host path (which mountinfo names). The next build of
    another project, naming the same digest, gets the content the digest names."""
    body = f"dependency {secrets.token_hex(8)}\n"
    digest = hashlib.sha256(body.encode()).hexdigest()
    evil = mode.project(
        "evil",
        _input_spec(
            "evil",
            digest,
            f"exec python3 tamper.py {mode.state}",
            source="file: dep.bin",
            outputs=("report.json",),
        ),
        **{"dep.bin": body, "tamper.py": TAMPER},
    )
    res1 = mode.build(evil, "--trust", "untrusted", "--ref", "refs/pull/5/merge")
    seen = report_of(evil, res1)
    assert seen["read"] == seen["after"] == body
    denied = {"EACCES", "EROFS", "EPERM", "EBUSY", "EXDEV"}
    for attack in (
        "open_rw",
        "append",
        "chmod",
        "utime",
        "truncate",
        "reopen_rw",
        "unlink",
        "rename",
        "link",
        "mount",
    ):
        assert seen[attack] in denied, (attack, seen[attack])
    # Knowing where the store is (mountinfo tells it today) does not get it there.
    assert seen["host_open"] == seen["host_read"] == seen["host_store"] == "ENOENT"
    assert _store_entries(mode.state) == {digest: digest}
    acme = mode.project(
        "acme",
        _input_spec("acme", digest, COPY_INPUT, source="file: dep.bin"),
        **{"dep.bin": body},
    )
    res2 = mode.build(acme, "--trust", "trusted")
    assert res2.returncode == 0, res2.stderr
    assert (acme / "buildcell-out" / "got.txt").read_text() == body


@pytest.mark.skipif(not IS_ROOT, reason="the operator grant to a loopback origin is root's here")
def test_a_url_input_that_does_not_hash_to_its_digest_is_never_stored(root_mode: Mode) -> None:
    """A pull request names the digest of another project's dependency with a URL of its
    own that serves other bytes. Before that dependency is in the store: refused, nothing
    stored under the digest, and the other project's build then stores the real one.
    After: still refused; the store is not this project's to take from, so its own origin
    is asked again, and its bytes do not match."""
    mode = root_mode
    body = f"the real dependency {secrets.token_hex(8)}\n"
    digest = hashlib.sha256(body.encode()).hexdigest()
    with http_origin("evil") as origin:
        url = f'url: "http://127.0.0.1:{origin.port}/dep"'
        evil = mode.project("evil", _input_spec("evil", digest, COPY_INPUT, source=url))
        grant = ("--allow-fetch", f"127.0.0.1:{origin.port}")
        res = mode.build(evil, "--trust", "untrusted", "--ref", "refs/pull/6/merge", *grant)
        assert res.returncode == 125, res.stderr
        assert "sha256 mismatch" in res.stderr, res.stderr
        assert origin.hits == ["/dep"]
        assert _store_entries(mode.state) == {}
        acme = mode.project(
            "acme",
            _input_spec("acme", digest, COPY_INPUT, source="file: dep.bin"),
            **{"dep.bin": body},
        )
        assert mode.build(acme, "--trust", "trusted").returncode == 0
        assert _store_entries(mode.state) == {digest: digest}
        res = mode.build(evil, "--trust", "untrusted", "--ref", "refs/pull/6/merge", *grant)
        assert res.returncode == 125, res.stderr
        assert "sha256 mismatch" in res.stderr, res.stderr
        assert not (evil / "buildcell-out").exists()
        assert origin.hits == ["/dep", "/dep"]  # asked again: no hit from another's store
    assert (acme / "buildcell-out" / "got.txt").read_text() == body


def test_another_project_s_private_input_cannot_be_had_by_its_digest(root_mode: Mode) -> None:
    """Project acme (trusted) builds with a private file input, as its provenance then
    records by digest. An untrusted pull request of another project names that digest with
    a URL that does not exist: it must not get the file (a store hit would hand it over,
    and a record would then claim the file came from that URL)."""
    mode = root_mode
    secret_body = f"acme's private key material {secrets.token_hex(16)}\n"
    digest = hashlib.sha256(secret_body.encode()).hexdigest()
    acme = mode.project(
        "acme",
        _input_spec("acme", digest, "true", source="file: private.bin", outputs=()),
        **{"private.bin": secret_body},
    )
    assert mode.build(acme, "--trust", "trusted", "--ref", "refs/heads/main").returncode == 0
    url = 'url: "https://nowhere.invalid/anything"'
    evil = mode.project("evil", _input_spec("evil", digest, COPY_INPUT, source=url))
    res = mode.build(evil, "--trust", "untrusted", "--ref", "refs/pull/7/merge")
    stolen = evil / "buildcell-out" / "got.txt"
    assert not stolen.exists(), f"evil got acme's file: {stolen.read_text()!r}"
    assert res.returncode == 125


# --------------------------------------------------------------------------------------------
# cache/: the synthesized /etc, compiled seccomp filters and unpacked images every cell uses.
# --------------------------------------------------------------------------------------------

ETC_TAMPER = probe(r"""
names = ("passwd", "group", "hosts", "resolv.conf", "nsswitch.conf", "hostname")
for name in names:
    path = "/etc/" + name
    fd = os.open(path, os.O_PATH)
    report[name] = sorted({
        err(lambda: open(path, "r+b")),
        err(lambda: os.open(f"/proc/self/fd/{fd}", os.O_RDWR)),
        err(lambda: os.chmod(path, 0o666)),
        err(lambda: os.unlink(path)),
        err(lambda: os.rename(path, path + ".x")),
        err(lambda: libc.mount(b"/workspace", path.encode(), None, 0x1000, None)),
    })
report["new_in_etc"] = err(lambda: open("/etc/ld.so.preload", "w"))
# The shared cache at its host path (guessable; mountinfo may even name it).
cache = sys.argv[1] + "/cache"
report["mountinfo_names_it"] = cache in open("/proc/self/mountinfo").read()
report["cache_listed"] = err(lambda: os.listdir(cache))
report["filter_planted"] = err(lambda: open(cache + "/seccomp-planted.bpf", "wb"))
done()
""")

FILTERED = probe(r"""
report["seccomp"] = open("/proc/self/status").read().split("Seccomp:")[1].split()[0]
report["keyctl"] = err(lambda: libc.syscall(250, 0, -3, 0))
report["vsock"] = err(lambda: socket.socket(40, socket.SOCK_STREAM))
report["passwd"] = open("/etc/passwd").read()
done()
""")


def _tree_digest(root: Path) -> dict[str, str]:
    """Path -> sha256 (or link target, or 'dir') of everything below ``root``."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        elif not p.name.endswith(".lock"):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_a_cell_cannot_write_the_shared_etc_or_filter_cache(mode: Mode) -> None:
    """Every cell gets /etc/passwd, hosts, resolv.conf, ... bound from one shared directory
    of cache/, next to the compiled seccomp filters. A pull request's step tries to
    rewrite, replace or mount over each, to plant /etc/ld.so.preload, and to write a filter
    at the cache's host path (which mountinfo names). Nothing changes in cache/, and the next cell of
    another project still has the filter and the real files."""
    warm = mode.project("warm", spec("warm", "true", outputs=()))
    assert mode.build(warm).returncode == 0
    before = _tree_digest(mode.state / "cache")
    assert any(name.startswith("seccomp-") for name in before), before
    evil = mode.project(
        "evil", spec("evil", f"exec python3 etc.py {mode.state}"), **{"etc.py": ETC_TAMPER}
    )
    seen = report_of(evil, mode.build(evil, "--trust", "untrusted", "--ref", "refs/pull/8/merge"))
    for name in ("passwd", "group", "hosts", "resolv.conf", "nsswitch.conf", "hostname"):
        assert set(seen[name]) <= {"EACCES", "EROFS", "EPERM", "EBUSY"}, (name, seen[name])
    assert seen["new_in_etc"] in ("EROFS", "EACCES"), seen
    assert seen["cache_listed"] == seen["filter_planted"] == "ENOENT"
    assert _tree_digest(mode.state / "cache") == before
    acme = mode.project(
        "acme", spec("acme", "exec python3 filtered.py"), **{"filtered.py": FILTERED}
    )
    got = report_of(acme, mode.build(acme, "--trust", "trusted"))
    assert got["seccomp"] == "2" and got["keyctl"] == "EPERM", got
    assert got["vsock"] == "EAFNOSUPPORT"
    assert got["passwd"].startswith("root:x:0:0:") and "builder:x:1000:1000" in got["passwd"]


def test_a_tampered_filter_in_the_cache_is_not_loaded(root_mode: Mode) -> None:
    """Defence in depth: whoever can write cache/ (a bug elsewhere, a careless operator
    script) turns off the syscall filter of every later cell, of every project, with eight
    bytes. DESIGN.md: "every cache is named by the digest of its content and verified
    when loaded"."""
    mode = root_mode
    warm = mode.project("warm", spec("warm", "true", outputs=()))
    assert mode.build(warm).returncode == 0
    (program,) = (mode.state / "cache").glob("seccomp-*.bpf")
    # One classic-BPF instruction: BPF_RET|BPF_K with SECCOMP_RET_ALLOW.
    program.write_bytes(struct.pack("<HBBI", 0x06, 0, 0, 0x7FFF0000))
    acme = mode.project(
        "acme", spec("acme", "exec python3 filtered.py"), **{"filtered.py": FILTERED}
    )
    got = report_of(acme, mode.build(acme, "--trust", "trusted"))
    assert got["keyctl"] == "EPERM" and got["vsock"] == "EAFNOSUPPORT", got


IMAGE_ATTACK = r"""r=/workspace/report.txt; : > $r
for f in /usr/bin/cat /bin/sh /img-file /etc/img-conf; do
  if (echo pwned >> "$f") 2>/dev/null; then echo "appended $f" >> $r; fi
done
for f in /planted /usr/planted /etc/planted /usr/bin/planted /var/planted; do
  if (echo pwned > "$f") 2>/dev/null; then echo "created $f" >> $r; fi
done
"""


def test_a_cell_cannot_change_a_cached_image_for_the_next_build(mode: Mode) -> None:
    """Two projects pin the same image by digest: it is unpacked once into cache/ and both
    run on that one tree. Between two builds of acme, a pull request of another project
    running on it tries to append to its programs and files and to create new ones, as
    root's uid slot and rootless (where the cache belongs to the very user the cell runs
    as, and only the read-only mount stands in the way). The cache is unchanged and acme
    reads the image's own bytes."""
    layer = [
        TarEntry("img-file", "file", b"from the image\n", mode=0o666),
        TarEntry("etc/img-conf", "file", b"conf\n", mode=0o644),
    ]

    def project(name: str, run: str, outputs: tuple[str, ...]) -> Path:
        proj = mode.project(name, "placeholder")
        digest = make_host_tools_layout(proj / "img", [layer], tools=("/bin/sh", "/usr/bin/cat"))
        text = spec(name, run, outputs=outputs, extra=f"rootfs: {{oci: img, digest: '{digest}'}}\n")
        (proj / "buildcell.yaml").write_text(text)
        mode.own(proj)
        return proj

    read = "cat /img-file /etc/img-conf > /workspace/got.txt"
    acme = project("acme", read, ("got.txt",))
    assert mode.build(acme, "--trust", "trusted").returncode == 0
    oci = mode.state / "cache" / "oci"

    def cached() -> dict[str, str]:
        """The image trees and the layer files they hard-link (``used`` is touched)."""
        return {k: v for k, v in _tree_digest(oci).items() if Path(k).name != "used"}

    before = cached()
    assert any(k.startswith("layers/") for k in before), sorted(before)[:5]
    evil = project("evil", IMAGE_ATTACK, ("report.txt",))
    res = mode.build(evil, "--trust", "untrusted", "--ref", "refs/pull/9/merge")
    assert res.returncode == 0, res.stderr
    assert (evil / "buildcell-out" / "report.txt").read_text() == ""
    assert cached() == before
    (acme / "buildcell-out" / "got.txt").unlink()
    assert mode.build(acme, "--trust", "trusted").returncode == 0
    assert (acme / "buildcell-out" / "got.txt").read_text() == "from the image\nconf\n"


# --------------------------------------------------------------------------------------------
# Output directories.
# --------------------------------------------------------------------------------------------

OUT_ATTACK = probe(r"""
T, SHARED = sys.argv[1], sys.argv[2]
with open("/workspace/common.txt", "w") as f:
    f.write("from A\n")
with open("/workspace/a-only.txt", "w") as f:
    f.write("A was here\n")
# Outputs that lead where the other build's files will be: not collected, never followed.
os.symlink(SHARED + "/common.txt", "/workspace/link.txt")
os.symlink(SHARED, "/workspace/linkdir")
done()
announce(T)
wait_go(T)
""")


def _popen_cli(mode: Mode, *args: str, cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as err_file:
        return subprocess.Popen(
            [sys.executable, "-m", "buildcell", *args],
            cwd=cwd,
            env=cli_env(mode.state, **mode.env),
            stdout=subprocess.PIPE,
            stderr=err_file,
        )


@pytest.mark.skipif(not IS_ROOT, reason="the lock and swap are host-side; run once, as root")
def test_one_output_directory_holds_one_build_s_outputs(root_mode: Mode) -> None:
    """Two projects' builds given one --out overlap: A (a pull request) holds it while its
    step runs and tries to reach it through symlinked outputs; B waits for it. In the end
    the directory holds B's outputs exactly, nothing of A's, and nothing A pointed at."""
    mode = root_mode
    token = "bc" + secrets.token_hex(6)
    shared = mode.base / "shared-out"
    # Through a symlinked directory nothing matches: optional, or the build would fail.
    through = {"path": "linkdir/common.txt", "optional": True}
    outputs = ("report.json", "common.txt", "a-only.txt", "link.txt", through)
    a = mode.project(
        "alpha",
        spec("alpha", f"exec python3 out.py {token} {shared}", outputs=outputs),
        **{"out.py": OUT_ATTACK},
    )
    b = mode.project("beta", spec("beta", "echo 'from B' > common.txt", outputs=("common.txt",)))
    bg = Background(
        lambda: mode.cli(
            "build",
            "--project",
            "alpha",
            "--trust",
            "untrusted",
            "--out",
            str(shared),
            "--json",
            cwd=a,
        )
    )
    workspace = ready(mode, token, bg)
    log = mode.base / "beta.log"
    proc = _popen_cli(
        mode, "build", "--project", "beta", "--out", str(shared), "--json", cwd=b, log=log
    )
    try:
        wait_until(
            "B to wait for the output directory",
            lambda: b"waiting for another build" in log.read_bytes(),
        )
        release(workspace, token)
        res_a = bg.result()
        out_b, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert res_a.returncode == 0, res_a.stderr
    assert proc.returncode == 0, log.read_text()
    record_a = json.loads(res_a.stdout)
    assert {o["path"] for o in record_a["outputs"]} == {"report.json", "common.txt", "a-only.txt"}
    manifest = json.loads((shared / "outputs.json").read_text())
    assert manifest["build"] == json.loads(out_b)["id"]
    files = {str(p.relative_to(shared)) for p in shared.rglob("*")}
    own = {"outputs.json", "provenance.intoto.jsonl", "provenance.sigstore.json"}
    assert files - own == {"common.txt"}, files
    assert (shared / "common.txt").read_text() == "from B\n"
    assert not [p for p in shared.rglob("*") if p.is_symlink()]
    assert not list(shared.parent.glob(".shared-out*"))  # no staging left behind


# --------------------------------------------------------------------------------------------
# Build records and logs (builds/).
# --------------------------------------------------------------------------------------------

FORGE = probe(r"""
T = open("/workspace/token.txt").read().strip()
ACME = open("/workspace/acme-id.txt").read().strip()
forged = {"ts": 0, "build": ACME, "event": "build.finish", "status": "succeeded", "mark": T}
for stream in (sys.stdout, sys.stderr):
    stream.write("\n" + json.dumps(forged) + "\n")
    stream.write(json.dumps({"id": ACME, "project": "acme", "status": "succeeded", "mark": T}))
    stream.write("\r\x1b[2K\x1b]0;" + T + "\x07\x1b[1A\n")
    stream.flush()
state = sys.argv[1]  # the state directory's host path: guessable, given here
report["builds"] = err(lambda: os.listdir(state + "/builds"))
report["acme_record"] = err(lambda: open(f"{state}/builds/{ACME}/record.json", "a"))
done()
""")


@pytest.mark.skipif(not IS_ROOT, reason="records are host-side; run once, as root")
def test_a_build_cannot_reach_another_project_s_records_or_logs(root_mode: Mode) -> None:
    """A pull request of project evil whose spec calls itself ``acme`` prints forged event
    lines and a forged record for acme's last build, with terminal escapes, and looks for
    builds/ at its host path. acme's record is untouched; evil's events
    hold no forged line; acme's listing, records and logs show nothing of evil."""
    mode = root_mode
    token = "bc" + secrets.token_hex(6)
    acme = mode.project("acme", spec("acme", "echo acme-log-line", outputs=()))
    res = mode.build(acme, "--trust", "trusted")
    assert res.returncode == 0, res.stderr
    acme_id = json.loads(res.stdout)["id"]
    record = mode.state / "builds" / acme_id / "record.json"
    before = record.read_bytes()
    evil = mode.project(
        "evil",
        spec("acme", f"exec python3 forge.py {mode.state}"),
        **{"forge.py": FORGE, "token.txt": token, "acme-id.txt": acme_id},
    )
    res = mode.build(evil, "--trust", "untrusted", "--ref", "refs/pull/10/merge", project="evil")
    seen = report_of(evil, res)
    evil_id = json.loads(res.stdout)["id"]
    assert seen == {"builds": "ENOENT", "acme_record": "ENOENT"}
    assert record.read_bytes() == before
    events = read_events(mode.state / "builds" / evil_id / "events.jsonl")
    assert all(e["build"] == evil_id for e in events)
    assert not [e for e in events if token in json.dumps(e)]
    # What the pull request printed is in its own step's log, and only there.
    logs = list((mode.state / "builds").glob("*/logs/*.log"))
    assert [p for p in logs if token in p.read_text(errors="replace")] == [
        mode.state / "builds" / evil_id / "logs" / "s.log"
    ]
    listing = mode.cli("ls", "--project", "acme", "--json", cwd=acme)
    assert [b["id"] for b in json.loads(listing.stdout)] == [acme_id]
    for command in ("show", "logs"):
        assert mode.cli(command, evil_id, "--project", "acme", cwd=acme).returncode != 0
    shown = mode.cli("logs", acme_id, "--project", "acme", cwd=acme)
    assert shown.returncode == 0 and token not in shown.stdout + shown.stderr
    assert "acme-log-line" in shown.stdout


# --------------------------------------------------------------------------------------------
# The environment, and what one step leaves for the next in home or /tmp.
# --------------------------------------------------------------------------------------------

ENV_LEAVE = r"""cat >> "$HOME/.profile" <<'E'
export LD_PRELOAD=/workspace/evil.so MARK=from-profile
E
cp "$HOME/.profile" "$HOME/.bashrc"; echo 'MARK=from-tmp' > /tmp/env
echo "export MARK=from-workspace" > /workspace/.env-for-later
"""

ENV_LOOK = probe(r"""
report["env"] = dict(os.environ)
report["pid1_environ"] = open("/proc/1/environ", "rb").read().decode(errors="replace")
report["home"] = sorted(os.listdir("/home/builder"))
report["tmp"] = sorted(os.listdir("/tmp"))
done()
""")

CELL_ENV = {
    "HOME",
    "PATH",
    "TZ",
    "LANG",
    "USER",
    "LOGNAME",
    "SOURCE_DATE_EPOCH",
    "PWD",
    "SHLVL",
    "_",
}


@pytest.mark.skipif(not IS_ROOT, reason="the CLI's environment is set through bc (root) only")
def test_no_environment_reaches_the_next_step_or_build(root_mode: Mode) -> None:
    """The CI's environment holds a token, and a pull request's spec sets LD_PRELOAD for
    its own steps, then writes shell start-up files into its home and /tmp. Its next step,
    and the next build of another project, see only the fixed cell environment."""
    mode = root_mode
    ci_env = {
        "CI_JOB_TOKEN": "ci-" + secrets.token_hex(8),
        "LD_PRELOAD": "/host/evil.so",
        "BASH_ENV": "/host/env",
        "HTTP_PROXY": "http://10.0.0.1:3128",
    }
    text = (
        "version: 1\nname: evil\nenv: {LD_PRELOAD: /nonexistent.so, MARK: from-spec}\n"
        f"steps:\n  - name: leave\n    run: {json.dumps(ENV_LEAVE)}\n"
        "  - name: look\n    run: env -u LD_PRELOAD -u MARK python3 look.py\n"
        "outputs: [report.json]\n"
    )
    evil = mode.project("evil", text, **{"look.py": ENV_LOOK})
    res = mode.cli("build", "--project", "evil", "--trust", "untrusted", cwd=evil, env=ci_env)
    step2 = report_of(evil, res)
    assert step2["home"] == [] and step2["tmp"] == []
    acme = mode.project("acme", spec("acme", "exec python3 look.py"), **{"look.py": ENV_LOOK})
    res = mode.cli("build", "--project", "acme", "--trust", "trusted", cwd=acme, env=ci_env)
    nxt = report_of(acme, res)
    assert set(nxt["env"]) <= CELL_ENV, nxt["env"]
    assert nxt["home"] == [] and nxt["tmp"] == []
    for value in ci_env.values():
        assert value not in json.dumps(nxt) and value not in json.dumps(step2)
    assert "from-" not in json.dumps(nxt)


# --------------------------------------------------------------------------------------------
# Build caches across projects (per-ref scoping is in test_build_isolation.py).
# --------------------------------------------------------------------------------------------

CACHED = (
    "version: 1\nname: {name}\nsteps:\n  - name: s\n    run: |\n"
    "      ls -A /home/builder/.cache/tool > seen.txt\n"
    "      echo x > /home/builder/.cache/tool/{name}-was-here\n"
    "      ln -sf /etc/shadow /home/builder/.cache/tool/{name}-link\n"
    "      mkfifo /home/builder/.cache/tool/{name}-fifo\n"
    "    caches: [{{path: /home/builder/.cache/tool, key: tool}}]\n"
    "outputs: [seen.txt]\n"
)


def test_a_project_s_cache_reaches_no_other_project(mode: Mode) -> None:
    """evil's pull request and evil's trusted main both plant files, a symlink to a host
    file and a fifo in cache key ``tool``, on the same ref acme builds. acme's first build
    of that ref and key starts empty, its next one has acme's own; evil's, evil's."""

    def build(name: str, *args: str) -> set[str]:
        proj = mode.project(name, CACHED.format(name=name))
        res = mode.build(proj, "--ref", "refs/heads/main", *args)
        assert res.returncode == 0, res.stderr
        return set((proj / "buildcell-out" / "seen.txt").read_text().split())

    assert build("evil", "--trust", "untrusted") == set()
    assert build("evil", "--trust", "trusted") == set()
    assert build("acme", "--trust", "trusted") == set()
    # An untrusted build starts from its project's trusted cache (a fifo is never kept).
    assert build("acme", "--trust", "untrusted") == {"acme-was-here", "acme-link"}
    assert build("evil", "--trust", "untrusted") == {"evil-was-here", "evil-link"}


# --------------------------------------------------------------------------------------------
# File-access notifications on what every cell shares read-only.
# --------------------------------------------------------------------------------------------

WATCH = probe(r"""
import select, struct
T = sys.argv[1]
fd = libc.inotify_init1(os.O_NONBLOCK)
IN_OPEN, IN_ACCESS = 0x20, 0x1
names = {}
for path in ("/usr/bin", "/etc/passwd", "/etc/hosts"):
    wd = libc.inotify_add_watch(fd, path.encode(), IN_OPEN | IN_ACCESS)
    names[wd] = path
report["watches"] = sorted(names.values())
announce(T)
wait_go(T)
seen = set()
while True:
    try:
        buf = os.read(fd, 65536)
    except BlockingIOError:
        break
    i = 0
    while i < len(buf):
        wd, mask, cookie, size = struct.unpack_from("iIII", buf, i)
        name = buf[i + 16:i + 16 + size].rstrip(b"\0").decode()
        seen.add(names[wd] + ("/" + name if name else ""))
        i += 16 + size
report["seen"] = sorted(seen)
done()
""")

INOTIFY = (
    "the host's /usr is bound into every cell as the same inodes, and inotify is allowed: "
    "a cell watching it learns which programs a concurrent build of another project runs, "
    "and when (the host's own accesses too); the cells' /etc is one prepared copy, bound "
    "into every cell the same way, so a read of /etc/passwd is seen too"
)


@pytest.mark.xfail(strict=True, reason=INOTIFY)
def test_a_cell_cannot_watch_what_a_concurrent_build_opens(root_mode: Mode) -> None:
    """A read-only channel, not an integrity one: A puts inotify watches on /usr/bin and
    the shared /etc files; B, another project's build, runs a program that nothing else
    here runs and reads /etc/passwd. A must see neither."""
    mode = root_mode
    token = "bc" + secrets.token_hex(6)
    rare = next(n for n in ("base32", "tsort", "factor", "tac") if Path("/usr/bin", n).exists())
    watcher = mode.project(
        "watcher", spec("watcher", f"exec python3 watch.py {token}"), **{"watch.py": WATCH}
    )
    victim = mode.project(
        "victim",
        spec(
            "victim", f"{rare} --version > /dev/null; getent passwd builder > /dev/null", outputs=()
        ),
    )
    bg = Background(lambda: mode.build(watcher, "--trust", "untrusted"))
    workspace = ready(mode, token, bg)
    assert mode.build(victim, "--trust", "trusted").returncode == 0
    release(workspace, token)
    seen = report_of(watcher, bg.result())
    assert seen["watches"] == ["/etc/hosts", "/etc/passwd", "/usr/bin"]
    assert f"/usr/bin/{rare}" not in seen["seen"] and "/etc/passwd" not in seen["seen"], seen
