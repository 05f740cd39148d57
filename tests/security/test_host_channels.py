"""Channels from a cell to the host that a network namespace does not close, and what a cell
leaves behind on the host. Run against the real sandbox.

- Sockets whose address family reaches past the cell's network namespace (vsock to the
  hypervisor and other VMs above all), or that are pure kernel attack surface, must not be
  creatable, neither directly nor through the i386/x32 ABIs (socketcall) nor io_uring.
- bubblewrap must carry nothing of the supervisor's environment (the cell reads it as
  ``/proc/1/environ``).
- Under an agent that is PID 1 and never reaps, no defunct bubblewrap may accumulate, and
  the cells' exit statuses must stay exact.

The i386 probes are machine code run from a 64-bit Python (``int 0x80``): no 32-bit
toolchain is needed, and the kernel sees the same i386 syscall ABI (AUDIT_ARCH_I386) a
32-bit program would use, so the filter treats both alike.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import Ran, RunCell, cli_env, root_only

from buildcell.cell.seccomp import NETLINK_PROTOCOLS, SOCKET_FAMILIES

PY = "/usr/bin/python3"
SIGSYS_EXIT = 128 + signal.SIGSYS
AF_VSOCK = 40
VMADDR_CID_LOCAL, VMADDR_CID_HOST = 1, 2
REFUSED_FAMILIES = sorted(f for f, v in SOCKET_FAMILIES.items() if not v.allowed)
REFUSED_NETLINK = sorted(p for p, v in NETLINK_PROTOCOLS.items() if not v.allowed)
x86_64_only = pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86-specific ABIs")


def py(code: str) -> list[str]:
    return [PY, "-c", textwrap.dedent(code)]


def _report(ran: Ran) -> dict[str, Any]:
    assert ran.result.exit_code == 0, ran.stderr
    return dict(json.loads(ran.stdout))


# --------------------------------------------------------------------------------------------
# vsock.
# --------------------------------------------------------------------------------------------


def _host_has_vsock() -> bool:
    try:
        socket.socket(AF_VSOCK, socket.SOCK_STREAM).close()
    except OSError:
        return False
    return True


def test_vsock_to_the_host_and_to_local_is_refused(cell: RunCell) -> None:
    # The control: on the host, creating one works (no connection is made here).
    host_has_vsock = _host_has_vsock()
    ran = cell(
        py(f"""
        import ctypes, json, socket
        out = {{}}
        for kind in ("SOCK_STREAM", "SOCK_DGRAM", "SOCK_SEQPACKET"):
            try:
                socket.socket({AF_VSOCK}, getattr(socket, kind)).close()
                out[kind] = "created"
            except OSError as e:
                out[kind] = e.errno
        for cid in ({VMADDR_CID_HOST}, {VMADDR_CID_LOCAL}):
            try:
                s = socket.socket({AF_VSOCK}, socket.SOCK_STREAM)
                s.settimeout(2)
                s.connect((cid, 61234))
                out[f"cid{{cid}}"] = "connected"
            except OSError as e:
                out[f"cid{{cid}}"] = e.errno
        # Stray upper register bits: the kernel reads only the int in the low half.
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        fd = libc.syscall(ctypes.c_long(41), ctypes.c_ulong((1 << 32) | {AF_VSOCK}),
                          ctypes.c_ulong(1), ctypes.c_ulong(0))
        out["high_bits"] = ctypes.get_errno() if fd < 0 else "created"
        buf = (ctypes.c_int * 2)()
        r = libc.socketpair({AF_VSOCK}, 1, 0, buf)
        out["socketpair"] = ctypes.get_errno() if r < 0 else "created"
        print(json.dumps(out))
        """)
    )
    eafnosupport = errno.EAFNOSUPPORT
    assert _report(ran) == {
        "SOCK_STREAM": eafnosupport,
        "SOCK_DGRAM": eafnosupport,
        "SOCK_SEQPACKET": eafnosupport,
        "cid2": eafnosupport,
        "cid1": eafnosupport,
        "high_bits": eafnosupport,
        "socketpair": eafnosupport,
    }
    if not host_has_vsock:
        pytest.skip("contained, but this host has no vsock transport to compare with")


# --------------------------------------------------------------------------------------------
# Every other refused family, netlink protocol and alias; what stays allowed still works.
# --------------------------------------------------------------------------------------------

_PROBE_SOCKETS = """
import ctypes, json
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
NR_SOCKET, NR_SOCKETPAIR = 41, 53

