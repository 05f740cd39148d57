"""The cell's syscall filter: the built-in profile, Docker/OCI loading, compiling, enforcing."""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import mmap
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.conftest import PODMAN_SECCOMP, seccomp_asset

from buildcell.cell import seccomp
from buildcell.cell.seccomp import (
    CLONE_NAMESPACE_FLAGS,
    DEFAULT_DENIED_SYSCALLS,
    NETLINK_PROTOCOLS,
    SOCKET_FAMILIES,
    ArgCondition,
    SeccompProfile,
    SyscallRule,
    compile_bpf,
    default_profile,
    load_profile,
    native_arch,
    parse_profile,
)
from buildcell.errors import SeccompError

DOCKER_DEFAULT = "docker-seccomp-default.json"
DOCKER_OLD = "docker-seccomp-default-old-format.json"
DOCKER_EXAMPLE = "docker-seccomp-example.json"

# A fixed host for the pure tests, so they do not depend on the machine running them.
KERNEL = (6, 6)
ARCH = "x86_64"


def _asset(name: str) -> Path:
    """Moby's own profile ``name`` (these tests check its rules): skips where it is absent."""
    return seccomp_asset(name)


def _parse(
    text: str | bytes, *, kernel: tuple[int, int] = KERNEL, arch: str = ARCH
) -> SeccompProfile:
    return parse_profile(text, source="test.json", kernel=kernel, arch=arch)


def _parse_asset(
    name: str, *, kernel: tuple[int, int] = KERNEL, arch: str = ARCH
) -> SeccompProfile:
    return parse_profile(_asset(name).read_bytes(), source=name, kernel=kernel, arch=arch)


