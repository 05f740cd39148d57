"""The command line parser: built for one command when argv names it, whole otherwise."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from buildcell.cli import commands as cli


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["run", "--", "true"], "run"),
        (["--debug", "build", "--json"], "build"),
        (["--state-dir", "run", "gc"], "gc"),  # the option's value is not the command
        (["--state-dir=/x", "ls"], "ls"),
        (["nosuch"], None),
        (["--version"], None),
        ([], None),
    ],
)
def test_command_of(argv: list[str], command: str | None) -> None:
    assert cli._command_of(argv) == command


@pytest.mark.parametrize("name", sorted(cli._COMMANDS))
def test_one_command_parser_parses_like_the_whole_one(name: str) -> None:
    argv = {
        "run": ["run", "--memory", "1G", "--allow", "a.example:443", "--", "make", "-j2"],
        "build": ["build", "--json", "--trust", "untrusted"],
        "verify": ["verify", "--key", "k.pub", "--provenance", "p.jsonl", "a.whl"],
        "show": ["show", "abc", "--json"],
        "logs": ["logs", "abc", "--step", "test"],
        "policy": ["policy", "check", "--json"],
        "gc": ["gc", "--cache-max-age", "1h", "--kept-max-age", "2h"],
        "shell": ["shell", "abc", "--step", "test"],
    }.get(name, [name])
    assert cli._build_parser(name).parse_args(argv) == cli._build_parser().parse_args(argv)


def test_unknown_command_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["nosuch"])
    assert exit_.value.code == 125
    err = capsys.readouterr().err
    assert "invalid choice: 'nosuch'" in err
    for name in cli._COMMANDS:
        assert name in err


def test_main_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for name in cli._COMMANDS:
        assert f"\n    {name} " in out  # argparse's list of commands, with their help


def test_every_error_of_a_spec_is_printed_one_per_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "buildcell.yaml").write_text(
        "version: 1\nname: bad name\nsteps:\n  - {name: s, run: true, limits: {timeout: soon}}\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BUILDCELL_STATE_DIR", str(tmp_path / "state"))
    assert cli.main(["build"]) == 125
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3, lines
    assert all(line.startswith("buildcell: error: ") for line in lines)
    name, run, timeout = (line.removeprefix("buildcell: error: ") for line in lines)
    assert name.startswith(f"{tmp_path / 'buildcell.yaml'}:2: name: ")
    assert run.startswith(f"{tmp_path / 'buildcell.yaml'}:4: steps[0].run: expected a string")
    assert timeout.startswith(f"{tmp_path / 'buildcell.yaml'}:4: steps[0].limits.timeout: ")
    assert not (tmp_path / "state").exists()


def test_main_help_lists_each_command_once(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for name in cli._COMMANDS:
        assert len(re.findall(rf"^ +{name} ", out, re.MULTILINE)) == 1, name


def test_run_help_names_every_rootfs_kind(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for kind in ("'host'", "'dir:PATH'", "'oci:PATH@sha256:DIGEST'"):
        assert kind in out


def test_unpack_progress_is_printed_by_run_and_by_a_build(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from buildcell.build.runner import _report_unpack
    from buildcell.cli.console import PlainReporter, QuietReporter

    event = {"event": "image.unpack", "step": "compile", "digest": "sha256:" + "ab" * 32,
             "layer": 2, "layers": 3, "cached": True, "bytes": 3 << 20, "elapsed": 1.5}  # fmt: skip
    cli._print_unpack(event)
    err = capsys.readouterr().err
    assert err == "buildcell: unpacking image abababababab: layer 2/3 (cached), 3.0 MiB so far\n"
    plain = io.StringIO()
    _report_unpack(event, PlainReporter(err=plain))
    assert "[compile] unpacking image abababababab: layer 2/3" in plain.getvalue()
    quiet = io.StringIO()
    _report_unpack({**event, "done": True}, QuietReporter(err=quiet))
    assert quiet.getvalue() == ""  # -q: no progress
    cli._print_unpack({"event": "warning", "message": "x"})
    assert capsys.readouterr().err == ""
