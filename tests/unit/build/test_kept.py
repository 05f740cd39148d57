"""Kept workspaces (``build --keep-failed``): what a record says of one, who may use it,
when ``gc`` removes it; and the shell's cell, planned from the record and the spec."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from buildcell.build.kept import (
    DEFAULT_KEEP,
    KeptWorkspace,
    discard_kept,
    expire_kept,
    keep_workspace,
    kept_dir,
    using_kept,
)
from buildcell.build.shell import SHELL_ARGV, ShellPlan, plan_shell
from buildcell.build.spec import parse_spec
from buildcell.cell.config import Limits
from buildcell.errors import Error
from buildcell.redact import Secret
from buildcell.settings import Settings
from buildcell.state import StateDir
from buildcell.supply.records import BuildRecord, RecordStore, StepRecord

NOW = time.time()


def add_build(
    state: StateDir, n: int, *, status: str = "failed", kept_ago: float | None = 60.0
) -> BuildRecord:
    """A finished build; with ``kept_ago``, one that kept its workspace that long ago."""
    store = RecordStore(state.root / "builds")
    record = BuildRecord(
        id=f"20260101T00000{n}-{n:08x}",
        name="demo",
        spec_path="/src/buildcell.yaml",
        spec_digest="0" * 64,
    )
    store.create(record, "version: 1\n")
    record.status = status
    if kept_ago is not None:
        where = kept_dir(state, record.id)
        where.mkdir(parents=True)
        (where / "file").write_text("left by the step\n")
        kept = KeptWorkspace(where, "test", NOW - kept_ago, NOW - kept_ago + DEFAULT_KEEP)
        record.kept_workspace = kept.to_record()
    store.save(record)
    return record


def test_a_record_says_what_was_kept_or_nothing_usable() -> None:
    kept = KeptWorkspace(Path("/s/kept/x/workspace"), "test", 10.0, 20.0)
    assert KeptWorkspace.from_record(kept.to_record()) == kept
    assert KeptWorkspace.from_record(None) is None
    good = kept.to_record()
    for bad in (
        {**good, "path": 3},
        {**good, "step": None},
        {**good, "kept": True},
        {**good, "expires": float("nan")},
        {**good, "removed": "yesterday"},
        {k: v for k, v in good.items() if k != "expires"},
    ):
        assert KeptWorkspace.from_record(bad) is None


def test_using_a_build_that_kept_nothing_is_an_error_naming_the_flag(state: StateDir) -> None:
    record = add_build(state, 1, kept_ago=None)
    with pytest.raises(Error) as e, using_kept(state, record):
        pass
    assert e.value.exit_code == 125
    assert "kept no workspace" in e.value.message and "--keep-failed" in e.value.message


def test_using_a_removed_one_says_when(state: StateDir) -> None:
    record = add_build(state, 1)
    store = RecordStore(state.root / "builds")
    assert discard_kept(state, store, record)
    assert not kept_dir(state, record.id).parent.exists()
    again = store.load_record(record.id)
    assert again.kept_workspace is not None and again.kept_workspace["removed"] is not None
    with pytest.raises(Error, match=r"was removed on .* --keep-failed"), using_kept(state, again):
        pass


def test_a_record_cannot_point_the_shell_elsewhere(state: StateDir, tmp_path: Path) -> None:
    """The record names a path; the shell uses the state directory's own place for it."""
    record = add_build(state, 1)
    assert record.kept_workspace is not None
    record.kept_workspace["path"] = str(tmp_path)
    with using_kept(state, record) as kept:
        assert kept.path == kept_dir(state, record.id)


def test_gc_expires_what_is_due_and_leaves_the_rest(state: StateDir) -> None:
    fresh = add_build(state, 1, kept_ago=60)
    old = add_build(state, 2, kept_ago=DEFAULT_KEEP + 60)
    running = add_build(state, 3, status="running", kept_ago=DEFAULT_KEEP + 60)
    orphan = kept_dir(state, "20260101T000009-00000009")
    orphan.mkdir(parents=True)  # no record names it
    report = expire_kept(state)
    assert sorted(report.removed) == [old.id, orphan.parent.name]
    assert sorted(report.kept) == [fresh.id, running.id]
    assert kept_dir(state, fresh.id).is_dir() and not kept_dir(state, old.id).exists()
    record = RecordStore(state.root / "builds").load_record(old.id)
    assert record.kept_workspace is not None and record.kept_workspace["removed"] is not None
    # --kept-max-age: no longer than that after the build either.
    assert expire_kept(state, max_age=30).removed == [fresh.id]


def test_gc_leaves_one_a_shell_is_copying(state: StateDir) -> None:
    record = add_build(state, 1, kept_ago=DEFAULT_KEEP + 60)
    with using_kept(state, record):
        report = expire_kept(state)
        assert report.busy == [record.id] and kept_dir(state, record.id).is_dir()
        assert not discard_kept(state, RecordStore(state.root / "builds"), record)
    assert expire_kept(state).removed == [record.id]


def test_keep_workspace_moves_it_out_of_the_storage(state: StateDir) -> None:
    from buildcell.cell.storage import CellStorage

    storage = CellStorage(state, cell_id="20260101T000000-0000abcd", bwrap="bwrap", disk=None)
    with storage:
        (storage.workspace / "made.txt").write_text("x\n")
        kept = keep_workspace(storage, state, "20260101T000000-0000abcd", "test")
    assert kept.path == kept_dir(state, "20260101T000000-0000abcd")
    assert (kept.path / "made.txt").read_text() == "x\n"
    assert kept.expires - kept.kept == DEFAULT_KEEP
    assert not storage.dir.exists()
    assert (state.root / "kept").stat().st_mode & 0o777 == 0o700


