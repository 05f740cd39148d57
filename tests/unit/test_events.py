from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from buildcell.events import EventLog


def test_events_are_json_lines_with_the_contract_fields(tmp_path: Path) -> None:
    path = tmp_path / "ev.jsonl"
    seen: list[dict[str, Any]] = []
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
