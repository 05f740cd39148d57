"""Build caches: writable directories kept between builds of a project, per trust level.

A step's ``caches:`` entry (``{path: /home/builder/.cache/pip, key: pip}``) names a cache
by ``(project, key, trust)``. What a cache must never do is carry an attacker's files into
a build that trusts them, so:

* a trusted build reads and writes only the trusted cache of its project and key;
* an untrusted build starts from a private copy of the trusted cache when there is one,
  else of its own *scope*'s untrusted cache, else from nothing, and saves only into its
  scope; nothing an untrusted build does reaches the trusted cache or another scope;
* an untrusted build's scope is its ref (``--ref refs/pull/1/merge``): one pull request's
  builds share a cache, and never see another pull request's (as GitHub Actions scopes
  caches by ref). Without a ref the scope is the build itself: its steps share the cache,
  and it is removed when the build ends;
* a project's caches live below its validated name, so no project reaches another's.

Layout, below the store's root (``StateDir.caches``)::

    <project>/trusted/<key>/...           the trusted cache
    <project>/untrusted/<scope>/<key>/... an untrusted scope's: ref-<digest of the ref>, or
                                          build-<build id>; ``<scope>/ref`` holds the ref
    <key>/lock          flock: shared to begin a lease, exclusive to swap
    <key>/used          mtime: when a generation was last published or copied
    <key>/current       symlink to the published generation, gen-<id>
    <key>/gen-<id>/     generations; never written once published
    <key>/work-<id>/    a build's private copy, flocked while it lives

Every build works on its own copy, made while holding a shared flock on a generation
directory. Publishing renames the copy to a generation and swaps ``current`` (a rename, so
atomic) under the key's exclusive lock; the last successful writer wins. Superseded
generations are deleted only once nobody holds their flock; otherwise the next commit or
``buildcell gc`` (:func:`expire_caches`) deletes them.

Every walk is by directory file descriptor and never follows a symlink: a cache is written
by the build, so it is as hostile as the build.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import secrets
import stat
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from buildcell import _log
from buildcell._fs import Closing
from buildcell._text import show
from buildcell.errors import ConfigError, SandboxError, StateError
from buildcell.state import NO_SPACE, write_failure
from buildcell.trees import copy_tree, remove_tree

__all__ = [
    "DEFAULT_MAX_BYTES",
    "CacheLease",
    "CacheScope",
    "CacheSource",
    "CacheStore",
    "CommitResult",
    "Trust",
    "cache_scope",
    "expire_caches",
]

logger = _log.get(__name__)

#: Largest cache that is saved: 2 GiB.
DEFAULT_MAX_BYTES = 2 << 30

Trust = Literal["trusted", "untrusted"]
#: What a lease's work copy started from.
CacheSource = Literal["trusted", "untrusted", "empty"]

# Same grammar as the spec's cache keys; it also rules out "", "." and "..".
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_ID = r"(?P<time>[0-9]{10,})-[0-9a-f]{16}"
_GEN = re.compile(f"gen-{_ID}")
_WORK = re.compile(f"work-{_ID}")
_LINK_TMP = re.compile(rf"\.current-{_ID}")
_SCOPE = re.compile(r"(ref-[0-9a-f]{32}|build-[0-9a-z-]{1,58})")
_LOCK = "lock"
_USED = "used"
_CURRENT = "current"
#: Counted per directory entry besides file content, so that a cache of a million empty
#: files is not free.
_ENTRY_OVERHEAD = 256
#: copy_tree holds two descriptors per level; deeper caches are not saved.
_MAX_DEPTH = 256
#: A work copy whose flock is free is left alone this long all the same (a lease creates
#: and locks its copy under the key's lock, so this is only a second line of defence).
_STALE_WORK_SECONDS = 3600.0
#: How often to retry when gc removes a key directory under our feet.
_ATTEMPTS = 100
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _show(value: object) -> str:
    return show(str(value), None)


def _check_name(what: str, value: object) -> str:
    if not isinstance(value, str) or _NAME.fullmatch(value) is None:
        raise ConfigError(
            f"invalid {what} {_show(value)}: expected lowercase letters, digits, '.', '_' "
            "or '-' (at most 64), starting with a letter or digit"
        )
    return value


def _check_trust(value: object) -> Trust:
    if value == "trusted":
        return "trusted"
    if value == "untrusted":
        return "untrusted"
    raise ConfigError(
        f"invalid cache trust level {_show(value)}: expected 'trusted' or 'untrusted'"
    )


@dataclass(frozen=True)
class CacheScope:
    """Whose caches a build reads and writes.

    Attributes:
        trust: the trust level.
        name: ``trusted``, or an untrusted scope's directory (``ref-...``, ``build-...``).
        ref: the ref an untrusted scope belongs to, if any.
        ephemeral: the scope lives for one build only (an untrusted build without a ref).
    """

    trust: Trust
    name: str
    ref: str | None = None
    ephemeral: bool = False

    def describe(self) -> str:
        """``trusted``, ``ref:REF`` or ``build`` (one build only): for records and policies."""
        if self.trust == "trusted":
            return "trusted"
        return f"ref:{self.ref}" if self.ref is not None else "build"

    def to_dict(self) -> dict[str, object]:
        return {"trust": self.trust, "scope": self.describe(), "ephemeral": self.ephemeral}


def cache_scope(trust: Trust, *, ref: str | None, build_id: str) -> CacheScope:
    """The scope of a build's caches: trusted, its ref's, or (no ref) its own.

    Raises:
        ConfigError: ``trust`` is invalid, or the build id cannot name a scope.
    """
    trust = _check_trust(trust)
    if trust == "trusted":
        return CacheScope("trusted", "trusted", ref=ref)
    if ref is not None:
        if not ref.strip():
            raise ConfigError("an empty ref names no source; give none for a build of no ref")
        digest = hashlib.sha256(ref.encode(errors="surrogateescape")).hexdigest()[:32]
        return CacheScope("untrusted", f"ref-{digest}", ref=ref)
    name = f"build-{build_id.lower()}"
    if _SCOPE.fullmatch(name) is None:
        raise ConfigError(f"invalid build id {_show(build_id)} for a cache scope")
    return CacheScope("untrusted", name, ephemeral=True)


def _new_id() -> str:
    return f"{int(time.time()):010d}-{secrets.token_hex(8)}"


def _traverse_mode() -> int:
    # As root, cells run as unprivileged host uids that must reach their work copy by path.
    return 0o711 if os.geteuid() == 0 else 0o700


def _failure(path: Path, e: OSError, doing: str) -> StateError:
    """The error for ``cannot DOING PATH``: a full disk names the free space."""
    if e.errno in NO_SPACE:
        return write_failure(path / "x", e, what=f"the build cache ({doing.split(maxsplit=1)[0]})")
    return StateError(f"cannot {doing} {_show(path)}: {e.strerror}")


def _touch(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.utime(fd)
    finally:
        os.close(fd)


def _lock_key(kdir: Path, *, exclusive: bool) -> int | None:
    """Flock the key's lock file; the descriptor, or None if the key directory is gone.

    gc deletes the lock file of an empty key under the exclusive lock, so a lock taken on
    a file that is no longer at its path protects nothing: check, and start over.
    """
    path = kdir / _LOCK
    for _ in range(_ATTEMPTS):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StateError(f"cannot open cache lock {_show(path)}: {e.strerror}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            held, there = os.fstat(fd), os.stat(path, follow_symlinks=False)
            if (held.st_dev, held.st_ino) == (there.st_dev, there.st_ino):
                return fd
        except FileNotFoundError:
            pass
        except OSError as e:
            os.close(fd)
            raise StateError(f"cannot lock cache {_show(kdir)}: {e.strerror}") from e
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise StateError(f"cannot lock cache {_show(kdir)}: its lock file keeps being replaced")


def _try_lock_dir(path: Path) -> int | None:
    """An exclusively flocked descriptor of a generation or work copy; None if busy or gone."""
    try:
        fd = os.open(path, _DIR_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            return None
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_current(kdir: Path) -> str | None:
    """The name of the published generation (``gen-<id>``), or None.

    Raises:
        StateError: ``current`` is not a symlink to a generation of this key.
    """
    try:
        target = os.readlink(kdir / _CURRENT)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StateError(
            f"cannot read cache generation {_show(kdir / _CURRENT)}: {e.strerror}",
            hint=f"remove {kdir} to start this cache afresh",
        ) from e
    if _GEN.fullmatch(target) is None:
        raise StateError(
            f"cache {_show(kdir)} points to {_show(target)}, which is not one of its generations",
            hint=f"remove {kdir} to start this cache afresh",
        )
    return target


def _id_time(name: str) -> float | None:
    match = _GEN.fullmatch(name) or _WORK.fullmatch(name) or _LINK_TMP.fullmatch(name)
    return float(match["time"]) if match else None


class _Snapshot(Closing):
    """A published generation held open (shared flock) so nobody deletes it mid-copy."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _open_snapshot(kdir: Path) -> _Snapshot | None:
    """Hold the key's current generation for copying; None if it has none.

    Raises:
        StateError: the key's lock or generation cannot be used.
    """
    lock = _lock_key(kdir, exclusive=False)
    if lock is None:
        return None
    try:
        name = _read_current(kdir)
        if name is None:
            return None
        path = kdir / name
        try:
            fd = os.open(path, _DIR_FLAGS)
        except FileNotFoundError:
            logger.warning("cache %s: current generation %s is missing; ignoring it", kdir, name)
            return None
        snapshot = _Snapshot(path, fd)
        try:
            # Deleters take this exclusively and without waiting, so they skip it while
            # we copy; it cannot be held exclusively now (see _publish and _expire_key).
            fcntl.flock(fd, fcntl.LOCK_SH)
            _touch(kdir / _USED)
        except BaseException:
            snapshot.close()
            raise
        return snapshot
    except OSError as e:
        raise StateError(f"cannot open build cache {_show(kdir)}: {e.strerror}") from e
    finally:
        os.close(lock)


