"""Signed provenance, offline verification and rebuild-and-compare, end to end."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, cast

import pytest
from tests.conftest import REPO, RunCLI


@pytest.fixture
def example(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    return tmp_path / "examples"


@pytest.fixture
def keys(bc: RunCLI, tmp_path: Path) -> tuple[Path, Path]:
    res = bc("keygen", "--out", str(tmp_path / "keys"))
    assert res.returncode == 0, res.stderr
    return tmp_path / "keys" / "buildcell.key", tmp_path / "keys" / "buildcell.pub"


def _build(bc: RunCLI, spec: Path, out: Path, *extra: str) -> dict[str, Any]:
    res = bc("build", "-f", str(spec), "--out", str(out), "--json", *extra, cwd=out.parent)
    assert res.returncode == 0, res.stderr
    return cast("dict[str, Any]", json.loads(res.stdout))


def _statement(provenance: Path) -> dict[str, Any]:
    envelope = json.loads(provenance.read_text())
    return cast("dict[str, Any]", json.loads(base64.b64decode(envelope["payload"])))


def test_keygen_modes_and_no_overwrite(bc: RunCLI, keys: tuple[Path, Path], tmp_path: Path) -> None:
    private, public = keys
    assert private.stat().st_mode & 0o777 == 0o600
    assert public.stat().st_mode & 0o777 == 0o644
    again = bc("keygen", "--out", str(tmp_path / "keys"))
    assert again.returncode == 125
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_signed_build_verifies_and_tampering_is_caught(
    bc: RunCLI, keys: tuple[Path, Path], example: Path, tmp_path: Path
) -> None:
    private, public = keys
    out = tmp_path / "out"
    result = _build(
        bc,
        example / "hello-c" / "buildcell.yaml",
        out,
        "--sign-key",
        str(private),
        "--builder-id",
        "https://ci.example/runner/7",
    )
    provenance = out / "provenance.intoto.jsonl"
    assert result["provenance"]["signed"] is True
    statement = _statement(provenance)
    assert {s["name"] for s in statement["subject"]} == {
        "build/hello",
        "dist/hello.tar",
        "hello-c.tar.gz",
    }
    predicate = statement["predicate"]
    assert predicate["runDetails"]["builder"]["id"] == "https://ci.example/runner/7"
    assert predicate["runDetails"]["metadata"]["invocationId"] == result["id"]
    params = predicate["buildDefinition"]["externalParameters"]
    spec_digest = params["spec"]["digest"]["sha256"]
    source_digest = params["source"]["digest"]["sha256"]
    deps = predicate["buildDefinition"]["resolvedDependencies"]
    assert any(d.get("name") == "vendor/greeting.txt" and "sha256" in d["digest"] for d in deps)
    artifacts = [str(out / "build" / "hello"), str(out / "hello-c.tar.gz")]
    ok = bc(
        "verify",
        "--key",
        str(public),
        "--provenance",
        str(provenance),
        *artifacts,
        "--builder-id",
        "https://ci.example/runner/7",
        "--spec-digest",
        spec_digest,
        "--source-digest",
        source_digest,
        "--no-network",
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.rstrip().endswith("verified")

    # One byte flipped in an artifact.
    tampered = tmp_path / "hello"
    data = bytearray((out / "build" / "hello").read_bytes())
    data[100] ^= 1
    tampered.write_bytes(bytes(data))
    res = bc("verify", "--key", str(public), "--provenance", str(provenance), str(tampered))
    assert res.returncode == 1
    assert "FAIL" in res.stdout
    assert "is not a subject" in res.stdout

    # The statement changed, the signature kept.
    envelope = json.loads(provenance.read_text())
    statement["subject"][0]["digest"]["sha256"] = "0" * 64
    envelope["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    forged = tmp_path / "forged.jsonl"
    forged.write_text(json.dumps(envelope))
    res = bc("verify", "--key", str(public), "--provenance", str(forged))
    assert res.returncode == 1
    assert "FAIL signature" in res.stdout

    # One byte of the signature flipped.
    envelope = json.loads(provenance.read_text())
    sig = bytearray(base64.b64decode(envelope["signatures"][0]["sig"]))
    sig[0] ^= 1
    envelope["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    forged.write_text(json.dumps(envelope))
    res = bc("verify", "--key", str(public), "--provenance", str(forged))
    assert res.returncode == 1
    assert "FAIL signature" in res.stdout

    # Another key.
    assert bc("keygen", "--out", str(tmp_path / "other")).returncode == 0
    res = bc(
        "verify",
        "--key",
        str(tmp_path / "other" / "buildcell.pub"),
        "--provenance",
        str(provenance),
    )
    assert res.returncode == 1
    assert "FAIL signature" in res.stdout

    # Expectations that do not hold are each listed.
    res = bc(
        "verify",
        "--key",
        str(public),
        "--provenance",
        str(provenance),
        "--builder-id",
        "https://elsewhere",
        "--spec-digest",
        "0" * 64,
    )
    assert res.returncode == 1
    assert res.stdout.count("FAIL") == 2


def test_unsigned_provenance_by_default(
    bc: RunCLI, example: Path, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    _, public = keys
    out = tmp_path / "out"
    result = _build(bc, example / "python-wheel" / "buildcell.yaml", out)
    assert result["provenance"]["signed"] is False
    res = bc(
        "build",
        "-f",
        str(example / "python-wheel" / "buildcell.yaml"),
        "--out",
        str(out),
        cwd=tmp_path,
    )
    assert "unsigned" in res.stdout
    from buildcell.supply.provenance import validate_statement

    assert validate_statement(_statement(out / "provenance.intoto.jsonl")) == []
    res = bc("verify", "--key", str(public), "--provenance", str(out / "provenance.intoto.jsonl"))
    assert res.returncode == 1


def test_reproducible_example_passes_check_repro(bc: RunCLI, example: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = bc(
        "build",
        "-f",
        str(example / "hello-c" / "buildcell.yaml"),
        "--out",
        str(out),
        "--check-repro",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "reproducible: 3 output(s) identical" in res.stdout


def test_unreproducible_example_fails_check_repro(
    bc: RunCLI, example: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    res = bc(
        "build",
        "-f",
        str(example / "unreproducible" / "buildcell.yaml"),
        "--out",
        str(out),
        "--check-repro",
        "--json",
        cwd=tmp_path,
    )
    assert res.returncode == 1
    report = json.loads(res.stdout)["reproducibility"]
    assert report["reproducible"] is False
    differing = {d["path"] for d in report["differences"]}
    assert differing == {"dist/build-time.txt", "dist/random.bin"}
    text = bc(
        "build",
        "-f",
        str(example / "unreproducible" / "buildcell.yaml"),
        "--out",
        str(out),
        "--check-repro",
        cwd=tmp_path,
    )
    assert "NOT reproducible" in text.stdout
    assert "dist/random.bin: 32 bytes vs 32 bytes, first difference at byte" in text.stdout


def test_source_date_epoch_from_git_commit(bc: RunCLI, tmp_path: Path) -> None:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "buildcell.yaml").write_text(
        "version: 1\nname: sde\nsteps: [{name: s, run: 'mkdir -p o && echo $SOURCE_DATE_EPOCH > o/sde'}]\n"
        'outputs: ["o/sde"]\n'
    )
    out = tmp_path / "out"
    _build(bc, proj / "buildcell.yaml", out)
    assert (out / "o" / "sde").read_text() == "0\n"
    env = {
        "GIT_AUTHOR_DATE": "@1700000000 +0000",
        "GIT_COMMITTER_DATE": "@1700000000 +0000",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@e",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@e",
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
    }
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "x"]):
        subprocess.run(["git", *args], cwd=proj, env=env, check=True)
    result = _build(bc, proj / "buildcell.yaml", out)
    assert (out / "o" / "sde").read_text() == "1700000000\n"
    statement = _statement(out / "provenance.intoto.jsonl")
    source = statement["predicate"]["buildDefinition"]["externalParameters"]["source"]
    assert len(source["digest"]["gitCommit"]) == 40
    assert result["status"] == "succeeded"


def test_dir_rootfs_is_recorded_with_its_digest(
    bc: RunCLI, tmp_path: Path, state_root: Path
) -> None:
    busybox = Path("/bin/busybox")
    if not busybox.exists():
        pytest.skip("/bin/busybox (busybox-static) is not installed")
    root = state_root / "rootfs"  # reachable by the cells' unprivileged uids when root
    (root / "bin").mkdir(parents=True)
    shutil.copy(busybox, root / "bin" / "busybox")
    (root / "bin" / "sh").symlink_to("busybox")
    proj = tmp_path / "p"
    proj.mkdir()
    (proj / "buildcell.yaml").write_text(
        f"version: 1\nname: d\nrootfs: {{dir: {root}}}\n"
        "steps: [{name: s, run: 'busybox mkdir -p o && busybox echo x > o/x'}]\n"
        'outputs: ["o/x"]\n'
    )
    out = tmp_path / "out"
    # A host directory as a spec's rootfs is the operator's grant.
    config = tmp_path / "config.yaml"
    config.write_text(f"rootfs: {{allow: [{root}]}}\n")
    res = bc("build", "-f", str(proj / "buildcell.yaml"), "--out", str(out), cwd=tmp_path)
    assert res.returncode == 125
    assert "host directories come from the operator" in res.stderr
    assert not out.exists()
    res = bc(
        "build", "-f", str(proj / "buildcell.yaml"), "--out", str(out), cwd=tmp_path,
        env={"BUILDCELL_CONFIG": str(config)},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    deps = _statement(out / "provenance.intoto.jsonl")["predicate"]["buildDefinition"][
        "resolvedDependencies"
    ]
    (rootfs,) = [d for d in deps if d.get("name") == "rootfs"]
    assert rootfs["uri"] == f"dir:{root}"
    from buildcell.supply.source import tree_digest

    assert rootfs["digest"]["sha256"] == tree_digest(root)


def test_check_repro_names_the_tarball_member_and_its_mtime(bc: RunCLI, tmp_path: Path) -> None:
    """A step that stamps a tarball's members with the time it ran: the report names each
    member and says that its mtime differs, not only a byte offset."""
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "buildcell.yaml").write_text(
        "version: 1\nname: stamped\nsteps:\n  - name: pack\n    run: |\n"
        "      mkdir -p d dist && echo one > d/a && echo two > d/b\n"
        "      sleep 1.1\n"  # the two builds' seconds differ
        "      tar --format=gnu --sort=name --owner=0 --group=0 --numeric-owner --mode=u=rw,go=r"
        ' --mtime="@$(date +%s)" -cf dist/out.tar -C d a b\n'
        'outputs: ["dist/out.tar"]\n'
    )
    spec = str(proj / "buildcell.yaml")
    res = bc("build", "-f", spec, "--out", str(tmp_path / "o1"), "--check-repro", cwd=tmp_path)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "dist/out.tar: 10240 bytes vs 10240 bytes, first difference at byte" in res.stdout
    lines = [line.strip() for line in res.stdout.splitlines()]
    for member in ("a", "b"):
        (line,) = [x for x in lines if x.startswith(f"member '{member}': ")]
        assert re.fullmatch(rf"member '{member}': mtime \d+ vs \d+", line), line
    res = bc(
        "build", "-f", spec, "--out", str(tmp_path / "o2"), "--check-repro", "--json", cwd=tmp_path
    )
    (diff,) = json.loads(res.stdout)["reproducibility"]["differences"]
    assert diff["archive"]["kind"] == "tar"
    assert [m["name"] for m in diff["archive"]["members"]] == ["a", "b"]
    assert all(m["differs"][0].startswith("mtime ") for m in diff["archive"]["members"])
