"""Output collection: the pattern language, and a workspace written by an attacker."""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import buildcell.supply.outputs as outputs_module
from buildcell.errors import ConfigError, OutputError
from buildcell.supply.outputs import (
    CollectedOutput,
    SkippedOutput,
    collect_outputs,
    match_pattern,
    validate_patterns,
)

SECRET = b"TOPSECRET host content"


# --- patterns ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("*.whl", "a.whl", True),
        ("*.whl", "dist/a.whl", False),
        ("dist/*.whl", "dist/a.whl", True),
        ("dist/*.whl", "dist/sub/a.whl", False),
        ("dist/*", "dist/sub/a", False),
        ("dist/**", "dist/a", True),
        ("dist/**", "dist/sub/deeper/a", True),
        ("dist/**", "other/a", False),
        ("**/*.whl", "a.whl", True),
        ("**/*.whl", "x/y/z/a.whl", True),
        ("**/*.whl", "x/y/z/a.tar", False),
        ("a/**/b", "a/b", True),
        ("a/**/b", "a/x/y/b", True),
        ("a/**/b", "a/x/y/c", False),
        ("a/**/**/b", "a/b", True),
        ("**", "a/b/c", True),
        ("?.txt", "a.txt", True),
        ("?.txt", "ab.txt", False),
        ("[ab].txt", "b.txt", True),
        ("[ab].txt", "c.txt", False),
        ("[!ab].txt", "a.txt", False),
        ("[!ab].txt", "c.txt", True),
        ("[a-c]x", "bx", True),
        ("[a-c]x", "dx", False),
        ("[]]", "]", True),
        ("[!]]", "a", True),
        ("[", "[", True),
        ("./dist/*.whl", "dist/a.whl", True),
        ("././dist/*.whl", "dist/a.whl", True),
        ("dist/*.whl", "./dist/a.whl", True),
        # *, ? and [...] never cross a "/".
        ("a*b", "a/b", False),
        ("a?b", "a/b", False),
        ("a[!x]b", "a/b", False),
        ("a[+-0]b", "a/b", False),
        ("*", "a/b", False),
        ("a**b", "axyb", True),
        ("a**b", "ax/yb", False),
        # Dot files are not special; backslash is an ordinary character.
        ("*", ".hidden", True),
        ("dist/*", "dist/.env", True),
        ("a\\*", "a\\xyz", True),
        ("a\\*", "a*", False),
        # A name with a newline is matched like any other.
        ("*.txt", "new\nline.txt", True),
        # Naming a directory matches only the directory.
        ("dist", "dist", True),
        ("dist", "dist/a", False),
    ],
)
def test_match_pattern(pattern: str, path: str, expected: bool) -> None:
    assert match_pattern(pattern, path) is expected


@pytest.mark.parametrize(
    "pattern",
    [
        "",
        "./",
        "/etc/shadow",
        "/workspace/dist/*",
        "../x",
        "a/../b",
        "..",
        "a\0b",
        "a//b",
        "dist/",
        ".",
        "a/./b",
    ],
)
def test_invalid_patterns(pattern: str) -> None:
    with pytest.raises(ConfigError):
        validate_patterns([pattern])
    with pytest.raises(ConfigError):
        match_pattern(pattern, "a")


def test_trailing_slash_hints_at_globstar() -> None:
    with pytest.raises(ConfigError) as info:
        validate_patterns(["dist/"])
    assert info.value.hint is not None
    assert "dist/**" in info.value.hint


def test_validate_patterns_normalizes() -> None:
    assert validate_patterns(["./dist/*.whl", "**/*.tar.gz"]) == ("dist/*.whl", "**/*.tar.gz")
    assert validate_patterns([]) == ()


def test_a_string_is_not_a_list_of_patterns() -> None:
    with pytest.raises(TypeError):
        validate_patterns("dist/*")


def test_pathological_pattern_is_fast() -> None:
    # With backtracking this would take ~255**6 steps per name.
    pattern = "*a*a*a*a*a*a*b"
    assert not match_pattern(pattern, "a" * 255)


_SEGMENT_CHARS = "ab.*?[]!-^\\\n"
_NAME_CHARS = "ab.-]![^\\\n"
segment_patterns = st.text(_SEGMENT_CHARS, min_size=1, max_size=8).filter(
    lambda p: p not in (".", "..")
)
names = st.text(_NAME_CHARS, min_size=1, max_size=8).filter(lambda n: n not in (".", ".."))


