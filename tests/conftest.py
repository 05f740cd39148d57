"""Shared fixtures: a private state directory, and ways to run cells and the CLI.

Tests drive the real sandbox. As root, cells run as unprivileged host uids, so the state
directory must be reachable (o+x) by them; it is made under /tmp with mode 0711.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol, TypedDict, Unpack

import pytest

from buildcell.cell import CellConfig, CellResult
from buildcell.cell.supervisor import run_cell
from buildcell.events import EventLog
from buildcell.state import StateDir

if TYPE_CHECKING:
    from buildcell.allowlist import EgressPolicy
    from buildcell.cell.config import Bind, CellSecret, Limits, Rootfs, Variation
    from buildcell.redact import Secret
    from buildcell.supply.images import UnpackBudget

REPO = Path(__file__).resolve().parents[1]
#: Real-world inputs no one on this project wrote (Docker's seccomp profiles), when the
#: checkout sits next to them; a standalone clone has none of them.
ASSETS = REPO.parent / "shared" / "assets"
#: Podman's default seccomp profile (Docker's format, from golang-github-containers-common,
#: which ``scripts/system-deps.sh --test`` installs): Docker's default where ASSETS is absent.
PODMAN_SECCOMP = Path("/usr/share/containers/seccomp.json")
IS_ROOT = os.geteuid() == 0

#: A test that needs buildcell to run as root (cgroups, the host uid drop); skipped otherwise.
root_only = pytest.mark.root
#: A test that runs only as an unprivileged user; skipped as root.
rootless_only = pytest.mark.rootless

#: Fixtures that run the real command line in a subprocess: a test using one is ``slow``
#: (seconds, not milliseconds), so ``pytest -m "not slow"`` is the quick loop.
_CLI_FIXTURES = frozenset({"bc", "bc_rootless"})


#: Tests of what a workspace holds and how the host side treats it: each runs with the
#: copy and with the copy-on-write overlay (``BUILDCELL_WORKSPACE``), whatever ``auto``
#: would choose for its (mostly small) sources.
workspaces = pytest.mark.workspaces


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.definition.get_closest_marker("workspaces") is not None:
        metafunc.parametrize("workspace_mode", ["copy", "overlay"], indirect=True)


@pytest.fixture(autouse=True)
def workspace_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The ``BUILDCELL_WORKSPACE`` of this test (set for ``workspaces`` tests), which the
    CLI fixtures pass on and a :class:`StateDir` made here reads."""
    mode = getattr(request, "param", None)
    if mode is not None:
        monkeypatch.setenv("BUILDCELL_WORKSPACE", mode)
    return mode or os.environ.get("BUILDCELL_WORKSPACE") or "auto"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("root") is not None and not IS_ROOT:
            item.add_marker(pytest.mark.skip(reason="needs buildcell to run as root"))
        if item.get_closest_marker("rootless") is not None and IS_ROOT:
            item.add_marker(pytest.mark.skip(reason="runs only as an unprivileged user"))
        if _CLI_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def seccomp_asset(name: str = "docker-seccomp-default.json", *, stand_in: bool = False) -> Path:
    """A real-world seccomp profile: ``ASSETS / name``; with ``stand_in``, for a test that
    needs any real profile in Docker's format rather than moby's own rules, podman's
    default where ASSETS is absent. Skips, saying what is missing, when there is none."""
    path = ASSETS / name
    if path.is_file():
        return path
    if stand_in and PODMAN_SECCOMP.is_file():
        return PODMAN_SECCOMP
    if stand_in:
        pytest.skip(
            f"no Docker-format seccomp profile: neither {path} nor {PODMAN_SECCOMP}"
            " (apt-get install golang-github-containers-common)"
        )
    pytest.skip(f"{path} is missing (only the development tree's ../shared/assets has it)")


def _userns_available() -> bool:
    try:
        return int(Path("/proc/sys/user/max_user_namespaces").read_text()) > 0
    except OSError:
        return False


requires_userns = pytest.mark.skipif(not _userns_available(), reason="no user namespaces")


