"""The operator policy gate: loading CEL rules, the evaluation context, and decisions."""

from __future__ import annotations

import copy
import hashlib
import json
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from buildcell.build.policy import (
    Decision,
    Invocation,
    Policy,
    Rule,
    RuleResult,
    build_context,
    check,
    evaluate,
    load_policy,
    require_allowed,
)
from buildcell.build.spec import BuildSpec, parse_spec
from buildcell.errors import PolicyError

HEX = "9a93b2b7dfdac77ceba5a558a580e74667dd6fede4585b91eefb60f03b72df23"
GiB = 1024**3


def spec_of(text: str) -> BuildSpec:
    return parse_spec(textwrap.dedent(text), path=Path("buildcell.yaml")).spec


def write_policy(tmp_path: Path, text: str, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def policy_of(tmp_path: Path, text: str) -> Policy:
    return load_policy(write_policy(tmp_path, text))


def one_rule(tmp_path: Path, expr: str, name: str = "r") -> Policy:
    """A policy with one rule; the expression goes in single quotes, on line 3."""
    quoted = expr.replace("'", "''")
    return policy_of(tmp_path, f"version: 1\nrules:\n  - name: {name}\n    expr: '{quoted}'\n")


def by_hand(tmp_path: Path, expr: str, name: str = "r") -> Policy:
    """The policy :func:`one_rule` loads, made without loading: its names are not checked."""
    rule = Rule(name=name, expr=expr, message=f"rule {name} failed", line=3)
    return Policy(path=tmp_path / "policy.yaml", rules=(rule,), digest="sha256:by-hand")


# --- specs and invocations the table uses ---------------------------------------------------

# Pinned inputs, a pinned OCI rootfs, corporate egress only, memory under 4 GiB everywhere.
GOOD = f"""\
    version: 1
    name: app
    rootfs: {{oci: images/base, digest: "sha256:{HEX}"}}
    inputs:
      - url: https://files.corp.example/src.tar.gz
        sha256: {HEX}
        path: src.tar.gz
    limits: {{memory: 2GiB, timeout: 30m}}
    steps:
      - name: fetch
        run: pip download -r requirements.txt
        network: {{allow: [pypi.corp.example, "mirror.corp.example:8443"]}}
      - name: build
        run: make
    outputs: [dist/*]
"""
HOST_ROOTFS = GOOD.replace(f'{{oci: images/base, digest: "sha256:{HEX}"}}', "host")
PUBLIC_EGRESS = GOOD.replace("pypi.corp.example", "pypi.org")
NO_BUILD_LIMITS = GOOD.replace("limits: {memory: 2GiB, timeout: 30m}", "limits: {}")
STEP_OVER_CEILING = GOOD.replace("run: make\n", "run: make\n        limits: {memory: 8GiB}\n")
RELEASE = GOOD.replace("run: make\n", "run: make\n        secrets: [release-key]\n")
assert len({GOOD, HOST_ROOTFS, PUBLIC_EGRESS, NO_BUILD_LIMITS, STEP_OVER_CEILING, RELEASE}) == 6

UNTRUSTED = Invocation(project="app")
TRUSTED_MAIN = Invocation(project="app", ref="refs/heads/main", trust="trusted")
TRUSTED_BRANCH = Invocation(project="app", ref="refs/heads/feature", trust="trusted")
UNTRUSTED_MAIN = Invocation(project="app", ref="refs/heads/main")
UNSAFE = Invocation(project="app", unsafe=("no-seccomp",))

PINNED = """\
  - name: pinned
    expr: >-
      spec.inputs.all(i, i.sha256 != "")
      && spec.rootfs.kind == "oci" && spec.rootfs.digest != null
    message: every input and the rootfs must be pinned by digest
"""
CORP_EGRESS = """\
  - name: corp-egress
    expr: spec.egress.all(e, e.endsWith(".corp.example") || e.startsWith("mirror.corp.example"))
    message: builds may only reach corp.example
"""
MEMORY_CEILING = """\
  - name: memory-ceiling
    expr: spec.steps.all(s, s.limits.memory != null && s.limits.memory <= 4294967296)
    message: every step needs a memory limit of at most 4 GiB
"""
RELEASE_KEY = """\
  - name: release-key
    expr: >-
      !("release-key" in spec.secrets)
      || (invocation.trust == "trusted" && invocation.ref == "refs/heads/main")
    message: the release key is for trusted builds of main only
"""
NO_UNSAFE = """\
  - name: no-unsafe
    expr: size(invocation.unsafe) == 0
    message: no --unsafe-* flags
"""
ALL_RULES = PINNED + CORP_EGRESS + MEMORY_CEILING + RELEASE_KEY + NO_UNSAFE


@dataclass(frozen=True)
class Case:
    rules: str
    spec: str
    invocation: Invocation
    failed: tuple[str, ...]  # the rules expected to fail; none means allowed


CASES = {
    "pinned: oci rootfs with digest": Case(PINNED, GOOD, UNTRUSTED, ()),
    "pinned: host rootfs is not pinned": Case(PINNED, HOST_ROOTFS, UNTRUSTED, ("pinned",)),
    "egress: corporate hosts and the mirror": Case(CORP_EGRESS, GOOD, UNTRUSTED, ()),
    "egress: a public host": Case(CORP_EGRESS, PUBLIC_EGRESS, UNTRUSTED, ("corp-egress",)),
    "memory: under the ceiling": Case(MEMORY_CEILING, GOOD, UNTRUSTED, ()),
    "memory: unset": Case(MEMORY_CEILING, NO_BUILD_LIMITS, UNTRUSTED, ("memory-ceiling",)),
    "memory: a step's override over the ceiling": Case(
        MEMORY_CEILING, STEP_OVER_CEILING, UNTRUSTED, ("memory-ceiling",)
    ),
    "release key: not used": Case(RELEASE_KEY, GOOD, UNTRUSTED, ()),
    "release key: trusted main": Case(RELEASE_KEY, RELEASE, TRUSTED_MAIN, ()),
    "release key: trusted branch": Case(RELEASE_KEY, RELEASE, TRUSTED_BRANCH, ("release-key",)),
    "release key: untrusted main": Case(RELEASE_KEY, RELEASE, UNTRUSTED_MAIN, ("release-key",)),
    "release key: no ref": Case(
        RELEASE_KEY, RELEASE, Invocation(project="app", trust="trusted"), ("release-key",)
    ),
    "unsafe: none": Case(NO_UNSAFE, GOOD, UNTRUSTED, ()),
    "unsafe: --unsafe-no-seccomp": Case(NO_UNSAFE, GOOD, UNSAFE, ("no-unsafe",)),
    "all rules: a good build": Case(ALL_RULES, RELEASE, TRUSTED_MAIN, ()),
    "all rules: everything wrong at once": Case(
        ALL_RULES,
        RELEASE.replace(f'{{oci: images/base, digest: "sha256:{HEX}"}}', "host")
        .replace("pypi.corp.example", "pypi.org")
        .replace("limits: {memory: 2GiB, timeout: 30m}", "limits: {}"),
        Invocation(project="app", unsafe=("no-seccomp", "host-network")),
        ("pinned", "corp-egress", "memory-ceiling", "release-key", "no-unsafe"),
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_policy_table(tmp_path: Path, case: Case) -> None:
    policy = policy_of(tmp_path, "version: 1\nrules:\n" + case.rules)
    decision = check(policy, spec_of(case.spec), case.invocation)

    assert decision.allowed is (not case.failed)
    assert tuple(r.name for r in decision.failures) == case.failed
    assert len(decision.results) == len(policy.rules)  # every rule ran
    messages = {rule.name: rule.message for rule in policy.rules}
    for result in decision.results:
        assert result.error is None  # these rules decide; none of them raise
        assert result.message == (None if result.passed else messages[result.name])
    if case.failed:
        summary = decision.summary()
        assert summary.startswith("policy denies this build: ")
        for name in case.failed:
            assert f"{name} ({messages[name]})" in summary
    else:
        count = len(policy.rules)
        plural = "" if count == 1 else "s"
        assert decision.summary() == f"policy allows this build ({count} rule{plural} passed)"


def test_unpinned_inputs_are_denied_by_the_pinning_rule(tmp_path: Path) -> None:
    # A parsed spec always pins its inputs; the rule still guards what the context says.
    policy = policy_of(tmp_path, "version: 1\nrules:\n" + PINNED)
    context = build_context(spec_of(GOOD), UNTRUSTED)
    assert evaluate(policy, context).allowed
    unpinned = copy.deepcopy(context)
    unpinned["spec"]["inputs"][0]["sha256"] = ""
    assert [r.name for r in evaluate(policy, unpinned).failures] == ["pinned"]
    no_digest = copy.deepcopy(context)
    no_digest["spec"]["rootfs"]["digest"] = None
    assert [r.name for r in evaluate(policy, no_digest).failures] == ["pinned"]


def test_egress_rule_with_a_host_pattern(tmp_path: Path) -> None:
    policy = one_rule(
        tmp_path, r'spec.egress.all(e, e.matches("^([a-z0-9-]+[.])*corp[.]example(:[0-9]+)?$"))'
    )
    assert check(policy, spec_of(GOOD), UNTRUSTED).allowed
    assert not check(policy, spec_of(PUBLIC_EGRESS), UNTRUSTED).allowed
    evil = GOOD.replace("pypi.corp.example", "corp.example.evil.org")
    assert not check(policy, spec_of(evil), UNTRUSTED).allowed


# --- the context ----------------------------------------------------------------------------

RICH = f"""\
    version: 1
    name: rich
    rootfs: {{dir: /srv/rootfs}}
    env: {{A: build, B: build}}
    inputs:
      - url: https://example.org/a.tar.gz
        sha256: {HEX.upper()}
        path: ./vendor//a.tar.gz
      - file: ../assets/logo.png
        sha256: {HEX}
        path: logo.png
    limits: {{memory: 1GiB, pids: 256, cpus: 2, disk: 4GiB, timeout: 30m}}
    steps:
      - name: fetch
        run: fetch
        env: {{B: step}}
        secrets: [token, {{name: netrc, env: NETRC}}]
        network: {{allow: [Pypi.Org, "*.corp.example:8443", pypi.org]}}
        limits: {{memory: 2GiB, timeout: 90s}}
        caches: [{{path: /home/builder/.cache/pip, key: pip}}]
      - name: build
        run: make
        secrets: [token]
        network: {{allow: [files.corp.example]}}
    outputs: [dist/*, build/app]
"""


def test_context_shape() -> None:
    context = build_context(
        spec_of(RICH),
        Invocation(
            project="rich",
            ref="refs/tags/v1",
            trust="trusted",
            secrets=("token", "netrc"),
            unsafe=("no-seccomp",),
        ),
    )
    build_limits = {
        "memory": GiB,
        "pids": 256,
        "cpus": 2.0,
        "disk": 4 * GiB,
        "timeout": 1800.0,
    }
    assert context == {
        "spec": {
            "name": "rich",
            "rootfs": {"kind": "dir", "path": "/srv/rootfs", "digest": None},
            "inputs": [
                {
                    "url": "https://example.org/a.tar.gz",
                    "file": None,
                    "sha256": HEX,
                    "path": "vendor/a.tar.gz",
                },
                {"url": None, "file": "../assets/logo.png", "sha256": HEX, "path": "logo.png"},
            ],
            "limits": build_limits,
            "outputs": ["dist/*", "build/app"],
            "steps": [
                {
                    "name": "fetch",
                    "run": "fetch",
                    "env": {"A": "build", "B": "step"},
                    "secrets": ["token", "netrc"],
                    "network": {"allow": ["pypi.org", "*.corp.example:8443", "pypi.org"]},
                    "limits": {**build_limits, "memory": 2 * GiB, "timeout": 90.0},
                    "caches": [{"path": "/home/builder/.cache/pip", "key": "pip"}],
                },
                {
                    "name": "build",
                    "run": "make",
                    "env": {"A": "build", "B": "build"},
                    "secrets": ["token"],
                    "network": {"allow": ["files.corp.example"]},
                    "limits": build_limits,
                    "caches": [],
                },
            ],
            "egress": ["pypi.org", "*.corp.example:8443", "files.corp.example"],
            "secrets": ["token", "netrc"],
        },
        "invocation": {
            "project": "rich",
            "ref": "refs/tags/v1",
            "trust": "trusted",
            "secrets": ["token", "netrc"],
            "unsafe": ["no-seccomp"],
            "pinned_hosts": [],
            "allow": [],
            "allow_fetch": [],
            "image_budget": None,
            "cache_scope": "trusted",
        },
    }
    assert json.loads(json.dumps(context)) == context  # plain JSON data, nothing else


def test_context_defaults() -> None:
    context = build_context(
        spec_of("version: 1\nname: x\nsteps: [{name: a, run: make}]\n"), Invocation(project="x")
    )
    unset = dict.fromkeys(("memory", "pids", "cpus", "disk", "timeout"))
    assert context["spec"]["rootfs"] == {"kind": "host", "path": None, "digest": None}
    assert context["spec"]["limits"] == unset
    assert context["spec"]["steps"][0]["limits"] == unset
    assert context["spec"]["steps"][0]["network"] == {"allow": []}
    assert context["spec"]["egress"] == []
    assert context["spec"]["secrets"] == []
    assert context["invocation"] == {
        "project": "x",
        "ref": "",
        "trust": "untrusted",
        "secrets": [],
        "unsafe": [],
        "pinned_hosts": [],
        "allow": [],
        "allow_fetch": [],
        "image_budget": None,
        "cache_scope": "build",
    }


def test_oci_rootfs_in_the_context() -> None:
    rootfs = build_context(spec_of(GOOD), UNTRUSTED)["spec"]["rootfs"]
    assert rootfs == {"kind": "oci", "path": "images/base", "digest": f"sha256:{HEX}"}


@pytest.mark.parametrize(
    ("expr", "allowed"),
    [
        ("spec.limits.cpus == 2.0", True),
        ("spec.limits.cpus <= 2", True),
        ("spec.steps[0].limits.timeout < 100.0", True),
        ('spec.steps.all(s, has(s.env.A) && s.env.A == "build")', True),
        ('spec.steps.exists(s, "netrc" in s.secrets)', True),
        ('spec.steps.all(s, s.caches.all(c, c.path.startsWith("/home/builder/")))', True),
        ('spec.inputs.exists(i, i.file != null && i.file.startsWith(".."))', True),
        ('invocation.secrets.all(n, n in spec.secrets) && "token" in invocation.secrets', True),
        ('spec.egress.exists(e, e.startsWith("*."))', False),
    ],
)
def test_rules_over_the_context(tmp_path: Path, expr: str, allowed: bool) -> None:
    spec = spec_of(RICH.replace('"*.corp.example:8443", ', ""))
    invocation = Invocation(project="rich", secrets=("token", "netrc"))
    assert check(one_rule(tmp_path, expr), spec, invocation).allowed is allowed


def test_invocation_refuses_an_unknown_trust_level() -> None:
    with pytest.raises(ValueError, match="trust"):
        Invocation(project="x", trust="sometimes")  # type: ignore[arg-type]


# --- loading --------------------------------------------------------------------------------


def test_load_policy(tmp_path: Path) -> None:
    path = write_policy(
        tmp_path,
        """\
        # the operator's rules
        version: 1
        rules:
          - name: inputs-pinned
            expr: spec.inputs.all(i, i.sha256 != "")
            message: every input must be pinned by sha256
          - expr: size(invocation.unsafe) == 0
            name: no-unsafe
          - name: no
            expr: true
            message: |
              a message
              on two lines
        """,
    )
    policy = load_policy(path)
    assert policy.path == path
    assert policy.rules == (
        Rule(
            name="inputs-pinned",
            expr='spec.inputs.all(i, i.sha256 != "")',
            message="every input must be pinned by sha256",
            line=4,
        ),
        Rule(
            name="no-unsafe",
            expr="size(invocation.unsafe) == 0",
            message="rule no-unsafe failed",
            line=7,
        ),
        # Plain scalars are taken as written, whatever YAML would read them as.
        Rule(name="no", expr="true", message="a message on two lines", line=9),
    )
    assert policy.digest == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_digest_is_stable_and_follows_the_bytes(tmp_path: Path) -> None:
    text = "version: 1\nrules:\n  - name: a\n    expr: 'true'\n"
    first = load_policy(write_policy(tmp_path, text, "a.yaml"))
    again = load_policy(write_policy(tmp_path, text, "b.yaml"))
    assert first.digest == again.digest
    assert first.digest == "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", first.digest)
    for changed in (text + "# a comment\n", text.replace("'true'", '"true"')):
        other = load_policy(write_policy(tmp_path, changed, "c.yaml"))
        assert other.digest != first.digest
        assert other.rules == first.rules
    decision = evaluate(first, {})
    assert decision.policy_digest == first.digest


# Each line of a malformed policy below is numbered from 1: "version: 1" is line 1.
LOAD_ERRORS = {
    "YAML syntax": (
        "version: 1\nrules:\n  - name: a\n    expr: [unclosed\n",
        r"^policy\.yaml:5: invalid YAML: .*",
    ),
    "YAML reads a colon": (
        "version: 1\nrules:\n  - name: a\n    expr: a: b\n",
        r"^policy\.yaml:4: invalid YAML: mapping values are not allowed here$",
    ),
    "empty file": (
        "",
        r"^policy\.yaml:1: empty policy: expected a mapping with version and rules$",
    ),
    "not a mapping": ("- a\n- b\n", r"^policy\.yaml:1: the policy must be a mapping, got a list$"),
    "a scalar": ("hello\n", r"^policy\.yaml:1: the policy must be a mapping, got a string$"),
    "unknown top-level key": (
        "version: 1\nrule:\n  - {name: a, expr: 'true'}\n",
        r"^policy\.yaml:2: unknown key 'rule' in the policy; did you mean 'rules'\?$",
    ),
    "unrelated top-level key": (
        "version: 1\ndefault: allow\nrules:\n  - {name: a, expr: 'true'}\n",
        r"^policy\.yaml:2: unknown key 'default' in the policy; expected version, rules$",
    ),
    "unknown rule key": (
        "version: 1\nrules:\n  - name: a\n    expr: 'true'\n    mesage: hi\n",
        r"^policy\.yaml:5: rules\[0\]: unknown key 'mesage' in a rule; did you mean 'message'\?$",
    ),
    "duplicate key": (
        "version: 1\nrules:\n  - name: a\n    expr: 'true'\n    expr: 'false'\n",
        r"^policy\.yaml:5: rules\[0\]: duplicate key 'expr' \(first at line 4\)$",
    ),
    "merge key": (
        "version: 1\nbase: &b {expr: 'true'}\nrules:\n  - {<<: *b, name: a}\n",
        r"^policy\.yaml:2: unknown key 'base' in the policy",
    ),
    "merge key in a rule": (
        "version: 1\nrules:\n  - name: a\n    <<: {expr: 'true'}\n",
        r"^policy\.yaml:4: rules\[0\]: merge keys \('<<'\) are not supported in a policy$",
    ),
    "no version": (
        "rules:\n  - {name: a, expr: 'true'}\n",
        r"^policy\.yaml:1: the policy has no 'version'$",
    ),
    "version 2": (
        "version: 2\nrules:\n  - {name: a, expr: 'true'}\n",
        r"^policy\.yaml:1: unsupported policy version 2; this buildcell reads version 1$",
    ),
    "version as a string": (
        "version: '1'\nrules:\n  - {name: a, expr: 'true'}\n",
        r"^policy\.yaml:1: 'version' must be 1, got a string$",
    ),
    "no rules key": ("version: 1\n", r"^policy\.yaml:1: the policy has no 'rules'$"),
    "rules empty": (
        "version: 1\nrules: []\n",
        r"^policy\.yaml:2: 'rules' is empty: a policy needs at least one rule$",
    ),
    "rules null": ("version: 1\nrules:\n", r"^policy\.yaml:2: 'rules' must be a list of rules"),
    "rules a mapping": (
        "version: 1\nrules: {a: 'true'}\n",
        r"^policy\.yaml:2: 'rules' must be a list of rules, got a mapping$",
    ),
    "rule not a mapping": (
        "version: 1\nrules:\n  - 'true'\n",
        r"^policy\.yaml:3: rules\[0\]: a rule must be a mapping, got a string$",
    ),
    "rule without a name": (
        "version: 1\nrules:\n  - expr: 'true'\n",
        r"^policy\.yaml:3: rules\[0\]: the rule has no 'name'$",
    ),
    "invalid name": (
        "version: 1\nrules:\n  - name: Inputs Pinned\n    expr: 'true'\n",
        r"^policy\.yaml:3: rules\[0\]: invalid rule name 'Inputs Pinned': expected lowercase",
    ),
    "null name": (
        "version: 1\nrules:\n  - name:\n    expr: 'true'\n",
        r"^policy\.yaml:3: rules\[0\]: 'name' must be a string, got null$",
    ),
    "duplicate name": (
        "version: 1\nrules:\n  - {name: a, expr: 'true'}\n  - {name: b, expr: 'true'}\n"
        "  - {name: a, expr: 'false'}\n",
        r"^policy\.yaml:5: duplicate rule name 'a' \(first at line 3\)$",
    ),
    "no expr": (
        "version: 1\nrules:\n  - name: a\n    message: hi\n",
        r"^policy\.yaml:3: rule 'a': the rule has no 'expr'$",
    ),
    "empty expr": (
        "version: 1\nrules:\n  - name: a\n    expr: '  '\n",
        r"^policy\.yaml:4: rule 'a': 'expr' is empty$",
    ),
    "null expr": (
        "version: 1\nrules:\n  - name: a\n    expr:\n",
        r"^policy\.yaml:4: rule 'a': 'expr' must be a string, got null$",
    ),
    "expr a mapping": (
        "version: 1\nrules:\n  - name: a\n    expr: {a: b}\n",
        r"^policy\.yaml:4: rule 'a': 'expr' must be a string, got a mapping$",
    ),
    "empty message": (
        "version: 1\nrules:\n  - name: a\n    expr: 'true'\n    message: ''\n",
        r"^policy\.yaml:5: rule 'a': 'message' is empty$",
    ),
    "expression does not parse": (
        "version: 1\nrules:\n  - name: a\n    expr: 'true'\n  - name: x\n"
        "    expr: spec.name ==== 'x'\n",
        r"^policy\.yaml:6: rule 'x': expression does not parse: unexpected '==' at column 13$",
    ),
    "expression ends early": (
        "version: 1\nrules:\n  - name: x\n    expr: spec.inputs.all(i,\n",
        r"^policy\.yaml:4: rule 'x': expression does not parse: unexpected end of the expression",
    ),
    "unexpected character": (
        "version: 1\nrules:\n  - name: x\n    expr: 'a # b'\n",
        r"^policy\.yaml:4: rule 'x': expression does not parse: unexpected character '#' "
        r"at column 3$",
    ),
    "parse error on a later line of a block": (
        "version: 1\nrules:\n  - name: x\n    expr: |\n      spec.name == 'a'\n      && && true\n",
        r"^policy\.yaml:6: rule 'x': expression does not parse: unexpected '&&' at line 2, "
        r"column 4 of the expression$",
    ),
}


@pytest.mark.parametrize(("text", "pattern"), LOAD_ERRORS.values(), ids=LOAD_ERRORS.keys())
def test_malformed_policies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, pattern: str
) -> None:
    write_policy(tmp_path, text)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PolicyError) as caught:
        load_policy(Path("policy.yaml"))
    message = caught.value.message
    assert "\n" not in message
    assert re.search(pattern, message), message
    assert caught.value.exit_code == 125