@given(segment_patterns, names)
@example("[!]", "!")
@example("[a-]", "-")
@example("[--a]", "]")
@example("[z-a]", "z")
@example("[!z-a]", "q")
@example("[c-a-z]", "-")
@example("[d-ab-c]", "b")
@example("*a*", "\n")
def test_single_segment_agrees_with_fnmatch(pattern: str, name: str) -> None:
    assert match_pattern(pattern, name) is fnmatch.fnmatchcase(name, pattern)


def _reference(pattern: list[str], path: list[str]) -> bool:
    if not pattern:
        return not path
    if pattern[0] == "**":
        return _reference(pattern[1:], path) or (bool(path) and _reference(pattern, path[1:]))
    return (
        bool(path)
        and fnmatch.fnmatchcase(path[0], pattern[0])
        and _reference(pattern[1:], path[1:])
    )


@given(
    st.lists(
        st.one_of(st.just("**"), st.sampled_from(["a", "b", "*", "?", "[ab]", "a*"])),
        min_size=1,
        max_size=5,
    ),
    st.lists(st.sampled_from(["a", "b", "ab", "ba", "c"]), min_size=1, max_size=6),
)
def test_multi_segment_agrees_with_reference(pattern: list[str], path: list[str]) -> None:
    assert match_pattern("/".join(pattern), "/".join(path)) is _reference(pattern, path)


# --- a hostile workspace -----------------------------------------------------------------


@pytest.fixture
def host_secret(tmp_path: Path) -> Path:
    host = tmp_path / "host"
    host.mkdir()
    secret = host / "shadow"
    secret.write_bytes(SECRET)
    (host / "dir").mkdir()
    (host / "dir" / "stolen.whl").write_bytes(SECRET)
    return secret


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    workspace = tmp_path / "ws"
    (workspace / "dist").mkdir(parents=True)
    return workspace


def _all_bytes(root: Path) -> Iterator[bytes]:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath, name)
            if not path.is_symlink():
                yield path.read_bytes()


def _assert_no_secret(out: Path) -> None:
    for content in _all_bytes(out):
        assert SECRET not in content


def test_collects_regular_files_with_digest(ws: Path, tmp_path: Path) -> None:
    big = os.urandom(3 * (1 << 20) + 17)  # several copy chunks
    (ws / "dist" / "big.bin").write_bytes(big)
    (ws / "dist" / "small.txt").write_bytes(b"hello\n")
    out = tmp_path / "out" / "nested"  # parents are created

    report = collect_outputs(ws, ["dist/*"], out)

    assert report.collected == (
        CollectedOutput("dist/big.bin", len(big), hashlib.sha256(big).hexdigest(), False),
        CollectedOutput(
            "dist/small.txt", 6, hashlib.sha256(b"hello\n").hexdigest(), executable=False
        ),
    )
    assert report.skipped == ()
    assert report.unmatched == ()
    assert (out / "dist" / "big.bin").read_bytes() == big
    # Nothing but the outputs: no temporary files left behind.
    assert sorted(p.name for p in (out / "dist").iterdir()) == ["big.bin", "small.txt"]


def test_modes_keep_exec_and_drop_setuid(ws: Path, tmp_path: Path) -> None:
    for name, mode in [("suid", 0o4755), ("sgid", 0o2711), ("exec", 0o700), ("plain", 0o640)]:
        path = ws / "dist" / name
        path.write_bytes(name.encode())
        os.chmod(path, mode)
    out = tmp_path / "out"

    report = collect_outputs(ws, ["dist/*"], out)

    modes = {
        c.path: (c.executable, stat.S_IMODE((out / c.path).stat().st_mode))
        for c in report.collected
    }
    assert modes == {
        "dist/exec": (True, 0o755),
        "dist/plain": (False, 0o644),
        "dist/sgid": (True, 0o755),
        "dist/suid": (True, 0o755),
    }


def test_symlink_to_host_file_is_skipped(ws: Path, tmp_path: Path, host_secret: Path) -> None:
    (ws / "dist" / "leak.whl").symlink_to(host_secret)
    (ws / "dist" / "passwd.whl").symlink_to("/etc/passwd")
    (ws / "dist" / "rel.whl").symlink_to("../../host/shadow")
    out = tmp_path / "out"

    report = collect_outputs(ws, ["dist/*.whl", "**/*.whl"], out)

    assert report.collected == ()
    assert report.skipped == (
        SkippedOutput("dist/leak.whl", "symlink"),
        SkippedOutput("dist/passwd.whl", "symlink"),
        SkippedOutput("dist/rel.whl", "symlink"),
    )
    assert report.unmatched == ()
    assert not (out / "dist" / "leak.whl").exists()
    _assert_no_secret(out)
    assert host_secret.read_bytes() == SECRET


