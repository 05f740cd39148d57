from __future__ import annotations

import os
import resource
from collections.abc import Callable
from pathlib import Path

import pytest
from tests.conftest import root_only

from buildcell.cell.config import Limits
from buildcell.cell.limits import (
    CellCgroup,
    LimitsBackend,
    detect_backend,
    fallback_plan,
    favors_dynamic_modifications,
    parse_cgroup_layout,
)
from buildcell.state import StateDir

HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
HYBRID_CGROUP = "8:pids:/\n4:memory:/ci/job1\n1:cpu:/\n0::/\n"
PURE_V2_MOUNTINFO = "30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n"
PURE_V2_CGROUP = "0::/user.slice/user-1000.slice/user@1000.service/app.slice/ci.scope\n"


def test_parse_hybrid_layout() -> None:
    layout = parse_cgroup_layout(HYBRID_MOUNTINFO, HYBRID_CGROUP)
    assert layout.v2_mount == Path("/sys/fs/cgroup/unified")
    assert layout.v1_mounts == {
        "cpu": Path("/sys/fs/cgroup/cpu"),
        "memory": Path("/sys/fs/cgroup/memory"),
        "pids": Path("/sys/fs/cgroup/pids"),
    }
    assert layout.v1_paths["memory"] == "/ci/job1"


def _probe(
    controllers: dict[str, str], writable: set[str]
) -> tuple[Callable[[Path], bool], Callable[[Path], str]]:
    def read(p: Path) -> str:
        try:
            return controllers[str(p.parent)]
        except KeyError:
            raise FileNotFoundError(p) from None

    return (lambda p: str(p) in writable), read


def test_hybrid_root_uses_cgroup1_nested_under_our_cgroup() -> None:
    layout = parse_cgroup_layout(HYBRID_MOUNTINFO, HYBRID_CGROUP)
    writable, read = _probe(
        {"/sys/fs/cgroup/unified": "hugetlb"},
        {"/sys/fs/cgroup/unified", "/sys/fs/cgroup/cpu", "/sys/fs/cgroup/memory/ci/job1",
         "/sys/fs/cgroup/pids"},
    )  # fmt: skip
    backend = detect_backend(layout, euid=0, writable=writable, read=read)
    assert backend.mode == "cgroup1"
    assert backend.parents["memory"] == Path("/sys/fs/cgroup/memory/ci/job1/buildcell")
    assert set(backend.controllers) == {"memory", "pids", "cpu"}


