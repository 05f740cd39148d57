"""Other people's tools verify a real build's provenance, as docs/slsa.md shows.

A signed build with the real CLI writes ``provenance.intoto.jsonl`` (a DSSE envelope) and
``provenance.sigstore.json`` (the same envelope as a Sigstore bundle v0.3). @sigstore/verify
(npm) accepts the bundle and securesystemslib the envelope, with buildcell's public key and
nothing else, offline; each rejects them after one byte of the payload is flipped, after the
signature is changed, and with another key. The recipes are the scripts in tests/verifiers/.

@sigstore/verify is installed once by ``scripts/verifier-deps.sh`` into ``.verifiers/`` (or
``$BUILDCELL_VERIFIERS_DIR``), which keeps itself out of git; without npm those tests skip.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.dsse import Envelope
from securesystemslib.exceptions import VerificationError
from securesystemslib.signer import SSlibKey
from tests.conftest import REPO, cli_env

from buildcell.supply.provenance import (
    BUNDLE_MEDIA_TYPE,
    PAYLOAD_TYPE,
    ProvenanceError,
    SigningKey,
    generate_keypair,
    load_private_key,
    load_public_key,
    pae,
    sigstore_bundle,
    unsigned_envelope,
)

VERIFIERS = REPO / "tests" / "verifiers"
SPEC = """\
version: 1
name: verifiers
steps:
  - name: build
    run: "mkdir -p dist && printf 'hello\\n' > dist/hello.txt"
