"""Four builds of one checkout started together, all writing the default output directory:
one owns it at a time, and afterwards its manifest, its signed provenance and its files
describe the same bytes."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import cli_env
from tests.reliability.conftest import cli

pytestmark = pytest.mark.slow

FILES = 50
SPEC = f"""\
version: 1
name: shared
steps:
  - name: make
    run: |
      mkdir -p dist
      tag=$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \\n')
      for i in $(seq 1 {FILES}); do echo "$tag $i" > dist/f$i; sleep 0.01; done
outputs: ["dist/*"]
"""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_four_builds_on_one_output_directory(work: Path) -> None:
    src = work / "src"
    src.mkdir(mode=0o755)
    (src / "buildcell.yaml").write_text(SPEC)
    state = work / "state"
    keys = work / "keys"
    made = cli(state, "keygen", "--out", str(keys), cwd=work)
    assert made.returncode == 0, made.stderr
    (key,) = keys.glob("*.key")
    (pub,) = keys.glob("*.pub")
    builds = [
        subprocess.Popen(
            [sys.executable, "-m", "buildcell", "build", "--sign-key", str(key)],
            cwd=src,
            env=cli_env(state),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results = [(p.wait(timeout=300), *p.communicate()) for p in builds]
    for code, _, err in results:
        assert code == 0, err[-2000:]
    waited = sum("waiting for another build" in err for _, _, err in results)
    assert waited >= 1, "no build said it waited for the output directory"

    out = src / "buildcell-out"
    manifest = json.loads((out / "outputs.json").read_text())
    listed = {o["path"]: o["sha256"] for o in manifest["outputs"]}
    assert len(listed) == FILES
    present = {p.relative_to(out).as_posix() for p in (out / "dist").iterdir()}
    assert present == set(listed)
    for rel, digest in listed.items():
        assert _sha256(out / rel) == digest, f"{rel} is another build's"
    tags = {(out / rel).read_text().split()[0] for rel in listed}
    assert len(tags) == 1, "the files come from more than one build"

    envelope = json.loads((out / "provenance.intoto.jsonl").read_text().splitlines()[0])
    statement = json.loads(base64.b64decode(envelope["payload"]))
    subjects = {s["name"]: s["digest"]["sha256"] for s in statement["subject"]}
    assert subjects == listed
    verified = cli(
        state,
        "verify",
        "--key",
        str(pub),
        "--provenance",
        str(out / "provenance.intoto.jsonl"),
        *[str(out / rel) for rel in sorted(listed)],
        cwd=src,
    )
    assert verified.returncode == 0, verified.stderr[-2000:]
    assert [p.name for p in src.iterdir() if ".buildcell-" in p.name] == []
