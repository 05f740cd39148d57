"""What the environment tells buildcell about its host, read once, at the edge.

The library reads no environment variable of its own: the command line reads them here,
once, into a :class:`HostEnv` (a malformed value is a :class:`~buildcell.errors.ConfigError`,
exit 125, naming the variable), and hands it down inside the :class:`~buildcell.state.StateDir`
every build and cell receives. A program that calls the library does the same with
:meth:`HostEnv.read`, or builds a :class:`HostEnv` of its own.

========================== ==========================================================
``BUILDCELL_STATE_DIR``    the state directory (else ``/var/lib/buildcell`` for root,
                           ``$XDG_STATE_HOME/buildcell`` otherwise)
``BUILDCELL_CONFIG``       the configuration file (else ``/etc/buildcell/config.yaml``
                           for root, ``$XDG_CONFIG_HOME/buildcell/config.yaml``)
``BUILDCELL_UID_BASE``     first host uid of the cells' range, as root (``0x70000000``)
``BUILDCELL_UID_COUNT``    how many uids the range holds (65536)
``BUILDCELL_BWRAP``        the bubblewrap to run (else ``bwrap`` on ``PATH``)
``BUILDCELL_CGROUP_PARENT`` a cgroup v2 directory delegated to buildcell
``SOURCE_DATE_EPOCH``      the timestamp ``run`` gives its cell (reproducible-builds.org)
``BUILDCELL_WORKSPACE``    ``auto`` (a copy-on-write overlay of the source where the host
                           allows one, else a copy), ``overlay`` or ``copy``
========================== ==========================================================

The secrets a step binds with ``env:VAR`` are not settings: they are read where the
binding is resolved, from the environment the caller passes.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from buildcell._text import show
from buildcell.errors import ConfigError

__all__ = ["DEFAULT_UID_BASE", "DEFAULT_UID_COUNT", "WORKSPACE_MODES", "HostEnv"]

DEFAULT_UID_BASE = 0x70000000
DEFAULT_UID_COUNT = 65536
#: The highest uid the kernel takes is 2**32 - 2 (-1 means "unchanged").
_MAX_UID = 2**32 - 2


#: How a source becomes a workspace (``BUILDCELL_WORKSPACE``).
WORKSPACE_MODES = ("auto", "overlay", "copy")


@dataclass(frozen=True)
class HostEnv:
    """The host's settings from the environment; every field has its default.

    Attributes:
        state_dir: ``BUILDCELL_STATE_DIR`` (absolute), or None for the default.
        config: ``BUILDCELL_CONFIG`` (absolute), or None for the default.
        uid_base: first host uid of the cells' range (used as root).
        uid_count: size of that range.
        bwrap: ``BUILDCELL_BWRAP``, or None for ``bwrap`` on ``PATH``.
        cgroup_parent: ``BUILDCELL_CGROUP_PARENT``, a delegated cgroup v2 directory.
        xdg_state_home / xdg_config_home / home: where the per-user defaults live.
        path: the ``PATH`` bubblewrap is looked up on.
        source_date_epoch: ``SOURCE_DATE_EPOCH``, seconds since 1970.
        workspace: ``BUILDCELL_WORKSPACE``: how a source becomes a workspace.
    """

    state_dir: Path | None = None
    config: Path | None = None
    uid_base: int = DEFAULT_UID_BASE
    uid_count: int = DEFAULT_UID_COUNT
    bwrap: Path | None = None
    cgroup_parent: Path | None = None
    xdg_state_home: Path | None = None
    xdg_config_home: Path | None = None
    home: Path | None = None
    path: str | None = None
    source_date_epoch: int | None = None
    workspace: str = "auto"

    def __post_init__(self) -> None:
        if self.workspace not in WORKSPACE_MODES:
            raise ConfigError(
                f"BUILDCELL_WORKSPACE={self.workspace} is not one of " + ", ".join(WORKSPACE_MODES),
                hint="auto (the default) uses a copy-on-write overlay where it can",
            )
        if self.uid_base < 1000 or self.uid_base > _MAX_UID:
            raise ConfigError(
                f"BUILDCELL_UID_BASE={self.uid_base} is not a uid from 1000 to {_MAX_UID}",
                hint="choose a range no account uses, e.g. the default 0x70000000",
            )
        if self.uid_count < 1 or self.uid_base + self.uid_count - 1 > _MAX_UID:
            raise ConfigError(
                f"BUILDCELL_UID_COUNT={self.uid_count} does not fit after uid {self.uid_base} "
                f"(the range must end by {_MAX_UID})",
                hint="choose a smaller count or a lower BUILDCELL_UID_BASE",
            )

    @classmethod
    def read(cls, environ: Mapping[str, str] | None = None) -> HostEnv:
        """Read the variables from ``environ`` (default: this process's environment).

        An empty variable means its default, as an unset one does.

        Raises:
            ConfigError: a variable is malformed; the message names it.
        """
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            return env.get(name) or None

        return cls(
            state_dir=_path(get("BUILDCELL_STATE_DIR"), "BUILDCELL_STATE_DIR"),
            config=_path(get("BUILDCELL_CONFIG"), "BUILDCELL_CONFIG"),
            uid_base=_uid(get("BUILDCELL_UID_BASE"), "BUILDCELL_UID_BASE", DEFAULT_UID_BASE),
            uid_count=_uid(get("BUILDCELL_UID_COUNT"), "BUILDCELL_UID_COUNT", DEFAULT_UID_COUNT),
            bwrap=_path(get("BUILDCELL_BWRAP"), "BUILDCELL_BWRAP"),
            cgroup_parent=_path(get("BUILDCELL_CGROUP_PARENT"), "BUILDCELL_CGROUP_PARENT"),
            # XDG: a relative value is to be ignored (the base directory specification).
            xdg_state_home=_xdg(get("XDG_STATE_HOME")),
            xdg_config_home=_xdg(get("XDG_CONFIG_HOME")),
            home=_xdg(get("HOME")),
            path=get("PATH"),
            source_date_epoch=_epoch(get("SOURCE_DATE_EPOCH")),
            workspace=get("BUILDCELL_WORKSPACE") or "auto",
        )

    def replace(self, **changes: object) -> HostEnv:
        """A copy with ``changes`` (``--state-dir`` on the command line, say)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @property
    def uid_range(self) -> tuple[int, int]:
        """(base, count) of the cells' host uids."""
        return self.uid_base, self.uid_count

    def default_state_dir(self) -> Path:
        """The state directory: ``BUILDCELL_STATE_DIR``, else ``/var/lib/buildcell`` for
        root, else ``$XDG_STATE_HOME/buildcell`` (``~/.local/state/buildcell``)."""
        if self.state_dir is not None:
            return self.state_dir
        if os.geteuid() == 0:
            return Path("/var/lib/buildcell")
        return (self.xdg_state_home or self._home() / ".local" / "state") / "buildcell"

    def default_config(self) -> Path:
        """The configuration file read when ``BUILDCELL_CONFIG`` names none."""
        if os.geteuid() == 0:
            return Path("/etc/buildcell/config.yaml")
        return (self.xdg_config_home or self._home() / ".config") / "buildcell" / "config.yaml"

    def bwrap_path(self) -> str | None:
        """The bubblewrap to run, or None when there is none."""
        path = str(self.bwrap) if self.bwrap is not None else shutil.which("bwrap", path=self.path)
        if not path or not os.access(path, os.X_OK):
            return None
        return path

    def _home(self) -> Path:
        return self.home or Path.home()


def _path(value: str | None, name: str) -> Path | None:
    if value is None:
        return None
    if "\0" in value:
        raise ConfigError(f"{name}={show(value)} is not a path (it holds a NUL)")
    return Path(os.path.abspath(value))


def _xdg(value: str | None) -> Path | None:
    return Path(value) if value and os.path.isabs(value) else None


def _epoch(value: str | None) -> int | None:
    if value is None:
        return None
    if not value.strip().isdigit():
        raise ConfigError(
            f"SOURCE_DATE_EPOCH={show(value)} is not a timestamp",
            hint="give whole seconds since 1970 (git log -1 --format=%ct), or unset it",
        )
    return int(value)


def _uid(value: str | None, name: str, default: int) -> int:
    if value is None:
        return default
    try:
        return int(value.strip(), 0)
    except ValueError:
        raise ConfigError(
            f"{name}={show(value)} is not a number",
            hint=f"give a whole number (decimal or 0x hex), or unset {name} for {default:#x}",
        ) from None