class _NotPublishable(Exception):
    """Why a work copy cannot become a generation (a message for the caller's warning)."""


class _Measure:
    """Adds up a work copy, directory by directory, and stops at the first problem."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        # Without root, what we cannot read now no later lease could copy.
        self.check_readable = os.geteuid() != 0

    def _add(self, size: int) -> None:
        self.size += size
        if self.size > self.max_bytes:
            raise _NotPublishable(
                f"larger than the limit of {self.max_bytes} bytes "
                f"(counted {self.size} bytes and stopped)"
            )

    def directory(self, fd: int, rel: tuple[str, ...]) -> list[str]:
        """Count the entries of one directory; return its subdirectories."""
        subdirs: list[str] = []
        try:
            with os.scandir(fd) as it:
                for entry in it:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if stat.S_ISDIR(st.st_mode):
                        subdirs.append(entry.name)
                    elif stat.S_ISREG(st.st_mode):
                        if self.check_readable and not os.access(
                            entry.name,
                            os.R_OK,
                            dir_fd=fd,
                            effective_ids=True,
                            follow_symlinks=False,
                        ):
                            raise _NotPublishable(
                                f"cannot read {_show('/'.join((*rel, entry.name)))}"
                            )
                        self._add(st.st_size)
                    # Symlinks, fifos, sockets: only the entry counts; the next copy skips
                    # all but symlinks, which it recreates without following.
                    self._add(_ENTRY_OVERHEAD)
        except OSError as e:
            raise _NotPublishable(f"cannot read {_show('/'.join(rel) or '.')}: {e.strerror}") from e
        return subdirs


def _measure(root_fd: int, max_bytes: int) -> tuple[int, str | None]:
    """Size of a work copy, and why it cannot be published (None if it can).

    Counts the apparent size of regular files plus an overhead per entry, never following
    a symlink, and stops as soon as the limit is passed. Everything a later lease could
    not copy is a reason not to publish: an unreadable entry, or a tree too deep.
    """
    measure = _Measure(max_bytes)
    # (descriptor, path below the root, subdirectories still to visit); the root's
    # descriptor belongs to the caller.
    stack: list[tuple[int, tuple[str, ...], list[str]]] = []
    try:
        stack.append((root_fd, (), measure.directory(root_fd, ())))
        while stack:
            fd, rel, pending = stack[-1]
            if not pending:
                stack.pop()
                if rel:
                    os.close(fd)
                continue
            where = (*rel, pending.pop())
            if len(where) > _MAX_DEPTH:
                raise _NotPublishable(
                    f"deeper than {_MAX_DEPTH} directories at {_show('/'.join(where))}"
                )
            try:
                child = os.open(where[-1], _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise _NotPublishable(f"cannot read {_show('/'.join(where))}: {e.strerror}") from e
            try:
                subdirs = measure.directory(child, where)
            except BaseException:
                os.close(child)
                raise
            stack.append((child, where, subdirs))
    except _NotPublishable as e:
        return measure.size, str(e)
    finally:
        for fd, rel, _ in stack:
            if rel:
                os.close(fd)
    return measure.size, None


@dataclass(frozen=True)
class CommitResult:
    """What :meth:`CacheLease.commit` did.

    Attributes:
        published: the work copy is now the key's current generation.
        size: bytes counted (file content plus a small overhead per entry); when the copy
            is over the limit, counting stops there, so this is a lower bound.
        reason: why it was not published, for the caller to report; None if it was.
    """

    published: bool
    size: int
    reason: str | None


class CacheLease(Closing):
    """A build's private, writable copy of a cache; obtained from :meth:`CacheStore.lease`.

    ``commit()`` publishes the copy as the new generation of ``(project, key, trust)``;
    ``close()`` (or leaving the ``with`` block) discards the copy unless it was published.

    Attributes:
        project: the validated project name.
        key: the validated cache key.
        trust: the trust level the copy is saved as.
        source: what the copy started from: the trusted cache, the untrusted one, or empty.
        work: the directory to bind read-write into the cell.
        result: what ``commit()`` returned, once it has been called.
    """

    def __init__(
        self,
        *,
        kdir: Path,
        lease_id: str,
        project: str,
        key: str,
        trust: Trust,
        max_bytes: int,
        owner: tuple[int, int] | None,
    ) -> None:
        self.project = project
        self.key = key
        self.trust: Trust = trust
        self.source: CacheSource = "empty"
        self.work = kdir / f"work-{lease_id}"
        self.result: CommitResult | None = None
        self._kdir = kdir
        self._id = lease_id
        self._max_bytes = max_bytes
        self._owner = owner
        self._state: Literal["open", "committed", "closed"] = "open"
        self._published = False
        self._work_fd: int | None = None
        try:
            fd = os.open(self.work, _DIR_FLAGS)
            self._work_fd = fd
            # Held for the lease's life: gc deletes only work copies whose lock is free.
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.fchmod(fd, 0o700)
            if owner is not None:
                os.fchown(fd, *owner)
        except OSError as e:
            self.close()
            raise SandboxError(f"cannot prepare cache copy {_show(self.work)}: {e.strerror}") from e
        except BaseException:
            self.close()
            raise

    def _fill(self, sources: list[tuple[Trust, Path]]) -> None:
        for trust, kdir in sources:
            snapshot = _open_snapshot(kdir)
            if snapshot is None:
                continue
            with snapshot:
                try:
                    stats = copy_tree(snapshot.path, self.work, owner=self._owner)
                except ConfigError as e:
                    raise StateError(
                        f"cannot copy build cache {_show(snapshot.path)}: {e.message}",
                        hint=f"remove {kdir} to start this cache afresh",
                    ) from e
            for rel, reason in stats.skipped:
                logger.debug("cache %s: %r not copied: %s", kdir, rel, reason)
            self.source = trust
            return
        self.source = "empty"

    def measure(self) -> tuple[int, str | None]:
        """The copy's size, and why it could not be published (``None`` if it could)."""
        if self._work_fd is None:
            return 0, "the cache copy is gone"
        return _measure(self._work_fd, self._max_bytes)

    def commit(self) -> CommitResult:
        """Publish the work copy as the current generation, unless it is over the limit.

        Call it once, after the cell that wrote into ``work`` has exited. A copy that is
        too large or unreadable is not published (the previous generation stays current);
        the result says why, and the copy is discarded at ``close()``.

        Raises:
            StateError: the cache directory cannot be updated.
            RuntimeError: the lease was already committed or closed (a bug in the caller).
        """
        if self._state != "open" or self._work_fd is None:
            raise RuntimeError(f"cache lease {self.work} was already committed or closed")
        self._state = "committed"
        size, problem = _measure(self._work_fd, self._max_bytes)
        if problem is None:
            self._seal()
            self._publish()
        else:
            logger.warning(
                "cache %s/%s (%s) not saved: %s", self.project, self.key, self.trust, problem
            )
        self.result = CommitResult(published=problem is None, size=size, reason=problem)
        return self.result

    def _seal(self) -> None:
        """Take the copy's root back from the cell: nobody but us can reach into it now.

        The cell's uid owns the copy and may have opened up its mode; once published it
        must not be able to change the generation that later builds copy from.
        """
        assert self._work_fd is not None
        try:
            if os.geteuid() == 0:
                os.fchown(self._work_fd, 0, 0)
            os.fchmod(self._work_fd, 0o700)
        except OSError as e:
            raise _failure(self.work, e, "publish build cache") from e

    def _publish(self) -> None:
        assert self._work_fd is not None
        kdir, work_fd = self._kdir, self._work_fd
        gen = kdir / f"gen-{self._id}"
        link_tmp = kdir / f".current-{self._id}"
        doomed: list[tuple[Path, int]] = []
        lock = _lock_key(kdir, exclusive=True)
        if lock is None:
            raise StateError(f"cannot publish build cache: {_show(kdir)} has disappeared")
        try:
            held, there = os.fstat(work_fd), os.stat(self.work, follow_symlinks=False)
            if (held.st_dev, held.st_ino) != (there.st_dev, there.st_ino):
                raise StateError(f"cannot publish build cache: {_show(self.work)} was replaced")
            os.rename(self.work, gen)
            try:
                os.symlink(gen.name, link_tmp)
                os.rename(link_tmp, kdir / _CURRENT)
            except BaseException:
                # Not published: put the copy back for close() to discard.
                with suppress(OSError):
                    os.rename(gen, self.work)
                with suppress(OSError):
                    os.unlink(link_tmp)
                raise
            self._published = True
            # Our lock on the work copy is now a lock on the generation: drop it before
            # anyone may start copying from it.
            self._work_fd = None
            os.close(work_fd)
            # Published; what follows is tidying up, which gc redoes if it fails here.
            try:
                _touch(kdir / _USED)
                _lock_superseded(kdir, gen.name, doomed)
            except OSError as e:
                logger.warning("cache %s: cannot remove old generations: %s", kdir, e.strerror)
        except OSError as e:
            raise _failure(kdir, e, "publish build cache") from e
        finally:
            os.close(lock)
        _remove_held(doomed)

    def close(self) -> None:
        """Discard the work copy unless it was published, and release its lock.

        Safe to call more than once.

        Raises:
            SandboxError: the work copy cannot be removed (``buildcell gc`` retries later).
        """
        if self._state == "closed":
            return
        self._state = "closed"
        try:
            if not self._published:
                remove_tree(self.work)
        finally:
            if self._work_fd is not None:
                os.close(self._work_fd)
                self._work_fd = None


