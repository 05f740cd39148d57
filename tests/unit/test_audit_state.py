from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from buildcell.errors import StateError
from buildcell.events import EventLog
from buildcell.state import StateDir, default_state_dir


def test_events_are_json_lines_with_the_contract_fields(tmp_path: Path) -> None:
    path = tmp_path / "ev.jsonl"
    seen = []
    with EventLog(path, build="b1") as log:
        log.subscribe(seen.append)
        log.emit("cell.start", step="compile", argv=["make"])
        log.emit("teardown")
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [e["event"] for e in lines] == ["cell.start", "teardown"]
    assert lines[0]["build"] == "b1"
    assert lines[0]["step"] == "compile"
    assert "step" not in lines[1]
    assert lines == seen
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_concurrent_writers_never_interleave(tmp_path: Path) -> None:
    path = tmp_path / "ev.jsonl"
    logs = [EventLog(path, build=f"b{i}") for i in range(4)]

    def write(log: EventLog) -> None:
        for i in range(200):
            log.emit("x", payload="y" * 300, n=i)

    threads = [threading.Thread(target=write, args=(log,)) for log in logs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for log in logs:
        log.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 800
    assert all(json.loads(line)["event"] == "x" for line in lines)


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


@pytest.mark.skipif(os.geteuid() != 0, reason="root only")
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
