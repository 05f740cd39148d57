from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from buildcell.errors import Error
from buildcell.supply.records import BuildRecord, RecordStore, StepRecord


def _record(build_id: str, **kw: object) -> BuildRecord:
    return BuildRecord(
        id=build_id,
        name="n",
        spec_path="/x/buildcell.yaml",
        spec_digest="sha256:" + "0" * 64,
        steps=[StepRecord("s")],
        **kw,
    )  # type: ignore[arg-type]


def test_record_round_trip_and_prefix_lookup(tmp_path: Path) -> None:
    store = RecordStore(tmp_path / "builds")
    a = _record("20261128T100000-aaaaaaaa")
    b = _record("20261128T110000-bbbbbbbb")
    for r in (a, b):
        store.create(r, "version: 1\n")
        r.status = "succeeded"
        r.finished = time.time()
        store.save(r)
    assert store.load("20261128T10").id == a.id
    with pytest.raises(Error, match="ambiguous"):
        store.load("20261128T1")
    with pytest.raises(Error, match="no build"):
        store.load("1999")
    assert [r.id for r in store.recent()] == [b.id, a.id]
    loaded = store.load(b.id)
    assert loaded.steps == [StepRecord("s")]
    assert loaded.duration is not None


def test_running_record_of_a_dead_supervisor_reads_as_interrupted(tmp_path: Path) -> None:
    store = RecordStore(tmp_path / "builds")
    r = _record("20261128T120000-cccccccc")
    store.create(r, "")
    assert store.load(r.id).status == "running"
    r.supervisor = {"pid": 2**22 + 12345, "start": 1}
    store.save(r)
    assert store.load(r.id).status == "interrupted"
    assert os.stat(store.dir(r.id)).st_mode & 0o777 == 0o700
