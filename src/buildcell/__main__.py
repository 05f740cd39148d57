from buildcell.cli.commands import entry

entry()
