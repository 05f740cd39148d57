"""The build spec: models, and errors that name the file, the line and the field."""

from __future__ import annotations

import hashlib
import json
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from buildcell.build.spec import (
    BuildSpec,
    DirRootfsSpec,
    HostRootfsSpec,
    InputSpec,
    LimitsSpec,
    LoadedSpec,
    OciRootfsSpec,
    StepSpec,
    load_spec,
    parse_spec,
    spec_json_schema,
)
from buildcell.cell.config import Limits
from buildcell.errors import SpecError

HEX = "9a93b2b7dfdac77ceba5a558a580e74667dd6fede4585b91eefb60f03b72df23"
GiB = 1024**3

EXAMPLE = f"""\
version: 1
name: hello
rootfs: host                  # or {{dir: PATH}} or {{oci: PATH, digest: "sha256:..."}}
env: {{CFLAGS: "-O2"}}
inputs:                       # fetched on the host, verified, read-only inside
  - url: https://example.org/zlib-1.3.1.tar.gz
    sha256: {HEX}
    path: vendor/zlib.tar.gz  # relative to /workspace
  - file: ../assets/logo.png  # local file (relative to the spec's directory), also pinned
    sha256: {HEX}
    path: assets/logo.png
limits: {{memory: 2GiB, pids: 512, cpus: 2, disk: 4GiB, timeout: 30m}}
steps:
  - name: configure
    run: ./configure --prefix=/usr
  - name: compile
    run: |
      make -j2
      make check
    limits: {{timeout: 10m}}
    env: {{V: "1"}}
outputs: ["dist/*.tar.gz", "build/hello"]
source_date_epoch: 1700000000   # optional
"""

# Five lines; whatever a test appends starts on line 6.
MINIMAL = """\
version: 1
name: hello
steps:
  - name: build
    run: make
"""

SPEC_PATH = Path("buildcell.yaml")


def parse(text: str) -> BuildSpec:
    return parse_spec(text, path=SPEC_PATH).spec


# --- valid specs ----------------------------------------------------------------------------


def test_example_parses_to_the_expected_models() -> None:
    spec = parse(EXAMPLE)
    assert spec == BuildSpec(
        version=1,
        name="hello",
        rootfs=HostRootfsSpec(),
        env={"CFLAGS": "-O2"},
        inputs=[
            InputSpec(
                url="https://example.org/zlib-1.3.1.tar.gz", sha256=HEX, path="vendor/zlib.tar.gz"
            ),
            InputSpec(file="../assets/logo.png", sha256=HEX, path="assets/logo.png"),
        ],
        limits=LimitsSpec(memory=2 * GiB, pids=512, cpus=2.0, disk=4 * GiB, timeout=1800.0),
        steps=[
            StepSpec(name="configure", run="./configure --prefix=/usr"),
            StepSpec(
                name="compile",
                run="make -j2\nmake check\n",
                limits=LimitsSpec(timeout=600.0),
                env={"V": "1"},
            ),
        ],
        outputs=["dist/*.tar.gz", "build/hello"],
        source_date_epoch=1700000000,
    )


def test_minimal_spec_gets_the_defaults() -> None:
    spec = parse(MINIMAL)
    assert spec.rootfs == HostRootfsSpec()
    assert spec.env == {}
    assert spec.inputs == []
    assert spec.limits == LimitsSpec()
    assert spec.outputs == []
    assert spec.source_date_epoch is None
    assert spec.steps == [StepSpec(name="build", run="make")]


def test_flow_style_and_json_are_specs_too() -> None:
    text = json.dumps({"version": 1, "name": "x", "steps": [{"name": "a", "run": "true"}]})
    assert parse(text).name == "x"


@pytest.mark.parametrize(
    ("rootfs", "expected"),
    [
        ("host", HostRootfsSpec()),
        ("{dir: /srv/rootfs}", DirRootfsSpec(dir="/srv/rootfs")),
        (
            f'{{oci: images/debian, digest: "sha256:{HEX.upper()}"}}',
            OciRootfsSpec(oci="images/debian", digest=f"sha256:{HEX}"),
        ),
    ],
)
def test_rootfs_forms(rootfs: str, expected: object) -> None:
    assert parse(MINIMAL + f"rootfs: {rootfs}\n").rootfs == expected


def test_host_rootfs_dumps_as_the_word_host() -> None:
    assert parse(MINIMAL).model_dump()["rootfs"] == "host"


def test_input_sha256_is_lowercased_and_path_normalized() -> None:
    spec = parse(
        MINIMAL + f"inputs:\n  - {{url: 'https://x.org/a', sha256: {HEX.upper()}, path: ./a//b/}}\n"
    )
    assert spec.inputs[0].sha256 == HEX
    assert spec.inputs[0].path == "a/b"


def test_yaml_merge_keys_and_anchors_work() -> None:
    text = textwrap.dedent("""\
        version: 1
        name: hello
        limits: &base {memory: 1G, timeout: 5m}
        steps:
          - name: build
            run: make
            limits: {<<: *base, timeout: 1m}
        """)
    assert parse(text).steps[0].limits == LimitsSpec(memory=GiB, timeout=60.0)


def test_timestamps_and_special_scalars_stay_strings() -> None:
    spec = parse(MINIMAL + "env: {DAY: 2024-01-01, EQ: =, MERGE: '<<'}\n")
    assert spec.env == {"DAY": "2024-01-01", "EQ": "=", "MERGE": "<<"}


