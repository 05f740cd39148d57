"""`make bench`: buildcell against raw bubblewrap, measured side by side in one run.

Every figure alternates the contenders within one loop, so that both see the same
machine noise, and reports medians with min-max. The raw baseline runs bubblewrap with
exactly the flags buildcell would pass (the same planning functions build them), so the
ratio is the supervisor's own cost: workspace, seccomp hand-off, uid switch, event log,
teardown and its checks.

Writes bench/results.json and bench/results.md, and the table in README.md between the
``bench:start``/``bench:end`` markers.
"""

from __future__ import annotations

import compileall
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "src"))

from buildcell.cell import CellConfig, reaper  # noqa: E402
from buildcell.cell.bwrap import SandboxPlan, bwrap_argv  # noqa: E402
from buildcell.cell.config import HostRootfs  # noqa: E402
from buildcell.cell.etcdir import prepared_etc  # noqa: E402
from buildcell.cell.rootfs import WritableAreas, cell_mounts, rootfs_mounts  # noqa: E402
from buildcell.cell.seccomp import compile_bpf, default_profile  # noqa: E402
from buildcell.cell.supervisor import find_bwrap, run_cell  # noqa: E402
from buildcell.state import StateDir  # noqa: E402

N = int(os.environ.get("BENCH_N", "200"))
GROUPS = frozenset({"cell", "redaction", "network", "suite"})
#: Comma-separated groups to measure (of GROUPS); default all. A partial run prints its
#: table but leaves bench/results.* and the README alone.
ONLY = frozenset(filter(None, os.environ.get("BENCH_ONLY", "").split(","))) or GROUPS


#: Seconds between the samples of the per-cell figures (see ``measure``).
SETTLE = 0.03


def _sink(_: bytes) -> None:
    pass


def measure(
    contenders: dict[str, Callable[[], object]], n: int, *, settle: float = 0.0
) -> dict[str, list[float]]:
    """``n`` rounds of every contender in turn; with ``settle``, that many seconds pass
    between samples, untimed, so that the kernel's deferred teardown of one sample's
    namespaces (network namespaces are freed by a work queue) does not run on the
    second CPU during the next contender's sample and count against it."""
    for fn in contenders.values():  # warm caches (page cache, seccomp, etc files)
        fn()
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(n):
        for name, fn in contenders.items():
            if settle:
                time.sleep(settle)
            t = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t) * 1000)
    return samples


def _reap_sandbox_inits() -> None:
    """Wait for the sandbox's init a bare bubblewrap leaves behind (bubblewrap exits
    first; its init dies of its parent-death signal and is reparented to this process, a
    child subreaper): a cell is done when its last process is, as ``run_cell``'s is."""
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def summary(ms: list[float]) -> dict[str, float]:
    return {"median": statistics.median(ms), "min": min(ms), "max": max(ms), "n": len(ms)}