def _profile(*syscalls: dict[str, Any], **top: Any) -> str:
    document: dict[str, Any] = {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": list(syscalls)}
    document.update(top)
    return json.dumps(document)


def _rules_for(profile: SeccompProfile, name: str) -> list[SyscallRule]:
    return [rule for rule in profile.rules if name in rule.names]


def _allowed(profile: SeccompProfile) -> set[str]:
    return {name for rule in profile.rules if rule.action == "allow" for name in rule.names}


def _unconditionally_allowed(profile: SeccompProfile) -> set[str]:
    return {
        name
        for rule in profile.rules
        if rule.action == "allow" and not rule.args
        for name in rule.names
    }


# --------------------------------------------------------------------------------------------
# The built-in profile.
# --------------------------------------------------------------------------------------------

# Written out again here, rather than read from the module's table, so that shrinking the
# table fails a test.
REQUIRED_DENIALS = [
    "unshare", "setns",
    "mount", "umount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen",
    "fsconfig", "fsmount", "fspick", "mount_setattr",
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp",
    "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load", "reboot",
    "swapon", "swapoff",
    "acct", "quotactl", "quotactl_fd", "lookup_dcookie", "syslog", "name_to_handle_at",
    "open_by_handle_at", "iopl", "ioperm", "uselib", "vhangup", "settimeofday", "clock_settime",
    "clock_adjtime", "adjtimex", "sethostname", "setdomainname",
]  # fmt: skip

CLONE_FLAGS = {
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
    "CLONE_NEWTIME": 0x00000080,
}


def test_default_profile_shape() -> None:
    profile = default_profile()
    assert profile.name == "buildcell-default"
    assert profile.default_action == "allow"
    assert profile.default_errno is None
    assert profile.extra_arches == ()


@pytest.mark.parametrize("name", REQUIRED_DENIALS)
def test_default_profile_refuses(name: str) -> None:
    rules = _rules_for(default_profile(), name)
    assert any(r.action == "errno" and r.errno == errno.EPERM and not r.args for r in rules)


def test_denial_table_is_the_profile() -> None:
    listed = {name for names in DEFAULT_DENIED_SYSCALLS.values() for name in names}
    assert set(REQUIRED_DENIALS) <= listed
    assert dict(CLONE_NAMESPACE_FLAGS) == CLONE_FLAGS


@pytest.mark.parametrize(("flag_name", "flag"), sorted(CLONE_FLAGS.items()))
@pytest.mark.parametrize(("arch", "index"), [("x86_64", 0), ("aarch64", 0), ("s390x", 1)])
def test_default_profile_refuses_clone_with_namespace_flag(
    flag_name: str, flag: int, arch: str, index: int
) -> None:
    rules = _rules_for(default_profile(arch=arch), "clone")
    expected = SyscallRule(
        ("clone",), "errno", errno.EPERM, (ArgCondition(index, "MASKED_EQ", flag, flag),)
    )
    assert expected in rules, flag_name
    assert all(rule.args for rule in rules), "clone itself must stay allowed"


def test_default_profile_answers_clone3_with_enosys() -> None:
    assert _rules_for(default_profile(), "clone3") == [
        SyscallRule(("clone3",), "errno", errno.ENOSYS)
    ]


def _refused_by(rules: Sequence[SyscallRule], args: Sequence[int]) -> bool:
    """Evaluate rules the way the kernel filter does: any rule whose conditions all hold."""

    def holds(cond: ArgCondition) -> bool:
        arg = args[cond.index]
        return {
            "NE": arg != cond.value,
            "LT": arg < cond.value,
            "LE": arg <= cond.value,
            "EQ": arg == cond.value,
            "GE": arg >= cond.value,
            "GT": arg > cond.value,
            "MASKED_EQ": arg & cond.value == cond.value_two,
        }[cond.op]

    return any(all(holds(c) for c in rule.args) for rule in rules)


PERSONALITY_SAMPLES = [
    1, 8, 0x20000, 0x20008, 0x0040000, 0x0400000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE,
    0xFFFFFFF0, 0x100000000, 0x1FFFFFFFF, 0x1_0000_0000_0000, 2**64 - 1,
]  # fmt: skip


@pytest.mark.parametrize("value", PERSONALITY_SAMPLES)
def test_default_profile_refuses_other_personalities(value: int) -> None:
    rules = _rules_for(default_profile(), "personality")
    assert _refused_by(rules, [value, 0, 0, 0, 0, 0])


@pytest.mark.parametrize("value", [0, 0xFFFFFFFF])
def test_default_profile_allows_linux_personality_and_query(value: int) -> None:
    rules = _rules_for(default_profile(), "personality")
    assert not _refused_by(rules, [value, 0, 0, 0, 0, 0])


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_personality_rules_refuse_exactly_the_rest(value: int) -> None:
    rules = _rules_for(default_profile(), "personality")
    assert _refused_by(rules, [value, 0, 0, 0, 0, 0]) == (value not in (0, 0xFFFFFFFF))


def test_digest_is_stable_and_tracks_rules() -> None:
    profile = default_profile()
    digest = profile.digest()
    assert digest.startswith("sha256:")
    assert len(digest) == len("sha256:") + 64
    assert dataclasses.replace(profile).digest() == digest
    # The name is a label, not policy.
    assert dataclasses.replace(profile, name="renamed.json").digest() == digest

    first, *rest = profile.rules
    changed_errno = dataclasses.replace(first, errno=errno.EACCES)
    assert dataclasses.replace(profile, rules=(changed_errno, *rest)).digest() != digest
    assert dataclasses.replace(profile, rules=tuple(rest)).digest() != digest
    assert dataclasses.replace(profile, extra_arches=("x86",)).digest() != digest
    assert default_profile(arch="s390x").digest() != default_profile(arch="x86_64").digest()


def test_digest_is_stable_across_processes() -> None:
    code = (
        "from buildcell.cell.seccomp import default_profile; "
        "print(default_profile(arch='x86_64').digest())"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True
    ).stdout.strip()
    assert out == default_profile(arch="x86_64").digest()


def test_to_dict_round_trips_through_json() -> None:
    data = default_profile().to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["name"] == "buildcell-default"
    assert isinstance(data["rules"], list)


def test_models_reject_impossible_values() -> None:
    with pytest.raises(ValueError, match="index"):
        ArgCondition(6, "EQ", 0)
    with pytest.raises(ValueError, match="comparison"):
        ArgCondition(0, "BETWEEN", 0)
    with pytest.raises(ValueError, match="return data"):
        SyscallRule(("read",), "errno")
    with pytest.raises(ValueError, match="no return data"):
        SyscallRule(("read",), "allow", errno=1)
    with pytest.raises(ValueError, match="syscall name"):
        SyscallRule(("read\0",), "allow")


# --------------------------------------------------------------------------------------------
# Loading Docker and OCI profiles.
# --------------------------------------------------------------------------------------------


def test_docker_default_profile_for_a_zero_capability_cell() -> None:
    profile = _parse_asset(DOCKER_DEFAULT)
    assert profile.name == DOCKER_DEFAULT
    assert profile.default_action == "errno"
    assert profile.default_errno == errno.EPERM
    assert profile.extra_arches == ("x86", "x32")

    allowed = _allowed(profile)
    assert len(allowed) > 300
    assert {"read", "write", "execve", "openat", "getpid"} <= allowed
    # Rules that Docker grants only with CAP_SYS_ADMIN (and other capabilities) do not apply.
    for gated in ("unshare", "mount", "setns", "bpf", "umount2", "pivot_root", "reboot"):
        assert gated not in allowed, gated
    # Clone is allowed only without namespace flags: the rule that excludes CAP_SYS_ADMIN
    # holders applies to us, and there is no unconditional clone.
    assert _rules_for(profile, "clone") == [
        SyscallRule(("clone",), "allow", None, (ArgCondition(0, "MASKED_EQ", 0x7E020000, 0),))
    ]
    assert _rules_for(profile, "clone3") == [SyscallRule(("clone3",), "errno", errno.ENOSYS)]
    # Architecture-gated rules: arch_prctl is for amd64/x32, arm_fadvise64_64 for arm.
    assert "arch_prctl" in allowed
    assert "arm_fadvise64_64" not in allowed


def test_docker_default_profile_follows_the_architecture() -> None:
    arm = _parse_asset(DOCKER_DEFAULT, arch="aarch64")
    assert arm.extra_arches == ("arm",)
    assert "arm_fadvise64_64" in _allowed(arm)
    assert "arch_prctl" not in _allowed(arm)

    s390 = _parse_asset(DOCKER_DEFAULT, arch="s390x")
    assert s390.extra_arches == ("s390",)
    assert [r.args[0].index for r in _rules_for(s390, "clone")] == [1]

    riscv = _parse_asset(DOCKER_DEFAULT, arch="riscv64")
    assert riscv.extra_arches == ()
    assert "riscv_flush_icache" in _allowed(riscv)


def test_docker_default_profile_follows_the_kernel() -> None:
    # ptrace and process_vm_* are allowed from 4.8 on (and never via CAP_SYS_PTRACE here).
    assert "ptrace" in _unconditionally_allowed(_parse_asset(DOCKER_DEFAULT, kernel=(4, 8)))
    assert "ptrace" not in _allowed(_parse_asset(DOCKER_DEFAULT, kernel=(4, 7)))


def test_docker_old_format_profile() -> None:
    profile = _parse_asset(DOCKER_OLD)
    assert profile.default_action == "errno"
    assert profile.default_errno == errno.EPERM
    assert profile.extra_arches == ("x86", "x32")
    assert len(_allowed(profile)) > 300
    assert all(len(rule.names) == 1 for rule in profile.rules)
    personality = _rules_for(profile, "personality")
    assert personality[0].args == (ArgCondition(0, "EQ", 0),)


def test_docker_example_profile() -> None:
    profile = _parse_asset(DOCKER_EXAMPLE)
    assert profile.default_action == "errno"
    assert profile.extra_arches == ()
    assert _rules_for(profile, "syslog") == [SyscallRule(("syslog",), "errno", 12345)]
    assert _unconditionally_allowed(profile) == {"open", "close"}


def test_load_profile_reads_a_file() -> None:
    profile = load_profile(_asset(DOCKER_DEFAULT))
    assert profile.name == DOCKER_DEFAULT
    assert len(_allowed(profile)) > 300


def test_podman_default_profile_loads() -> None:
    if not PODMAN_SECCOMP.is_file():
        pytest.skip(
            f"{PODMAN_SECCOMP} is missing (apt-get install golang-github-containers-common)"
        )
    profile = load_profile(PODMAN_SECCOMP)
    assert profile.default_action == "errno"
    assert profile.default_errno == errno.ENOSYS
    assert len(_allowed(profile)) > 300
    assert "bpf" not in _allowed(profile)
    assert len(compile_bpf(profile)) // 8 <= 4096


def test_errno_by_name_as_podman_writes_it() -> None:
    profile = _parse(json.dumps(
        {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrno": "ENOSYS", "defaultErrnoRet": 38,
         "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errno": "EACCES"},
                      {"names": ["read"], "action": "SCMP_ACT_ALLOW"}]}
    ))  # fmt: skip
    assert profile.default_errno == errno.ENOSYS
    assert next(r for r in profile.rules if "mkdir" in r.names).errno == errno.EACCES


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"defaultErrno": "ENOSYS", "defaultErrnoRet": 1}, "defaultErrno: ENOSYS is 38, but"),
        ({"defaultErrno": "ENOTANERRNO"}, "defaultErrno: expected an errno name"),
        ({"defaultErrno": "errorcode"}, "defaultErrno: expected an errno name"),
        ({"defaultErrno": 38}, "defaultErrno: expected a string"),
    ],
)
def test_errno_names_that_do_not_hold_are_refused(fields: dict[str, object], message: str) -> None:
    with pytest.raises(SeccompError) as info:
        _parse(json.dumps({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [], **fields}))
    assert message in str(info.value)


def test_load_profile_reports_a_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(SeccompError, match=r"cannot read seccomp profile .*nope\.json"):
        load_profile(missing)


def test_load_profile_names_the_file_in_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"defaultAction": "SCMP_ACT_NOPE"}')
    with pytest.raises(SeccompError, match=r"bad\.json: defaultAction"):
        load_profile(path)