@pytest.fixture(params=["openat2", "walk"])
def resolution(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a test with the kernel's openat2 and with the component walk that stands in
    for it (buildcell.confined), each in turn."""
    from buildcell import confined

    if request.param == "openat2" and not confined.openat2_available():
        pytest.skip("this kernel has no openat2")
    confined._force_walk(request.param == "walk")
    yield request.param
    confined._force_walk(False)


@pytest.fixture
def state_root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="bc-state-", dir="/tmp"))
    os.chmod(path, 0o711)
    yield path
    _remove_left_cgroups(path / "state")
    shutil.rmtree(path, ignore_errors=True)


def _remove_left_cgroups(state_path: Path) -> None:
    """The cgroups a test's killed supervisors left (``gc`` would remove them, but the
    test's state directory goes with it): none outlives the test on the host."""
    import hashlib

    from buildcell.cell.limits import remove_stale_cgroup

    tag = hashlib.sha256(str(state_path).encode()).hexdigest()[:8]
    for parent in Path("/sys/fs/cgroup").glob("*/buildcell"):
        for child in parent.glob(f"{tag}.*"):
            if child.is_dir():
                remove_stale_cgroup(child)


@pytest.fixture
def state(state_root: Path) -> StateDir:
    return StateDir(state_root / "state")


@dataclass
class Ran:
    result: CellResult
    stdout: str
    stderr: str
    events: list[dict[str, Any]] = field(default_factory=list)

    def of(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == name]


class CellOptions(TypedDict, total=False):
    """What ``cell`` passes on to ``CellConfig``: every field but ``argv``."""

    source: Path | None
    outputs: tuple[str, ...]
    out_dir: Path | None
    rootfs: Rootfs
    env: dict[str, str]
    limits: Limits
    seccomp_profile: Path | None
    seccomp: bool
    interactive: bool
    source_date_epoch: int
    exclude: tuple[Path, ...]
    binds: tuple[Bind, ...]
    variation: Variation | None
    secrets: tuple[CellSecret, ...]
    redact: tuple[Secret, ...]
    network: EgressPolicy | None
    pinned_hosts: tuple[tuple[str, str], ...]
    caches: tuple[Bind, ...]
    output_max_size: int | None
    wait_for_out_dir: bool
    image_budget: UnpackBudget | None


class RunCell(Protocol):
    """The ``cell`` fixture: run ``argv`` in a real cell configured by ``options``."""

    def __call__(self, argv: Sequence[str], **options: Unpack[CellOptions]) -> Ran: ...


#: What a run of the CLI in a subprocess gives back.
CLIResult = subprocess.CompletedProcess[str]


class RunCLI(Protocol):
    """The ``bc`` fixture: the CLI with ``args``; ``env`` is added to its environment, and
    ``input``/``stdin`` are passed to ``subprocess.run``."""

    def __call__(
        self,
        *args: str,
        cwd: Path | None = None,
        timeout: float = 120,
        env: Mapping[str, str] = ...,
        input: str | None = None,
        stdin: int | IO[Any] | None = None,
    ) -> CLIResult: ...


class _RunRootless(Protocol):
    def __call__(
        self,
        *args: str,
        cwd: Path | None = None,
        timeout: float = 120,
        env: Mapping[str, str] | None = None,
    ) -> CLIResult: ...


@dataclass(frozen=True)
class RootlessCLI:
    """The ``bc_rootless`` fixture: the CLI as an unprivileged user, whose state directory
    is ``home / "state"``."""

    run: _RunRootless
    home: Path

    def __call__(
        self,
        *args: str,
        cwd: Path | None = None,
        timeout: float = 120,
        env: Mapping[str, str] | None = None,
    ) -> CLIResult:
        """Run the CLI with ``args``; ``env`` is added to its environment."""
        return self.run(*args, cwd=cwd, timeout=timeout, env=env)


@pytest.fixture
def cell(state: StateDir, tmp_path: Path) -> RunCell:
    """Run a command in a real cell; returns a ``Ran`` with output and events."""

    def run(argv: Sequence[str], **kwargs: Unpack[CellOptions]) -> Ran:
        out, err = bytearray(), bytearray()
        log = EventLog(build="test")
        events: list[dict[str, Any]] = []
        log.subscribe(events.append)
        kwargs.setdefault("out_dir", tmp_path / "out")
        result = run_cell(
            CellConfig(argv=tuple(argv), **kwargs),
            state=state,
            events=log,
            stdout=out.extend,
            stderr=err.extend,
        )
        return Ran(result, out.decode(errors="replace"), err.decode(errors="replace"), events)

    return run


def one_error(res: subprocess.CompletedProcess[str]) -> str:
    """The single error line of a refusal: exit 125, one line, no traceback."""
    out = res.stdout + res.stderr
    assert "Traceback" not in out, out[-3000:]
    assert res.returncode == 125, (res.returncode, out[-3000:])
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("buildcell: error:")]
    assert len(errors) == 1, res.stderr[-3000:]
    return errors[0]


