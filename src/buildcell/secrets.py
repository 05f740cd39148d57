"""Secrets by reference: the spec names them, the operator binds them to sources.

A spec can say only *which* step needs *which* secret (by name, and whether as a file or
an environment variable); it can never name a host path or variable. The operator binds
names to sources at invocation (``--secret NAME=env:VAR`` or ``NAME=file:PATH``). Values
are read once, held in :class:`~buildcell.redact.Secret` objects whose repr never shows
them, handed to the sandbox through memory file descriptors (never the host's disk, never
an argv), redacted from every byte the cell prints, and dropped when the build ends.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from buildcell.errors import ConfigError

if TYPE_CHECKING:
    from buildcell.redact import Secret

__all__ = ["SecretBinding", "SecretDelivery", "parse_binding", "resolve_bindings"]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,127}$")
_VAR = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class SecretBinding:
    """Where the value of secret ``name`` comes from: ``env`` names a host variable,
    ``file`` a host file."""

    name: str
    env: str | None = None
    file: Path | None = None

    def describe(self) -> str:
        return f"env:{self.env}" if self.env is not None else f"file:{self.file}"


@dataclass(frozen=True)
class SecretDelivery:
    """One secret given to one cell: always as ``/run/secrets/NAME``, and also as the
    environment variable ``env`` when the step asked for it (weaker: environments leak
    into crash reports and child processes)."""

    name: str
    env: str | None = None


def parse_binding(text: str) -> SecretBinding:
    """Parse ``NAME``, ``NAME=env:VAR`` or ``NAME=file:PATH`` (``NAME`` means ``env:NAME``).

    Raises:
        ConfigError: the text is malformed.
    """
    name, sep, source = text.partition("=")
    if not _NAME.match(name):
        raise ConfigError(
            f"invalid secret name {name[:60]!r}: expected letters, digits, '_', '.', '-'",
            hint="--secret NAME[=env:VAR|file:PATH]",
        )
    if not sep:
        return SecretBinding(name, env=name)
    kind, colon, where = source.partition(":")
    if colon and kind == "env" and _VAR.match(where):
        return SecretBinding(name, env=where)
    if colon and kind == "file" and where:
        return SecretBinding(name, file=Path(where).expanduser())
    raise ConfigError(
        f"invalid source for secret {name!r}: expected env:VAR or file:PATH",
        hint="for example --secret pypirc=file:~/.pypirc --secret token=env:GH_TOKEN",
    )


def resolve_bindings(
    bindings: Sequence[SecretBinding], environ: Mapping[str, str] | None = None
) -> list[Secret]:
    """Read every bound value.

    Raises:
        ConfigError: a variable is unset, a file unreadable, a name bound twice, or a
            value too short to redact. Messages name the secret and its source, never
            the value.
    """
    from buildcell.redact import Secret

    env = os.environ if environ is None else environ
    seen: set[str] = set()
    secrets: list[Secret] = []
    for binding in bindings:
        if binding.name in seen:
            raise ConfigError(f"secret {binding.name!r} is bound twice")
        seen.add(binding.name)
        if binding.env is not None:
            value = env.get(binding.env)
            if value is None:
                raise ConfigError(
                    f"secret {binding.name!r}: environment variable {binding.env} is not set"
                )
            data = value.encode()
        else:
            assert binding.file is not None
            try:
                data = binding.file.read_bytes()
            except OSError as e:
                raise ConfigError(
                    f"secret {binding.name!r}: cannot read {binding.file}: {e.strerror}"
                ) from None
        secrets.append(Secret(binding.name, data))
    return secrets
