"""Every command-line example of the README parses, and those this machine can run, run as
written (pasted into ``bash`` in a fresh project, with ``buildcell`` on PATH).

What counts as an example:

- each ``buildcell ...`` line of a fenced ``sh``/``console``/``bash`` block (``$ `` and a
  trailing ``# comment`` stripped, ``\\`` continuations joined): parsed by buildcell's own
  argument parser, and either run (``RUN``) or listed with the reason it is not
  (``NOT_RUN``); an example in neither fails, so a new one is never left unchecked;
- each code span in a heading, or in the text, that starts with ``buildcell COMMAND``
  (synopses such as ``buildcell logs ID [--step NAME]``): the command exists and every
  ``--flag`` it names is one of that command's options.

A few synopses are also run with concrete values (``SYNOPSIS_RUNS``).
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from tests.conftest import ASSETS, REPO, cli_env

from buildcell.cli.commands import _build_parser

pytestmark = pytest.mark.slow

README = REPO / "README.md"
_FENCE = re.compile(r"^\s*```(\w*)")
_SHELLS = {"sh", "console", "bash", "shell"}


@dataclass(frozen=True)
class Example:
    line: int
    text: str  # as written, continuations joined with "\\\n"

    @property
    def joined(self) -> str:
        return self.text.replace("\\\n", " ")

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.joined, comments=True)

    @property
    def command(self) -> str:
        """The example as written, without its comment, runs of blanks made one."""
        text = self.joined
        for cut in (m.start() for m in re.finditer(r"\s#", text)):
            if shlex.split(text[:cut]) == self.argv:
                text = text[:cut]
                break
        return " ".join(text.split())


def fenced_examples(text: str) -> list[Example]:
    out: list[Example] = []
    lang: str | None = None
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = _FENCE.match(line)
        if fence:
            lang = fence.group(1) if lang is None else None
        elif lang in _SHELLS:
            start, body = i + 1, line.strip().removeprefix("$ ")
            while body.endswith("\\") and i + 1 < len(lines):
                i += 1
                body += "\n" + lines[i]
            if body.startswith("buildcell "):
                out.append(Example(start, body))
        i += 1
    return out


def synopses(text: str) -> list[tuple[int, str]]:
    """``buildcell COMMAND ...`` code spans outside fenced blocks."""
    out: list[tuple[int, str]] = []
    fenced = False
    for n, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out += [(n, span) for span in re.findall(r"`(buildcell [^`]+)`", line)]
    return out


EXAMPLES = fenced_examples(README.read_text())


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


# -- what is run, and what is not -------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """How to run one example: files to write first, commands to run first, and a check."""

    files: dict[str, str] = field(default_factory=dict)
    before: tuple[str, ...] = ()
    check: Callable[[subprocess.CompletedProcess[str], Path], None] | None = None
    needs: Callable[[], str | None] = lambda: None  # a reason to skip, or None
    exit_code: int = 0
    env: dict[str, str] = field(default_factory=dict)


SPEC = """\
version: 1
name: app
steps:
  - name: package
    run: echo packaging && mkdir -p dist && echo app > app.txt && tar -czf dist/app.tar.gz app.txt
outputs: ["dist/app.tar.gz"]
"""
POLICY = """\
version: 1
rules:
  - name: no-unsafe
    expr: size(invocation.unsafe) == 0
"""
SECRET_SPEC = """\
version: 1
name: publish
steps:
  - name: publish
    run: test -s /run/secrets/pypirc && test -s /run/secrets/token && echo published
    secrets: [pypirc, token]
