"""``buildcell init``: a commented starter spec, recognizing the kind of project.

The project's files are looked at (never run): autotools (``configure``, or
``configure.ac`` for ``autoreconf``), CMake, a Makefile, Cargo, Go modules, a Python
``pyproject.toml``, npm with or without a lockfile. A step that fetches dependencies gets
a network allowlist read from this host's client configuration (pip's index, npm's
registry, the go command's proxy: :mod:`buildcell.build.registries`), each entry
commented with where it came from; where nothing is configured, the allowlist is a
commented placeholder to fill in. The written spec loads as it is.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from buildcell.build import registries

__all__ = ["starter_spec"]

_HEADER = """\
# buildcell.yaml — a declarative build, run by `buildcell build`.
# Each step runs with `/bin/sh -e -c` in its own fresh cell: read-only root, no network
# unless the step says `network: {{allow: [HOST, HOST:PORT, "*.DOMAIN"]}}`; /workspace
# holds a copy of this directory and carries over from step to step.
# Editors can validate this file against `buildcell schema`.
{notes}version: 1
name: {name}
rootfs: host          # or {{dir: PATH}} or {{oci: PATH, digest: "sha256:..."}}
{env}# inputs:             # fetched on the host and verified before any step runs
#   - url: https://example.org/dep-1.0.tar.gz
#     sha256: <64 hex digits>
#     path: vendor/dep-1.0.tar.gz   # read-only inside /workspace
limits: {{memory: 2GiB, pids: 512, cpus: 2, timeout: 30m}}
"""

_MAX_READ = 1 << 20  # of a file looked at to recognize the project
# Where a fetching step leaves what the next steps build from: inside /workspace (a cell's
# home is a fresh tmpfs per step), in a directory `./...` patterns and outputs skip.
_FETCHED = "/workspace/.buildcell"


@dataclass(frozen=True)
class _Project:
    """The project directory as the starter sees it, and this host's client settings."""

    directory: Path
    client_env: Mapping[str, str]
    system_root: Path

    def read(self, name: str) -> str | None:
        """The start of a regular file of the project (never through a symlink out of it)."""
        found = self.file(name)
        return None if found is None else found[0]

    def file(self, name: str) -> tuple[str, int] | None:
        """(the start of the file ``name``, its mode), or None if it is not a regular file
        inside the project."""
        from buildcell import confined

        try:
            with confined.opened_root(self.directory, what="the project directory") as root:
                fd, st = confined.open_file(root, name, what=name)
        except confined.UnsafePathError:
            return None
        try:
            return os.read(fd, _MAX_READ).decode(errors="replace"), st.st_mode
        finally:
            os.close(fd)

    def has(self, name: str) -> bool:
        return self.file(name) is not None

    def has_dir(self, name: str) -> bool:
        from buildcell import confined

        try:
            with confined.opened_root(self.directory, what="the project directory") as root:
                os.close(confined.open_dir(root, name, what=name))
        except confined.UnsafePathError:
            return False
        return True


@dataclass(frozen=True)
class _Step:
    name: str
    run: str
    comments: tuple[str, ...] = ()
    env: tuple[tuple[str, str, str], ...] = ()  # (name, value, comment)
    allow: tuple[tuple[str, str], ...] = ()  # (entry, where it came from)
    commented: tuple[str, ...] = ()  # lines written commented out, after the rest


@dataclass(frozen=True)
class _Plan:
    kind: str
    steps: tuple[_Step, ...]
    outputs: str  # the outputs line, commented or not
    env: tuple[tuple[str, str, str], ...] = ()
    notes: tuple[str, ...] = field(default=())


# --- rendering ---------------------------------------------------------------------------


def _safe(text: str) -> str:
    """One line of a comment: no character can end it or hide what follows.

    YAML 1.1 (PyYAML) also ends a line at NEL, LINE SEPARATOR and PARAGRAPH SEPARATOR;
    every character Python does not call printable is replaced.
    """
    return "".join(c if c.isprintable() else "?" for c in text)


def _quoted(value: str) -> str:
    """A YAML double-quoted scalar (JSON's escapes are YAML's)."""
    return json.dumps(value)