@pytest.mark.parametrize(
    ("key", "hint"),
    [
        ("empty file", "version: 1"),
        ("no version", "add 'version: 1'"),
        ("rules empty", 'expr: "true"'),
        ("expression does not parse", "cel-spec"),
        ("YAML reads a colon", "quote expressions"),
        ("unknown rule key", "anything buildcell would not enforce"),
    ],
)
def test_load_errors_hint_at_a_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str, hint: str
) -> None:
    write_policy(tmp_path, LOAD_ERRORS[key][0])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PolicyError) as caught:
        load_policy(Path("policy.yaml"))
    assert caught.value.hint is not None
    assert hint in caught.value.hint


def test_unreadable_policy(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"^cannot read policy .*missing\.yaml: No such file"):
        load_policy(tmp_path / "missing.yaml")
    with pytest.raises(PolicyError, match=r"^cannot read policy .*: Is a directory"):
        load_policy(tmp_path)


def test_policy_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_bytes(b"version: 1\nrules:\n  - name: caf\xe9\n")
    with pytest.raises(PolicyError, match=r"policy\.yaml:3: not UTF-8 text: byte 0xe9$"):
        load_policy(path)


def test_policy_that_is_too_large(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_bytes(b"#" * (1 << 20) + b"\n")
    with pytest.raises(PolicyError, match=r"policy\.yaml: the policy is larger than 1 MiB$"):
        load_policy(path)


def test_a_name_that_spans_lines_still_gives_one_line(tmp_path: Path) -> None:
    path = write_policy(tmp_path, "version: 1\nrules:\n  - name: \"a\\nb\"\n    expr: 'true'\n")
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    assert "\n" not in caught.value.message
    assert ":3: rules[0]: invalid rule name" in caught.value.message


# --- rules that cannot be evaluated ---------------------------------------------------------

# A name the context does not have is refused when a policy loads (UNKNOWN_NAMES below); a
# policy made by hand is not checked, and such a rule still fails closed when evaluated.
RAISING_BY_HAND = {
    "missing field": (
        "spec.nope == 1",
        r"raised: no such member in mapping: 'nope' in `spec.nope`$",
    ),
    "missing key in a list element": (
        "spec.steps.all(s, s.timeout > 0)",
        r"raised: no such member in mapping: 'timeout' in `s.timeout`$",
    ),
    "undeclared variable": (
        "build.name == 'x'",
        r"raised: undeclared reference to 'build' in `build`$",
    ),
}
RAISING = {
    "division by zero": ("1 / 0 == 1", r"raised: .*divide by zero.* in `1 / 0`$"),
    "type mismatch": ('size(spec.steps) == "1"', r"raised: .*overload for '==' .*\(int, string\)"),
    "null ordered against a number": (
        "spec.limits.pids <= 4096",
        r"raised: found no matching overload for '<=' applied to '\(null, int\)' in "
        r"`spec.limits.pids <= 4096`$",
    ),
    "method on null": (
        'spec.inputs.all(i, i.file.startsWith("../"))',
        r"raised: no such overload",
    ),
    "index out of range": ("spec.steps[5].name == 'a'", r"raised: .*list index out of range"),
    "overflow": ("9223372036854775807 + 1 > 0", r"raised: .*overflow"),
    "non-boolean string": ("spec.name", r"returned string 'app', not a boolean$"),
    "non-boolean int": ("size(spec.steps)", r"returned int 2, not a boolean$"),
    "non-boolean list": ("spec.outputs", r"returned list \['dist/\*'\], not a boolean$"),
    "non-boolean null": ("spec.limits.pids", r"returned null, not a boolean$"),
    "non-boolean type": ("type(1)", r"returned type int, not a boolean$"),
}


@pytest.mark.parametrize(
    ("expr", "pattern", "loaded"),
    [
        *((expr, pattern, True) for expr, pattern in RAISING.values()),
        *((expr, pattern, False) for expr, pattern in RAISING_BY_HAND.values()),
    ],
    ids=[*RAISING, *(f"{name} (by hand)" for name in RAISING_BY_HAND)],
)
def test_rules_that_raise_deny(tmp_path: Path, expr: str, pattern: str, loaded: bool) -> None:
    policy = (
        one_rule(tmp_path, expr, name="broken") if loaded else by_hand(tmp_path, expr, "broken")
    )
    decision = check(policy, spec_of(GOOD), UNTRUSTED)

    assert not decision.allowed
    (result,) = decision.results
    assert result == RuleResult(
        name="broken", passed=False, message="rule broken failed", error=result.error
    )
    assert result.error is not None
    assert "\n" not in result.error
    assert result.error.startswith(f"{policy.path}:3: rule 'broken' ")
    assert re.search(pattern, result.error), result.error
    assert decision.summary() == f"policy denies this build: broken ({result.error})"


@pytest.mark.parametrize(
    "expr",
    [
        "spec.limits.memory != null",
        "spec.limits.pids == null",
        "null == null",
        "!(null != null)",
        "1 != null && null != 1.5 && true != null && 'a' != null && [] != null",
        "!(1 == null)",
        "spec.steps.all(s, s.limits.memory != null && s.limits.memory <= 4294967296)",
    ],
)
def test_anything_compares_with_null(tmp_path: Path, expr: str) -> None:
    assert check(one_rule(tmp_path, expr), spec_of(GOOD), UNTRUSTED).allowed


def test_errors_absorbed_by_logic_operators_do_not_fail(tmp_path: Path) -> None:
    # Made by hand: loading refuses spec.nope (test_unknown_names_are_refused_at_load).
    for expr in ("true || spec.nope", "spec.nope || true", "!(false && spec.nope)"):
        assert check(by_hand(tmp_path, expr), spec_of(GOOD), UNTRUSTED).allowed, expr


def test_every_rule_is_evaluated_and_every_failure_listed(tmp_path: Path) -> None:
    policy = policy_of(
        tmp_path,
        """\
        version: 1
        rules:
          - name: inputs-pinned
            expr: spec.inputs.all(i, i.sha256 == "")
            message: every input must be pinned by sha256
          - name: passes
            expr: "true"
          - name: no-unsafe
            expr: invocation.unsafe.size() == 0 && spec.steps[9].name == ""
          - name: says-no
            expr: "false"
          - name: not-a-bool
            expr: "'yes'"
        """,
    )
    decision = check(policy, spec_of(GOOD), UNSAFE)
    assert [r.name for r in decision.results] == [
        "inputs-pinned",
        "passes",
        "no-unsafe",
        "says-no",
        "not-a-bool",
    ]
    assert [r.name for r in decision.failures] == [
        "inputs-pinned",
        "no-unsafe",
        "says-no",
        "not-a-bool",
    ]
    # `&&` with a false side absorbs the error on the other: a plain failure.
    assert decision.failures[1].error is None
    path = policy.path
    assert decision.summary() == (
        "policy denies this build: inputs-pinned (every input must be pinned by sha256); "
        "no-unsafe (rule no-unsafe failed); says-no (rule says-no failed); "
        f"not-a-bool ({path}:12: rule 'not-a-bool' returned string 'yes', not a boolean)"
    )


def test_to_dict_is_json_ready(tmp_path: Path) -> None:
    policy = policy_of(
        tmp_path,
        """\
        version: 1
        rules:
          - {name: ok, expr: "true"}
          - {name: no, expr: "false", message: nope}
          - {name: boom, expr: "1 / 0 == 0"}
        """,
    )
    decision = check(policy, spec_of(GOOD), UNTRUSTED)
    data = decision.to_dict()
    assert json.loads(json.dumps(data)) == data
    boom_error = decision.results[2].error
    assert boom_error is not None
    assert data == {
        "allowed": False,
        "policy_digest": policy.digest,
        "results": [
            {"name": "ok", "passed": True, "message": None, "error": None},
            {"name": "no", "passed": False, "message": "nope", "error": None},
            {"name": "boom", "passed": False, "message": "rule boom failed", "error": boom_error},
        ],
    }
    assert f"{policy.path}:5: rule 'boom' raised:" in boom_error


def test_require_allowed(tmp_path: Path) -> None:
    allow = one_rule(tmp_path, "true")
    require_allowed(check(allow, spec_of(GOOD), UNTRUSTED))

    deny = policy_of(tmp_path, "version: 1\nrules:\n" + NO_UNSAFE)
    decision = check(deny, spec_of(GOOD), UNSAFE)
    with pytest.raises(PolicyError) as caught:
        require_allowed(decision)
    assert caught.value.message == "policy denies this build: no-unsafe (no --unsafe-* flags)"
    assert caught.value.message == decision.summary()
    assert caught.value.hint is not None
    assert "buildcell policy check" in caught.value.hint
    assert caught.value.exit_code == 125


def test_celpy_faults_deny_instead_of_escaping(tmp_path: Path) -> None:
    class Exploding:
        def evaluate(self, activation: object) -> object:
            raise RuntimeError("celpy bug")

    loaded = one_rule(tmp_path, "true")
    policy = Policy(
        path=loaded.path, rules=loaded.rules, digest=loaded.digest, _programs=(Exploding(),)
    )
    (result,) = evaluate(policy, {}).results
    assert not result.passed
    assert result.error == f"{loaded.path}:3: rule 'r' raised: RuntimeError: celpy bug"


def test_policy_made_by_hand_is_compiled_on_evaluation() -> None:
    rules = (
        Rule(name="ok", expr="invocation.trust == 'trusted'", message="m", line=1),
        Rule(name="bad", expr="1 +", message="m2", line=2),
    )
    policy = Policy(path=Path("p.yaml"), rules=rules, digest="sha256:x")
    decision = check(policy, spec_of(GOOD), TRUSTED_MAIN)
    assert [r.passed for r in decision.results] == [True, False]
    assert decision.results[1].error == (
        "p.yaml:2: rule 'bad': expression does not parse: unexpected end of the expression; "
        "is something missing at its end?"
    )
    assert policy == Policy(path=Path("p.yaml"), rules=rules, digest="sha256:x")


def test_a_policy_without_rules_denies() -> None:
    decision = evaluate(Policy(path=Path("p.yaml"), rules=(), digest="sha256:x"), {})
    assert decision == Decision(allowed=False, policy_digest="sha256:x", results=())
    assert decision.summary() == "policy denies this build: the policy has no rules"


def test_context_that_is_not_plain_data_is_a_bug(tmp_path: Path) -> None:
    policy = one_rule(tmp_path, "true")
    with pytest.raises(TypeError, match=r"policy context spec\.path: PosixPath"):
        evaluate(policy, {"spec": {"path": Path("/x")}})
    with pytest.raises(TypeError, match=r"key 1 is not a string"):
        evaluate(policy, {"spec": {1: "x"}})


def test_evaluate_takes_any_plain_context(tmp_path: Path) -> None:
    # Made by hand: loading refuses the variable n, which build_context never makes.
    policy = by_hand(tmp_path, 'spec.name == "x" && invocation.unsafe == [] && n == 1.5')
    context: dict[str, Any] = {
        "spec": {"name": "x"},
        "invocation": {"unsafe": ()},
        "n": 1.5,
    }
    assert evaluate(policy, context).allowed


def test_recursion_limit_is_not_lowered(tmp_path: Path) -> None:
    before = sys.getrecursionlimit()
    try:
        sys.setrecursionlimit(6000)
        one_rule(tmp_path, "true")
        assert sys.getrecursionlimit() == 6000
    finally:
        sys.setrecursionlimit(before)


def test_importing_the_module_does_not_import_celpy() -> None:
    code = "import sys, buildcell.build.policy; assert 'celpy' not in sys.modules, 'celpy imported'"
    subprocess.run([sys.executable, "-W", "error", "-c", code], check=True, timeout=60)


def test_context_shows_what_is_enforced_not_what_is_written() -> None:
    from buildcell.build.policy import Invocation, build_context
    from buildcell.build.spec import parse_spec

    spec = parse_spec(
        "version: 1\nname: x\nrootfs: {dir: /srv/rootfs/../../..}\nlimits: {disk: 64M}\n"
        "steps:\n  - name: s\n    run: 'true'\n    limits: {disk: 4M}\n",
        path=Path("buildcell.yaml"),
    ).spec
    context = build_context(spec, Invocation(project="p", pinned_hosts=("a.test=127.0.0.1",)))
    assert context["spec"]["rootfs"]["path"] == "/"
    # A step's own disk value is not enforced (the budget is the build's): not shown either.
    assert context["spec"]["steps"][0]["limits"]["disk"] == 64 << 20
    assert context["invocation"]["pinned_hosts"] == ["a.test=127.0.0.1"]


# --- names checked when the policy loads ----------------------------------------------------

UNKNOWN_NAMES = {
    "a field of spec": (
        "spec.egres == []",
        r"unknown field 'egres' in `spec.egres`; did you mean 'egress'\?",
    ),
    "a field of invocation": (
        'invocation.trsut == "trusted"',
        r"unknown field 'trsut' in `invocation.trsut`; did you mean 'trust'\?",
    ),
    "a field of a macro's variable": (
        "spec.steps.all(s, s.limits.memroy != null && s.limits.memroy <= 1)",
        r"unknown field 'memroy' in `s.limits.memroy`; did you mean 'memory'\?",
    ),
    "absorbed by || at evaluation": (
        "true || spec.nope",
        r"unknown field 'nope' in `spec.nope`; `spec` has name, rootfs, inputs, limits, "
        r"outputs, steps, egress, secrets",
    ),
    "inside has()": ("!has(spec.egres)", r"unknown field 'egres' in `spec.egres`; did you mean"),
    "an unknown variable": (
        "build.name == 'x'",
        r"unknown variable 'build'; rules see spec, invocation",
    ),
    "a misspelt variable": ("spce.name == 'x'", r"unknown variable 'spce'; did you mean 'spec'\?"),
    "after an index": (
        "spec.inputs[0].sha265 == ''",
        r"unknown field 'sha265' in `spec.inputs\[0\].sha265`; did you mean 'sha256'\?",
    ),
    "a string index": ('spec["egres"] == []', r"unknown field 'egres' in `spec\[\"egres\"\]`"),
    "after filter()": (
        'spec.steps.filter(s, s.name == "a").all(t, t.nmae == "")',
        r"unknown field 'nmae' in `t.nmae`; did you mean 'name'\?",
    ),
    "inside map()": ("size(spec.steps.map(s, s.nmae)) == 1", r"unknown field 'nmae' in `s.nmae`"),
    "in nested macros": (
        'spec.steps.exists(s, s.caches.exists_one(c, c.kye == "pip"))',
        r"unknown field 'kye' in `c.kye`; did you mean 'key'\?",
    ),
    "in an argument": ("spec.name.startsWith(invocation.projet)", r"unknown field 'projet'"),
    "a misspelt macro variable": (
        'spec.steps.all(s, ss.name != "")',
        r"unknown variable 'ss'; did you mean 's'\?",
    ),
    "inside a message construction": (
        "Msg{a: spec.egres} == 1",
        r"unknown field 'egres' in `spec.egres`",
    ),
    "from the root scope": (".spec.egres == []", r"unknown field 'egres' in `.spec.egres`"),
    "a field of a list": (
        'spec.steps.name == "x"',
        r"`spec.steps` is a list, it has no field 'name'",
    ),
    "a field of a string": (
        "spec.name.first == 1",
        r"`spec.name` is not a map, it has no field 'first'",
    ),
    "a field of a limit": (
        "spec.limits.memory.bytes > 0",
        r"`spec.limits.memory` is not a map, it has no field 'bytes'",
    ),
}


@pytest.mark.parametrize(("expr", "pattern"), UNKNOWN_NAMES.values(), ids=UNKNOWN_NAMES.keys())
def test_unknown_names_are_refused_at_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, expr: str, pattern: str
) -> None:
    monkeypatch.chdir(tmp_path)
    quoted = expr.replace("'", "''")
    write_policy(
        tmp_path,
        f"version: 1\nrules:\n  - name: ok\n    expr: 'true'\n  - name: r\n    expr: '{quoted}'\n",
    )
    with pytest.raises(PolicyError) as caught:
        load_policy(Path("policy.yaml"))
    message = caught.value.message
    assert re.match(r"policy\.yaml:6: rule 'r': " + pattern, message), message
    assert caught.value.exit_code == 125
    assert caught.value.hint is not None
    assert "spec and invocation" in caught.value.hint


