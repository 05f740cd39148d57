"""The operator's configuration file: every setting, and errors that name the file's line."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from buildcell.errors import ConfigError
from buildcell.settings import (
    DEFAULT_CACHE_MAX_AGE,
    DEFAULT_CACHE_MAX_SIZE,
    DEFAULT_IMAGE_MAX_SIZE,
    DEFAULT_LOG_MAX_SIZE,
    DEFAULT_MEMORY,
    DEFAULT_OUTPUT_MAX_SIZE,
    DEFAULT_PIDS,
    DefaultLimits,
    Settings,
    load_settings,
)

GiB = 1 << 30
MiB = 1 << 20


def config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def error_of(tmp_path: Path, text: str) -> ConfigError:
    path = config(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert "\n" not in info.value.message
    assert info.value.exit_code == 125
    return info.value


FULL = """\
    # every setting there is
    policy: policy.yaml
    caches:
      max_size: 3GiB
      max_age: 48h
    fetch:
      allow: [mirror.internal:8080]
    network:
      allow: ["10.0.0.5:3128", "*.corp.example"]
    rootfs:
      allow: [/srv/rootfs, images]
    limits:
      memory: 4GiB
      pids: 1024
      cpus: 1.5
      disk: 10GiB
      timeout: 2h
    logs:
      max_size: 8MiB
    outputs:
      max_size: 1GiB
    images:
      max_size: 2GiB
    """


def test_every_setting(tmp_path: Path) -> None:
    path = config(tmp_path, FULL)
    assert load_settings(path) == Settings(
        path=path,
        policy=(tmp_path / "policy.yaml").absolute(),
        cache_max_size=3 * GiB,
        cache_max_age=48 * 3600.0,
        fetch_allow=("mirror.internal:8080",),
        network_allow=("10.0.0.5:3128", "*.corp.example"),
        rootfs_dirs=(Path("/srv/rootfs"), (tmp_path / "images").absolute()),
        limits=DefaultLimits(memory=4 * GiB, pids=1024, cpus=1.5, disk=10 * GiB, timeout=7200.0),
        log_max_size=8 * MiB,
        output_max_size=1 * GiB,
        image_max_size=2 * GiB,
    )


@pytest.mark.parametrize("text", ["", "# nothing yet\n", "---\n", "~\n"])
def test_an_empty_file_is_the_defaults(tmp_path: Path, text: str) -> None:
    path = config(tmp_path, text)
    assert load_settings(path) == Settings(path=path)


def test_defaults() -> None:
    defaults = Settings()
    assert (defaults.path, defaults.policy) == (None, None)
    assert defaults.cache_max_size == DEFAULT_CACHE_MAX_SIZE
    assert defaults.cache_max_age == DEFAULT_CACHE_MAX_AGE
    assert defaults.limits == DefaultLimits(memory=DEFAULT_MEMORY, pids=DEFAULT_PIDS)
    assert defaults.log_max_size == DEFAULT_LOG_MAX_SIZE
    assert defaults.output_max_size == DEFAULT_OUTPUT_MAX_SIZE
    assert defaults.image_max_size == DEFAULT_IMAGE_MAX_SIZE


def test_a_null_section_sets_nothing(tmp_path: Path) -> None:
    path = config(tmp_path, "caches:\nlimits:\nfetch:\n")
    assert load_settings(path) == Settings(path=path)


def test_numbers_are_read_as_their_units(tmp_path: Path) -> None:
    path = config(
        tmp_path, "limits: {memory: 1048576, timeout: 90, cpus: 2}\ncaches: {max_age: 60}\n"
    )
    loaded = load_settings(path)
    assert loaded.limits == DefaultLimits(memory=MiB, pids=DEFAULT_PIDS, cpus=2.0, timeout=90.0)
    assert loaded.cache_max_age == 60.0


def test_the_file_is_found_by_environment_and_explicit_files_must_exist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = config(tmp_path, "logs: {max_size: 1MiB}\n")
    monkeypatch.setenv("BUILDCELL_CONFIG", str(path))
    assert load_settings().log_max_size == MiB
    monkeypatch.setenv("BUILDCELL_CONFIG", str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match=r"configuration file .*missing\.yaml does not exist"):
        load_settings()
    monkeypatch.delenv("BUILDCELL_CONFIG")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    if os.geteuid() != 0:  # root's default is /etc/buildcell/config.yaml
        assert load_settings() == Settings()  # a missing default file is no configuration


def test_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"policy: caf\xe9\n")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_settings(path)


# --- errors name the line -------------------------------------------------------------------

ERRORS = {
    # values of every setting
    "policy empty": ("policy:\n", 1, "policy: expected the path of a policy file"),
    "policy blank": ("policy: '  '\n", 1, "policy: expected the path of a policy file"),
    "policy a list": ("policy: [a]\n", 1, "policy: expected the path of a policy file"),
    "caches.max_size": (
        "caches:\n  max_age: 1h\n  max_size: lots\n",
        3,
        "caches.max_size: invalid caches 'lots'",
    ),
    "caches.max_age": ("caches:\n  max_age: soon\n", 2, "caches.max_age: invalid caches.max_age"),
    "fetch.allow not a list": ("fetch:\n  allow: mirror\n", 2, "fetch.allow: expected a list"),
    "fetch.allow empty entry": (
        "fetch:\n  allow:\n    - mirror.internal\n    - ''\n",
        4,
        "fetch.allow: expected a list of strings",
    ),
    "fetch.allow bad entry": (
        "fetch:\n  allow:\n    - mirror.internal\n    - http://x\n",
        4,
        "fetch.allow: invalid allow entry 'http://x'",
    ),
    "network.allow bad entry": (
        "network:\n  allow: ['a.example', 'a b']\n",
        2,
        "network.allow: invalid allow entry",
    ),
    "network.allow a number": ("network:\n  allow: [80]\n", 2, "network.allow: expected a list"),
    "rootfs.allow": (
        "rootfs:\n  allow: [/srv, null]\n",
        2,
        "rootfs.allow: expected a list of strings",
    ),
    "limits.memory": ("limits:\n  memory: lots\n", 2, "limits.memory: invalid memory 'lots'"),
    "limits.memory empty": (
        "limits:\n  memory:\n",
        2,
        "limits.memory: expected a value such as 8GiB",
    ),
    "limits.pids": ("limits:\n  pids: 0\n", 2, "limits.pids: invalid pids '0'"),
    "limits.pids word": ("limits: {pids: many}\n", 1, "limits.pids: invalid pids 'many'"),
    "limits.cpus": ("limits:\n  cpus: fast\n", 2, "limits.cpus: invalid cpus"),
    "limits.disk": ("\nlimits:\n  disk: -1G\n", 3, "limits.disk: invalid disk"),
    "limits.timeout": ("limits:\n  timeout: forever\n", 2, "limits.timeout: invalid timeout"),
    "limits.timeout a boolean": (
        "limits:\n  timeout: no\n",
        2,
        "limits.timeout: expected a value such as 2h",
    ),
    "logs.max_size": (
        "logs:\n  max_size: [1]\n",
        2,
        "logs.max_size: expected a value such as 2GiB",
    ),
    "outputs.max_size": ("outputs:\n  max_size: huge\n", 2, "outputs.max_size: invalid outputs"),
    "images.max_size": (
        "images:\n  max_size: true\n",
        2,
        "images.max_size: expected a value such as 2GiB",
    ),
    "images.max_size a date": (
        "images:\n  max_size: 2024-01-01\n",
        2,
        "images.max_size: invalid images",
    ),
    # shapes and keys
    "not a mapping": ("- policy\n", 1, "expected a mapping of settings"),
    "a scalar": ("\npolicy.yaml\n", 2, "expected a mapping of settings"),
    "section not a mapping": (
        "caches: [1]\n",
        1,
        "caches: expected a mapping with max_size, max_age",
    ),
    "section a string": ("\n\nlimits: 8GiB\n", 3, "limits: expected a mapping with memory, pids"),
    "unknown setting": (
        "caches: {}\npolcy: p.yaml\n",
        2,
        "unknown setting 'polcy' (did you mean 'policy'?)",
    ),
    "unrelated setting": ("colour: red\n", 1, "unknown setting 'colour'"),
    "unknown key in a section": (
        "caches:\n  max_age: 1h\n  max_sise: 1G\n",
        3,
        "caches: unknown setting 'max_sise' (did you mean 'max_size'?)",
    ),
    # YAML itself
    "duplicate setting": (
        "policy: a.yaml\nlogs: {}\npolicy: b.yaml\n",
        3,
        "policy: duplicate key 'policy' (first at line 1)",
    ),
    "duplicate key in a section": (
        "limits:\n  memory: 1G\n  memory: 2G\n",
        3,
        "limits.memory: duplicate key 'memory' (first at line 2)",
    ),
    "not YAML": ("policy: a: b\n", 1, "invalid YAML: mapping values are not allowed here"),
    "unclosed": ("fetch:\n  allow: [a\n", 3, "invalid YAML: expected ',' or ']'"),
    "a tab": ("caches:\n\tmax_size: 1G\n", 2, "invalid YAML:"),
    "a merge key": (
        "base: &b {max_size: 1G}\ncaches:\n  <<: *b\n",
        3,
        "caches: merge keys ('<<') are not supported in the configuration file",
    ),
    "a merge key in a section": (
        "caches:\n  <<: {max_size: 1G}\n",
        2,
        "caches: merge keys ('<<') are not supported in the configuration file",
    ),
    "a tag": ("rootfs:\n  allow: !!set {/srv: null}\n", 2, "rootfs.allow: unsupported YAML tag"),
    "a python tag": ("policy: !!python/name:os.system\n", 1, "policy: unsupported YAML tag"),
    "an integer key": ("1: x\n", 1, "mapping key '1' is read by YAML as an integer"),
    "a control character": ("policy: \x07\n", 1, "invalid YAML: unacceptable character #x0007"),
}


@pytest.mark.parametrize(("text", "line", "expected"), ERRORS.values(), ids=ERRORS.keys())
def test_errors_name_the_file_line_and_setting(
    tmp_path: Path, text: str, line: int, expected: str
) -> None:
    error = error_of(tmp_path, text)
    prefix = f"{tmp_path / 'config.yaml'}:{line}: "
    assert error.message.startswith(prefix), error.message
    assert error.message[len(prefix) :].startswith(expected), error.message


def test_unknown_settings_hint_at_the_known_ones(tmp_path: Path) -> None:
    assert error_of(tmp_path, "polcy: x\n").hint == (
        "known settings: policy, caches, fetch, network, rootfs, limits, logs, outputs, images, "
        "records"
    )
    assert error_of(tmp_path, "limits: {swap: 1G}\n").hint == (
        "limits has memory, pids, cpus, disk, timeout"
    )


def test_the_first_unknown_setting_in_the_file_is_named(tmp_path: Path) -> None:
    error = error_of(tmp_path, "zeta: 1\nalpha: 2\n")
    assert error.message.endswith(":1: unknown setting 'zeta'")


def test_allowlist_errors_keep_their_hint(tmp_path: Path) -> None:
    error = error_of(tmp_path, "network:\n  allow: [http://x]\n")
    assert error.hint is not None


def test_errors_are_chained(tmp_path: Path) -> None:
    assert error_of(tmp_path, "a: [\n").__cause__ is not None
    assert error_of(tmp_path, "limits: {memory: lots}\n").__cause__ is not None


def test_reading_settings_does_not_import_yaml_without_a_file() -> None:
    code = (
        "import sys, buildcell.settings as s; from pathlib import Path; "
        "assert 'yaml' not in sys.modules, 'yaml imported'"
    )
    subprocess.run([sys.executable, "-W", "error", "-c", code], check=True, timeout=60)


TOKENS = [*"{}[]-:#&*<!'\"\n ", "policy", "caches", "max_size", "limits", "pids", "1G", "  "]


def _outcome(path: Path) -> str:
    try:
        loaded = load_settings(path)
    except ConfigError as e:
        return e.message
    assert loaded.path == path
    return ""


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=30).map("".join) | st.text())
def test_any_file_gives_settings_or_a_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    message = _outcome(path)
    assert "\n" not in message
    assert not message or message.startswith((str(path), "configuration file"))


def test_what_gc_keeps(tmp_path: Path) -> None:
    from buildcell.settings import (
        DEFAULT_IMAGE_MAX_AGE,
        DEFAULT_RECORDS_KEEP,
        DEFAULT_RECORDS_MAX_AGE,
    )

    defaults = Settings()
    assert defaults.records_max_age == DEFAULT_RECORDS_MAX_AGE == 30 * 86400
    assert defaults.records_keep == DEFAULT_RECORDS_KEEP == 200
    assert defaults.image_max_age == DEFAULT_IMAGE_MAX_AGE == 30 * 86400
    path = config(
        tmp_path,
        """\
        images: {max_size: 1GiB, max_age: 48h}
        records:
          max_age: 90m
          keep: 0
        """,
    )
    got = load_settings(path)
    assert (got.image_max_age, got.records_max_age, got.records_keep) == (48 * 3600, 5400, 0)
    assert got.image_max_size == GiB


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("records: {keep: -1}\n", ":1: records.keep: invalid records.keep '-1'"),
        ("records: {keep: many}\n", "expected a whole number such as 200"),
        ("records: {max_age: soon}\n", ":1: records.max_age: invalid records.max_age 'soon'"),
        ("images: {max_age: 0}\n", "images.max_age: invalid images.max_age '0'"),
        ("records: {kept: 3}\n", "records: unknown setting 'kept' (did you mean 'keep'?)"),
    ],
)
def test_what_gc_keeps_is_checked(tmp_path: Path, text: str, words: str) -> None:
    assert words in error_of(tmp_path, text).message