"""
BASE_FILES = {
    "Makefile": "all:\n\techo made\ncheck:\n\techo checked\n",
    "ci.sh": '#!/bin/sh\necho "ci ran in $(pwd)"\n',
    "buildcell.yaml": SPEC,
    "ci/buildcell.yaml": SPEC,
    "policy.yaml": POLICY,
    "src/pyproject.toml": '[project]\nname = "demo"\nversion = "1.0"\n'
    '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n',
    "src/demo/__init__.py": "",
}


def _host_has(*modules: str) -> Callable[[], str | None]:
    def needs() -> str | None:
        for module in modules:
            probe = subprocess.run(
                ["/usr/bin/python3", "-I", "-c", f"import {module}"], check=False
            )
            if probe.returncode != 0:
                return f"the host's python3 has no {module} (apt-get install python3-{module})"
        return None

    return needs


def _host_tool(name: str) -> Callable[[], str | None]:
    return lambda: (
        None if shutil.which(name) else f"needs {name} on the host (apt-get install {name})"
    )


def _moby_profile() -> str | None:
    path = ASSETS / "docker-seccomp-default.json"
    return None if path.is_file() else f"needs Docker's default profile at {path}"


def _in(*needles: str) -> Callable[[subprocess.CompletedProcess[str], Path], None]:
    def check(res: subprocess.CompletedProcess[str], _proj: Path) -> None:
        for needle in needles:
            assert needle in res.stdout + res.stderr, (needle, res.stdout, res.stderr)

    return check


def _wheel_built(res: subprocess.CompletedProcess[str], proj: Path) -> None:
    assert [p.name for p in (proj / "artifacts").rglob("*.whl")] == ["demo-1.0-py3-none-any.whl"]


def _events_written(res: subprocess.CompletedProcess[str], proj: Path) -> None:
    assert "checked" in res.stdout
    assert (proj / "events.jsonl").stat().st_size > 0


RUN: dict[str, Run] = {
    "buildcell doctor": Run(),
    "buildcell run -- make": Run(check=_in("made")),
    "buildcell run --source src --output 'dist/*.whl' --out artifacts -- python3 -m build -n": Run(
        needs=_host_has("build", "setuptools", "wheel"), check=_wheel_built
    ),
    "buildcell run --memory 1G --pids 256 --cpus 1.5 --disk 2G --timeout 10m -- ./ci.sh": Run(
        check=_in("ci ran in /workspace")
    ),
    "buildcell run --seccomp-profile docker-default.json --events events.jsonl -- make check": Run(
        needs=_moby_profile, check=_events_written
    ),
    "buildcell run --allow pypi.example.org -- curl -sS https://evil.example.net": Run(
        needs=_host_tool("curl"), exit_code=56, check=_in("403", "evil.example.net:443", "denied")
    ),
    "buildcell policy check --policy policy.yaml -f buildcell.yaml --trust trusted --ref refs/heads/main": Run(
        check=_in("PASS")
    ),
    "buildcell build --policy policy.yaml --project acme-api --trust untrusted --ref refs/pull/7/head": Run(),
    "buildcell build --secret pypirc=file:~/.pypirc --secret token=env:GH_TOKEN": Run(
        files={"buildcell.yaml": SECRET_SPEC, "../home/.pypirc": "[pypi]\n"},
        env={"GH_TOKEN": "gh-token-value"},
        check=_in("published"),
    ),
    "buildcell keygen --out ~/keys/": Run(
        check=lambda res, proj: (
            None
            if (proj.parent / "home" / "keys" / "buildcell.key").is_file()
            else pytest.fail(res.stderr)
        )
    ),
    "buildcell build --sign-key ~/keys/buildcell.key --builder-id https://ci.example/runner": Run(
        before=("buildcell keygen --out ~/keys/",),
    ),
    "buildcell verify --key ~/keys/buildcell.pub --provenance buildcell-out/provenance.intoto.jsonl "
    "buildcell-out/dist/app.tar.gz --builder-id https://ci.example/runner --no-network": Run(
        before=(
            "buildcell keygen --out ~/keys/",
            "buildcell build --sign-key ~/keys/buildcell.key --builder-id https://ci.example/runner",
        ),
    ),
}

NOT_RUN: dict[str, str] = {
    "buildcell run --rootfs dir:/srv/rootfs/bookworm -- sh -c 'cat /etc/os-release'": (
        "needs a root filesystem at /srv/rootfs/bookworm (tests/integration build their own)"
    ),
    "buildcell run --secret NAME[=env:VAR|file:PATH] -- CMD": (
        "a synopsis: NAME, VAR, PATH and CMD stand for the reader's own"
    ),
}

#: Synopses (headings, text) run with concrete values: (README span, command lines, check).
SYNOPSIS_RUNS: dict[str, tuple[str, ...]] = {
    "buildcell init": ("rm buildcell.yaml", "buildcell init", "test -s buildcell.yaml"),
    "buildcell schema": ("buildcell schema | python3 -c 'import json, sys; json.load(sys.stdin)'",),
    "buildcell doctor [--json]": ("buildcell doctor --json >/dev/null",),
    "buildcell gc [--json] [--records-max-age D] [--records-keep N] [--images-max-age D] "
    "[--kept-max-age D]": (
        "buildcell gc --json --records-max-age 720h --records-keep 50 --images-max-age 1h "
        "--kept-max-age 2h >/dev/null",
    ),
    "buildcell build -f ci/buildcell.yaml --source .": (
        "buildcell build -f ci/buildcell.yaml --source .",
        "test -s buildcell-out/dist/app.tar.gz",
    ),
    "buildcell run -- /bin/true": ("buildcell run -- /bin/true",),
    "buildcell ls": (
        "buildcell build -q",
        "buildcell ls | grep -q succeeded",
        "id=$(buildcell ls --json | python3 -c \"import json, sys; print(json.load(sys.stdin)[0]['id'])\")"
        ' && buildcell show "$id" && buildcell logs "$id" --step package | grep -q packaging',
    ),
}


# -- running ---------------------------------------------------------------------------


@pytest.fixture
def project(tmp_path: Path) -> Callable[[Run], Path]:
    def make(run: Run) -> Path:
        proj = tmp_path / "proj"
        for name, content in {**BASE_FILES, **run.files}.items():
            path = proj / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
        (proj / "ci.sh").chmod(0o755)
        if _moby_profile() is None:
            shutil.copy(ASSETS / "docker-seccomp-default.json", proj / "docker-default.json")
        return proj

    return make


def _shell(
    proj: Path, script: str, state: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """``script`` pasted into a new bash in ``proj``, ``buildcell`` being this checkout's."""
    bindir = proj.parent / "bin"
    bindir.mkdir(exist_ok=True)
    wrapper = bindir / "buildcell"
    wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m buildcell "$@"\n')
    wrapper.chmod(0o755)
    home = proj.parent / "home"  # outside the checkout, where a signing key may live
    home.mkdir(exist_ok=True)
    full = cli_env(state, HOME=str(home), **env)
    full["PATH"] = f"{bindir}:{full['PATH']}"
    return subprocess.run(
        ["bash", "-e", "-c", script],
        cwd=proj,
        env=full,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_every_fenced_example_is_run_or_says_why_not() -> None:
    assert len(EXAMPLES) >= 10, EXAMPLES
    commands = {e.command for e in EXAMPLES}
    unlisted = [
        f"README.md:{e.line}: {e.command}"
        for e in EXAMPLES
        if e.command not in RUN and e.command not in NOT_RUN
    ]
    assert not unlisted, "add to RUN or NOT_RUN (with the reason): " + "; ".join(unlisted)
    stale = [c for c in (*RUN, *NOT_RUN) if c not in commands]
    assert not stale, f"no longer in the README: {stale}"


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: f"L{e.line}")
def test_fenced_example_parses(example: Example) -> None:
    try:
        _build_parser().parse_args(example.argv[1:])
    except SystemExit as exc:
        pytest.fail(f"README.md:{example.line}: {example.command} does not parse (exit {exc.code})")


