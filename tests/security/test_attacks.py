"""Attacks from inside a cell, each expected to be contained. Run against the real sandbox.

Every test plays the untrusted build: it tries something a malicious pull request would
try, and asserts both that the attempt failed inside the cell and that the host shows no
effect.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pyseccomp
import pytest
from tests.conftest import RootlessCLI, RunCell, RunCLI, root_only

from buildcell.cell import Limits

PY = "/usr/bin/python3"


def py(code: str) -> list[str]:
    return [PY, "-c", textwrap.dedent(code)]


@pytest.fixture
def canaries() -> Iterator[dict[str, str]]:
    """Secrets planted where a CI runner keeps them."""
    token = "canary-" + secrets.token_hex(8)
    planted: list[Path] = []
    places = {}
    for base in ("/root", "/home", "/var/tmp", "/tmp"):
        if not os.access(base, os.W_OK):
            continue
        path = Path(base) / f".buildcell-canary-{token}"
        path.write_text(token)
        planted.append(path)
        places[str(path)] = token
    yield places
    for path in planted:
        path.unlink(missing_ok=True)


def test_cannot_read_host_secrets(
    cell: RunCell, canaries: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    token = next(iter(canaries.values()), "canary-env-only")
    monkeypatch.setenv("RUNNER_TOKEN", token)
    paths = " ".join(canaries)
    script = (
        f"for p in {paths}; do cat $p 2>/dev/null; done; env; "
        "cat /proc/1/environ 2>/dev/null | tr '\\0' '\\n'; "
        "ls -a /root /home /var/tmp 2>&1; "
        "grep -rs canary- /tmp /home /var /etc /workspace 2>/dev/null; true"
    )
    ran = cell(["/bin/sh", "-c", script])
    assert token not in ran.stdout + ran.stderr
    assert "RUNNER_TOKEN" not in ran.stdout


def test_cannot_write_usr_or_the_host_source(cell: RunCell, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("original")
    script = (
        "echo pwned > /usr/pwned 2>/dev/null && echo usr-written; "
        "echo pwned > /usr/bin/env 2>/dev/null && echo env-written; "
        f"ls {src} 2>/dev/null && echo host-source-visible; "
        "echo changed > f; rm -f f; echo done"
    )
    ran = cell(["/bin/sh", "-c", script], source=src)
    assert ran.stdout == "done\n"
    assert not Path("/usr/pwned").exists()
    assert (src / "f").read_text() == "original"


def test_cannot_see_or_kill_host_processes(cell: RunCell) -> None:
    victim = subprocess.Popen(["sleep", "60"])
    try:
        ran = cell(
            py(f"""
            import os, signal
            pids = [p for p in os.listdir('/proc') if p.isdigit()]
            print(len(pids))
            try:
                os.kill({victim.pid}, signal.SIGKILL)
                print('killed')
            except OSError as e:
                print(e.errno)
            """)
        )
        count, outcome = ran.stdout.split()
        assert int(count) <= 3  # bwrap's init, python, (maybe) nothing else
        assert outcome in (str(errno.ESRCH), str(errno.EPERM))
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


def _nr(name: str) -> int:
    return int(pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name))


@pytest.mark.parametrize(
    ("name", "args", "expected"),
    [
        ("unshare", "0x10000000", errno.EPERM),  # CLONE_NEWUSER
        ("unshare", "0x40000000", errno.EPERM),  # CLONE_NEWNET
        ("setns", "0, 0", errno.EPERM),
        ("mount", "b'none', b'/tmp', b'tmpfs', 0, 0", errno.EPERM),
        ("umount2", "b'/proc', 2", errno.EPERM),
        ("pivot_root", "b'/tmp', b'/tmp'", errno.EPERM),
        ("open_tree", "-100, b'/', 1", errno.EPERM),
        ("fsopen", "b'tmpfs', 0", errno.EPERM),
        ("ptrace", "16, 1, 0, 0", errno.EPERM),  # PTRACE_ATTACH to pid 1
        ("process_vm_readv", "1, 0, 0, 0, 0, 0", errno.EPERM),
        ("keyctl", "0, -3, 0", errno.EPERM),
        ("add_key", "b'user', b'x', b'y', 1, -3", errno.EPERM),
        ("request_key", "b'user', b'x', 0, 0", errno.EPERM),
        ("bpf", "0, 0, 0", errno.EPERM),
        ("perf_event_open", "0, 0, -1, -1, 0", errno.EPERM),
        ("userfaultfd", "0", errno.EPERM),
        ("io_uring_setup", "8, 0", errno.EPERM),
        ("init_module", "0, 0, b''", errno.EPERM),
        ("kexec_load", "0, 0, 0, 0", errno.EPERM),
        ("reboot", "0xfee1dead, 672274793, 0x1234567, 0", errno.EPERM),
        ("swapon", "b'/tmp/x', 0", errno.EPERM),
        ("clone3", "0, 0", errno.ENOSYS),
    ],
)
def test_dangerous_syscalls_are_refused(cell: RunCell, name: str, args: str, expected: int) -> None:
    ran = cell(
        py(f"""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        r = libc.syscall({_nr(name)}, {args})
        print(r, ctypes.get_errno())
        """)
    )
    assert ran.stdout.split() == ["-1", str(expected)], ran.stderr


def test_clone_with_new_namespaces_is_refused_but_fork_works(cell: RunCell) -> None:
    ran = cell(
        py("""
        import os, subprocess
        r = subprocess.run(['unshare', '--user', 'true'], capture_output=True)
        print('unshare-cmd', r.returncode)
        pid = os.fork()
        if pid == 0:
            os._exit(7)
        print('fork', os.waitpid(pid, 0)[1] >> 8)
        import threading; t = threading.Thread(target=lambda: None); t.start(); t.join()
        print('threads ok')
        """)
    )
    lines = ran.stdout.splitlines()
    assert lines[0] != "unshare-cmd 0"
    assert lines[1:] == ["fork 7", "threads ok"]


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86-specific ABIs")
def test_x32_syscall_abi_kills_the_process(cell: RunCell) -> None:
    ran = cell(
        py(f"""
        import ctypes, sys
        sys.stdout.write('before\\n'); sys.stdout.flush()
        ctypes.CDLL(None).syscall(0x40000000 | {_nr("getpid")})
        print('survived')
        """)
    )
    assert ran.stdout == "before\n"
    assert ran.result.exit_code == 128 + 31  # SIGSYS


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86-specific ABIs")
def test_i386_syscall_abi_kills_the_process(cell: RunCell, tmp_path: Path) -> None:
    if shutil.which("cc") is None:
        pytest.skip("needs a C compiler")
    (tmp_path / "int80.c").write_text(
        textwrap.dedent("""
        #include <stdio.h>
        int main(void) {
            long ret;
            puts("before"); fflush(stdout);
            /* getpid through the 32-bit ABI (eax=20, int $0x80) */
            __asm__ volatile ("int $0x80" : "=a"(ret) : "a"(20L) : "memory");
            printf("survived %ld\\n", ret);
            return 0;
        }
        """)
    )
    res = subprocess.run(
        ["cc", "-o", str(tmp_path / "int80"), str(tmp_path / "int80.c")],
        capture_output=True,
        check=False,
    )
    if res.returncode != 0:
        pytest.skip("cannot compile the probe")
    ran = cell(["./int80"], source=tmp_path)
    assert ran.stdout == "before\n"
    assert ran.result.exit_code == 128 + 31


def _listener(family: int, kind: int, addr: str) -> socket.socket:
    s = socket.socket(family, kind)
    s.bind((addr, 0))
    if kind == socket.SOCK_STREAM:
        s.listen()
    s.settimeout(0.5)
    return s


@pytest.mark.parametrize(
    ("family", "addr"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]
)
def test_cannot_reach_host_loopback_over_tcp(cell: RunCell, family: int, addr: str) -> None:
    try:
        server = _listener(family, socket.SOCK_STREAM, addr)
    except OSError:
        pytest.skip(f"no {addr} on this host")
    port = server.getsockname()[1]
    with server:
        ran = cell(
            py(f"""
            import socket
            s = socket.socket({int(family)}, socket.SOCK_STREAM)
            s.settimeout(2)
            try:
                s.connect(('{addr}', {port})); print('connected')
            except OSError as e:
                print('refused', e.errno)
            """)
        )
        assert ran.stdout.startswith("refused")
        with pytest.raises(TimeoutError):
            server.accept()


def test_cannot_reach_host_loopback_over_udp(cell: RunCell) -> None:
    server = _listener(socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1")
    port = server.getsockname()[1]
    with server:
        cell(
            py(f"""
            import socket
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            for _ in range(5):
                s.sendto(b'exfiltrate', ('127.0.0.1', {port}))
            """)
        )
        with pytest.raises(TimeoutError):
            server.recvfrom(100)


def test_no_route_to_anywhere(cell: RunCell) -> None:
    ran = cell(
        py("""
        import socket
        for addr in [('1.1.1.1', 443), ('169.254.169.254', 80), ('10.0.0.1', 80)]:
            s = socket.socket(); s.settimeout(2)
            try:
                s.connect(addr); print('connected', addr)
            except OSError as e:
                print('unreachable', e.errno)
        print(open('/proc/net/dev').read().count(':'))
        """)
    )
    lines = ran.stdout.splitlines()
    assert all(ln.startswith("unreachable") for ln in lines[:3]), lines
    assert lines[3] == "1"  # only lo


def test_cannot_reach_host_abstract_unix_socket(cell: RunCell) -> None:
    name = f"\0buildcell-test-{secrets.token_hex(6)}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(name)
    server.listen()
    server.settimeout(0.5)
    with server:
        ran = cell(
            py(f"""
            import socket
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect({name!r}); print('connected')
            except OSError as e:
                print('refused', e.errno)
            """)
        )
        assert ran.stdout.startswith("refused")
        with pytest.raises(TimeoutError):
            server.accept()


def test_cannot_open_raw_or_packet_sockets(cell: RunCell) -> None:
    ran = cell(
        py("""
        import socket
        for args in [(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
                     (socket.AF_PACKET, socket.SOCK_RAW, 0),
                     (socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)]:
            try:
                socket.socket(*args); print('opened')
            except OSError as e:
                print('denied', e.errno)
        """)
    )
    assert ran.stdout.split("\n")[:3] == [f"denied {n}" for n in (1, 1, 13)] or all(
        ln.startswith("denied") for ln in ran.stdout.splitlines()
    )


def test_no_capabilities_no_new_privs_and_no_setuid_escalation(cell: RunCell) -> None:
    ran = cell(
        [
            "/bin/sh",
            "-c",
            "grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs):' "
            "/proc/self/status; su -c id root </dev/null 2>&1 | head -1; id -u",
        ]
    )
    status = dict(line.split(":\t") for line in ran.stdout.splitlines()[:6])
    assert {k: v for k, v in status.items() if k.startswith("Cap")} == dict.fromkeys(
        ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"), "0000000000000000"
    )
    assert status["NoNewPrivs"] == "1"
    assert ran.stdout.splitlines()[-1] == "1000"


def test_no_controlling_terminal_so_no_tiocsti(bc: RunCLI, tmp_path: Path) -> None:
    import pty

    leader, follower = pty.openpty()
    code = (
        "import fcntl, os, termios\n"
        "try:\n    os.open('/dev/tty', os.O_RDWR); print('tty opened')\n"
        "except OSError as e:\n    print('no tty', e.errno)\n"
        "try:\n    fcntl.ioctl(0, termios.TIOCSTI, b'x'); print('injected')\n"
        "except OSError as e:\n    print('tiocsti denied', e.errno)\n"
    )
    try:
        res = bc("run", "-i", "--", PY, "-c", code, cwd=tmp_path, stdin=follower)
    finally:
        os.close(follower)
        os.close(leader)
    assert "no tty" in res.stdout
    assert "tiocsti denied" in res.stdout
    assert "injected" not in res.stdout


def test_fork_bomb_is_contained_by_pids(cell: RunCell) -> None:
    started = time.monotonic()
    ran = cell(
        ["/bin/sh", "-c", "bomb() { bomb | bomb & }; bomb; sleep 30"],
        limits=Limits(pids=64, timeout=5),
    )
    assert time.monotonic() - started < 30
    assert ran.result.teardown is not None
    assert ran.result.teardown.processes_left == 0
    assert ran.result.teardown.clean


def test_memory_hog_is_contained(cell: RunCell) -> None:
    ran = cell(
        py("x = bytearray(512 << 20); print('allocated', len(x))"), limits=Limits(memory=96 << 20)
    )
    assert "allocated" not in ran.stdout
    from buildcell.cell.supervisor import limits_backend
    from buildcell.host import HostEnv

    if "memory" in limits_backend(HostEnv.read()).controllers:
        assert ran.result.exit_code == 137
        assert ran.result.reason == "oom"
        assert ran.of("limit.oom")
    else:
        assert ran.result.exit_code != 0
        assert ran.of("limit.degraded")


def test_disk_fill_is_contained(cell: RunCell) -> None:
    free_before = shutil.disk_usage("/tmp").free
    ran = cell(
        [
            "/bin/sh",
            "-c",
            "i=0; while dd if=/dev/zero of=f$i bs=1M count=8 2>/dev/null;"
            " do i=$((i+1)); done; echo stopped at $i; df -k . | tail -1",
        ],
        limits=Limits(disk=32 << 20, timeout=60),
    )
    assert "stopped at" in ran.stdout
    assert int(ran.stdout.split()[2]) <= 4
    assert shutil.disk_usage("/tmp").free > free_before - (64 << 20)
    assert ran.result.teardown is not None and ran.result.teardown.clean


def test_sleep_past_timeout(cell: RunCell) -> None:
    ran = cell(["/bin/sleep", "60"], limits=Limits(timeout=0.5))
    assert ran.result.exit_code == 124
    assert ran.of("limit.timeout")


def _processes_with(marker: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(int(pid))
            except OSError:
                continue
    return found


def test_double_forked_daemon_dies_with_the_cell(cell: RunCell) -> None:
    marker = f"bc-daemon-{secrets.token_hex(4)}"
    ran = cell(
        [
            "/bin/bash",
            "-c",
            f"( setsid bash -c 'exec -a {marker} sleep 300' & ) ; "
            f"( nohup bash -c 'trap \"\" HUP TERM; exec -a {marker} sleep 300' & ) ; "
            "sleep 0.3; echo started",
        ]
    )
    assert ran.stdout == "started\n"
    assert _processes_with(marker) == []
    assert ran.result.teardown is not None and ran.result.teardown.clean


def test_output_symlink_to_a_host_file_is_not_collected(cell: RunCell, tmp_path: Path) -> None:
    secret = Path(tempfile.mkdtemp()) / "host-secret"
    secret.write_text("host secret " + secrets.token_hex(8))
    out = tmp_path / "out"
    ran = cell(
        [
            "/bin/sh",
            "-c",
            f"ln -s {secret} result.txt; mkdir d; ln -s {secret.parent} d/x; mkfifo pipe",
        ],
        outputs=("result.txt", "d/**", "pipe"),
        out_dir=out,
    )
    collected = list(out.rglob("*")) if out.exists() else []
    assert all(secret.read_text() not in p.read_text() for p in collected if p.is_file())
    skipped = {e["message"] for e in ran.of("output.skipped")}
    assert any("result.txt" in m and "symlink" in m for m in skipped)
    assert any("pipe" in m for m in skipped)
    shutil.rmtree(secret.parent)


@root_only
def test_as_root_cell_processes_are_not_host_root(cell: RunCell) -> None:
    marker = f"bc-uid-{secrets.token_hex(4)}"
    import threading

    seen: dict[str, str] = {}

    def watch() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not seen:
            for pid in _processes_with(marker):
                status = Path(f"/proc/{pid}/status").read_text()
                for ln in status.splitlines():
                    if ln.startswith(("Uid", "Gid")):
                        key, value = ln.split(":", 1)
                        seen[key] = value
            time.sleep(0.02)

    t = threading.Thread(target=watch)
    t.start()
    cell(["/bin/bash", "-c", f"exec -a {marker} sleep 1"])
    t.join()
    uids = seen["Uid"].split()
    assert uids and all(int(u) >= 0x10000 for u in uids), seen
    assert all(int(g) != 0 for g in seen["Gid"].split())


def test_cell_cannot_signal_the_supervisor(cell: RunCell) -> None:
    ran = cell(
        py(f"""
        import os, signal
        try:
            os.kill({os.getpid()}, signal.SIGKILL); print('sent')
        except OSError as e:
            print('denied', e.errno)
        """)
    )
    assert ran.stdout.startswith("denied")


def test_proc_and_sys_do_not_expose_the_host(cell: RunCell) -> None:
    ran = cell(
        [
            "/bin/sh",
            "-c",
            "ls /sys 2>&1 | head -1; cat /proc/1/cmdline | tr '\\0' ' ';"
            " echo; echo 1 > /proc/sys/kernel/core_pattern 2>&1 || echo proc-sys-ro",
        ]
    )
    assert "No such file" in ran.stdout.splitlines()[0]
    assert "proc-sys-ro" in ran.stdout


def test_hostile_probe_is_contained_rootless(bc_rootless: RootlessCLI) -> None:
    """The demo's hostile build, run by an unprivileged user: every probe is contained."""
    from tests.conftest import REPO

    probe_dir = Path(tempfile.mkdtemp(prefix="bc-probe-", dir="/tmp"))
    shutil.copy(REPO / "examples" / "hostile" / "probe.py", probe_dir / "probe.py")
    os.chmod(probe_dir, 0o755)
    try:
        res = bc_rootless("run", "--source", str(probe_dir), "--", PY, "probe.py")
    finally:
        shutil.rmtree(probe_dir)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "LEAKED" not in res.stdout
    assert res.stdout.count("CONTAINED") >= 8
