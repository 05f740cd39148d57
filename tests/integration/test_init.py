"""`buildcell init` through the CLI, and building what it writes in real cells."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from tests.conftest import RunCLI

from buildcell.build.spec import load_spec

HELLO_C = '#include <stdio.h>\nint main(void) { puts("hello from a cell"); return 0; }\n'


def _files(proj: Path, files: dict[str, str]) -> Path:
    proj.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (proj / name).write_text(text)
    return proj


def _init(bc: RunCLI, proj: Path, **env: str) -> str:
    r = bc("init", cwd=proj, env=env)
    assert r.returncode == 0, r.stderr
    return (proj / "buildcell.yaml").read_text()


def _empty_home(tmp_path: Path) -> str:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return str(home)


def test_init_reads_pip_conf_of_the_users_home(bc: RunCLI, tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".config/pip").mkdir(parents=True)
    (home / ".config/pip/pip.conf").write_text(
        "[global]\nindex-url = https://pypi.example.internal/simple\n"
    )
    proj = _files(tmp_path / "py", {"pyproject.toml": "[project]\nname = 'x'\n"})
    r = bc("init", cwd=proj, env={"HOME": str(home), "XDG_CONFIG_DIRS": str(tmp_path / "none")})
    assert r.returncode == 0, r.stderr
    assert "Python (pyproject.toml)" in r.stdout
    text = (proj / "buildcell.yaml").read_text()
    assert '- "pypi.example.internal:443"   # index-url, from ' + str(home) in text
    assert 'PIP_INDEX_URL: "https://pypi.example.internal/simple"' in text
    # What was written is a spec buildcell accepts as it is.
    step = load_spec(proj / "buildcell.yaml").spec.steps[0]
    assert step.network is not None and step.network.allow == ["pypi.example.internal:443"]


def test_init_leaves_credentials_out_of_the_spec(bc: RunCLI, tmp_path: Path) -> None:
    proj = _files(tmp_path / "web", {"package.json": "{}", "package-lock.json": "{}"})
    text = _init(
        bc,
        proj,
        HOME=_empty_home(tmp_path),
        NPM_CONFIG_REGISTRY="https://ci:npm_T0KEN@npm.example.internal/",
    )
    assert "npm_T0KEN" not in text and "ci:npm" not in text
    assert '- "npm.example.internal:443"' in text
    assert "carries credentials, left out" in text


def test_init_refuses_to_overwrite_and_never_writes_through_a_link(
    bc: RunCLI, tmp_path: Path
) -> None:
    proj = _files(tmp_path / "p", {"Makefile": "all:\n\ttrue\n"})
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    (proj / "buildcell.yaml").symlink_to(victim)
    r = bc("init", cwd=proj)
    assert r.returncode == 125 and "already exists" in r.stderr
    r = bc("init", "--force", cwd=proj)
    assert r.returncode == 0, r.stderr
    assert victim.read_text() == "keep me\n"
    assert not (proj / "buildcell.yaml").is_symlink()


def _build(bc: RunCLI, proj: Path) -> str:
    r = bc("build", cwd=proj, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout + r.stderr


@pytest.mark.slow
def test_init_then_build_a_makefile_project(bc: RunCLI, tmp_path: Path) -> None:
    proj = _files(
        tmp_path / "hello-make",
        {
            "hello.c": HELLO_C,
            "Makefile": "all: hello\nhello: hello.c\n\tcc -o $@ hello.c\ntest: hello\n\t./hello\n",
        },
    )
    text = _init(bc, proj)
    assert "run: make test" in text
    out = _build(bc, proj)
    assert "hello from a cell" in out


@pytest.mark.slow
def test_init_then_build_an_autotools_project(bc: RunCLI, tmp_path: Path) -> None:
    # A configure script as autoconf would leave it: it writes the Makefile from
    # Makefile.in with the prefix it was given.
    configure = (
        "#!/bin/sh\nprefix=/usr/local\nfor a; do case $a in --prefix=*) prefix=${a#*=};; esac; done\n"
        'sed "s|@prefix@|$prefix|" Makefile.in > Makefile\necho "configured for $prefix"\n'
    )
    makefile_in = (
        "prefix = @prefix@\nall: hello\nhello: hello.c\n\tcc -o $@ hello.c\n"
        "check: hello\n\t./hello\n\t@echo installs into $(prefix)\n"
        "install: hello\n\tmkdir -p $(DESTDIR)$(prefix)/bin\n\tcp hello $(DESTDIR)$(prefix)/bin/\n"
    )
    proj = _files(
        tmp_path / "hello-ac",
        {"configure": configure, "Makefile.in": makefile_in, "hello.c": HELLO_C},
    )
    (proj / "configure").chmod(0o755)
    text = _init(bc, proj)
    assert "run: ./configure --prefix=/usr" in text
    out = _build(bc, proj)
    assert "configured for /usr" in out
    assert "hello from a cell" in out and "installs into /usr" in out


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_init_then_build_a_cmake_project(bc: RunCLI, tmp_path: Path) -> None:
    proj = _files(
        tmp_path / "hello-cmake",
        {
            "hello.c": HELLO_C,
            "CMakeLists.txt": "cmake_minimum_required(VERSION 3.13)\nproject(hello C)\n"
            "enable_testing()\nadd_executable(hello hello.c)\nadd_test(NAME runs COMMAND hello)\n",
        },
    )
    text = _init(bc, proj)
    assert "run: cmake -S . -B build" in text
    out = _build(bc, proj)
    assert "100% tests passed" in out
