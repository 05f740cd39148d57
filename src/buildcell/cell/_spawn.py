"""The one place that starts processes for a cell, and the loop that supervises them.

Between fork and exec (``preexec``) the child joins the cell's cgroups, lowers rlimits,
enters prepared namespaces, drops to the cell's host uid, and asks to be SIGKILLed if the
supervisor thread that started it goes away. Everything it touches was prepared by the
parent (open file descriptors, resolved libc functions): the child only makes syscalls.

Running Python between fork and exec is the expensive part of starting a cell: the fork
cannot be a ``vfork``, and every page the child's interpreter touches is copied. So a plan
that needs nothing but the uid switch, the umask and disabled core dumps, for a program
that arms its own death signal (``self_guarded``: bubblewrap with ``--die-with-parent``
and ``--json-status-fd``), is started without a Python ``preexec`` at all:

- the uid/gid switch: Linux keeps credentials per thread (glibc's ``set*id`` wrappers
  change every thread's; the raw system calls only the caller's). The spawning thread
  alone takes the cell's uid and gid for the instant of a ``vfork`` and ``exec``, keeping
  saved uid 0 as its way back, and restores its credentials, death signal and
  dumpable flag before it returns (for that instant a host process of the cell's uid
  could signal that thread; none exists but the cell's own, in a pid namespace where the
  supervisor has no pid).
  Where the system call numbers are not known, the switch is done by :mod:`subprocess`
  in C after a full fork;
- the umask is set by :mod:`subprocess` in C;
- core dumps: the supervisor holds secret values, so the first spawn disables core dumps
  of the supervisor itself (soft and hard limit 0), which every child inherits;
- the death signal: bubblewrap sets it before its sandbox process may run anything. Had the
  supervisor died before that, bubblewrap's next step, the status write to the
  supervisor's pipe, kills it with SIGPIPE while its sandbox process still waits for it.

A cell with cgroups (its limits) is born in them without Python too, where its first
process may write their ``cgroup.procs`` files itself: as root on cgroup v1 the
supervisor gives those files to the cell's uid (see ``CellCgroup.let_join``) and takes
them back as soon as bubblewrap reports its sandbox; rootless they are the invoking
user's, as the cell is. The ``vfork`` (with the cell's ids, as above) execs dash, which
writes ``0`` (itself) into each file by its path and execs bubblewrap,
with an empty environment, from ``/``. dash, not bash: bash looks its own uid up in the
user database as it starts (NSS: files, systemd's userdb, LDAP or sssd), which costs
milliseconds and can wait on a directory server; dash asks nothing of anyone, and the ids
stay numbers from start to end. It is taken from ``/usr/bin`` or ``/bin`` alone (root's,
like every directory leading to it, and writable by nobody else), never from the
supervisor's ``PATH``. It costs one small exec, under a millisecond, where a Python
``preexec`` costs a fork of the whole supervisor and the pages its interpreter touches:
5 ms in a bare ``buildcell run``, 15-25 ms in a build process of 50 MiB. Without such a
dash, for a cell on a terminal (a session leader on it could take it as its controlling
terminal), and as root on cgroup v2 (where the move needs rights over the common ancestor
too), the preexec joins, through descriptors opened here. No thread of the supervisor
ever enters a cell's cgroup: one would take one of the cell's pids and, on cgroup v1,
have the supervisor's memory charged there.

bubblewrap starts with an empty environment. It needs none: the cell's environment is set
with ``--clearenv``/``--setenv``, and it finds the cell's command through that ``PATH``.
Whatever it starts with would stay readable for the cell as ``/proc/1/environ`` (the
sandbox's init is a fork of it), so the supervisor's variables, its ``PATH`` included, never
reach it; the program itself is given by absolute path.

Before the first sandbox starts, the supervisor becomes a child subreaper, and the sandbox's
init, which bubblewrap leaves behind when it exits first, is reaped here (see
:mod:`buildcell.cell.reaper`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import resource
import selectors
import shlex
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from buildcell.cell import reaper

__all__ = ["PumpResult", "SpawnPlan", "pump", "spawn"]

_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_setns = _libc.setns
PR_SET_PDEATHSIG = 1
CLONE_NEWUSER = 0x10000000
CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000

Sink = Callable[[bytes], None]


@dataclass(frozen=True)
class SpawnPlan:
    """How to start a sandbox process (bubblewrap, or a storage anchor)."""

    argv: Sequence[str]
    pass_fds: tuple[int, ...] = ()
    #: The ``cgroup.procs`` files of the cgroups the program is born in.
    cgroup_procs: tuple[str, ...] = ()
    #: The program's own ids (``drop_to``, else the supervisor's) may write them.
    cgroup_procs_writable: bool = False
    rlimits: tuple[tuple[int, int], ...] = ()
    affinity: frozenset[int] | None = None
    setns_fds: tuple[tuple[int, int], ...] = ()
    drop_to: tuple[int, int] | None = None
    stdin: int | None = None
    capture: bool = True
    umask: int | None = None
    #: Run in the child after entering ``setns_fds`` and before dropping privileges
    #: (the network namespace set-up); it may only make syscalls, like the rest.
    in_child: Callable[[], None] | None = None
    #: The program sets its own parent-death signal before it runs anything of the cell,
    #: and dies if the supervisor is already gone by then (see the module doc).
    self_guarded: bool = False
    #: The slave of a pseudo-terminal: the program's stdin, stdout and stderr (``stdin``
    #: and ``capture`` are then unused). The program starts a new session without a
    #: controlling terminal: the session the cell's command starts inside the sandbox
    #: takes it (see ``supervisor``), so that its process groups are ones it can see.
    terminal: int | None = None

    def needs_preexec(self) -> bool:
        """Whether anything of the plan has to run in Python between fork and exec (the
        cgroups are joined by dash where it can: see the module doc)."""
        return bool(
            not self.self_guarded
            or any(res != resource.RLIMIT_CORE or value != 0 for res, value in self.rlimits)
            or self.affinity
            or self.setns_fds
            or self.in_child is not None
        )


def _preexec_for(plan: SpawnPlan, parent: int, cgroup_fds: Sequence[int]) -> Callable[[], None]:
    rlimits = [(res, value, resource.getrlimit(res)[1]) for res, value in plan.rlimits]
    affinity = plan.affinity
    setns_fds = plan.setns_fds
    drop_to = plan.drop_to
    umask = plan.umask
    in_child = plan.in_child

    def preexec() -> None:
        if umask is not None:
            os.umask(umask)
        for fd in cgroup_fds:
            os.write(fd, b"0")
        for res, value, hard in rlimits:
            limit = value if hard == resource.RLIM_INFINITY else min(value, hard)
            resource.setrlimit(res, (limit, limit))
        if affinity:
            os.sched_setaffinity(0, affinity)
        for fd, nstype in setns_fds:
            if _setns(fd, nstype) != 0:
                raise OSError(ctypes.get_errno(), "setns")
        if in_child is not None:
            in_child()
        if drop_to is not None:
            uid, gid = drop_to
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
        # After the credential change: changing credentials clears the death signal.
        if _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
        if os.getppid() != parent:
            os._exit(125)

    return preexec


def spawn(plan: SpawnPlan) -> subprocess.Popen[bytes]:
    """Start ``plan.argv``; stdout and stderr are pipes unless ``capture`` is False.

    The program starts with an empty environment, from an absolute path (a bare name is
    looked up in the supervisor's ``PATH`` first). The first call makes the supervisor a
    child subreaper.

    Raises:
        OSError: the program could not be started (callers translate it).
    """
    reaper.become_subreaper()
    pipe = subprocess.PIPE if plan.capture else subprocess.DEVNULL
    common: dict[str, Any] = {
        "executable": _absolute_program(plan.argv[0]),
        "stdin": plan.stdin if plan.stdin is not None else subprocess.DEVNULL,
        "stdout": pipe,
        "stderr": pipe,
        "pass_fds": plan.pass_fds,
        "close_fds": True,
        "env": {},
        "process_group": 0,
    }
    if plan.terminal is not None:
        del common["process_group"]  # a new session: also a process group of its own
        common.update(
            stdin=plan.terminal, stdout=plan.terminal, stderr=plan.terminal,
            start_new_session=True,
        )  # fmt: skip
    with reaper.tracking() as track:
        proc = _start(plan, common)
        track(proc)
    return proc


def _absolute_program(program: str) -> str:
    if "/" in program:
        return os.path.abspath(program)
    found = shutil.which(program)
    if found is None:
        raise FileNotFoundError(2, "No such file or directory", program)
    return os.path.abspath(found)


def _start(plan: SpawnPlan, common: dict[str, Any]) -> subprocess.Popen[bytes]:
    in_cgroups = _in_cgroups_argv(plan, common["executable"]) if plan.cgroup_procs else None
    if plan.needs_preexec() or (plan.cgroup_procs and in_cgroups is None):
        cgroup_fds: list[int] = []
        try:
            for path in plan.cgroup_procs:
                try:
                    cgroup_fds.append(_open_above_stdio(path))
                except OSError as e:
                    why = f"cannot join the cell cgroup {path}: {e.strerror}"
                    raise OSError(e.errno, why) from e
            return subprocess.Popen(
                list(plan.argv),
                **common,
                # The child runs only pre-bound syscalls (no imports, no locks): see the
                # module doc.
                preexec_fn=_preexec_for(plan, os.getpid(), cgroup_fds),  # noqa: PLW1509
            )
        finally:
            for fd in cgroup_fds:
                os.close(fd)
    if in_cgroups is not None:
        # dash joins; a removed supervisor directory would make it complain into the
        # cell's stderr: it starts in /.
        common = dict(common, executable=in_cgroups[0], cwd="/")
        return _start_fast(plan, in_cgroups, common)
    return _start_fast(plan, list(plan.argv), common)


def _open_above_stdio(path: str) -> int:
    """``path`` open for writing on a descriptor above 2: a supervisor started with its
    stdin closed would get 0, over which the child's stdin is put before the preexec writes
    (the join would silently go to /dev/null)."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    if fd > 2:
        return fd
    try:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    finally:
        os.close(fd)


def _start_fast(
    plan: SpawnPlan, argv: list[str], common: dict[str, Any]
) -> subprocess.Popen[bytes]:
    """Start without a Python preexec: a vfork, with the cell's ids for its instant."""
    _disable_own_core_dumps()
    if plan.umask is not None:
        common["umask"] = plan.umask
    if plan.drop_to is None:
        return subprocess.Popen(argv, **common)
    uid, gid = plan.drop_to
    if _THREAD_CRED_SYSCALLS is None:
        return subprocess.Popen(argv, **common, user=uid, group=gid, extra_groups=[])
    with _thread_credentials(uid, gid):
        return subprocess.Popen(argv, **common)


def _in_cgroups_argv(plan: SpawnPlan, program: str) -> list[str] | None:
    """The dash command that joins the plan's cgroups and execs ``program`` with the
    plan's arguments; None where the preexec has to join instead."""
    if not plan.cgroup_procs_writable or plan.terminal is not None:
        return None
    dash = _system_program("dash")
    if dash is None:
        return None
    joins = [
        f"{{ echo 0 >{shlex.quote(path)}; }} 2>/dev/null || "
        f"{{ echo {shlex.quote(f'buildcell: cannot join the cell cgroup {path}')} >&2; exit 125; }}"
        for path in plan.cgroup_procs
    ]
    # dash exports PWD to what it execs, and nothing else: the program gets no environment.
    script = "; ".join([*joins, 'unset PWD; exec "$0" "$@"'])
    return [dash, "-c", script, program, *plan.argv[1:]]


#: Where the program that joins cgroups is taken from.
SYSTEM_DIRS = ("/usr/bin", "/bin")


@cache
def _system_program(name: str) -> str | None:
    """``name`` in :data:`SYSTEM_DIRS`, if it is that program (not a link to another, as a
    multi-call binary would be) and it and every directory leading to it are root's and
    writable by nobody else (the supervisor's ``PATH`` is not asked)."""
    for directory in SYSTEM_DIRS:
        real = os.path.realpath(os.path.join(directory, name))
        if os.path.basename(real) != name:
            continue
        if _root_only(real, executable=True) and all(
            _root_only(d) for d in _ancestors(os.path.dirname(real))
        ):
            return real
    return None


def _ancestors(directory: str) -> list[str]:
    out = [directory]
    while directory not in ("/", ""):
        directory = os.path.dirname(directory)
        out.append(directory)
    return out


def _root_only(path: str, *, executable: bool = False) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    mode = st.st_mode
    if st.st_uid != 0 or mode & 0o022:
        return False
    return stat.S_ISREG(mode) and bool(mode & 0o111) if executable else stat.S_ISDIR(mode)


# (setgroups, setresgid, setresuid) system call numbers.
_THREAD_CRED_SYSCALLS: tuple[int, int, int] | None = {
    "x86_64": (116, 119, 117),
    "aarch64": (159, 149, 147),
}.get(os.uname().machine)
PR_GET_PDEATHSIG = 2
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4


def _syscall(number: int, *args: object) -> None:
    if _libc.syscall(ctypes.c_long(number), *args) != 0:
        raise OSError(ctypes.get_errno(), "cannot switch the spawning thread's credentials")


@contextlib.contextmanager
def _thread_credentials(uid: int, gid: int) -> Iterator[None]:
    """The calling thread alone runs as ``uid``/``gid`` without supplementary groups.

    Its saved uid and gid stay what they were, so that it can switch back; a child it
    starts with ``vfork`` and ``exec`` gets the new ids as its saved ones too (``execve``
    copies the effective ids there). A credential change clears the thread's death signal
    and the process's dumpable flag, so both are put back.
    """
    assert _THREAD_CRED_SYSCALLS is not None
    setgroups, setresgid, setresuid = _THREAD_CRED_SYSCALLS
    ruid, euid, suid = os.getresuid()
    rgid, egid, sgid = os.getresgid()
    groups = os.getgroups()
    pdeathsig = ctypes.c_int(0)
    _prctl(PR_GET_PDEATHSIG, ctypes.byref(pdeathsig), 0, 0, 0)
    dumpable = _prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)
    keep = ctypes.c_long(-1)
    gid_array = (ctypes.c_uint * max(1, len(groups)))(*groups)
    # Undone in reverse order, and only what was done: the uid first, since setting the
    # gids and groups back needs it.
    undo: list[Callable[[], None]] = []
    try:
        _syscall(setgroups, ctypes.c_long(0), None)
        undo.append(lambda: _syscall(setgroups, ctypes.c_long(len(groups)), gid_array))
        _syscall(setresgid, ctypes.c_long(gid), ctypes.c_long(gid), keep)
        undo.append(lambda: _syscall(setresgid, *map(ctypes.c_long, (rgid, egid, sgid))))
        _syscall(setresuid, ctypes.c_long(uid), ctypes.c_long(uid), keep)
        undo.append(lambda: _syscall(setresuid, *map(ctypes.c_long, (ruid, euid, suid))))
        yield
    finally:
        for step in reversed(undo):
            step()
        if dumpable >= 0:
            _prctl(PR_SET_DUMPABLE, dumpable, 0, 0, 0)
        if pdeathsig.value:
            _prctl(PR_SET_PDEATHSIG, pdeathsig.value, 0, 0, 0)