def test_pure_v2_root() -> None:
    layout = parse_cgroup_layout(PURE_V2_MOUNTINFO, "0::/\n")
    writable, read = _probe({"/sys/fs/cgroup": "cpuset cpu io memory hugetlb pids"},
                            {"/sys/fs/cgroup"})  # fmt: skip
    backend = detect_backend(layout, euid=0, writable=writable, read=read)
    assert backend.mode == "cgroup2"
    assert backend.parents == {"unified": Path("/sys/fs/cgroup/buildcell")}
    assert backend.enable_in == (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/buildcell"))


def test_pure_v2_rootless_without_delegation_falls_back_to_rlimits() -> None:
    layout = parse_cgroup_layout(PURE_V2_MOUNTINFO, PURE_V2_CGROUP)
    writable, read = _probe({}, set())
    backend = detect_backend(layout, euid=1000, writable=writable, read=read)
    assert backend.mode == "rlimit"
    assert "not writable" in backend.reason or "cgroup v2" in backend.reason


def test_pure_v2_rootless_with_delegated_parent() -> None:
    layout = parse_cgroup_layout(PURE_V2_MOUNTINFO, PURE_V2_CGROUP)
    parent = Path("/sys/fs/cgroup/user.slice/user-1000.slice/user@1000.service/ci")
    writable, read = _probe({str(parent): "cpu memory pids"}, {str(parent)})
    backend = detect_backend(layout, euid=1000, writable=writable, read=read,
                             delegated_parent=parent)  # fmt: skip
    assert backend.mode == "cgroup2"
    assert backend.parents["unified"] == parent
    assert backend.enable_in == (parent,)


def test_hybrid_rootless_falls_back_and_explains() -> None:
    layout = parse_cgroup_layout(HYBRID_MOUNTINFO, HYBRID_CGROUP)
    writable, read = _probe({"/sys/fs/cgroup/unified": "hugetlb"}, set())
    backend = detect_backend(layout, euid=1000, writable=writable, read=read)
    assert backend.mode == "rlimit"
    assert "needs root" in backend.reason
    how = backend.enforcement()
    assert "RLIMIT_AS" in how["memory"]
    assert "RLIMIT_NPROC" in how["pids"]
    assert "affinity" in how["cpus"]


def test_no_cgroups_at_all() -> None:
    backend = detect_backend(parse_cgroup_layout("", ""), euid=0)
    assert backend.mode == "rlimit"
    assert backend.reason == "no cgroup filesystem is mounted"


RLIMIT = LimitsBackend("rlimit", {}, (), "test")


def test_fallback_plan_says_what_is_not_enforced() -> None:
    plan = fallback_plan(Limits(memory=1 << 30, pids=64, cpus=1.5), RLIMIT, [0, 1, 2, 3])
    assert (resource.RLIMIT_AS, 1 << 30) in plan.rlimits
    assert (resource.RLIMIT_CORE, 0) in plan.rlimits
    assert plan.nproc == 64
    assert plan.affinity == frozenset({0, 1})
    assert len(plan.warnings) == 3
    assert any("fraction 1.5 is not enforced" in w for w in plan.warnings)


def test_fallback_plan_with_cgroups_only_disables_core_dumps() -> None:
    v1 = LimitsBackend("cgroup1", {}, ("memory", "pids", "cpu"), "test")
    plan = fallback_plan(Limits(memory=1 << 30, pids=64, cpus=1), v1, [0, 1])
    assert plan.rlimits == ((resource.RLIMIT_CORE, 0),)
    assert (plan.nproc, plan.affinity, plan.warnings) == (None, None, ())


def test_cgroup_v2_files_on_a_fake_tree(tmp_path: Path) -> None:
    base = tmp_path / "cg" / "buildcell"
    (tmp_path / "cg").mkdir()
    backend = LimitsBackend("cgroup2", {"unified": base}, ("memory", "pids", "cpu"), "t",
                            (tmp_path / "cg", base))  # fmt: skip
    cg = CellCgroup(backend, "x.cell", Limits(memory=256 << 20, pids=100, cpus=0.5))
    d = base / "x.cell"
    assert (d / "memory.max").read_text() == str(256 << 20)
    assert (d / "memory.swap.max").read_text() == "0"
    assert (d / "pids.max").read_text() == "100"
    assert (d / "cpu.max").read_text() == "50000 100000"
    assert (tmp_path / "cg" / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    assert cg.procs_files() == [d / "cgroup.procs"]
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    assert cg.oom_kills() == 1


@root_only
def test_cgroup_v1_for_real(state: StateDir) -> None:
    from buildcell.cell.supervisor import limits_backend

    backend = limits_backend(state.host)
    if backend.mode != "cgroup1":
        pytest.skip("this host does not use cgroup v1")
    cg = CellCgroup(backend, f"{state.tag}.unit", Limits(memory=64 << 20, pids=10, cpus=0.25))
    try:
        by = {d.parent.parent.name if d.parent.name == "buildcell" else d.name: d for d in cg.dirs}
        mem = next(d for d in cg.dirs if "memory" in str(d))
        assert int((mem / "memory.limit_in_bytes").read_text()) == 64 << 20
        cpu = next(d for d in cg.dirs if "/cpu" in str(d))
        assert (cpu / "cpu.cfs_quota_us").read_text().strip() == "25000"
        pids = next(d for d in cg.dirs if "pids" in str(d))
        assert (pids / "pids.max").read_text().strip() == "10"
        assert by
        assert cg.pids() == set()
    finally:
        assert cg.remove()
    assert not any(d.exists() for d in cg.dirs)
    _ = os


def test_favordynmods_is_seen_on_any_cgroup_hierarchy_and_only_there() -> None:
    assert not favors_dynamic_modifications(HYBRID_MOUNTINFO)
    assert not favors_dynamic_modifications(PURE_V2_MOUNTINFO)
    v2 = "30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate,favordynmods\n"
    assert favors_dynamic_modifications(v2)
    named = "90 31 0:50 / /tmp/x rw,relatime - cgroup cgroup rw,favordynmods,name=probe\n"
    assert favors_dynamic_modifications(HYBRID_MOUNTINFO + named)
    other = "91 23 0:51 / /mnt rw - ext4 /dev/vda rw,favordynmods\n"  # not a cgroup mount
    assert not favors_dynamic_modifications(other)
    assert not favors_dynamic_modifications("garbage\n - \n")
