from __future__ import annotations

import os
from pathlib import Path

import pytest

from buildcell.errors import StateError
from buildcell.state import StateDir, default_state_dir


def test_state_dir_layout_and_modes(state_root: Path) -> None:
    state = StateDir(state_root / "s")
    mode = 0o711 if os.geteuid() == 0 else 0o700
    assert (state.root.stat().st_mode & 0o777) == mode
    assert (state.cells.stat().st_mode & 0o777) == mode
    assert (state.ids.stat().st_mode & 0o777) == 0o700
    assert len(state.tag) == 8
    assert StateDir(state_root / "s").tag == state.tag


def test_state_dir_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(StateError):
        StateDir(tmp_path / "f")


def test_state_dir_must_be_reachable_by_cells_when_root(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    with pytest.raises(StateError, match="not reachable by the cells' uids"):
        StateDir(private / "state")


def test_default_state_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BUILDCELL_STATE_DIR", str(tmp_path / "x"))
    assert default_state_dir() == tmp_path / "x"
    monkeypatch.delenv("BUILDCELL_STATE_DIR")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    expected = Path("/var/lib/buildcell") if os.geteuid() == 0 else tmp_path / "buildcell"
    assert default_state_dir() == expected
