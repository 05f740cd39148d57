"""``buildcell doctor``: what this host supports, checked for real."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from buildcell.host import HostEnv
from buildcell.state import StateDir

__all__ = ["DoctorReport", "run_checks"]


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class DoctorReport:
    checks: list[Check] = field(default_factory=list)
    limits: dict[str, str] = field(default_factory=dict)
    cell_ok: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "cell_ok": self.cell_ok,
            "checks": [c.__dict__ for c in self.checks],
            "limits": self.limits,
        }


def _probe_cell(report: DoctorReport, state: StateDir) -> None:
    from buildcell.cell import CellConfig, Limits
    from buildcell.cell.supervisor import run_cell

    out = bytearray()
    err = bytearray()
    try:
        result = run_cell(
            CellConfig(
                argv=(
                    "/bin/sh",
                    "-c",
                    "grep -E '^(Uid|Seccomp|NoNewPrivs|CapEff):' "
                    "/proc/self/status; cat /proc/self/uid_map",
                ),
                limits=Limits(timeout=20),
            ),
            state=state,
            stdout=out.extend,
            stderr=err.extend,
        )
    except Exception as e:  # doctor reports every failure instead of crashing
        report.checks.append(Check("cell", False, f"no cell can be made: {e}"))
        return
    text = out.decode(errors="replace")
    fields = {
        k.strip(): (v.split() or [""])[0]
        for k, _, v in (ln.partition(":") for ln in text.splitlines() if ":" in ln)
    }
    ok = (
        result.exit_code == 0
        and fields.get("Seccomp") == "2"
        and fields.get("NoNewPrivs") == "1"
        and fields.get("CapEff") == "0000000000000000"
        and fields.get("Uid") == "1000"
    )
    detail = (
        f"uid {fields.get('Uid')}, seccomp mode {fields.get('Seccomp')}, "
        f"no_new_privs {fields.get('NoNewPrivs')}, capabilities {fields.get('CapEff')}, "
        f"teardown {'clean' if result.teardown and result.teardown.clean else 'NOT clean'}"
    )
    if not ok:
        detail += f" (exit {result.exit_code}: {err.decode(errors='replace').strip()})"
    report.checks.append(Check("cell", ok, detail))
    report.cell_ok = ok and bool(result.teardown and result.teardown.clean)


def _probe_egress(report: DoctorReport, state: StateDir) -> None:
    """A cell with a network policy: its own namespace, listeners, resolver answering."""
    from buildcell.allowlist import EgressPolicy
    from buildcell.cell import CellConfig, Limits
    from buildcell.cell.supervisor import run_cell

    out = bytearray()
    try:
        result = run_cell(
            CellConfig(
                argv=(
                    "/bin/sh",
                    "-c",
                    "getent hosts allowed.doctor.invalid; getent hosts other.doctor.invalid; "
                    "echo interfaces $(tail -n +3 /proc/net/dev | cut -d: -f1)",
                ),
                limits=Limits(timeout=20),
                network=EgressPolicy.from_strings(["allowed.doctor.invalid"]),
            ),
            state=state,
            stdout=out.extend,
            stderr=lambda _: None,
        )
    except Exception as e:  # doctor reports every failure instead of crashing
        report.checks.append(Check("egress", False, f"no cell with a network policy: {e}"))
        return
    lines = out.decode(errors="replace").split("\n")
    answered = any(ln.startswith("127.77.") and "allowed.doctor.invalid" in ln for ln in lines)
    refused = not any("other.doctor.invalid" in ln for ln in lines)
    only_lo = "interfaces lo" in lines
    ok = answered and refused and only_lo and bool(result.teardown and result.teardown.clean)
    detail = (
        "own network namespace with only lo; proxy, resolver and transparent listeners "
        "served from the host"
        if ok
        else f"unexpected: resolver answered={answered}, refused others={refused}, "
        f"only lo={only_lo}, exit {result.exit_code}"
    )
    report.checks.append(Check("egress", ok, detail))


def run_checks(host: HostEnv | None = None) -> DoctorReport:
    """Run every check on the host ``host`` describes (default: this process's
    environment); never raises for a failing check."""
    from buildcell.cell.supervisor import find_bwrap, limits_backend
    from buildcell.errors import Error

    host = host if host is not None else HostEnv.read()
    report = DoctorReport()
    try:
        bwrap = find_bwrap(host)
        version = subprocess.run(
            [bwrap, "--version"], capture_output=True, text=True, check=False
        ).stdout.strip()
        report.checks.append(Check("bubblewrap", True, f"{version} at {bwrap}"))
    except Error as e:
        report.checks.append(Check("bubblewrap", False, f"{e} ({e.hint})"))
        return report

    try:
        max_ns = Path("/proc/sys/user/max_user_namespaces").read_text().strip()
    except OSError:
        max_ns = "unknown"
    clone = Path("/proc/sys/kernel/unprivileged_userns_clone")
    userns_ok = max_ns not in ("0", "unknown") and (
        not clone.exists() or clone.read_text().strip() == "1"
    )
    report.checks.append(
        Check("user namespaces", userns_ok, f"user.max_user_namespaces = {max_ns}")
    )

    try:
        from buildcell.cell import seccomp

        profile = seccomp.default_profile()
        bpf = seccomp.compile_bpf(profile)
        report.checks.append(
            Check(
                "seccomp",
                True,
                f"libseccomp compiled the default profile "
                f"({len(bpf) // 8} BPF instructions, {profile.digest()[:19]}…)",
            )
        )
    except Exception as e:
        report.checks.append(Check("seccomp", False, f"cannot compile a filter: {e}"))

    backend = limits_backend(host)
    report.checks.append(Check("limits backend", True, f"{backend.mode}: {backend.reason}"))
    report.limits = backend.enforcement()
    if backend.mode != "rlimit":
        report.checks.append(_cgroup_moves_check())

    if os.geteuid() == 0:
        base, count = host.uid_range
        report.checks.append(
            Check(
                "cell identity",
                True,
                f"running as root: cells run as host uids {base}..{base + count - 1}",
            )
        )
    else:
        report.checks.append(
            Check("cell identity", True, f"rootless: cells run as your uid {os.getuid()}")
        )

    try:
        state = StateDir(host=host)
        report.checks.append(Check("state directory", True, str(state.root)))
    except Error as e:
        report.checks.append(Check("state directory", False, str(e)))
        return report

    _probe_cell(report, state)
    if report.cell_ok:
        _probe_workspace(report, state)
        _probe_egress(report, state)
    return report


def _cgroup_moves_check() -> Check:
    """How fast a cell joins its cgroups: advice, never a failure."""
    from buildcell.cell.limits import favors_dynamic_modifications

    try:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    except OSError as e:
        return Check("cgroup moves", True, f"cannot read /proc/self/mountinfo: {e.strerror}")
    if favors_dynamic_modifications(mountinfo):
        return Check("cgroup moves", True, "favordynmods: a cell joins its cgroups at once")
    return Check(
        "cgroup moves",
        True,
        "no cgroup hierarchy is mounted with favordynmods: a cell with limits started "
        "after a pause first waits for an RCU grace period (≈ 10 ms) to join its cgroups; "
        "a host that runs many builds may remount with it (the kernel's trade: forks and "
        "exits cost a little more)",
    )


def _probe_workspace(report: DoctorReport, state: StateDir) -> None:
    """Which workspace mode this host gives a source: a cell writes into an overlaid one,
    and the source must be left as it was."""
    import tempfile

    from buildcell.cell import CellConfig, Limits
    from buildcell.cell.supervisor import run_cell
    from buildcell.trees import remove_tree

    setting = state.host.workspace
    if setting == "copy":
        report.checks.append(Check("workspace", True, "copy (BUILDCELL_WORKSPACE=copy)"))
        return
    probe = Path(tempfile.mkdtemp(prefix="doctor-", dir=state.root))
    try:
        source = probe / "source"
        source.mkdir(mode=0o755)
        (source / "file").write_text("source\n")
        forced = StateDir(state.root, host=state.host.replace(workspace="overlay"))
        err = bytearray()
        try:
            result = run_cell(
                CellConfig(
                    argv=("/bin/sh", "-c", "echo cell > file && cat file"),
                    source=source,
                    limits=Limits(timeout=20),
                ),
                state=forced,
                stdout=lambda _: None,
                stderr=err.extend,
            )
            ok = result.exit_code == 0 and (source / "file").read_text() == "source\n"
            why = err.decode(errors="replace").strip() or f"exit {result.exit_code}"
        except Exception as e:  # doctor reports every failure instead of crashing
            ok, why = False, str(e)
    finally:
        remove_tree(probe)
    if ok:
        detail = (
            "copy-on-write overlay of the source (checked on the state directory's file "
            "system; a source where the host refuses one is copied)"
        )
    else:
        detail = f"copy: no copy-on-write overlay here ({why})"
    # A copy still works: the check fails only when the overlay was asked for.
    usable = ok or setting == "auto"
    report.checks.append(Check("workspace", usable, detail))
    report.cell_ok = report.cell_ok and usable