def test_oci_linux_seccomp_shape() -> None:
    text = json.dumps(
        {
            "defaultAction": "SCMP_ACT_ALLOW",
            "defaultErrnoRet": 13,
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_AARCH64"],
            "flags": ["SECCOMP_FILTER_FLAG_LOG"],
            "syscalls": [
                {"names": ["mount", "umount2"], "action": "SCMP_ACT_ERRNO"},
                {"names": ["ptrace"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
                {
                    "names": ["socket"],
                    "action": "SCMP_ACT_ERRNO",
                    "errnoRet": 97,
                    "args": [
                        {"index": 0, "value": 40, "op": "SCMP_CMP_EQ"},
                        {"index": 2, "value": 0xF0, "valueTwo": 0x10, "op": "SCMP_CMP_MASKED_EQ"},
                    ],
                },
                {"names": ["kexec_load"], "action": "SCMP_ACT_KILL_PROCESS"},
                {"names": ["reboot"], "action": "SCMP_ACT_KILL"},
                {"names": ["acct"], "action": "SCMP_ACT_TRAP"},
                {"names": ["uselib"], "action": "SCMP_ACT_LOG"},
                {"names": ["vhangup"], "action": "SCMP_ACT_TRACE", "errnoRet": 7},
            ],
        }
    )
    profile = _parse(text)
    assert profile.default_action == "allow"
    assert profile.default_errno is None
    # AARCH64 cannot run on an x86_64 kernel, so it is dropped.
    assert profile.extra_arches == ("x86",)
    assert profile.rules == (
        SyscallRule(("mount", "umount2"), "errno", 13),
        SyscallRule(("ptrace",), "errno", 1),
        SyscallRule(
            ("socket",),
            "errno",
            97,
            (ArgCondition(0, "EQ", 40), ArgCondition(2, "MASKED_EQ", 0xF0, 0x10)),
        ),
        SyscallRule(("kexec_load",), "kill_process"),
        SyscallRule(("reboot",), "kill_thread"),
        SyscallRule(("acct",), "trap"),
        SyscallRule(("uselib",), "log"),
        SyscallRule(("vhangup",), "trace", 7),
    )


def test_errno_falls_back_to_eperm() -> None:
    profile = _parse(_profile({"names": ["mount"], "action": "SCMP_ACT_ERRNO"}))
    assert profile.default_errno == errno.EPERM
    assert profile.rules == (SyscallRule(("mount",), "errno", errno.EPERM),)


def test_null_lists_read_as_empty() -> None:
    text = json.dumps(
        {
            "defaultAction": "SCMP_ACT_ERRNO",
            "architectures": None,
            "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW", "args": None}],
        }
    )
    assert _parse(text).rules == (SyscallRule(("read",), "allow"),)


@pytest.mark.parametrize(
    ("condition", "kernel", "applies"),
    [
        ({"includes": {"minKernel": "5.10"}}, (5, 9), False),
        ({"includes": {"minKernel": "5.10"}}, (5, 10), True),
        ({"includes": {"minKernel": "5.10"}}, (6, 0), True),
        ({"excludes": {"minKernel": "5.10"}}, (5, 9), True),
        ({"excludes": {"minKernel": "5.10"}}, (5, 10), False),
        ({"includes": {"minKernel": ""}}, (2, 6), True),
    ],
)
def test_min_kernel(condition: dict[str, Any], kernel: tuple[int, int], applies: bool) -> None:
    rule = {"names": ["read"], "action": "SCMP_ACT_ALLOW", **condition}
    assert bool(_parse(_profile(rule), kernel=kernel).rules) is applies


@pytest.mark.parametrize(
    ("condition", "arch", "applies"),
    [
        ({"includes": {"arches": ["amd64"]}}, "x86_64", True),
        ({"includes": {"arches": ["arm64"]}}, "x86_64", False),
        ({"includes": {"arches": ["arm64"]}}, "aarch64", True),
        ({"includes": {"arches": ["x86", "x32"]}}, "x86_64", False),
        ({"includes": {"arches": ["x86"]}}, "x86", True),
        ({"includes": {"arches": ["s390", "s390x"]}}, "s390x", True),
        ({"excludes": {"arches": ["amd64"]}}, "x86_64", False),
        ({"excludes": {"arches": ["s390x"]}}, "x86_64", True),
        ({"includes": {"arches": []}}, "x86_64", True),
    ],
)
def test_arches_filter(condition: dict[str, Any], arch: str, applies: bool) -> None:
    rule = {"names": ["read"], "action": "SCMP_ACT_ALLOW", **condition}
    assert bool(_parse(_profile(rule), arch=arch).rules) is applies


@pytest.mark.parametrize(
    ("condition", "applies"),
    [
        ({"includes": {"caps": ["CAP_SYS_ADMIN"]}}, False),
        ({"includes": {"caps": []}}, True),
        ({"excludes": {"caps": ["CAP_SYS_ADMIN"]}}, True),
        ({"includes": {"caps": ["CAP_SYS_ADMIN"]}, "excludes": {"arches": ["arm"]}}, False),
        ({"includes": {}, "excludes": {}}, True),
    ],
)
def test_capabilities_filter(condition: dict[str, Any], applies: bool) -> None:
    rule = {"names": ["read"], "action": "SCMP_ACT_ALLOW", **condition}
    assert bool(_parse(_profile(rule)).rules) is applies


@pytest.mark.parametrize(
    ("arch_map", "arch", "expected"),
    [
        ([{"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86"]}], "x86_64",
         ("x86",)),
        ([{"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"]}], "x86_64",
         ()),
        ([{"architecture": "SCMP_ARCH_RISCV64", "subArchitectures": None}], "riscv64", ()),
        ([{"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_ARM"]}], "x86_64",
         ()),
    ],
)  # fmt: skip
def test_arch_map(arch_map: list[dict[str, Any]], arch: str, expected: tuple[str, ...]) -> None:
    assert _parse(_profile(archMap=arch_map), arch=arch).extra_arches == expected


