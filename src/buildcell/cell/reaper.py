"""Reaping the cell processes that outlive their parent, without stealing anyone's status.

bubblewrap's outer process exits as soon as the sandbox's init reports the command's exit
status, without waiting for that init to exit (``monitor_child`` returns on the event fd).
The init, orphaned, is reparented to the nearest child subreaper, else to PID 1 of the pid
namespace. Under a CI agent that is PID 1 and never reaps (Buildbot workers, Slurm steps and
runners in containers often are), every cell would leave a defunct ``bwrap`` behind.

So the supervisor makes itself a child subreaper (:func:`become_subreaper`) before the first
sandbox starts, and reaps what it adopts. A blanket ``waitpid(-1)`` would also collect its
own children that a :class:`subprocess.Popen` is about to wait for, and that Popen would then
report exit status 0 whatever the child did. Reaping is therefore selective:

- a grandchild the supervisor knows may be orphaned (bubblewrap reports the sandbox init as
  ``child-pid``) is recorded with :func:`expect_orphan` as a pidfd, and reaped through it:
  ``waitid(P_PIDFD)`` names that very process, so no pid reuse can redirect it;
- any other zombie child (from ``/proc/self/task/*/children`` and ``/proc/PID/stat``) is
  reaped only if no live Popen waits for it: not in ``known``, not a Popen started through
  :mod:`buildcell.cell._spawn` (:func:`tracking`), and not a Popen anywhere else in the
  process (looked up only when such a zombie exists, which is rare).

Races, and why they are harmless: a zombie stays a zombie (and keeps its pid) until its
parent reaps it, and only this process can; every waiter inside this process is a Popen,
and those are excluded, so between listing a zombie and reaping it nobody else can take it.
A Popen started through the choke point registers under the same lock the sweep holds, so
a child that fails at once cannot be swept before it is registered. A Popen started
elsewhere is found through its ``pid`` attribute, which it sets right after the fork.
Processes forked with ``os.fork`` and waited for with ``os.waitpid`` are invisible to this
module: a host program that does that must pass those pids as ``known``.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import gc
import os
import select
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Collection, Iterator
from typing import Any, Final

from buildcell import _log

__all__ = [
    "become_subreaper",
    "expect_orphan",
    "is_subreaper",
    "reap_orphans",
    "reap_pidfd",
    "settle",
    "tracking",
]

log = _log.get(__name__)

PR_SET_CHILD_SUBREAPER: Final = 36
PR_GET_CHILD_SUBREAPER: Final = 37
# How long the exit hook waits for adopted processes that are still dying.
_EXIT_GRACE: Final = 2.0

_lock = threading.RLock()
# The process that became a subreaper; a forked child is none (the attribute is not
# inherited), even though it inherits this module's state.
_subreaper_pid: int | None = None
# Popens started through the choke point; the sweep leaves their pids to them.
_tracked: weakref.WeakSet[subprocess.Popen[Any]] = weakref.WeakSet()
# pid -> pidfd of grandchildren that may be reparented here.
_expected: dict[int, int] = {}


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (``PR_SET_CHILD_SUBREAPER``).

    Idempotent and cheap after the first call. Also registers an exit hook that waits
    briefly for adopted processes still dying and reaps them, so that none is handed, as a
    zombie, to a PID 1 that does not reap. The attribute is not inherited by children.

    Returns:
        Whether this process is a child subreaper now (False where the kernel refuses).
    """
    global _subreaper_pid  # noqa: PLW0603 - one process-wide attribute, set once
    with _lock:
        if _subreaper_pid == os.getpid():
            return True
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            log.debug("cannot become a child subreaper: %s", os.strerror(err))
            return False
        if _subreaper_pid is None:
            atexit.register(_at_exit)
        _subreaper_pid = os.getpid()
        return True


def is_subreaper() -> bool:
    """Whether the kernel has this process as a child subreaper (for checks and tests)."""
    libc = ctypes.CDLL(None, use_errno=True)
    flag = ctypes.c_int(0)
    if libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0) != 0:
        return False
    return bool(flag.value)


@contextlib.contextmanager
def tracking() -> Iterator[Callable[[subprocess.Popen[Any]], None]]:
    """Hold off sweeps while a process is started; register its Popen with the callback.

    The choke point starts every sandbox inside this block, so that a child failing at once
    cannot be reaped by a concurrent sweep before its Popen is known.
    """
    with _lock:
        yield _tracked.add


def expect_orphan(pid: int) -> None:
    """Note a grandchild (a sandbox's init) that is reparented here if its parent exits first.

    It is held by a pidfd and reaped through it by :func:`reap_orphans` once it is this
    process's zombie. Nothing is done when this process is no subreaper (the orphan then goes
    to PID 1) or the process is already gone.
    """
    if _subreaper_pid != os.getpid():
        return
    with _lock:
        # bubblewrap reports the pid while the init runs; pids are handed out in order, so
        # it cannot have been reused by now, and least of all by a Popen of ours.
        if pid in _expected or any(proc.pid == pid for proc in list(_tracked)):
            return
        with contextlib.suppress(OSError):
            _expected[pid] = os.pidfd_open(pid)