def test_symlinked_directory_is_not_entered(ws: Path, tmp_path: Path, host_secret: Path) -> None:
    (ws / "dist").rmdir()
    (ws / "dist").symlink_to(host_secret.parent / "dir")
    (ws / "real").mkdir()
    (ws / "real" / "link").symlink_to(host_secret.parent)
    out = tmp_path / "out"

    report = collect_outputs(ws, ["**/*.whl", "real/**"], out)

    assert report.collected == ()
    # "real/**" matches the link itself (zero further segments), so it is reported.
    assert report.skipped == (SkippedOutput("real/link", "symlink"),)
    assert report.unmatched == ("**/*.whl",)
    assert not (out / "dist").exists()
    _assert_no_secret(out)


@pytest.mark.timeout(10)
def test_fifo_is_skipped_without_blocking(ws: Path, tmp_path: Path) -> None:
    os.mkfifo(ws / "dist" / "pipe.whl")

    report = collect_outputs(ws, ["dist/*.whl"], tmp_path / "out")

    assert report.collected == ()
    assert report.skipped == (SkippedOutput("dist/pipe.whl", "fifo"),)


@pytest.mark.timeout(10)
def test_socket_is_skipped(ws: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ws / "dist")  # a socket path must be short
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind("app.sock")
        report = collect_outputs(ws, ["dist/*"], tmp_path / "out")

    assert report.skipped == (SkippedOutput("dist/app.sock", "socket"),)
    assert report.collected == ()


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a device node needs root")
def test_device_is_skipped(ws: Path, tmp_path: Path) -> None:
    try:
        os.mknod(ws / "dist" / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("mknod is not permitted here")

    report = collect_outputs(ws, ["dist/*"], tmp_path / "out")

    assert report.skipped == (SkippedOutput("dist/null", "device"),)
    assert not (tmp_path / "out" / "dist" / "null").exists()


def test_symlink_in_out_dir_is_never_written_through(ws: Path, tmp_path: Path) -> None:
    (ws / "dist" / "a.whl").write_bytes(b"wheel")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "dist").symlink_to(elsewhere)

    with pytest.raises(OutputError, match="symlink"):
        collect_outputs(ws, ["dist/*.whl"], out)

    assert list(elsewhere.iterdir()) == []


def test_symlink_at_output_name_is_replaced_not_followed(ws: Path, tmp_path: Path) -> None:
    (ws / "a.whl").write_bytes(b"wheel")
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.whl").symlink_to(victim)

    collect_outputs(ws, ["a.whl"], out)

    assert victim.read_bytes() == b"untouched"
    assert not (out / "a.whl").is_symlink()
    assert (out / "a.whl").read_bytes() == b"wheel"


def test_existing_output_is_replaced(ws: Path, tmp_path: Path) -> None:
    (ws / "dist" / "a.whl").write_bytes(b"new")
    out = tmp_path / "out"
    (out / "dist").mkdir(parents=True)
    (out / "dist" / "a.whl").write_bytes(b"old")

    collect_outputs(ws, ["dist/*"], out)

    assert (out / "dist" / "a.whl").read_bytes() == b"new"


def test_failed_write_leaves_no_temporary_file(ws: Path, tmp_path: Path) -> None:
    (ws / "dist" / "a.whl").write_bytes(b"wheel")
    out = tmp_path / "out"
    (out / "dist" / "a.whl" / "occupied").mkdir(parents=True)

    with pytest.raises(OutputError, match=re.escape("dist/a.whl")):
        collect_outputs(ws, ["dist/*"], out)

    assert sorted(p.name for p in (out / "dist").iterdir()) == ["a.whl"]


def test_file_in_place_of_an_output_directory(ws: Path, tmp_path: Path) -> None:
    (ws / "dist" / "a.whl").write_bytes(b"wheel")
    out = tmp_path / "out"
    out.mkdir()
    (out / "dist").write_bytes(b"")

    with pytest.raises(OutputError, match="not a directory"):
        collect_outputs(ws, ["dist/*"], out)


def test_out_dir_inside_workspace_is_refused(ws: Path) -> None:
    (ws / "dist" / "a.whl").write_bytes(b"wheel")
    with pytest.raises(OutputError, match="inside the workspace"):
        collect_outputs(ws, ["dist/*"], ws / "out")