def test_an_unknown_name_on_a_later_line_of_a_block(tmp_path: Path) -> None:
    path = write_policy(
        tmp_path,
        "version: 1\nrules:\n  - name: x\n    expr: |\n      spec.name == 'a'\n"
        "      || spec.egres == []\n",
    )
    with pytest.raises(PolicyError, match=r"policy\.yaml:6: rule 'x': unknown field 'egres'"):
        load_policy(path)


KNOWN_NAMES = [
    "has(spec.steps[0].env.ANY_NAME)",
    'spec.steps.all(s, s.env.ANY == "x" || s.env["NOT-A-NAME"] == "y" || !has(s.env.B))',
    'spec.rootfs.all(k, k != "")',
    "type(spec.name) == string && type(spec.limits.cpus) != double",
    '.spec.name == "x"',
    'spec.steps.map(s, s.name).all(n, n != "")',
    '[1, 2].all(x, x > 0) && {"a": 1}.a == 1',
    "dyn(spec).anything == 1",
    'spec.steps[0]["limits"].memory != null',
    'spec.steps.all(spec, spec.name != "")',
    'spec.steps.exists(s, s.network.allow.exists(a, a.startsWith("x")))',
    "spec.steps.all(s, s.secrets.all(n, n in invocation.secrets))",
    'invocation.cache_scope != "build" && invocation.image_budget == null',
    'spec.steps[size(spec.steps) - 1].name == ""',
    'spec.inputs.all(i, i.file == null || !i.file.startsWith(".."))',
]