BAD_PROFILES = [
    ("{", "not JSON"),
    (b"\xff\xfe\x00", "not JSON"),
    ("[" * 100_000, "nested too deeply"),
    ("[]", "expected an object, got a list"),
    ('"SCMP_ACT_ALLOW"', "expected an object, got the string"),
    ("{}", "defaultAction: missing"),
    ('{"defaultAction": "SCMP_ACT_FOO"}', "defaultAction: expected one of SCMP_ACT_ALLOW"),
    ('{"defaultAction": 1}', "defaultAction: expected one of"),
    ('{"defaultAction": "SCMP_ACT_NOTIFY"}', "defaultAction: SCMP_ACT_NOTIFY is not supported"),
    ('{"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": "1"}',
     "defaultErrnoRet: expected an integer from 0 to 65535, got the string '1'"),
    ('{"defaultAction": "SCMP_ACT_ERRNO", "bogus": 1}', "bogus: unknown key"),
    ('{"defaultAction": "SCMP_ACT_ERRNO", "defaultAction": "SCMP_ACT_ALLOW"}',
     "'defaultAction' appears twice"),
    ('{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": {}}',
     "syscalls: expected a list, got an object"),
    ('{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [3]}',
     "syscalls[0]: expected an object, got 3"),
    (_profile({"names": ["read"]}), "syscalls[0].action: missing"),
    (_profile({"names": ["read"], "action": "SCMP_ACT_NOTIFY"}),
     "syscalls[0].action: SCMP_ACT_NOTIFY is not supported"),
    (_profile({"names": ["read"], "action": "SCMP_ACT_ALLOW"}, {"names": ["x"], "action": "KILL"}),
     "syscalls[1].action: expected one of SCMP_ACT_ALLOW"),
    (_profile({"names": "read", "action": "SCMP_ACT_ALLOW"}),
     "syscalls[0].names: expected a list, got the string 'read'"),
    (_profile({"names": ["read", 3], "action": "SCMP_ACT_ALLOW"}),
     "syscalls[0].names[1]: expected a string, got 3"),
    (_profile({"names": ["read file"], "action": "SCMP_ACT_ALLOW"}),
     "syscalls[0].names[0]: expected a syscall name"),
    (_profile({"names": [], "action": "SCMP_ACT_ALLOW"}),
     "syscalls[0].names: expected at least one syscall name"),
    (_profile({"name": "read", "names": ["write"], "action": "SCMP_ACT_ALLOW"}),
     "either 'name' or 'names'"),
    (_profile({"names": ["read"], "action": "SCMP_ACT_ALLOW", "priority": 1}),
     "syscalls[0].priority: unknown key"),
    (_profile({"names": ["read"], "action": "SCMP_ACT_ERRNO", "errnoRet": 70000}),
     "syscalls[0].errnoRet: expected an integer from 0 to 65535, got 70000"),
    (_profile({"names": ["read"], "action": "SCMP_ACT_ALLOW",
               "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_BETWEEN"}]}),
     "syscalls[0].args[0].op: expected one of SCMP_CMP_NE"),
    (_profile({"names": ["read"], "action": "SCMP_ACT_ALLOW",
               "args": [{"index": 6, "value": 1, "op": "SCMP_CMP_EQ"}]}),
     "syscalls[0].args[0].index: expected an integer from 0 to 5, got 6"),
    (_profile({"names": ["read"], "action": "SCMP_ACT_ALLOW",
               "args": [{"index": -1, "value": 1, "op": "SCMP_CMP_EQ"}]}),
     "syscalls[0].args[0].index: expected an integer from 0 to 5, got -1"),
    (_profile({"names": ["read"], "action": "SCMP_ACT_ALLOW",
               "args": [{"index": True, "value": 1, "op": "SCMP_CMP_EQ"}]}),
     "syscalls[0].args[0].index: expected an integer from 0 to 5, got true"),
    (_profile({"names": ["read"], "action": "SCMP_ACT_ALLOW",
               "args": [{"index": 0, "value": -1, "op": "SCMP_CMP_EQ"}]}),
     "syscalls[0].args[0].value: expected an integer from 0 to 18446744073709551615, got -1"),
    (_profile({"names": ["read"], "action": "SCMP_ACT_ALLOW",
               "args": [{"index": 0, "value": 2**64, "op": "SCMP_CMP_EQ"}]}),
     "syscalls[0].args[0].value: expected an integer"),
    (_profile({"names": ["read"], "action": "SCMP_ACT_ALLOW",
               "args": [{"index": 0, "value": 1.5, "op": "SCMP_CMP_EQ"}]}),
     "syscalls[0].args[0].value: expected an integer from 0 to 18446744073709551615, "
     "got the number 1.5"),
    (_profile({"names": ["read"], "action": "SCMP_ACT_ALLOW",
               "args": [{"index": 0, "value": 1, "valueTwo": "2", "op": "SCMP_CMP_EQ"}]}),
     "syscalls[0].args[0].valueTwo: expected an integer"),
    (_profile({"names": ["read"], "action": "SCMP_ACT_ALLOW", "args": [{"index": 0, "value": 1}]}),
     "syscalls[0].args[0].op: missing"),
    (_profile({"names": ["read"], "action": "SCMP_ACT_ALLOW",
               "args": [{"index": i % 6, "value": 1, "op": "SCMP_CMP_EQ"} for i in range(7)]}),
     "syscalls[0].args: at most 6 conditions"),
    (_profile({"names": ["read"], "action": "SCMP_ACT_ALLOW", "args": {"index": 0}}),
     "syscalls[0].args: expected a list, got an object"),
    (_profile({"names": ["read"], "action": "SCMP_ACT_ALLOW", "includes": {"minKernel": "4"}}),
     'syscalls[0].includes.minKernel: expected a kernel version such as "4.8"'),
    (_profile({"names": ["read"], "action": "SCMP_ACT_ALLOW", "excludes": {"minKernel": "0.0"}}),
     "syscalls[0].excludes.minKernel: expected a kernel version"),
    (_profile({"names": ["read"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": "CAP_X"}}),
     "syscalls[0].includes.caps: expected a list"),
    (_profile({"names": ["read"], "action": "SCMP_ACT_ALLOW", "includes": {"kernel": "5"}}),
     "syscalls[0].includes.kernel: unknown key"),
    (_profile({"names": ["read"], "action": "SCMP_ACT_ALLOW", "includes": ["amd64"]}),
     "syscalls[0].includes: expected an object, got a list"),
    (_profile(architectures=["x86_64"]), "architectures[0]: expected an architecture"),
    (_profile(architectures=["SCMP_ARCH_X86_64"], archMap=[{"architecture": "SCMP_ARCH_X86"}]),
     "archMap: a profile gives either 'architectures' or 'archMap', not both"),
    (_profile(archMap=[{"subArchitectures": []}]), "archMap[0].architecture: missing"),
    (_profile(archMap=[{"architecture": "SCMP_ARCH_X86_64", "subArchitectures": [1]}]),
     "archMap[0].subArchitectures[0]: expected a string, got 1"),
    (_profile(flags=["SECCOMP_FILTER_FLAG_NEW_LISTENER"]), "flags[0]: expected one of"),
    (_profile(listenerPath="/run/agent.sock"), "listenerPath: seccomp user notification"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "message"), BAD_PROFILES)
def test_malformed_profiles_are_reported(text: str | bytes, message: str) -> None:
    with pytest.raises(SeccompError) as info:
        _parse(text)
    assert message in info.value.message
    assert info.value.message.startswith("invalid seccomp profile test.json")


def test_rules_that_do_not_apply_are_still_validated() -> None:
    rule = {
        "names": ["read"],
        "action": "SCMP_ACT_ALLOW",
        "includes": {"caps": ["CAP_SYS_ADMIN"]},
        "args": [{"index": 9, "value": 0, "op": "SCMP_CMP_EQ"}],
    }
    with pytest.raises(SeccompError, match=r"syscalls\[0\]\.args\[0\]\.index"):
        _parse(_profile(rule))


# Arbitrary JSON, and JSON shaped like a profile with arbitrary values in it.
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)
_ACTION_STRINGS = st.sampled_from(
    ["SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO", "SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS",
     "SCMP_ACT_KILL_THREAD", "SCMP_ACT_TRAP", "SCMP_ACT_LOG", "SCMP_ACT_TRACE", "SCMP_ACT_NOTIFY"]
)  # fmt: skip
_OP_STRINGS = st.sampled_from(
    ["SCMP_CMP_NE", "SCMP_CMP_LT", "SCMP_CMP_LE", "SCMP_CMP_EQ", "SCMP_CMP_GE", "SCMP_CMP_GT",
     "SCMP_CMP_MASKED_EQ"]
)  # fmt: skip
_NAMES = st.sampled_from(
    ["read", "clone", "personality", "socket", "chown32", "umount", "not_a_syscall", "getpid"]
)
_SMALL_INTS = st.integers(min_value=0, max_value=5000)
_ARCHES = st.sampled_from(["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32", "SCMP_ARCH_ARM"])


def _or_junk(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    # Mostly well-typed values (about one in ten is junk), so that examples get deep.
    return st.integers(min_value=0, max_value=9).flatmap(
        lambda k: JSON_VALUES if k == 5 else strategy
    )


_FILTERS = st.fixed_dictionaries(
    {},
    optional={
        "caps": _or_junk(st.lists(st.sampled_from(["CAP_SYS_ADMIN", "CAP_BPF"]), max_size=2)),
        "arches": _or_junk(st.lists(st.sampled_from(["amd64", "arm64", "x86"]), max_size=2)),
        "minKernel": _or_junk(st.sampled_from(["4.8", "5.10", "99.0", ""])),
    },
)
_ARGS = st.fixed_dictionaries(
    {
        "index": _or_junk(st.integers(min_value=0, max_value=5)),
        "value": _or_junk(st.integers(min_value=0, max_value=2**64 - 1)),
        "op": _or_junk(_OP_STRINGS),
    },
    optional={"valueTwo": _or_junk(st.integers(min_value=0, max_value=2**64 - 1))},
)
_SYSCALLS = st.fixed_dictionaries(
    {
        "names": _or_junk(st.lists(_or_junk(_NAMES), min_size=1, max_size=3)),
        "action": _or_junk(_ACTION_STRINGS),
    },
    optional={
        "name": _or_junk(st.just("")),
        "errnoRet": _or_junk(_SMALL_INTS),
        "args": _or_junk(st.lists(_ARGS, max_size=3)),
        "comment": _or_junk(st.text(max_size=8)),
        "includes": _or_junk(_FILTERS),
        "excludes": _or_junk(_FILTERS),
    },
)
PROFILE_LIKE = st.fixed_dictionaries(
    {"defaultAction": _or_junk(_ACTION_STRINGS)},
    optional={
        "defaultErrnoRet": _or_junk(_SMALL_INTS),
        "architectures": _or_junk(st.lists(_ARCHES, max_size=3)),
        "archMap": _or_junk(
            st.lists(
                st.fixed_dictionaries(
                    {"architecture": _or_junk(_ARCHES)},
                    optional={"subArchitectures": _or_junk(st.lists(_ARCHES, max_size=2))},
                ),
                max_size=2,
            )
        ),
        "syscalls": _or_junk(st.lists(_SYSCALLS, max_size=4)),
        "flags": _or_junk(st.lists(st.just("SECCOMP_FILTER_FLAG_LOG"), max_size=1)),
        "listenerPath": _or_junk(st.just("")),
    },
)


def _parse_or_explain(text: str | bytes) -> SeccompProfile | None:
    try:
        return _parse(text, kernel=(5, 10))
    except SeccompError as e:
        message = e.message
    assert message.startswith("invalid seccomp profile test.json")
    return None


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(JSON_VALUES)
def test_arbitrary_json_is_a_profile_or_a_seccomp_error(value: Any) -> None:
    result = _parse_or_explain(json.dumps(value))
    assert result is None or isinstance(result, SeccompProfile)


@settings(max_examples=300)
@given(st.text(max_size=64) | st.binary(max_size=64))
def test_arbitrary_text_is_a_profile_or_a_seccomp_error(text: str | bytes) -> None:
    result = _parse_or_explain(text)
    assert result is None or isinstance(result, SeccompProfile)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(PROFILE_LIKE)
def test_profile_shaped_json_parses_and_compiles_or_fails_cleanly(value: Any) -> None:
    profile = _parse_or_explain(json.dumps(value))
    if profile is None:
        return
    assert isinstance(profile, SeccompProfile)
    try:
        program = compile_bpf(profile)
    except SeccompError:
        return
    assert len(program) % 8 == 0


# --------------------------------------------------------------------------------------------
# Compiling.
# --------------------------------------------------------------------------------------------


def test_default_profile_compiles() -> None:
    program = compile_bpf(default_profile())
    assert program
    assert len(program) % 8 == 0


@pytest.mark.parametrize("name", [DOCKER_DEFAULT, DOCKER_OLD])
def test_docker_profiles_compile(name: str) -> None:
    program = compile_bpf(load_profile(_asset(name)))
    assert program
    assert len(program) % 8 == 0
    # The kernel refuses programs longer than BPF_MAXINSNS.
    assert len(program) // 8 <= 4096


def test_compile_is_cached_by_digest() -> None:
    profile = default_profile()
    first = compile_bpf(profile)
    assert compile_bpf(dataclasses.replace(profile, name="copy")) is first


def test_compile_is_thread_safe() -> None:
    profile = dataclasses.replace(
        default_profile(), rules=(SyscallRule(("getppid",), "errno", errno.EACCES),)
    )
    results: list[bytes] = []

    def work() -> None:
        results.append(compile_bpf(profile))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8
    assert all(r is results[0] for r in results)


def test_compile_skips_unknown_and_foreign_syscalls(caplog: pytest.LogCaptureFixture) -> None:
    profile = _parse(
        _profile(
            {"names": ["read", "definitely_not_a_syscall", "umount", "chown32"],
             "action": "SCMP_ACT_ALLOW"},
        ),
        arch=native_arch(),
    )  # fmt: skip
    with caplog.at_level("DEBUG", logger="buildcell.cell.seccomp"):
        program = compile_bpf(profile)
    assert len(program) % 8 == 0
    assert "definitely_not_a_syscall" in caplog.text


def test_compile_skips_rules_that_repeat_the_default() -> None:
    profile = _parse(
        json.dumps(
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [
                    {"names": ["read"], "action": "SCMP_ACT_ALLOW"},
                    {"names": ["mount"], "action": "SCMP_ACT_ERRNO"},
                ],
            }
        ),
        arch=native_arch(),
    )
    assert len(compile_bpf(profile)) % 8 == 0


def test_compile_reports_an_errno_libseccomp_cannot_encode() -> None:
    profile = load_profile(_asset(DOCKER_EXAMPLE))
    with pytest.raises(SeccompError, match="errno 12345 for syscall syslog"):
        compile_bpf(profile)


def test_compile_reports_a_refused_rule_with_the_syscall() -> None:
    rule = SyscallRule(
        ("personality",),
        "errno",
        errno.EPERM,
        (ArgCondition(0, "NE", 0), ArgCondition(0, "NE", 0xFFFFFFFF)),
    )
    profile = SeccompProfile("two-conditions", "allow", None, (), (rule,))
    with pytest.raises(SeccompError, match="syscall personality") as info:
        compile_bpf(profile)
    assert info.value.hint is not None
    assert "same argument" in info.value.hint


# --------------------------------------------------------------------------------------------
# Enforcement: load the compiled filter into a forked child and try the syscalls.
# --------------------------------------------------------------------------------------------

PR_SET_DUMPABLE = 4
PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_MODE_FILTER = 2
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
X32_SYSCALL_BIT = 0x40000000
ADDR_NO_RANDOMIZE = 0x0040000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


Probe = tuple[str, str, tuple[int | bytes | None, ...]]


def _nr(name: str) -> int:
    import pyseccomp

    number = int(pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name))
    assert number >= 0, name
    return number


