"""Cell ids: unique, and sorted in the order they were made, even within one second; a
cell's directory removed so that an interrupted removal is still gc's to finish."""

from __future__ import annotations

import json
import re
import time

import pytest

from buildcell.cell.storage import CellStorage, new_cell_id
from buildcell.state import StateDir


def test_ids_made_within_a_second_sort_in_the_order_made() -> None:
    ids = []
    for _ in range(40):
        ids.append(new_cell_id())
        time.sleep(0.002)  # more than the millisecond the id resolves
    assert all(re.fullmatch(r"\d{8}T\d{6}-[0-9a-f]{8}", i) for i in ids), ids
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_a_teardown_cut_short_leaves_the_record_for_gc(
    state: StateDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A supervisor killed while it removes its cell's directory must leave ``cell.json``
    (removed last): without it, gc takes the rest for a cell still being made."""
    import buildcell.cell.storage as storage_mod
    from buildcell.build.gc import collect_garbage
    from buildcell.cell.supervisor import find_bwrap

    st = CellStorage(state, cell_id=new_cell_id(), bwrap=find_bwrap(state.host), disk=None)
    (st.workspace / "a").mkdir()
    (st.workspace / "b").write_text("b")

    def killed(*_: object, **__: object) -> None:
        raise KeyboardInterrupt  # where the supervisor's SIGKILL would stop it

    monkeypatch.setattr(storage_mod, "remove_entry", killed)
    with pytest.raises(KeyboardInterrupt):
        st.close()
    assert (st.dir / "cell.json").exists() and (st.dir / "workspace").exists()
    monkeypatch.undo()
    st.identity.close()
    record = json.loads((st.dir / "cell.json").read_text())
    record["supervisor"] = {"pid": 2**22 + 1, "start": 0}  # a supervisor that is gone
    (st.dir / "cell.json").write_text(json.dumps(record))
    report = collect_garbage(state)
    assert st.dir.name in report.removed and not st.dir.exists()