_core_dumps_disabled = False


def _disable_own_core_dumps() -> None:
    global _core_dumps_disabled  # noqa: PLW0603 - once per process
    if not _core_dumps_disabled:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        _core_dumps_disabled = True


# How long the end of a cell waits for the sandbox's init to follow bubblewrap.
_INIT_GRACE = 0.5


@dataclass
class PumpResult:
    """What the supervision loop observed."""

    returncode: int
    timed_out: bool
    status: list[dict[str, object]] = field(default_factory=list)
    stderr_tail: bytes = b""
    duration: float = 0.0

    def status_value(self, key: str) -> object | None:
        for obj in self.status:
            if key in obj:
                return obj[key]
        return None


class _StatusParser:
    """bubblewrap's ``--json-status-fd`` stream: concatenated JSON objects."""

    def __init__(self) -> None:
        self._buf = ""
        self._decoder = json.JSONDecoder()
        self.objects: list[dict[str, object]] = []

    def feed(self, data: bytes) -> list[dict[str, object]]:
        self._buf += data.decode(errors="replace")
        new: list[dict[str, object]] = []
        while True:
            text = self._buf.lstrip()
            if not text:
                self._buf = ""
                return new
            try:
                obj, end = self._decoder.raw_decode(text)
            except json.JSONDecodeError:
                self._buf = text
                return new
            self._buf = text[end:]
            if isinstance(obj, dict):
                self.objects.append(obj)
                new.append(obj)