# -- the shell's cell ---------------------------------------------------------------------------

SPEC = """\
version: 1
name: demo
env: {A: "1"}
limits: {memory: 512M, pids: 64, timeout: 5m}
steps:
  - name: prep
    run: "true"
  - name: test
    env: {B: "2"}
    limits: {cpus: 1.5}
    secrets: [{name: TOKEN, env: TOKEN}, {name: OTHER}]
    network: {allow: [pkgs.example.org, mirror.corp.internal]}
    run: exit 3
"""


def _plan(step: str = "test", secrets: tuple[Secret, ...] = (), **record: object) -> ShellPlan:
    loaded = parse_spec(SPEC, path=Path("/src/buildcell.yaml"))
    rec = BuildRecord(
        id="b1",
        name="demo",
        spec_path="/src/buildcell.yaml",
        spec_digest="0",
        steps=[StepRecord("prep"), StepRecord("test")],
        source_date_epoch=1700000000,
        invocation={
            "pinnedHosts": ["mirror.corp.internal:10.1.2.3"],
            "allow": ["mirror.corp.internal"],
        },
    )
    for key, value in record.items():
        setattr(rec, key, value)
    return plan_shell(
        loaded,
        rec,
        step=step,
        secrets=secrets,
        settings=Settings(),
        limits_of=lambda limits: limits,
    )


def test_the_shell_is_the_steps_cell_on_a_terminal_without_its_wall_clock() -> None:
    plan = _plan()
    config = plan.config
    assert config.argv == SHELL_ARGV and config.tty
    assert config.env["A"] == "1" and config.env["B"] == "2"
    assert config.source_date_epoch == 1700000000
    assert config.limits.memory == 512 << 20 and config.limits.pids == 64
    assert config.limits.cpus == 1.5 and config.limits.timeout is None
    assert config.network is not None
    assert config.network.describe() == ["pkgs.example.org", "mirror.corp.internal"]
    # The operator's pin, granted when the build ran, is granted to the shell too.
    assert [p.name for p in config.network.pins] == ["mirror.corp.internal"]
    assert config.secrets == ()


def test_the_shell_takes_the_limits_the_step_ran_with() -> None:
    ran = {"memory": 1 << 30, "pids": 10, "cpus": None, "disk": None, "timeout": 60.0}
    plan = _plan(steps=[StepRecord("prep"), StepRecord("test", limits=ran)])
    limits = plan.config.limits
    assert limits == Limits(memory=1 << 30, pids=10, cpus=None, disk=None, timeout=None)


def test_only_secrets_bound_again_and_declared_reach_the_shell() -> None:
    token = Secret("TOKEN", b"value-of-token")
    stray = Secret("STRAY", b"value-of-stray")
    plan = _plan(secrets=(token, stray))
    config = plan.config
    assert [(s.delivery.name, s.delivery.env) for s in config.secrets] == [("TOKEN", "TOKEN")]
    assert plan.unused_secrets == ("STRAY",)
    assert {s.name for s in config.redact} == {"TOKEN", "STRAY"}


def test_a_step_without_network_gets_none_and_unknown_steps_are_refused() -> None:
    assert _plan(step="prep").config.network is None
    with pytest.raises(Error, match="has no step 'nope'") as e:
        _plan(step="nope")
    assert e.value.hint == "its steps are: prep, test"


def test_a_pin_the_operator_did_not_grant_grants_the_shell_nothing() -> None:
    """A spec alone cannot open a private address for the shell either: the pin reaches
    the shell only with the operator's own grant of its name, as the build recorded it."""
    plan = _plan(invocation={"pinnedHosts": ["mirror.corp.internal:10.1.2.3"], "allow": []})
    assert plan.config.network is not None and plan.config.network.pins == ()


# -- the shell's terminal ----------------------------------------------------------------------


def _filtered(*chunks: bytes) -> bytes:
    from buildcell.build.shell import TerminalFilter

    out: list[bytes] = []
    sink = TerminalFilter(out.append)
    for chunk in chunks:
        sink(chunk)
    return b"".join(out)


def test_the_shell_relays_text_and_colours_but_no_escape_strings() -> None:
    osc52 = b"\x1b]52;c;cm0gLXJmIH4K\x07"  # the clipboard: 'rm -rf ~'
    title = b"\x1b]0;root@host: ~\x1b\\"
    dcs = b"\x1bP+q544e\x1b\\"
    colour = b"\x1b[31mred\x1b[0m"
    assert _filtered(b"a" + osc52 + b"b" + title + colour + dcs + b"c") == b"ab" + colour + b"c"


def test_escape_strings_split_across_reads_are_dropped_whole() -> None:
    data = b"x\x1b]0;fake title\x07y\x1b_apc\x1b\\z\x1b\x1b[1mbold"
    for cut in range(1, len(data)):
        assert _filtered(data[:cut], data[cut:]) == b"xyz\x1b\x1b[1mbold", cut
    one_by_one = [bytes((b,)) for b in data]
    assert _filtered(*one_by_one) == b"xyz\x1b\x1b[1mbold"
