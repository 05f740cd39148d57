from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from buildcell.build.spec import BuildSpec, load_spec
from buildcell.build.starter import _safe, starter_spec


def test_starter_spec_kinds(tmp_path: Path) -> None:
    from buildcell.build.spec import parse_spec

    proj = tmp_path / "My Project!"
    proj.mkdir()
    text, kind = starter_spec(proj)
    assert kind == "generic"
    assert parse_spec(text, path=proj / "buildcell.yaml").spec.name == "my-project"
    (proj / "Makefile").write_text("all:\n\tcc x.c\ntest:\n\t./x\n")
    text, kind = starter_spec(proj)
    assert kind == "Makefile"
    spec = parse_spec(text, path=proj / "buildcell.yaml").spec
    assert [s.run for s in spec.steps] == ["make -j2", "make test"]


# --- each kind -----------------------------------------------------------------------------

KINDS: dict[str, tuple[dict[str, str], str, list[tuple[str, str]]]] = {
    "configure": (
        {"configure": "#!/bin/sh\n", "Makefile.in": "all:\n"},
        "autotools (configure)",
        [
            ("configure", "sh ./configure --prefix=/usr"),
            ("build", "make -j2"),
            ("check", "make check"),
        ],
    ),
    "configure.ac": (
        {"configure.ac": "AC_INIT([x], [1])\n"},
        "autotools (configure.ac)",
        [
            ("autoreconf", "autoreconf -fi"),
            ("configure", "./configure --prefix=/usr"),
            ("build", "make -j2"),
            ("check", "make check"),
        ],
    ),
    "cmake": (
        {"CMakeLists.txt": "project(x C)\n"},
        "CMake (CMakeLists.txt)",
        [
            ("configure", "cmake -S . -B build -DCMAKE_BUILD_TYPE=Release"),
            ("build", "cmake --build build -j2"),
            ("test", "ctest --test-dir build --output-on-failure"),
        ],
    ),
    "cargo": (
        {"Cargo.toml": '[package]\nname = "hello"\n', "Cargo.lock": "version = 3\n"},
        "Cargo (Cargo.toml)",
        [
            ("fetch", "cargo fetch --locked"),
            ("build", "cargo build --release --locked --offline"),
            ("test", "cargo test --release --locked --offline"),
        ],
    ),
    "go": (
        {"go.mod": "module example.internal/x\n\nrequire example.internal/y v1.0.0\n"},
        "Go modules (go.mod)",
        [
            ("deps", "go mod download"),
            ("build", "go build -o bin/ ./..."),
            ("test", "go test ./..."),
        ],
    ),
    "go-vendored": (
        {"go.mod": "module x\n\nrequire y v1.0.0\n", "vendor/modules.txt": "# y v1.0.0\n"},
        "Go modules (go.mod, vendored)",
        [("build", "go build -o bin/ ./..."), ("test", "go test ./...")],
    ),
    "python": (
        {"pyproject.toml": "[project]\nname = 'x'\n"},
        "Python (pyproject.toml)",
        [("wheel", "python3 -m pip wheel --no-deps --no-build-isolation -w dist .")],
    ),
    "npm-ci": (
        {"package.json": "{}", "package-lock.json": "{}"},
        "npm (package-lock.json)",
        [("deps", "npm ci"), ("build", "npm run build --if-present")],
    ),
    "npm-shrinkwrap": (
        {"package.json": "{}", "npm-shrinkwrap.json": "{}"},
        "npm (npm-shrinkwrap.json)",
        [("deps", "npm ci"), ("build", "npm run build --if-present")],
    ),
    "npm-no-lockfile": (
        {"package.json": "{}"},
        "npm (package.json)",
        [("build", "npm run build --if-present")],
    ),
}


def _project(tmp_path: Path, files: dict[str, str], name: str = "proj") -> Path:
    proj = tmp_path / name
    for rel, text in files.items():
        (proj / rel).parent.mkdir(parents=True, exist_ok=True)
        (proj / rel).write_text(text)
    return proj


