"""Find the command inside the cell's filesystem before the cell starts (exit 126/127).

The cell's view is the mount list; each bound path maps to a host path, so the lookup a
shell would do inside the cell can be done on the host, following symlinks as the cell
would see them. Paths on a fresh tmpfs are unknowable in advance and are left for the
kernel to judge.
"""

from __future__ import annotations

import os
import posixpath
import stat
from collections.abc import Sequence

from buildcell.cell.bwrap import Mount
from buildcell.errors import CommandNotExecutableError, CommandNotFoundError

__all__ = ["resolve_command"]

_MAX_SYMLINKS = 40


class _Unknown(Exception):
    """The path lies on a filesystem whose contents are not known in advance."""


def _host_path(mounts: Sequence[Mount], cell_path: str) -> tuple[str | None, Mount | None]:
    """Map a cell path to (host path, the mount providing it); the last mount wins."""
    best: Mount | None = None
    for m in mounts:
        if m.kind in ("remount-ro", "dir"):
            continue
        covers = cell_path == m.dest or cell_path.startswith(m.dest.rstrip("/") + "/")
        if covers and (best is None or len(m.dest) >= len(best.dest)):
            best = m
    if best is None:
        return None, None
    if best.kind in ("ro-bind", "bind", "dev-bind", "ro-bind-fd") and best.src is not None:
        # A descriptor bind is reached through the descriptor, never by a path of its tree.
        src = f"/proc/self/fd/{best.src}" if best.kind == "ro-bind-fd" else best.src
        rest = cell_path[len(best.dest) :].lstrip("/")
        return (posixpath.join(src, rest) if rest else src), best
    return None, best


def _lookup(mounts: Sequence[Mount], path: str) -> tuple[str, os.stat_result | None]:
    """Resolve ``path`` in the cell's view; return (cell path, host stat or ``None`` for a
    directory that bubblewrap creates).

    Raises:
        FileNotFoundError: it does not exist in the cell.
        _Unknown: it lies on a tmpfs or a kernel filesystem.
    """
    parts = [p for p in path.split("/") if p]
    resolved = "/"
    hops = 0
    while parts:
        name = parts.pop(0)
        if name in (".", ""):
            continue
        if name == "..":
            resolved = posixpath.dirname(resolved) or "/"
            continue
        candidate = posixpath.join(resolved, name)
        link = next(
            (m for m in reversed(mounts) if m.kind == "symlink" and m.dest == candidate), None
        )
        target: str | None = link.src if link is not None else None
        if target is None:
            host, mount = _host_path(mounts, candidate)
            if host is None:
                if mount is not None:
                    raise _Unknown(candidate)
                if not _implicit_dir(mounts, candidate):
                    raise FileNotFoundError(candidate)
                resolved = candidate
                continue
            st = os.lstat(host)
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(host)
        if target is not None:
            hops += 1
            if hops > _MAX_SYMLINKS:
                raise FileNotFoundError(candidate)
            base = "/" if target.startswith("/") else resolved
            parts = [p for p in target.split("/") if p] + parts
            resolved = base
            continue
        resolved = candidate
    host, mount = _host_path(mounts, resolved)
    if host is None:
        if resolved == "/" or _implicit_dir(mounts, resolved):
            return resolved, None
        if mount is not None:
            raise _Unknown(resolved)
        raise FileNotFoundError(resolved)
    return resolved, os.stat(host)


def _implicit_dir(mounts: Sequence[Mount], path: str) -> bool:
    """bubblewrap creates the parents of every mount point as directories."""
    prefix = path.rstrip("/") + "/"
    return any(m.dest.startswith(prefix) for m in mounts)


def _executable(st: os.stat_result | None, uid: int, gid: int) -> bool:
    if st is None or not stat.S_ISREG(st.st_mode):
        return False
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == gid:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def resolve_command(
    argv0: str, *, mounts: Sequence[Mount], path_env: str, cwd: str, host_uid: int, host_gid: int
) -> str:
    """Return the path the cell will execute for ``argv0``, as a shell's lookup would.

    A name without ``/`` is searched in ``path_env``; a path with ``/`` is taken relative
    to ``cwd``. The result is what to pass to bubblewrap (an absolute cell path, or
    ``argv0`` unchanged when its location cannot be judged in advance).

    Raises:
        CommandNotFoundError: nothing by that name exists in the cell (exit 127).
        CommandNotExecutableError: it exists but is a directory or lacks execute permission
            for the cell's user (exit 126).
    """
    if "/" in argv0:
        candidates = [posixpath.normpath(posixpath.join(cwd, argv0))]
    else:
        candidates = [posixpath.join(d or cwd, argv0) for d in path_env.split(":")]
    found_not_executable: str | None = None
    for candidate in candidates:
        try:
            _, st = _lookup(mounts, candidate)
        except _Unknown:
            return argv0 if "/" not in argv0 else candidate
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError:
            return argv0
        if _executable(st, host_uid, host_gid):
            return candidate
        found_not_executable = found_not_executable or candidate
    if found_not_executable is not None:
        raise CommandNotExecutableError(
            f"{argv0}: not executable in the cell ({found_not_executable} is "
            + ("a directory)" if _is_dir(mounts, found_not_executable) else "not executable)")
        )
    where = "in the cell's PATH " + path_env if "/" not in argv0 else "in the cell"
    raise CommandNotFoundError(
        f"{argv0}: command not found {where}",
        hint="the cell sees only /usr, /bin, /lib*, /workspace and a minimal /etc of the host",
    )


def _is_dir(mounts: Sequence[Mount], path: str) -> bool:
    try:
        st = _lookup(mounts, path)[1]
    except (OSError, _Unknown):
        return False
    return st is None or stat.S_ISDIR(st.st_mode)