def main() -> int:
    # Measure installed-package conditions: bytecode compiled, as pip would leave it, and
    # the command's own caches beside it written by the warm-up runs (not under -B).
    compileall.compile_dir(REPO / "src", quiet=1)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    reaper.become_subreaper()  # a bare bubblewrap's orphaned init is waited for here
    base = Path(tempfile.mkdtemp(prefix="bc-bench-", dir="/tmp"))
    os.chmod(base, 0o711)
    try:
        state = StateDir(base / "state")
        source = base / "src"
        source.mkdir()
        os.chmod(source, 0o755)
        bwrap = find_bwrap(state.host)
        bpf = compile_bpf(default_profile())
        workspace = base / "ws"
        workspace.mkdir()
        etc = prepared_etc(state.etc)  # the copy every cell binds, held for the whole run
        plan = SandboxPlan(
            mounts=cell_mounts(
                [*rootfs_mounts(HostRootfs(), etc=False), *etc.mounts()],
                WritableAreas(str(workspace)),
            ),
            argv=("/bin/true",),
            env=tuple(sorted(CellConfig(argv=("x",)).cell_env().items())),
            cwd="/workspace",
            hostname="buildcell",
            uid=1000,
            gid=1000,
        )

        def raw_bwrap() -> None:
            seccomp = os.memfd_create("bpf")
            os.write(seccomp, bpf)
            os.lseek(seccomp, 0, 0)
            r, w = os.pipe()
            argv = bwrap_argv(dataclasses.replace(plan, seccomp_fd=seccomp, status_fd=w), bwrap)
            subprocess.run(argv, pass_fds=(seccomp, w), check=True)
            _reap_sandbox_inits()
            for fd in (seccomp, r, w):
                os.close(fd)

        plain = _plain_bwrap_argv(bwrap, workspace)

        def plain_bwrap(**as_user: Any) -> None:
            seccomp = os.memfd_create("bpf")
            os.write(seccomp, bpf)
            os.lseek(seccomp, 0, 0)
            argv = [*plain, "--seccomp", str(seccomp), "/bin/true"]
            subprocess.run(argv, pass_fds=(seccomp,), check=True, **as_user)
            _reap_sandbox_inits()
            os.close(seccomp)

        def plain_bwrap_unprivileged() -> None:
            # As root every cell's bubblewrap runs as an unprivileged host uid (nobody here).
            plain_bwrap(user=65534, group=65534, extra_groups=[])

        def buildcell_run_cell() -> None:
            run_cell(
                CellConfig(argv=("/bin/true",), source=source),
                state=state,
                stdout=_sink,
                stderr=_sink,
            )

        env = dict(os.environ, BUILDCELL_STATE_DIR=str(state.root), PYTHONPATH=str(REPO / "src"))
        cli = [
            sys.executable,
            "-m",
            "buildcell",
            "run",
            "-q",
            "--source",
            str(source),
            "--",
            "/bin/true",
        ]

        def buildcell_cli() -> None:
            subprocess.run(cli, env=env, check=True)

        def python_startup() -> None:
            subprocess.run([sys.executable, "-c", "pass"], check=True)

        results = _header(bwrap)
        unprivileged = plain_bwrap_unprivileged if os.geteuid() == 0 else None
        figures = _figures(
            state,
            (plain_bwrap, raw_bwrap, buildcell_run_cell, buildcell_cli, python_startup),
            unprivileged,
        )
        podman = shutil.which("podman")
        results["figures"] = figures
        results["podman"] = "installed" if podman else "not installed: not measured"
        table = render(results)
        if ONLY >= GROUPS:
            (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
            (HERE / "results.md").write_text(table)
            update_readme(table)
        print(table)
        return 0
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _figures(
    state: StateDir,
    cell: tuple[Callable[[], object], ...],
    unprivileged: Callable[[], object] | None,
) -> list[dict[str, object]]:
    """The figures of the groups asked for (``BENCH_ONLY``), each with its ratio."""
    figures: list[dict[str, object]] = []
    if "cell" in ONLY:
        figures += cell_figures(*cell, unprivileged=unprivileged)
    if "redaction" in ONLY:
        print("redaction throughput ...", flush=True)
        figures += redaction_figures()
    if "network" in ONLY:
        from netbench import network_figures

        figures += network_figures(state, measure, summary, max(20, N // 4))
    if "suite" in ONLY:
        from suite import suite_figures

        figures += suite_figures(state, measure, summary, N)
    for f in figures:
        if "ratio" not in f and "skipped" not in f:
            f["ratio"] = f["ours"]["median"] / f["baseline"]["median"]  # type: ignore[index]
    return figures


def _header(bwrap: str) -> dict[str, object]:
    """When, where and with what the figures are measured."""
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{platform.node()}: {os.cpu_count()} CPUs, {platform.machine()}, "
        f"Linux {platform.release()}, {'root' if os.geteuid() == 0 else 'rootless'}",
        "bwrap": subprocess.run(
            [bwrap, "--version"], capture_output=True, text=True, check=True
        ).stdout.strip(),
        "python": platform.python_version(),
        "n": N,
    }


def _plain_bwrap_argv(bwrap: str, workspace: Path) -> list[str]:
    """What one would write by hand for the same isolation: every namespace, a read-only
    /usr, /proc, /dev, tmpfs /tmp and home, the workspace bound (the seccomp filter is
    added per run), without buildcell's other flags."""
    argv = [bwrap, "--unshare-all", "--die-with-parent", "--new-session"]
    argv += ["--ro-bind", "/usr", "/usr"]
    for link in ("bin", "sbin", "lib", "lib64"):
        target = Path("/") / link
        if target.is_symlink():
            argv += ["--symlink", os.readlink(target), f"/{link}"]
    argv += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--tmpfs", "/home"]
    return [*argv, "--bind", str(workspace), "/workspace", "--chdir", "/workspace"]


def cell_figures(
    plain_bwrap: Callable[[], object],
    raw_bwrap: Callable[[], object],
    run_cell: Callable[[], object],
    cli: Callable[[], object],
    python_startup: Callable[[], object],
    *,
    unprivileged: Callable[[], object] | None = None,
) -> list[dict[str, object]]:
    """``run_cell`` and the whole CLI against bubblewrap: with plain flags (what one would
    write by hand for the same isolation), with buildcell's own flags (what those cost),
    and, as root, with the plain flags as an unprivileged uid (what that costs)."""
    print(f"per-cell overhead, {N} rounds ...", flush=True)
    contenders = {"plain bwrap": plain_bwrap, "raw bwrap": raw_bwrap, "run_cell": run_cell}
    if unprivileged is not None:
        contenders["unprivileged"] = unprivileged
    cell = measure(contenders, N, settle=SETTLE)
    print(f"whole CLI process, {N // 2} rounds ...", flush=True)
    whole = measure(
        {"plain bwrap": plain_bwrap, "buildcell run": cli, "python -c pass": python_startup},
        max(20, N // 2),
        settle=SETTLE,
    )
    figures: list[dict[str, object]] = [
        {
            "figure": "per-cell overhead: `run_cell` of /bin/true",
            "ours": summary(cell["run_cell"]),
            "baseline": summary(cell["plain bwrap"]),
            "baseline_name": "plain bwrap: namespaces, ro /usr, /proc, /dev, tmpfs, seccomp",
            "target": "≤ 1.3×",
        },
        {
            "figure": "bubblewrap with buildcell's own flags (the prepared /etc: 3 mounts)",
            "ours": summary(cell["raw bwrap"]),
            "baseline": summary(cell["plain bwrap"]),
            "baseline_name": "plain bwrap",
            "target": "(report: what the flags cost)",
        },
        {
            "figure": "`buildcell run -- /bin/true`, whole CLI process",
            "ours": summary(whole["buildcell run"]),
            "baseline": summary(whole["plain bwrap"]),
            "baseline_name": "plain bwrap",
            "target": "(report; interpreter start-up alone: "
            f"{statistics.median(whole['python -c pass']):.1f} ms)",
        },
    ]
    if "unprivileged" in cell:
        figures.insert(
            1,
            {
                "figure": "plain bwrap as an unprivileged host uid (as root, every cell's "
                "bubblewrap runs as one)",
                "ours": summary(cell["unprivileged"]),
                "baseline": summary(cell["plain bwrap"]),
                "baseline_name": "plain bwrap as root",
                "target": "(report: what the uid costs)",
            },
        )
    return figures


def redaction_figures() -> list[dict[str, object]]:
    """MB/s of the streaming redactor over 64 MiB of printable text in 64 KiB chunks, with
    1 and with 100 secrets, against a plain copy of the same chunks (same run)."""
    import random

    from buildcell.redact import Redactor, Secret

    rng = random.Random(1)
    alphabet = bytes(range(32, 127))
    stream = bytes(rng.choice(alphabet) for _ in range(1 << 20)) * 64
    chunks = [stream[i : i + 65536] for i in range(0, len(stream), 65536)]
    mb = len(stream) / 1e6

    def secrets(n: int) -> list[Secret]:
        return [
            Secret(f"s{i}", bytes(rng.choice(alphabet) for _ in range(rng.randint(20, 40))))
            for i in range(n)
        ]

    def copy() -> None:
        out = bytearray()
        for chunk in chunks:
            out += chunk

    figures: list[dict[str, object]] = []
    for n in (1, 100):
        redactor_secrets = secrets(n)

        def redact(rs: list[Secret] = redactor_secrets) -> None:
            r = Redactor(rs)
            out = bytearray()
            for chunk in chunks:
                out += r.feed(chunk)
            out += r.flush()

        samples = measure({"copy": copy, "redact": redact}, 5)
        ours = {k: mb / (v / 1000) for k, v in summary(samples["redact"]).items() if k != "n"}
        base = {k: mb / (v / 1000) for k, v in summary(samples["copy"]).items() if k != "n"}
        # A rate's best case is the shortest time: swap min and max.
        ours["min"], ours["max"] = ours["max"], ours["min"]
        base["min"], base["max"] = base["max"], base["min"]
        figures.append(
            {
                "figure": f"redaction throughput, {n} secret{'s' * (n > 1)} (64 MiB stream)",
                "ours": ours,
                "baseline": base,
                "baseline_name": "plain copy of the same chunks",
                "target": "≥ 200 MB/s" if n == 100 else "(report)",
                "unit": "MB/s",
                "ratio": ours["median"] / base["median"],
            }
        )
    return figures


def _fmt(s: dict[str, float], unit: str = "ms") -> str:
    if unit == "MB/s":
        return f"{s['median']:.0f} MB/s ({s['min']:.0f}–{s['max']:.0f})"
    return f"{s['median']:.2f} ms ({s['min']:.2f}–{s['max']:.2f})"


def _ratio(r: float) -> str:
    """Two decimals, or two significant digits below 0.01 (so that 0.0016 does not show as 0.00)."""
    return f"{r:.2f}×" if r >= 0.01 else f"{r:.2g}×"


def render(results: dict[str, object]) -> str:
    lines = [
        f"Measured {results['date']} on {results['machine']}; {results['bwrap']}, "
        f"Python {results['python']}; medians (min–max).",
        "",
        "| figure | buildcell | compared with | baseline | ratio | target |",
        "|---|---|---|---|---|---|",
    ]
    for f in results["figures"]:  # type: ignore[attr-defined]
        if "skipped" in f:
            lines.append(
                f"| {f['figure']} | not measured: {f['skipped']} | {f['baseline_name']} | | | "
                f"{f['target']} |"
            )
            continue
        lines.append(
            f"| {f['figure']} | {_fmt(f['ours'], f.get('unit', 'ms'))} | {f['baseline_name']} | "
            f"{_fmt(f['baseline'], f.get('unit', 'ms'))} | {_ratio(f['ratio'])} | {f['target']} |"
        )
    return "\n".join(lines) + "\n"


def update_readme(table: str) -> None:
    readme = REPO / "README.md"
    text = readme.read_text()
    start, end = "<!-- bench:start -->", "<!-- bench:end -->"
    if start in text and end in text:
        head, _, rest = text.partition(start)
        _, _, tail = rest.partition(end)
        readme.write_text(f"{head}{start}\n{table}{end}{tail}")


if __name__ == "__main__":
    raise SystemExit(main())
