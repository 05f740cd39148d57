"""Loggers that import :mod:`logging` only once a message could be shown.

:mod:`logging` and what it imports (``traceback``, ``tokenize``, ``string``, ...) are a
few milliseconds of every command's start, for messages that are almost never shown.
Until someone imports :mod:`logging`, nothing can have configured a handler, so a debug
or info message could only reach Python's last-resort handler, which drops it: it is
dropped here without the import. A warning or error imports :mod:`logging` and goes
through it as ever; once :mod:`logging` is imported (by a caller configuring it, by
pytest), every message does. The command line sets its level and format with
:func:`configure`, applied when :mod:`logging` is first needed.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["DEBUG", "ERROR", "INFO", "WARNING", "Logger", "configure", "get"]

DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40


class _Config:
    #: below this level nothing can be shown while logging is not imported
    least = WARNING
    #: logging.basicConfig arguments the command asked for, not applied yet
    pending: dict[str, Any] | None = None


def configure(*, level: int, format: str) -> None:
    """The command line's logging: ``level`` and ``format`` for the root logger. Applied
    at once if :mod:`logging` is imported already, else when it is first needed."""
    _Config.least = level
    _Config.pending = {"level": level, "format": format}
    if "logging" in sys.modules or level < WARNING:
        _logging()


def _logging() -> Any:
    import logging

    pending, _Config.pending = _Config.pending, None
    if pending is not None:
        logging.basicConfig(**pending)
    return logging


class Logger:
    """A logger by name, as :func:`logging.getLogger` gives, for the few methods used."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if "logging" not in sys.modules and level < _Config.least:
            return
        kwargs.setdefault("stacklevel", 2)  # the caller's line, not ours
        _logging().getLogger(self.name).log(level, msg, *args, **kwargs)

    def debug(self, msg: object, *args: object, **kwargs: Any) -> None:
        self.log(DEBUG, msg, *args, stacklevel=3, **kwargs)

    def info(self, msg: object, *args: object, **kwargs: Any) -> None:
        self.log(INFO, msg, *args, stacklevel=3, **kwargs)

    def warning(self, msg: object, *args: object, **kwargs: Any) -> None:
        self.log(WARNING, msg, *args, stacklevel=3, **kwargs)

    def error(self, msg: object, *args: object, **kwargs: Any) -> None:
        self.log(ERROR, msg, *args, stacklevel=3, **kwargs)


def get(name: str) -> Logger:
    """The logger ``name`` (a module's ``__name__``)."""
    return Logger(name)