def test_limits_accept_numbers_and_strings() -> None:
    assert LimitsSpec(memory=4096, pids="64", cpus="0.5", disk="1kB", timeout=90) == LimitsSpec(
        memory=4096, pids=64, cpus=0.5, disk=1000, timeout=90.0
    )


# --- limits, inputs --------------------------------------------------------------------------


def test_limits_merged_lets_set_fields_of_the_override_win() -> None:
    base = LimitsSpec(memory=GiB, pids=100, timeout=60)
    override = LimitsSpec(timeout=10, cpus=1)
    assert base.merged(override) == LimitsSpec(memory=GiB, pids=100, cpus=1.0, timeout=10.0)
    assert base.merged(None) is base
    assert base.merged(LimitsSpec()) == base


def test_step_limits_merge_the_build_limits_with_the_step() -> None:
    spec = parse(EXAMPLE)
    assert spec.step_limits(spec.steps[0]) == spec.limits
    assert spec.step_limits(spec.steps[1]) == LimitsSpec(
        memory=2 * GiB, pids=512, cpus=2.0, disk=4 * GiB, timeout=600.0
    )


def test_a_step_s_limits_become_a_cell_s() -> None:
    from buildcell.build.runner import cell_limits

    spec = parse(EXAMPLE)
    assert cell_limits(spec.step_limits(spec.steps[1])) == Limits(
        memory=2 * GiB, pids=512, cpus=2.0, disk=4 * GiB, timeout=600.0
    )
    assert cell_limits(LimitsSpec()) == Limits()


def test_uri(tmp_path: Path) -> None:
    spec = parse(EXAMPLE)
    project = tmp_path / "project"
    assert spec.inputs[0].uri(project) == "https://example.org/zlib-1.3.1.tar.gz"
    assert spec.inputs[1].uri(project) == f"file://{tmp_path}/assets/logo.png"
    spaced = InputSpec(file="a b/c.tar", sha256=HEX, path="a")
    assert spaced.uri(project) == f"file://{project}/a%20b/c.tar"


@pytest.mark.parametrize("name", ["/etc/shadow", "/srv/a b.tar", "//x"])
def test_a_file_input_is_never_an_absolute_host_path(name: str) -> None:
    # A spec is the repository's: it names files inside its own directory only.
    with pytest.raises(ValidationError, match="relative to the spec's directory"):
        InputSpec(file=name, sha256=HEX, path="a")


# --- loading, digest -----------------------------------------------------------------------


def test_load_spec_keeps_text_and_digest_of_the_exact_bytes(tmp_path: Path) -> None:
    data = EXAMPLE.replace("\n", "\r\n").encode()
    path = tmp_path / "buildcell.yaml"
    path.write_bytes(data)
    loaded = load_spec(path)
    assert isinstance(loaded, LoadedSpec)
    assert loaded.digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert loaded.text.encode() == data
    assert loaded.path == path
    assert loaded.spec == parse(EXAMPLE)


def test_parse_spec_digest_is_of_the_utf8_text() -> None:
    text = MINIMAL + "env: {GREETING: héllo}\n"
    loaded = parse_spec(text, path=SPEC_PATH)
    assert loaded.digest == "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    assert loaded.text == text
    assert parse_spec(text + "\n", path=SPEC_PATH).digest != loaded.digest


def test_load_spec_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"^cannot read .*nope\.yaml'?: No such file"):
        load_spec(tmp_path / "nope.yaml")
    with pytest.raises(SpecError, match=r"^cannot read"):
        load_spec(tmp_path)