def _steps(proj: Path, environ: dict[str, str] | None = None) -> tuple[str, BuildSpec, str]:
    text, kind = starter_spec(proj, environ=environ or {}, system_root=proj.parent / "nosys")
    (proj / "buildcell.yaml").write_text(text)
    return kind, load_spec(proj / "buildcell.yaml").spec, text


@pytest.mark.parametrize("name", sorted(KINDS))
def test_each_kind_is_recognized_and_its_spec_loads(tmp_path: Path, name: str) -> None:
    files, expected_kind, expected_steps = KINDS[name]
    kind, spec, text = _steps(_project(tmp_path, files))
    assert kind == expected_kind
    assert [(s.name, s.run.strip()) for s in spec.steps] == expected_steps
    # Nothing is configured on this "host": no step is allowed the network, and a fetching
    # step carries a commented placeholder to fill in.
    assert all(s.network is None for s in spec.steps)
    if any(s.name in ("deps", "fetch") for s in spec.steps) or name == "python":
        assert re.search(
            r'^\s*# network: \{allow: \["[a-z.]+\.example\.internal:443"\]\}', text, re.M
        )


def test_the_configure_script_runs_directly_when_executable(tmp_path: Path) -> None:
    proj = _project(tmp_path, {"configure": "#!/bin/sh\n"})
    (proj / "configure").chmod(0o755)
    _, spec, _ = _steps(proj)
    assert spec.steps[0].run == "./configure --prefix=/usr"


def test_a_configure_script_wins_over_its_makefile_and_others_are_noted(tmp_path: Path) -> None:
    proj = _project(tmp_path, {"configure": "", "Makefile": "all:\n", "package.json": "{}"})
    kind, _, text = _steps(proj)
    assert kind == "autotools (configure)"
    assert "# also found: Makefile, package.json;" in text


def test_cargo_vendored_and_crate_name(tmp_path: Path) -> None:
    files = {
        "Cargo.toml": '[package]\nname = "hello"\n',
        ".cargo/config.toml": '[source.crates-io]\nreplace-with = "vendored-sources"\n',
        "vendor/.keep": "",
    }
    kind, spec, text = _steps(_project(tmp_path, files))
    assert kind == "Cargo (Cargo.toml, vendored)"
    assert [s.name for s in spec.steps] == ["build", "test"]
    assert '# outputs: ["target/release/hello"]' in text
    assert "commit a Cargo.lock" in text


# --- the network allowlist from this host's clients ----------------------------------------


def test_pip_index_from_the_environment_becomes_the_allowlist(tmp_path: Path) -> None:
    proj = _project(tmp_path, {"pyproject.toml": "[project]\nname = 'x'\n"})
    env = {"PIP_INDEX_URL": "https://pypi.example.internal/simple"}
    _, spec, text = _steps(proj, env)
    (step,) = spec.steps
    assert step.run == "python3 -m pip wheel --no-deps -w dist ."
    assert step.network is not None and step.network.allow == ["pypi.example.internal:443"]
    assert step.env == {"PIP_INDEX_URL": "https://pypi.example.internal/simple"}
    assert "# index-url, from PIP_INDEX_URL" in text


def test_pip_conf_in_a_home_becomes_the_allowlist(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".config/pip").mkdir(parents=True)
    (home / ".config/pip/pip.conf").write_text(
        "[global]\nindex-url = https://pypi.example.internal/simple\n"
        "extra-index-url = https://extra.example.internal:8443/simple\n"
    )
    proj = _project(tmp_path, {"pyproject.toml": ""})
    _, spec, _ = _steps(proj, {"HOME": str(home)})
    (step,) = spec.steps
    assert step.network is not None
    assert step.network.allow == ["pypi.example.internal:443", "extra.example.internal:8443"]
    assert step.env["PIP_EXTRA_INDEX_URL"] == "https://extra.example.internal:8443/simple"