outputs: ["dist/*"]
"""

Json = dict[str, Any]


@dataclass(frozen=True)
class Keys:
    private: Path
    public: Path


@dataclass(frozen=True)
class Build:
    out: Path
    keys: Keys
    other: Keys  # a key pair that did not sign anything

    @property
    def provenance(self) -> Path:
        return self.out / "provenance.intoto.jsonl"

    @property
    def bundle(self) -> Path:
        return self.out / "provenance.sigstore.json"

    @property
    def artifact(self) -> Path:
        return self.out / "dist" / "hello.txt"


def _keys(directory: Path) -> Keys:
    private, public = generate_keypair(directory)
    return Keys(private, public)


def _build(proj: Path, state: Path, *args: str) -> Path:
    proj.mkdir()
    (proj / "buildcell.yaml").write_text(SPEC)
    res = subprocess.run(
        [sys.executable, "-m", "buildcell", "build", "--project", "acme", *args],
        cwd=proj, env=cli_env(state), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    return proj / "buildcell-out"


@pytest.fixture(scope="module")
def state() -> Iterator[Path]:
    # As root, cells run as unprivileged host uids: the state directory must be reachable.
    root = Path(tempfile.mkdtemp(prefix="bc-state-", dir="/tmp"))
    os.chmod(root, 0o711)
    yield root / "state"
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory, state: Path) -> Build:
    """One real signed build, shared by the tests here (they only read it)."""
    base = tmp_path_factory.mktemp("external-verifiers")
    keys, other = _keys(base / "keys"), _keys(base / "other")
    out = _build(
        base / "p", state, "--sign-key", str(keys.private), "--trust", "trusted",
        "--ref", "refs/heads/main",
    )  # fmt: skip
    return Build(out, keys, other)


@pytest.fixture(scope="session")
def node_modules() -> Path:
    """@sigstore/verify, installed by scripts/verifier-deps.sh once per session at most."""
    if shutil.which("npm") is None or shutil.which("node") is None:
        pytest.skip(
            "npm and node are needed to install @sigstore/verify (scripts/verifier-deps.sh)"
        )
    directory = Path(os.environ.get("BUILDCELL_VERIFIERS_DIR") or REPO / ".verifiers")
    res = subprocess.run(
        [str(REPO / "scripts" / "verifier-deps.sh"), str(directory)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    if res.returncode != 0:
        reason = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
        pytest.skip(f"@sigstore/verify could not be installed: {reason[0]}")
    return directory.resolve() / "node_modules"


def _node(node_modules: Path, script: str, *args: Path | str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "NODE_PATH": str(node_modules)}
    return subprocess.run(
        ["node", str(VERIFIERS / script), *map(str, args)],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def _sigstore_verify(
    node_modules: Path, key: Path, bundle: Path, *artifacts: Path
) -> subprocess.CompletedProcess[str]:
    return _node(node_modules, "sigstore-verify.js", "--key", key, "--bundle", bundle, *artifacts)


def _sslib_verify(
    key: Path, provenance: Path, *artifacts: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(VERIFIERS / "sslib_verify.py"), "--key", str(key),
         "--provenance", str(provenance), *map(str, artifacts)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


# --- tampering: each takes a DSSE envelope (as a dict) and the build, and changes it ---------


def _flip_payload_byte(envelope: Json, build: Build) -> None:
    payload = bytearray(base64.b64decode(envelope["payload"]))
    payload[len(payload) // 2] ^= 0x01
    envelope["payload"] = base64.b64encode(bytes(payload)).decode()


def _change_signature(envelope: Json, build: Build) -> None:
    sig = bytearray(base64.b64decode(envelope["signatures"][0]["sig"]))
    sig[0] ^= 0x01
    envelope["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()


def _resign_with_another_key(envelope: Json, build: Build) -> None:
    """A forger's signature over the same payload, still claiming the builder's keyid."""
    forger = load_private_key(build.other.private)
    message = pae(envelope["payloadType"], base64.b64decode(envelope["payload"]))
    envelope["signatures"][0]["sig"] = base64.b64encode(forger.sign(message)).decode()


TAMPERING: dict[str, Callable[[Json, Build], None]] = {
    "one payload byte flipped": _flip_payload_byte,
    "signature changed": _change_signature,
    "signed by another key": _resign_with_another_key,
}


def _tampered_bundle(build: Build, tmp_path: Path, tamper: Callable[[Json, Build], None]) -> Path:
    bundle = json.loads(build.bundle.read_text())
    tamper(bundle["dsseEnvelope"], build)
    path = tmp_path / "tampered.sigstore.json"
    path.write_text(json.dumps(bundle))
    return path


def _tampered_envelope(build: Build, tmp_path: Path, tamper: Callable[[Json, Build], None]) -> Path:
    envelope = json.loads(build.provenance.read_text())
    tamper(envelope, build)
    path = tmp_path / "tampered.intoto.jsonl"
    path.write_text(json.dumps(envelope))
    return path


def _keyid(public: Path) -> str:
    return load_public_key(public).keyid


# --- the bundle --------------------------------------------------------------------------------


def test_a_signed_build_writes_its_envelope_as_a_sigstore_bundle(build: Build) -> None:
    envelope = json.loads(build.provenance.read_text())
    bundle = json.loads(build.bundle.read_text())
    assert (
        bundle["mediaType"] == BUNDLE_MEDIA_TYPE == "application/vnd.dev.sigstore.bundle.v0.3+json"
    )
    assert bundle["verificationMaterial"] == {
        "publicKey": {"hint": _keyid(build.keys.public)},
        "tlogEntries": [],
    }
    # The same payload, type and signature, byte for byte: one signing, two containers.
    assert bundle["dsseEnvelope"] == envelope
    assert envelope["signatures"][0]["keyid"] == _keyid(build.keys.public)
    public = load_public_key(build.keys.public)
    assert build.bundle.read_bytes() == sigstore_bundle(build.provenance.read_bytes(), public)
    assert build.bundle.stat().st_mode & 0o777 == 0o644


def test_an_unsigned_build_writes_no_bundle(tmp_path: Path, state: Path) -> None:
    out = _build(tmp_path / "p", state)
    assert json.loads((out / "provenance.intoto.jsonl").read_text())["signatures"] == []
    assert not (out / "provenance.sigstore.json").exists()


def test_the_bundle_is_what_the_sigstore_schema_describes(build: Build, node_modules: Path) -> None:
    res = _node(node_modules, "bundle-canonical.js", build.bundle)
    assert res.returncode == 0, res.stderr
    ours = json.loads(build.bundle.read_text())
    # proto3 JSON leaves an empty repeated field out; everything else is the same.
    del ours["verificationMaterial"]["tlogEntries"]
    assert json.loads(res.stdout) == ours


def _make_key() -> SigningKey:
    return SigningKey(Ed25519PrivateKey.generate())


def test_no_bundle_is_made_of_an_envelope_it_cannot_vouch_for(build: Build) -> None:
    envelope = build.provenance.read_bytes()
    statement = json.loads(base64.b64decode(json.loads(envelope)["payload"]))
    with pytest.raises(ProvenanceError, match="exactly one signature"):
        sigstore_bundle(unsigned_envelope(statement), load_public_key(build.keys.public))
    with pytest.raises(ProvenanceError, match="signed by"):
        sigstore_bundle(envelope, _make_key().public)
    forged = json.loads(envelope)
    _flip_payload_byte(forged, build)
    with pytest.raises(ProvenanceError, match="does not verify"):
        sigstore_bundle(json.dumps(forged).encode(), load_public_key(build.keys.public))


# --- @sigstore/verify --------------------------------------------------------------------------


def test_sigstore_verify_accepts_the_bundle(build: Build, node_modules: Path) -> None:
    res = _sigstore_verify(node_modules, build.keys.public, build.bundle, build.artifact)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith(f"verified: signed by {_keyid(build.keys.public)}")


@pytest.mark.parametrize("tampering", TAMPERING)
def test_sigstore_verify_rejects_a_tampered_bundle(
    build: Build, node_modules: Path, tmp_path: Path, tampering: str
) -> None:
    bundle = _tampered_bundle(build, tmp_path, TAMPERING[tampering])
    res = _sigstore_verify(node_modules, build.keys.public, bundle)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "SIGNATURE_ERROR" in res.stdout


def test_sigstore_verify_rejects_the_bundle_with_another_key(
    build: Build, node_modules: Path
) -> None:
    res = _sigstore_verify(node_modules, build.other.public, build.bundle)
    assert res.returncode == 1
    # The bundle's hint names the builder's key, and the verifier was given another one.
    assert f"PUBLIC_KEY_ERROR: key not found: {_keyid(build.keys.public)}" in res.stdout


def test_sigstore_verify_rejects_a_forgery_that_names_its_own_key(
    build: Build, node_modules: Path, tmp_path: Path
) -> None:
    bundle = json.loads(build.bundle.read_text())
    _resign_with_another_key(bundle["dsseEnvelope"], build)
    forged_id = _keyid(build.other.public)
    bundle["verificationMaterial"]["publicKey"]["hint"] = forged_id
    bundle["dsseEnvelope"]["signatures"][0]["keyid"] = forged_id
    path = tmp_path / "forged.sigstore.json"
    path.write_text(json.dumps(bundle))
    res = _sigstore_verify(node_modules, build.keys.public, path)
    assert res.returncode == 1
    assert f"key not found: {forged_id}" in res.stdout


def test_sigstore_verify_rejects_an_artifact_that_is_not_a_subject(
    build: Build, node_modules: Path, tmp_path: Path
) -> None:
    other = tmp_path / "hello.txt"
    other.write_bytes(build.artifact.read_bytes() + b"!")
    res = _sigstore_verify(node_modules, build.keys.public, build.bundle, other)
    assert res.returncode == 1
    assert "is not a subject" in res.stdout


# --- securesystemslib ----------------------------------------------------------------------------


def test_securesystemslib_accepts_the_envelope(build: Build) -> None:
    res = _sslib_verify(build.keys.public, build.provenance, build.artifact)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith(f"verified: signed by {_keyid(build.keys.public)}")


@pytest.mark.parametrize("tampering", TAMPERING)
def test_securesystemslib_rejects_a_tampered_envelope(
    build: Build, tmp_path: Path, tampering: str
) -> None:
    res = _sslib_verify(
        build.keys.public, _tampered_envelope(build, tmp_path, TAMPERING[tampering])
    )
    assert res.returncode == 1, res.stdout + res.stderr
    assert "not verified: VerificationError" in res.stdout


def test_securesystemslib_rejects_the_envelope_with_another_key(build: Build) -> None:
    res = _sslib_verify(build.other.public, build.provenance)
    assert res.returncode == 1
    assert "Found: 0, Expected 1" in res.stdout


def test_securesystemslib_rejects_an_artifact_that_is_not_a_subject(
    build: Build, tmp_path: Path
) -> None:
    other = tmp_path / "hello.txt"
    other.write_bytes(build.artifact.read_bytes() + b"!")
    res = _sslib_verify(build.keys.public, build.provenance, other)
    assert res.returncode == 1
    assert "is not a subject" in res.stdout


def test_securesystemslib_needs_buildcell_s_keyid_passed_by_hand(build: Build) -> None:
    public = serialization.load_pem_public_key(build.keys.public.read_bytes())
    envelope = Envelope.from_dict(json.loads(build.provenance.read_text()))
    assert envelope.payload_type == PAYLOAD_TYPE
    # securesystemslib's own keyid for the key is another hash: no signature matches it.
    own = SSlibKey.from_crypto(public)
    assert own.keyid != _keyid(build.keys.public)
    with pytest.raises(VerificationError):
        envelope.verify([own], 1)
    # buildcell's rule: sha256: + hex SHA-256 of the DER SubjectPublicKeyInfo.
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    keyid = "sha256:" + hashlib.sha256(der).hexdigest()
    assert keyid == _keyid(build.keys.public)
    key = SSlibKey.from_crypto(public, keyid=keyid)
    assert envelope.verify([key], 1) == {keyid: key}