def pump(
    proc: subprocess.Popen[bytes],
    *,
    status_fd: int,
    stdout: Sink,
    stderr: Sink,
    timeout: float | None,
    on_status: Callable[[dict[str, object]], None],
    kill: Callable[[], None],
    started: float,
    terminal: int | None = None,
) -> PumpResult:
    """Stream the sandbox's output to the sinks until it is gone, enforcing the wall clock.

    With ``terminal`` (the master of the cell's pseudo-terminal) the output is read there
    instead of from pipes: both streams arrive as one, on ``stdout``.

    ``kill`` must kill every process of the cell; it is called on timeout, and if output
    pipes stay open long after bubblewrap exited (which would mean something outlived it).
    The sandbox's init, which bubblewrap reports as ``child-pid``, is expected as an orphan
    and reaped here once bubblewrap has exited (see :mod:`buildcell.cell.reaper`).
    """
    sel = selectors.DefaultSelector()
    tail = bytearray()
    handlers: dict[int, Callable[[bytes], None]] = {}
    parser = _StatusParser()
    init_pids: list[int] = []

    def on_status_data(data: bytes) -> None:
        for obj in parser.feed(data):
            pid = obj.get("child-pid")
            if isinstance(pid, int) and not isinstance(pid, bool) and not init_pids:
                init_pids.append(pid)
                reaper.expect_orphan(pid)
            on_status(obj)

    streams = _output_streams(proc, terminal, stdout, stderr, tail)
    for fd, handler in (*streams, (status_fd, on_status_data)):
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
        handlers[fd] = handler
    deadline = started + timeout if timeout is not None else None
    timed_out = False
    exited_at: float | None = None
    try:
        while handlers:
            now = time.monotonic()
            if deadline is not None and not timed_out and now >= deadline:
                timed_out = True
                kill()
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > 5.0:
                # bubblewrap is gone but a pipe is still open: make sure nothing survives.
                kill()
                break
            wait = 0.5
            if deadline is not None and not timed_out:
                wait = min(wait, max(0.0, deadline - now))
            if exited_at is not None:
                wait = min(wait, 0.05)
            for key, _ in sel.select(wait):
                fd = int(key.fd)
                data = _read_some(fd, terminal=fd == terminal)
                if data is None:
                    continue
                if data:
                    handlers[fd](data)
                else:
                    sel.unregister(fd)
                    del handlers[fd]
        returncode = proc.wait()
    finally:
        sel.close()
    # bubblewrap exits without waiting for its init, which dies right after (its parent-death
    # signal): reap it now rather than leave a zombie until the next sweep.
    reaper.settle(_INIT_GRACE, pids=init_pids)
    return PumpResult(
        returncode=returncode,
        timed_out=timed_out,
        status=parser.objects,
        stderr_tail=bytes(tail),
        duration=time.monotonic() - started,
    )