def cli_env(state_dir: Path, **extra: str) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "BUILDCELL_STATE_DIR": str(state_dir),
        "PYTHONPATH": str(REPO / "src"),
        "HOME": os.environ.get("HOME", "/tmp"),
    }
    if "BUILDCELL_WORKSPACE" in os.environ:
        env["BUILDCELL_WORKSPACE"] = os.environ["BUILDCELL_WORKSPACE"]
    env.update(extra)
    return env


@pytest.fixture
def bc(state_root: Path) -> RunCLI:
    """Run the ``buildcell`` CLI as a subprocess (as this user)."""

    def run(*args: str, cwd: Path | None = None, timeout: float = 120, **kw: Any) -> CLIResult:
        env = cli_env(state_root / "state", **kw.pop("env", {}))
        return subprocess.run(
            [sys.executable, "-m", "buildcell", *args],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **kw,
        )

    return run


# -- running the CLI as an unprivileged user (rootless mode), from a root test run -----

UNPRIVILEGED = 65534


def _system_python() -> str | None:
    """A Python >= 3.11 that an unprivileged user can execute (not under /root)."""
    for candidate in ("/usr/bin/python3.11", "/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(candidate, os.X_OK):
            out = subprocess.run(
                [candidate, "-c", "import sys; print(sys.version_info >= (3, 11))"],
                capture_output=True,
                text=True,
                check=False,
            )
            if out.stdout.strip() == "True":
                return candidate
    return None


@pytest.fixture
def bc_rootless(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RootlessCLI]:
    """Run the CLI as an unprivileged user: directly when we are one, via setpriv as root."""
    if not IS_ROOT:
        base = tmp_path_factory.mktemp("rootless")

        def direct(
            *args: str,
            cwd: Path | None = None,
            timeout: float = 120,
            env: Mapping[str, str] | None = None,
        ) -> CLIResult:
            return subprocess.run(
                [sys.executable, "-m", "buildcell", *args],
                cwd=cwd or base,
                env=cli_env(base / "state", **(env or {})),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )

        yield RootlessCLI(direct, base)
        return
    python = _system_python()
    setpriv = shutil.which("setpriv")
    if python is None or setpriv is None or not _userns_available():
        pytest.skip("needs setpriv, a system Python >= 3.11 and user namespaces")
    home = Path(tempfile.mkdtemp(prefix="bc-rootless-", dir="/tmp"))
    os.chmod(home, 0o755)
    os.chown(home, UNPRIVILEGED, UNPRIVILEGED)
    site = sysconfig.get_paths()["purelib"]
    if not os.access(site, os.R_OK) or any(
        not (p.stat().st_mode & 0o005) for p in [*Path(site).parents][:-1]
    ):
        pytest.skip(f"{site} is not readable by an unprivileged user")

    def run(
        *args: str,
        cwd: Path | None = None,
        timeout: float = 120,
        env: Mapping[str, str] | None = None,
    ) -> CLIResult:
        env = cli_env(
            home / "state", HOME=str(home), PYTHONPATH=f"{REPO / 'src'}:{site}", **(env or {})
        )
        return subprocess.run(
            [
                setpriv,
                f"--reuid={UNPRIVILEGED}",
                f"--regid={UNPRIVILEGED}",
                "--clear-groups",
                "--",
                python,
                "-m",
                "buildcell",
                *args,
            ],
            cwd=cwd or home,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    yield RootlessCLI(run, home)
    shutil.rmtree(home, ignore_errors=True)


def read_events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def derived_project(directory: Path) -> str:
    """The project a build of the spec in ``directory`` belongs to without --project."""
    from buildcell.supply.records import project_name

    return project_name(str(directory.absolute()), derived=True)
