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
```

Relative paths are relative to the file. Unknown keys are errors (fail closed).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from buildcell.errors import ConfigError
from buildcell.units import parse_cpus, parse_duration, parse_size

__all__ = [
    "DEFAULT_CACHE_MAX_AGE",
    "DEFAULT_CACHE_MAX_SIZE",
    "DEFAULT_IMAGE_MAX_SIZE",
    "DEFAULT_LOG_MAX_SIZE",
    "DEFAULT_MEMORY",
    "DEFAULT_OUTPUT_MAX_SIZE",
    "DEFAULT_PIDS",
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


def _default_path() -> Path:
    if os.geteuid() == 0:
        return Path("/etc/buildcell/config.yaml")
    xdg = os.environ.get("XDG_CONFIG_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".config"
    return base / "buildcell" / "config.yaml"


def _read_yaml(target: Path, text: str) -> object:
    import yaml  # only when there is a file: `buildcell run` starts without PyYAML

    class _Strict(yaml.SafeLoader):
        """Refuses a key given twice: the second must not silently win (policy: ...)."""

    def mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[object, object]:
        keys = [loader.construct_object(k, deep=True) for k, _ in node.value]
        for i, key in enumerate(keys):
            if key in keys[:i]:
                raise yaml.constructor.ConstructorError(
                    None, None, f"setting {key!r} is given twice", node.value[i][0].start_mark
                )
        return loader.construct_mapping(node, deep=True)

    _Strict.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    try:
        return yaml.load(text, Loader=_Strict)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{target}:{mark.line + 1}" if mark is not None else str(target)
        raise ConfigError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from e


_SECTIONS: dict[str, tuple[str, ...]] = {
    "caches": ("max_size", "max_age"),
    "fetch": ("allow",),
    "network": ("allow",),
    "rootfs": ("allow",),
    "limits": ("memory", "pids", "cpus", "disk", "timeout"),
    "logs": ("max_size",),
    "outputs": ("max_size",),
    "images": ("max_size",),
}


class _File:
    """The parsed file, read one typed value at a time; every error names the key."""

    def __init__(self, target: Path, data: Mapping[str, Any]) -> None:
        self.target = target
        self.data = data

    def section(self, name: str) -> Mapping[str, Any]:
        value = self.data.get(name)
        if value is None:
            return {}
        known = _SECTIONS[name]
        if not isinstance(value, dict) or set(value) - set(known):
            raise ConfigError(
                f"{self.target}: {name}: expected a mapping with {', '.join(known)}",
                hint=f"unknown: {', '.join(sorted(map(str, set(value) - set(known))))}"
                if isinstance(value, dict)
                else None,
            )
        return value

    def unit(self, section: str, key: str, parse: Callable[[str], Any], example: str) -> Any:
        values = self.section(section)
        if key not in values:
            return None
        value = values[key]
        # Present means meant: an empty value is an error, never "the default".
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ConfigError(f"{self.target}: {section}.{key}: expected a value such as {example}")
        try:
            return parse(str(value))
        except ConfigError as e:
            raise ConfigError(f"{self.target}: {section}.{key}: {e.message}") from e

    def strings(self, section: str, key: str) -> list[str]:
        values = self.section(section)
        if key not in values:
            return []
        value = values[key]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{self.target}: {section}.{key}: expected a list of strings")
        return list(value)


def _pids(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise ConfigError(f"invalid pids {text!r}: expected a whole number such as 4096")
    return int(text)


def load_settings(path: Path | None = None) -> Settings:
    """Read the configuration file (``path``, ``$BUILDCELL_CONFIG`` or the default).

    Raises:
        ConfigError: an explicitly named file is missing, or any file is malformed.
    """
    explicit = path or (
        Path(os.environ["BUILDCELL_CONFIG"]) if "BUILDCELL_CONFIG" in os.environ else None
    )
    target = explicit or _default_path()
    try:
        text = target.read_text()
    except FileNotFoundError:
        if explicit is None:
            return Settings()
        raise ConfigError(f"configuration file {target} does not exist") from None
    except OSError as e:
        raise ConfigError(f"cannot read configuration file {target}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"configuration file {target} is not UTF-8 text") from e
    data = _read_yaml(target, text)
    if data is None:
        return Settings(path=target)
    if not isinstance(data, dict):
        raise ConfigError(f"{target}: expected a mapping of settings")
    known = ("policy", *_SECTIONS)
    unknown = sorted(str(k) for k in set(data) - set(known))
    if unknown:
        raise ConfigError(
            f"{target}: unknown setting {unknown[0]!r}", hint=f"known settings: {', '.join(known)}"
        )
    policy = data.get("policy")
    # Present means meant: an empty value is an error, never "no policy" (fail closed).
    if "policy" in data and (not isinstance(policy, str) or not policy.strip()):
        raise ConfigError(f"{target}: policy: expected the path of a policy file")
    f = _File(target, data)

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
    fetch_allow = f.strings("fetch", "allow")
    network_allow = f.strings("network", "allow")
    if fetch_allow or network_allow:
        from buildcell.allowlist import parse_allow

        for section, entries in (("fetch", fetch_allow), ("network", network_allow)):
            for entry in entries:
                try:
                    parse_allow(entry)
                except ConfigError as e:
                    raise ConfigError(f"{target}: {section}.allow: {e.message}", hint=e.hint) from e
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
    )


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value