#: The documentation's examples: each parses, and each synopsis names real options.
DOCS = sorted((REPO / "docs").glob("*.md"))
DOC_EXAMPLES = [(d.name, e) for d in DOCS for e in fenced_examples(d.read_text())]
DOC_SYNOPSES = [(d.name, line, span) for d in DOCS for line, span in synopses(d.read_text())]


def test_the_docs_have_examples() -> None:
    assert len(DOC_EXAMPLES) >= 5 and len(DOC_SYNOPSES) >= 10, (DOC_EXAMPLES, DOC_SYNOPSES)


@pytest.mark.parametrize(("doc", "example"), DOC_EXAMPLES, ids=lambda v: str(v)[:40])
def test_docs_example_parses(doc: str, example: Example) -> None:
    try:
        _build_parser().parse_args(example.argv[1:])
    except SystemExit as exc:
        pytest.fail(
            f"docs/{doc}:{example.line}: {example.command} does not parse (exit {exc.code})"
        )


@pytest.mark.parametrize(("doc", "line", "span"), DOC_SYNOPSES, ids=lambda v: str(v)[:40])
def test_docs_synopsis_names_a_command_and_its_options(doc: str, line: int, span: str) -> None:
    _check_synopsis(f"docs/{doc}", line, span)


@pytest.mark.parametrize(("line", "span"), synopses(README.read_text()), ids=lambda v: str(v)[:40])
def test_synopsis_names_a_command_and_its_options(line: int, span: str) -> None:
    _check_synopsis("README.md", line, span)


