"""The host's settings from the environment: read once, typed, malformed values refused."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from buildcell.errors import ConfigError
from buildcell.host import DEFAULT_UID_BASE, DEFAULT_UID_COUNT, HostEnv

SRC = Path(__file__).resolve().parents[2] / "src" / "buildcell"


def test_an_empty_environment_gives_the_defaults() -> None:
    host = HostEnv.read({})
    assert host == HostEnv()
    assert host.uid_range == (DEFAULT_UID_BASE, DEFAULT_UID_COUNT)
    assert host.state_dir is None and host.config is None and host.bwrap is None


def test_every_variable_is_read(tmp_path: Path) -> None:
    host = HostEnv.read(
        {
            "BUILDCELL_STATE_DIR": str(tmp_path / "state"),
            "BUILDCELL_CONFIG": "relative/config.yaml",
            "BUILDCELL_UID_BASE": "0x10000",
            "BUILDCELL_UID_COUNT": "64",
            "BUILDCELL_BWRAP": "/opt/bwrap",
            "BUILDCELL_CGROUP_PARENT": "/sys/fs/cgroup/ci",
            "XDG_STATE_HOME": "/xdg/state",
            "XDG_CONFIG_HOME": "/xdg/config",
            "SOURCE_DATE_EPOCH": "1700000000",
        }
    )
    assert host.state_dir == tmp_path / "state"
    assert host.config == Path.cwd() / "relative" / "config.yaml"  # made absolute once
    assert host.uid_range == (0x10000, 64)
    assert host.bwrap == Path("/opt/bwrap")
    assert host.cgroup_parent == Path("/sys/fs/cgroup/ci")
    assert host.source_date_epoch == 1700000000
    if os.geteuid() != 0:
        assert host.default_state_dir() == tmp_path / "state"
        assert host.default_config() == Path("/xdg/config/buildcell/config.yaml")


def test_empty_values_mean_the_default() -> None:
    names = ["BUILDCELL_STATE_DIR", "BUILDCELL_UID_BASE", "BUILDCELL_UID_COUNT", "BUILDCELL_BWRAP"]
    assert HostEnv.read(dict.fromkeys(names, "")) == HostEnv()


def test_relative_xdg_directories_are_ignored(tmp_path: Path) -> None:
    host = HostEnv.read({"XDG_STATE_HOME": "rel", "HOME": str(tmp_path)})
    assert host.xdg_state_home is None
    if os.geteuid() != 0:
        assert host.default_state_dir() == tmp_path / ".local" / "state" / "buildcell"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("BUILDCELL_UID_BASE", "abc", "BUILDCELL_UID_BASE='abc' is not a number"),
        ("BUILDCELL_UID_BASE", "1e6", "is not a number"),
        ("BUILDCELL_UID_BASE", "999", "is not a uid from 1000"),
        ("BUILDCELL_UID_BASE", "-5", "is not a uid from 1000"),
        ("BUILDCELL_UID_BASE", str(2**32), "is not a uid from 1000"),
        ("BUILDCELL_UID_COUNT", "0", "BUILDCELL_UID_COUNT=0 does not fit"),
        ("BUILDCELL_UID_COUNT", "ten", "BUILDCELL_UID_COUNT='ten' is not a number"),
        ("BUILDCELL_UID_COUNT", str(2**32), "does not fit"),
        ("BUILDCELL_STATE_DIR", "/a\0b", "BUILDCELL_STATE_DIR='/a\\x00b' is not a path"),
        ("SOURCE_DATE_EPOCH", "yesterday", "SOURCE_DATE_EPOCH='yesterday' is not a timestamp"),
        ("SOURCE_DATE_EPOCH", "-1", "is not a timestamp"),
    ],
)
def test_a_malformed_variable_is_one_error_naming_it(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        HostEnv.read({name: value})
    assert message in raised.value.message
    assert "\n" not in raised.value.message
    assert raised.value.exit_code == 125


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BUILDCELL_UID_BASE", "abc"),
        ("BUILDCELL_UID_COUNT", "-1"),
        ("SOURCE_DATE_EPOCH", "soon"),
        ("BUILDCELL_UID_BASE", "4294967000"),  # the default count runs past the last uid
    ],
)
def test_the_command_line_refuses_a_malformed_variable_with_125(
    tmp_path: Path, name: str, value: str
) -> None:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "BUILDCELL_STATE_DIR": str(tmp_path / "state"),
        name: value,
    }
    res = subprocess.run(
        [sys.executable, "-m", "buildcell", "run", "--", "true"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 125, res.stderr
    lines = res.stderr.splitlines()
    assert lines[0].startswith("buildcell: error: BUILDCELL_UID_") or lines[0].startswith(
        f"buildcell: error: {name}="
    ), lines
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "state").exists()


def test_no_library_module_reads_the_environment() -> None:
    # The edge (host.py, the command line) reads it; secrets bound with env:VAR read the
    # environment the caller hands them, this process's by default.
    allowed = {"host.py", "cli/commands.py", "secrets.py"}
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "environb"):
                found.append(f"{rel}:{node.lineno}")
    assert not found, found
