"""Provenance records what the invoker chose, and verifiers can pin it (SLSA v1.0)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any, cast

import pytest
from tests.conftest import RunCLI

SPEC = """\
version: 1
name: params
steps:
  - name: s
    run: "mkdir -p o && echo hi > o/a"
    secrets: [token]
outputs: ["o/*"]
"""


def _statement(path: Path) -> dict[str, Any]:
    return cast(
        "dict[str, Any]", json.loads(base64.b64decode(json.loads(path.read_text())["payload"]))
    )


@pytest.fixture
def signed(bc: RunCLI, tmp_path: Path) -> tuple[Path, Path]:
    keys = tmp_path / "keys"
    assert bc("keygen", "--out", str(keys)).returncode == 0
    proj = tmp_path / "p"
    proj.mkdir()
    (proj / "buildcell.yaml").write_text(SPEC)
    res = bc(
        "build", "--sign-key", str(keys / "buildcell.key"), "--project", "acme",
        "--trust", "trusted", "--ref", "refs/heads/main", "--secret", "token=env:TOKEN",
        "--add-host", "mirror.test:10.0.0.5", "--allow", "10.0.0.5:3128",
        "--allow-fetch", "10.0.0.6:8080", cwd=proj, env={"TOKEN": "value-of-token"},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    return proj / "buildcell-out" / "provenance.intoto.jsonl", keys / "buildcell.pub"


def test_external_parameters_hold_every_invoker_choice(signed: tuple[Path, Path]) -> None:
    provenance, _ = signed
    definition = _statement(provenance)["predicate"]["buildDefinition"]
    assert definition["externalParameters"]["invocation"] == {
        "project": "acme",
        "trust": "trusted",
        "ref": "refs/heads/main",
        "secrets": ["token"],
        "pinnedHosts": ["mirror.test:10.0.0.5"],
        "allow": ["10.0.0.5:3128"],
        "allowFetch": ["10.0.0.6:8080"],
        "unsafe": [],
    }
    internal = definition["internalParameters"]
    assert "invocation" not in internal
    assert internal["bubblewrapVersion"].startswith("bubblewrap ")
    assert internal["kernel"].startswith("Linux ")
    assert "value-of-token" not in provenance.read_text()


def test_the_host_rootfs_has_a_digest(signed: tuple[Path, Path]) -> None:
    provenance, _ = signed
    deps = _statement(provenance)["predicate"]["buildDefinition"]["resolvedDependencies"]
    (rootfs,) = [d for d in deps if d.get("name") == "rootfs"]
    assert rootfs["uri"] == "host:/usr"
    assert len(rootfs["digest"]["sha256"]) == 64
    assert rootfs["annotations"]["covers"]


@pytest.mark.parametrize(
    ("flag", "good", "bad"),
    [
        ("--expect-ref", "refs/heads/main", "refs/pull/1/merge"),
        ("--expect-trust", "trusted", "untrusted"),
        ("--expect-project", "acme", "other"),
    ],
)
def test_verify_pins_invoker_choices(
    bc: RunCLI, signed: tuple[Path, Path], flag: str, good: str, bad: str
) -> None:
    provenance, public = signed
    base = ("verify", "--key", str(public), "--provenance", str(provenance))
    res = bc(*base, flag, good)
    assert res.returncode == 0, res.stdout
    res = bc(*base, flag, bad)
    assert res.returncode == 1
    assert "FAIL invocation" in res.stdout
    assert bad in res.stdout


def test_a_spec_alone_cannot_reach_private_destinations(bc: RunCLI, tmp_path: Path) -> None:
    proj = tmp_path / "p"
    proj.mkdir()
    for entry in ("127.0.0.1:8000", "127.0.0.0/8:8000", "169.254.169.254:80", "0.0.0.0/0:22",
                  "[::1]:8080", "10.0.0.0/8:443", "8.0.0.0/8:443"):  # fmt: skip
        (proj / "buildcell.yaml").write_text(
            f"version: 1\nname: n\nsteps:\n  - name: s\n    run: 'true'\n"
            f"    network: {{allow: ['{entry}']}}\n"
        )
        res = bc("build", cwd=proj)
        assert res.returncode == 125, entry
        assert "only an operator" in res.stderr or "too broad" in res.stderr, res.stderr
        assert "--allow" in res.stderr
    # The operator may grant it: an exact entry or a network that covers it.
    (proj / "buildcell.yaml").write_text(
        "version: 1\nname: n\nsteps:\n  - name: s\n    run: 'true'\n"
        "    network: {allow: ['127.0.0.1:8000']}\n"
    )
    assert bc("build", "--allow", "127.0.0.0/8:8000", cwd=proj).returncode == 0
    assert bc("build", "--allow", "127.0.0.1:9000", cwd=proj).returncode == 125
    config = tmp_path / "config.yaml"
    config.write_text("network: {allow: ['127.0.0.1:8000']}\n")
    assert bc("build", cwd=proj, env={"BUILDCELL_CONFIG": str(config)}).returncode == 0
