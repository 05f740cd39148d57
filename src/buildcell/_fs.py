"""Small file-system helpers shared by the modules that walk untrusted trees."""

from __future__ import annotations

import abc
import hashlib
import stat
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = ["Closing", "file_kind", "sha256_file"]


def file_kind(mode: int) -> str:
    """A short name for the type of file ``mode`` describes, as used in skip reasons."""
    if stat.S_ISREG(mode):
        return "regular file"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "not a regular file"


class Closing(abc.ABC):
    """Base for resources that are context managers over an idempotent ``close``."""

    @abc.abstractmethod
    def close(self) -> object:
        """Release the resource; safe to call more than once."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def sha256_file(path: Path, *, chunk: int = 1 << 20) -> str:
    """The hex sha256 of a file of buildcell's own (a log, an artifact the caller names).

    Raises:
        OSError: it cannot be read.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(chunk):
            digest.update(data)
    return digest.hexdigest()