@pytest.mark.parametrize("expr", KNOWN_NAMES)
def test_known_names_load(tmp_path: Path, expr: str) -> None:
    one_rule(tmp_path, expr)


def _paths(value: object, path: str) -> list[str]:
    """Every field of a context as CEL: ``spec.steps[0].limits.memory``, ..."""
    found = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, f"{path}.{key}" if path else key)
    elif isinstance(value, list) and value:
        found += _paths(value[0], f"{path}[0]")
    return found


def test_every_field_of_the_context_may_be_named(tmp_path: Path) -> None:
    context = build_context(
        spec_of(RICH),
        Invocation(
            project="rich",
            ref="refs/heads/main",
            trust="trusted",
            secrets=("token",),
            unsafe=("no-seccomp",),
            pinned_hosts=("a.test=127.0.0.1",),
            allow=("a.test",),
            allow_fetch=("a.test",),
            image_budget=1,
        ),
    )
    paths = [p for p in _paths(context, "") if p]
    assert "spec.steps[0].limits.memory" in paths
    assert "spec.steps[0].env.B" in paths
    expr = " && ".join(f"type({p}) != null_type" for p in paths)
    policy = one_rule(tmp_path, expr)
    assert check(policy, spec_of(RICH), Invocation(project="rich")).results[0].error is None


def test_the_documented_context_is_the_checked_one(tmp_path: Path) -> None:
    import buildcell.build.policy as module

    doc = module.__doc__
    assert doc is not None
    section = doc.split("The evaluation context")[1].split("Writing rules")[0]
    documented = set(re.findall(r"``((?:spec|invocation)(?:\.[a-z_]+)+)``", section))
    assert {"spec.egress", "invocation.cache_scope"} <= documented
    # Every dotted name the documentation gives is one a rule may use...
    one_rule(tmp_path, " && ".join(f"has({name})" for name in sorted(documented)))
    # ...and every field of the context is documented.
    context = build_context(spec_of(RICH), Invocation(project="rich"))
    for path in _paths(context, ""):
        last = re.split(r"[.\[]", path)[-1]
        if path and not path.startswith("spec.steps[0].env.") and not last.endswith("]"):
            assert re.search(rf"``[^`]*\b{last}\b[^`]*``", section), path
