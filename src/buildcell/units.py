"""Parsing of the human units used in flags and specs: sizes, durations, CPU counts."""

from __future__ import annotations

import math
import re

from buildcell.errors import ConfigError

__all__ = ["format_size", "parse_cpus", "parse_duration", "parse_size"]

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_BINARY = {
    "": 1,
    "b": 1,
    "k": 1024,
    "ki": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mi": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gi": 1024**3,
    "gib": 1024**3,
    "t": 1024**4,
    "ti": 1024**4,
    "tib": 1024**4,
}
_DECIMAL = {"kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4}

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_DURATION_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_size(text: str | int, *, what: str = "size") -> int:
    """Parse ``512M``, ``2GiB``, ``1.5g``, ``4096`` into bytes.

    ``k``/``m``/``g``/``t`` (with or without ``i``/``iB``) are binary (1024-based), as in
    Docker and systemd; ``kB``/``MB``/``GB``/``TB`` are decimal.

    Raises:
        ConfigError: the text is not a positive size.
    """
    if isinstance(text, bool):
        raise ConfigError(f"invalid {what} {text!r}: expected a size such as 512M or 2GiB")
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE_RE.match(text)
        unit = match.group(2).lower() if match else ""
        factor = _BINARY.get(unit) or _DECIMAL.get(unit)
        if match is None or factor is None:
            raise ConfigError(
                f"invalid {what} {text!r}: expected a number with an optional unit "
                "(K, M, G, T; KiB/MiB/GiB; kB/MB/GB), such as 512M or 2GiB"
            )
        value = math.floor(float(match.group(1)) * factor)
    if value <= 0:
        raise ConfigError(f"invalid {what} {text!r}: must be greater than zero")
    return value


def format_size(n: int) -> str:
    """Format a byte count for humans (``1.5 GiB``)."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def parse_duration(text: str | int | float, *, what: str = "duration") -> float:
    """Parse ``90``, ``90s``, ``5m``, ``1h30m``, ``250ms`` into seconds.

    A bare number is seconds.

    Raises:
        ConfigError: the text is not a positive duration.
    """
    if isinstance(text, bool):
        raise ConfigError(f"invalid {what} {text!r}: expected a duration such as 90s or 5m")
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        stripped = text.strip().lower()
        try:
            seconds = float(stripped)
        except ValueError:
            parts = _DURATION_PART.findall(stripped)
            if not parts or "".join(n + u for n, u in parts) != stripped:
                raise ConfigError(
                    f"invalid {what} {text!r}: expected seconds or a duration such as "
                    "90s, 5m, 1h30m"
                ) from None
            seconds = sum(float(n) * _DURATION_UNIT[u] for n, u in parts)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"invalid {what} {text!r}: must be greater than zero")
    return seconds


def parse_cpus(text: str | int | float) -> float:
    """Parse a CPU count; fractions such as ``0.5`` are allowed.

    Raises:
        ConfigError: the text is not a positive number.
    """
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ConfigError(f"invalid cpus {text!r}: expected a number such as 2 or 0.5") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"invalid cpus {text!r}: must be greater than zero")
    if value < 0.01:
        raise ConfigError(f"invalid cpus {text!r}: the smallest share is 0.01")
    return value