def test_load_spec_too_large(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_bytes(MINIMAL.encode() + b"#" * (1 << 20))
    with pytest.raises(SpecError, match="larger than 1 MiB"):
        load_spec(path)
    with pytest.raises(SpecError, match="larger than 1 MiB"):
        parse_spec(MINIMAL + "#" * (1 << 20), path=SPEC_PATH)


def test_load_spec_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "buildcell.yaml"
    path.write_bytes(MINIMAL.encode() + b"env: {A: \xff}\n")
    with pytest.raises(SpecError, match=r"buildcell\.yaml:6: not UTF-8"):
        load_spec(path)


def details(error: SpecError) -> tuple[str, ...]:
    value = getattr(error, "details", None)
    assert isinstance(value, tuple)
    return value


def test_several_errors_are_all_reported_in_file_order() -> None:
    text = MINIMAL + "limits: {timeout: soon, memory: lots}\nsource_date_epoch: -1\n"
    with pytest.raises(SpecError) as info:
        parse(text)
    assert info.value.message.startswith("buildcell.yaml:6: limits.timeout: invalid duration")
    assert details(info.value) == (
        "buildcell.yaml:6: limits.memory: invalid size 'lots': expected a number with an "
        "optional unit (K, M, G, T; KiB/MiB/GiB; kB/MB/GB), such as 512M or 2GiB",
        "buildcell.yaml:7: source_date_epoch: expected 0 or more, got -1",
    )
    assert info.value.hint is None


def test_a_single_error_has_no_hint_and_no_details() -> None:
    with pytest.raises(SpecError) as info:
        parse(MINIMAL + "limits: {timeout: soon}\n")
    assert info.value.hint is None
    assert details(info.value) == ()


def test_errors_across_the_spec_each_name_their_line_and_field() -> None:
    text = textwrap.dedent(f"""\
        version: 1
        name: Hello World
        colour: red
        inputs:
          - url: ftp://example.org/a.tgz
            sha256: {HEX[:10]}
            path: /abs
        steps:
          - nmae: build
            run: make
          - name: test
            run: ''
            limits: {{pids: many}}
        outputs: [../x]
        """)
    with pytest.raises(SpecError) as info:
        parse(text)
    lines = (info.value.message, *details(info.value))
    assert [line.split(": ")[:2] for line in lines] == [
        ["buildcell.yaml:2", "name"],
        ["buildcell.yaml:3", "colour"],
        ["buildcell.yaml:5", "inputs[0].url"],
        ["buildcell.yaml:6", "inputs[0].sha256"],
        ["buildcell.yaml:7", "inputs[0].path"],
        # The misspelt key is one error, not also "'name' is missing".
        ["buildcell.yaml:9", "steps[0].nmae"],
        ["buildcell.yaml:12", "steps[1].run"],
        ["buildcell.yaml:13", "steps[1].limits.pids"],
        ["buildcell.yaml:14", "outputs[0]"],
    ]
    assert "unknown field (did you mean 'name'?)" in lines[5]
    for line in lines:
        assert "\n" not in line


def test_a_missing_field_is_reported_where_its_mapping_starts() -> None:
    text = "version: 1\nname: x\nsteps:\n  - {name: A, run: make}\n  - name: b\n    env: {V: 1}\n"
    with pytest.raises(SpecError) as info:
        parse(text)
    assert [info.value.message, *details(info.value)] == [
        "buildcell.yaml:4: steps[0].name: invalid name 'A': expected 1 to 63 lowercase letters, "
        "digits, '.', '_' or '-', starting with a letter or digit",
        "buildcell.yaml:5: steps[1].run: required field is missing",
        'buildcell.yaml:6: steps[1].env.V: expected a string, got an integer; write "1" in quotes',
    ]


def test_a_missing_field_comes_after_the_other_errors_at_the_same_place() -> None:
    with pytest.raises(SpecError) as info:
        parse("version: 1\nname: x\nsteps:\n  - nam: a\n")
    assert [info.value.message, *details(info.value)] == [
        "buildcell.yaml:4: steps[0].nam: unknown field (did you mean 'name'?)",
        "buildcell.yaml:4: steps[0].run: required field is missing",
    ]


def test_a_yaml_error_is_one_error() -> None:
    with pytest.raises(SpecError) as info:
        parse(MINIMAL + "name: again\nlimits: {timeout: soon}\n")
    assert info.value.message == "buildcell.yaml:6: name: duplicate key 'name' (first at line 2)"
    assert getattr(info.value, "details", ()) == ()


def test_very_many_errors_are_counted_after_a_hundred() -> None:
    steps = "".join(f"  - {{name: 'S{i}', run: make}}\n" for i in range(150))
    with pytest.raises(SpecError) as info:
        parse("version: 1\nname: x\nsteps:\n" + steps)
    lines = (info.value.message, *details(info.value))
    assert len(lines) == 100
    assert lines[0].startswith("buildcell.yaml:4: steps[0].name: invalid name 'S0'")
    assert lines[98].startswith("buildcell.yaml:102: steps[98].name: invalid name 'S98'")
    assert lines[99] == "buildcell.yaml: and 51 more errors"


# --- invalid specs: line and message --------------------------------------------------------


def _step(extra: str) -> str:
    """MINIMAL with ``extra`` (indented lines) added to its step, from line 6."""
    return MINIMAL + textwrap.indent(extra, "    ")


def _input(body: str) -> str:
    """MINIMAL with one input whose mapping body starts on line 7."""
    return MINIMAL + "inputs:\n  - " + textwrap.indent(body, "    ").lstrip()


GOOD_INPUT = f"url: https://example.org/a.tgz\nsha256: {HEX}\npath: a.tgz\n"

INVALID = [
    # units
    pytest.param(
        MINIMAL + "limits: {memory: lots}\n", 6, "limits.memory: invalid size 'lots'", id="size"
    ),
    pytest.param(
        MINIMAL + "limits: {disk: 1.5}\n", 6, "limits.disk: invalid size 1.5", id="size-float"
    ),
    pytest.param(
        MINIMAL + f"limits: {{disk: {'9' * 400}T}}\n",
        6,
        "limits.disk: invalid size",
        id="size-overflow",
    ),
    pytest.param(
        _step("limits: {timeout: ten minutes}\n"),
        6,
        "steps[0].limits.timeout: invalid duration 'ten minutes': expected seconds or a "
        "duration such as 90s, 5m, 1h30m",
        id="duration",
    ),
    pytest.param(
        MINIMAL + "limits: {timeout: [1]}\n",
        6,
        "limits.timeout: invalid duration",
        id="duration-list",
    ),
    pytest.param(
        MINIMAL + "limits:\n  pids: -1\n",
        7,
        "limits.pids: invalid pids -1: must be greater than zero",
        id="negative-pids",
    ),
    pytest.param(
        MINIMAL + "limits: {pids: many}\n", 6, "limits.pids: invalid pids 'many'", id="pids-word"
    ),
    pytest.param(
        MINIMAL + "limits: {cpus: 0}\n",
        6,
        "limits.cpus: invalid cpus 0: must be greater than zero",
        id="zero-cpus",
    ),
    pytest.param(
        MINIMAL + "limits: {cpus: true}\n", 6, "limits.cpus: invalid cpus True", id="cpus-bool"
    ),
    pytest.param(
        MINIMAL + "limits: {swap: 1G}\n", 6, "limits.swap: unknown field", id="limits-unknown"
    ),
    pytest.param(
        MINIMAL + "limits: 2G\n",
        6,
        "limits: expected a mapping such as {memory: 2GiB",
        id="limits-scalar",
    ),
    # names and steps
    pytest.param(
        MINIMAL.replace("name: build", "name: Build Step"),
        4,
        "steps[0].name: invalid name 'Build Step': expected 1 to 63 lowercase letters",
        id="step-name",
    ),
    pytest.param(
        MINIMAL.replace("name: build", "name: " + "a" * 64),
        4,
        "steps[0].name: invalid name",
        id="step-name-long",
    ),
    pytest.param(
        MINIMAL.replace("name: hello", "name: -x"), 2, "name: invalid name '-x'", id="build-name"
    ),
    pytest.param(
        MINIMAL.replace("name: hello", "name: yes"),
        2,
        'name: expected a string, got a boolean; write "yes" in quotes',
        id="name-yes",
    ),
    pytest.param(
        MINIMAL + "  - name: test\n    run: make check\n  - name: build\n    run: make install\n",
        8,
        "steps[2].name: duplicate step name 'build' (also steps[0])",
        id="duplicate-step-names",
    ),
    pytest.param(
        _step("run2: x\n"),
        6,
        "steps[0].run2: unknown field (did you mean 'run'?)",
        id="step-unknown",
    ),
    pytest.param(
        MINIMAL.replace("  - name: build", "  - nmae: build"),
        4,
        "steps[0].nmae: unknown field (did you mean 'name'?)",
        id="unknown-nested-with-suggestion",
    ),
    pytest.param(
        MINIMAL.replace("run: make", "run: ''"),
        5,
        "steps[0].run: must not be empty",
        id="empty-run",
    ),
    pytest.param(
        MINIMAL.replace("    run: make\n", ""),
        4,
        "steps[0].run: required field is missing",
        id="missing-run",
    ),
    pytest.param(
        MINIMAL.replace("run: make", 'run: "make\\0"'),
        5,
        "steps[0].run: must not contain a NUL character",
        id="nul-in-run",
    ),
    pytest.param(
        MINIMAL + "  - make\n",
        6,
        "steps[1]: expected a mapping such as {name: NAME, run: COMMAND}, got a string",
        id="step-not-mapping",
    ),
    pytest.param(
        "version: 1\nname: hello\n", 1, "steps: required field is missing", id="missing-steps"
    ),
    pytest.param(
        "version: 1\nname: hello\nsteps: []\n",
        3,
        "steps: expected at least one step",
        id="empty-steps",
    ),
    pytest.param(
        "version: 1\nname: hello\nsteps: make\n",
        3,
        "steps: expected a list, got a string",
        id="steps-string",
    ),
    # inputs
    pytest.param(
        MINIMAL + f"inputs:\n  - {{url: 'https://a.org/x', sha256: {HEX}, path: vendor/x}}\n"
        f"  - {{url: 'https://b.org/x', sha256: {HEX}, path: vendor//x}}\n",
        8,
        "inputs[1].path: duplicate input path 'vendor/x' (also inputs[0])",
        id="duplicate-input-paths",
    ),
    pytest.param(
        MINIMAL + f"inputs:\n  - {{url: 'https://a.org/x', sha256: {HEX}, path: vendor/x/y}}\n"
        f"  - {{url: 'https://b.org/x', sha256: {HEX}, path: vendor}}\n",
        8,
        "inputs[1].path: input path 'vendor' and inputs[0].path are nested",
        id="nested-input-paths",
    ),
    pytest.param(
        MINIMAL + f"inputs:\n  - {{url: 'https://a.org/x', sha256: {HEX}, path: vendor}}\n"
        f"  - {{url: 'https://b.org/x', sha256: {HEX}, path: vendor/x}}\n",
        8,
        "inputs[1].path: input path 'vendor/x' and inputs[0].path are nested",
        id="nested-input-paths-2",
    ),
    pytest.param(
        _input("file: a.tgz\n" + GOOD_INPUT),
        7,
        "inputs[0]: expected exactly one of url and file, got both",
        id="input-url-and-file",
    ),
    pytest.param(
        _input(f"sha256: {HEX}\npath: a.tgz\n"),
        7,
        "inputs[0]: expected exactly one of url and file, got neither",
        id="input-neither",
    ),
    pytest.param(
        _input(GOOD_INPUT.replace(HEX, HEX[:-1])),
        8,
        "inputs[0].sha256: invalid sha256 '9a93",
        id="short-sha256",
    ),
    pytest.param(
        _input(GOOD_INPUT.replace(HEX, "z" * 64)),
        8,
        "expected 64 hexadecimal digits",
        id="sha256-not-hex",
    ),
    pytest.param(
        _input(GOOD_INPUT.replace(HEX, "sha256:" + HEX)),
        8,
        "without 'sha256:'",
        id="sha256-with-prefix",
    ),
    pytest.param(
        _input(GOOD_INPUT.replace("path: a.tgz", "path: a/../../etc/x")),
        9,
        "inputs[0].path: invalid path 'a/../../etc/x': '..' is not allowed",
        id="dotdot-input-path",
    ),
    pytest.param(
        _input(GOOD_INPUT.replace("path: a.tgz", "path: /etc/passwd")),
        9,
        "inputs[0].path: invalid path '/etc/passwd': expected a path relative to /workspace",
        id="absolute-input-path",
    ),
    pytest.param(
        _input(GOOD_INPUT.replace("path: a.tgz", "path: ./")),
        9,
        "not /workspace",
        id="dot-input-path",
    ),
    pytest.param(
        _input(GOOD_INPUT.replace("path: a.tgz", "path: ''")),
        9,
        "inputs[0].path: must not be empty",
        id="empty-input-path",
    ),
    pytest.param(
        _input(GOOD_INPUT.replace("https://", "ftp://")),
        7,
        "inputs[0].url: unsupported URL scheme 'ftp': expected an http:// or https:// URL",
        id="ftp-url",
    ),
    pytest.param(
        _input(GOOD_INPUT.replace("https://", "https://user:pw@")),
        7,
        "inputs[0].url: the URL must not contain credentials",
        id="url-credentials",
    ),
    pytest.param(
        _input(GOOD_INPUT.replace("https://example.org/a.tgz", "example.org/a.tgz")),
        7,
        "inputs[0].url: invalid URL 'example.org/a.tgz'",
        id="url-no-scheme",
    ),
    pytest.param(
        _input(GOOD_INPUT.replace("path: a.tgz", "path: a.tgz\nmode: 644")),
        10,
        "inputs[0].mode: unknown field; expected one of url, file, sha256, path",
        id="input-unknown",
    ),
    # rootfs
    pytest.param(
        "version: 1\nname: x\nrootfs: docker\nsteps: [{name: a, run: b}]\n",
        3,
        "rootfs: expected 'host', {dir: PATH} or {oci: PATH, digest: \"sha256:...\"}",
        id="rootfs-word",
    ),
    pytest.param(
        MINIMAL + "rootfs: [host]\n", 6, "rootfs: expected 'host', {dir: PATH}", id="rootfs-list"
    ),
    pytest.param(
        MINIMAL + "rootfs: {}\n", 6, "rootfs: expected 'host', {dir: PATH}", id="rootfs-empty"
    ),
    pytest.param(
        MINIMAL + "rootfs: {dir: a, oci: b}\n",
        6,
        "rootfs: expected 'host', {dir: PATH}",
        id="rootfs-both",
    ),
    pytest.param(
        MINIMAL + "rootfs: dir:/srv\n", 6, "rootfs: expected 'host'", id="rootfs-cli-syntax"
    ),
    pytest.param(
        MINIMAL + "rootfs: {dir: ''}\n", 6, "rootfs.dir: must not be empty", id="rootfs-dir-empty"
    ),
    pytest.param(
        MINIMAL + "rootfs: {dir: /srv, ro: true}\n",
        6,
        "rootfs.ro: unknown field; expected one of dir",
        id="rootfs-dir-unknown",
    ),
    pytest.param(
        MINIMAL + "rootfs:\n  oci: img\n  digest: sha256:abc\n",
        8,
        "rootfs.digest: invalid digest 'sha256:abc': expected 'sha256:' followed by 64 hexadecimal digits",
        id="bad-oci-digest",
    ),
    pytest.param(
        MINIMAL + f"rootfs: {{oci: img, digest: {HEX}}}\n",
        6,
        "rootfs.digest: invalid digest",
        id="digest-no-prefix",
    ),
    pytest.param(
        MINIMAL + "rootfs: {oci: img}\n",
        6,
        "rootfs.digest: required field is missing",
        id="oci-no-digest",
    ),
    # top level
    pytest.param(
        MINIMAL + "colour: red\n",
        6,
        "colour: unknown field; expected one of version, name, rootfs",
        id="unknown-top-level",
    ),
    pytest.param(
        MINIMAL + "output: [a]\n",
        6,
        "output: unknown field (did you mean 'outputs'?)",
        id="unknown-top-level-suggestion",
    ),
    pytest.param(
        MINIMAL.replace("version: 1", "version: 2"),
        1,
        "version: unsupported version 2; this buildcell reads version 1",
        id="wrong-version",
    ),
    pytest.param(
        MINIMAL.replace("version: 1", "version: '1'"),
        1,
        "version: invalid version '1'",
        id="version-string",
    ),
    pytest.param(
        MINIMAL.replace("version: 1\n", ""),
        1,
        "version: required field is missing; add 'version: 1'",
        id="missing-version",
    ),
    pytest.param(
        "- version: 1\n",
        1,
        "expected a mapping with version, name and steps, got a list",
        id="top-level-list",
    ),
    pytest.param(
        "# just a comment\nhello\n",
        2,
        "expected a mapping with version, name and steps, got a string",
        id="top-level-string",
    ),
    pytest.param("", 1, "empty spec", id="empty-file"),
    pytest.param("# nothing\n", 1, "empty spec", id="only-comments"),
    pytest.param("---\n", 1, "empty spec", id="empty-document"),
    pytest.param(
        "version: 1\nname: a: b\n",
        2,
        "invalid YAML: mapping values are not allowed here",
        id="yaml-syntax",
    ),
    pytest.param(
        "version: 1\nname: [x\nsteps: []\n",
        3,
        "invalid YAML: expected ',' or ']'",
        id="yaml-unclosed",
    ),
    pytest.param("version: 1\n\tname: x\n", 2, "invalid YAML:", id="yaml-tab"),
    pytest.param(
        "version: 1\nname: \x07\n",
        2,
        "invalid YAML: unacceptable character #x0007",
        id="yaml-control-char",
    ),
    pytest.param(
        "a: 1\n---\nb: 2\n",
        2,
        "invalid YAML: expected a single document in the stream at line 1, but found another document",
        id="two-documents",
    ),
    pytest.param(
        MINIMAL + "name: again\n",
        6,
        "name: duplicate key 'name' (first at line 2)",
        id="duplicate-key",
    ),
    pytest.param(
        _step("env:\n  A: x\n  A: y\n"),
        8,
        "steps[0].env.A: duplicate key 'A' (first at line 7)",
        id="duplicate-nested-key",
    ),
    pytest.param(
        MINIMAL + "1: x\n",
        6,
        "mapping key '1' is read by YAML as an integer; keys must be strings",
        id="int-key",
    ),
    pytest.param(
        MINIMAL + "env: {on: x}\n",
        6,
        "env: mapping key 'on' is read by YAML as a boolean",
        id="bool-key",
    ),
    pytest.param(
        MINIMAL + "? [a]\n: x\n",
        6,
        "mapping keys must be strings, not lists or mappings",
        id="list-key",
    ),
    pytest.param(MINIMAL + "env: !!set {A: null}\n", 6, "env: unsupported YAML tag", id="set-tag"),
    pytest.param(
        MINIMAL + "name2: !!python/object/apply:os.system [ls]\n",
        6,
        "name2: unsupported YAML tag",
        id="python-tag",
    ),
    pytest.param(
        MINIMAL + "source_date_epoch: !!int twelve\n",
        6,
        "source_date_epoch: invalid integer 'twelve'",
        id="bad-int-tag",
    ),
    pytest.param(
        MINIMAL + "env: {A: !custom x}\n",
        6,
        "env.A: unsupported YAML tag '!custom'",
        id="custom-tag",
    ),
    pytest.param(
        MINIMAL + "limits: &a {<<: *a}\n",
        6,
        "an alias refers to a collection that contains it",
        id="recursive-merge",
    ),
    pytest.param(
        MINIMAL + "env: &a [*a]\n",
        6,
        "an alias refers to a collection that contains it",
        id="recursive-alias",
    ),
    pytest.param(
        MINIMAL + "limits: {<<: 1}\n",
        6,
        "a merge key '<<' takes a mapping or a list of mappings",
        id="bad-merge",
    ),
    pytest.param(
        MINIMAL + 'env: {A: "\\ud800"}\n',
        6,
        "env.A: a string contains an unpaired surrogate",
        id="surrogate",
    ),
    # env
    pytest.param(
        MINIMAL + "env: {1BAD: x}\n",
        6,
        "env['1BAD']: invalid environment variable name '1BAD'",
        id="env-key-digit",
    ),
    pytest.param(
        _step("env: {A-B: x}\n"),
        6,
        "steps[0].env['A-B']: invalid environment variable name",
        id="env-key-dash",
    ),
    pytest.param(
        MINIMAL + "env: {V: 1}\n",
        6,
        'env.V: expected a string, got an integer; write "1" in quotes',
        id="env-value-int",
    ),
    pytest.param(
        MINIMAL + "env: {V: }\n", 6, "env.V: expected a string, got null", id="env-value-null"
    ),
    pytest.param(MINIMAL + "env: [A=1]\n", 6, "env: expected a mapping, got a list", id="env-list"),
    # outputs, source_date_epoch
    pytest.param(
        MINIMAL + "outputs: [/etc/passwd]\n",
        6,
        "outputs[0]: invalid output '/etc/passwd'",
        id="output-absolute",
    ),
    pytest.param(
        MINIMAL + "outputs:\n  - dist/*\n  - ../x\n",
        8,
        "outputs[1]: invalid output '../x': '..' is not allowed",
        id="output-dotdot",
    ),
    pytest.param(
        MINIMAL + "outputs: ['']\n", 6, "outputs[0]: must not be empty", id="output-empty"
    ),
    pytest.param(
        MINIMAL + "outputs: dist/*\n",
        6,
        "outputs: expected a list, got a string",
        id="outputs-string",
    ),
    pytest.param(
        MINIMAL + "source_date_epoch: -1\n",
        6,
        "source_date_epoch: expected 0 or more, got -1",
        id="sde-negative",
    ),
    pytest.param(
        MINIMAL + "source_date_epoch: '1700000000'\n",
        6,
        "source_date_epoch: expected a whole number, got a string",
        id="sde-string",
    ),
    pytest.param(
        MINIMAL + "source_date_epoch: 1.5\n",
        6,
        "source_date_epoch: expected a whole number, got a number",
        id="sde-float",
    ),
]


@pytest.mark.parametrize(("text", "line", "expected"), INVALID)
def test_invalid_specs_name_the_line_and_field(text: str, line: int, expected: str) -> None:
    with pytest.raises(SpecError) as info:
        parse(text)
    message = info.value.message
    assert message.startswith(f"buildcell.yaml:{line}: "), message
    assert expected in message, message
    assert "\n" not in message
    assert str(info.value) == message
    assert info.value.exit_code == 125


def test_billion_laughs_is_bounded() -> None:
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for n in range(1, 9):
        prev = chr(ord("a") + n - 1)
        cur = chr(ord("a") + n)
        lines.append(f"{cur}: &{cur} [{', '.join(['*' + prev] * 10)}]")
    with pytest.raises(SpecError, match="expands to more than 100000 YAML nodes"):
        parse("\n".join(lines) + "\n")


def test_deep_nesting_is_an_error_not_a_crash() -> None:
    with pytest.raises(SpecError, match=r"invalid YAML|nested"):
        parse("[" * 100_000)
    with pytest.raises(SpecError, match="nested more than 64 levels"):
        parse(MINIMAL + "env: " + "[" * 70 + "]" * 70 + "\n")


def test_messages_quote_odd_keys_and_stay_on_one_line() -> None:
    with pytest.raises(SpecError) as info:
        parse(MINIMAL + 'env: {"A\\nB": x}\n')
    assert info.value.message.startswith("buildcell.yaml:6: env['A\\nB']: invalid environment")
    with pytest.raises(SpecError) as info:
        parse_spec(MINIMAL + "x: 1\n", path=Path("odd\nname.yaml"))
    assert "\n" not in info.value.message


def test_errors_are_chained_for_debugging() -> None:
    with pytest.raises(SpecError) as info:
        parse(MINIMAL + "limits: {timeout: soon}\n")
    assert info.value.__cause__ is not None


# --- the JSON Schema ------------------------------------------------------------------------


def _schema_ok(value: Any, schema: dict[str, Any], root: dict[str, Any]) -> bool:  # noqa: C901 -- one check per keyword, read top to bottom
    """A small JSON Schema validator for the keywords the spec schema uses."""
    if "$ref" in schema:
        name = schema["$ref"].removeprefix("#/$defs/")
        if not _schema_ok(value, root["$defs"][name], root):
            return False
    types = {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "null": lambda v: v is None,
    }
    if "type" in schema and not types[schema["type"]](value):
        return False
    if "const" in schema and (value != schema["const"] or type(value) is not type(schema["const"])):
        return False
    if "pattern" in schema and not re.search(schema["pattern"], value):
        return False
    if "minLength" in schema and len(value) < schema["minLength"]:
        return False
    if "minimum" in schema and value < schema["minimum"]:
        return False
    if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
        return False
    if "minItems" in schema and len(value) < schema["minItems"]:
        return False
    if "items" in schema and not all(_schema_ok(v, schema["items"], root) for v in value):
        return False
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        if any(key not in value for key in schema.get("required", [])):
            return False
        for key, item in value.items():
            if key in properties:
                if not _schema_ok(item, properties[key], root):
                    return False
            else:
                extra = schema.get("additionalProperties", True)
                if extra is False or (
                    isinstance(extra, dict) and not _schema_ok(item, extra, root)
                ):
                    return False
            if "propertyNames" in schema and not _schema_ok(key, schema["propertyNames"], root):
                return False
    if "anyOf" in schema and not any(_schema_ok(value, s, root) for s in schema["anyOf"]):
        return False
    return "oneOf" not in schema or sum(_schema_ok(value, s, root) for s in schema["oneOf"]) == 1


def test_json_schema_structure() -> None:
    schema = spec_json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["title"] == "buildcell.yaml"
    assert schema["description"]
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False
    assert {"version", "name", "rootfs", "env", "inputs", "limits", "steps", "outputs"} <= set(
        schema["properties"]
    )
    assert set(schema["required"]) == {"version", "name", "steps"}
    assert schema["properties"]["steps"]["minItems"] == 1
    assert schema["properties"]["rootfs"]["default"] == "host"
    for name in ("StepSpec", "InputSpec", "LimitsSpec", "DirRootfsSpec", "OciRootfsSpec"):
        assert schema["$defs"][name]["additionalProperties"] is False
    json.dumps(schema)  # serializable as it is


@pytest.mark.parametrize(
    "text",
    [
        EXAMPLE,
        MINIMAL,
        MINIMAL + "rootfs: {dir: /srv/root}\n",
        MINIMAL + f"rootfs: {{oci: img, digest: 'sha256:{HEX}'}}\n",
        MINIMAL + "limits: {memory: 512M, disk: 4096, timeout: 1h30m, cpus: '0.5', pids: '64'}\n",
    ],
)
def test_json_schema_accepts_valid_specs(text: str) -> None:
    schema = spec_json_schema()
    assert _schema_ok(yaml.safe_load(text), schema, schema)


@pytest.mark.parametrize(
    "text",
    [
        MINIMAL + "colour: red\n",
        MINIMAL.replace("version: 1", "version: 2"),
        MINIMAL.replace("  - name: build", "  - nmae: build"),
        MINIMAL + "rootfs: docker\n",
        MINIMAL + "rootfs: {oci: img, digest: sha256:abc}\n",
        MINIMAL + "limits: {timeout: ten minutes}\n",
        MINIMAL + "limits: {memory: lots}\n",
        MINIMAL + "env: {1BAD: x}\n",
        "version: 1\nname: x\nsteps: []\n",
        _input(f"sha256: {HEX}\npath: a\n"),
    ],
)
def test_json_schema_rejects_invalid_specs(text: str) -> None:
    schema = spec_json_schema()
    assert not _schema_ok(yaml.safe_load(text), schema, schema)
    with pytest.raises(SpecError):
        parse(text)


# --- any text at all ------------------------------------------------------------------------


def _parse_or_spec_error(text: str) -> None:
    try:
        result = parse_spec(text, path=SPEC_PATH)
    except SpecError as e:
        lines = (e.message, *getattr(e, "details", ()))
    else:
        assert isinstance(result, LoadedSpec)
        return
    for message in lines:
        assert message.startswith("buildcell.yaml")
        assert "\n" not in message
    assert len(set(lines)) == len(lines)
    numbers = [int(m[1]) for line in lines if (m := re.match(r"buildcell\.yaml:(\d+): ", line))]
    assert numbers == sorted(numbers)  # in file order


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)