def _lock_superseded(kdir: Path, current: str, doomed: list[tuple[Path, int]]) -> None:
    """Add to ``doomed`` the generations other than ``current`` that nobody is copying.

    Busy ones are left for the next commit or gc. Call with the key locked exclusively:
    leases start copying only under the key's shared lock, and only from ``current``.
    """
    for name in sorted(os.listdir(kdir)):
        if _GEN.fullmatch(name) and name != current:
            fd = _try_lock_dir(kdir / name)
            if fd is not None:
                doomed.append((kdir / name, fd))


def _remove_held(doomed: list[tuple[Path, int]]) -> list[Path]:
    """Remove directories we hold exclusively locked; the ones that are gone."""
    removed: list[Path] = []
    for path, fd in doomed:
        try:
            remove_tree(path)
            removed.append(path)
        except SandboxError as e:
            logger.warning("cannot remove %s: %s", path, e)
        finally:
            os.close(fd)
    return removed


class CacheStore:
    """The build caches below ``root`` (normally ``StateDir.caches``).

    Args:
        root: an existing directory that only buildcell writes to.
        max_bytes: the largest work copy that is published.

    Raises:
        ConfigError: ``max_bytes`` is not positive.
        StateError: ``root`` is not a directory.
    """

    def __init__(self, root: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes <= 0:
            raise ConfigError(f"invalid cache size limit {max_bytes}: expected a positive size")
        if not root.is_dir():
            raise StateError(f"cache directory {_show(root)} does not exist")
        self.root = root.absolute()
        self.max_bytes = max_bytes

    def lease(
        self,
        project: str,
        key: str,
        scope: CacheScope | Trust,
        *,
        owner: tuple[int, int] | None = None,
    ) -> CacheLease:
        """Make a private, writable copy of the cache ``(project, key)`` in ``scope``.

        A trusted lease starts from the trusted generation. An untrusted one starts from
        the trusted generation if there is one, else from its own scope's; either way it
        only ever publishes into its scope. With neither, the copy starts empty.

        Args:
            project: the project name: lowercase letters, digits, ``.``, ``_``, ``-``.
            key: the cache's key within the project, same grammar.
            scope: whose cache (:func:`cache_scope`); ``"trusted"`` for short, and
                ``"untrusted"`` for an untrusted scope without a ref or build (tests).
            owner: ``(uid, gid)`` the copy is given to, for the cell to write (needs root).

        Raises:
            ConfigError: ``project``, ``key`` or ``trust`` is invalid.
            StateError: the cache directory cannot be used, or a generation cannot be copied.
            SandboxError: the copy cannot be written or given to ``owner``.
        """
        project = _check_name("project name", project)
        key = _check_name("cache key", key)
        if not isinstance(scope, CacheScope):
            trust = _check_trust(scope)
            scope = CacheScope(trust, "trusted" if trust == "trusted" else "build-shared")
        trust = scope.trust
        if trust == "untrusted" and _SCOPE.fullmatch(scope.name) is None:
            raise ConfigError(f"invalid cache scope {_show(scope.name)}")
        kdir, lease_id, lock = self._make_work(project, scope, key)
        try:
            lease = CacheLease(
                kdir=kdir,
                lease_id=lease_id,
                project=project,
                key=key,
                trust=trust,
                max_bytes=self.max_bytes,
                owner=owner,
            )
        finally:
            os.close(lock)
        # Trusted first: an untrusted build then starts from what trusted builds made, not
        # from what earlier untrusted builds (an attacker's, maybe) left behind.
        sources: list[tuple[Trust, Path]] = [("trusted", self.root / project / "trusted" / key)]
        if trust == "untrusted":
            sources.append(("untrusted", kdir))  # its own scope's, never another's
        try:
            lease._fill(sources)
        except BaseException:
            lease.close()
            raise
        return lease

    def drop_scope(self, project: str, scope: CacheScope) -> None:
        """Remove an ephemeral scope's caches (at the end of its build).

        Raises:
            SandboxError: they cannot be removed (``buildcell gc`` retries).
        """
        if scope.trust == "untrusted" and scope.ephemeral:
            remove_tree(self.root / _check_name("project name", project) / "untrusted" / scope.name)

    def _make_work(self, project: str, scope: CacheScope, key: str) -> tuple[Path, str, int]:
        """Create an empty work copy; return its key directory, its id and the key's lock.

        The key's lock is held shared until the lease has locked its copy: gc looks for
        abandoned copies holding it exclusively, so it never sees one not yet locked, and
        it does not remove the key directory meanwhile.
        """
        mode = _traverse_mode()
        parts: tuple[str, ...] = (project, scope.trust)
        if scope.trust == "untrusted":
            parts += (scope.name,)
        for _ in range(_ATTEMPTS):
            path = self.root
            try:
                for part in (*parts, key):
                    path = path / part
                    _ensure_dir(path, mode)
                if scope.ref is not None and scope.trust == "untrusted":
                    _write_ref(path.parent, scope.ref)
            except FileNotFoundError as e:
                # gc removed an empty directory of ours just now; make it again.
                if not self.root.is_dir():
                    raise StateError(f"cache directory {_show(self.root)} is gone") from e
                continue
            except OSError as e:
                raise _failure(path, e, "create build cache in") from e
            lock = _lock_key(path, exclusive=False)
            if lock is None:
                continue
            lease_id = _new_id()
            try:
                os.mkdir(path / f"work-{lease_id}", 0o700)
            except OSError as e:
                os.close(lock)
                raise _failure(path, e, "create build cache in") from e
            return path, lease_id, lock
        raise StateError(f"cannot create build cache in {_show(self.root)}: it keeps disappearing")


def _write_ref(scope_dir: Path, ref: str) -> None:
    """Name the ref a scope belongs to (for people and ``gc``); written once."""
    with suppress(FileExistsError):
        fd = os.open(
            scope_dir / "ref",
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )
        try:
            os.write(fd, ref.encode(errors="surrogateescape") + b"\n")
        finally:
            os.close(fd)


def _ensure_dir(path: Path, mode: int) -> None:
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        pass
    else:
        os.chmod(path, mode)  # not narrowed by the umask
    if not stat.S_ISDIR(os.lstat(path).st_mode):
        raise StateError(f"cache path {_show(path)} is not a directory")


def _subdirs(path: Path) -> list[Path]:
    """Subdirectories with valid names (no symlinks); anything else is not ours to touch."""
    try:
        with os.scandir(path) as it:
            return sorted(
                Path(entry.path)
                for entry in it
                if entry.is_dir(follow_symlinks=False) and _NAME.fullmatch(entry.name)
            )
    except FileNotFoundError:
        return []
    except OSError as e:
        raise StateError(f"cannot list build caches in {_show(path)}: {e.strerror}") from e


def _rmdir_if_empty(path: Path) -> None:
    try:
        os.rmdir(path)
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.ENOTEMPTY, errno.EEXIST):
            raise StateError(f"cannot remove empty {_show(path)}: {e.strerror}") from e