def _c_arg(value: int | bytes | None) -> Any:
    if value is None:
        return ctypes.c_void_p(None)
    if isinstance(value, bytes):
        return ctypes.c_char_p(value)
    return ctypes.c_ulong(value)


def _int80_getpid() -> int:
    """Call getpid through the i386 ABI (int 0x80) from this 64-bit process."""
    code = bytes([0xB8, 20, 0, 0, 0, 0xCD, 0x80, 0xC3])  # mov eax, 20; int 0x80; ret
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    return int(ctypes.CFUNCTYPE(ctypes.c_int)(address)())


def _in_child(
    bpf: bytes | None,
    probes: Sequence[Probe] = (),
    final: Callable[[], object] | None = None,
) -> tuple[int, dict[str, Any], int]:
    """Fork; in the child load ``bpf`` (if any), run the probes, report, then run ``final``.

    Returns the child's pid, what it reported and its wait status.
    """
    program = ctypes.create_string_buffer(bpf or b"", len(bpf or b""))
    fprog = _SockFprog(len(bpf or b"") // 8, ctypes.cast(program, ctypes.c_void_p))
    prepared = [(label, _nr(name), [_c_arg(a) for a in args]) for label, name, args in probes]
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child; results travel through the pipe
        status = 2
        try:
            os.close(read_end)
            # No core file when the filter kills us (core_pattern may point at the cwd).
            _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
            report: dict[str, Any] = {}
            if bpf is not None and (
                _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                or _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0
            ):
                report["load_errno"] = ctypes.get_errno()
            else:
                for label, number, c_args in prepared:
                    ctypes.set_errno(0)
                    result = _libc.syscall(ctypes.c_long(number), *c_args)
                    if result == 0 and label.startswith("clone"):
                        os._exit(0)  # a clone that was not refused: this is the new child
                    report[label] = [result, ctypes.get_errno()]
                if final is not None and bpf is None:
                    report["final"] = final()
            os.write(write_end, json.dumps(report).encode())
            if final is not None and bpf is not None:
                final()
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        data = reader.read()
    _, wait_status = os.waitpid(pid, 0)
    report = json.loads(data) if data else {}
    if "load_errno" in report:
        if report["load_errno"] in (errno.EINVAL, errno.ENOSYS):
            pytest.skip("this kernel cannot load seccomp filters")
        pytest.fail(f"loading the filter failed: {os.strerror(report['load_errno'])}")
    return pid, report, wait_status


pytestmark_linux = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="seccomp is Linux-only"
)

