"""Build caches: trust separation, project isolation, size limits, concurrency, expiry."""

from __future__ import annotations

import fcntl
import os
import re
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from buildcell.errors import ConfigError, StateError
from buildcell.supply.caches import (
    DEFAULT_MAX_BYTES,
    CacheLease,
    CacheStore,
    Trust,
    cache_scope,
    expire_caches,
)
from buildcell.trees import remove_tree

NOBODY = 65534
IS_ROOT = os.geteuid() == 0
NAME = r"[a-z0-9][a-z0-9._-]{0,63}"
HOUR = 3600.0


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "caches"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def store(root: Path) -> CacheStore:
    return CacheStore(root)


def _kdir(root: Path, project: str, trust: str, key: str) -> Path:
    # "untrusted" alone, as these tests lease it, is one shared untrusted scope.
    if trust == "untrusted":
        return root / project / trust / "build-shared" / key
    return root / project / trust / key


def _current(kdir: Path) -> Path:
    return kdir / os.readlink(kdir / "current")


def _tree(path: Path) -> dict[str, str]:
    """Every entry below ``path``: file content, ``-> target`` for symlinks, ``/`` for dirs."""
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            full = Path(dirpath, name)
            rel = str(full.relative_to(path))
            if full.is_symlink():
                found[rel] = "-> " + os.readlink(full)
            elif full.is_dir():
                found[rel] = "/"
            else:
                found[rel] = full.read_text()
    return found


def _entries(kdir: Path, prefix: str) -> list[str]:
    return sorted(name for name in os.listdir(kdir) if name.startswith(prefix))


def _save(store: CacheStore, project: str, trust: Trust, files: dict[str, str]) -> CacheLease:
    with store.lease(project, "pip", trust) as lease:
        for name, content in files.items():
            (lease.work / name).write_text(content)
        assert lease.commit().published
    return lease


# --- trust -----------------------------------------------------------------------------


def test_trusted_cache_survives_between_builds(store: CacheStore, root: Path) -> None:
    with store.lease("proj", "pip", "trusted") as first:
        assert first.source == "empty"
        assert list(first.work.iterdir()) == []
        (first.work / "wheel").write_text("v1")
        result = first.commit()
    assert result.published and result.reason is None and result.size > 2
    with store.lease("proj", "pip", "trusted") as second:
        assert second.source == "trusted"
        assert _tree(second.work) == {"wheel": "v1"}
        assert second.work != first.work
    assert _entries(_kdir(root, "proj", "trusted", "pip"), "work-") == []


def test_untrusted_build_cannot_poison_trusted_cache(store: CacheStore, root: Path) -> None:
    _save(store, "proj", "trusted", {"good": "trusted"})
    trusted = _kdir(root, "proj", "trusted", "pip")
    generation = _current(trusted)

    with store.lease("proj", "pip", "untrusted") as pr:
        assert pr.source == "trusted"
        # A copy, not the generation itself: writing it changes nothing there.
        assert _tree(pr.work) == {"good": "trusted"}
        assert (pr.work / "good").stat().st_ino != (generation / "good").stat().st_ino
        (pr.work / "good").write_text("tampered")
        (pr.work / "poison").write_text("evil")
        assert pr.commit().published

    assert _current(trusted) == generation
    assert _tree(generation) == {"good": "trusted"}
    with store.lease("proj", "pip", "trusted") as build:
        assert build.source == "trusted"
        assert _tree(build.work) == {"good": "trusted"}
    # The untrusted generation is kept, but the trusted one is still preferred by PRs.
    assert _tree(_current(_kdir(root, "proj", "untrusted", "pip"))) == {
        "good": "tampered",
        "poison": "evil",
    }
    with store.lease("proj", "pip", "untrusted") as next_pr:
        assert next_pr.source == "trusted"
        assert _tree(next_pr.work) == {"good": "trusted"}

    # A trusted build's later writes reach the next untrusted build, again as a copy.
    _save(store, "proj", "trusted", {"good": "trusted-v2"})
    with store.lease("proj", "pip", "untrusted") as pr:
        assert _tree(pr.work) == {"good": "trusted-v2"}