def sock(family, kind, protocol=0):
    ctypes.set_errno(0)
    fd = libc.syscall(ctypes.c_long(NR_SOCKET), ctypes.c_ulong(family), ctypes.c_ulong(kind),
                      ctypes.c_ulong(protocol))
    if fd >= 0:
        libc.close(ctypes.c_int(fd))
        return "created"
    return ctypes.get_errno()

def pair(family, kind):
    buf = (ctypes.c_int * 2)()
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(NR_SOCKETPAIR), ctypes.c_ulong(family), ctypes.c_ulong(kind),
                     ctypes.c_ulong(0), buf)
    if r == 0:
        libc.close(buf[0]); libc.close(buf[1])
        return "created"
    return ctypes.get_errno()
"""


@x86_64_only
def test_every_refused_family_answers_eafnosupport(cell: RunCell) -> None:
    # Also families no kernel has yet, and values only the low 32 bits make small.
    families = [*REFUSED_FAMILIES, *range(46, 70), 255, 1 << 16, 2**31 - 1, 2**64 - 1]
    ran = cell(
        py(
            _PROBE_SOCKETS
            + f"""
out = {{}}
for family in {families!r}:
    for kind in (1, 2, 3, 5):  # stream, dgram, raw, seqpacket
        out[f"{{family}}/{{kind}}"] = sock(family, kind)
    out[f"{{family}}/pair"] = pair(family, 1)
print(json.dumps(out))
"""
        )
    )
    report = _report(ran)
    assert len(report) == len(families) * 5
    wrong = {probe: got for probe, got in report.items() if got != errno.EAFNOSUPPORT}
    assert wrong == {}


@x86_64_only
def test_refused_netlink_protocols_and_inet_aliases(cell: RunCell) -> None:
    ran = cell(
        py(
            _PROBE_SOCKETS
            + f"""
out = {{}}
for protocol in {REFUSED_NETLINK!r} + [23, 31, 32, 1 << 32, (1 << 32) | 9]:
    out[f"netlink/{{protocol}}"] = sock(16, 3, protocol)
