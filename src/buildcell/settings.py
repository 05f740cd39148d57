"""The operator's configuration file: settings that build authors cannot change.

``$BUILDCELL_CONFIG``, else ``/etc/buildcell/config.yaml`` (root) or
``$XDG_CONFIG_HOME/buildcell/config.yaml``; a missing default file is no configuration.

```yaml
policy: /etc/buildcell/policy.yaml   # the operator policy every build is checked against
caches:
  max_size: 2GiB                     # per cache; a bigger one is not saved
  max_age: 336h                      # `buildcell gc` removes caches unused for longer (14 days)
fetch:
  allow: [mirror.internal:8080]      # host-side input fetches from non-public addresses
network:
  allow: ["10.0.0.5:3128"]           # non-public destinations a spec's steps may name
rootfs:
  allow: [/srv/rootfs]               # host directories a spec may name as its rootfs
limits:                              # defaults where neither the spec nor a flag sets one
  memory: 8GiB
  pids: 4096
logs:
  max_size: 64MiB                    # kept per step; the rest is drained, not stored
outputs:
  max_size: 16GiB                    # all outputs of one build or run together
images:
  max_size: 16GiB                    # bytes all images of one build may unpack to
  max_age: 720h                      # `buildcell gc` removes unpacked images unused for longer
records:                             # `buildcell gc` removes build records (never running ones)
  max_age: 720h                      #   older than this (30 days)
  keep: 200                          #   beyond the newest this many
```

Relative paths are relative to the file. Unknown keys are errors (fail closed), and so are
a key given twice, merge keys (``<<``) and YAML tags; every error names the file's line.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from buildcell.errors import ConfigError
from buildcell.host import HostEnv
from buildcell.units import parse_cpus, parse_duration, parse_size

if TYPE_CHECKING:
    from buildcell._yaml import Document, Loc, YamlProblem

__all__ = [
    "DEFAULT_CACHE_MAX_AGE",
    "DEFAULT_CACHE_MAX_SIZE",
    "DEFAULT_IMAGE_MAX_AGE",
    "DEFAULT_IMAGE_MAX_SIZE",
    "DEFAULT_LOG_MAX_SIZE",
    "DEFAULT_MEMORY",
    "DEFAULT_OUTPUT_MAX_SIZE",
    "DEFAULT_PIDS",
    "DEFAULT_RECORDS_KEEP",
    "DEFAULT_RECORDS_MAX_AGE",
    "DefaultLimits",
    "Settings",
    "load_settings",
]

DEFAULT_CACHE_MAX_SIZE = 2 << 30
DEFAULT_CACHE_MAX_AGE = 14 * 86400.0
DEFAULT_MEMORY = 8 << 30
DEFAULT_PIDS = 4096
DEFAULT_LOG_MAX_SIZE = 64 << 20
DEFAULT_OUTPUT_MAX_SIZE = 16 << 30
DEFAULT_IMAGE_MAX_SIZE = 16 << 30
DEFAULT_IMAGE_MAX_AGE = 30 * 86400.0
DEFAULT_RECORDS_MAX_AGE = 30 * 86400.0
DEFAULT_RECORDS_KEEP = 200


@dataclass(frozen=True)
class DefaultLimits:
    """Limits a cell gets when neither its spec nor the command line sets them.

    A default memory cap is enforced only where a cgroup memory controller is usable: the
    address-space rlimit that stands in for an explicit ``--memory`` would break programs
    that reserve address space they never touch (Go, Java, sanitizers).
    """

    memory: int | None = DEFAULT_MEMORY
    pids: int | None = DEFAULT_PIDS
    cpus: float | None = None
    disk: int | None = None
    timeout: float | None = None


@dataclass(frozen=True)
class Settings:
    """What the configuration file says (defaults where it says nothing)."""

    path: Path | None = None
    policy: Path | None = None
    cache_max_size: int = DEFAULT_CACHE_MAX_SIZE
    cache_max_age: float = DEFAULT_CACHE_MAX_AGE
    fetch_allow: tuple[str, ...] = ()
    network_allow: tuple[str, ...] = ()
    rootfs_dirs: tuple[Path, ...] = ()
    limits: DefaultLimits = field(default_factory=DefaultLimits)
    log_max_size: int = DEFAULT_LOG_MAX_SIZE
    output_max_size: int = DEFAULT_OUTPUT_MAX_SIZE
    image_max_size: int = DEFAULT_IMAGE_MAX_SIZE
    image_max_age: float = DEFAULT_IMAGE_MAX_AGE
    records_max_age: float = DEFAULT_RECORDS_MAX_AGE
    records_keep: int = DEFAULT_RECORDS_KEEP


def _read_yaml(target: Path, text: str) -> Document:
    """The file as plain data with the line of every value; merge keys are refused."""
    # Only when there is a file: `buildcell run` starts without PyYAML.
    from buildcell._yaml import field_path, read_yaml

    def error(problem: YamlProblem) -> ConfigError:
        where = str(target) if problem.line is None else f"{target}:{problem.line}"
        field = field_path(problem.loc)
        return ConfigError(f"{where}: {f'{field}: ' if field else ''}{problem.message}")

    return read_yaml(text, error, document="the configuration file")


_SECTIONS: dict[str, tuple[str, ...]] = {
    "caches": ("max_size", "max_age"),
    "fetch": ("allow",),
    "network": ("allow",),
    "rootfs": ("allow",),
    "limits": ("memory", "pids", "cpus", "disk", "timeout"),
    "logs": ("max_size",),
    "outputs": ("max_size",),
    "images": ("max_size", "max_age"),
    "records": ("max_age", "keep"),
}


class _File:
    """The parsed file, read one typed value at a time; every error names the line and the
    key."""

    def __init__(self, target: Path, document: Document) -> None:
        """Take the file's data, checking its top level.

        Raises:
            ConfigError: the file is not a mapping, or names an unknown setting.
        """
        self.target = target
        self.document = document
        if not isinstance(document.data, dict):
            raise ConfigError(f"{self.where(())}: expected a mapping of settings")
        self.data: Mapping[str, Any] = document.data
        for key in self.data:
            self.unknown((key,), ("policy", *_SECTIONS))

    def where(self, loc: Loc, *, key: bool = False) -> str:
        """``FILE:LINE`` of the value at ``loc``, or of its key."""
        site = self.document.site(loc)
        return f"{self.target}:{site.key_line if key else site.line}"

    def unknown(self, loc: Loc, known: tuple[str, ...]) -> None:
        """Refuse the setting at ``loc`` unless it is one of ``known``."""
        name = loc[-1]
        if name in known:
            return
        import difflib  # only for a mistake: not on every start

        close = difflib.get_close_matches(str(name), known, n=1)
        guess = f" (did you mean {close[0]!r}?)" if close else ""
        within = f"{loc[0]}: " if len(loc) > 1 else ""
        hint = (
            f"{loc[0]} has {', '.join(known)}" if within else f"known settings: {', '.join(known)}"
        )
        raise ConfigError(
            f"{self.where(loc, key=True)}: {within}unknown setting {name!r}{guess}", hint=hint
        )

    def policy(self) -> str | None:
        if "policy" not in self.data:
            return None
        policy = self.data["policy"]
        # Present means meant: an empty value is an error, never "no policy" (fail closed).
        if not isinstance(policy, str) or not policy.strip():
            raise ConfigError(
                f"{self.where(('policy',))}: policy: expected the path of a policy file"
            )
        return policy

    def allow(self, section: str) -> list[str]:
        """The allowlist entries of ``section``, each checked."""
        entries = self.strings(section, "allow")
        if entries:
            from buildcell.allowlist import parse_allow

            for index, entry in enumerate(entries):
                try:
                    parse_allow(entry)
                except ConfigError as e:
                    at = self.where((section, "allow", index))
                    raise ConfigError(f"{at}: {section}.allow: {e.message}", hint=e.hint) from e
        return entries

    def section(self, name: str) -> Mapping[str, Any]:
        value = self.data.get(name)
        if value is None:
            return {}
        known = _SECTIONS[name]
        if not isinstance(value, dict):
            raise ConfigError(
                f"{self.where((name,))}: {name}: expected a mapping with {', '.join(known)}"
            )
        for key in value:
            self.unknown((name, key), known)
        return value

    def unit(self, section: str, key: str, parse: Callable[[str], Any], example: str) -> Any:
        values = self.section(section)
        if key not in values:
            return None
        value = values[key]
        where = self.where((section, key))
        # Present means meant: an empty value is an error, never "the default".
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ConfigError(f"{where}: {section}.{key}: expected a value such as {example}")
        try:
            return parse(str(value))
        except ConfigError as e:
            raise ConfigError(f"{where}: {section}.{key}: {e.message}") from e

    def strings(self, section: str, key: str) -> list[str]:
        values = self.section(section)
        if key not in values:
            return []
        value = values[key]
        bad: Loc | None = None
        if not isinstance(value, list):
            bad = (section, key)
        else:
            bad = next(
                ((section, key, i) for i, v in enumerate(value) if not (isinstance(v, str) and v)),
                None,
            )
        if bad is not None:
            raise ConfigError(f"{self.where(bad)}: {section}.{key}: expected a list of strings")
        return list(value)


def parse_keep(text: str, *, what: str = "records.keep") -> int:
    """A count of records to keep: a whole number, 0 or more.

    Raises:
        ConfigError: it is anything else.
    """
    if not text.strip().isdigit():
        raise ConfigError(f"invalid {what} {text!r}: expected a whole number such as 200")
    return int(text)


def _pids(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise ConfigError(f"invalid pids {text!r}: expected a whole number such as 4096")
    return int(text)


def load_settings(path: Path | None = None, *, host: HostEnv | None = None) -> Settings:
    """Read the configuration file (``path``, ``host.config`` from ``$BUILDCELL_CONFIG``,
    or the default for root or the user).

    Raises:
        ConfigError: an explicitly named file is missing, or any file is malformed.
    """
    host = host if host is not None else HostEnv.read()
    explicit = path or host.config
    target = explicit or host.default_config()
    text = _read_file(target, explicit=explicit is not None)
    if text is None:
        return Settings()
    document = _read_yaml(target, text)
    if document.data is None:
        return Settings(path=target)
    return _settings(_File(target, document), target)


def _read_file(target: Path, *, explicit: bool) -> str | None:
    """The file's text; None if a default file does not exist."""
    try:
        return target.read_text()
    except FileNotFoundError:
        if not explicit:
            return None
        raise ConfigError(f"configuration file {target} does not exist") from None
    except OSError as e:
        raise ConfigError(f"cannot read configuration file {target}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"configuration file {target} is not UTF-8 text") from e


def _settings(f: _File, target: Path) -> Settings:
    policy = f.policy()

    def size(section: str, default: int) -> int:
        value = f.unit(section, "max_size", lambda t: parse_size(t, what=section), "2GiB")
        return default if value is None else int(value)

    defaults = DefaultLimits()
    limits = DefaultLimits(
        memory=_or(
            f.unit("limits", "memory", lambda t: parse_size(t, what="memory"), "8GiB"),
            defaults.memory,
        ),
        pids=_or(f.unit("limits", "pids", _pids, "4096"), defaults.pids),
        cpus=f.unit("limits", "cpus", parse_cpus, "2"),
        disk=f.unit("limits", "disk", lambda t: parse_size(t, what="disk"), "10GiB"),
        timeout=f.unit("limits", "timeout", lambda t: parse_duration(t, what="timeout"), "2h"),
    )
    fetch_allow = f.allow("fetch")
    network_allow = f.allow("network")
    rootfs_dirs = []
    for text_path in f.strings("rootfs", "allow"):
        where = Path(text_path)
        if not where.is_absolute():
            where = target.parent / where
        rootfs_dirs.append(Path(os.path.abspath(where)))
    return Settings(
        path=target,
        policy=(target.parent / policy).absolute() if policy else None,
        cache_max_size=size("caches", DEFAULT_CACHE_MAX_SIZE),
        cache_max_age=_or(
            f.unit("caches", "max_age", lambda t: parse_duration(t, what="caches.max_age"), "336h"),
            DEFAULT_CACHE_MAX_AGE,
        ),
        fetch_allow=tuple(fetch_allow),
        network_allow=tuple(network_allow),
        rootfs_dirs=tuple(rootfs_dirs),
        limits=limits,
        log_max_size=size("logs", DEFAULT_LOG_MAX_SIZE),
        output_max_size=size("outputs", DEFAULT_OUTPUT_MAX_SIZE),
        image_max_size=size("images", DEFAULT_IMAGE_MAX_SIZE),
        image_max_age=_or(
            f.unit("images", "max_age", _age("images.max_age"), "720h"), DEFAULT_IMAGE_MAX_AGE
        ),
        records_max_age=_or(
            f.unit("records", "max_age", _age("records.max_age"), "720h"), DEFAULT_RECORDS_MAX_AGE
        ),
        records_keep=_or(f.unit("records", "keep", parse_keep, "200"), DEFAULT_RECORDS_KEEP),
    )


def _age(what: str) -> Callable[[str], float]:
    return lambda text: parse_duration(text, what=what)


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value