DEFAULT_PROBES: list[Probe] = [
    ("getpid", "getpid", ()),
    ("unshare_user", "unshare", (CLONE_NEWUSER,)),
    ("setns", "setns", (-1 & 0xFFFFFFFF, 0)),
    # A target that does not exist: were the filter missing, this would fail with ENOENT
    # instead of mounting anything.
    ("mount", "mount", (b"none", b"/nonexistent-buildcell-seccomp-probe", b"tmpfs", 0, None)),
    ("bpf", "bpf", (0xFFFF, None, 0)),
    ("keyctl", "keyctl", (0xFFFF, 0, 0, 0, 0)),
    ("clone3", "clone3", (None, 0)),
    ("clone_newnet", "clone", (CLONE_NEWNET | signal.SIGCHLD, 0, 0, 0, 0)),
    ("personality_query", "personality", (0xFFFFFFFF,)),
    ("personality_norandom", "personality", (ADDR_NO_RANDOMIZE,)),
]


@pytestmark_linux
def test_default_profile_is_enforced() -> None:
    pid, report, status = _in_child(compile_bpf(default_profile()), DEFAULT_PROBES)
    assert os.WIFEXITED(status)
    assert os.WEXITSTATUS(status) == 0
    assert report["getpid"] == [pid, 0]
    for label in ("unshare_user", "setns", "mount", "bpf", "keyctl", "clone_newnet"):
        assert report[label] == [-1, errno.EPERM], label
    assert report["clone3"] == [-1, errno.ENOSYS]
    assert report["personality_query"][0] >= 0
    assert report["personality_norandom"] == [-1, errno.EPERM]


@pytestmark_linux
@pytest.mark.skipif(native_arch() != "x86_64", reason="x32 exists only on x86_64")
def test_default_profile_kills_x32_syscalls() -> None:
    x32_getpid = X32_SYSCALL_BIT | _nr("getpid")
    _, report, status = _in_child(
        compile_bpf(default_profile()),
        [("getpid", "getpid", ())],
        final=lambda: _libc.syscall(ctypes.c_long(x32_getpid)),
    )
    assert report["getpid"][0] > 0, "the child ran and reported before the x32 call"
    assert os.WIFSIGNALED(status)
    assert os.WTERMSIG(status) == signal.SIGSYS


@pytestmark_linux
@pytest.mark.skipif(native_arch() != "x86_64", reason="the i386 ABI exists only on x86_64")
def test_default_profile_kills_i386_syscalls() -> None:
    pid, report, status = _in_child(None, final=_int80_getpid)
    if not (os.WIFEXITED(status) and report.get("final") == pid):
        pytest.skip("this kernel does not run i386 syscalls (no IA32 emulation)")
    _, report, status = _in_child(
        compile_bpf(default_profile()), [("getpid", "getpid", ())], final=_int80_getpid
    )
    assert report["getpid"][0] > 0
    assert os.WIFSIGNALED(status)
    assert os.WTERMSIG(status) == signal.SIGSYS


@pytestmark_linux
def test_docker_default_profile_is_enforced() -> None:
    profile = load_profile(_asset(DOCKER_DEFAULT))
    probes: list[Probe] = [
        ("getpid", "getpid", ()),
        ("unshare_user", "unshare", (CLONE_NEWUSER,)),
        ("clone3", "clone3", (None, 0)),
        ("clone_newnet", "clone", (CLONE_NEWNET | signal.SIGCHLD, 0, 0, 0, 0)),
    ]
    pid, report, status = _in_child(compile_bpf(profile), probes)
    assert os.WIFEXITED(status)
    assert os.WEXITSTATUS(status) == 0
    assert report["getpid"] == [pid, 0]
    assert report["unshare_user"] == [-1, errno.EPERM]
    assert report["clone_newnet"] == [-1, errno.EPERM]
    assert report["clone3"] == [-1, errno.ENOSYS]