def _env_lines(env: Sequence[tuple[str, str, str]], indent: str) -> list[str]:
    lines = [f"{indent}env:"]
    for name, value, comment in env:
        line = f"{indent}  {name}: {_quoted(value)}"
        lines.append(f"{line}   # {_safe(comment)}" if comment else line)
    return lines


def _render_step(step: _Step) -> list[str]:
    lines = [f"  - name: {step.name}"]
    lines += [f"    # {_safe(c)}" if c else "    #" for c in step.comments]
    if "\n" in step.run:
        lines.append("    run: |")
        lines += [f"      {line}" for line in step.run.splitlines()]
    else:
        lines.append(f"    run: {step.run}")
    if step.env:
        lines += _env_lines(step.env, "    ")
    if step.allow:
        lines += ["    network:", "      allow:"]
        lines += [f"        - {_quoted(e)}   # {_safe(where)}" for e, where in step.allow]
    lines += [f"    # {_safe(c)}" for c in step.commented]
    return lines


def _render(plan: _Plan, name: str) -> str:
    notes = "".join(f"# {_safe(n)}\n" for n in plan.notes)
    env = "\n".join(_env_lines(plan.env, "")) + "\n" if plan.env else '# env: {CFLAGS: "-O2"}\n'
    lines = ["steps:"]
    for step in plan.steps:
        lines += _render_step(step)
    return (
        _HEADER.format(name=name, notes=notes, env=env)
        + "\n".join(lines)
        + "\n"
        + plan.outputs
        + "\n"
    )


def _name(directory: Path) -> str:
    """A spec name from the directory's: ASCII letters, digits, ``._-``, at most 63."""
    raw = "".join(
        c if (c.isascii() and c.isalnum()) or c in "._-" else "-" for c in directory.name.lower()
    )
    return raw.strip("-._")[:63].rstrip("-._") or "project"


def _allow(sources: Sequence[registries.Source]) -> tuple[tuple[str, str], ...]:
    """Allowlist entries, each once, commented with the settings that need them."""
    where: dict[str, list[str]] = {}
    for source in sources:
        where.setdefault(source.allow, []).append(f"{source.setting}, from {source.origin}")
    return tuple((entry, "; ".join(dict.fromkeys(w))) for entry, w in where.items())


def _placeholder(example: str, what: str) -> tuple[str, ...]:
    """A commented allowlist to fill in, for a source this host does not configure."""
    return (f"network: {{allow: [{_quoted(example)}]}}   # {what}: HOST:PORT",)


# --- the kinds ---------------------------------------------------------------------------


def _make_targets(text: str) -> set[str]:
    targets = set()
    for line in text.splitlines():
        head, sep, _ = line.partition(":")
        if sep and head and not line.startswith(("\t", " ", "#", ".")) and "=" not in head:
            targets.update(head.split())
    return targets


def _makefile(project: _Project) -> _Plan | None:
    makefile = project.read("Makefile")
    if makefile is None:
        return None
    targets = _make_targets(makefile)
    steps = [_Step("build", "make -j2")]
    for check in ("check", "test"):
        if check in targets:
            steps.append(_Step(check, f"make {check}"))
            break
    return _Plan("Makefile", tuple(steps), '# outputs: ["build/*"]')


def _autotools(project: _Project) -> _Plan | None:
    configure = project.file("configure")
    steps: list[_Step] = []
    if configure is None:
        if not (project.has("configure.ac") or project.has("configure.in")):
            return None
        steps.append(
            _Step(
                "autoreconf",
                "autoreconf -fi",
                (
                    "generates ./configure; the rootfs must provide autoconf, automake (and",
                    "libtool, if the project uses it)",
                ),
            )
        )
        kind = "autotools (configure.ac)"
        run = "./configure --prefix=/usr"
    else:
        kind = "autotools (configure)"
        # Run by sh when the checkout lost its executable bit.
        run = (
            "./configure --prefix=/usr" if configure[1] & 0o111 else "sh ./configure --prefix=/usr"
        )
    steps += [
        _Step("configure", run),
        _Step("build", "make -j2"),
        _Step(
            "check",
            "make check",
            commented=(
                "then, to publish what `make install` installs (outputs: dist/**):",
                "- name: install",
                "  run: make install DESTDIR=/workspace/dist",
            ),
        ),
    ]
    return _Plan(kind, tuple(steps), '# outputs: ["dist/**"]')