def test_untrusted_without_trusted_uses_its_own_cache(store: CacheStore) -> None:
    with store.lease("proj", "pip", "untrusted") as first:
        assert first.source == "empty"
    _save(store, "proj", "untrusted", {"pr": "1"})
    with store.lease("proj", "pip", "untrusted") as second:
        assert second.source == "untrusted"
        assert _tree(second.work) == {"pr": "1"}
    with store.lease("proj", "pip", "trusted") as trusted:
        assert trusted.source == "empty"
        assert _tree(trusted.work) == {}


def test_projects_and_keys_are_isolated(store: CacheStore) -> None:
    _save(store, "alpha", "trusted", {"secret": "alpha"})
    _save(store, "alpha", "untrusted", {"pr": "alpha"})
    for project, key, trust in [
        ("beta", "pip", "trusted"),
        ("beta", "pip", "untrusted"),
        ("alpha", "npm", "trusted"),
        ("alpha", "npm", "untrusted"),
    ]:
        with store.lease(project, key, trust) as lease:  # type: ignore[arg-type]
            assert lease.source == "empty"
            assert _tree(lease.work) == {}


@pytest.mark.parametrize(
    "name", ["../x", "A", "", "a" * 65, "a/b", ".", "..", "-a", ".a", "a\n", "a b", "ä"]
)
def test_invalid_names_are_rejected(store: CacheStore, root: Path, name: str) -> None:
    with pytest.raises(ConfigError, match="invalid project name"):
        store.lease(name, "pip", "trusted")
    with pytest.raises(ConfigError, match="invalid cache key"):
        store.lease("proj", name, "untrusted")
    assert list(root.iterdir()) == []


@pytest.mark.parametrize("trust", ["TRUSTED", "", "trusted ", "other"])
def test_invalid_trust_is_rejected(store: CacheStore, root: Path, trust: str) -> None:
    with pytest.raises(ConfigError, match="trust level"):
        store.lease("proj", "pip", trust)  # type: ignore[arg-type]
    assert list(root.iterdir()) == []


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(name=st.one_of(st.from_regex(NAME, fullmatch=True), st.text(max_size=70)))
def test_a_name_is_a_path_component_only_when_valid(
    store: CacheStore, root: Path, name: str
) -> None:
    if re.fullmatch(NAME, name) is None:
        with pytest.raises(ConfigError):
            store.lease(name, "pip", "trusted")
        with pytest.raises(ConfigError):
            store.lease("proj", name, "trusted")
    else:
        with store.lease(name, name, "untrusted") as lease:
            assert lease.work.parent == root / name / "untrusted" / "build-shared" / name
    assert all(re.fullmatch(NAME, p.name) for p in root.iterdir())


def test_store_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        CacheStore(tmp_path, max_bytes=0)
    with pytest.raises(StateError, match="does not exist"):
        CacheStore(tmp_path / "missing")
    assert DEFAULT_MAX_BYTES == 2 << 30


# --- lease lifecycle -------------------------------------------------------------------


def test_close_without_commit_discards_the_copy(store: CacheStore, root: Path) -> None:
    _save(store, "proj", "trusted", {"kept": "1"})
    kdir = _kdir(root, "proj", "trusted", "pip")
    lease = store.lease("proj", "pip", "trusted")
    (lease.work / "sub").mkdir()
    (lease.work / "sub" / "f").write_text("x")
    os.chmod(lease.work / "sub", 0o500)  # a read-only directory, as Go leaves them
    lease.close()
    lease.close()
    assert not lease.work.exists()
    assert _entries(kdir, "work-") == []
    assert _tree(_current(kdir)) == {"kept": "1"}
    with pytest.raises(RuntimeError):
        lease.commit()


def test_commit_twice_is_a_bug(store: CacheStore) -> None:
    with store.lease("proj", "pip", "trusted") as lease:
        lease.commit()
        with pytest.raises(RuntimeError):
            lease.commit()


def test_last_successful_writer_wins(store: CacheStore, root: Path) -> None:
    first = store.lease("proj", "pip", "trusted")
    second = store.lease("proj", "pip", "trusted")
    (first.work / "who").write_text("first")
    (second.work / "who").write_text("second")
    with second:
        assert second.commit().published
    with first:
        assert first.commit().published
    kdir = _kdir(root, "proj", "trusted", "pip")
    assert _tree(_current(kdir)) == {"who": "first"}
    assert _entries(kdir, "gen-") == [_current(kdir).name]


