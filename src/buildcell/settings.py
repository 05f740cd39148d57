"""The operator's configuration file: settings that build authors cannot change.

``$BUILDCELL_CONFIG``, else ``/etc/buildcell/config.yaml`` (root) or
``$XDG_CONFIG_HOME/buildcell/config.yaml``; a missing default file is no configuration.

```yaml
policy: /etc/buildcell/policy.yaml   # the operator policy every build is checked against
caches:
  max_size: 2GiB                     # per cache; a bigger one is not saved
  max_age: 336h                      # `buildcell gc` removes caches unused for longer (14 days)
```

Relative paths are relative to the file. Unknown keys are errors (fail closed).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from buildcell.errors import ConfigError
from buildcell.units import parse_duration, parse_size

__all__ = ["DEFAULT_CACHE_MAX_AGE", "DEFAULT_CACHE_MAX_SIZE", "Settings", "load_settings"]

DEFAULT_CACHE_MAX_SIZE = 2 << 30
DEFAULT_CACHE_MAX_AGE = 14 * 86400.0


@dataclass(frozen=True)
class Settings:
    """What the configuration file says (defaults where it says nothing)."""

    path: Path | None = None
    policy: Path | None = None
    cache_max_size: int = DEFAULT_CACHE_MAX_SIZE
    cache_max_age: float = DEFAULT_CACHE_MAX_AGE


def _default_path() -> Path:
    if os.geteuid() == 0:
        return Path("/etc/buildcell/config.yaml")
    xdg = os.environ.get("XDG_CONFIG_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".config"
    return base / "buildcell" / "config.yaml"


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
        data = yaml.load(text, Loader=_Strict)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{target}:{mark.line + 1}" if mark is not None else str(target)
        raise ConfigError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from e
    if data is None:
        return Settings(path=target)
    if not isinstance(data, dict):
        raise ConfigError(f"{target}: expected a mapping of settings")
    unknown = sorted(set(data) - {"policy", "caches"})
    if unknown:
        raise ConfigError(
            f"{target}: unknown setting {unknown[0]!r}", hint="known settings: policy, caches"
        )
    policy = data.get("policy")
    # Present means meant: an empty value is an error, never "no policy" (fail closed).
    if "policy" in data and (not isinstance(policy, str) or not policy.strip()):
        raise ConfigError(f"{target}: policy: expected the path of a policy file")
    caches = data.get("caches") or {}
    if not isinstance(caches, dict) or set(caches) - {"max_size", "max_age"}:
        raise ConfigError(f"{target}: caches: expected a mapping with max_size and max_age")
    for key in ("max_size", "max_age"):
        if key in caches and (
            isinstance(caches[key], bool) or not isinstance(caches[key], str | int)
        ):
            raise ConfigError(
                f"{target}: caches.{key}: expected a size or duration such as 2GiB, 336h"
            )
    return Settings(
        path=target,
        policy=(target.parent / policy).absolute() if policy else None,
        cache_max_size=parse_size(caches["max_size"], what="caches.max_size")
        if "max_size" in caches
        else DEFAULT_CACHE_MAX_SIZE,
        cache_max_age=parse_duration(caches["max_age"], what="caches.max_age")
        if "max_age" in caches
        else DEFAULT_CACHE_MAX_AGE,
    )