def test_an_index_url_with_credentials_is_left_out_and_noted(tmp_path: Path) -> None:
    proj = _project(tmp_path, {"pyproject.toml": ""})
    env = {"PIP_INDEX_URL": "https://deploy:tok3n-Xy9@pypi.example.internal/simple?k=v"}
    _, spec, text = _steps(proj, env)
    assert "tok3n" not in text and "deploy" not in text and "k=v" not in text
    (step,) = spec.steps
    assert "PIP_INDEX_URL" not in step.env  # the cell gets it as a secret, not from the spec
    assert step.network is not None and step.network.allow == ["pypi.example.internal:443"]
    assert "carries credentials, left out" in text
    assert "--secret pip-index-url=env:PIP_INDEX_URL" in text


def test_npm_registry_from_the_environment_and_a_home_npmrc(tmp_path: Path) -> None:
    proj = _project(tmp_path, {"package.json": "{}", "package-lock.json": "{}"})
    env = {"NPM_CONFIG_REGISTRY": "https://npm.example.internal/"}
    _, spec, _ = _steps(proj, env)
    deps = spec.steps[0]
    assert deps.network is not None and deps.network.allow == ["npm.example.internal:443"]
    assert deps.env == {"npm_config_registry": "https://npm.example.internal/"}

    home = tmp_path / "home"
    home.mkdir()
    (home / ".npmrc").write_text(
        "registry=https://u:p4ss@npm.example.internal:8443/\n//npm.example.internal/:_authToken=T0K\n"
    )
    _, spec, text = _steps(proj, {"HOME": str(home)})
    deps = spec.steps[0]
    assert deps.network is not None and deps.network.allow == ["npm.example.internal:8443"]
    assert "p4ss" not in text and "T0K" not in text
    assert "carries credentials, left out" in text


def test_the_projects_npmrc_is_used_but_not_through_a_symlink(tmp_path: Path) -> None:
    proj = _project(tmp_path, {"package.json": "{}", "package-lock.json": "{}"})
    (proj / ".npmrc").write_text("registry=https://npm.example.internal/\n")
    _, spec, _ = _steps(proj)
    deps = spec.steps[0]
    assert deps.network is not None and deps.network.allow == ["npm.example.internal:443"]
    assert deps.env == {}  # the cell reads the project's .npmrc itself

    # A checkout's .npmrc that links to a file of this host (here one naming an internal
    # host) is not read: init would otherwise put that host's settings in the spec.
    outside = _project(tmp_path, {"npmrc": "registry=https://private.example.internal/\n"}, "host")
    (proj / ".npmrc").unlink()
    (proj / ".npmrc").symlink_to(outside / "npmrc")
    _, spec, text = _steps(proj)
    assert spec.steps[0].network is None
    assert "private.example.internal" not in text


def test_hostile_project_files_stay_comments(tmp_path: Path) -> None:
    """Names and settings from the checkout cannot end a comment line of the spec."""
    proj = _project(tmp_path, {"package.json": "{}", "package-lock.json": "{}"})
    breaks = "\x85\u2028\u2029\r\x0b"
    (proj / ".npmrc").write_bytes(
        f"@a{breaks}steps: []:registry=https://npm.example.internal/\n".encode()
    )
    _, spec, _ = _steps(proj)
    assert [s.name for s in spec.steps] == ["deps", "build"]
    (proj / ".npmrc").unlink()
    for c in breaks:
        assert _safe(f"x{c}y") == "x?y"


def test_huge_and_special_project_files(tmp_path: Path) -> None:
    proj = _project(tmp_path, {})
    proj.mkdir()
    os.mkfifo(proj / "Makefile")  # reading it would block: it is not a regular file
    kind, _, _ = _steps(proj)
    assert kind == "generic"
    (proj / "Makefile").unlink()
    with (proj / "Makefile").open("w") as f:
        f.write("all:\n\tcc x.c\n")
        f.write("# " + "x" * (4 << 20) + "\n")  # larger than what is read
        f.write("test:\n\t./x\n")
    _, spec, _ = _steps(proj)
    assert [s.run for s in spec.steps] == ["make -j2"]  # `test:` is past the cap


def test_names_from_any_directory_load(tmp_path: Path) -> None:
    for name in ("Café Crème", "-._x", "é", "a" * 100):
        proj = tmp_path / name
        proj.mkdir()
        _, spec, _ = _steps(proj)
        assert re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,62}", spec.name)