def _cmake(project: _Project) -> _Plan | None:
    if not project.has("CMakeLists.txt"):
        return None
    steps = (
        _Step(
            "configure",
            "cmake -S . -B build -DCMAKE_BUILD_TYPE=Release",
            (
                "FetchContent or ExternalProject downloads need network: {allow: [...]} here;",
                "better, pin them as inputs (see above) and point FETCHCONTENT_SOURCE_DIR_*",
                "at them",
            ),
        ),
        _Step("build", "cmake --build build -j2"),
        _Step(
            "test",
            "ctest --test-dir build --output-on-failure",
            commented=(
                "then, to publish what the install rules install (outputs: dist/**):",
                "- name: install",
                "  run: cmake --install build --prefix /workspace/dist",
            ),
        ),
    )
    return _Plan("CMake (CMakeLists.txt)", steps, '# outputs: ["dist/**"]')


def _toml(project: _Project, name: str) -> dict[str, object]:
    text = project.read(name)
    try:
        return tomllib.loads(text) if text is not None else {}
    except tomllib.TOMLDecodeError:
        return {}


def _cargo(project: _Project) -> _Plan | None:
    if not project.has("Cargo.toml"):
        return None
    package = _toml(project, "Cargo.toml").get("package")
    crate = package.get("name") if isinstance(package, dict) else None
    locked = " --locked" if project.has("Cargo.lock") else ""
    config = (project.read(".cargo/config.toml") or "") + (project.read(".cargo/config") or "")
    vendored = project.has_dir("vendor") and "vendored-sources" in config
    steps: list[_Step] = []
    if not vendored:
        steps.append(
            _Step(
                "fetch",
                f"cargo fetch{locked}",
                (
                    "downloads the crates into CARGO_HOME; the other steps build offline",
                    "cargo's registry is not read from this host: give its HOST:PORT (and its",
                    "source replacement in a .cargo/config.toml of this project), or vendor the",
                    "crates (cargo vendor) and run buildcell init again",
                ),
                commented=_placeholder("crates.example.internal:443", "cargo's registry"),
            )
        )
    comments: tuple[str, ...] = ("the rootfs must provide cargo and rustc",)
    if not locked:
        comments += ("commit a Cargo.lock (cargo generate-lockfile) so the build is pinned",)
    steps += [
        _Step("build", f"cargo build --release{locked} --offline", comments),
        _Step("test", f"cargo test --release{locked} --offline"),
    ]
    output = (
        f"target/release/{crate}"
        if isinstance(crate, str) and crate.isprintable()
        else "target/release/*"
    )
    env = (("CARGO_HOME", f"{_FETCHED}/cargo", "crates fetched once, kept in /workspace"),)
    kind = "Cargo (Cargo.toml, vendored)" if vendored else "Cargo (Cargo.toml)"
    return _Plan(kind, tuple(steps), f"# outputs: [{_quoted(output)}]", env)


def _go(project: _Project) -> _Plan | None:
    gomod = project.read("go.mod")
    if gomod is None:
        return None
    env = [("GOTOOLCHAIN", "local", "use the rootfs's go; never download another")]
    steps: list[_Step] = []
    if project.has("vendor/modules.txt"):
        kind = "Go modules (go.mod, vendored)"
        env += [("GOFLAGS", "-mod=vendor", ""), ("GOPROXY", "off", "")]
    else:
        kind = "Go modules (go.mod)"
        env += [
            ("GOMODCACHE", f"{_FETCHED}/gomod", "modules downloaded once, kept in /workspace"),
            ("GOFLAGS", "-modcacherw", "a module cache the cell can remove"),
            ("GOPROXY", "off", "only the deps step downloads"),
        ]
        if re.search(r"^\s*require\b", gomod, re.MULTILINE):
            steps.append(_go_deps(project))
    build = _Step("build", "go build -o bin/ ./...", ("the rootfs must provide go",))
    steps += [build, _Step("test", "go test ./...")]
    return _Plan(kind, tuple(steps), '# outputs: ["bin/*"]', tuple(env))


