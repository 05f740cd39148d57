"""The one error root of buildcell.

Every failure that buildcell itself can explain is an :class:`Error`: it carries a message a
user can act on, an optional hint, and the exit code the CLI returns. Anything else that
escapes is a bug and is allowed to crash loudly.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "CommandNotExecutableError",
    "CommandNotFoundError",
    "ConfigError",
    "Error",
    "ImageError",
    "InputError",
    "OutputError",
    "PolicyError",
    "ProvenanceError",
    "SandboxError",
    "SeccompError",
    "SpecError",
    "StateError",
    "UsageError",
]

#: buildcell could not do what was asked (bad input, setup failure, policy denial).
EXIT_INTERNAL = 125


class Error(Exception):
    """Base of every error buildcell reports to users.

    Args:
        message: one line saying what is wrong, in the user's terms.
        hint: optional second line saying how to fix it.
        exit_code: what ``buildcell`` exits with; 125 unless a subclass says otherwise.
    """

    exit_code: int = EXIT_INTERNAL

    def __init__(
        self,
        message: str,
        *,
        hint: str | None = None,
        exit_code: int | None = None,
        details: Sequence[str] = (),
    ):
        super().__init__(message)
        self.message = message
        self.hint = hint
        #: further problems of the same kind, one line each (every error of a spec)
        self.details: tuple[str, ...] = tuple(details)
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message


class UsageError(Error):
    """A command-line flag or argument is malformed."""


class ConfigError(Error):
    """A value in a cell configuration is invalid (size, duration, path, ...)."""


class SpecError(ConfigError):
    """A build spec is invalid; the message names the file, the line and the field."""


class InputError(Error):
    """A pinned input could not be fetched, or its digest does not match."""


class ImageError(Error):
    """An OCI/Docker image could not be verified or unpacked safely."""


class SandboxError(Error):
    """The sandbox could not be set up (bubblewrap, namespaces, cgroups, mounts)."""


class SeccompError(Error):
    """A seccomp profile could not be read or compiled."""


class OutputError(Error):
    """Outputs could not be collected safely."""


class PolicyError(Error):
    """An operator policy is malformed, or it denies the build (exit 125, nothing runs)."""


class ProvenanceError(Error):
    """Provenance cannot be made or checked: an unreadable file, a bad key or expectation."""


class StateError(Error):
    """The state directory is unusable."""


class CommandNotFoundError(Error):
    """The command does not exist inside the cell (exit 127, like a shell)."""

    exit_code = 127


class CommandNotExecutableError(Error):
    """The command exists inside the cell but cannot be executed (exit 126)."""

    exit_code = 126