leaf_like = st.one_of(
    json_values,
    st.sampled_from(
        ["host", "2GiB", "30m", "-1", "0", "sha256:" + HEX, HEX, "a/../b", "/abs", ".", ""]
    ),
)

step_like = st.dictionaries(
    st.sampled_from(["name", "run", "env", "limits", "nmae"]), leaf_like, max_size=4
)
spec_like = st.fixed_dictionaries(
    {"version": st.sampled_from([1, 1, 2, "1"]), "steps": st.lists(step_like, max_size=3)},
    optional={
        "name": leaf_like,
        "rootfs": leaf_like
        | st.fixed_dictionaries({"dir": leaf_like})
        | st.fixed_dictionaries({"oci": leaf_like, "digest": leaf_like}),
        "env": st.dictionaries(st.text(max_size=5), leaf_like, max_size=3),
        "inputs": st.lists(
            st.dictionaries(st.sampled_from(["url", "file", "sha256", "path"]), leaf_like),
            max_size=3,
        ),
        "limits": st.dictionaries(
            st.sampled_from(["memory", "pids", "cpus", "disk", "timeout"]), leaf_like
        ),
        "outputs": leaf_like,
        "source_date_epoch": leaf_like,
    },
)


@given(st.text())
@example("a: &a [*a]")
@example("{[: ]}")
@example("!!binary x")
@example("!!int")
@example("!!float")
@example("!!bool")
@example("? - a\n")
@example("x: !!float nan\n")
@example("version: 1\nname: x\nsteps: [{name: a, run: b, limits: {timeout: .inf, cpus: .nan}}]\n")
def test_any_text_gives_a_spec_or_a_spec_error(text: str) -> None:
    _parse_or_spec_error(text)


