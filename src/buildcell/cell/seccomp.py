"""The cell's syscall filter: a typed model, a loader for Docker/OCI profiles, a BPF compiler.

Planning is pure: :func:`default_profile` and :func:`parse_profile` turn data into a
:class:`SeccompProfile` that tests can inspect without libseccomp or root. Only
:func:`compile_bpf` touches libseccomp (through pyseccomp, imported lazily so that CLI start-up
stays lean) and it returns the classic-BPF program as bytes, ready to hand to bubblewrap's
``--seccomp FD``.

The model is deliberately smaller than the formats it reads. Docker's conditional rules
(``includes``/``excludes`` by capability, architecture and kernel) are resolved while parsing,
for a cell that has no capabilities at all, on this machine's architecture and kernel; what
is left is a flat, ordered list of rules whose digest identifies the policy.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import re
import stat
import sys
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from types import MappingProxyType
from typing import Any, Final, NamedTuple, NoReturn

from buildcell import _log
from buildcell._json import DuplicateKeyError, reject_duplicate_keys
from buildcell.errors import SeccompError

__all__ = [
    "CLONE_NAMESPACE_FLAGS",
    "DEFAULT_DENIED_SYSCALLS",
    "NETLINK_PROTOCOLS",
    "PERSONALITY_ALLOWED",
    "SOCKET_FAMILIES",
    "ArgCondition",
    "SeccompProfile",
    "SocketVerdict",
    "SyscallRule",
    "compile_bpf",
    "default_profile",
    "load_profile",
    "native_arch",
    "parse_profile",
]

logger = _log.get(__name__)

# The action vocabulary of the model (libseccomp's, minus NOTIFY: a cell has no agent).
_ACTIONS: Final = ("allow", "errno", "kill_process", "kill_thread", "trap", "log", "trace")
# The comparison operators of libseccomp, by their short names.
_OPS: Final = ("NE", "LT", "LE", "EQ", "GE", "GT", "MASKED_EQ")

# Actions whose return data (an errno, or a tracer's message number) is part of the action.
_ACTIONS_WITH_DATA: Final = frozenset({"errno", "trace"})
# seccomp keeps 16 bits of return data next to the action (SECCOMP_RET_DATA).
_MAX_RET_DATA: Final = 0xFFFF
# The kernel caps an errno at MAX_ERRNO (4095) and libseccomp refuses to encode one that high.
_MAX_LIBSECCOMP_ERRNO: Final = 4094
_MAX_ARG_INDEX: Final = 5
_MAX_U64: Final = 2**64 - 1
# pyseccomp builds at most six comparisons per rule, one per syscall argument.
_MAX_CONDITIONS: Final = 6
_SYSCALL_NAME = re.compile(r"[A-Za-z0-9_]{1,64}")
_SCMP_ARCH = re.compile(r"SCMP_ARCH_[A-Z0-9_]{1,32}")
_MIN_KERNEL = re.compile(r"(\d{1,3})\.(\d{1,3})")
# A profile is a few tens of kilobytes; anything far larger is not a profile.
_MAX_PROFILE_BYTES: Final = 4 * 1024 * 1024

# --------------------------------------------------------------------------------------------
# The built-in profile, as data.
# --------------------------------------------------------------------------------------------

#: Syscalls the built-in profile refuses with EPERM, grouped by why a build must not have them.
#: Everything not listed is allowed: the cell's namespaces, dropped capabilities and read-only
#: mounts are the main wall; this list removes the kernel interfaces that could breach it.
DEFAULT_DENIED_SYSCALLS: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        # A new namespace is how unprivileged code regains root-like powers (a new user
        # namespace comes with a full capability set inside it) and how it would step out of
        # the view bwrap built. bwrap has already made every namespace the build needs.
        # clone and clone3 are handled below, by flag.
        "namespaces": ("unshare", "setns"),
        # The cell's filesystem view is fixed by bwrap. Remounting, pivoting or chrooting
        # could uncover what it hid, or make writable what it mounted read-only.
        "mount": (
            "mount",
            "umount",
            "umount2",
            "pivot_root",
            "chroot",
            "move_mount",
            "open_tree",
            "fsopen",
            "fsconfig",
            "fsmount",
            "fspick",
            "mount_setattr",
        ),
        # Reading or writing another process's memory or descriptors lets one build step
        # tamper with its siblings, and with the helpers that watch over the build.
        "process_access": (
            "ptrace",
            "process_vm_readv",
            "process_vm_writev",
            "pidfd_getfd",
            "kcmp",
        ),
        # The kernel keyring is not fully namespaced: keys could leak between cells or from
        # the host user's session keyring.
        "keyring": ("keyctl", "add_key", "request_key"),
        # Large kernel attack surfaces a build has no use for: eBPF, perf events, userfaultfd
        # (a favourite for winning kernel races) and io_uring (a long record of privilege
        # escalations, and its operations are not syscalls, so this filter cannot see them).
        "kernel_attack_surface": (
            "bpf",
            "perf_event_open",
            "userfaultfd",
            "io_uring_setup",
            "io_uring_enter",
            "io_uring_register",
        ),
        # Changing the running kernel or the machine: modules, kexec, reboot, swap.
        "host_kernel": (
            "init_module",
            "finit_module",
            "delete_module",
            "kexec_load",
            "kexec_file_load",
            "reboot",
            "swapon",
            "swapoff",
        ),
        # Host-wide state and legacy holes: process accounting, quotas, the kernel log, file
        # handles that bypass path lookup (open_by_handle_at is the "shocker" container
        # escape), raw I/O ports, uselib, vhangup, the system clock, host and domain names.
        "host_state": (
            "acct",
            "quotactl",
            "quotactl_fd",
            "lookup_dcookie",
            "syslog",
            "name_to_handle_at",
            "open_by_handle_at",
            "iopl",
            "ioperm",
            "uselib",
            "vhangup",
            "settimeofday",
            "clock_settime",
            "clock_adjtime",
            "adjtimex",
            "sethostname",
            "setdomainname",
        ),
    }
)

#: clone(2) flags that create a namespace; the built-in profile refuses a clone carrying any.
#: CLONE_NEWTIME shares its bit with clone(2)'s exit-signal byte (the kernel only honours it
#: through clone3 and unshare); no valid exit signal has that bit, so refusing it costs nothing.
CLONE_NAMESPACE_FLAGS: Final[Mapping[str, int]] = MappingProxyType(
    {
        "CLONE_NEWTIME": 0x00000080,
        "CLONE_NEWNS": 0x00020000,
        "CLONE_NEWCGROUP": 0x02000000,
        "CLONE_NEWUTS": 0x04000000,
        "CLONE_NEWIPC": 0x08000000,
        "CLONE_NEWUSER": 0x10000000,
        "CLONE_NEWPID": 0x20000000,
        "CLONE_NEWNET": 0x40000000,
    }
)

#: personality(2) arguments the built-in profile allows: PER_LINUX and the 0xffffffff query.
#: Other personas switch on READ_IMPLIES_EXEC, turn off ASLR and the like.
PERSONALITY_ALLOWED: Final = (0, 0xFFFFFFFF)

# clone3 passes its flags in a struct that seccomp cannot read, so the flags cannot be
# checked. ENOSYS (rather than EPERM) makes glibc and others fall back to clone(2), whose
# flags the profile does check.
_CLONE3_ERRNO: Final = errno.ENOSYS


class SocketVerdict(NamedTuple):
    """What the built-in profile does with one socket address family (or netlink protocol)."""

    name: str
    allowed: bool
    why: str


_OUTSIDE = "reaches past the cell's network namespace"
_ABSENT = "no socket implementation in current kernels"

#: Every socket address family Linux defines, with the built-in profile's verdict and why.
#: ``socket`` and ``socketpair`` with any other family, including the ones future kernels add,
#: fail with EAFNOSUPPORT: what a kernel built without the family answers, so programs take
#: the fallback they already have for it. Refusing in the filter also keeps the kernel from
#: autoloading the family's module, which happens before the family's own namespace check.
SOCKET_FAMILIES: Final[Mapping[int, SocketVerdict]] = MappingProxyType(
    {
        0: SocketVerdict("AF_UNSPEC", False, _ABSENT),
        1: SocketVerdict(
            "AF_UNIX", True,
            "local IPC; abstract names are per network namespace, paths are confined by the "
            "cell's mounts",
        ),
        2: SocketVerdict("AF_INET", True, "the cell's network namespace holds only loopback"),
        3: SocketVerdict("AF_AX25", False, "amateur radio links; initial network namespace only"),
        4: SocketVerdict("AF_IPX", False, "removed from Linux (4.18)"),
        5: SocketVerdict("AF_APPLETALK", False, "legacy protocol, a build has no use for it"),
        6: SocketVerdict("AF_NETROM", False, "amateur radio links; initial network namespace only"),
        7: SocketVerdict("AF_BRIDGE", False, _ABSENT),
        8: SocketVerdict("AF_ATMPVC", False, "ATM hardware, not in the cell"),
        9: SocketVerdict("AF_X25", False, "X.25 links; initial network namespace only"),
        10: SocketVerdict("AF_INET6", True, "the cell's network namespace holds only loopback"),
        11: SocketVerdict("AF_ROSE", False, "amateur radio links; initial network namespace only"),
        12: SocketVerdict("AF_DECnet", False, "removed from Linux (6.1)"),
        13: SocketVerdict("AF_NETBEUI", False, _ABSENT),
        14: SocketVerdict("AF_SECURITY", False, _ABSENT),
        15: SocketVerdict("AF_KEY", False, "IPsec key management (PF_KEY); needs CAP_NET_ADMIN"),
        16: SocketVerdict(
            "AF_NETLINK", True,
            "getaddrinfo, ip and ss read the cell's own namespace; protocols are restricted "
            "(NETLINK_PROTOCOLS)",
        ),
        17: SocketVerdict(
            "AF_PACKET", False,
            "raw link-layer access; needs CAP_NET_RAW, which a cell lacks, and a record of "
            "privilege escalations (CVE-2016-8655, CVE-2017-7308, CVE-2020-14386)",
        ),
        18: SocketVerdict("AF_ASH", False, _ABSENT),
        19: SocketVerdict("AF_ECONET", False, "removed from Linux (3.5)"),
        20: SocketVerdict("AF_ATMSVC", False, "ATM hardware, not in the cell"),
        21: SocketVerdict(
            "AF_RDS", False,
            "reliable datagrams over RDMA/TCP; an autoloaded module with a record of "
            "privilege escalations (CVE-2010-3904)",
        ),
        22: SocketVerdict("AF_SNA", False, _ABSENT),
        23: SocketVerdict("AF_IRDA", False, "removed from Linux (4.17)"),
        24: SocketVerdict("AF_PPPOX", False, "PPP over Ethernet/L2TP/PPTP; needs interfaces"),
        25: SocketVerdict("AF_WANPIPE", False, _ABSENT),
        26: SocketVerdict("AF_LLC", False, "raw IEEE 802.2 frames, a build has no use for them"),
        27: SocketVerdict("AF_IB", False, _ABSENT),
        28: SocketVerdict("AF_MPLS", False, _ABSENT),
        29: SocketVerdict("AF_CAN", False, "CAN buses are host hardware"),
        30: SocketVerdict(
            "AF_TIPC", False,
            "cluster IPC meant to span machines; remotely exploitable bugs (CVE-2021-43267)",
        ),
        31: SocketVerdict(
            "AF_BLUETOOTH", False, "host radio hardware; initial network namespace only"
        ),
        32: SocketVerdict("AF_IUCV", False, f"z/VM guest-to-guest channels; {_OUTSIDE}"),
        33: SocketVerdict("AF_RXRPC", False, "the AFS transport, a build has no use for it"),
        34: SocketVerdict("AF_ISDN", False, "ISDN hardware, not in the cell"),
        35: SocketVerdict("AF_PHONET", False, "cellular modem protocol, host hardware"),
        36: SocketVerdict(
            "AF_IEEE802154", False, "low-power radio hardware; initial network namespace only"
        ),
        37: SocketVerdict("AF_CAIF", False, "cellular modem protocol; needs CAP_NET_ADMIN"),
        38: SocketVerdict(
            "AF_ALG", False,
            "the kernel's crypto API from user space: no network at all, but a long record of "
            "memory-safety bugs, and builds bring their own crypto libraries",
        ),
        39: SocketVerdict("AF_NFC", False, "host radio hardware; initial network namespace only"),
        40: SocketVerdict(
            "AF_VSOCK", False,
            f"hypervisor sockets to the host (CID 2) and other VMs; {_OUTSIDE}: vsock has no "
            "network namespace support",
        ),
        41: SocketVerdict("AF_KCM", False, "kernel connection multiplexor, a build has no use"),
        42: SocketVerdict(
            "AF_QIPCRTR", False, f"Qualcomm IPC router to modem and DSP, global state; {_OUTSIDE}"
        ),
        43: SocketVerdict(
            "AF_SMC", False,
            "shared-memory communication over RDMA and ISM devices, which are host hardware",
        ),
        44: SocketVerdict(
            "AF_XDP", False, "zero-copy rings on a NIC queue; needs CAP_NET_RAW, no use in a build"
        ),
        45: SocketVerdict("AF_MCTP", False, "management buses to the host's controllers (BMC)"),
    }
)  # fmt: skip

#: Netlink protocols (the third argument of ``socket(AF_NETLINK, ...)``) and their verdicts.
#: The others, including unassigned numbers, fail with EPROTONOSUPPORT, what a kernel without
#: the protocol answers (libaudit, shadow and PAM read it as "no audit support" and go on).
NETLINK_PROTOCOLS: Final[Mapping[int, SocketVerdict]] = MappingProxyType(
    {
        0: SocketVerdict(
            "NETLINK_ROUTE", True,
            "interfaces, addresses and routes of the cell's own namespace (getaddrinfo, ip)",
        ),
        1: SocketVerdict("NETLINK_UNUSED", False, "unassigned"),
        2: SocketVerdict("NETLINK_USERSOCK", False, "user-defined protocols, no use in a build"),
        3: SocketVerdict("NETLINK_FIREWALL", False, "removed from Linux"),
        4: SocketVerdict(
            "NETLINK_SOCK_DIAG", True, "socket listings of the cell's own namespace (ss)"
        ),
        5: SocketVerdict("NETLINK_NFLOG", False, "removed from Linux"),
        6: SocketVerdict("NETLINK_XFRM", False, "IPsec policy; needs CAP_NET_ADMIN"),
        7: SocketVerdict("NETLINK_SELINUX", False, "host security events"),
        8: SocketVerdict("NETLINK_ISCSI", False, "host storage transport"),
        9: SocketVerdict(
            "NETLINK_AUDIT", False, "the host's audit subsystem, which is not namespaced"
        ),
        10: SocketVerdict("NETLINK_FIB_LOOKUP", False, "no use in a build"),
        11: SocketVerdict(
            "NETLINK_CONNECTOR", False, "host-wide kernel events (process connector and others)"
        ),
        12: SocketVerdict(
            "NETLINK_NETFILTER", False,
            "nftables and conntrack; needs CAP_NET_ADMIN, and the most exploited subsystem of "
            "recent years (CVE-2022-1015, CVE-2023-32233, CVE-2024-1086)",
        ),
        13: SocketVerdict("NETLINK_IP6_FW", False, "removed from Linux"),
        14: SocketVerdict("NETLINK_DNRTMSG", False, "removed from Linux with DECnet"),
        15: SocketVerdict(
            "NETLINK_KOBJECT_UEVENT", False,
            "host device events; a namespace owned by the initial user namespace, as a cell's "
            "is under root, receives every one",
        ),
        16: SocketVerdict(
            "NETLINK_GENERIC", False,
            "a multiplexer of about a hundred kernel families, each its own parser; the few a "
            "build could name configure devices a cell has no capability to change",
        ),
        17: SocketVerdict("NETLINK_DM", False, "unassigned"),
        18: SocketVerdict("NETLINK_SCSITRANSPORT", False, "host storage transport"),
        19: SocketVerdict("NETLINK_ECRYPTFS", False, "removed from Linux"),
        20: SocketVerdict("NETLINK_RDMA", False, "RDMA devices are host hardware"),
        21: SocketVerdict("NETLINK_CRYPTO", False, "kernel crypto configuration"),
        22: SocketVerdict("NETLINK_SMC", False, "SMC configuration; AF_SMC is refused"),
    }
)  # fmt: skip

AF_INET: Final = 2
AF_INET6: Final = 10
AF_NETLINK: Final = 16
# socket(AF_INET, SOCK_PACKET, ...) is turned into an AF_PACKET socket by the kernel, and
# socket(AF_INET*, SOCK_STREAM, IPPROTO_SMC) into an AF_SMC one (Linux 6.11): the family
# rules alone would miss both.
_SOCK_TYPE_MASK: Final = 0xF
_SOCK_PACKET: Final = 10
_IPPROTO_SMC: Final = 256
# The socketcall(2) multiplexer's calls that create sockets (SYS_SOCKET, SYS_SOCKETPAIR).
# Their arguments sit behind a pointer, which seccomp cannot read.
_SOCKETCALL_CREATES: Final = (1, 8)
# Family values below this bound are refused one aligned block at a time; anything from it
# up (new families, negative ints, stray upper register bits) is refused by one comparison.
_FAMILY_BOUND: Final = 64
# The kernel's MAX_LINKS: no netlink protocol is numbered this high.
_NETLINK_BOUND: Final = 32
# The kernel reads these arguments as C ints: only the low 32 bits of the register count.
_INT_MASK: Final = 0xFFFFFFFF


# --------------------------------------------------------------------------------------------
# The model.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArgCondition:
    """One comparison of a syscall argument, as libseccomp expresses it.

    For ``MASKED_EQ`` the condition holds when ``arg & value == value_two``; for the other
    operators ``value_two`` is unused and stays 0.

    Raises:
        ValueError: a field is outside its range (a bug in the caller: parsed input is
            validated, and reported as :class:`SeccompError`, before a model is built).
    """

    index: int
    op: str
    value: int
    value_two: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.index <= _MAX_ARG_INDEX:
            raise ValueError(f"argument index {self.index} is outside 0..{_MAX_ARG_INDEX}")
        if self.op not in _OPS:
            raise ValueError(f"unknown comparison {self.op!r}")
        if not (0 <= self.value <= _MAX_U64 and 0 <= self.value_two <= _MAX_U64):
            raise ValueError("argument values are unsigned 64-bit integers")


@dataclass(frozen=True)
class SyscallRule:
    """An action for some syscalls, taken when every condition in ``args`` holds.

    ``errno`` carries the return data of the ``errno`` and ``trace`` actions (the errno, or
    the message number handed to the tracer) and is ``None`` for every other action.

    Raises:
        ValueError: a field is inconsistent (a bug in the caller, as for :class:`ArgCondition`).
    """

    names: tuple[str, ...]
    action: str
    errno: int | None = None
    args: tuple[ArgCondition, ...] = ()

    def __post_init__(self) -> None:
        if not self.names:
            raise ValueError("a rule needs at least one syscall name")
        for name in self.names:
            if not _SYSCALL_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a syscall name")
        _check_action(self.action, self.errno)
        if len(self.args) > _MAX_CONDITIONS:
            raise ValueError(f"a rule has at most {_MAX_CONDITIONS} argument conditions")


@dataclass(frozen=True)
class SeccompProfile:
    """A complete filter: a default action, the extra ABIs it covers, and ordered rules.

    ``name`` is ``"buildcell-default"`` or the file the profile came from; ``default_errno``
    is the default action's return data, as :attr:`SyscallRule.errno` is a rule's.
    ``extra_arches`` names (libseccomp-style: ``"x86"``, ``"x32"``) the ABIs besides the native
    one whose syscalls the rules also govern; any other ABI is killed.

    Raises:
        ValueError: a field is inconsistent (a bug in the caller, as for :class:`ArgCondition`).
    """

    name: str
    default_action: str
    default_errno: int | None
    extra_arches: tuple[str, ...]
    rules: tuple[SyscallRule, ...]

    def __post_init__(self) -> None:
        _check_action(self.default_action, self.default_errno)

    def to_dict(self) -> dict[str, object]:
        """The profile as plain JSON-ready data (for events, provenance and ``--json``)."""
        return {
            "name": self.name,
            "default_action": self.default_action,
            "default_errno": self.default_errno,
            "extra_arches": list(self.extra_arches),
            "rules": [
                {
                    "names": list(rule.names),
                    "action": rule.action,
                    "errno": rule.errno,
                    "args": [
                        {
                            "index": cond.index,
                            "op": cond.op,
                            "value": cond.value,
                            "value_two": cond.value_two,
                        }
                        for cond in rule.args
                    ],
                }
                for rule in self.rules
            ],
        }

    def digest(self) -> str:
        """``sha256:<hex>`` of the canonical JSON form of what the filter enforces.

        The ``name`` is a label and is left out, so the same policy loaded from two differently
        named files has one digest. Keys are sorted and separators fixed, so the digest is
        stable across runs and Python versions.
        """
        cached: str | None = self.__dict__.get("_digest")
        if cached is None:
            # Once per profile: hashing a frozen profile walks every rule, each time.
            cached = _digest(self)
            object.__setattr__(self, "_digest", cached)
        return cached


def _digest(profile: SeccompProfile) -> str:
    content = profile.to_dict()
    del content["name"]
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + hashlib.sha256(canonical.encode("ascii")).hexdigest()


def _check_action(action: str, ret_data: int | None) -> None:
    if action not in _ACTIONS:
        raise ValueError(f"unknown action {action!r}")
    if action in _ACTIONS_WITH_DATA:
        if ret_data is None or not 0 <= ret_data <= _MAX_RET_DATA:
            raise ValueError(f"action {action!r} needs return data in 0..{_MAX_RET_DATA}")
    elif ret_data is not None:
        raise ValueError(f"action {action!r} takes no return data")


# --------------------------------------------------------------------------------------------
# Architectures.
# --------------------------------------------------------------------------------------------

_MACHINE_TO_ARCH: Final[Mapping[str, str]] = MappingProxyType(
    {
        "x86_64": "x86_64",
        "amd64": "x86_64",
        "i386": "x86",
        "i486": "x86",
        "i586": "x86",
        "i686": "x86",
        "aarch64": "aarch64",
        "arm64": "aarch64",
        "ppc64le": "ppc64le",
        "ppc64": "ppc64",
        "ppc": "ppc",
        "s390x": "s390x",
        "s390": "s390",
        "riscv64": "riscv64",
        "loongarch64": "loongarch64",
        "parisc64": "parisc64",
        "parisc": "parisc",
    }
)

# The ABIs a kernel of each native architecture also runs, which libseccomp can therefore
# usefully filter alongside the native one (the same pairs as Docker's archMap).
_COMPANION_ARCHES: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        "x86_64": ("x86", "x32"),
        "aarch64": ("arm",),
        "mips64": ("mips", "mips64n32"),
        "mips64n32": ("mips", "mips64"),
        "mipsel64": ("mipsel", "mipsel64n32"),
        "mipsel64n32": ("mipsel", "mipsel64"),
        "s390x": ("s390",),
        "ppc64": ("ppc",),
        "parisc64": ("parisc",),
    }
)

# The names Docker's includes/excludes.arches use for each native architecture (moby's
# goToNative table), plus the obvious aliases.
_DOCKER_ARCH_NAMES: Final[Mapping[str, frozenset[str]]] = MappingProxyType(
    {
        "x86_64": frozenset({"amd64", "x86_64"}),
        "x86": frozenset({"x86", "386", "i386"}),
        "aarch64": frozenset({"arm64", "aarch64"}),
        "arm": frozenset({"arm"}),
        "loongarch64": frozenset({"loongarch64", "loong64"}),
        "mips64": frozenset({"mips64"}),
        "mips64n32": frozenset({"mips64n32"}),
        "mipsel64": frozenset({"mipsel64", "mips64le"}),
        "mipsel64n32": frozenset({"mipsel64n32", "mips3l64n32"}),
        "mipsel": frozenset({"mipsel", "mipsle"}),
        "mips": frozenset({"mips"}),
        "ppc": frozenset({"ppc"}),
        "ppc64": frozenset({"ppc64"}),
        "ppc64le": frozenset({"ppc64le"}),
        "riscv64": frozenset({"riscv64"}),
        "s390": frozenset({"s390"}),
        "s390x": frozenset({"s390x"}),
    }
)


def native_arch() -> str:
    """The libseccomp-style name of this machine's architecture (``"x86_64"``, ``"aarch64"``).

    Machines this module has no name for are returned as ``uname -m`` reports them.
    """
    machine = os.uname().machine.lower()
    if machine.startswith("arm") and machine != "arm64":
        return "arm"
    if machine in ("mips", "mips64"):
        # uname does not say which endianness a MIPS machine runs; the interpreter does.
        return machine.replace("mips", "mipsel") if sys.byteorder == "little" else machine
    return _MACHINE_TO_ARCH.get(machine, machine)


def _scmp_arch_name(arch: str) -> str:
    return "SCMP_ARCH_" + arch.upper()


# --------------------------------------------------------------------------------------------
# The built-in profile.
# --------------------------------------------------------------------------------------------


def default_profile(*, arch: str | None = None) -> SeccompProfile:
    """The built-in profile: allow by default, refuse what could breach the cell.

    See :data:`DEFAULT_DENIED_SYSCALLS`, :data:`CLONE_NAMESPACE_FLAGS` and
    :data:`PERSONALITY_ALLOWED`; clone3 answers ENOSYS. Sockets: only the families of
    :data:`SOCKET_FAMILIES` marked allowed (and of netlink, the allowed
    :data:`NETLINK_PROTOCOLS`) can be created; the rest answer EAFNOSUPPORT
    (EPROTONOSUPPORT). Only the native ABI is allowed at all: 32-bit and x32 syscalls on
    x86_64 kill the process (libseccomp's bad-arch action), so neither the i386 socketcall(2)
    nor its socket(2) can route around the family rules.

    Args:
        arch: the architecture to build it for; the native one by default. It matters only
            where an argument moves (clone's flags are its second argument on s390).
    """
    return _default_profile_for(arch or native_arch())


#: fcntl(2)'s command that takes a lease (linux/fcntl.h: F_LINUX_SPECIFIC_BASE + 0).
F_SETLEASE: Final = 1024


@functools.cache
def _default_profile_for(arch: str) -> SeccompProfile:
    eperm = errno.EPERM
    rules = [
        SyscallRule(names=names, action="errno", errno=eperm)
        for names in DEFAULT_DENIED_SYSCALLS.values()
    ]
    # s390 passes the new stack first and the flags second.
    flags_index = 1 if arch in ("s390", "s390x") else 0
    rules.extend(
        SyscallRule(
            names=("clone",),
            action="errno",
            errno=eperm,
            args=(ArgCondition(flags_index, "MASKED_EQ", flag, flag),),
        )
        for flag in CLONE_NAMESPACE_FLAGS.values()
    )
    rules.append(SyscallRule(names=("clone3",), action="errno", errno=_CLONE3_ERRNO))
    # A lease on a file every cell shares (the prepared /etc, owned by the invoking user
    # rootless) would stall any other cell's open of it for the lease-break time.
    rules.append(
        SyscallRule(
            names=("fcntl",), action="errno", errno=eperm,
            args=(ArgCondition(1, "EQ", F_SETLEASE),),
        )
    )  # fmt: skip
    rules.extend(_personality_rules(eperm))
    rules.extend(_socket_rules())
    return SeccompProfile(
        name="buildcell-default",
        default_action="allow",
        default_errno=None,
        extra_arches=(),
        rules=tuple(rules),
    )


def _refused_values(allowed: Collection[int], bound: int, index: int) -> list[ArgCondition]:
    """Conditions that together hold for exactly the argument values not in ``allowed``.

    One unsigned comparison refuses everything from ``bound`` (a power of two) up, which
    also catches any value with upper register bits set; below it, each maximal aligned
    block of refused values is one masked comparison on the low 32 bits, the int the kernel
    reads. (libseccomp cannot put two comparisons of one argument in one rule, so "not this
    and not that" is written as such a union.)
    """
    assert bound & (bound - 1) == 0
    assert all(0 <= v < bound for v in allowed)
    conditions = [ArgCondition(index, "GE", bound)]

    def cover(start: int, size: int) -> None:
        if not any(start <= v < start + size for v in allowed):
            mask = _INT_MASK & ~(size - 1)
            conditions.append(ArgCondition(index, "MASKED_EQ", mask, start))
        elif size > 1:
            cover(start, size // 2)
            cover(start + size // 2, size // 2)

    cover(0, bound)
    return conditions


def _socket_rules() -> list[SyscallRule]:
    """Refuse socket families (and netlink protocols) outside the allowed sets.

    See :data:`SOCKET_FAMILIES` and :data:`NETLINK_PROTOCOLS`. Where the native ABI has
    socketcall(2), its socket-creating calls answer ENOSYS: their arguments are out of the
    filter's sight, so the family rules could not hold there.
    """
    no_family, no_protocol = errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT
    families = [f for f, verdict in SOCKET_FAMILIES.items() if verdict.allowed]
    protocols = [p for p, verdict in NETLINK_PROTOCOLS.items() if verdict.allowed]
    rules = [
        SyscallRule((name,), "errno", no_family, (cond,))
        for name in ("socket", "socketpair")
        for cond in _refused_values(families, _FAMILY_BOUND, 0)
    ]
    rules.extend(
        SyscallRule(("socket",), "errno", no_protocol, (ArgCondition(0, "EQ", AF_NETLINK), cond))
        for cond in _refused_values(protocols, _NETLINK_BOUND, 2)
    )
    rules.append(
        SyscallRule(
            ("socket",),
            "errno",
            no_family,
            (
                ArgCondition(0, "EQ", AF_INET),
                ArgCondition(1, "MASKED_EQ", _SOCK_TYPE_MASK, _SOCK_PACKET),
            ),
        )
    )
    rules.extend(
        SyscallRule(
            ("socket",),
            "errno",
            no_protocol,
            (ArgCondition(0, "EQ", family), ArgCondition(2, "MASKED_EQ", _INT_MASK, _IPPROTO_SMC)),
        )
        for family in (AF_INET, AF_INET6)
    )
    rules.extend(
        SyscallRule(
            ("socketcall",),
            "errno",
            errno.ENOSYS,
            (ArgCondition(0, "MASKED_EQ", _INT_MASK, call),),
        )
        for call in _SOCKETCALL_CREATES
    )
    return rules


def _personality_rules(eperm: int) -> list[SyscallRule]:
    # "Refuse unless arg0 is 0 or 0xffffffff" needs two conditions on one argument, which
    # libseccomp rejects (EINVAL), and the default action being allow, libseccomp also refuses
    # allow rules that could carve out the two values. So the refused set is written as a union
    # of single comparisons: values above 32 bits, and every 32-bit value that has a set bit
    # followed (cyclically) by a clear one. A 32-bit value has such a pair exactly when it is
    # neither all zeros nor all ones, so the union is exactly "not 0 and not 0xffffffff".
    # (Each pattern can cover at most one single-bit value, so fewer than 32 cannot do.)
    # The construction is specific to PERSONALITY_ALLOWED being exactly (0, 0xffffffff).
    rules = [
        SyscallRule(("personality",), "errno", eperm, (ArgCondition(0, "GT", 0xFFFFFFFF),)),
    ]
    for bit in range(32):
        set_bit = 1 << bit
        clear_bit = 1 << ((bit + 1) % 32)
        rules.append(
            SyscallRule(
                ("personality",),
                "errno",
                eperm,
                (ArgCondition(0, "MASKED_EQ", set_bit | clear_bit, set_bit),),
            )
        )
    return rules


# --------------------------------------------------------------------------------------------
# Loading Docker / OCI profiles.
# --------------------------------------------------------------------------------------------

_ACTION_NAMES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "SCMP_ACT_ALLOW": "allow",
        "SCMP_ACT_ERRNO": "errno",
        # runc maps the historical SCMP_ACT_KILL to killing the thread, as libseccomp does.
        "SCMP_ACT_KILL": "kill_thread",
        "SCMP_ACT_KILL_THREAD": "kill_thread",
        "SCMP_ACT_KILL_PROCESS": "kill_process",
        "SCMP_ACT_TRAP": "trap",
        "SCMP_ACT_LOG": "log",
        "SCMP_ACT_TRACE": "trace",
    }
)
_OP_NAMES: Final[Mapping[str, str]] = MappingProxyType({f"SCMP_CMP_{op}": op for op in _OPS})
# Load-time flags for seccomp(2). bwrap loads the filter itself, so they cannot be honoured;
# ignoring them is safe: none widens what the filter allows (SPEC_ALLOW would even weaken the
# Spectre mitigations, so dropping it is the cautious choice).
_KNOWN_FLAGS: Final = frozenset(
    {
        "SECCOMP_FILTER_FLAG_TSYNC",
        "SECCOMP_FILTER_FLAG_LOG",
        "SECCOMP_FILTER_FLAG_SPEC_ALLOW",
        "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV",
    }
)
_TOP_KEYS: Final = frozenset(
    {
        "defaultAction",
        "defaultErrnoRet",
        "defaultErrno",
        "architectures",
        "archMap",
        "syscalls",
        "flags",
        "listenerPath",
        "listenerMetadata",
    }
)
_SYSCALL_KEYS: Final = frozenset(
    {"names", "name", "action", "errnoRet", "errno", "args", "comment", "includes", "excludes"}
)
_ARG_KEYS: Final = frozenset({"index", "value", "valueTwo", "op"})
_FILTER_KEYS: Final = frozenset({"caps", "arches", "minKernel"})
_ARCH_MAP_KEYS: Final = frozenset({"architecture", "subArchitectures"})

_HINT: Final = (
    "buildcell reads Docker seccomp profiles and the OCI runtime-spec linux.seccomp object"
)


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value) if abs(value) < 10**30 else "a huge integer"
    if isinstance(value, float):
        return f"the number {value!r}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"the string {shown!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


@dataclass(frozen=True)
class _Host:
    """What conditional Docker rules are resolved against."""

    arch: str
    kernel: tuple[int, int]

    @property
    def docker_arch_names(self) -> frozenset[str]:
        return _DOCKER_ARCH_NAMES.get(self.arch, frozenset({self.arch}))


class _Parser:
    """Walks the decoded JSON, checking every value and remembering where it is."""

    def __init__(self, source: str, host: _Host) -> None:
        self.source = source
        self.host = host

    def fail(self, path: str, detail: str) -> NoReturn:
        where = f"{path}: " if path else ""
        raise SeccompError(f"invalid seccomp profile {self.source}: {where}{detail}", hint=_HINT)

    def expect(self, path: str, expected: str, got: object) -> NoReturn:
        self.fail(path, f"expected {expected}, got {_describe(got)}")

    def obj(self, value: object, path: str, keys: frozenset[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.expect(path, "an object", value)
        for key in value:
            if key not in keys:
                child = f"{path}.{key}" if path else key
                self.fail(child, f"unknown key (expected one of {', '.join(sorted(keys))})")
        return value

    def optional_list(self, value: object, path: str) -> list[Any]:
        # Go's encoding/json, which Docker uses, reads null as an empty list.
        if value is None:
            return []
        if not isinstance(value, list):
            self.expect(path, "a list", value)
        return value

    def string(self, value: object, path: str) -> str:
        if not isinstance(value, str):
            self.expect(path, "a string", value)
        return value

    def strings(self, value: object, path: str) -> list[str]:
        items = self.optional_list(value, path)
        return [self.string(item, f"{path}[{i}]") for i, item in enumerate(items)]

    def uint(self, value: object, path: str, maximum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
            self.expect(path, f"an integer from 0 to {maximum}", value)
        return value

    def errno_ret(self, obj: dict[str, Any], number: str, name: str, prefix: str) -> int | None:
        """The errno of ``obj`` as a number (``errnoRet``) or a name (``errno``: podman's
        profiles give both, ``"ENOSYS"`` beside 38); both must agree."""
        value = obj.get(number)
        if value is not None:
            value = self.uint(value, prefix + number, _MAX_RET_DATA)
        if name not in obj:
            return value
        text = self.string(obj[name], prefix + name)
        named = getattr(errno, text, None) if text.isupper() and text.startswith("E") else None
        if not isinstance(named, int):
            self.expect(prefix + name, "an errno name such as EPERM", text)
        assert isinstance(named, int)
        if value is not None and value != named:
            self.fail(prefix + name, f"{text} is {named}, but {number} says {value}")
        return named

    def profile(self, document: object) -> SeccompProfile:
        top = self.obj(document, "", _TOP_KEYS)
        if "defaultAction" not in top:
            self.fail("defaultAction", "missing (every profile needs a default action)")
        default_errno_ret = self.errno_ret(top, "defaultErrnoRet", "defaultErrno", "")
        default_action = self.action(top["defaultAction"], "defaultAction")
        default_data = (
            _ret_data(None, default_errno_ret) if default_action in _ACTIONS_WITH_DATA else None
        )

        for i, flag in enumerate(self.strings(top.get("flags"), "flags")):
            if flag not in _KNOWN_FLAGS:
                self.expect(f"flags[{i}]", f"one of {', '.join(sorted(_KNOWN_FLAGS))}", flag)
        if self.string(top.get("listenerPath", ""), "listenerPath"):
            self.fail(
                "listenerPath",
                "seccomp user notification is not supported (buildcell runs no seccomp agent)",
            )
        self.string(top.get("listenerMetadata", ""), "listenerMetadata")

        extra_arches = self.arches(top.get("architectures"), top.get("archMap"))

        rules: list[SyscallRule] = []
        for i, entry in enumerate(self.optional_list(top.get("syscalls"), "syscalls")):
            rule = self.syscall(entry, f"syscalls[{i}]", default_errno_ret)
            if rule is not None:
                rules.append(rule)

        return SeccompProfile(
            name=PurePath(self.source).name or self.source,
            default_action=default_action,
            default_errno=default_data,
            extra_arches=extra_arches,
            rules=tuple(rules),
        )

    def action(self, value: object, path: str) -> str:
        if value == "SCMP_ACT_NOTIFY":
            self.fail(
                path,
                "SCMP_ACT_NOTIFY is not supported (buildcell runs no seccomp agent to answer it)",
            )
        if not isinstance(value, str) or value not in _ACTION_NAMES:
            self.expect(path, f"one of {', '.join(_ACTION_NAMES)}", value)
        return _ACTION_NAMES[value]

    def arches(self, architectures: object, arch_map: object) -> tuple[str, ...]:
        flat = self.strings(architectures, "architectures")
        for i, name in enumerate(flat):
            self.arch_name(name, f"architectures[{i}]")
        mapped: list[str] = []
        entries = self.optional_list(arch_map, "archMap")
        if flat and entries:
            self.fail("archMap", "a profile gives either 'architectures' or 'archMap', not both")
        native = _scmp_arch_name(self.host.arch)
        matched = False
        for i, entry in enumerate(entries):
            path = f"archMap[{i}]"
            fields = self.obj(entry, path, _ARCH_MAP_KEYS)
            if "architecture" not in fields:
                self.fail(f"{path}.architecture", "missing")
            main = self.arch_name(fields["architecture"], f"{path}.architecture")
            subs = self.strings(fields.get("subArchitectures"), f"{path}.subArchitectures")
            for j, sub in enumerate(subs):
                self.arch_name(sub, f"{path}.subArchitectures[{j}]")
            # Docker takes the first entry for the native architecture and ignores the rest.
            if main == native and not matched:
                matched = True
                mapped = [main, *subs]
        companions = {_scmp_arch_name(a): a for a in _COMPANION_ARCHES.get(self.host.arch, ())}
        extra: list[str] = []
        # The native ABI is always filtered; of the others, only those a kernel of this
        # architecture can run mean anything (an ARM entry on x86_64 would never match).
        for name in flat or mapped:
            arch = companions.get(name)
            if arch is not None and arch not in extra:
                extra.append(arch)
        return tuple(extra)

    def arch_name(self, value: object, path: str) -> str:
        if not isinstance(value, str) or not _SCMP_ARCH.fullmatch(value):
            self.expect(path, "an architecture such as SCMP_ARCH_X86_64", value)
        return value

    def syscall(
        self, value: object, path: str, default_errno_ret: int | None
    ) -> SyscallRule | None:
        entry = self.obj(value, path, _SYSCALL_KEYS)
        names = self.names(entry, path)
        if "action" not in entry:
            self.fail(f"{path}.action", "missing")
        action = self.action(entry["action"], f"{path}.action")
        errno_ret = self.errno_ret(entry, "errnoRet", "errno", f"{path}.")
        conditions = tuple(
            self.condition(arg, f"{path}.args[{i}]")
            for i, arg in enumerate(self.optional_list(entry.get("args"), f"{path}.args"))
        )
        if len(conditions) > _MAX_CONDITIONS:
            self.fail(f"{path}.args", f"at most {_MAX_CONDITIONS} conditions are supported")
        if "comment" in entry:
            self.string(entry["comment"], f"{path}.comment")
        # Validate both filters in full before deciding: a rule skipped on this host must
        # still be well-formed, or the same file would fail elsewhere.
        includes = self.filter(entry.get("includes"), f"{path}.includes")
        excludes = self.filter(entry.get("excludes"), f"{path}.excludes")
        if not self.applies(includes, excludes):
            return None
        # errnoRet means nothing to other actions; runc ignores it there, and so do we.
        data = _ret_data(errno_ret, default_errno_ret) if action in _ACTIONS_WITH_DATA else None
        return SyscallRule(names=names, action=action, errno=data, args=conditions)

    def names(self, entry: dict[str, Any], path: str) -> tuple[str, ...]:
        single = entry.get("name")
        several = self.strings(entry.get("names"), f"{path}.names")
        if single is not None and self.string(single, f"{path}.name"):
            if several:
                self.fail(path, "a rule gives either 'name' or 'names', not both")
            candidates = [(f"{path}.name", single)]
        else:
            candidates = [(f"{path}.names[{i}]", name) for i, name in enumerate(several)]
        if not candidates:
            self.fail(f"{path}.names", "expected at least one syscall name")
        for where, name in candidates:
            if not _SYSCALL_NAME.fullmatch(name):
                self.expect(where, "a syscall name (letters, digits and '_')", name)
        return tuple(name for _, name in candidates)

    def condition(self, value: object, path: str) -> ArgCondition:
        arg = self.obj(value, path, _ARG_KEYS)
        for key in ("index", "value", "op"):
            if key not in arg:
                self.fail(f"{path}.{key}", "missing")
        index = self.uint(arg["index"], f"{path}.index", _MAX_ARG_INDEX)
        op_name = arg["op"]
        if not isinstance(op_name, str) or op_name not in _OP_NAMES:
            self.expect(f"{path}.op", f"one of {', '.join(_OP_NAMES)}", op_name)
        datum = self.uint(arg["value"], f"{path}.value", _MAX_U64)
        datum_two = self.uint(arg.get("valueTwo", 0), f"{path}.valueTwo", _MAX_U64)
        return ArgCondition(index=index, op=_OP_NAMES[op_name], value=datum, value_two=datum_two)

    def filter(
        self, value: object, path: str
    ) -> tuple[list[str], list[str], tuple[int, int] | None]:
        if value is None:
            return [], [], None
        fields = self.obj(value, path, _FILTER_KEYS)
        caps = self.strings(fields.get("caps"), f"{path}.caps")
        arches = self.strings(fields.get("arches"), f"{path}.arches")
        min_kernel = self.string(fields.get("minKernel", ""), f"{path}.minKernel")
        if not min_kernel:
            return caps, arches, None
        match = _MIN_KERNEL.fullmatch(min_kernel)
        version = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
        if version == (0, 0):
            self.expect(f"{path}.minKernel", 'a kernel version such as "4.8"', min_kernel)
        return caps, arches, version

    def applies(
        self,
        includes: tuple[list[str], list[str], tuple[int, int] | None],
        excludes: tuple[list[str], list[str], tuple[int, int] | None],
    ) -> bool:
        # The same order and meaning as moby's setupSeccomp, for a cell with no capabilities:
        # a rule that needs a capability never applies, and one withheld from holders of a
        # capability always does.
        _, ex_arches, ex_kernel = excludes
        in_caps, in_arches, in_kernel = includes
        native_names = self.host.docker_arch_names
        if native_names.intersection(ex_arches):
            return False
        if ex_kernel is not None and self.host.kernel >= ex_kernel:
            return False
        if in_arches and not native_names.intersection(in_arches):
            return False
        if in_caps:
            return False
        return not (in_kernel is not None and self.host.kernel < in_kernel)


def _ret_data(errno_ret: int | None, default_errno_ret: int | None) -> int:
    # The rule's own errnoRet, else the profile's defaultErrnoRet, else EPERM.
    if errno_ret is not None:
        return errno_ret
    if default_errno_ret is not None:
        return default_errno_ret
    return errno.EPERM


def parse_profile(
    data: str | bytes, *, source: str, kernel: tuple[int, int], arch: str
) -> SeccompProfile:
    """Read a Docker or OCI seccomp profile for a cell without capabilities.

    Accepts Docker's current format (``archMap``, ``names``, conditional ``includes`` and
    ``excludes``), its older one (``architectures``, singular ``name``) and the OCI
    runtime-spec ``linux.seccomp`` object. Conditions are resolved here: rules that need a
    capability are dropped (the cell has none), ``arches`` are matched against ``arch`` and
    ``minKernel`` against ``kernel``.

    Args:
        data: the profile's JSON text.
        source: where it came from, for messages; its last path component names the profile.
        kernel: the (major, minor) version of the kernel the filter will run on.
        arch: the libseccomp-style native architecture, as :func:`native_arch` returns.

    Raises:
        SeccompError: the text is not JSON, or not a profile buildcell can honour exactly
            (an unknown key, action or operator, a value of the wrong type or range,
            ``SCMP_ACT_NOTIFY``); the message names the JSON path at fault.
    """
    parser = _Parser(source, _Host(arch=arch, kernel=kernel))
    try:
        document = json.loads(data, object_pairs_hook=reject_duplicate_keys)
    except DuplicateKeyError as e:
        parser.fail("", f"the key {e.key!r} appears twice in one JSON object")
    except RecursionError as e:
        raise SeccompError(
            f"invalid seccomp profile {source}: JSON nested too deeply", hint=_HINT
        ) from e
    except ValueError as e:
        # JSONDecodeError, UnicodeDecodeError and over-long integers are all ValueErrors.
        raise SeccompError(f"invalid seccomp profile {source}: not JSON: {e}", hint=_HINT) from e
    return parser.profile(document)


def _running_kernel() -> tuple[int, int]:
    release = os.uname().release
    match = re.match(r"(\d+)\.(\d+)", release)
    if match is None:
        raise SeccompError(f"cannot tell the kernel version from uname release {release!r}")
    return int(match.group(1)), int(match.group(2))


def load_profile(path: Path) -> SeccompProfile:
    """Read a Docker or OCI seccomp profile file for this machine's kernel and architecture.

    Raises:
        SeccompError: the file cannot be read, is too large, or is not a valid profile
            (see :func:`parse_profile`).
    """
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_PROFILE_BYTES + 1)
    except OSError as e:
        raise SeccompError(
            f"cannot read seccomp profile {path}: {e.strerror or e}",
            hint="check the path given for the seccomp profile",
        ) from e
    if len(data) > _MAX_PROFILE_BYTES:
        raise SeccompError(
            f"seccomp profile {path} is larger than {_MAX_PROFILE_BYTES // (1024 * 1024)} MiB"
        )
    return parse_profile(data, source=str(path), kernel=_running_kernel(), arch=native_arch())


# --------------------------------------------------------------------------------------------
# Compiling.
# --------------------------------------------------------------------------------------------

_compiled: dict[str, bytes] = {}
_compile_lock = threading.Lock()
# struct sock_filter is { u16 code; u8 jt; u8 jf; u32 k; }.
_SOCK_FILTER_SIZE: Final = 8


def compile_bpf(
    profile: SeccompProfile,
    *,
    cache_dir: Path | None = None,
    warn: Callable[[str], None] | None = None,
) -> bytes:
    """Compile ``profile`` to a classic-BPF seccomp program (an array of ``sock_filter``).

    Syscalls outside the native ABI and the profile's ``extra_arches`` kill the process.
    Names libseccomp does not know, or that do not exist on the filtered ABIs, are skipped
    (logged at debug level; at warning level where that leaves a refused syscall allowed).
    The result is cached in-process by :meth:`SeccompProfile.digest`, and in ``cache_dir``
    when given (a directory only the supervisor can write), so that a new process need not
    load libseccomp at all. A cached file that does not verify is compiled again, and
    ``warn`` (default: the log) is told so, with the file's name.

    Raises:
        SeccompError: libseccomp is missing, or refused an architecture or a rule.
    """
    key = profile.digest()
    # Compiling takes milliseconds; holding the lock throughout keeps libseccomp single-
    # threaded and makes sure a profile is compiled once.
    with _compile_lock:
        cached = _compiled.get(key)
        if cached is None:
            path = None
            if cache_dir is not None:
                path = cache_dir / f"seccomp-{key.removeprefix('sha256:')}-{native_arch()}.bpf"
                cached = _read_cached(path, warn or _log_warning)
            if cached is None:
                cached = _compile(profile)
                if path is not None:
                    _write_cached(path, cached)
            _compiled[key] = cached
        return cached


#: A cached filter starts with this and the sha256 of the program after it.
_CACHE_MAGIC = b"buildcell-bpf-1\n"
_DIGEST_SIZE = 32


def _log_warning(message: str) -> None:
    logger.warning("%s", message)


def _read_cached(path: Path, warn: Callable[[str], None] = _log_warning) -> bytes | None:
    """A compiled filter from the cache, verified; ``None`` (with a warning naming the file,
    which is then compiled again) when it is missing, tampered with or truncated.

    The file must be a regular file of ours, with one link, writable by nobody else, and
    its content must match the digest it carries: a filter that let a syscall through
    would load silently otherwise.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        warn(f"not using the cached seccomp filter {path} ({e.strerror}); compiled it again")
        return None
    try:
        st = os.fstat(fd)
        trusted = (
            stat.S_ISREG(st.st_mode)
            and st.st_uid == os.geteuid()
            and st.st_nlink == 1
            and not st.st_mode & 0o022
        )
        data = os.read(fd, 1 << 20) if trusted else b""
    finally:
        os.close(fd)
    head = len(_CACHE_MAGIC) + _DIGEST_SIZE
    body = data[head:]
    if (
        not trusted
        or not data.startswith(_CACHE_MAGIC)
        or not body
        or len(body) % _SOCK_FILTER_SIZE
        or hashlib.sha256(body).digest() != data[len(_CACHE_MAGIC) : head]
    ):
        warn(f"the cached seccomp filter {path} was damaged or not ours; compiled it again")
        with contextlib.suppress(OSError):
            path.unlink()
        return None
    return body


def _write_cached(path: Path, data: bytes) -> None:
    # In a private temporary file renamed into place: a concurrent cell sees all or none.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644
        )
        with os.fdopen(fd, "wb") as f:
            f.write(_CACHE_MAGIC + hashlib.sha256(data).digest() + data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        logger.debug("cannot cache the compiled filter in %s: %s", path, e)
        tmp.unlink(missing_ok=True)


def _import_pyseccomp() -> Any:
    try:
        import pyseccomp
    except (ImportError, RuntimeError, OSError) as e:
        # pyseccomp raises RuntimeError when it cannot find libseccomp.so.
        raise SeccompError(
            f"cannot load libseccomp: {e}",
            hint="install libseccomp (the libseccomp2 package on Debian and Ubuntu)",
        ) from e
    return pyseccomp


def _action_value(sc: Any, action: str, ret_data: int | None) -> int:
    simple = {
        "allow": sc.ALLOW,
        "kill_process": sc.KILL_PROCESS,
        "kill_thread": sc.KILL_THREAD,
        "trap": sc.TRAP,
        "log": sc.LOG,
    }
    if action == "errno":
        return int(sc.ERRNO(ret_data))
    if action == "trace":
        return int(sc.TRACE(ret_data))
    return int(simple[action])


def _check_errno(action: str, ret_data: int | None, label: str, what: str) -> None:
    # The model keeps the errno a profile asked for; the kernel would cap it at 4095 anyway,
    # but libseccomp refuses to encode such a filter at all, so say so plainly.
    if action == "errno" and ret_data is not None and ret_data > _MAX_LIBSECCOMP_ERRNO:
        raise SeccompError(
            f"{label}: errno {ret_data} for {what} is larger than libseccomp can encode "
            f"({_MAX_LIBSECCOMP_ERRNO})",
            hint="use a standard errno, such as 1 (EPERM) or 38 (ENOSYS)",
        )


def _compile(profile: SeccompProfile) -> bytes:
    sc = _import_pyseccomp()
    label = f"seccomp profile {profile.name}"
    _check_errno(profile.default_action, profile.default_errno, label, "the default action")
    for rule in profile.rules:
        _check_errno(rule.action, rule.errno, label, f"syscall {rule.names[0]}")
    default = _action_value(sc, profile.default_action, profile.default_errno)
    try:
        filt = sc.SyscallFilter(default)
        filt.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
    except OSError as e:
        raise SeccompError(
            f"libseccomp cannot build {label} with default action {profile.default_action}: "
            f"{e.strerror or e}",
            hint="the kernel or libseccomp may be too old (kill_process needs Linux 4.14)",
        ) from e

    arch_ids: list[int] = []
    for arch in profile.extra_arches:
        arch_id = getattr(sc.Arch, arch.upper(), None)
        if not isinstance(arch_id, int) or arch_id == sc.Arch.NATIVE:
            raise SeccompError(f"libseccomp does not know the architecture {arch!r} ({label})")
        try:
            filt.add_arch(arch_id)
        except OSError as e:
            raise SeccompError(
                f"libseccomp cannot add architecture {arch} to {label}: {e.strerror or e}"
            ) from e
        arch_ids.append(arch_id)

    for rule in profile.rules:
        action = _action_value(sc, rule.action, rule.errno)
        if action == default:
            # libseccomp refuses a rule that repeats the default action (EACCES); it would
            # change nothing anyway.
            continue
        conditions = [sc.Arg(c.index, getattr(sc, c.op), c.value, c.value_two) for c in rule.args]
        for name in rule.names:
            number = _resolve(sc, name, arch_ids, profile, rule)
            if number is None:
                continue
            try:
                filt.add_rule(action, number, *conditions)
            except OSError as e:
                hint = None
                if len({c.index for c in rule.args}) < len(rule.args):
                    hint = (
                        "libseccomp cannot combine two conditions on the same argument; "
                        "split them into separate rules"
                    )
                raise SeccompError(
                    f"libseccomp refused the rule for syscall {name} ({rule.action}) "
                    f"in {label}: {e.strerror or e}",
                    hint=hint,
                ) from e

    program = _export(filt, label)
    if not program or len(program) % _SOCK_FILTER_SIZE:
        raise SeccompError(f"libseccomp exported a malformed BPF program for {label}")
    return program


def _resolve(
    sc: Any, name: str, arch_ids: Sequence[int], profile: SeccompProfile, rule: SyscallRule
) -> int | None:
    number = int(sc.resolve_syscall(sc.Arch.NATIVE, name))
    if number >= 0:
        return number
    if number == -1:  # __NR_SCMP_ERROR: not a syscall libseccomp has heard of
        refused = rule.action != "allow" and profile.default_action == "allow"
        log = logger.warning if refused else logger.debug
        log(
            "seccomp profile %s: libseccomp does not know syscall %s; %s",
            profile.name,
            name,
            "it stays allowed" if refused else "skipping it",
        )
        return None
    # A negative pseudo number: the syscall exists on some ABI but not the native one.
    # libseccomp places such a rule on the extra ABIs that do have it (chown32 for x86, say).
    if any(int(sc.resolve_syscall(arch_id, name)) >= 0 for arch_id in arch_ids):
        return number
    logger.debug(
        "seccomp profile %s: %s is not a syscall on this architecture; skipping it",
        profile.name,
        name,
    )
    return None


def _export(filt: Any, label: str) -> bytes:
    try:
        # A memfd has no size limit to block on (a pipe would deadlock past 64 KiB) and
        # leaves nothing on disk.
        fd = os.memfd_create("buildcell-seccomp", os.MFD_CLOEXEC)
        with open(fd, "w+b") as f:
            filt.export_bpf(f)
            f.seek(0)
            return f.read()
    except OSError as e:
        raise SeccompError(f"cannot export the BPF program for {label}: {e.strerror or e}") from e