# (AF_INET, SOCK_PACKET) would be an AF_PACKET socket, IPPROTO_SMC an AF_SMC one.
out["inet/SOCK_PACKET"] = sock(2, 10, 0x0300)
out["inet/IPPROTO_SMC"] = sock(2, 1, 256)
out["inet6/IPPROTO_SMC"] = sock(10, 1, 256)
print(json.dumps(out))
"""
        )
    )
    report = _report(ran)
    netlink = {k: v for k, v in report.items() if k.startswith("netlink/")}
    assert set(netlink.values()) == {errno.EPROTONOSUPPORT}, netlink
    assert report["inet/SOCK_PACKET"] == errno.EAFNOSUPPORT
    assert report["inet/IPPROTO_SMC"] == errno.EPROTONOSUPPORT
    assert report["inet6/IPPROTO_SMC"] == errno.EPROTONOSUPPORT


def test_unix_inet_and_route_netlink_keep_working(cell: RunCell) -> None:
    ip = next((p for p in ("/usr/sbin/ip", "/usr/bin/ip", "/sbin/ip") if os.path.exists(p)), None)
    ran = cell(
        py(f"""
        import json, os, socket, subprocess
        out = {{}}
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        a.sendall(b"ping"); out["unix_pair"] = b.recv(4).decode()
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.bind(("127.0.0.1", 0)); server.listen()
        client = socket.create_connection(server.getsockname(), timeout=5)
        conn, _ = server.accept(); client.sendall(b"tcp"); out["inet_tcp"] = conn.recv(3).decode()
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).close(); out["inet6"] = "created"
        # glibc asks NETLINK_ROUTE for the interfaces and, for AI_ADDRCONFIG, addresses.
        out["interfaces"] = [name for _, name in socket.if_nameindex()]
        out["getaddrinfo"] = sorted({{ai[4][0] for ai in socket.getaddrinfo(
            "localhost", 80, proto=socket.IPPROTO_TCP, flags=socket.AI_ADDRCONFIG)}})
        diag = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 4)  # NETLINK_SOCK_DIAG
        diag.close(); out["sock_diag"] = "created"
        ip = {ip!r}
        if ip:
            r = subprocess.run([ip, "-o", "link"], capture_output=True, text=True)
            out["ip_link"] = r.returncode == 0 and ": lo:" in r.stdout
        print(json.dumps(out))
        """)
    )
    report = _report(ran)
    assert report["unix_pair"] == "ping"
    assert report["inet_tcp"] == "tcp"
    assert report["inet6"] == "created"
    assert "lo" in report["interfaces"]
    assert report["getaddrinfo"], "getaddrinfo found no address for localhost"
    assert report["sock_diag"] == "created"
    if ip is not None:
        assert report["ip_link"] is True


# --------------------------------------------------------------------------------------------
# The i386 and x32 ABIs: socketcall(2) would hide the family behind a pointer.
# --------------------------------------------------------------------------------------------

# Builds machine code for the i386 syscall ABI (int 0x80) in memory below 4 GiB, where a
# 32-bit pointer can reach it, and calls it from this 64-bit process.
_INT80 = """
import ctypes, mmap, struct, sys
MAP_32BIT = 0x40
page = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_32BIT,
                 prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
base = ctypes.addressof(ctypes.c_char.from_buffer(page))
assert base < 2**32

def int80(eax, ebx, ecx, edx=0):
    # push rbx; mov eax/ebx/ecx/edx, imm32; int 0x80; pop rbx; ret  (rbx is callee-saved)
    code = (b"\\x53" + b"\\xb8" + struct.pack("<I", eax) + b"\\xbb" + struct.pack("<I", ebx)
            + b"\\xb9" + struct.pack("<I", ecx) + b"\\xba" + struct.pack("<I", edx)
            + b"\\xcd\\x80\\x5b\\xc3")
    page[:len(code)] = code
    return ctypes.CFUNCTYPE(ctypes.c_int)(base)()

def socketcall_socket(family, kind):
    page[128:140] = struct.pack("<3I", family, kind, 0)
    return int80(102, 1, base + 128)  # socketcall(SYS_SOCKET, args)

def i386_socket(family, kind):
    return int80(359, family, kind)  # the i386 socket(2)
"""


def _run_on_host(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )


def _host_runs_i386_syscalls() -> bool:
    probe = _run_on_host(_INT80 + "\nprint(socketcall_socket(1, 1) >= 0, i386_socket(1, 1) >= 0)")
    return probe.returncode == 0 and probe.stdout.split() == ["True", "True"]


@x86_64_only
@pytest.mark.parametrize("call", ["socketcall_socket", "i386_socket"])
def test_i386_socket_calls_kill_the_process(cell: RunCell, call: str) -> None:
    if not _host_runs_i386_syscalls():
        pytest.skip("this kernel does not run i386 syscalls (no IA32 emulation)")
    if _host_has_vsock():
        # The control: without the filter, this very route yields a vsock socket.
        control = _run_on_host(_INT80 + f"\nprint({call}({AF_VSOCK}, 1))")
        assert control.returncode == 0
        assert int(control.stdout) >= 0, control.stdout
    ran = cell(
        py(
            _INT80
            + f"""
