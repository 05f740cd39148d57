"""Operator policy, projects and caches through the CLI and real cells."""

from __future__ import annotations

import base64
import json
import threading
import time
from pathlib import Path
from typing import Any

from tests.conftest import RunCLI, derived_project, read_events

POLICY = """\
version: 1
rules:
  - name: limits-set
    expr: spec.steps.all(s, s.limits.memory != null && s.limits.memory <= 1073741824)
    message: every step needs a memory limit of at most 1 GiB
  - name: release-key-only-on-main
    expr: >
      !("release-key" in spec.secrets) ||
      (invocation.trust == "trusted" && invocation.ref == "refs/heads/main")
    message: the release key is only for trusted builds of main
  - name: egress-in-org
    expr: spec.egress.all(e, e.endsWith(".corp.example:443"))
    message: egress only to the organisation's hosts
"""


def _project(tmp_path: Path, spec: str, name: str = "proj") -> Path:
    d = tmp_path / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "buildcell.yaml").write_text(spec)
    return d


def _policy(tmp_path: Path, text: str = POLICY) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path


SPEC_OK = (
    "version: 1\nname: p\nlimits: {memory: 512M}\nsteps:\n"
    "  - name: s\n    run: echo ran > ran.txt\noutputs: [ran.txt]\n"
)
SPEC_BAD = (
    "version: 1\nname: p\nsteps:\n"
    "  - name: s\n    run: echo ran > ran.txt\n    secrets: [release-key]\n"
    "    network: {allow: ['evil.example.net']}\noutputs: [ran.txt]\n"
)


def test_policy_denial_lists_every_failed_rule_and_runs_nothing(bc: RunCLI, tmp_path: Path) -> None:
    d = _project(tmp_path, SPEC_BAD)
    res = bc(
        "build",
        "--policy",
        str(_policy(tmp_path)),
        "--secret",
        "release-key=env:KEY",
        cwd=d,
        env={"KEY": "not-a-real-key-123"},
    )
    assert res.returncode == 125, res.stderr
    first = res.stderr.splitlines()[0]
    assert first.startswith("buildcell: error: policy denies this build")
    for rule in ("limits-set", "release-key-only-on-main", "egress-in-org"):
        assert rule in first
    assert not (d / "buildcell-out").exists()
    ls = bc("ls", "--json", cwd=d)
    (record,) = json.loads(ls.stdout)
    assert record["status"] == "denied"
    assert record["steps"][0]["status"] == "skipped"
    assert record["policy"]["allowed"] is False
    assert record["policy"]["policies"][0]["allowed"] is False


def test_trusted_main_with_limits_is_allowed_and_recorded(bc: RunCLI, tmp_path: Path) -> None:
    d = _project(tmp_path, SPEC_OK)
    policy = _policy(tmp_path)
    res = bc(
        "build", "--policy", str(policy), "--trust", "trusted", "--ref", "refs/heads/main", cwd=d
    )
    assert res.returncode == 0, res.stderr + res.stdout
    provenance = d / "buildcell-out" / "provenance.intoto.jsonl"
    statement = json.loads(base64.b64decode(json.loads(provenance.read_text())["payload"]))
    internal = statement["predicate"]["buildDefinition"]["internalParameters"]
    external = statement["predicate"]["buildDefinition"]["externalParameters"]
    import hashlib

    assert internal["policies"] == [
        {"digest": "sha256:" + hashlib.sha256(policy.read_bytes()).hexdigest(), "allowed": True}
    ]
    project = derived_project(d)
    assert project.startswith("proj-")
    # What the invoker chose is an external parameter (SLSA: verifiers pin those).
    assert "invocation" not in internal
    assert external["invocation"] == {
        "project": project,
        "trust": "trusted",
        "ref": "refs/heads/main",
        "secrets": [],
        "pinnedHosts": [],
        "allow": [],
        "allowFetch": [],
        "unsafe": [],
    }
    (record,) = json.loads(bc("ls", "--json", cwd=d).stdout)
    assert (record["project"], record["trust"], record["ref"]) == (
        project,
        "trusted",
        "refs/heads/main",
    )