@given(json_values)
def test_any_yaml_value_gives_a_spec_or_a_spec_error(value: object) -> None:
    _parse_or_spec_error(yaml.safe_dump(value))


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(spec_like)
def test_spec_like_documents_give_a_spec_or_a_spec_error(value: object) -> None:
    _parse_or_spec_error(yaml.safe_dump(value))


@given(st.binary())
def test_any_bytes_on_disk_give_a_spec_or_a_spec_error(
    tmp_path_factory: pytest.TempPathFactory, data: bytes
) -> None:
    path = tmp_path_factory.mktemp("spec") / "buildcell.yaml"
    path.write_bytes(data)
    try:
        load_spec(path)
    except SpecError as e:
        message = e.message
    else:
        return
    assert "\n" not in message


@pytest.mark.parametrize("name", ["d/x.tar.gz", "x.zip", ".tar.gz", "a\0.tar.gz"])
def test_archive_name_must_be_a_tar_gz_file_name(name: str) -> None:
    text = f"version: 1\nname: a\nsteps: [{{name: s, run: x}}]\narchive: {name!r}\n"
    with pytest.raises(SpecError, match=r"b\.yaml:4: archive: "):
        parse_spec(text.replace("'", '"').replace("\0", "\\0"), path=Path("b.yaml"))