# --------------------------------------------------------------------------------------------
# Sockets: the built-in profile's address families and netlink protocols.
# --------------------------------------------------------------------------------------------

# Written out again, so that widening the table fails a test.
ALLOWED_FAMILIES = {1: "AF_UNIX", 2: "AF_INET", 10: "AF_INET6", 16: "AF_NETLINK"}
ALLOWED_NETLINK = {0: "NETLINK_ROUTE", 4: "NETLINK_SOCK_DIAG"}
REFUSED_FAMILIES = {
    3: "AF_AX25", 5: "AF_APPLETALK", 9: "AF_X25", 15: "AF_KEY", 17: "AF_PACKET", 21: "AF_RDS",
    24: "AF_PPPOX", 26: "AF_LLC", 29: "AF_CAN", 30: "AF_TIPC", 31: "AF_BLUETOOTH",
    32: "AF_IUCV", 33: "AF_RXRPC", 34: "AF_ISDN", 35: "AF_PHONET", 36: "AF_IEEE802154",
    37: "AF_CAIF", 38: "AF_ALG", 39: "AF_NFC", 40: "AF_VSOCK", 41: "AF_KCM", 42: "AF_QIPCRTR",
    43: "AF_SMC", 44: "AF_XDP", 45: "AF_MCTP",
}  # fmt: skip
REFUSED_NETLINK = {
    6: "NETLINK_XFRM", 9: "NETLINK_AUDIT", 11: "NETLINK_CONNECTOR", 12: "NETLINK_NETFILTER",
    15: "NETLINK_KOBJECT_UEVENT", 16: "NETLINK_GENERIC", 20: "NETLINK_RDMA", 21: "NETLINK_CRYPTO",
}  # fmt: skip
SOCK_STREAM, SOCK_DGRAM, SOCK_RAW, SOCK_PACKET = 1, 2, 3, 10
SOCK_NONBLOCK, SOCK_CLOEXEC = 0x800, 0x80000
IPPROTO_SMC = 256
U64 = st.integers(min_value=0, max_value=2**64 - 1)


def _refused_socket(args: Sequence[int], name: str = "socket") -> SyscallRule | None:
    """The built-in rule that refuses ``name(*args)``, if any (evaluated as the kernel does)."""
    padded = [*args, 0, 0, 0, 0, 0, 0][:6]
    for rule in _rules_for(default_profile(), name):
        if _refused_by([rule], padded):
            return rule
    return None


def test_socket_family_table_names_every_family_and_allows_only_four() -> None:
    assert set(SOCKET_FAMILIES) == set(range(46))  # AF_UNSPEC .. AF_MCTP; AF_MAX is 46
    assert {f: v.name for f, v in SOCKET_FAMILIES.items() if v.allowed} == ALLOWED_FAMILIES
    for family, name in REFUSED_FAMILIES.items():
        assert SOCKET_FAMILIES[family].name == name
        assert not SOCKET_FAMILIES[family].allowed
    assert all(verdict.why for verdict in SOCKET_FAMILIES.values())
    assert {p: v.name for p, v in NETLINK_PROTOCOLS.items() if v.allowed} == ALLOWED_NETLINK
    for protocol, name in REFUSED_NETLINK.items():
        assert NETLINK_PROTOCOLS[protocol].name == name
    assert all(verdict.why for verdict in NETLINK_PROTOCOLS.values())


@pytest.mark.parametrize("name", ["socket", "socketpair"])
@pytest.mark.parametrize("family", sorted(REFUSED_FAMILIES))
def test_default_profile_refuses_socket_families(name: str, family: int) -> None:
    for kind in (SOCK_STREAM, SOCK_DGRAM, SOCK_RAW, SOCK_STREAM | SOCK_CLOEXEC):
        rule = _refused_socket([family, kind, 0], name)
        assert rule is not None, (REFUSED_FAMILIES[family], kind)
        assert (rule.action, rule.errno) == ("errno", errno.EAFNOSUPPORT)


@given(U64)
def test_socket_family_rules_allow_exactly_the_four_families(value: int) -> None:
    # Whatever the register holds: the kernel reads its low 32 bits as the family, so a
    # value passes only when it is, exactly, an allowed family.
    for name in ("socket", "socketpair"):
        assert (_refused_socket([value, SOCK_STREAM, 0], name) is None) == (
            value in ALLOWED_FAMILIES
        )


def test_socket_family_rules_see_through_upper_register_bits() -> None:
    for family in (40, 38, 17):
        for high in (1 << 32, 1 << 63, 0xFFFFFFFF_00000000):
            assert _refused_socket([high | family, SOCK_STREAM, 0]) is not None
    # A negative int arrives sign-extended.
    assert _refused_socket([2**64 - 1, SOCK_STREAM, 0]) is not None


@given(U64)
def test_netlink_rules_allow_exactly_route_and_sock_diag(protocol: int) -> None:
    rule = _refused_socket([16, SOCK_RAW, protocol])
    assert (rule is None) == (protocol in ALLOWED_NETLINK)
    if rule is not None:
        assert rule.errno == errno.EPROTONOSUPPORT


@pytest.mark.parametrize("protocol", sorted(REFUSED_NETLINK))
def test_netlink_refusals_say_eprotonosupport(protocol: int) -> None:
    for kind in (SOCK_RAW, SOCK_DGRAM | SOCK_CLOEXEC):
        rule = _refused_socket([16, kind, protocol])
        assert rule is not None
        assert rule.errno == errno.EPROTONOSUPPORT


def test_aliases_of_refused_families_through_inet_are_refused() -> None:
    # (AF_INET, SOCK_PACKET) is an AF_PACKET socket; IPPROTO_SMC an AF_SMC one.
    for kind in (SOCK_PACKET, SOCK_PACKET | SOCK_NONBLOCK | SOCK_CLOEXEC):
        rule = _refused_socket([2, kind, 0x0300])
        assert rule is not None
        assert rule.errno == errno.EAFNOSUPPORT
    for family in (2, 10):
        for protocol in (IPPROTO_SMC, (1 << 32) | IPPROTO_SMC):
            rule = _refused_socket([family, SOCK_STREAM, protocol])
            assert rule is not None
            assert rule.errno == errno.EPROTONOSUPPORT
    # The ordinary inet sockets stay.
    for args in ([2, SOCK_STREAM, 6], [10, SOCK_DGRAM, 17], [2, SOCK_STREAM, 262], [1, 5, 0]):
        assert _refused_socket(args) is None, args


