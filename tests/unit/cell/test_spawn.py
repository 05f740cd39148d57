"""Which spawn plans may skip Python between fork and exec."""

from __future__ import annotations

import resource

import pytest

from buildcell.cell._spawn import SpawnPlan

_CORE_OFF = ((resource.RLIMIT_CORE, 0),)


def test_a_plain_guarded_cell_needs_no_preexec() -> None:
    plan = SpawnPlan(argv=["bwrap"], rlimits=_CORE_OFF, drop_to=(5000, 5000), umask=0o22,
                     self_guarded=True)  # fmt: skip
    assert not plan.needs_preexec()


@pytest.mark.parametrize(
    "extra",
    [
        {"self_guarded": False},  # nothing else would set the death signal
        {"cgroup_procs_fds": (7,)},
        {"rlimits": ((resource.RLIMIT_AS, 1 << 30),)},
        {"rlimits": ((resource.RLIMIT_CORE, 1),)},
        {"affinity": frozenset({0})},
        {"setns_fds": ((8, 0),)},
        {"in_child": lambda: None},
    ],
)
def test_anything_more_needs_preexec(extra: dict[str, object]) -> None:
    fields: dict[str, object] = {"rlimits": _CORE_OFF, "self_guarded": True, **extra}
    assert SpawnPlan(argv=["bwrap"], **fields).needs_preexec()  # type: ignore[arg-type]