def test_policy_decision_is_an_event(bc: RunCLI, tmp_path: Path, state_root: Path) -> None:
    d = _project(tmp_path, SPEC_OK)
    assert bc("build", "--policy", str(_policy(tmp_path)), cwd=d).returncode == 0
    (build_dir,) = (state_root / "state" / "builds").iterdir()
    (decision,) = [
        e for e in read_events(build_dir / "events.jsonl") if e["event"] == "policy.decision"
    ]
    assert decision["allowed"] is True
    assert decision["digest"].startswith("sha256:")
    assert decision["failed"] == []


def test_malformed_policy_denies_and_says_where(bc: RunCLI, tmp_path: Path) -> None:
    d = _project(tmp_path, SPEC_OK)
    bad = _policy(tmp_path, "version: 1\nrules:\n  - name: x\n    expr: 'spec.steps.all(s,'\n")
    res = bc("build", "--policy", str(bad), cwd=d)
    assert res.returncode == 125
    assert "policy.yaml:4: rule 'x': expression does not parse" in res.stderr.splitlines()[0]
    assert not (d / "buildcell-out").exists()
    raising = _policy(
        tmp_path, "version: 1\nrules:\n  - name: boom\n    expr: spec.nope.missing == 1\n"
    )
    res = bc("build", "--policy", str(raising), cwd=d)
    assert res.returncode == 125
    assert "boom" in res.stderr.splitlines()[0]


def test_policy_check_command(bc: RunCLI, tmp_path: Path) -> None:
    d = _project(tmp_path, SPEC_OK)
    policy = _policy(tmp_path)
    ok = bc("policy", "check", "--policy", str(policy), cwd=d)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[:3] == [
        "PASS limits-set",
        "PASS release-key-only-on-main",
        "PASS egress-in-org",
    ]
    (d / "buildcell.yaml").write_text(SPEC_BAD)
    denied = bc("policy", "check", "--policy", str(policy), "--json", cwd=d)
    assert denied.returncode == 125
    decision = json.loads(denied.stdout)
    assert decision["allowed"] is False
    assert {r["name"] for r in decision["results"] if not r["passed"]} == {
        "limits-set",
        "release-key-only-on-main",
        "egress-in-org",
    }


def test_policy_from_the_configuration_file(bc: RunCLI, tmp_path: Path) -> None:
    d = _project(tmp_path, SPEC_OK.replace("limits: {memory: 512M}\n", ""))
    config = tmp_path / "config.yaml"
    config.write_text("policy: policy.yaml\n")
    _policy(tmp_path)
    res = bc("build", cwd=d, env={"BUILDCELL_CONFIG": str(config)})
    assert res.returncode == 125
    assert "policy denies this build: limits-set" in res.stderr
    config.write_text("polcy: policy.yaml\n")
    res = bc("build", cwd=d, env={"BUILDCELL_CONFIG": str(config)})
    assert res.returncode == 125
    assert "unknown setting 'polcy'" in res.stderr


def test_projects_do_not_see_each_others_builds(bc: RunCLI, tmp_path: Path) -> None:
    a = _project(tmp_path, SPEC_OK, "alpha")
    b = _project(tmp_path, SPEC_OK, "beta")
    assert bc("build", cwd=a).returncode == 0
    assert bc("build", "--project", "beta", cwd=b).returncode == 0
    (ra,) = json.loads(bc("ls", "--json", cwd=a).stdout)
    (rb,) = json.loads(bc("ls", "--json", "--project", "beta").stdout)
    assert (ra["project"], rb["project"]) == (derived_project(a), "beta")
    assert ra["project"].startswith("alpha-")
    for command in (["show", ra["id"]], ["logs", ra["id"]]):
        res = bc(*command, "--project", "beta")
        assert res.returncode == 125, res.stdout
        assert "in project 'beta'" in res.stderr
        assert ra["id"] not in res.stdout
    assert bc("show", ra["id"], cwd=a).returncode == 0
    assert bc("logs", ra["id"], "--project", ra["project"]).returncode == 0
    res = bc("ls", "--project", "Not/Valid")
    assert res.returncode == 125
    assert "invalid project name" in res.stderr


