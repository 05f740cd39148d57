"""CellConfig-derived sandbox plan -> bubblewrap argv. Pure: nothing here touches the OS."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Mount", "SandboxPlan", "bwrap_argv", "split_options"]

MountKind = Literal[
    "ro-bind",
    "bind",
    "dev-bind",
    "tmpfs",
    "proc",
    "dev",
    "symlink",
    "dir",
    "remount-ro",
    "ro-bind-data",
    "ro-bind-fd",
]


@dataclass(frozen=True)
class Mount:
    """One step of building the cell's filesystem, in order.

    ``src`` is a host path for binds, the link target for symlinks, a file descriptor
    number for ``ro-bind-data`` (whose content becomes a read-only file in the sandbox's
    own memory) and ``ro-bind-fd`` (an ``O_PATH`` descriptor opened confined: bubblewrap
    binds that very object, resolving no path), unused otherwise. ``size`` applies to
    tmpfs, ``mode`` to tmpfs, dir and ro-bind-data.
    """

    kind: MountKind
    dest: str
    src: str | None = None
    size: int | None = None
    mode: int | None = None


@dataclass(frozen=True)
class SandboxPlan:
    """Everything bubblewrap needs to know, as data."""

    mounts: tuple[Mount, ...]
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    cwd: str
    hostname: str
    uid: int
    gid: int
    seccomp_fd: int | None = None
    status_fd: int | None = None
    share_net: bool = False
    extra: tuple[str, ...] = field(default=())


def _mount_args(m: Mount) -> list[str]:
    args: list[str] = []
    if m.mode is not None and m.kind in ("tmpfs", "dir", "ro-bind-data"):
        args += ["--perms", f"{m.mode:04o}"]
    if m.size is not None and m.kind == "tmpfs":
        args += ["--size", str(m.size)]
    match m.kind:
        case "ro-bind" | "bind" | "dev-bind" | "symlink" | "ro-bind-data" | "ro-bind-fd":
            assert m.src is not None, m
            args += [f"--{m.kind}", m.src, m.dest]
        case "tmpfs" | "proc" | "dev" | "dir" | "remount-ro":
            args += [f"--{m.kind}", m.dest]
    return args


def bwrap_argv(plan: SandboxPlan, bwrap: str = "bwrap") -> list[str]:
    """The bubblewrap command line for ``plan``.

    Namespaces: every kind bubblewrap supports is unshared (user explicitly, so that a
    supervisor running as uid 0 inside a user namespace still gets a fresh one), unless the
    plan shares the network namespace prepared for it. The sandboxed process runs in a new
    session (it cannot reach the caller's terminal: TIOCSTI; a tty cell's own session,
    inside the sandbox, takes its pseudo-terminal), without capabilities,
    with no_new_privs (always set by bubblewrap) and dies with bubblewrap; further user
    namespaces are disabled inside.
    """
    argv = [bwrap, "--unshare-all", "--unshare-user"]
    if plan.share_net:
        argv.append("--share-net")
    argv += [
        "--disable-userns",
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
        "--uid",
        str(plan.uid),
        "--gid",
        str(plan.gid),
        "--hostname",
        plan.hostname,
    ]
    for m in plan.mounts:
        argv += _mount_args(m)
    argv += ["--chdir", plan.cwd, "--clearenv"]
    for key, value in plan.env:
        argv += ["--setenv", key, value]
    if plan.status_fd is not None:
        argv += ["--json-status-fd", str(plan.status_fd)]
    if plan.seccomp_fd is not None:
        argv += ["--seccomp", str(plan.seccomp_fd)]
    argv += list(plan.extra)
    argv.append("--")
    argv += plan.argv
    return argv


def split_options(argv: list[str]) -> tuple[bytes, list[str]]:
    """Split a bubblewrap command line into its options, as the NUL-separated contents of
    an ``--args`` file, and the rest (``--`` and the command).

    Passed that way, the options (host paths, descriptors, the environment) never appear in
    bubblewrap's argv, which every local user and the cell itself (``/proc/1/cmdline``) can
    read.
    """
    split = argv.index("--")
    options = b"".join(os.fsencode(a) + b"\0" for a in argv[1:split])
    return options, argv[split:]