def test_non_utf8_and_newline_names_round_trip(ws: Path, tmp_path: Path) -> None:
    raw = os.fsencode(ws / "dist") + b"/caf\xe9.bin"
    with open(raw, "wb") as f:
        f.write(b"latin-1")
    (ws / "dist" / "new\nline.bin").write_bytes(b"newline")
    out = tmp_path / "out"

    report = collect_outputs(ws, ["dist/*.bin"], out)

    assert [c.path for c in report.collected] == sorted(
        ["dist/" + os.fsdecode(b"caf\xe9.bin"), "dist/new\nline.bin"]
    )
    with open(os.fsencode(out / "dist") + b"/caf\xe9.bin", "rb") as f:
        assert f.read() == b"latin-1"
    assert (out / "dist" / "new\nline.bin").read_bytes() == b"newline"


def test_hard_link_is_copied_as_an_independent_file(ws: Path, tmp_path: Path) -> None:
    (ws / "src.bin").write_bytes(b"v1")
    os.link(ws / "src.bin", ws / "dist" / "a.bin")
    out = tmp_path / "out"

    collect_outputs(ws, ["dist/*"], out)
    (ws / "src.bin").write_bytes(b"v2")

    assert (out / "dist" / "a.bin").read_bytes() == b"v1"
    assert (out / "dist" / "a.bin").stat().st_nlink == 1


def test_swapped_for_symlink_just_before_collection(
    ws: Path, tmp_path: Path, host_secret: Path
) -> None:
    target = ws / "dist" / "a.whl"
    target.write_bytes(b"wheel")
    swap = ws / "dist" / ".swap"
    swap.symlink_to(host_secret)
    os.rename(swap, target)  # atomic, as an attacker would do it

    report = collect_outputs(ws, ["dist/a.whl"], tmp_path / "out")

    assert report.collected == ()
    assert report.skipped == (SkippedOutput("dist/a.whl", "symlink"),)
    _assert_no_secret(tmp_path / "out")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("swap_in", ["symlink", "fifo"])
def test_racing_swaps_never_leak_or_block(
    ws: Path, tmp_path: Path, host_secret: Path, swap_in: str
) -> None:
    target = ws / "dist" / "a.whl"
    target.write_bytes(b"real")
    stop = threading.Event()

    def attacker() -> None:
        i = 0
        while not stop.is_set():
            tmp = ws / "dist" / f".swap{i}"
            if i % 2 == 0:
                tmp.write_bytes(b"real")
            elif swap_in == "symlink":
                tmp.symlink_to(host_secret)
            else:
                os.mkfifo(tmp)
            os.rename(tmp, target)
            i += 1

    thread = threading.Thread(target=attacker)
    thread.start()
    seen: set[str] = set()
    try:
        for n in range(300):
            out = tmp_path / f"out{n}"
            report = collect_outputs(ws, ["dist/a.whl"], out)
            for c in report.collected:
                assert (out / c.path).read_bytes() == b"real"
                assert c.sha256 == hashlib.sha256(b"real").hexdigest()
                seen.add("collected")
            for s in report.skipped:
                assert s.reason in {swap_in, "vanished during collection"}
                seen.add("skipped")
            _assert_no_secret(out)
    finally:
        stop.set()
        thread.join()
    assert seen  # the race was actually run


def test_unmatched_patterns_are_reported(ws: Path, tmp_path: Path) -> None:
    (ws / "dist" / "a.whl").write_bytes(b"wheel")

    report = collect_outputs(
        ws, ["dist/*.whl", "docs/*.pdf", "dist", "./dist/*.whl"], tmp_path / "o"
    )

    # "dist" names a directory, which is never an output.
    assert report.unmatched == ("docs/*.pdf", "dist")
    assert [c.path for c in report.collected] == ["dist/a.whl"]


def test_directory_pattern_collects_nothing_without_globstar(ws: Path, tmp_path: Path) -> None:
    (ws / "dist" / "sub").mkdir()
    (ws / "dist" / "sub" / "a").write_bytes(b"a")
    (ws / "dist" / "b").write_bytes(b"b")

    assert collect_outputs(ws, ["dist"], tmp_path / "o1").collected == ()
    assert [c.path for c in collect_outputs(ws, ["dist/*"], tmp_path / "o2").collected] == [
        "dist/b"
    ]
    assert [c.path for c in collect_outputs(ws, ["dist/**"], tmp_path / "o3").collected] == [
        "dist/b",
        "dist/sub/a",
    ]


def _deep(root: Path, depth: int) -> Path:
    path = root
    for _ in range(depth):
        path = path / "d"
    path.mkdir(parents=True)
    return path