CACHE_SPEC = """\
version: 1
name: c
steps:
  - name: use
    run: |
      mkdir -p $HOME/.cache/tool
      ls $HOME/.cache/tool | sort | tr '\\n' ' ' > seen.txt
      echo "$MARK" > $HOME/.cache/tool/$MARK
    env: {{MARK: {mark}}}
    caches: [{{path: /home/builder/.cache/tool, key: tool}}]
outputs: [seen.txt]
"""


def _cache_build(bc: RunCLI, d: Path, mark: str, trust: str, *project: str) -> str:
    (d / "buildcell.yaml").write_text(CACHE_SPEC.format(mark=mark))
    res = bc("build", "--trust", trust, "--out", f"out-{mark}", *project, cwd=d)
    assert res.returncode == 0, res.stderr + res.stdout
    return (d / f"out-{mark}" / "seen.txt").read_text().strip()


def test_untrusted_build_cannot_poison_the_trusted_cache(bc: RunCLI, tmp_path: Path) -> None:
    d = _project(tmp_path, "", "cachey")
    assert _cache_build(bc, d, "t1", "trusted") == ""
    assert _cache_build(bc, d, "poison", "untrusted") == "t1"  # starts from a trusted snapshot
    assert _cache_build(bc, d, "t2", "trusted") == "t1"  # never sees the poison
    assert _cache_build(bc, d, "u2", "untrusted") == "t1 t2"
    other = _project(tmp_path, "", "other")
    assert _cache_build(bc, other, "o1", "trusted") == ""  # another project: its own cache


def test_concurrent_builds_of_one_cache_do_not_corrupt_it(bc: RunCLI, tmp_path: Path) -> None:
    d = _project(tmp_path, "", "busy")
    marks = [f"m{i}" for i in range(4)]
    for mark in marks:
        (d / mark).mkdir()
        (d / mark / "buildcell.yaml").write_text(CACHE_SPEC.format(mark=mark))
    results: dict[str, Any] = {}

    def build(mark: str) -> None:
        results[mark] = bc("build", "--project", "busy", "--trust", "trusted", cwd=d / mark)

    threads = [threading.Thread(target=build, args=(m,)) for m in marks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.returncode == 0 for r in results.values()), [r.stderr for r in results.values()]
    seen = _cache_build(bc, d, "after", "trusted", "--project", "busy").split()
    # One complete generation won: at least one writer's file, never a torn mix of a
    # generation and its predecessor.
    assert seen and set(seen) <= set(marks)


def test_gc_expires_caches(bc: RunCLI, tmp_path: Path, state_root: Path) -> None:
    d = _project(tmp_path, "", "old")
    _cache_build(bc, d, "x", "trusted")
    caches = state_root / "state" / "caches" / derived_project(d)
    assert any(caches.rglob("gen-*"))
    time.sleep(0.01)
    res = bc("gc", "--json", "--cache-max-age", "1ms")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["caches_expired"] >= 1
    assert not any(caches.rglob("gen-*"))
    assert _cache_build(bc, d, "y", "trusted") == ""