sys.stdout.write("before\\n"); sys.stdout.flush()
print("returned", {call}({AF_VSOCK}, 1))
"""
        )
    )
    assert ran.stdout == "before\n"
    assert ran.result.exit_code == SIGSYS_EXIT


@x86_64_only
def test_x32_socket_call_kills_the_process(cell: RunCell) -> None:
    ran = cell(
        py(f"""
        import ctypes, sys
        sys.stdout.write("before\\n"); sys.stdout.flush()
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall(ctypes.c_long(0x40000000 | 41), {AF_VSOCK}, 1, 0)
        print("returned")
        """)
    )
    assert ran.stdout == "before\n"
    assert ran.result.exit_code == SIGSYS_EXIT


# --------------------------------------------------------------------------------------------
# io_uring: IORING_OP_SOCKET creates sockets without the socket syscall.
# --------------------------------------------------------------------------------------------

_IO_URING = """
import ctypes, json
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
params = ctypes.create_string_buffer(120)  # struct io_uring_params
out = {}
for name, nr, args in (("setup", 425, (8, params)), ("enter", 426, (0, 1, 0, 0, None, 0)),
                       ("register", 427, (0, 0, None, 0))):
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(nr), *args)
    out[name] = "ok" if r >= 0 else ctypes.get_errno()
    if name == "setup" and r >= 0:
        libc.close(ctypes.c_int(r))
print(json.dumps(out))
"""


@x86_64_only
def test_io_uring_cannot_be_set_up(cell: RunCell) -> None:
    host = _run_on_host(_IO_URING)
    assert host.returncode == 0, host.stderr
    ran = cell([PY, "-c", _IO_URING])
    assert _report(ran) == {"setup": errno.EPERM, "enter": errno.EPERM, "register": errno.EPERM}
    if json.loads(host.stdout)["setup"] != "ok":
        pytest.skip("contained, but io_uring is disabled on this host too")


# --------------------------------------------------------------------------------------------
# bubblewrap's environment.
# --------------------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            found += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:
            continue
    return found


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def test_bubblewrap_carries_nothing_of_the_supervisors_environment(
    state_root: Path, tmp_path: Path
) -> None:
    token = f"canary-{secrets.token_hex(8)}"
    env = cli_env(state_root / "state", BUILDCELL_HOST_CANARY=token)
    env["PATH"] = f"/{token}:{env['PATH']}"
    script = (
        'if e=$(tr "\\0" " " < /proc/1/environ); then echo "init-environ:[$e]"; '
        'else echo "init-environ:unreadable"; fi; '
        'echo "path:[$PATH]"; '
        # By bare name: found through the cell's PATH, which bubblewrap set.
        'ls / >/dev/null && echo "bare-name:ok"; '
        "sleep 3"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "buildcell", "run", "--", "sh", "-c", script],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen: dict[int, bytes] = {}
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline and len(seen) < 2:
            for outer in (c for c in _children(proc.pid) if _comm(c) == "bwrap"):
                for pid in (outer, *_children(outer)):
                    if pid not in seen and _comm(pid) == "bwrap":
                        # bubblewrap's own and its sandbox init's environment, from the host.
                        try:
                            seen[pid] = Path(f"/proc/{pid}/environ").read_bytes()
                        except OSError:
                            continue
            time.sleep(0.01)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert len(seen) == 2, f"did not see bubblewrap and its init: {seen}"
    assert all(environ == b"" for environ in seen.values()), seen
    lines = out.splitlines()
    assert "init-environ:[]" in lines, out
    assert "path:[/usr/local/bin:/usr/bin:/bin]" in lines, out
    assert "bare-name:ok" in lines, out
    assert token not in out + err


# --------------------------------------------------------------------------------------------
# Zombies under a PID 1 that never reaps.
# --------------------------------------------------------------------------------------------

# A stand-in for a CI agent that is PID 1 (or a subreaper) and waits only for the processes
# it started. It runs the real CLI, one cell after another, then lists the zombies left to it.
_INIT = """
import ctypes, json, os, subprocess, sys, time
mode, spec = sys.argv[1], json.loads(sys.argv[2])
if mode == "subreaper" and ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) != 0:
    sys.exit(99)