@pytest.mark.skipif(not IS_ROOT, reason="giving the copy to another uid needs root")
def test_copy_is_given_to_owner_and_taken_back_when_published(
    store: CacheStore, root: Path
) -> None:
    with store.lease("proj", "pip", "trusted") as lease:
        (lease.work / "d").mkdir()
        (lease.work / "d" / "f").write_text("1")
        os.symlink("d/f", lease.work / "link")
        assert lease.commit().published
    with store.lease("proj", "pip", "trusted", owner=(NOBODY, NOBODY)) as lease:
        owners = {
            str(path.relative_to(lease.work)): (path.lstat().st_uid, path.lstat().st_gid)
            for path in [lease.work, *lease.work.rglob("*")]
        }
        assert owners == dict.fromkeys([".", "d", "d/f", "link"], (NOBODY, NOBODY))
        os.chmod(lease.work, 0o777)  # the cell owns its copy and may open it up
        assert lease.commit().published
    generation = _current(_kdir(root, "proj", "trusted", "pip"))
    st_ = generation.lstat()
    assert (st_.st_uid, stat.S_IMODE(st_.st_mode)) == (0, 0o700)
    for part in (root / "proj", root / "proj" / "trusted", generation.parent):
        assert stat.S_IMODE(part.stat().st_mode) == 0o711


@pytest.mark.skipif(IS_ROOT, reason="root reads everything")
@pytest.mark.parametrize("what", ["file", "dir", "root"])
def test_unreadable_copy_is_not_published(store: CacheStore, root: Path, what: str) -> None:
    _save(store, "proj", "trusted", {"a": "1"})
    with store.lease("proj", "pip", "trusted") as lease:
        (lease.work / "d").mkdir()
        (lease.work / "d" / "f").write_text("x")
        target = {"file": lease.work / "d" / "f", "dir": lease.work / "d", "root": lease.work}
        os.chmod(target[what], 0)
        result = lease.commit()
    assert not result.published
    assert result.reason is not None and "cannot read" in result.reason
    assert _entries(_kdir(root, "proj", "trusted", "pip"), "work-") == []
    with store.lease("proj", "pip", "trusted") as lease:
        assert _tree(lease.work) == {"a": "1"}


# --- size limit ------------------------------------------------------------------------


def test_oversize_copy_is_not_published(root: Path) -> None:
    store = CacheStore(root, max_bytes=64 << 10)
    _save(store, "proj", "trusted", {"small": "ok"})
    kdir = _kdir(root, "proj", "trusted", "pip")
    before = _current(kdir)
    with store.lease("proj", "pip", "trusted") as lease:
        (lease.work / "huge").write_bytes(b"\0" * (1 << 20))
        result = lease.commit()
        assert lease.result == result
    assert not result.published
    assert result.size > 64 << 10
    assert result.reason is not None and "limit" in result.reason
    assert _current(kdir) == before
    assert _tree(before) == {"small": "ok"}
    assert _entries(kdir, "work-") == []
    assert _entries(kdir, "gen-") == [before.name]


def _fill(work: Path) -> None:
    (work / "d" / "e").mkdir(parents=True)
    (work / "d" / "e" / "f").write_bytes(b"x" * 1000)
    (work / "g").write_bytes(b"y" * 333)
    os.symlink("d/e/f", work / "link")


def test_limit_is_inclusive_and_counts_entries(root: Path) -> None:
    with CacheStore(root).lease("measure", "pip", "trusted") as lease:
        _fill(lease.work)
        size = lease.commit().size
    assert size > 1333  # content plus a per-entry overhead
    with CacheStore(root, max_bytes=size).lease("exact", "pip", "trusted") as lease:
        _fill(lease.work)
        assert lease.commit() == lease.result
        assert lease.result is not None and lease.result.published
    with CacheStore(root, max_bytes=size - 1).lease("over", "pip", "trusted") as lease:
        _fill(lease.work)
        assert not lease.commit().published