def reap_pidfd(pidfd: int) -> bool:
    """Reap the process behind ``pidfd`` if it is this process's zombie child.

    For the supervisor's own pidfd of a sandbox's init: after bubblewrap exits first, the
    init is reparented here, and only this call (or a sweep) frees it.

    Returns:
        Whether it was reaped here.
    """
    with _lock:
        try:
            return os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG) is not None
        except ChildProcessError:
            return False  # not (or no longer) our child: its parent reaps it
        except OSError as e:
            log.debug("cannot wait for pidfd %d: %s", pidfd, e)
            return False


def reap_orphans(known: Collection[int] = ()) -> int:
    """Reap zombie children that nothing else in this process will wait for.

    Expected orphans are reaped through their pidfds; other zombie children only when no
    live Popen (started anywhere in the process) and nothing in ``known`` claims them.

    Args:
        known: pids of children the caller waits for itself (with ``os.waitpid``).

    Returns:
        How many processes were reaped.
    """
    with _lock:
        reaped = _reap_expected()
        claimed = set(known) | set(_expected)
        claimed.update(proc.pid for proc in list(_tracked) if proc.returncode is None)
        zombies = [pid for pid in _zombie_children() if pid not in claimed]
        if zombies:
            # Rare: only now is it worth looking through every object for a Popen.
            claimed = _popen_pids()
        for pid in zombies:
            if pid in claimed:
                continue
            try:
                if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG) is not None:
                    reaped += 1
                    log.debug("reaped orphaned process %d", pid)
            except ChildProcessError:
                pass
        return reaped


def settle(timeout: float, pids: Collection[int] | None = None) -> int:
    """Reap what is reapable, then wait up to ``timeout`` seconds for expected orphans.

    For the end of a cell (``pids``: its init) or of the process (every expected orphan):
    an adopted init that is still dying, its pid namespace being torn down, is waited for,
    so that it is not left, or handed on, as a zombie.

    Returns:
        How many processes were reaped.
    """
    deadline = time.monotonic() + timeout
    reaped = reap_orphans()
    while True:
        with _lock:
            fds = [fd for pid, fd in _expected.items() if pids is None or pid in pids]
        remaining = deadline - time.monotonic()
        if not fds or remaining <= 0:
            return reaped
        # A pidfd turns readable when its process exits.
        with contextlib.suppress(OSError, ValueError):
            select.select(fds, [], [], min(remaining, 0.05))
        reaped += reap_orphans()


def _at_exit() -> None:
    if _subreaper_pid == os.getpid():  # not in a forked child that inherited the hook
        settle(_EXIT_GRACE)


def _reap_expected() -> int:
    reaped = 0
    for pid, fd in list(_expected.items()):
        done = False
        try:
            if os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG) is not None:
                reaped += 1
                done = True
        except ChildProcessError:
            # Not our child: still the outer bwrap's, or already reaped by it. Once it is
            # gone from the process table, nothing is left to expect.
            try:
                signal.pidfd_send_signal(fd, 0)
            except ProcessLookupError:
                done = True
            except OSError:
                pass
        if done:
            os.close(fd)
            del _expected[pid]
    return reaped


def _zombie_children() -> list[int]:
    me = os.getpid()
    children: set[int] = set()
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return []
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/children", "rb") as f:
                children.update(int(pid) for pid in f.read().split())
        except FileNotFoundError:
            continue  # the thread exited meanwhile
        except OSError:
            return _zombie_children_by_scan(me)
    return [pid for pid in sorted(children) if _zombie_of(pid, me)]


def _zombie_children_by_scan(me: int) -> list[int]:
    # Kernels without CONFIG_PROC_CHILDREN: every process's stat names its parent.
    pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    return [pid for pid in pids if _zombie_of(pid, me)]


def _zombie_of(pid: int, parent: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    # The command name is in parentheses and may itself contain spaces and parentheses.
    fields = stat[stat.rfind(b")") + 2 :].split()
    return len(fields) > 1 and fields[0] == b"Z" and int(fields[1]) == parent


def _popen_pids() -> set[int]:
    """Pids of every live Popen anywhere in the process: theirs to reap, not ours."""
    pids: set[int] = set()
    kinds: tuple[type, ...] = (subprocess.Popen,)
    popen_fork = sys.modules.get("multiprocessing.popen_fork")
    if popen_fork is not None:
        kinds += (popen_fork.Popen,)
    for obj in gc.get_objects():
        if isinstance(obj, kinds) and getattr(obj, "returncode", 0) is None:
            pid = getattr(obj, "pid", None)
            if isinstance(pid, int):
                pids.add(pid)
    return pids