def _go_deps(project: _Project) -> _Step:
    found = registries.go_sources(project.client_env)
    comments: tuple[str, ...] = (
        "downloads the modules go.sum pins; the other steps build offline",
    )
    comments += tuple(found.notes)
    if not found.found:
        return _Step(
            "deps",
            "go mod download",
            comments,
            commented=(
                "no module proxy is configured on this host (GOPROXY): give the step yours",
                'env: {GOPROXY: "https://goproxy.example.internal"}   # your module proxy',
                *_placeholder("goproxy.example.internal:443", "your module proxy"),
            ),
        )
    proxies = [s for s in found.found if not s.credentials]
    comments += tuple(
        f"{s.url} ({s.origin}) carries credentials, left out: bind GOPROXY as a secret "
        "(secrets: [{name: goproxy, env: GOPROXY}])"
        for s in found.found
        if s.credentials
    )
    env = (
        (("GOPROXY", ",".join(s.url for s in proxies), f"from {proxies[0].origin}"),)
        if proxies
        else ()
    )
    return _Step("deps", "go mod download", comments, env, _allow(found.found))


def _python(project: _Project) -> _Plan | None:
    if not project.has("pyproject.toml"):
        return None
    found = registries.pip_sources(project.client_env, system_root=project.system_root)
    notes = tuple(f"pip on this host: {n}" for n in found.notes)
    if not found.found:
        step = _Step(
            "wheel",
            "python3 -m pip wheel --no-deps --no-build-isolation -w dist .",
            ("the rootfs must provide pip and the build backend (no network in a cell)", *notes),
            commented=(
                "this host's pip names no index; to let pip fetch the build backend instead,",
                "drop --no-build-isolation and give the step your index:",
                'env: {PIP_INDEX_URL: "https://pypi.example.internal/simple"}   # your index',
                *_placeholder("pypi.example.internal:443", "your index"),
            ),
        )
        return _Plan("Python (pyproject.toml)", (step,), 'outputs: ["dist/*.whl"]')
    comments = [
        "pip builds in an isolated environment, fetching the build backend from the",
        "index this host's pip uses; a cell has no pip.conf, so the step's env names it",
        *notes,
    ]
    env: list[tuple[str, str, str]] = []
    for setting, variable in (
        ("index-url", "PIP_INDEX_URL"),
        ("extra-index-url", "PIP_EXTRA_INDEX_URL"),
        ("find-links", "PIP_FIND_LINKS"),
    ):
        sources = found.by_setting(setting)
        plain = [s for s in sources if not s.credentials]
        if plain:
            origins = ", ".join(dict.fromkeys(s.origin for s in plain))
            env.append((variable, " ".join(s.url for s in plain), f"from {origins}"))
        if len(plain) < len(sources):
            secret = variable.lower().translate({ord("_"): "-"})
            comments += [
                f"this host's {setting} carries credentials, left out: bind it as a secret,",
                f"secrets: [{{name: {secret}, env: {variable}}}], and run",
                f"buildcell build --secret {secret}=env:{variable}",
            ]
    if not found.by_setting("index-url"):
        comments += [
            "this host's pip uses its default index besides these: add its HOST:PORT, or set",
            "PIP_INDEX_URL to one of them",
        ]
    step = _Step(
        "wheel",
        "python3 -m pip wheel --no-deps -w dist .",
        tuple(comments),
        tuple(env),
        _allow(found.found),
    )
    return _Plan("Python (pyproject.toml)", (step,), 'outputs: ["dist/*.whl"]')


