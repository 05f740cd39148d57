"""The cell's ``/etc`` on the host rootfs, prepared once and bound in one mount.

Bound entry by entry, the host's ``/etc`` parts and the synthesized files took some 25
mounts per cell, and bubblewrap re-reads its mount table for each one: half of what a
bare cell cost. Instead, one directory of the state holds a copy of what the cell gets
(:data:`~buildcell.cell.rootfs.HOST_ETC_ENTRIES` and the synthesized files), and every
cell binds it read-only at ``/etc``. A directory of more than :data:`BIND_ENTRIES`
entries (``/etc/alternatives`` and ``/etc/ssl/certs``: hundreds of symlinks each) is
bound from the host over an empty one of the copy instead, live: three mounts in all.

The copy stays the host's ``/etc`` as it is now: its manifest records an ``lstat`` of
every entry it depends on (each of the host entries, present or absent, and every
directory and regular file copied below them), and a cell uses the copy only when all
of them are unchanged. A symlink inside a directory cannot change without the
directory's mtime changing, so those are not listed: checking is some 40 ``lstat``
calls, not a walk. As with git's index, a copy made while an entry was changing (its
ctime in the last :data:`RACY_SECONDS`, or moved while it was copied) is never published;
the cell then gets the per-entry mounts. Each process checks a copy once against its
manifest, by content (a sha256 of every file copied), before it binds it.

Only what any user may read is copied: a file others cannot read is left out, a
directory others cannot search is an empty ``0700`` directory (``/etc/ssl/private``).
Modes are normalized (``0755`` for directories and executables, ``0644`` otherwise).

Layout below the state directory::

    etc/current        -> <name>         the copy cells use (a symlink, replaced atomically)
    etc/<name>/manifest                  JSON: what the copy was made from
    etc/<name>/etc/                      the tree bound at /etc
    etc/.new-*, etc/.gone-*              being made, being removed

A cell holds a shared ``flock`` on ``<name>/etc`` while it runs, its maker from before
the copy has its name; :func:`sweep` removes a copy only under an exclusive one, after
renaming it out of the way, so a running cell never loses its ``/etc``. Everything is
``fsync``ed before ``current`` names it.

Rootless the copy belongs to the invoking user, whom the cell runs as: the built-in
seccomp profile refuses file leases (which would stall other cells' opens), and a cell
without it does not use the copy.

What it costs: every cell sees the same inodes, so a cell may watch them (inotify) and
learn when a concurrent build reads ``/etc/passwd``, as it can for ``/usr`` already; the
files are identical in every cell and read-only.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from buildcell import _log
from buildcell._fs import Closing, sha256_file
from buildcell.cell.bwrap import Mount
from buildcell.cell.rootfs import HOST_ETC_ENTRIES, synthesized_etc
from buildcell.state import fsync_dir

__all__ = [
    "MAX_BYTES",
    "MAX_ENTRIES",
    "RACY_SECONDS",
    "EtcNotPrepared",
    "PreparedEtc",
    "prepared_etc",
    "sweep",
]

log = _log.get(__name__)
_FORMAT = 1
#: An entry changed this recently may change again within its timestamp's granularity.
RACY_SECONDS = 2.0
#: A host /etc larger than this is bound entry by entry instead.
MAX_ENTRIES = 10_000
MAX_BYTES = 32 << 20
#: ... or nested deeper than this.
MAX_DEPTH = 32
#: A directory with more entries than this is bound from the host instead of copied.
BIND_ENTRIES = 64
#: A ``.new-*`` directory untouched this long belongs to a preparation that died.
_STALE_NEW_SECONDS = 600.0
_LOCALTIME = "/usr/share/zoneinfo/UTC"
#: Every cell's uid reads the copy: its directories are open to all once filled.
_OPEN_DIR = 0o755

#: (mode, dev, ino, size, mtime_ns, ctime_ns); None for an entry that is absent; for a
#: directory bound from the host, (S_IFDIR,): it must stay a directory, whatever it holds.
_Sig = tuple[int, ...] | None
_Manifest = tuple[tuple[str, _Sig], ...]

#: Manifests read in this process, by copy name (they never change once published).
_manifests: dict[str, _Manifest] = {}


class EtcNotPrepared(Exception):
    """No prepared copy can serve this cell; ``str()`` says why (the cell then gets the
    per-entry mounts)."""


def _sig(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_mode, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass
class PreparedEtc(Closing):
    """A prepared copy, held (shared lock) until closed."""

    name: str
    path: Path
    #: directories bound from the host over the copy's empty ones (relative to /etc)
    binds: tuple[str, ...] = ()
    host_etc: Path = Path("/etc")
    _fd: int | None = field(default=None, repr=False)

    def mounts(self) -> list[Mount]:
        mounts = [Mount("ro-bind", "/etc", src=str(self.path))]
        for rel in self.binds:
            mounts.append(Mount("ro-bind", f"/etc/{rel}", src=str(self.host_etc / rel)))
        return mounts

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _unchanged(host_etc: str, manifest: _Manifest) -> bool:
    for rel, recorded in manifest:
        try:
            now: _Sig = _sig(os.lstat(f"{host_etc}/{rel}"))
        except FileNotFoundError:
            now = None
        except OSError:
            return False
        if recorded is not None and len(recorded) == 1:
            if now is None or stat.S_IFMT(now[0]) != recorded[0]:
                return False
        elif now != recorded:
            return False
    return True


def _reason(e: OSError | ValueError) -> str:
    if isinstance(e, OSError):
        return f"{e.filename}: {e.strerror}" if e.filename else str(e.strerror or e)
    return str(e)


def _read_manifest(copy: Path, files: Mapping[str, bytes]) -> _Manifest:
    """The manifest of the copy ``copy``, checked against the copy once per process.

    Raises:
        ValueError: the manifest is malformed, or the copy does not hold what it says.
        OSError: either cannot be read.
    """
    name = copy.name
    cached = _manifests.get(name)
    if cached is not None:
        return cached
    with open(copy / "manifest", "rb") as f:
        try:
            data = json.loads(f.read())
        except ValueError:
            raise ValueError("its manifest is not JSON") from None
    manifest, digests = _parse_manifest(data)
    _check_copy(copy / "etc", manifest, digests, files)
    _manifests[name] = manifest
    return manifest


def _parse_manifest(data: object) -> tuple[_Manifest, dict[str, str]]:
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise ValueError("a manifest of another format")
    entries, digests = data.get("entries"), data.get("digests")
    if not isinstance(entries, list) or not isinstance(digests, dict):
        raise ValueError("a malformed manifest")
    manifest: list[tuple[str, _Sig]] = []
    for entry in entries:
        match entry:
            case [str(rel), None]:
                manifest.append((rel, None))
            case [str(rel), [int(kind)]] if kind == stat.S_IFDIR:
                manifest.append((rel, (kind,)))
            case [str(rel), [int(), int(), int(), int(), int(), int()] as sig]:
                manifest.append((rel, tuple(sig)))
            case _:
                raise ValueError("a malformed manifest entry")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in digests.items()):
        raise ValueError("a malformed manifest")
    return tuple(manifest), digests


def _check_copy(
    tree: Path, manifest: _Manifest, digests: Mapping[str, str], files: Mapping[str, bytes]
) -> None:
    """Raise ValueError unless the copy still holds what its manifest says was copied, byte
    for byte (a crash before the data reached the disk, a damaged state directory), and
    every cell's uid may read it."""
    for where in (tree.parent, tree):
        if stat.S_IMODE(os.lstat(where).st_mode) != _OPEN_DIR:
            raise ValueError(f"{where.name} is not open to the cells' uids")
    for rel, sig in manifest:
        if sig is None:
            continue
        kind = stat.S_IFMT(sig[0])
        if not (kind in (stat.S_IFDIR, stat.S_IFLNK) or (kind == stat.S_IFREG and rel in digests)):
            continue  # never copied
        try:
            st = os.lstat(tree / rel)
        except OSError as e:
            raise ValueError(f"{rel} is missing") from e
        if stat.S_IFMT(st.st_mode) != kind:
            raise ValueError(f"{rel} is another kind of file")
    for rel, digest in digests.items():
        if sha256_file(tree / rel) != digest:
            raise ValueError(f"{rel} is not what was copied")
    for fname, data in files.items():
        with open(tree / fname, "rb") as f:
            if f.read(len(data) + 1) != data:
                raise ValueError(f"{fname} is not what was written")