def _output_streams(
    proc: subprocess.Popen[bytes], terminal: int | None, stdout: Sink, stderr: Sink,
    tail: bytearray,
) -> list[tuple[int, Sink]]:  # fmt: skip
    """The descriptors the cell's output is read from, and their sinks; the last 4 KiB of
    what bubblewrap's stderr says (its own errors included) is kept in ``tail``."""

    def keeping_tail(sink: Sink) -> Sink:
        def write(data: bytes) -> None:
            tail.extend(data)
            del tail[:-4096]
            sink(data)

        return write

    if terminal is not None:
        return [(terminal, keeping_tail(stdout))]
    assert proc.stdout is not None
    assert proc.stderr is not None
    return [(proc.stdout.fileno(), stdout), (proc.stderr.fileno(), keeping_tail(stderr))]


def _read_some(fd: int, *, terminal: bool) -> bytes | None:
    """What ``fd`` has (``b""`` at its end), or ``None`` if nothing after all."""
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return None
    except OSError as e:
        # A pseudo-terminal's master reads EIO once no process holds the slave.
        if e.errno == errno.EIO and terminal:
            return b""
        raise


def fd_writer(fd: int) -> Sink:
    """A sink writing everything to ``fd``; a closed reader stops output, not the cell."""
    broken = False

    def write(data: bytes) -> None:
        nonlocal broken
        view = memoryview(data)
        while view and not broken:
            try:
                n = os.write(fd, view)
            except BlockingIOError:
                time.sleep(0.001)
                continue
            except BrokenPipeError:
                broken = True
                return
            view = view[n:]

    return write
