from __future__ import annotations

import os
from pathlib import Path

import pytest

from buildcell.cell.bwrap import Mount
from buildcell.cell.resolve import resolve_command
from buildcell.errors import CommandNotExecutableError, CommandNotFoundError


@pytest.fixture
def view(tmp_path: Path) -> list[Mount]:
    usr = tmp_path / "usr"
    (usr / "bin").mkdir(parents=True)
    for name, mode in (("make", 0o755), ("notexec", 0o644), ("gcc-12", 0o755)):
        (usr / "bin" / name).write_text("#!/bin/sh\n")
        os.chmod(usr / "bin" / name, mode)
    (usr / "bin" / "somedir").mkdir()
    alternatives = tmp_path / "alternatives"
    alternatives.mkdir()
    (alternatives / "cc").symlink_to("/usr/bin/gcc-12")
    (usr / "bin" / "cc").symlink_to("/etc/alternatives/cc")
    (usr / "bin" / "dangling").symlink_to("/nowhere")
    (usr / "bin" / "loop").symlink_to("loop")
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "build.sh").write_text("#!/bin/sh\n")
    os.chmod(ws / "build.sh", 0o755)
    return [
        Mount("ro-bind", "/usr", src=str(usr)),
        Mount("symlink", "/bin", src="usr/bin"),
        Mount("ro-bind", "/etc/alternatives", src=str(alternatives)),
        Mount("ro-bind", "/etc/passwd", src=str(ws / "build.sh")),
        Mount("tmpfs", "/tmp"),
        Mount("bind", "/workspace", src=str(ws)),
        Mount("remount-ro", "/"),
    ]


def resolve(view: list[Mount], name: str, path: str = "/usr/local/bin:/usr/bin:/bin") -> str:
    return resolve_command(name, mounts=view, path_env=path, cwd="/workspace",
                           host_uid=os.getuid(), host_gid=os.getgid())  # fmt: skip


def test_path_search(view: list[Mount]) -> None:
    assert resolve(view, "make") == "/usr/bin/make"
    assert resolve(view, "make", path="/bin") == "/bin/make"


def test_symlinks_resolved_in_the_cells_view(view: list[Mount]) -> None:
    assert resolve(view, "cc") == "/usr/bin/cc"
    assert resolve(view, "/bin/cc") == "/bin/cc"


def test_relative_to_workspace(view: list[Mount]) -> None:
    assert resolve(view, "./build.sh") == "/workspace/build.sh"


@pytest.mark.parametrize("name", ["nosuch", "/usr/bin/nosuch", "dangling", "loop", "./nope"])
def test_not_found(view: list[Mount], name: str) -> None:
    with pytest.raises(CommandNotFoundError) as e:
        resolve(view, name)
    assert e.value.exit_code == 127


@pytest.mark.parametrize("name", ["notexec", "/usr/bin/somedir", "/etc", "/workspace"])
def test_not_executable(view: list[Mount], name: str) -> None:
    with pytest.raises(CommandNotExecutableError) as e:
        resolve(view, name)
    assert e.value.exit_code == 126


def test_unknowable_paths_are_left_to_the_kernel(view: list[Mount]) -> None:
    assert resolve(view, "/tmp/made-at-runtime") == "/tmp/made-at-runtime"
