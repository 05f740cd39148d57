"""What a cell is asked to be: plain, frozen data that planning functions turn into a sandbox."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from buildcell.errors import ConfigError

if TYPE_CHECKING:
    from buildcell.allowlist import EgressPolicy
    from buildcell.redact import Secret
    from buildcell.secrets import SecretDelivery
    from buildcell.supply.images import UnpackBudget

__all__ = [
    "CELL_GID",
    "CELL_HOME",
    "CELL_HOSTNAME",
    "CELL_PATH",
    "CELL_UID",
    "CELL_WORKSPACE",
    "Bind",
    "CellConfig",
    "CellSecret",
    "DirRootfs",
    "HostRootfs",
    "Limits",
    "OciRootfs",
    "Rootfs",
    "Variation",
    "parse_rootfs",
]

CELL_UID = 1000
CELL_GID = 1000
CELL_USER = "builder"
CELL_HOME = "/home/builder"
CELL_WORKSPACE = "/workspace"
CELL_HOSTNAME = "buildcell"
CELL_PATH = "/usr/local/bin:/usr/bin:/bin"
#: Where the cell's egress proxy listens (inside its own network namespace).
CELL_PROXY = "http://127.0.0.1:3128"


@dataclass(frozen=True)
class Limits:
    """Resource limits of one cell; ``None`` means not limited.

    Attributes:
        memory: bytes of memory (cgroup memory limit; RLIMIT_AS as a fallback).
        pids: number of tasks the cell may have at once.
        cpus: CPU share, fractions allowed (``0.5`` is half a CPU).
        disk: bytes the cell may write in total to /workspace, /tmp and its home.
        timeout: wall-clock seconds before the cell is killed (exit 124).
    """

    memory: int | None = None
    pids: int | None = None
    cpus: float | None = None
    disk: int | None = None
    timeout: float | None = None

    def to_dict(self) -> dict[str, int | float | None]:
        return {
            "memory": self.memory,
            "pids": self.pids,
            "cpus": self.cpus,
            "disk": self.disk,
            "timeout": self.timeout,
        }


@dataclass(frozen=True)
class HostRootfs:
    """A minimal read-only view of the host: /usr, the /bin and /lib* entries, a curated /etc."""

    def describe(self) -> str:
        return "host"


@dataclass(frozen=True)
class DirRootfs:
    """A directory on the host used, read-only, as the cell's root.

    Attributes:
        path: the directory (absolute).
        beneath: where it must lie, when it comes from a spec (the spec's directory): it is
            then opened confined below ``beneath``, following no symlink out of it. ``None``
            for a directory the operator named.
    """

    path: Path
    beneath: Path | None = None

    def describe(self) -> str:
        return f"dir:{self.path}"

    def open(self) -> int:
        """Open the directory (``O_RDONLY|O_DIRECTORY``), confined when ``beneath`` is set.

        Raises:
            ConfigError: it is missing, not a directory, or leaves ``beneath``.
        """
        from buildcell import confined

        if self.beneath is None:
            return confined.open_root(self.path, what="rootfs directory")
        rel = os.path.relpath(self.path, self.beneath)
        with confined.opened_root(self.beneath, what="the spec's directory") as root:
            return confined.open_dir(root, rel, what=f"rootfs directory {rel!r}")


@dataclass(frozen=True)
class OciRootfs:
    """An OCI image layout, OCI archive or docker-archive, pinned by its manifest digest.

    It is verified and unpacked once per digest into the state directory's cache, then used
    read-only like a directory rootfs. ``beneath``, as for :class:`DirRootfs`, is where a
    spec's image must lie.
    """

    path: Path
    digest: str
    beneath: Path | None = None

    def describe(self) -> str:
        return f"oci:{self.path}@{self.digest}"


Rootfs = HostRootfs | DirRootfs | OciRootfs

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


def parse_rootfs(text: str) -> Rootfs:
    """Parse ``host``, ``dir:PATH`` or ``oci:PATH@sha256:HEX``.

    Raises:
        ConfigError: unknown kind, a missing path, or a malformed digest.
    """
    if text == "host":
        return HostRootfs()
    kind, sep, rest = text.partition(":")
    if sep and kind == "dir" and rest:
        path = Path(rest).expanduser().absolute()
        if not path.is_dir():
            raise ConfigError(f"rootfs directory {path} does not exist or is not a directory")
        return DirRootfs(path)
    if sep and kind == "oci" and "@" in rest:
        where, _, digest = rest.rpartition("@")
        path = Path(where).expanduser().absolute()
        if not _DIGEST.match(digest):
            raise ConfigError(
                f"invalid image digest {digest!r}: expected sha256: and 64 lowercase hex digits"
            )
        if not path.exists():
            raise ConfigError(f"image {path} does not exist")
        return OciRootfs(path, digest)
    raise ConfigError(
        f"invalid rootfs {text!r}: expected 'host', 'dir:PATH' or 'oci:PATH@sha256:...'",
        hint="for example --rootfs dir:/srv/rootfs/debian",
    )


@dataclass(frozen=True)
class Variation:
    """What ``--check-repro`` varies between its two builds; a build must not depend on it.

    Attributes:
        reverse_env: pass the environment to the cell in reverse order.
        umask: the cell's umask instead of the supervisor's.
        cpus: restrict the cell to this many CPUs (what ``nproc`` reports).
    """

    reverse_env: bool = False
    umask: int | None = None
    cpus: int | None = None


@dataclass(frozen=True)
class CellSecret:
    """A secret given to one cell; the value stays inside ``secret`` (its repr hides it)."""

    delivery: SecretDelivery
    secret: Secret


@dataclass(frozen=True)
class Bind:
    """A host file or directory bound read-only into the cell (pinned inputs)."""

    src: Path
    dest: str


@dataclass(frozen=True)
class CellConfig:
    """Everything one cell is asked to do.

    Attributes:
        argv: the command and its arguments, run with ``/workspace`` as working directory.
        source: what ``/workspace`` starts as (an overlay of it, or a copy); ``None``
            for an empty workspace.
        outputs: glob patterns, relative to ``/workspace``, collected after the command.
        out_dir: where outputs are copied; ``./buildcell-out`` by default.
        rootfs: ``HostRootfs()`` or ``DirRootfs(path)``.
        env: variables added to the cell's fixed environment.
        limits: resource limits.
        seccomp_profile: an OCI/Docker seccomp profile to use instead of the built-in one.
        seccomp: ``False`` only with ``--unsafe-no-seccomp``: no syscall filter at all.
        interactive: pass the caller's stdin instead of ``/dev/null``.
        tty: give the cell a pseudo-terminal of its own: its stdin, stdout and stderr, and
            its controlling terminal (for ``buildcell shell``). The supervisor relays it to
            the caller's stdin and stdout (the caller's terminal in raw mode meanwhile);
            both output streams arrive as one, on the cell's stdout sink.
        source_date_epoch: value of ``SOURCE_DATE_EPOCH`` inside the cell.
        exclude: host paths inside ``source`` that are not copied.
        binds: host files bound read-only into the cell (absolute ``dest``).
        variation: perturbations for reproducibility checks.
        secrets: secrets delivered to this cell (``/run/secrets/NAME``, optionally env).
        redact: secret values to redact from everything the cell prints.
        network: the egress allowlist; ``None`` or an empty one means no network at all.
        pinned_hosts: ``(name, address)`` pairs the host side resolves without DNS
            (``--add-host``); such addresses still pass the address guard, unless
            ``network`` grants the pin (``EgressPolicy.with_pins``).
        caches: host directories bound read-write (build caches), after everything else.
        output_max_size: bytes all outputs together may have.
        image_budget: what images may unpack to, shared by every cell of a build (an
            image's unpacked size counts once per budget); ``None``: 16 GiB per image.
        wait_for_out_dir: wait while another build uses ``out_dir`` (else fail at once).
    """

    argv: tuple[str, ...]
    source: Path | None = None
    outputs: tuple[str, ...] = ()
    out_dir: Path | None = None
    rootfs: Rootfs = field(default_factory=HostRootfs)
    env: dict[str, str] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    seccomp_profile: Path | None = None
    seccomp: bool = True
    interactive: bool = False
    tty: bool = False
    source_date_epoch: int = 0
    exclude: tuple[Path, ...] = ()
    binds: tuple[Bind, ...] = ()
    variation: Variation | None = None
    secrets: tuple[CellSecret, ...] = ()
    redact: tuple[Secret, ...] = ()
    network: EgressPolicy | None = None
    pinned_hosts: tuple[tuple[str, str], ...] = ()
    caches: tuple[Bind, ...] = ()
    output_max_size: int | None = 16 << 30
    wait_for_out_dir: bool = True
    image_budget: UnpackBudget | None = None

    def __post_init__(self) -> None:
        if not self.argv:
            raise ConfigError("no command given", hint="buildcell run -- COMMAND [ARG...]")
        for key in self.env:
            if not key or "=" in key or "\0" in key:
                raise ConfigError(f"invalid environment variable name {key!r}")
        if any("\0" in part for part in self.argv):
            raise ConfigError("the command contains a NUL byte")
        if self.seccomp_profile is not None and not self.seccomp:
            raise ConfigError("--seccomp-profile and --unsafe-no-seccomp contradict each other")

    def cell_env(self) -> dict[str, str]:
        """The complete environment inside the cell: fixed variables, then ``env``."""
        env = {
            "HOME": CELL_HOME,
            "PATH": CELL_PATH,
            "TZ": "UTC",
            "LANG": "C.UTF-8",
            "USER": CELL_USER,
            "LOGNAME": CELL_USER,
            "SOURCE_DATE_EPOCH": str(self.source_date_epoch),
        }
        if self.has_network:
            for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
                env[name] = env[name.lower()] = CELL_PROXY
            env["NO_PROXY"] = env["no_proxy"] = "localhost,127.0.0.1"
        env.update(self.env)
        return env

    @property
    def has_network(self) -> bool:
        """Whether the cell gets a network namespace with the egress service."""
        return self.network is not None and not self.network.empty

    def resolved_out_dir(self) -> Path:
        return (self.out_dir or Path("buildcell-out")).absolute()

    def resolved_source(self) -> Path | None:
        return None if self.source is None else Path(os.path.abspath(self.source))