def test_archive_name() -> None:
    text = "version: 1\nname: a\nsteps: [{name: s, run: x}]\narchive: dist.tar.gz\n"
    assert parse_spec(text, path=Path("b.yaml")).spec.archive == "dist.tar.gz"


@pytest.mark.parametrize(
    ("caches", "words"),
    [
        ("[{path: /workspace/vendor, key: v}]", "caches live under /home/builder or /tmp"),
        ("[{path: /home/builder/a, key: a}, {path: /home/builder/a/b, key: b}]", "overlaps"),
        ("[{path: /home/builder/a, key: a}, {path: /tmp/a, key: a}]", "listed twice"),
        ("[{path: /home/builder/../etc, key: a}]", "normalized"),
    ],
)
def test_cache_paths_cannot_hide_each_other_or_the_workspace(caches: str, words: str) -> None:
    from buildcell.build.spec import parse_spec
    from buildcell.errors import SpecError

    text = f"version: 1\nname: x\nsteps:\n  - name: s\n    run: 'true'\n    caches: {caches}\n"
    with pytest.raises(SpecError) as info:
        parse_spec(text, path=Path("buildcell.yaml"))
    assert words in info.value.message


def test_an_output_may_be_marked_optional() -> None:
    spec = parse(MINIMAL + "outputs: ['dist/*', {path: 'cov/*', optional: true}, {path: 'x/*'}]\n")
    assert spec.output_patterns == ["dist/*", "cov/*", "x/*"]
    assert spec.optional_outputs == frozenset({"cov/*"})


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("{path: '../x'}", "outputs[0].path"),
        ("{path: 'a/*', optional: 'yes'}", "outputs[0].optional"),
        ("{path: 'a/*', optinal: true}", "optinal"),
        ("{optional: true}", "outputs[0].path"),
    ],
)
def test_a_malformed_output_entry_names_its_field(entry: str, message: str) -> None:
    with pytest.raises(SpecError, match=re.escape(message)):
        parse(MINIMAL + f"outputs: [{entry}]\n")
