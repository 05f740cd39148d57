"""``buildcell gc`` keeps the state directory bounded: old records, unused images, and
content store entries no record lists go; running builds and what they use stay."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from buildcell.build.gc import Retention, collect_garbage
from buildcell.state import StateDir
from buildcell.supply.records import BuildRecord, RecordStore

DAY = 86400.0
NOW = time.time()
KEEP_ALL = Retention(records_max_age=1e9, records_keep=10**6, images_max_age=1e9)


def build_id(n: int) -> str:
    return f"2026010{n}T000000-{n:08x}"


def add_record(
    state: StateDir,
    n: int,
    *,
    age_days: float,
    status: str = "succeeded",
    inputs: list[str] = (),  # type: ignore[assignment]
) -> str:
    store = RecordStore(state.root / "builds")
    record = BuildRecord(
        id=build_id(n),
        name="demo",
        spec_path="buildcell.yaml",
        spec_digest="0" * 64,
        status="running",
        started=NOW - age_days * DAY - 60,
        inputs=[{"uri": "file:x", "sha256": d, "path": "x", "size": 1} for d in inputs],
    )
    store.create(record, "version: 1\n")
    if status != "running":
        record.status = status
        record.finished = NOW - age_days * DAY
        store.save(record)
    return record.id


def listed(state: StateDir) -> list[str]:
    return sorted(p.name for p in (state.root / "builds").iterdir())


def test_records_beyond_the_count_or_too_old_are_removed(state: StateDir) -> None:
    for n in range(1, 7):
        add_record(state, n, age_days=10 - n)  # 1 is the oldest (9 days), 6 the newest
    report = collect_garbage(
        state, retention=Retention(records_max_age=7 * DAY, records_keep=4), now=NOW
    )
    # 1 and 2 are beyond the newest four; 3 (7 days old) is within max_age
    assert sorted(report.records_removed) == [build_id(1), build_id(2)]
    assert listed(state) == [build_id(n) for n in range(3, 7)]
    report = collect_garbage(
        state, retention=Retention(records_max_age=5.5 * DAY, records_keep=10), now=NOW
    )
    assert sorted(report.records_removed) == [build_id(3), build_id(4)]
    assert "removed 2 old build record(s)" in report.summary()


def test_a_running_build_and_an_unreadable_record_are_never_removed(state: StateDir) -> None:
    running = add_record(state, 1, age_days=100, status="running")
    add_record(state, 2, age_days=100)
    broken = state.root / "builds" / build_id(3)
    broken.mkdir()
    (broken / "record.json").write_text("{not json")
    report = collect_garbage(
        state, retention=Retention(records_max_age=DAY, records_keep=0), now=NOW
    )
    assert report.records_removed == [build_id(2)]
    assert listed(state) == [running, build_id(3)]
    assert any("unreadable" in w for w in report.warnings)


def test_a_removal_cut_short_is_finished_and_never_listed(state: StateDir) -> None:
    add_record(state, 1, age_days=1)
    builds = state.root / "builds"
    os.rename(builds / build_id(1), builds / f".gone-{build_id(1)}")
    assert RecordStore(builds).recent() == []
    collect_garbage(state, retention=KEEP_ALL, now=NOW)
    assert listed(state) == []


def _cas_entry(state: StateDir, digest: str, *, age: float = 2 * DAY) -> Path:
    path = state.root / "cas" / "sha256" / digest[:2] / digest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"content of " + digest.encode())
    os.utime(path, (NOW - age, NOW - age))
    return path


def test_store_entries_no_record_lists_are_removed(state: StateDir) -> None:
    used, orphan, young, of_old = "a" * 64, "b" * 64, "c" * 64, "d" * 64
    add_record(state, 2, age_days=1, inputs=[used])
    add_record(state, 1, age_days=90, inputs=[of_old])
    paths = {d: _cas_entry(state, d) for d in (used, orphan, of_old)}
    paths[young] = _cas_entry(state, young, age=1)  # a fetch may be writing it
    report = collect_garbage(
        state, retention=Retention(records_max_age=30 * DAY, records_keep=10), now=NOW
    )
    # The old record goes first; the input only it listed follows it.
    assert report.records_removed == [build_id(1)]
    assert report.cas_removed == 2
    assert paths[used].exists() and paths[young].exists()
    assert not paths[orphan].exists() and not paths[of_old].exists()


def test_the_store_waits_while_a_build_may_be_fetching(state: StateDir) -> None:
    add_record(state, 1, age_days=0, status="running")  # no step started: inputs unknown
    orphan = _cas_entry(state, "e" * 64)
    report = collect_garbage(state, retention=KEEP_ALL, now=NOW)
    assert report.cas_removed == 0 and orphan.exists()
    assert report.cas_skipped is not None and "fetching" in report.cas_skipped


def test_the_store_is_left_alone_while_a_record_is_unreadable(state: StateDir) -> None:
    broken = state.root / "builds" / build_id(1)
    broken.mkdir(parents=True)
    (broken / "record.json").write_text("[]")
    orphan = _cas_entry(state, "f" * 64)
    report = collect_garbage(state, retention=KEEP_ALL, now=NOW)
    assert orphan.exists()
    assert report.cas_skipped is not None and "unreadable" in report.cas_skipped
    assert len(report.warnings) == 1  # the record's own


def test_defaults_come_from_the_configuration_file(
    state: StateDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for n in range(1, 4):
        add_record(state, n, age_days=n)
    config = tmp_path / "config.yaml"
    config.write_text("records: {max_age: 60h, keep: 5}\n")
    monkeypatch.setenv("BUILDCELL_CONFIG", str(config))
    report = collect_garbage(StateDir(state.root), now=NOW)
    assert report.records_removed == [build_id(3)]