def test_socketcall_cannot_create_sockets() -> None:
    # Where socketcall(2) is native its arguments are behind a pointer: no family is
    # visible, so creating a socket through it is refused; the other calls stay.
    rules = _rules_for(default_profile(), "socketcall")
    for call in (1, 8, (1 << 32) | 1):
        assert _refused_by(rules, [call, 0, 0, 0, 0, 0])
        assert all(r.errno == errno.ENOSYS for r in rules)
    for call in (2, 3, 9, 11, 20):  # bind, connect, send, sendto, sendmmsg
        assert not _refused_by(rules, [call, 0, 0, 0, 0, 0])


def test_socket_rules_change_the_digest_and_the_cache_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import buildcell.cell.seccomp as seccomp_module

    # A fresh process: nothing compiled in memory yet, so the state-dir cache is consulted.
    monkeypatch.setattr(seccomp_module, "_compiled", {})
    profile = default_profile()
    socket_calls = {"socket", "socketpair", "socketcall"}
    without = dataclasses.replace(
        profile, rules=tuple(r for r in profile.rules if not socket_calls & set(r.names))
    )
    assert len(without.rules) < len(profile.rules)
    assert without.digest() != profile.digest()
    compile_bpf(without, cache_dir=tmp_path)
    compile_bpf(profile, cache_dir=tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    digests = {without.digest(), profile.digest()}
    assert names == sorted(
        f"seccomp-{d.removeprefix('sha256:')}-{native_arch()}.bpf" for d in digests
    )
    files = {p.read_bytes() for p in tmp_path.iterdir()}
    assert len(files) == 2, "a filter cached before the socket rules must not be reused"


def test_default_profile_compiles_within_the_kernel_limit() -> None:
    assert len(compile_bpf(default_profile())) // 8 <= 4096


# Distinct errnos no syscall here returns, so that a probe can tell "the filter refused"
# from "the kernel refused" (a family this kernel lacks also says EAFNOSUPPORT).
_MARKS = {errno.EAFNOSUPPORT: 201, errno.EPROTONOSUPPORT: 202, errno.ENOSYS: 203}


def _socket_cases() -> list[tuple[str, str, tuple[int | bytes | None, ...]]]:
    values = [*range(70), *((1 << 32) | f for f in (1, 2, 10, 16, 40)), 2**64 - 1, 0xFFFFFFFF]
    cases: list[tuple[str, str, tuple[int | bytes | None, ...]]] = []
    for value in values:
        cases.append((f"socket {value:#x}", "socket", (value, SOCK_STREAM, 0)))
        cases.append((f"socketpair {value:#x}", "socketpair", (value, SOCK_STREAM, 0, None)))
    for protocol in [*range(40), 1 << 32, (1 << 32) | 9, 2**64 - 1]:
        cases.append((f"netlink {protocol:#x}", "socket", (16, SOCK_RAW, protocol)))
    for kind in (SOCK_PACKET, SOCK_PACKET | SOCK_NONBLOCK, SOCK_STREAM, SOCK_DGRAM):
        cases.append((f"inet type {kind:#x}", "socket", (2, kind, 0x0300)))
    for family in (2, 10):
        for protocol in (0, 6, IPPROTO_SMC, (1 << 32) | IPPROTO_SMC, 262):
            cases.append((f"inet{family} proto {protocol:#x}", "socket", (family, 1, protocol)))
    return cases


def _expected_mark(name: str, args: Sequence[int | bytes | None]) -> int | None:
    ints = [a if isinstance(a, int) else 0 for a in args]
    rule = _refused_socket(ints, name)
    return None if rule is None or rule.errno is None else _MARKS[rule.errno]


@pytestmark_linux
def test_compiled_socket_rules_decide_as_the_model_does() -> None:
    profile = default_profile()
    marked = tuple(
        dataclasses.replace(r, errno=_MARKS[r.errno])
        if {"socket", "socketpair"} & set(r.names) and r.errno in _MARKS
        else r
        for r in profile.rules
    )
    cases = _socket_cases()
    _, report, status = _in_child(compile_bpf(dataclasses.replace(profile, rules=marked)), cases)
    assert os.WIFEXITED(status)
    mismatches = []
    for label, name, args in cases:
        result, err = report[label]
        got = err if result < 0 and err in _MARKS.values() else None
        if got != _expected_mark(name, args):
            mismatches.append((label, result, err))
    assert not mismatches


@pytestmark_linux
def test_default_profile_refuses_vsock_and_keeps_local_sockets() -> None:
    probes: list[Probe] = [
        ("vsock", "socket", (40, SOCK_STREAM, 0)),
        ("vsock_dgram", "socket", (40, SOCK_DGRAM, 0)),
        ("vsock_high_bits", "socket", ((1 << 32) | 40, SOCK_STREAM, 0)),
        ("vsock_pair", "socketpair", (40, SOCK_STREAM, 0, None)),
        ("alg", "socket", (38, 5, 0)),  # SOCK_SEQPACKET
        ("audit", "socket", (16, SOCK_RAW, 9)),
        ("unix", "socket", (1, SOCK_STREAM, 0)),
        ("inet", "socket", (2, SOCK_DGRAM, 0)),
        ("route", "socket", (16, SOCK_RAW, 0)),
        # NULL for the pair: EFAULT shows the filter let it through to the kernel.
        ("unix_pair", "socketpair", (1, SOCK_STREAM, 0, None)),
    ]
    _, report, status = _in_child(compile_bpf(default_profile()), probes)
    assert os.WIFEXITED(status)
    assert os.WEXITSTATUS(status) == 0
    for label in ("vsock", "vsock_dgram", "vsock_high_bits", "vsock_pair", "alg"):
        assert report[label] == [-1, errno.EAFNOSUPPORT], label
    assert report["audit"] == [-1, errno.EPROTONOSUPPORT]
    for label in ("unix", "inet", "route"):
        assert report[label][0] >= 0, (label, report[label])
    assert report["unix_pair"] == [-1, errno.EFAULT]


# -- the cache of compiled filters is verified when loaded ---------------------------------


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "foreign", "link", "writable"])
def test_a_damaged_cached_filter_is_rebuilt_not_loaded(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    profile = seccomp.default_profile()
    cache = tmp_path / "cache"
    cache.mkdir()
    seccomp._compiled.clear()  # compiled by an earlier test: the file would not be written
    good = seccomp.compile_bpf(profile, cache_dir=cache)
    (path,) = cache.glob("seccomp-*.bpf")
    data = path.read_bytes()
    if damage == "flip":
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 1]) + data[middle + 1 :])
    elif damage == "truncate":
        path.write_bytes(data[: len(data) - 8])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "foreign":
        # A program that allows everything, written as a bare filter (no digest).
        path.write_bytes(bytes.fromhex("06000000" + "0000ff7f"))
    elif damage == "link":
        os.link(path, tmp_path / "other-name")
    else:
        os.chmod(path, 0o666)
    seccomp._compiled.clear()  # a new process: only the file cache is there
    with caplog.at_level("WARNING"):
        again = seccomp.compile_bpf(profile, cache_dir=cache)
    assert again == good
    assert any(str(path) in r.getMessage() for r in caplog.records), caplog.text
    seccomp._compiled.clear()
    rebuilt = seccomp._read_cached(path)
    assert rebuilt == good  # the file was written again, whole