def test_run_is_checked_against_the_policy_too(bc: RunCLI, tmp_path: Path) -> None:
    policy = _policy(
        tmp_path,
        "version: 1\nrules:\n"
        "  - name: no-unsafe\n    expr: size(invocation.unsafe) == 0\n"
        "  - name: no-egress\n    expr: size(spec.egress) == 0\n"
        "    message: one-off commands get no network\n",
    )
    ok = bc("run", "--policy", str(policy), "--", "sh", "-c", "echo ran", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == "ran\n"
    denied = bc(
        "run",
        "--policy",
        str(policy),
        "--unsafe-no-seccomp",
        "--allow",
        "x.example.org",
        "--events",
        str(tmp_path / "ev.jsonl"),
        "--",
        "sh",
        "-c",
        "echo ran",
        cwd=tmp_path,
    )
    assert denied.returncode == 125
    assert denied.stdout == ""
    line = denied.stderr.splitlines()[-2 if "hint" in denied.stderr.splitlines()[-1] else -1]
    assert "no-unsafe" in line and "no-egress (one-off commands get no network)" in line
    (decision,) = [e for e in read_events(tmp_path / "ev.jsonl") if e["event"] == "policy.decision"]
    assert decision["allowed"] is False
    assert not [e for e in read_events(tmp_path / "ev.jsonl") if e["event"] == "cell.start"]


def test_configured_policy_cannot_be_replaced_or_emptied(bc: RunCLI, tmp_path: Path) -> None:
    d = _project(tmp_path, SPEC_OK)
    deny = tmp_path / "deny.yaml"
    deny.write_text("version: 1\nrules:\n  - name: nothing\n    expr: 'false'\n")
    allow = tmp_path / "allow.yaml"
    allow.write_text("version: 1\nrules:\n  - name: anything\n    expr: 'true'\n")
    config = tmp_path / "config.yaml"
    config.write_text(f"policy: {deny}\n")
    env = {"BUILDCELL_CONFIG": str(config)}
    res = bc("build", "--policy", str(allow), cwd=d, env=env)
    assert res.returncode == 125
    assert "nothing" in res.stderr
    for text in (f"policy: {deny}\npolicy: ''\n", "policy: ''\n", "policy:\n"):
        config.write_text(text)
        res = bc("build", cwd=d, env=env)
        assert res.returncode == 125, text
        assert "ran" not in res.stdout
        assert len(res.stderr.splitlines()) <= 2
    config.write_text("caches: {max_age: }\n")
    res = bc("gc", env=env)
    assert res.returncode == 125
    assert "caches.max_age" in res.stderr


def test_a_cache_holding_a_secret_is_not_saved(bc: RunCLI, tmp_path: Path) -> None:
    d = _project(tmp_path, "", "leaky")
    (d / "buildcell.yaml").write_text(
        "version: 1\nname: c\nsteps:\n  - name: use\n"
        "    run: |\n      mkdir -p $HOME/.cache/tool\n"
        "      cp /run/secrets/token $HOME/.cache/tool/stolen\n"
        "      echo ok > $HOME/.cache/tool/fine\n"
        "    secrets: [token]\n"
        "    caches: [{path: /home/builder/.cache/tool, key: tool}]\n"
    )
    res = bc(
        "build",
        "--trust",
        "trusted",
        "--secret",
        "token=env:TOK",
        cwd=d,
        env={"TOK": "supersecret-token-value"},
    )
    assert res.returncode == 0, res.stderr
    assert "cache 'tool' not saved: it holds the value of secret token" in res.stdout + res.stderr
    assert _cache_build(bc, d, "u1", "untrusted") == ""


def test_run_policy_sees_env_custom_seccomp_and_pinned_hosts(bc: RunCLI, tmp_path: Path) -> None:
    from tests.conftest import seccomp_asset

    policy = _policy(
        tmp_path,
        "version: 1\nrules:\n"
        "  - name: no-preload\n    expr: '!(\"LD_PRELOAD\" in spec.steps[0].env)'\n"
        "  - name: builtin-seccomp\n    expr: '!(\"seccomp-profile\" in invocation.unsafe)'\n"
        "  - name: no-pins\n    expr: size(invocation.pinned_hosts) == 0\n",
    )
    res = bc(
        "run",
        "--policy",
        str(policy),
        "--env",
        "LD_PRELOAD=/tmp/x.so",
        "--seccomp-profile",
        str(seccomp_asset(stand_in=True)),
        "--add-host",
        "a.test:127.0.0.1",
        "--",
        "true",
        cwd=tmp_path,
    )
    assert res.returncode == 125
    line = res.stderr.splitlines()[0]
    assert all(rule in line for rule in ("no-preload", "builtin-seccomp", "no-pins")), line
