"""State damaged on purpose, through the real command line: malformed records, step logs
that are not files, and derived caches with a flipped bit or cut short. Every command
keeps working, says what it found, and repairs what it can, with a warning."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, cast

import pytest
from tests.conftest import one_error
from tests.reliability.conftest import cli

pytestmark = pytest.mark.slow

SPEC = """\
version: 1
name: damaged
steps:
  - {name: make, run: "mkdir -p dist && echo built > dist/a"}
outputs: ["dist/*"]
"""


def _project(work: Path) -> tuple[Path, Path]:
    src = work / "src"
    src.mkdir(mode=0o755)
    (src / "buildcell.yaml").write_text(SPEC)
    return src, work / "state"


def _build(state: Path, src: Path) -> str:
    res = cli(state, "build", "--project", "p", "--json", cwd=src)
    assert res.returncode == 0, res.stderr[-2000:]
    return str(json.loads(res.stdout)["id"])


def _record_path(state: Path, build_id: str) -> Path:
    return state / "builds" / build_id / "record.json"


DAMAGE: dict[str, Any] = {
    "supervisor-int": {"supervisor": 5},
    "started-text": {"started": "yesterday"},
    "steps-null": {"steps": None},
    "step-status": {"steps": [{"name": "make", "status": 7}]},
    "empty": b"",
    "truncated": 0.5,
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_every_command_survives_a_malformed_record(work: Path, kind: str) -> None:
    src, state = _project(work)
    good = _build(state, src)
    bad = _build(state, src)
    path = _record_path(state, bad)
    damage = DAMAGE[kind]
    if isinstance(damage, dict):
        path.write_text(json.dumps({**json.loads(path.read_text()), **damage}))
    elif isinstance(damage, bytes):
        path.write_bytes(damage)
    else:
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * damage)])

    ls = cli(state, "ls", "--project", "p", "--json", cwd=src)
    assert ls.returncode == 0, ls.stderr[-2000:]
    listed = cast("list[dict[str, Any]]", json.loads(ls.stdout))
    assert [r["id"] for r in listed] == [bad, good]  # not a silent disappearance
    assert listed[0]["status"] == "unreadable" and listed[0]["error"]
    assert listed[1]["status"] == "succeeded"
    table = cli(state, "ls", "--project", "p", cwd=src)
    assert table.returncode == 0 and "unreadable" in table.stdout, table.stderr

    show = cli(state, "show", bad, "--project", "p", cwd=src)
    assert show.returncode == 0, show.stderr[-2000:]
    assert "unreadable" in show.stdout
    show_json = cli(state, "show", bad, "--project", "p", "--json", cwd=src)
    assert json.loads(show_json.stdout)["status"] == "unreadable"
    assert "unreadable" in one_error(cli(state, "logs", bad, "--project", "p", cwd=src))
    assert cli(state, "logs", good, "--project", "p", cwd=src).returncode == 0

    gc = cli(state, "gc", "--json", cwd=src)
    assert gc.returncode == 0, gc.stderr[-2000:]
    warnings = json.loads(gc.stdout)["warnings"]
    assert len(warnings) == 1 and bad in warnings[0], warnings
    assert f"build {bad}: unreadable" in gc.stderr
    assert path.parent.is_dir(), "gc removed what it could not read"
    assert _build(state, src)  # and the next build runs


def test_a_step_log_replaced_by_a_directory(work: Path) -> None:
    src, state = _project(work)
    build_id = _build(state, src)
    log = state / "builds" / build_id / "logs" / "make.log"
    log.unlink()
    log.mkdir()
    res = cli(state, "logs", build_id, "--project", "p", cwd=src)
    assert "is a directory" in one_error(res)


def test_a_killed_build_shows_its_steps_interrupted(work: Path) -> None:
    src, state = _project(work)
    build_id = _build(state, src)
    path = _record_path(state, build_id)
    record = json.loads(path.read_text())
    record.update(status="running", finished=None, supervisor={"pid": 2**22 + 99, "start": 1})
    record["steps"][0]["status"] = "running"
    path.write_text(json.dumps(record))
    show = cli(state, "show", build_id, "--project", "p", "--json", cwd=src)
    assert show.returncode == 0, show.stderr
    shown = json.loads(show.stdout)
    assert shown["status"] == "interrupted"
    assert shown["steps"][0]["status"] == "interrupted"
    assert "recorded as interrupted" in show.stderr
    assert json.loads(path.read_text())["status"] == "interrupted"  # on disk, once


# -- derived caches: verified when loaded, rebuilt with a warning that names the file ------


def _flip(path: Path, where: float) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip-head", "flip-program", "truncate", "empty"])
def test_a_damaged_compiled_seccomp_filter_is_rebuilt(work: Path, damage: str) -> None:
    src, state = _project(work)
    first = cli(state, "run", "--", "true", cwd=src)
    assert first.returncode == 0, first.stderr
    (cached,) = (state / "cache").glob("seccomp-*.bpf")
    if damage == "flip-head":
        _flip(cached, 0.1)
    elif damage == "flip-program":
        _flip(cached, 0.7)
    elif damage == "truncate":
        cached.write_bytes(cached.read_bytes()[:-8])
    else:
        cached.write_bytes(b"")
    # keyctl is refused by the default profile: a damaged filter must not let it through.
    probe = (
        "import ctypes, sys; libc = ctypes.CDLL(None, use_errno=True); "
        # keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING): a keyring id when allowed
        "r = libc.syscall(250, 0, -3, 0); "
        "sys.exit(0 if r == -1 and ctypes.get_errno() == 1 else 3)"
    )
    res = cli(state, "run", "--", "python3", "-c", probe, cwd=src)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"the cached seccomp filter {cached}" in res.stderr, res.stderr
    assert "compiled it again" in res.stderr
    quiet = cli(state, "run", "--", "true", cwd=src)
    assert quiet.returncode == 0 and "seccomp filter" not in quiet.stderr, quiet.stderr


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_unpacked_image_is_unpacked_again(work: Path, damage: str) -> None:
    from tests.oci_images import make_busybox_layout

    src, state = _project(work)
    layout = work / "image"
    digest = make_busybox_layout(layout)
    if digest is None:
        pytest.skip("needs /bin/busybox")
    rootfs = f"oci:{layout}@{digest}"
    first = cli(state, "run", "--rootfs", rootfs, "--", "/bin/sh", "-c", "echo ok", cwd=src)
    assert first.returncode == 0, first.stderr[-2000:]
    (tree,) = (state / "cache" / "oci").glob("*/rootfs")
    target = tree / "bin" / "busybox"
    if damage == "flip":
        _flip(target, 0.5)
    else:
        target.write_bytes(target.read_bytes()[:4096])
    res = cli(state, "run", "--rootfs", rootfs, "--", "/bin/sh", "-c", "echo ok", cwd=src)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "ok"
    assert f"the unpacked image {tree.parent} was damaged" in res.stderr, res.stderr
    again = cli(state, "run", "--rootfs", rootfs, "--", "/bin/sh", "-c", "echo ok", cwd=src)
    assert "damaged" not in again.stderr


@pytest.mark.parametrize("damage", ["truncate", "remove", "kind", "manifest", "no-manifest"])
def test_a_damaged_etc_copy_is_made_again(work: Path, damage: str) -> None:
    """The cells' /etc is a copy in the state directory: one damaged (a crash before its
    data reached the disk, a file lost or replaced, a broken manifest) is never bound; the
    next run makes it again and says which it was."""
    src, state = _project(work)
    first = cli(state, "run", "--", "cat", "/etc/passwd", cwd=src)
    assert first.returncode == 0, first.stderr
    copy = state / "etc" / os.readlink(state / "etc" / "current")
    if damage == "truncate":
        os.truncate(copy / "etc" / "ld.so.cache", 0)
    elif damage == "remove":
        (copy / "etc" / "passwd").unlink()
    elif damage == "kind":
        (copy / "etc" / "hosts").unlink()
        (copy / "etc" / "hosts").mkdir()
    elif damage == "manifest":
        body = (copy / "manifest").read_bytes()
        (copy / "manifest").write_bytes(body[: len(body) // 2])
    else:
        (copy / "manifest").unlink()
    res = cli(state, "run", "--", "sh", "-c", "cat /etc/passwd; ldd /bin/true >/dev/null", cwd=src)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout == first.stdout
    assert f"the prepared /etc {copy} is damaged" in res.stderr, res.stderr
    assert "made it again" in res.stderr
    quiet = cli(state, "run", "--", "true", cwd=src)
    assert quiet.returncode == 0 and "/etc" not in quiet.stderr, quiet.stderr