def _npm(project: _Project) -> _Plan | None:
    if not project.has("package.json"):
        return None
    lockfile = next(
        (n for n in ("package-lock.json", "npm-shrinkwrap.json") if project.has(n)), None
    )
    build = _Step("build", "npm run build --if-present")
    if lockfile is None:
        build = _Step(
            "build",
            build.run,
            (
                "dependencies: vendored, pinned as inputs, or fetched by `npm ci` in a step",
                "with network: commit a package-lock.json (npm install --package-lock-only)",
                "and run buildcell init again for that step",
            ),
        )
        return _Plan("npm (package.json)", (build,), '# outputs: ["dist/**"]')
    deps = _npm_deps(project, lockfile)
    return _Plan(f"npm ({lockfile})", (deps, build), '# outputs: ["dist/**"]')


def _npm_deps(project: _Project, lockfile: str) -> _Step:
    npmrc = project.read(".npmrc")
    found = registries.npm_sources(project.client_env, project_npmrc=npmrc)
    comments = [
        f"installs exactly what {lockfile} pins into node_modules; the other steps",
        "run offline. npm fetches each package's `resolved` URL: hosts there other than",
        "the registry need entries too. A registry that needs a token: bind an .npmrc as",
        "a secret and set npm_config_userconfig: /run/secrets/NAME",
        *(f"npm on this host: {n}" for n in found.notes),
    ]
    env: list[tuple[str, str, str]] = []
    main = found.by_setting("registry")
    commented: tuple[str, ...] = ()
    if not main:
        commented = (
            "this host's npm names no registry: give the step yours",
            'env: {npm_config_registry: "https://registry.example.internal/"}   # your registry',
            *_placeholder("registry.example.internal:443", "your registry"),
        )
    elif main[0].origin != ".npmrc of this project":
        # The cell sees the project's .npmrc, not this host's: the step names the registry.
        env.append(("npm_config_registry", main[0].url, f"from {main[0].origin}"))
    scoped = [
        s for s in found.found if s.setting != "registry" and s.origin != ".npmrc of this project"
    ]
    if scoped:
        comments.append(
            "scoped registries configured outside this project ("
            + ", ".join(s.setting for s in scoped)
            + ") reach a cell only from the project's .npmrc"
        )
    if any(s.credentials for s in found.found):
        comments.append("a registry URL on this host carries credentials, left out here")
    return _Step("deps", "npm ci", tuple(comments), tuple(env), _allow(found.found), commented)


def _generic(project: _Project) -> _Plan:
    step = _Step("build", "echo 'replace me with your build commands'\n")
    return _Plan("generic", (step,), '# outputs: ["dist/**"]')


# In order of preference: a project with a configure script or CMakeLists.txt has a
# Makefile only as a build product or a wrapper; a Makefile is the project's own entry
# point before the language's package manager.
_KINDS: tuple[tuple[str, Callable[[_Project], _Plan | None]], ...] = (
    ("configure", _autotools),
    ("CMakeLists.txt", _cmake),
    ("Makefile", _makefile),
    ("Cargo.toml", _cargo),
    ("go.mod", _go),
    ("pyproject.toml", _python),
    ("package.json", _npm),
)


def starter_spec(
    directory: Path,
    *,
    environ: Mapping[str, str] | None = None,
    system_root: Path = Path("/"),
) -> tuple[str, str]:
    """Return (the spec text, the kind of project recognized).

    Args:
        directory: the project (its files are read confined beneath it, never run).
        environ: the environment this host's package clients see (``HOME``, ``PIP_*``,
            ``npm_config_*``, ``GOPROXY``, ...); none by default.
        system_root: where system-wide client files (``/etc/pip.conf``) are looked up.
    """
    project = _Project(directory, environ or {}, system_root)
    plan: _Plan | None = None
    others: list[str] = []
    for marker, recognize in _KINDS:
        if plan is None:
            plan = recognize(project)
        elif project.has(marker) or (marker == "configure" and project.has("configure.ac")):
            others.append(marker)
    plan = plan or _generic(project)
    if others:
        plan = _Plan(
            plan.kind,
            plan.steps,
            plan.outputs,
            plan.env,
            (f"also found: {', '.join(others)}; these steps build the {plan.kind} project",),
        )
    return _render(plan, _name(directory)), plan.kind
