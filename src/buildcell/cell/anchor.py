"""The storage anchor: a size-capped tmpfs that outlives each cell of a build.

A disk budget needs a filesystem that refuses writes past a size, which unprivileged
processes can only get as a tmpfs mounted inside a mount namespace of their own. The
anchor is a tiny bubblewrap sandbox whose only job is to own that mount namespace (and,
rootless, its user namespace): it mounts the tmpfs over an empty directory of the cell,
then sleeps. Each cell's bubblewrap starts inside the anchor's namespaces (``setns`` before
``exec``) and binds the workspace, /tmp and home from the tmpfs; the supervisor reaches
the same files through ``/proc/<anchor>/root``. When the anchor dies (stopped, or killed
with the supervisor by its death signal) the kernel frees the tmpfs: nothing is left on
the host's disk.

A copy-on-write workspace (see ``overlay``) is mounted in the same namespace: with a disk
budget on that tmpfs, without one on an anchor whose tmpfs (1 MiB) holds only its mount
points.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from pathlib import Path

from buildcell._fs import Closing
from buildcell.cell import _spawn, reaper
from buildcell.cell.bwrap import split_options
from buildcell.errors import SandboxError

__all__ = ["StorageAnchor"]


class StorageAnchor(Closing):
    """Owns a tmpfs of ``size`` bytes mounted (in its own namespace) at ``mountpoint``.

    Raises:
        SandboxError: the anchor could not be started.
    """

    def __init__(self, *, bwrap: str, mountpoint: Path, size: int):
        self.mountpoint = mountpoint
        self.pid: int | None = None
        self._ns_fds: list[tuple[int, int]] = []
        self._proc: subprocess.Popen[bytes] | None = None
        rootless = os.geteuid() != 0
        argv = [bwrap]
        if rootless:
            argv += ["--unshare-user", "--uid", "0", "--gid", "0"]
        r, w = os.pipe2(os.O_CLOEXEC)
        argv += [
            "--die-with-parent",
            "--cap-drop",
            "ALL",
            "--dev-bind",
            "/",
            "/",
            "--perms",
            "0711",
            "--size",
            str(size),
            "--tmpfs",
            str(mountpoint),
            "--json-status-fd",
            str(w),
            "--",
            "sleep",
            "infinity",
        ]
        # The options (the cell's directory among them) go through --args, out of sight.
        options, tail = split_options(argv)
        args_fd = os.memfd_create("buildcell-anchor-args", os.MFD_CLOEXEC)
        try:
            os.write(args_fd, options)
            os.lseek(args_fd, 0, os.SEEK_SET)
            self._proc = _spawn.spawn(
                _spawn.SpawnPlan(
                    argv=[bwrap, "--args", str(args_fd), *tail],
                    pass_fds=(w, args_fd),
                    capture=True,
                    self_guarded=True,
                )
            )
        except OSError as e:
            os.close(r)
            os.close(w)
            raise SandboxError(f"cannot start the storage anchor: {e.strerror}") from e
        finally:
            os.close(args_fd)
        os.close(w)
        try:
            self.pid = self._read_child_pid(r)
            reaper.expect_orphan(self.pid)
            ns = ["mnt"] if not rootless else ["user", "mnt"]
            for name in ns:
                fd = os.open(f"/proc/{self.pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC)
                kind = _spawn.CLONE_NEWUSER if name == "user" else _spawn.CLONE_NEWNS
                self._ns_fds.append((fd, kind))
            self._wait_mounted()
        except BaseException:
            self.close()
            raise
        finally:
            os.close(r)

    def _read_child_pid(self, r: int) -> int:
        data = b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            ready, _, _ = select.select([r], [], [], 0.1)
            if ready:
                chunk = os.read(r, 4096)
                if not chunk:
                    break
                data += chunk
                parser = _spawn._StatusParser()
                for obj in parser.feed(data):
                    pid = obj.get("child-pid")
                    if isinstance(pid, int):
                        return pid
            assert self._proc is not None
            if self._proc.poll() is not None:
                break
        err = b""
        proc = self._proc
        if proc is not None and proc.stderr is not None and proc.poll() is not None:
            err = proc.stderr.read()
        raise SandboxError(
            "cannot start the storage anchor for --disk: "
            + (err.decode(errors="replace").strip() or "bubblewrap did not report its child")
        )

    def _wait_mounted(self) -> None:
        # The tmpfs is mounted before bubblewrap execs ``sleep``; wait for that exec. The
        # mount alone is not enough: until bubblewrap's last pivot_root, a process entering
        # the namespace would find a root other than the host's (a cell's paths missing).
        target = self.path(self.mountpoint)
        comm = f"/proc/{self.pid}/comm"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with open(comm) as f:
                    execed = f.read().strip() == "sleep"
                if execed and os.stat(target).st_dev != os.stat(self.mountpoint).st_dev:
                    return
            except OSError:
                pass
            time.sleep(0.001)
        raise SandboxError("the storage anchor did not mount its tmpfs in time")

    def path(self, host_path: Path) -> Path:
        """Where the supervisor reaches ``host_path`` as the anchor's namespace sees it."""
        return Path(f"/proc/{self.pid}/root") / host_path.relative_to("/")

    @property
    def setns_fds(self) -> tuple[tuple[int, int], ...]:
        """Namespaces a cell enters before bubblewrap: user (rootless), then mount."""
        return tuple(self._ns_fds)

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def close(self) -> None:
        """Kill the anchor, freeing its tmpfs. Idempotent."""
        for fd, _ in self._ns_fds:
            os.close(fd)
        self._ns_fds = []
        if self._proc is not None:
            if self._proc.poll() is None:
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
            for stream in (self._proc.stdout, self._proc.stderr):
                if stream is not None:
                    stream.close()
            self._proc = None
            reaper.settle(1.0, pids=[self.pid] if self.pid else [])