def expire_caches(root: Path, *, max_age_seconds: float, now: float | None = None) -> list[Path]:
    """Remove cache generations unused for longer than ``max_age_seconds``, and leftovers.

    A key's current generation expires when it was neither published nor copied by a
    lease for ``max_age_seconds``; superseded generations and interrupted swaps are
    removed whatever their age. Work copies of killed builds are removed once they are
    more than an hour old and their lock is free. Whatever is being copied or written
    right now is left alone, and keys left empty are tidied away.

    Args:
        root: the store's root (``StateDir.caches``).
        max_age_seconds: how long an unused generation is kept.
        now: the current time (seconds since the epoch); defaults to ``time.time()``.

    Returns:
        The generations and work copies removed.

    Raises:
        ConfigError: ``max_age_seconds`` is negative.
        StateError: the store cannot be listed. A key that cannot be expired (its lock,
            or a generation, is unusable) is logged and skipped, not raised.
    """
    if max_age_seconds < 0:
        raise ConfigError(f"invalid cache age {max_age_seconds}: expected a positive age")
    now = time.time() if now is None else now
    removed: list[Path] = []
    for project in _subdirs(root):
        for trust in get_args(Trust):
            tdir = project / trust
            scopes = [tdir] if trust == "trusted" else _subdirs(tdir)
            for sdir in scopes:
                if trust == "untrusted" and _SCOPE.fullmatch(sdir.name) is None:
                    # An untrusted cache from before scopes existed: shared by every ref,
                    # so possibly poisoned; nothing reads it any more.
                    with suppress(SandboxError):
                        remove_tree(sdir)
                        removed.append(sdir)
                    continue
                for kdir in _subdirs(sdir):
                    try:
                        removed += _expire_key(
                            kdir, now - max_age_seconds, now - _STALE_WORK_SECONDS
                        )
                    except StateError as e:
                        logger.warning("cannot expire cache %s: %s", kdir, e)
                if sdir is not tdir:
                    with suppress(OSError):
                        if set(os.listdir(sdir)) <= {"ref"}:
                            (sdir / "ref").unlink(missing_ok=True)
                    _rmdir_if_empty(sdir)
            _rmdir_if_empty(tdir)
        _rmdir_if_empty(project)
    return removed


