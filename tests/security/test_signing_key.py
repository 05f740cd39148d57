"""The signing key is out of every build's reach (SLSA Build L3).

A build that could read the key could sign provenance for anything it likes, and a verifier
would accept it. Each test is a build trying one way to reach the key; each fails, and the
provenance of an honest build still verifies.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from tests.conftest import RunCLI


@pytest.fixture
def keypair(bc: RunCLI, tmp_path: Path) -> tuple[Path, Path]:
    keys = tmp_path / "keys"
    res = bc("keygen", "--out", str(keys))
    assert res.returncode == 0, res.stderr
    return keys / "buildcell.key", keys / "buildcell.pub"


def _spec(directory: Path, steps: str, *, inputs: str = "", rootfs: str = "host") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "buildcell.yaml").write_text(
        f"version: 1\nname: k\nrootfs: {rootfs}\n{inputs}steps:\n{steps}outputs: ['o/*']\n"
    )
    return directory


PROBE = """\
  - name: probe
    run: |
      mkdir -p o
      set +e
      { env; ls -la /proc/self/fd/ /proc/1/fd/ 2>&1; cat /proc/1/environ 2>&1;
        ls /proc; grep -rsl 'PRIVATE KEY' /workspace /tmp /home /etc /run /dev/shm; true;
      } > o/probe.txt 2>&1
"""


def test_a_build_finds_the_key_nowhere(
    bc: RunCLI, keypair: tuple[Path, Path], tmp_path: Path
) -> None:
    private, public = keypair
    pem = private.read_text()
    body = pem.splitlines()[1]
    proj = _spec(tmp_path / "p", PROBE)
    res = bc("build", "--sign-key", str(private), cwd=proj)
    assert res.returncode == 0, res.stderr
    probe = (proj / "buildcell-out" / "o" / "probe.txt").read_text()
    assert body not in probe
    assert str(private) not in probe
    assert "PRIVATE KEY" not in probe
    res = bc("verify", "--key", str(public), "--provenance",
             str(proj / "buildcell-out" / "provenance.intoto.jsonl"))  # fmt: skip
    assert res.returncode == 0, res.stdout


def test_the_key_as_a_file_input_is_refused(
    bc: RunCLI, keypair: tuple[Path, Path], tmp_path: Path
) -> None:
    private, _ = keypair
    proj = tmp_path / "p"
    proj.mkdir()
    digest = hashlib.sha256(private.read_bytes()).hexdigest()
    # Every way a spec could name the key: a symlink to it, a path above its directory.
    (proj / "key.pem").symlink_to(private)
    for name in ("key.pem", f"../keys/{private.name}", os.path.relpath(private, proj)):
        _spec(
            proj,
            "  - {name: s, run: 'mkdir o; cat vendor/key > o/stolen'}\n",
            inputs=f"inputs:\n  - {{file: '{name}', sha256: {digest}, path: vendor/key}}\n",
        )
        res = bc("build", "--sign-key", str(private), cwd=proj)
        assert res.returncode == 125, name
        assert not (proj / "buildcell-out").exists()


def test_a_key_inside_the_checkout_is_refused(
    bc: RunCLI, keypair: tuple[Path, Path], tmp_path: Path
) -> None:
    private, _ = keypair
    proj = _spec(tmp_path / "p", "  - {name: s, run: 'mkdir o; cat ci/buildcell.key > o/x'}\n")
    (proj / "ci").mkdir()
    inside = proj / "ci" / "buildcell.key"
    shutil.copy(private, inside)
    res = bc("build", "--sign-key", str(inside), cwd=proj)
    assert res.returncode == 125
    assert "within a build's reach" in res.stderr
    assert not (proj / "buildcell-out").exists()


def test_a_hard_link_to_the_key_is_refused(
    bc: RunCLI, keypair: tuple[Path, Path], tmp_path: Path
) -> None:
    private, _ = keypair
    proj = _spec(tmp_path / "p", "  - {name: s, run: 'mkdir o; cat k > o/x'}\n")
    os.link(private, proj / "k")  # copied into the workspace as a file of its own
    res = bc("build", "--sign-key", str(private), cwd=proj)
    assert res.returncode == 125
    assert "hard links" in res.stderr


def test_a_rootfs_holding_the_key_is_refused(
    bc: RunCLI, keypair: tuple[Path, Path], tmp_path: Path
) -> None:
    private, _ = keypair
    config = tmp_path / "config.yaml"
    config.write_text(f"rootfs: {{allow: [{private.parent}]}}\n")
    proj = _spec(
        tmp_path / "p",
        "  - {name: s, run: 'true'}\n",
        rootfs=f"{{dir: {private.parent}}}",
    )
    res = bc("build", "--sign-key", str(private), cwd=proj,
             env={"BUILDCELL_CONFIG": str(config)})  # fmt: skip
    assert res.returncode == 125
    assert "within a build's reach" in res.stderr


def test_the_key_is_read_only_after_the_last_cell(
    bc: RunCLI, keypair: tuple[Path, Path], tmp_path: Path, state_root: Path
) -> None:
    # The key file is replaced while the build runs: a build that had read it at the start
    # would sign with the old key. It signs with what is on disk at the end.
    private, public = keypair
    proj = _spec(tmp_path / "p", "  - {name: s, run: 'mkdir o; echo x > o/x; sleep 2'}\n")
    other = tmp_path / "other"
    assert bc("keygen", "--out", str(other)).returncode == 0
    import subprocess
    import sys
    import time

    from tests.conftest import cli_env

    env = cli_env(state_root / "state")
    proc = subprocess.Popen(
        [sys.executable, "-m", "buildcell", "build", "--sign-key", str(private), "--json"],
        cwd=proj, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    # Replaced while the build's step runs (its cell has started), not after a guess.
    deadline = time.monotonic() + 60
    builds = state_root / "state" / "builds"
    while time.monotonic() < deadline:
        if any('"cell.start"' in p.read_text() for p in builds.glob("*/events.jsonl")):
            break
        time.sleep(0.01)
    else:
        raise AssertionError("the build's cell never started")
    os.replace(other / "buildcell.key", private)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    keyid = json.loads(out)["provenance"]["keyid"]
    provenance = proj / "buildcell-out" / "provenance.intoto.jsonl"
    envelope = json.loads(provenance.read_text())
    assert envelope["signatures"][0]["keyid"] == keyid
    res = bc("verify", "--key", str(other / "buildcell.pub"), "--provenance", str(provenance))
    assert res.returncode == 0, res.stdout
    res = bc("verify", "--key", str(public), "--provenance", str(provenance))
    assert res.returncode == 1


def test_forged_provenance_does_not_verify(
    bc: RunCLI, keypair: tuple[Path, Path], tmp_path: Path
) -> None:
    _, public = keypair
    proj = _spec(tmp_path / "p", "  - {name: s, run: 'mkdir o; echo x > o/x'}\n")
    forger = tmp_path / "forger"
    assert bc("keygen", "--out", str(forger)).returncode == 0
    res = bc("build", "--sign-key", str(forger / "buildcell.key"), cwd=proj)
    assert res.returncode == 0, res.stderr
    provenance = proj / "buildcell-out" / "provenance.intoto.jsonl"
    envelope = json.loads(provenance.read_text())
    statement = json.loads(base64.b64decode(envelope["payload"]))
    assert statement["subject"]
    res = bc("verify", "--key", str(public), "--provenance", str(provenance))
    assert res.returncode == 1
    assert "FAIL signature" in res.stdout
