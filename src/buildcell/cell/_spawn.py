"""The one place that starts processes for a cell, and the loop that supervises them.

Between fork and exec (``preexec``) the child joins the cell's cgroups, lowers rlimits,
enters prepared namespaces, drops to the cell's host uid, and asks to be SIGKILLed if the
supervisor thread that started it goes away. Everything it touches was prepared by the
parent (open file descriptors, resolved libc functions): the child only makes syscalls.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import selectors
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

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
    cgroup_procs_fds: tuple[int, ...] = ()
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


def _preexec_for(plan: SpawnPlan, parent: int) -> Callable[[], None]:
    cgroup_fds = plan.cgroup_procs_fds
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

    Raises:
        OSError: the program could not be started (callers translate it).
    """
    pipe = subprocess.PIPE if plan.capture else subprocess.DEVNULL
    return subprocess.Popen(
        list(plan.argv),
        stdin=plan.stdin if plan.stdin is not None else subprocess.DEVNULL,
        stdout=pipe,
        stderr=pipe,
        pass_fds=plan.pass_fds,
        close_fds=True,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"},
        # The child runs only pre-bound syscalls (no imports, no locks): see the module doc.
        preexec_fn=_preexec_for(plan, os.getpid()),  # noqa: PLW1509
        process_group=0,
    )


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
) -> PumpResult:
    """Stream the sandbox's output to the sinks until it is gone, enforcing the wall clock.

    ``kill`` must kill every process of the cell; it is called on timeout, and if output
    pipes stay open long after bubblewrap exited (which would mean something outlived it).
    """
    sel = selectors.DefaultSelector()
    tail = bytearray()
    handlers: dict[int, Callable[[bytes], None]] = {}
    parser = _StatusParser()

    def on_err(data: bytes) -> None:
        tail.extend(data)
        del tail[:-4096]
        stderr(data)

    def on_status_data(data: bytes) -> None:
        for obj in parser.feed(data):
            on_status(obj)

    assert proc.stdout is not None
    assert proc.stderr is not None
    for fd, handler in (
        (proc.stdout.fileno(), stdout),
        (proc.stderr.fileno(), on_err),
        (status_fd, on_status_data),
    ):
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
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if data:
                    handlers[fd](data)
                else:
                    sel.unregister(fd)
                    del handlers[fd]
        returncode = proc.wait()
    finally:
        sel.close()
    return PumpResult(
        returncode=returncode,
        timed_out=timed_out,
        status=parser.objects,
        stderr_tail=bytes(tail),
        duration=time.monotonic() - started,
    )


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
