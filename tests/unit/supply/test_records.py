"""Build records: one typed reader that never crashes, writes that are whole, and builds
whose supervisor died finalized on disk."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from buildcell.errors import Error, StateError
from buildcell.supply.records import (
    BuildRecord,
    RecordStore,
    StepRecord,
    UnreadableRecord,
    parse_record,
)

#: A pid no process has (above the kernel's pid_max).
DEAD_PID = 2**22 + 12345


def _record(build_id: str, *, project: str = "default", steps: int = 1) -> BuildRecord:
    return BuildRecord(
        id=build_id,
        name="n",
        spec_path="/x/buildcell.yaml",
        spec_digest="sha256:" + "0" * 64,
        steps=[StepRecord(f"s{i}") for i in range(steps)],
        project=project,
    )


def _readable(found: object) -> BuildRecord:
    assert isinstance(found, BuildRecord), found
    return found


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
    loaded = _readable(store.load(b.id))
    assert loaded.steps == [StepRecord("s0")]
    assert loaded.duration is not None
    assert loaded == b


def test_a_build_appears_only_complete(tmp_path: Path) -> None:
    store = RecordStore(tmp_path / "builds")
    r = _record("20261128T100000-aaaaaaaa")
    where = store.create(r, "version: 1\n")
    assert sorted(p.name for p in where.iterdir()) == ["logs", "record.json", "spec.yaml"]
    assert [p.name for p in (tmp_path / "builds").iterdir()] == [r.id]  # no temp left
    assert os.stat(where).st_mode & 0o777 == 0o700
    assert os.stat(where / "record.json").st_mode & 0o777 == 0o600


def test_a_build_that_cannot_be_recorded_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    store = RecordStore(tmp_path / "builds")
    real = os.fsync
    calls = 0

    def full(fd: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:  # the record, after the spec
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr("buildcell.state.os.fsync", full)
    with pytest.raises(StateError, match=r"^no space left in .* free\): cannot write"):
        store.create(_record("20261128T100000-aaaaaaaa"), "version: 1\n")
    assert list((tmp_path / "builds").iterdir()) == []


def test_a_save_that_fails_keeps_the_previous_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    store = RecordStore(tmp_path / "builds")
    r = _record("20261128T100000-aaaaaaaa")
    store.create(r, "")
    before = (store.dir(r.id) / "record.json").read_bytes()
    r.status = "succeeded"

    def full(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("buildcell.state.os.write", full)
    with pytest.raises(StateError) as raised:
        store.save(r)
    assert str(store.dir(r.id)) in raised.value.message
    assert "free" in raised.value.message and "\n" not in raised.value.message
    monkeypatch.undo()
    assert (store.dir(r.id) / "record.json").read_bytes() == before
    assert sorted(p.name for p in store.dir(r.id).iterdir()) == ["logs", "record.json", "spec.yaml"]


def test_a_running_record_of_a_dead_supervisor_is_finalized_on_disk(tmp_path: Path) -> None:
    store = RecordStore(tmp_path / "builds")
    r = _record("20261128T120000-cccccccc", steps=3)
    store.create(r, "")
    assert _readable(store.load(r.id)).status == "running"  # its supervisor is us, alive
    assert store.finalized == []
    r.steps[0].status = "succeeded"
    r.steps[1].status = "running"
    r.supervisor = {"pid": DEAD_PID, "start": 1}
    store.save(r)
    found = _readable(store.load(r.id))
    assert found.status == "interrupted"
    assert [s.status for s in found.steps] == ["succeeded", "interrupted", "skipped"]
    assert found.finished is not None and found.error is not None
    assert store.finalized == [r.id]
    on_disk = json.loads((store.dir(r.id) / "record.json").read_text())
    assert on_disk["status"] == "interrupted"
    assert [s["status"] for s in on_disk["steps"]] == ["succeeded", "interrupted", "skipped"]
    again = RecordStore(tmp_path / "builds")
    again.load(r.id)
    assert again.finalized == []  # once


def test_a_build_that_finishes_while_it_is_read_is_not_taken_for_dead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gc read a record as running; its supervisor then wrote the build's end and exited
    before gc looked for it: the end must stand, not be overwritten as interrupted.
    (Seen with `gc` in a loop beside quick `run`s.)"""
    from buildcell.supply import records

    store = RecordStore(tmp_path / "builds")
    r = _record("20261128T120000-eeeeeeee")
    r.supervisor = {"pid": DEAD_PID, "start": 1}
    store.create(r, "")

    def finishes_then_gone(supervisor: object) -> bool:
        r.status = "succeeded"
        r.steps[0].status = "succeeded"
        RecordStore(tmp_path / "builds").save(r)  # its last write, then it exits
        return False

    monkeypatch.setattr(records, "_supervisor_alive", finishes_then_gone)
    found = _readable(store.load(r.id))
    assert found.status == "succeeded" and store.finalized == []
    on_disk = json.loads((store.dir(r.id) / "record.json").read_text())
    assert on_disk["status"] == "succeeded"


# -- malformed records: listed as unreadable, never a crash ------------------------------

GOOD = _record("20261128T130000-dddddddd").to_dict()