def _expire_key(kdir: Path, cutoff: float, stale_cutoff: float) -> list[Path]:
    doomed: list[tuple[Path, int]] = []
    lock = _lock_key(kdir, exclusive=True)
    if lock is None:
        return []
    try:
        current = _read_current(kdir)
        last_use = 0.0
        if current is not None:
            last_use = _id_time(current) or 0.0
            with suppress(FileNotFoundError):
                last_use = max(last_use, os.stat(kdir / _USED).st_mtime)
        for name in sorted(os.listdir(kdir)):
            path = kdir / name
            if _GEN.fullmatch(name):
                if name == current and last_use >= cutoff:
                    continue
                fd = _try_lock_dir(path)  # None: a lease is copying from it
                if fd is None:
                    continue
                if name == current:
                    os.unlink(kdir / _CURRENT)
                doomed.append((path, fd))
            elif _WORK.fullmatch(name):
                if (_id_time(name) or 0.0) >= stale_cutoff:
                    continue
                fd = _try_lock_dir(path)  # None: its build is still running
                if fd is not None:
                    doomed.append((path, fd))
            elif _LINK_TMP.fullmatch(name):
                # A swap happens under the exclusive lock we hold: this one was interrupted.
                os.unlink(path)
    except BaseException as e:
        for _, fd in doomed:
            os.close(fd)
        if isinstance(e, OSError):
            raise StateError(f"cannot expire build cache {_show(kdir)}: {e.strerror}") from e
        raise
    finally:
        os.close(lock)
    removed = _remove_held(doomed)
    _remove_empty_key(kdir)
    return removed


def _remove_empty_key(kdir: Path) -> None:
    lock = _lock_key(kdir, exclusive=True)
    if lock is None:
        return
    try:
        if set(os.listdir(kdir)) <= {_LOCK, _USED}:
            # Under the lock, and lock takers check that their file is still in place.
            (kdir / _USED).unlink(missing_ok=True)
            (kdir / _LOCK).unlink(missing_ok=True)
            _rmdir_if_empty(kdir)
    except OSError as e:
        raise StateError(f"cannot remove empty build cache {_show(kdir)}: {e.strerror}") from e
    finally:
        os.close(lock)