def test_depth_limit(ws: Path, tmp_path: Path) -> None:
    _deep(ws / "junk", 300)

    # Patterns that cannot match below junk/ never enter it.
    assert collect_outputs(ws, ["dist/*"], tmp_path / "o1").unmatched == ("dist/*",)
    with pytest.raises(OutputError, match="256"):
        collect_outputs(ws, ["**/*.whl"], tmp_path / "o2")


def test_entry_limit(ws: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outputs_module, "_MAX_ENTRIES", 10)
    for i in range(20):
        (ws / "dist" / f"f{i}").write_bytes(b"")

    with pytest.raises(OutputError, match="10 entries"):
        collect_outputs(ws, ["**"], tmp_path / "out")


def test_missing_workspace(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="cannot open workspace"):
        collect_outputs(tmp_path / "nope", ["*"], tmp_path / "out")


def test_invalid_pattern_is_rejected_before_any_work(ws: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        collect_outputs(ws, ["../escape"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- the output directory ------------------------------------------------------------------


def _published(out: Path, locks: Path, files: dict[str, bytes]) -> None:
    with outputs_module.OutputDir(out, lock_dir=locks) as claimed:
        for name, data in files.items():
            claimed.write_file(name, data)
        claimed.publish()


def test_an_output_directory_is_replaced_as_a_whole(tmp_path: Path) -> None:
    locks = tmp_path / "locks"
    locks.mkdir(mode=0o700)
    out = tmp_path / "out"
    _published(out, locks, {"outputs.json": b"{}", "a": b"1"})
    _published(out, locks, {"outputs.json": b"{}", "b": b"2"})
    assert sorted(os.listdir(out)) == ["b", "outputs.json"]
    assert [n for n in os.listdir(tmp_path) if ".buildcell-" in n] == []


def test_one_build_at_a_time_holds_an_output_directory(tmp_path: Path) -> None:
    locks = tmp_path / "locks"
    locks.mkdir(mode=0o700)
    out = tmp_path / "out"
    with (
        outputs_module.OutputDir(out, lock_dir=locks),
        pytest.raises(OutputError, match="in use by another build"),
    ):
        outputs_module.OutputDir(out, lock_dir=locks, wait=False)
    # Released on close, and the lock is not on the directory anyone may open.
    outputs_module.OutputDir(out, lock_dir=locks, wait=False).close()
    assert [p.name for p in locks.iterdir()] == [
        f"out-{hashlib.sha256(os.fsencode(out)).hexdigest()[:32]}.lock"
    ]


def test_a_lock_on_the_directory_itself_blocks_no_build(tmp_path: Path) -> None:
    import fcntl

    locks = tmp_path / "locks"
    locks.mkdir(mode=0o700)
    out = tmp_path / "out"
    _published(out, locks, {"outputs.json": b"{}"})
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what any local user may do to a 0755 directory
        _published(out, locks, {"outputs.json": b"{}", "x": b""})
    finally:
        os.close(fd)
    assert (out / "x").exists()


def test_a_live_staging_directory_of_another_state_directory_is_not_a_leftover(
    tmp_path: Path,
) -> None:
    first, second = tmp_path / "locks1", tmp_path / "locks2"
    first.mkdir(mode=0o700)
    second.mkdir(mode=0o700)
    out = tmp_path / "out"
    killed = tmp_path / f".out{outputs_module._STAGING_INFIX}dead"
    killed.mkdir()
    (killed / "old").write_bytes(b"")
    with outputs_module.OutputDir(out, lock_dir=first) as a:
        a.write_file("outputs.json", b"{}")
        staged = a.staging
        with outputs_module.OutputDir(out, lock_dir=second) as b:
            assert staged.is_dir(), "a live build's staging directory was removed"
            assert not killed.exists(), "a killed build's staging directory was kept"
            b.write_file("outputs.json", b"{}")
            b.publish()
        a.publish()
    assert (out / "outputs.json").read_bytes() == b"{}"
    assert [n for n in os.listdir(tmp_path) if ".buildcell-" in n] == []


def test_a_symlinked_lock_file_is_not_followed(tmp_path: Path) -> None:
    locks = tmp_path / "locks"
    locks.mkdir(mode=0o700)
    out = tmp_path / "out"
    victim = tmp_path / "victim"
    victim.write_text("keep")
    name = f"out-{hashlib.sha256(os.fsencode(out)).hexdigest()[:32]}.lock"
    (locks / name).symlink_to(victim)
    with pytest.raises(OutputError, match="cannot lock output directory"):
        outputs_module.OutputDir(out, lock_dir=locks)
    assert victim.read_text() == "keep"
    assert not out.exists()