def _readable(mode: int) -> bool:
    """Whether the copy holds this entry's content: any user may read it (and search it,
    for a directory)."""
    if stat.S_ISDIR(mode):
        return bool(mode & stat.S_IROTH and mode & stat.S_IXOTH)
    return not stat.S_ISREG(mode) or bool(mode & stat.S_IROTH)


def _hold(root: Path, name: str, host_etc: Path, files: Mapping[str, bytes]) -> PreparedEtc | None:
    """The copy ``name`` with a shared lock held, or None if it is gone or going."""
    path = root / name / "etc"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        # Held now: a sweep renames only under an exclusive lock, so the path is stable.
        if _identity(os.stat(path, follow_symlinks=False)) != _identity(os.fstat(fd)):
            raise OSError("replaced")
        manifest = _read_manifest(root / name, files)
    except (OSError, ValueError):
        os.close(fd)
        return None
    return _held(name, path, manifest, host_etc, fd)


def _held(name: str, path: Path, manifest: _Manifest, host_etc: Path, fd: int) -> PreparedEtc:
    binds = tuple(rel for rel, sig in manifest if sig == (stat.S_IFDIR,))
    return PreparedEtc(name, path, binds, host_etc, fd)


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def prepared_etc(
    root: Path,
    *,
    host_etc: Path = Path("/etc"),
    files: Mapping[str, bytes] | None = None,
    now: float | None = None,
    warn: Callable[[str], None] | None = None,
) -> PreparedEtc:
    """The copy of the host's ``/etc`` for a cell, made (or remade) if needed, and held.

    Args:
        root: the state directory's ``etc`` directory (created if missing).
        host_etc: the host's ``/etc``, replaceable in tests.
        files: the synthesized files (default :func:`synthesized_etc`).
        now: the current time, for the racy-entry rule (tests).
        warn: told (default: the log) when the current copy is damaged and made again.

    Raises:
        EtcNotPrepared: no copy can be used (state not writable, a full disk, an entry
            changing right now, a host ``/etc`` larger than the limits).
    """
    files = synthesized_etc() if files is None else files
    try:
        name: str | None = os.readlink(root / "current")
    except OSError:
        name = None
    if name is not None and "/" not in name and not name.startswith("."):
        try:
            manifest: _Manifest | None = _read_manifest(root / name, files)
        except (OSError, ValueError) as e:
            manifest = None
            (warn or log.warning)(
                f"the prepared /etc {root / name} is damaged ({_reason(e)}); made it again"
            )
        if manifest is not None and _unchanged(str(host_etc), manifest):
            held = _hold(root, name, host_etc, files)
            if held is not None:
                return held
    try:
        mode = 0o711 if os.geteuid() == 0 else 0o700
        root.mkdir(mode=mode, exist_ok=True)
        if stat.S_IMODE(os.lstat(root).st_mode) != mode:
            os.chmod(root, mode)  # whatever the umask made it: the cells' uids traverse it
        held = _make(root, host_etc, files, time.time() if now is None else now)
    except OSError as e:
        raise EtcNotPrepared(f"cannot prepare /etc in {root}: {e.strerror or e}") from e
    sweep(root)
    return held