def _with(**changes: Any) -> bytes:
    return json.dumps({**GOOD, **changes}).encode()


MALFORMED: dict[str, bytes] = {
    "supervisor-int": _with(supervisor=5),
    "started-text": _with(started="yesterday"),
    "started-nan": _with(started=float("nan")),
    "started-negative": _with(started=-5),
    "finished-list": _with(finished=[1]),
    "steps-text": _with(steps="all"),
    "step-name-int": _with(steps=[{"name": 3}]),
    "step-name-path": _with(steps=[{"name": "../../etc/passwd"}]),
    "step-twice": _with(steps=[{"name": "a"}, {"name": "a"}]),
    "step-status": _with(steps=[{"name": "a", "status": "exploded"}]),
    "status": _with(status="maybe"),
    "id-other": _with(id="20261128T130000-eeeeeeee"),
    "project": _with(project="../other"),
    "bool-exit": _with(exit_code=True),
    "outputs-dict": _with(outputs={"a": 1}),
    "empty": b"",
    "spaces": b"  \n",
    "truncated": _with()[:40],
    "list": b"[]",
    "null": b"null",
    "not-json": b"\xff\xfe garbage",
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_a_malformed_record_is_listed_as_unreadable(tmp_path: Path, kind: str) -> None:
    store = RecordStore(tmp_path / "builds")
    good = _record("20261128T120000-cccccccc")
    store.create(good, "")
    bad = store.dir(GOOD["id"])
    bad.mkdir(mode=0o700)
    (bad / "record.json").write_bytes(MALFORMED[kind])
    listed = store.recent()
    assert [r.id for r in listed] == [GOOD["id"], good.id]  # nothing hidden, nothing lost
    unreadable = listed[0]
    assert isinstance(unreadable, UnreadableRecord)
    assert unreadable.reason and "\n" not in unreadable.reason
    for value in ("yesterday", "exploded", "maybe", "etc/passwd", "garbage"):
        assert value not in unreadable.reason  # fields and kinds, never values
    assert unreadable.to_dict()["status"] == "unreadable"
    assert isinstance(store.load(GOOD["id"]), UnreadableRecord)
    with pytest.raises(Error, match="unreadable"):
        store.load_record(GOOD["id"])


@pytest.mark.parametrize("kind", ["directory", "symlink", "fifo", "missing"])
def test_a_record_that_is_not_a_file_is_unreadable(tmp_path: Path, kind: str) -> None:
    store = RecordStore(tmp_path / "builds")
    bad = store.dir(GOOD["id"])
    bad.mkdir(mode=0o700)
    target = bad / "record.json"
    if kind == "directory":
        target.mkdir()
    elif kind == "symlink":
        (tmp_path / "elsewhere.json").write_bytes(_with())
        target.symlink_to(tmp_path / "elsewhere.json")
    elif kind == "fifo":
        os.mkfifo(target)
    (listed,) = store.recent()
    assert isinstance(listed, UnreadableRecord), listed
    assert "record.json" in listed.reason


def test_an_unreadable_record_of_another_project_stays_hidden(tmp_path: Path) -> None:
    root = tmp_path / "builds"
    RecordStore(root).create(_record("20261128T120000-cccccccc", project="mine"), "")
    theirs = root / GOOD["id"]
    theirs.mkdir(mode=0o700)
    (theirs / "record.json").write_bytes(_with(project="theirs", started="x"))
    assert [r.id for r in RecordStore(root, project="mine").recent()] == [
        "20261128T120000-cccccccc"
    ]
    assert [r.id for r in RecordStore(root, project="theirs").recent()] == [GOOD["id"]]


def test_a_step_log_that_is_not_a_file_is_an_error_not_a_crash(tmp_path: Path) -> None:
    store = RecordStore(tmp_path / "builds")
    r = _record("20261128T120000-cccccccc")
    store.create(r, "")
    assert store.read_log(r.id, "s0") is None
    store.log_path(r.id, "s0").mkdir()
    with pytest.raises(Error, match=r"log of step 's0' .* unreadable: s0.log is a directory"):
        store.read_log(r.id, "s0")


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=6)
    ),
    max_leaves=30,
)
_FIELDS = st.sampled_from(sorted(GOOD))


@settings(max_examples=300, deadline=None)
@given(
    changes=st.dictionaries(_FIELDS, _JSON, max_size=4),
    whole=st.one_of(st.none(), _JSON),
)
def test_any_json_is_a_record_or_a_reason(changes: dict[str, Any], whole: Any) -> None:
    doc = whole if whole is not None else {**GOOD, **changes}
    data = json.dumps(doc).encode()
    try:
        record = parse_record(data, build_id=GOOD["id"])
    except ValueError as e:
        problem = str(e)
        assert problem
        assert "\n" not in problem
        return
    # What validates renders: every field a reader uses has its type.
    assert isinstance(record.started, float)
    assert all(isinstance(s.name, str) for s in record.steps)
    json.dumps(record.to_dict())
    time.localtime(record.started)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200))
def test_any_bytes_are_a_record_or_a_reason(data: bytes) -> None:
    try:
        parse_record(data, build_id=GOOD["id"])
    except ValueError as e:
        problem = str(e)
        assert problem
