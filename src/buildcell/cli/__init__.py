"""The command line: parse, call the library, render. No decisions are made here."""

from buildcell import _dccache

_dccache.install()  # before the modules whose dataclasses the command creates

from buildcell.cli.commands import entry, main  # noqa: E402

__all__ = ["entry", "main"]
