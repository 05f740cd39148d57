"""The command line: parse, call the library, render. No decisions are made here."""

from buildcell.cli.commands import entry, main

__all__ = ["entry", "main"]