def test_symlinks_are_kept_and_never_followed(
    store: CacheStore, root: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    with (outside / "sparse").open("wb") as f:
        f.truncate(8 << 30)  # larger than any limit, if a symlink were followed
    small = CacheStore(root, max_bytes=1 << 20)
    targets = {
        "to-file": str(outside / "sparse"),
        "to-dir": str(outside),
        "to-root": "/",
        "loop": "loop",
        "dangling": "/nonexistent/x",
        "up": "../../../../..",
    }
    with small.lease("proj", "pip", "trusted") as lease:
        for name, target in targets.items():
            os.symlink(target, lease.work / name)
        os.mkfifo(lease.work / "fifo")  # skipped by the next copy, and does not hang us
        result = lease.commit()
    assert result.published, result.reason
    assert result.size < 4096
    with store.lease("proj", "pip", "untrusted") as lease:
        assert lease.source == "trusted"
        assert _tree(lease.work) == {name: "-> " + t for name, t in targets.items()}
        assert all((lease.work / name).is_symlink() for name in targets)
    assert (outside / "sparse").stat().st_size == 8 << 30


def test_too_deep_a_tree_is_not_published(store: CacheStore) -> None:
    with store.lease("proj", "pip", "trusted") as lease:
        deep = lease.work
        for _ in range(300):
            deep = deep / "d"
        deep.mkdir(parents=True)
        result = lease.commit()
    assert not result.published
    assert result.reason is not None and "deeper" in result.reason


# --- concurrency -----------------------------------------------------------------------

PARTS = 40


def check_complete(work: Path) -> None:
    """A copy is empty or exactly one writer's files: never a mix, never a partial one."""
    names = sorted(os.listdir(work))
    if not names:
        return
    assert names == sorted([f"part-{k}" for k in range(PARTS)] + ["sub"]), names
    tokens = {(work / f"part-{k}").read_text() for k in range(PARTS)}
    tokens.add((work / "sub" / "marker").read_text())
    assert len(tokens) == 1, tokens


def write_markers(work: Path, token: str) -> None:
    for child in list(work.iterdir()):
        remove_tree(child)
    for k in range(PARTS):
        (work / f"part-{k}").write_text(token)
    (work / "sub").mkdir()
    (work / "sub" / "marker").write_text(token)


WRITER = textwrap.dedent(
    f"""
    import sys
    from pathlib import Path
    sys.path.insert(0, {str(Path(__file__).parent)!r})
    from buildcell.supply.caches import CacheStore
    from test_caches import check_complete, write_markers

    store = CacheStore(Path(sys.argv[1]))
    for round_ in range(int(sys.argv[3])):
        token = f"{{sys.argv[2]}}-{{round_}}"
        with store.lease("proj", "pip", "trusted") as lease:
            check_complete(lease.work)
            write_markers(lease.work, token)
            assert lease.commit().published
            print(token, flush=True)
    """
)


def _check_final(root: Path, published: set[str]) -> None:
    kdir = _kdir(root, "proj", "trusted", "pip")
    generation = _current(kdir)
    check_complete(generation)
    assert (generation / "sub" / "marker").read_text() in published
    assert _entries(kdir, "gen-") == [generation.name]
    assert _entries(kdir, "work-") == []
    assert _entries(kdir, ".current-") == []


def test_concurrent_threads_never_corrupt_the_cache(store: CacheStore, root: Path) -> None:
    def build(writer: int) -> list[str]:
        done = []
        for round_ in range(3):
            token = f"t{writer}-{round_}"
            with store.lease("proj", "pip", "trusted") as lease:
                check_complete(lease.work)
                write_markers(lease.work, token)
                assert lease.commit().published
                done.append(token)
        return done

    with ThreadPoolExecutor(max_workers=6) as pool:
        published = {token for tokens in pool.map(build, range(6)) for token in tokens}
    assert len(published) == 18
    _check_final(root, published)


def test_concurrent_processes_never_corrupt_the_cache(root: Path) -> None:
    argv = [sys.executable, "-c", WRITER, str(root)]
    published: set[str] = set()
    with ExitStack() as stack:
        procs = [
            stack.enter_context(
                subprocess.Popen([*argv, f"p{i}", "4"], stdout=subprocess.PIPE, text=True)
            )
            for i in range(4)
        ]
        for proc in procs:
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode == 0
            published.update(out.split())
    assert len(published) == 16
    _check_final(root, published)


def test_gc_racing_builds_never_breaks_them(store: CacheStore, root: Path) -> None:
    """gc deletes whole keys (lock file included) while builds lease and commit them."""
    stop = threading.Event()

    def gc() -> int:
        runs = 0
        while not stop.is_set():
            expire_caches(root, max_age_seconds=0, now=time.time() + 2 * HOUR)
            runs += 1
        return runs

    def build(writer: int) -> None:
        for round_ in range(6):
            trust: Trust = "untrusted" if round_ % 2 else "trusted"
            with store.lease("proj", "pip", trust) as lease:
                check_complete(lease.work)
                write_markers(lease.work, f"{writer}-{round_}")
                assert lease.commit().published

    with ThreadPoolExecutor(max_workers=5) as pool:
        collector = pool.submit(gc)
        try:
            for done in [pool.submit(build, i) for i in range(4)]:
                done.result()
        finally:
            stop.set()
        assert collector.result() > 0
    expire_caches(root, max_age_seconds=0, now=time.time() + 2 * HOUR)
    assert list(root.iterdir()) == []


# --- expiry ----------------------------------------------------------------------------


def test_expire_removes_unused_generations(store: CacheStore, root: Path) -> None:
    _save(store, "proj", "trusted", {"a": "1"})
    _save(store, "other", "untrusted", {"b": "2"})
    kdir = _kdir(root, "proj", "trusted", "pip")
    generation = _current(kdir)
    assert expire_caches(root, max_age_seconds=HOUR) == []
    assert expire_caches(root, max_age_seconds=HOUR, now=time.time() + HOUR / 2) == []
    assert _current(kdir) == generation

    removed = expire_caches(root, max_age_seconds=HOUR, now=time.time() + 2 * HOUR)
    assert generation in removed and len(removed) == 2
    assert list(root.iterdir()) == []  # empty keys are tidied away
    with store.lease("proj", "pip", "trusted") as lease:
        assert lease.source == "empty"


def test_a_lease_keeps_a_generation_in_use(store: CacheStore, root: Path) -> None:
    _save(store, "proj", "trusted", {"a": "1"})
    kdir = _kdir(root, "proj", "trusted", "pip")
    os.utime(kdir / "used", (time.time() - 2 * HOUR,) * 2)
    with store.lease("proj", "pip", "trusted"):
        pass  # copying from it counts as using it
    assert expire_caches(root, max_age_seconds=HOUR) == []
    assert _tree(_current(kdir)) == {"a": "1"}


def test_expire_skips_a_generation_being_copied(store: CacheStore, root: Path) -> None:
    _save(store, "proj", "trusted", {"a": "1"})
    kdir = _kdir(root, "proj", "trusted", "pip")
    old = _current(kdir)
    fd = os.open(old, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # what a lease holds while it copies
        _save(store, "proj", "trusted", {"a": "2"})
        assert old.exists()  # superseded, but busy: left for later
        new = _current(kdir)
        later = time.time() + 2 * HOUR
        assert expire_caches(root, max_age_seconds=HOUR, now=later) == [new]
        assert old.exists()
    finally:
        os.close(fd)
    assert expire_caches(root, max_age_seconds=HOUR) == [old]
    assert list(root.iterdir()) == []


def test_expire_removes_superseded_generation_left_by_a_reader(
    store: CacheStore, root: Path
) -> None:
    _save(store, "proj", "trusted", {"a": "1"})
    kdir = _kdir(root, "proj", "trusted", "pip")
    old = _current(kdir)
    fd = os.open(old, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_SH)
    _save(store, "proj", "trusted", {"a": "2"})
    os.close(fd)
    assert expire_caches(root, max_age_seconds=HOUR) == [old]
    assert _tree(_current(kdir)) == {"a": "2"}


@pytest.fixture
def killed_build(root: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    script = textwrap.dedent(
        """
        import sys, time
        from pathlib import Path
        from buildcell.supply.caches import CacheStore
        lease = CacheStore(Path(sys.argv[1])).lease("proj", "pip", "untrusted")
        (lease.work / "half-written").write_text("x")
        print(lease.work, flush=True)
        time.sleep(60)
        """
    )
    with subprocess.Popen(
        [sys.executable, "-c", script, str(root)], stdout=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stdout is not None
        work = Path(proc.stdout.readline().strip())
        try:
            yield proc, work
        finally:
            proc.kill()


def test_expire_removes_work_copies_of_killed_builds(
    store: CacheStore, root: Path, killed_build: tuple[subprocess.Popen[str], Path]
) -> None:
    proc, work = killed_build
    _save(store, "proj", "untrusted", {"a": "1"})
    later = time.time() + 2 * HOUR
    assert expire_caches(root, max_age_seconds=3 * HOUR, now=later) == []
    assert (work / "half-written").exists()  # its build still runs

    proc.kill()
    proc.wait()
    assert expire_caches(root, max_age_seconds=3 * HOUR) == []  # young: left alone
    assert expire_caches(root, max_age_seconds=3 * HOUR, now=later) == [work]
    assert not work.exists()
    with store.lease("proj", "pip", "untrusted") as lease:
        assert _tree(lease.work) == {"a": "1"}


def test_expire_ignores_what_is_not_a_cache(root: Path) -> None:
    (root / "Not-A-Project").mkdir()
    (root / "stray-file").write_text("x")
    os.symlink("/", root / "link")
    assert expire_caches(root, max_age_seconds=0, now=time.time() + 10 * HOUR) == []
    assert sorted(p.name for p in root.iterdir()) == ["Not-A-Project", "link", "stray-file"]
    with pytest.raises(ConfigError):
        expire_caches(root, max_age_seconds=-1)


# -- scopes: one pull request's caches are its own --------------------------------------


def test_refs_never_see_each_others_caches(store: CacheStore, root: Path) -> None:
    pr1 = cache_scope("untrusted", ref="refs/pull/1/merge", build_id="b1")
    pr2 = cache_scope("untrusted", ref="refs/pull/2/merge", build_id="b2")
    with store.lease("acme", "pip", pr1) as lease:
        (lease.work / "poison").write_text("from pr 1")
        assert lease.commit().published
    with store.lease("acme", "pip", pr2) as lease:
        assert lease.source == "empty"
        assert _tree(lease.work) == {}
    with store.lease("acme", "pip", pr1) as again:
        assert again.source == "untrusted"
        assert _tree(again.work) == {"poison": "from pr 1"}
    # The trusted cache still comes first for every ref, and is never written by one.
    _save(store, "acme", "trusted", {"good": "trusted"})
    with store.lease("acme", "pip", pr2) as lease:
        assert lease.source == "trusted"
    with store.lease("acme", "pip", "trusted") as lease:
        assert _tree(lease.work) == {"good": "trusted"}
    scope_dir = root / "acme" / "untrusted" / pr1.name
    assert (scope_dir / "ref").read_text() == "refs/pull/1/merge\n"


def test_a_build_without_ref_has_a_cache_of_its_own(store: CacheStore, root: Path) -> None:
    one = cache_scope("untrusted", ref=None, build_id="20261207T120000-aaaaaaaa")
    other = cache_scope("untrusted", ref=None, build_id="20261207T120000-bbbbbbbb")
    assert one.ephemeral
    assert one.describe() == "build"
    with store.lease("acme", "pip", one) as lease:
        (lease.work / "f").write_text("x")
        lease.commit()
    with store.lease("acme", "pip", one) as step2:  # a later step of the same build
        assert _tree(step2.work) == {"f": "x"}
    with store.lease("acme", "pip", other) as lease:
        assert lease.source == "empty"
    store.drop_scope("acme", one)
    assert not (root / "acme" / "untrusted" / one.name).exists()


def test_scope_names_do_not_depend_on_ref_syntax() -> None:
    a = cache_scope("untrusted", ref="../../trusted", build_id="x")
    b = cache_scope("untrusted", ref="refs/pull/1/merge\n", build_id="x")
    assert a.name.startswith("ref-")
    assert "/" not in a.name
    assert a.name != b.name
    assert cache_scope("trusted", ref="refs/heads/main", build_id="x").name == "trusted"


@pytest.mark.parametrize("ref", ["", " ", "\t\n"])
def test_an_empty_ref_names_no_scope(ref: str) -> None:
    with pytest.raises(ConfigError, match="empty ref"):
        cache_scope("untrusted", ref=ref, build_id="x")


def test_gc_ages_out_scopes_and_removes_unscoped_untrusted_caches(
    store: CacheStore, root: Path
) -> None:
    pr = cache_scope("untrusted", ref="refs/pull/9/merge", build_id="b")
    with store.lease("acme", "pip", pr) as lease:
        (lease.work / "f").write_text("x")
        lease.commit()
    legacy = root / "acme" / "untrusted" / "pip"
    (legacy / "gen-0000000001-0000000000000000").mkdir(parents=True)
    removed = expire_caches(root, max_age_seconds=0, now=time.time() + 10)
    assert legacy in removed
    assert not (root / "acme" / "untrusted" / pr.name).exists()
