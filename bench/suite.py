"""More `make bench` figures: podman, workspace set-up, concurrency, real builds.

Each is measured side by side with its baseline in the same run. Sizes can be lowered
with environment variables for a quick look (``BENCH_WS_BYTES``, ``BENCH_WS_FILES``,
``BENCH_CONCURRENT``, and ``BENCH_THROUGHPUT``: the comma-separated numbers of C-example
builds started at once, default ``1,4,16``); the defaults are the figures the README
reports.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from buildcell.cell import CellConfig
from buildcell.cell.supervisor import run_cell
from buildcell.state import StateDir
from buildcell.trees import copy_tree

__all__ = ["suite_figures"]

REPO = Path(__file__).resolve().parents[1]

Measure = Callable[[dict[str, Callable[[], object]], int], dict[str, list[float]]]
Summary = Callable[[list[float]], dict[str, float]]


def _sink(_: bytes) -> None:
    pass


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def podman_figure(state: StateDir, measure: Measure, summary: Summary, n: int) -> dict[str, Any]:
    """`buildcell run -- /bin/true` against `podman run --rm --network=none` of a tiny image."""
    podman = shutil.which("podman")
    busybox = Path("/bin/busybox")
    figure: dict[str, Any] = {
        "figure": "`buildcell run -- /bin/true`, whole CLI process",
        "baseline_name": "`podman run --rm --network=none` of a busybox image",
        "target": "≤ 0.25×",
    }
    if podman is None or not busybox.exists():
        figure["skipped"] = "podman or busybox-static is not installed (apt-get install podman)"
        return figure
    with tempfile.TemporaryDirectory(prefix="bc-bench-podman-") as tmp:
        root = Path(tmp) / "root"
        (root / "bin").mkdir(parents=True)
        shutil.copy2(busybox, root / "bin" / "busybox")
        (root / "bin" / "true").symlink_to("busybox")
        tar = Path(tmp) / "image.tar"
        subprocess.run(["tar", "-C", str(root), "-cf", str(tar), "."], check=True)
        made = subprocess.run(
            [podman, "import", str(tar), "buildcell-bench-true"],
            capture_output=True,
            text=True,
            check=False,
        )
        if made.returncode != 0:
            figure["skipped"] = f"podman cannot run here: {made.stderr.strip()[:200]}"
            return figure
        source = Path(tmp) / "src"
        source.mkdir()
        os.chmod(tmp, 0o755)
        env = dict(os.environ, BUILDCELL_STATE_DIR=str(state.root), PYTHONPATH=str(REPO / "src"))
        cli = [sys.executable, "-m", "buildcell", "run", "-q", "--source", str(source), "--"]
        # This host's limits and cgroups need two workarounds: no default ulimits (root
        # cannot raise them here), and runc where crun refuses a hybrid cgroup layout.
        conf = Path(tmp) / "containers.conf"
        conf.write_text("[containers]\ndefault_ulimits = []\n")
        pod_env = dict(os.environ, CONTAINERS_CONF=str(conf))
        pod: list[str] = []
        errors = []
        for runtime in ("crun", "runc"):
            if shutil.which(runtime) is None:
                continue
            candidate = [podman, "--runtime", runtime, "run", "--rm", "--network=none"]
            candidate += ["buildcell-bench-true", "/bin/true"]
            trial = subprocess.run(
                candidate, capture_output=True, text=True, check=False, env=pod_env
            )
            if trial.returncode == 0:
                pod = candidate
                figure["baseline_name"] += f" ({runtime})"
                break
            errors.append(f"{runtime}: {trial.stderr.strip()[:120]}")
        if not pod:
            figure["skipped"] = "podman cannot run here: " + "; ".join(errors)
            return figure
        samples = measure(
            {
                "buildcell": lambda: subprocess.run([*cli, "/bin/true"], env=env, check=True),
                "podman": lambda: subprocess.run(pod, check=True, capture_output=True, env=pod_env),
            },
            n,
        )
        subprocess.run(
            [podman, "rmi", "-f", "buildcell-bench-true"], check=False, capture_output=True
        )
    figure["ours"] = summary(samples["buildcell"])
    figure["baseline"] = summary(samples["podman"])
    return figure


def workspace_figures(state: StateDir, summary: Summary) -> list[dict[str, Any]]:
    """Setting up a workspace from a large source tree against `cp -a` of the same tree:
    the copy-on-write overlay (the default for such a tree), and the copy fallback; the
    overlay again on a 10-file tree, to show its cost does not grow with the tree."""
    from buildcell.cell.storage import CellStorage, new_cell_id
    from buildcell.cell.supervisor import find_bwrap

    total = int(os.environ.get("BENCH_WS_BYTES", str(1 << 30)))
    files = int(os.environ.get("BENCH_WS_FILES", "20000"))
    rounds = int(os.environ.get("BENCH_WS_ROUNDS", "4"))
    base = Path(tempfile.mkdtemp(prefix="bc-bench-ws-", dir=state.root))
    overlay_state = StateDir(state.root, host=state.host.replace(workspace="overlay"))
    bwrap = find_bwrap(state.host)

    def overlay(source: Path) -> float:
        with CellStorage(overlay_state, cell_id=new_cell_id(), bwrap=bwrap, disk=None) as st:
            t = time.perf_counter()
            assert st.populate(source, []) is None
            return (time.perf_counter() - t) * 1000

    try:
        source = base / "src"
        size = total // files
        block = os.urandom(size)
        for i in range(files):
            d = source / f"d{i % 200:03d}"
            if i < 200:
                d.mkdir(parents=True)
            (d / f"f{i}.dat").write_bytes(block)
        small = base / "small"
        small.mkdir()
        for i in range(10):
            (small / f"f{i}").write_bytes(block)
        ours: list[float] = []
        cp: list[float] = []
        over: list[float] = []
        over_small: list[float] = []
        contenders = [("cp", cp), ("ours", ours)]
        for r in range(rounds):
            over.append(overlay(source))
            over_small.append(overlay(small))
            # Each goes first every other round, and starts with no dirty data of the one
            # before still being written back: both write 1 GiB, so the disk decides.
            for name, samples in contenders if r % 2 == 0 else contenders[::-1]:
                dest = base / f"{name}-{r}"
                os.sync()
                t = time.perf_counter()
                if name == "cp":
                    subprocess.run(["cp", "-a", str(source), str(dest)], check=True)
                else:
                    dest.mkdir()
                    copy_tree(source, dest)
                samples.append((time.perf_counter() - t) * 1000)
                shutil.rmtree(dest)
        label = f"{files} files / {total >> 20} MiB source tree"
        small_ms = summary(over_small)["median"]
        return [
            {
                "figure": f"workspace set-up (copy-on-write overlay), {label}",
                "ours": summary(over),
                "baseline": summary(cp),
                "baseline_name": "`cp -a` of the same tree",
                "target": f"≤ 0.05× (a 10-file tree: {small_ms:.1f} ms)",
            },
            {
                "figure": f"workspace set-up (copy fallback), {label}",
                "ours": summary(ours),
                "baseline": summary(cp),
                "baseline_name": "`cp -a` of the same tree",
                "target": "≤ 1.0×",
            },
        ]
    finally:
        shutil.rmtree(base, ignore_errors=True)


def concurrency_figure(state: StateDir, summary: Summary) -> dict[str, Any]:
    """N cells of a 0.5 s step at once against N times one such cell run alone."""
    n = int(os.environ.get("BENCH_CONCURRENT", "50"))
    config = CellConfig(argv=("/bin/sleep", "0.5"))

    def one() -> None:
        result = run_cell(config, state=state, stdout=_sink, stderr=_sink)
        assert result.exit_code == 0, result

    alone = []
    for _ in range(5):
        t = time.perf_counter()
        one()
        alone.append((time.perf_counter() - t) * 1000)
    sequential = [x * n for x in alone]
    rss_before = _rss_kib()
    peak = [rss_before]
    walls = []
    for _ in range(3):
        threads = [threading.Thread(target=one) for _ in range(n)]
        t = time.perf_counter()
        for th in threads:
            th.start()
        while any(th.is_alive() for th in threads):
            peak.append(_rss_kib())
            time.sleep(0.05)
        walls.append((time.perf_counter() - t) * 1000)
    per_cell = (max(peak) - rss_before) / n
    return {
        "figure": f"{n} concurrent cells of a 0.5 s step",
        "ours": summary(walls),
        "baseline": summary(sequential),
        "baseline_name": f"{n} × one such cell alone",
        "target": f"≤ 0.1× (supervisor memory: +{per_cell:.0f} KiB RSS per running cell)",
    }


def _synthetic_c_project(root: Path, units: int = 120) -> Path:
    src = root / "cproj"
    src.mkdir()
    objs = []
    for i in range(units):
        body = "\n".join(
            f"static int f{i}_{j}(int x) {{ int s = 0; for (int k = 0; k < x; k++) "
            f"s += (k * {j + 1}) ^ (s >> 3); return s; }}"
            for j in range(60)
        )
        calls = " + ".join(f"f{i}_{j}(x)" for j in range(60))
        (src / f"u{i}.c").write_text(f"{body}\nint unit{i}(int x) {{ return {calls}; }}\n")
        objs.append(f"u{i}.o")
    main = "\n".join(f"int unit{i}(int);" for i in range(units))
    main += "\nint main(void) { int s = 0;" + "".join(f" s += unit{i}(3);" for i in range(units))
    main += " return s == 42; }\n"
    (src / "main.c").write_text(main)
    (src / "Makefile").write_text(
        "CFLAGS ?= -O2\n"
        f"OBJS = main.o {' '.join(objs)}\n"
        "app: $(OBJS)\n\t$(CC) -o $@ $(OBJS)\n"
        "%.o: %.c\n\t$(CC) $(CFLAGS) -c -o $@ $<\n"
    )
    return src


def real_build_figures(state: StateDir, summary: Summary) -> list[dict[str, Any]]:
    """The C example, and a 120-file C project with `make -j2`, in a cell and bare."""
    figures: list[dict[str, Any]] = []
    base = Path(tempfile.mkdtemp(prefix="bc-bench-build-", dir=state.root))
    os.chmod(base, 0o755)
    try:
        example = REPO / "examples" / "hello-c"
        steps = (
            'mkdir -p build && printf \'#define GREETING "%s"\\n\' "$(cat assets/greeting.txt)"'
            " > build/config.h && cc -O2 -Wall -Wextra -Ibuild -DHAVE_CONFIG_H -o build/hello "
            "hello.c && ./build/hello >/dev/null"
        )
        env = dict(os.environ, BUILDCELL_STATE_DIR=str(state.root), PYTHONPATH=str(REPO / "src"))
        cell_ms, bare_ms = [], []
        for r in range(5):
            out = base / f"out-{r}"
            t = time.perf_counter()
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "buildcell",
                    "build",
                    "-f",
                    str(example / "buildcell.yaml"),
                    "--out",
                    str(out),
                ],
                env=env,
                check=True,
                capture_output=True,
            )
            cell_ms.append((time.perf_counter() - t) * 1000)
            bare = base / f"bare-{r}"
            shutil.copytree(example, bare / "hello-c")
            t = time.perf_counter()
            subprocess.run(["sh", "-c", steps], cwd=bare / "hello-c", check=True)
            bare_ms.append((time.perf_counter() - t) * 1000)
        figures.append(
            {
                "figure": "the C example (`buildcell build`, 4 steps, whole CLI)",
                "ours": summary(cell_ms),
                "baseline": summary(bare_ms),
                "baseline_name": "the same commands bare on the host",
                "target": "≤ 1.05× (see notes: a 50 ms build is all overhead)",
            }
        )
        project = _synthetic_c_project(base)
        cell_ms, bare_ms = [], []
        for _ in range(3):
            t = time.perf_counter()
            result = run_cell(
                CellConfig(argv=("make", "-s", "-j2", "app"), source=project, out_dir=base / "o"),
                state=state,
                stdout=_sink,
                stderr=_sink,
            )
            assert result.exit_code == 0, result
            cell_ms.append((time.perf_counter() - t) * 1000)
            subprocess.run(["make", "-s", "clean"], cwd=project, check=False, capture_output=True)
            for o in project.glob("*.o"):
                o.unlink()
            t = time.perf_counter()
            subprocess.run(["make", "-s", "-j2", "app"], cwd=project, check=True)
            bare_ms.append((time.perf_counter() - t) * 1000)
            for o in [*project.glob("*.o"), project / "app"]:
                o.unlink()
        figures.append(
            {
                "figure": "a 121-file C project, `make -j2`, in a cell (`run_cell`)",
                "ours": summary(cell_ms),
                "baseline": summary(bare_ms),
                "baseline_name": "`make -j2` bare on the host",
                "target": "≤ 1.05×",
            }
        )
        return figures
    finally:
        shutil.rmtree(base, ignore_errors=True)


class _PeakRss(threading.Thread):
    """Samples VmRSS of the processes it is given, every 20 ms, and keeps each one's peak.

    Each is read through its own /proc/<pid> directory, opened while the process is still
    unreaped: once it exits the reads fail instead of reaching a reused pid. Only the
    process itself is counted, not what it runs (the compilers inside the cell).
    """

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self._lock = threading.Lock()
        self._dirs: dict[int, int] = {}  # key -> fd of /proc/<pid>
        self.peak_kib: dict[int, int] = {}
        self._done = threading.Event()

    def watch(self, key: int, pid: int) -> None:
        fd = os.open(f"/proc/{pid}", os.O_RDONLY | os.O_DIRECTORY)
        with self._lock:
            self._dirs[key] = fd
            self.peak_kib.setdefault(key, 0)
        self._sample(key, fd)

    def _sample(self, key: int, fd: int) -> bool:
        try:
            with open("status", opener=lambda path, flags: os.open(path, flags, dir_fd=fd)) as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        kib = int(line.split()[1])
                        with self._lock:
                            self.peak_kib[key] = max(self.peak_kib[key], kib)
                        return True
        except OSError:  # ESRCH once reaped
            pass
        return False  # gone, or a zombie (no VmRSS line any more)

    def run(self) -> None:
        while not self._done.is_set():
            with self._lock:
                dirs = list(self._dirs.items())
            for key, fd in dirs:
                if not self._sample(key, fd):
                    with self._lock:
                        del self._dirs[key]
                    os.close(fd)
            self._done.wait(0.02)

    def stop(self) -> None:
        self._done.set()
        self.join()
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()


def throughput_figures(state: StateDir, summary: Summary) -> list[dict[str, Any]]:
    """N builds of the C example started at once, each its own `buildcell build` process
    with its own output directory, against the same N builds one by one; with builds per
    minute and the peak RSS of each supervisor (CLI) process, sampled from /proc."""
    sizes = [int(x) for x in os.environ.get("BENCH_THROUGHPUT", "1,4,16").split(",") if x]
    rounds = 2
    spec = REPO / "examples" / "hello-c" / "buildcell.yaml"
    env = dict(os.environ, BUILDCELL_STATE_DIR=str(state.root), PYTHONPATH=str(REPO / "src"))
    base = Path(tempfile.mkdtemp(prefix="bc-bench-tput-", dir=state.root))
    os.chmod(base, 0o755)

    def start(out: Path) -> tuple[subprocess.Popen[bytes], Path]:
        log = out.with_suffix(".stderr")
        with log.open("wb") as err:
            cmd = [sys.executable, "-m", "buildcell", "build", "-f", str(spec)]
            proc = subprocess.Popen(
                [*cmd, "--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=err
            )
        return proc, log

    def finish(proc: subprocess.Popen[bytes], log: Path) -> None:
        if proc.wait() != 0:
            print(log.read_text(errors="replace"), file=sys.stderr)
            raise RuntimeError(f"`buildcell build` exited {proc.returncode} (stderr above)")

    def batch(n: int, tag: str, *, concurrent: bool) -> tuple[float, list[int]]:
        """Runs n builds, at once or one by one: wall ms and each process's peak KiB."""
        batch_dir = base / tag
        batch_dir.mkdir()
        sampler = _PeakRss()
        sampler.start()
        try:
            t = time.perf_counter()
            if concurrent:
                procs = [start(batch_dir / f"out-{i}") for i in range(n)]
                for i, (proc, _) in enumerate(procs):
                    sampler.watch(i, proc.pid)
                for proc, log in procs:
                    finish(proc, log)
            else:
                for i in range(n):
                    proc, log = start(batch_dir / f"out-{i}")
                    sampler.watch(i, proc.pid)
                    finish(proc, log)
            wall = (time.perf_counter() - t) * 1000
        finally:
            sampler.stop()
            shutil.rmtree(batch_dir, ignore_errors=True)
        return wall, list(sampler.peak_kib.values())

    figures: list[dict[str, Any]] = []
    try:
        batch(1, "warm-up", concurrent=False)
        for n in sizes:
            print(f"  {n} at once ...", flush=True)
            walls: list[float] = []
            totals: list[float] = []
            rss_at_once: list[int] = []
            rss_alone: list[int] = []
            for r in range(rounds):
                for concurrent in (True, False) if r % 2 == 0 else (False, True):
                    tag = f"n{n}-r{r}-{'at-once' if concurrent else 'one-by-one'}"
                    wall, peaks = batch(n, tag, concurrent=concurrent)
                    (walls if concurrent else totals).append(wall)
                    (rss_at_once if concurrent else rss_alone).extend(peaks)
            at_once, one_by_one = summary(walls), summary(totals)
            mib = statistics.median(rss_at_once) / 1024
            mib_alone = statistics.median(rss_alone) / 1024
            figures.append(
                {
                    "figure": f"throughput at scale: {n} C-example build{'s' * (n > 1)} "
                    "at once (`buildcell build` each)",
                    "ours": at_once,
                    "baseline": one_by_one,
                    "baseline_name": f"the same {n} one by one",
                    "target": f"(report: {60000 * n / at_once['median']:.0f} vs "
                    f"{60000 * n / one_by_one['median']:.0f} builds/min; supervisor peak RSS "
                    f"{mib:.1f} MiB per build, {mib_alone:.1f} MiB alone)",
                }
            )
        return figures
    finally:
        shutil.rmtree(base, ignore_errors=True)


def suite_figures(
    state: StateDir, measure: Measure, summary: Summary, n: int
) -> list[dict[str, Any]]:
    figures = []
    print("podman comparison ...", flush=True)
    figures.append(podman_figure(state, measure, summary, max(10, n // 10)))
    print("workspace set-up ...", flush=True)
    figures += workspace_figures(state, summary)
    print("concurrent cells ...", flush=True)
    figures.append(concurrency_figure(state, summary))
    print("real builds ...", flush=True)
    figures += real_build_figures(state, summary)
    print("throughput at scale ...", flush=True)
    figures += throughput_figures(state, summary)
    return figures