def _check_synopsis(where: str, line: int, span: str) -> None:
    parser = _build_parser()
    words = span.replace("[", " ").replace("]", " ").replace("|", " ").split()
    commands = _subparsers(parser)
    assert words[1] in commands, f"{where}:{line}: `{span}`: no command {words[1]}"
    sub = commands[words[1]]
    known = {opt for action in sub._actions for opt in action.option_strings}
    known |= {
        opt
        for s in _subparsers(sub).values()
        for action in s._actions
        for opt in action.option_strings
    }
    flags = [w.split("=")[0] for w in words[2:] if w.startswith("-") and w != "--"]
    unknown = [f for f in flags if f not in known]
    assert not unknown, f"{where}:{line}: `{span}`: {words[1]} has no {unknown}"


@pytest.mark.parametrize(
    "example", [e for e in EXAMPLES if e.command in RUN], ids=lambda e: f"L{e.line}"
)
def test_fenced_example_runs(
    example: Example, project: Callable[[Run], Path], state_root: Path
) -> None:
    run = RUN[example.command]
    reason = run.needs()
    if reason:
        pytest.skip(f"README.md:{example.line}: {reason}")
    proj = project(run)
    state = state_root / "state"
    for before in run.before:
        prior = _shell(proj, before, state, run.env)
        assert prior.returncode == 0, (before, prior.stdout, prior.stderr)
    res = _shell(proj, example.text, state, run.env)
    assert res.returncode == run.exit_code, (res.stdout, res.stderr)
    if run.check is not None:
        run.check(res, proj)


@pytest.mark.parametrize("span", sorted(SYNOPSIS_RUNS))
def test_synopsis_runs(span: str, project: Callable[[Run], Path], state_root: Path) -> None:
    assert span in {s for _, s in synopses(README.read_text())}, (
        f"`{span}` is no longer in the README"
    )
    proj = project(Run())
    for script in SYNOPSIS_RUNS[span]:
        res = _shell(proj, script, state_root / "state", {})
        assert res.returncode == 0, (script, res.stdout, res.stderr)


def test_examples_are_found_in_blocks_and_continuations() -> None:
    text = "x\n```sh\n$ buildcell run -- a  # c\nbuildcell verify --key k \\\n    f\necho no\n```\n`buildcell ls`\n"
    found = fenced_examples(text)
    assert [(e.line, e.command) for e in found] == [
        (3, "buildcell run -- a"),
        (4, "buildcell verify --key k f"),
    ]
    assert synopses(text) == [(8, "buildcell ls")]