class _Copier:
    """Copies the host entries into ``dest``, recording the manifest as it goes."""

    def __init__(self, host_etc: Path, dest: Path, since: float) -> None:
        self.host_etc = host_etc
        self.dest = dest
        self.since_ns = int(since * 1e9)
        self.entries: list[tuple[str, _Sig]] = []
        #: sha256 of every regular file copied, by path
        self.digests: dict[str, str] = {}
        self.count = 0
        self.bytes = 0
        self.racy: str | None = None

    def record(self, rel: str, st: os.stat_result | None) -> None:
        self.entries.append((rel, None if st is None else _sig(st)))
        # The ctime: an mtime can be set to any time, the ctime only moves with a change.
        if st is not None and st.st_ctime_ns >= self.since_ns:
            self.racy = rel

    def changed(self, rel: str, recorded: os.stat_result, now: os.stat_result) -> None:
        """What was copied was read after the look: another look, as racy if it moved."""
        if _sig(now) != _sig(recorded):
            self.racy = rel

    def charge(self, size: int) -> None:
        self.count += 1
        self.bytes += size
        if self.count > MAX_ENTRIES or self.bytes > MAX_BYTES:
            raise EtcNotPrepared(
                f"the host's /etc entries exceed {MAX_ENTRIES} entries or "
                f"{MAX_BYTES >> 20} MiB; they are bound one by one"
            )

    def top(self, name: str) -> None:
        try:
            st = os.lstat(self.host_etc / name)
        except FileNotFoundError:
            self.record(name, None)
            return
        self.entry(name, st)

    def entry(self, rel: str, st: os.stat_result) -> None:
        if rel.count("/") >= MAX_DEPTH:
            raise EtcNotPrepared(f"host /etc/{rel} is nested deeper than {MAX_DEPTH} levels")
        src, dst = self.host_etc / rel, self.dest / rel
        mode = st.st_mode
        if stat.S_ISLNK(mode):
            if "/" not in rel:
                self.record(rel, st)  # below, the directory's mtime shows a change
            self.charge(0)
            os.symlink(os.readlink(src), dst)
        elif stat.S_ISREG(mode):
            self.record(rel, st)
            if _readable(mode):
                self.charge(st.st_size)
                self.copy_file(rel, st, 0o755 if mode & 0o111 else 0o644)
        elif stat.S_ISDIR(mode):
            self.charge(0)
            os.mkdir(dst, 0o700)
            children: list[tuple[str, os.stat_result]] = []
            if _readable(mode):
                with os.scandir(src) as it:
                    children = sorted((e.name, e.stat(follow_symlinks=False)) for e in it)
                self.changed(rel, st, os.lstat(src))
            if len(children) > BIND_ENTRIES:
                # Hundreds of symlinks (/etc/alternatives, /etc/ssl/certs): bound live.
                self.entries.append((rel, (stat.S_IFDIR,)))
                os.chmod(dst, _OPEN_DIR)
                return
            self.record(rel, st)
            for child, child_st in children:
                self.entry(f"{rel}/{child}", child_st)
            if _readable(mode):
                os.chmod(dst, _OPEN_DIR)
            fsync_dir(dst)
        else:
            self.record(rel, st)  # fifos, sockets, devices: never part of a cell's /etc

    def copy_file(self, rel: str, st: os.stat_result, mode: int) -> None:
        src, dst = self.host_etc / rel, self.dest / rel
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                self.racy = rel  # swapped since the look (a fifo, a device): never read
                return
            digest = hashlib.sha256()
            with open(dst, "xb") as out:
                while chunk := os.read(fd, 1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fchmod(out.fileno(), mode)
                os.fsync(out.fileno())
            # Made private, or changed, since the look: this copy is never published.
            self.changed(rel, st, os.fstat(fd))
            self.digests[rel] = digest.hexdigest()
        finally:
            os.close(fd)


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fchmod(f.fileno(), mode)
        os.fsync(f.fileno())


def _make(root: Path, host_etc: Path, files: Mapping[str, bytes], now: float) -> PreparedEtc:
    """Make a copy in a new directory and publish it, held (unless racy)."""
    new = root / f".new-{os.urandom(8).hex()}"
    tree = new / "etc"
    fd: int | None = None
    try:
        os.mkdir(new, 0o700)
        os.mkdir(tree, 0o700)
        copier = _Copier(host_etc, tree, now - RACY_SECONDS)
        for name in HOST_ETC_ENTRIES:
            copier.top(name)
        for name, data in sorted(files.items()):
            _write(tree / name, data)
        os.symlink(_LOCALTIME, tree / "localtime")
        os.chmod(tree, _OPEN_DIR)  # explicitly: a umask must not close it to the cells
        os.chmod(new, _OPEN_DIR)
        fsync_dir(tree)
        manifest = {"format": _FORMAT, "entries": copier.entries, "digests": copier.digests}
        body = json.dumps(manifest, separators=(",", ":")).encode()
        digest = hashlib.sha256(body)
        for fname, data in sorted(files.items()):
            digest.update(b"\0" + fname.encode() + b"\0" + hashlib.sha256(data).digest())
        name = digest.hexdigest()[:24]
        _write(new / "manifest", body)
        fsync_dir(new)
        if copier.racy is not None:
            raise EtcNotPrepared(
                f"host /etc/{copier.racy} changed in the last {RACY_SECONDS:g} s; "
                "this cell binds the entries one by one"
            )
        # Held before it is published: a sweep never takes a copy no cell holds yet.
        fd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            os.rename(new, root / name)
        except OSError:
            if not (root / name).exists():
                raise
            if _intact(root / name, files):
                # The same copy, made by another supervisor at the same time: that one.
                os.close(fd)
                fd = None
                _remove(new)
                held = _hold(root, name, host_etc, files)
                if held is None:
                    raise EtcNotPrepared(f"the prepared /etc {root / name} is going") from None
                _publish(root, name)
                return held
            if not _retire(root, name):
                raise EtcNotPrepared(
                    f"the prepared /etc {root / name} is damaged and in use"
                ) from None
            os.rename(new, root / name)  # it was damaged: this one replaces it
        _publish(root, name)
        parsed, _ = _parse_manifest(manifest)
        _manifests[name] = parsed
        held = _held(name, root / name / "etc", parsed, host_etc, fd)
        fd = None
        return held
    except BaseException:
        if fd is not None:
            os.close(fd)
        _remove(new)
        raise


def _publish(root: Path, name: str) -> None:
    """Point ``current`` at ``name``, atomically; a ``current`` that is not a symlink (a
    damaged state) is replaced."""
    link = root / f".new-{os.urandom(8).hex()}"
    os.symlink(name, link)
    try:
        current = root / "current"
        if current.exists() and not current.is_symlink():
            _remove(current)
        os.rename(link, current)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(link)
        raise
    fsync_dir(root)


def _remove(path: Path) -> None:
    from buildcell.errors import SandboxError
    from buildcell.trees import remove_tree

    with contextlib.suppress(OSError, SandboxError):
        remove_tree(path)


def _intact(copy: Path, files: Mapping[str, bytes]) -> bool:
    try:
        _read_manifest(copy, files)
    except (OSError, ValueError):
        return False
    return True


def _retire(root: Path, name: str) -> bool:
    """Rename the copy ``name`` out of the way and remove it, if no cell holds it."""
    path = root / name
    try:
        fd = os.open(path / "etc", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        fd = None  # not even its tree: nothing can hold it
    except OSError:
        return False
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        gone = path
        if not name.startswith(".gone-"):
            gone = root / f".gone-{name}-{os.urandom(4).hex()}"
            os.rename(path, gone)
        _remove(gone)
        return True
    except OSError:
        return False
    finally:
        if fd is not None:
            os.close(fd)


def sweep(root: Path, *, now: float | None = None) -> int:
    """Remove the copies no cell holds, other than the current one; return how many.

    A copy is renamed away under an exclusive lock before it is removed, so no cell can
    start using it meanwhile; a preparation that died is removed after a grace period.
    """
    now = time.time() if now is None else now
    try:
        names = os.listdir(root)
    except OSError:
        return 0
    try:
        current: str | None = os.readlink(root / "current")
    except OSError:
        current = None
    removed = 0
    for name in names:
        if name in ("current", current):
            continue
        path = root / name
        if name.startswith(".new-"):
            with contextlib.suppress(OSError):
                if now - os.lstat(path).st_mtime > _STALE_NEW_SECONDS:
                    _remove(path)
                    removed += 1
            continue
        if _retire(root, name):
            removed += 1
    return removed