me = os.getpid()
supervisors = set()

def zombies():
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = open(f"/proc/{name}/stat", "rb").read()
        except OSError:
            continue
        comm = stat[stat.index(b"(") + 1:stat.rindex(b")")].decode()
        state, ppid = stat[stat.rindex(b")") + 2:].split()[:2]
        if state == b"Z" and int(ppid) in supervisors | {me}:
            found.append([int(name), comm, int(ppid)])
    return found

codes, errors = [], []
for argv in spec["runs"]:
    proc = subprocess.Popen(argv, cwd=spec["cwd"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    supervisors.add(proc.pid)
    err = proc.communicate()[1]  # waitpid for this pid only: orphans are never reaped
    codes.append(proc.returncode)
    errors.append(err.decode(errors="replace")[-300:])
time.sleep(0.5)
print(json.dumps({"pid": me, "codes": codes, "zombies": zombies(), "errors": errors}))
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "mode",
    [pytest.param("pid1", marks=root_only), "subreaper"],
    ids=["pid1-in-pid-namespace", "subreaper-parent"],
)
def test_no_defunct_bubblewrap_under_an_init_that_never_reaps(
    state_root: Path, tmp_path: Path, mode: str
) -> None:
    if mode == "pid1" and shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) from util-linux")
    run = [sys.executable, "-m", "buildcell", "run"]
    cases: list[tuple[list[str], int]] = [
        *[(["--", "/bin/true"], 0)] * 8,
        (["--", "/bin/sh", "-c", "exit 3"], 3),
        (["--", "/bin/sh", "-c", "kill -9 $$"], 128 + 9),
        (["--timeout", "1s", "--", "/bin/sleep", "30"], 124),
        # A daemon left behind: the cell's init outlives the command, then dies with it.
        (["--", "/bin/sh", "-c", "/bin/sleep 30 & exit 5"], 5),
        (["--disk", "16M", "--", "/bin/sh", "-c", "exit 6"], 6),
        *[(["--", "/bin/true"], 0)] * 4,
    ]
    source = tmp_path / "empty"
    source.mkdir()
    spec = {"runs": [run + args for args, _ in cases], "cwd": str(source)}
    init = [sys.executable, "-c", _INIT, mode, json.dumps(spec)]
    if mode == "pid1":
        init = ["unshare", "--pid", "--fork", "--mount-proc", *init]
    done = subprocess.run(
        init,
        env=cli_env(state_root / "state"),
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    if mode == "pid1":
        assert report["pid"] == 1
    assert report["codes"] == [code for _, code in cases], report["errors"]
    assert report["zombies"] == []


def test_cells_run_in_process_leave_no_zombie_of_the_supervisor(cell: RunCell) -> None:
    # This process is the supervisor here: the inits bubblewrap leaves are reparented to it.
    for command, code in (
        (["/bin/true"], 0),
        (["/bin/sh", "-c", "/bin/sleep 30 & exit 2"], 2),
        (["/bin/sh", "-c", "kill -9 $$"], 128 + 9),
    ):
        assert cell(command).result.exit_code == code
    zombies = []
    for pid in _children(os.getpid()):
        try:
            stat = Path(f"/proc/{pid}/stat").read_bytes()
        except OSError:
            continue
        if stat[stat.rfind(b")") + 2 :].split()[0] == b"Z" and _comm(pid) == "bwrap":
            zombies.append(pid)
    assert zombies == []
