"""One build cannot influence another (SLSA Build L3 "isolated").

Each test is an untrusted build (a pull request) trying to reach the next or a concurrent
build through something they share, against the real tool. The attempt must leave no trace
the other build can see.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import RunCLI, cli_env

CACHED = """\
version: 1
name: acme
steps:
  - name: s
    run: |
      ls -a /home/builder/.cache/tool/ > seen.txt
      echo "$MARK" > /home/builder/.cache/tool/poison-$MARK
    env: {{MARK: "{mark}"}}
    caches: [{{path: /home/builder/.cache/tool, key: tool}}]
outputs: ["seen.txt"]
"""


def _build(bc: RunCLI, proj: Path, mark: str, *args: str) -> set[str]:
    (proj / "buildcell.yaml").write_text(CACHED.format(mark=mark))
    out = proj / f"out-{mark}"
    res = bc("build", "--project", "acme", "--trust", "untrusted", "--out", str(out), *args,
             cwd=proj)  # fmt: skip
    assert res.returncode == 0, res.stderr
    return set((out / "seen.txt").read_text().split()) - {".", ".."}


def test_two_pull_requests_never_share_a_cache(bc: RunCLI, tmp_path: Path) -> None:
    proj = tmp_path / "p"
    proj.mkdir()
    assert _build(bc, proj, "pr1", "--ref", "refs/pull/1/merge") == set()
    # Pull request 2 builds next: it must not read what pull request 1 planted.
    assert _build(bc, proj, "pr2", "--ref", "refs/pull/2/merge") == set()
    # Pull request 1 again: its own cache is its own to reuse.
    assert _build(bc, proj, "pr1b", "--ref", "refs/pull/1/merge") == {"poison-pr1"}


def test_an_untrusted_build_without_ref_keeps_nothing(bc: RunCLI, tmp_path: Path) -> None:
    proj = tmp_path / "p"
    proj.mkdir()
    (proj / "buildcell.yaml").write_text(CACHED.format(mark="a"))
    res = bc("build", "--project", "acme", "--trust", "untrusted", "--out", "o1", cwd=proj)
    assert res.returncode == 0, res.stderr
    assert "this build only" in res.stderr + res.stdout  # said once
    assert (res.stderr + res.stdout).count("this build only") == 1
    assert _build(bc, proj, "b") == set()
    assert _build(bc, proj, "c", "--ref", "refs/pull/3/merge") == set()


def test_trusted_builds_never_read_untrusted_caches(bc: RunCLI, tmp_path: Path) -> None:
    proj = tmp_path / "p"
    proj.mkdir()
    _build(bc, proj, "pr", "--ref", "refs/heads/main")
    (proj / "buildcell.yaml").write_text(CACHED.format(mark="main"))
    res = bc("build", "--project", "acme", "--trust", "trusted", "--ref", "refs/heads/main",
             "--out", "o", cwd=proj)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert (proj / "o" / "seen.txt").read_text().split() == [".", ".."]


def test_cache_scope_is_in_the_record_and_policy_context(bc: RunCLI, tmp_path: Path) -> None:
    proj = tmp_path / "p"
    proj.mkdir()
    (proj / "buildcell.yaml").write_text(CACHED.format(mark="x"))
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "version: 1\nrules:\n  - name: per-ref-caches-only\n"
        "    expr: 'invocation.cache_scope != \"build\"'\n"
    )
    res = bc("build", "--project", "acme", "--policy", str(policy), "--json", cwd=proj)
    assert res.returncode == 125
    assert "per-ref-caches-only" in res.stderr
    res = bc("build", "--project", "acme", "--ref", "refs/pull/7/head", "--policy", str(policy),
             "--json", cwd=proj)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["cache_scope"] == "ref:refs/pull/7/head"


def test_concurrent_builds_of_two_refs_stay_apart(tmp_path: Path, state_root: Path) -> None:
    proj = tmp_path / "p"
    proj.mkdir()
    env = cli_env(state_root / "state")
    procs = []
    for n in (1, 2, 3):
        spec = proj / f"s{n}"
        spec.mkdir()
        # Overlapping in time: each sleeps before it looks at its cache.
        text = CACHED.format(mark=f"c{n}").replace("ls -a", "sleep 1; ls -a")
        (spec / "buildcell.yaml").write_text(text)
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "buildcell",
                    "build",
                    "--project",
                    "acme",
                    "--ref",
                    f"refs/pull/{n}/merge",
                    "--out",
                    str(spec / "out"),
                ],
                cwd=spec,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        )
        time.sleep(0.2)
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    for n in (1, 2, 3):
        again = proj / f"s{n}"
        (again / "buildcell.yaml").write_text(CACHED.format(mark=f"d{n}"))
        res = subprocess.run(
            [sys.executable, "-m", "buildcell", "build", "--project", "acme", "--ref",
             f"refs/pull/{n}/merge", "--out", str(again / "out2")],
            cwd=again, env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        seen = set((again / "out2" / "seen.txt").read_text().split()) - {".", ".."}
        assert seen == {f"poison-c{n}"}
