"""The command line: parse, call the library, render. No decisions are made here."""

import os

from buildcell import _dccache

# pydantic loads every installed distribution's "pydantic" entry points into the first
# model it builds: other packages' code in a supervisor that often runs as root, after a
# scan of every package's metadata at each start. The command wants none of them.
os.environ["PYDANTIC_DISABLE_PLUGINS"] = "__all__"
_dccache.install()  # before the modules whose dataclasses the command creates

from buildcell.cli.commands import entry, main  # noqa: E402

__all__ = ["entry", "main"]
