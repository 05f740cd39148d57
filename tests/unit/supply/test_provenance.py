"""Provenance: DSSE signing and verification, keys, statement rules, and the secret guard."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from securesystemslib.dsse import Envelope
from securesystemslib.signer import CryptoSigner, SSlibKey

import buildcell
from buildcell.supply.provenance import (
    BUILD_TYPE,
    PAYLOAD_TYPE,
    PREDICATE_TYPE,
    STATEMENT_TYPE,
    Dependency,
    ProvenanceError,
    SigningKey,
    Subject,
    VerifyingKey,
    VerifyReport,
    assert_no_values,
    generate_keypair,
    keyid,
    load_private_key,
    load_public_key,
    make_statement,
    pae,
    sign_statement,
    unsigned_envelope,
    validate_statement,
    verify,
    write_provenance,
)

BUILDER = "https://buildcell.dev/builders/local"
WHEEL = b"PK\x03\x04 pretend this is a wheel\n" * 100
TARBALL = b"\x1f\x8b pretend this is a tarball\n" * 100
SPEC_SHA = hashlib.sha256(b"version: 1\n").hexdigest()
SOURCE_SHA = hashlib.sha256(b"the source listing").hexdigest()
COMMIT = "a" * 40
STARTED = datetime(2024, 5, 1, 12, 0, 0, 250000, tzinfo=UTC)
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)

BASE_CHECKS = [
    "envelope",
    "payload type",
    "payload",
    "signature",
    "statement type",
    "predicate type",
    "statement fields",
]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def statement_for(
    *,
    allow: list[str] | None = None,
    egress: bool = False,
    subjects: list[Subject] | None = None,
) -> dict[str, Any]:
    dependencies = [
        Dependency(uri="oci:/images/base", sha256="sha256:" + "b" * 64, name="rootfs"),
        Dependency(uri="https://example.org/dep.tar.gz", sha256="c" * 64, name="deps/dep.tar.gz"),
    ]
    if egress:
        dependencies.append(
            Dependency(
                uri="tcp://pypi.org:443",
                annotations={
                    "kind": "egress",
                    "host": "pypi.org",
                    "port": 443,
                    "requests": 3,
                    "bytes": 4096,
                },
            )
        )
    return make_statement(
        subjects=subjects
        or [Subject("dist/x.whl", sha256(WHEEL)), Subject("dist/x.tar.gz", sha256(TARBALL))],
        external_parameters={
            "spec": {
                "path": "buildcell.yaml",
                "digest": {"sha256": SPEC_SHA},
                "content": "version: 1\n",
            },
            "source": {
                "uri": "git+file:///src/x",
                "digest": {"sha256": SOURCE_SHA, "gitCommit": COMMIT, "gitTree": "d" * 40},
            },
            "outDir": "dist",
        },
        internal_parameters={
            "buildcellVersion": buildcell.__version__,
            "seccompProfile": {"name": "default", "digest": "sha256:" + "e" * 64},
            "rootfs": "oci:/images/base@sha256:" + "b" * 64,
            "steps": [
                {"name": "fetch", "network": {"allow": allow or []}, "secrets": ["TOKEN"]},
                {"name": "build", "limits": {"memory": 1 << 30}, "network": {"allow": []}},
            ],
        },
        resolved_dependencies=dependencies,
        builder_id=BUILDER,
        invocation_id="20240501-120000-abcd",
        started_on=STARTED,
        finished_on=STARTED + timedelta(minutes=3),
        byproducts=[Dependency(uri="events.jsonl", sha256="f" * 64)],
    )


@pytest.fixture(scope="module")
def signing_key() -> SigningKey:
    return SigningKey(Ed25519PrivateKey.generate())


@pytest.fixture(scope="module")
def other_key() -> SigningKey:
    return SigningKey(Ed25519PrivateKey.generate())


@dataclass
class Signed:
    path: Path
    key: SigningKey
    statement: dict[str, Any]
    wheel: Path
    tarball: Path

    @property
    def verifying_key(self) -> VerifyingKey:
        return self.key.public

    def envelope(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.path.read_bytes())
        return data

    def rewrite(self, change: Callable[[dict[str, Any]], None]) -> None:
        envelope = self.envelope()
        change(envelope)
        self.path.write_text(json.dumps(envelope) + "\n")

    def verify(self, **expectations: Any) -> VerifyReport:
        expectations.setdefault("artifacts", [self.wheel, self.tarball])
        return verify(self.path, key=self.verifying_key, **expectations)


@pytest.fixture
def signed(tmp_path: Path, signing_key: SigningKey) -> Signed:
    statement = statement_for()
    path = tmp_path / "provenance.intoto.jsonl"
    write_provenance(path, sign_statement(statement, signing_key))
    wheel, tarball = tmp_path / "x.whl", tmp_path / "x.tar.gz"
    wheel.write_bytes(WHEEL)
    tarball.write_bytes(TARBALL)
    return Signed(path, signing_key, statement, wheel, tarball)


def checks(report: VerifyReport) -> dict[str, bool]:
    return {check.name: check.ok for check in report.checks}


def failed(report: VerifyReport) -> set[str]:
    return {check.name for check in report.checks if not check.ok}


def detail(report: VerifyReport, name: str) -> str:
    (found,) = [check.detail for check in report.checks if check.name == name]
    return found


def reencode(envelope: dict[str, Any], statement: dict[str, Any]) -> None:
    payload = json.dumps(statement, sort_keys=True, separators=(",", ":")).encode()
    envelope["payload"] = base64.b64encode(payload).decode()


@pytest.fixture
def umask() -> Iterator[Callable[[int], int]]:
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


# --- DSSE ------------------------------------------------------------------------------------


def test_pae_matches_the_dsse_spec_test_vector() -> None:
    assert (
        pae("http://example.com/HelloWorld", b"hello world")
        == b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


def test_pae_counts_bytes_not_characters() -> None:
    assert pae("t\u00e9", b"") == b"DSSEv1 3 t\xc3\xa9 0 "
    assert pae(PAYLOAD_TYPE, b"\x00 \n") == b"DSSEv1 28 application/vnd.in-toto+json 3 \x00 \n"


# --- keys ------------------------------------------------------------------------------------


def test_generate_keypair_writes_a_private_and_a_public_key(
    tmp_path: Path, umask: Callable[[int], int]
) -> None:
    umask(0o077)  # the modes must not depend on the umask
    key_path, pub_path = generate_keypair(tmp_path / "keys", "release")
    assert (key_path, pub_path) == (tmp_path / "keys/release.key", tmp_path / "keys/release.pub")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(pub_path.stat().st_mode) == 0o644
    assert key_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert pub_path.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----\n")
    assert load_private_key(key_path).keyid == load_public_key(pub_path).keyid


def test_generate_keypair_default_name(tmp_path: Path) -> None:
    assert generate_keypair(tmp_path) == (tmp_path / "buildcell.key", tmp_path / "buildcell.pub")


def test_generate_keypair_refuses_to_overwrite(tmp_path: Path) -> None:
    key_path, pub_path = generate_keypair(tmp_path)
    before = key_path.read_bytes(), pub_path.read_bytes()
    with pytest.raises(ProvenanceError, match="already exists; refusing to overwrite") as info:
        generate_keypair(tmp_path)
    assert info.value.exit_code == 125
    assert (key_path.read_bytes(), pub_path.read_bytes()) == before


def test_generate_keypair_refuses_when_only_the_public_key_exists(tmp_path: Path) -> None:
    (tmp_path / "buildcell.pub").write_text("someone else's key\n")
    with pytest.raises(ProvenanceError, match=re.escape("buildcell.pub already exists")):
        generate_keypair(tmp_path)
    assert not (tmp_path / "buildcell.key").exists()


def test_generate_keypair_does_not_follow_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    (tmp_path / "buildcell.key").symlink_to(target)
    with pytest.raises(ProvenanceError, match="refusing to overwrite"):
        generate_keypair(tmp_path)
    assert not target.exists()


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../evil"])
def test_generate_keypair_rejects_a_name_that_is_not_a_file_name(tmp_path: Path, name: str) -> None:
    with pytest.raises(ProvenanceError, match="invalid key name"):
        generate_keypair(tmp_path, name)


def test_load_round_trip_signs_and_verifies(tmp_path: Path) -> None:
    key_path, pub_path = generate_keypair(tmp_path)
    signing, verifying = load_private_key(key_path), load_public_key(pub_path)
    signature = signing.sign(b"data")
    assert verifying.verify(signature, b"data")
    assert not verifying.verify(signature, b"other data")
    assert not verifying.verify(b"short", b"data")


def test_keyid_is_sha256_of_the_der_subject_public_key_info(tmp_path: Path) -> None:
    _, pub_path = generate_keypair(tmp_path)
    public = serialization.load_pem_public_key(pub_path.read_bytes())
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    expected = "sha256:" + sha256(der)
    assert load_public_key(pub_path).keyid == expected
    assert load_public_key(pub_path).keyid == expected  # stable across loads
    assert keyid(load_public_key(pub_path).public_key) == expected


def test_keys_do_not_show_key_material_in_repr(signing_key: SigningKey) -> None:
    assert repr(signing_key) == f"SigningKey({signing_key.keyid})"
    assert repr(signing_key.public) == f"VerifyingKey({signing_key.keyid})"


def _pem_private(key: Any, encryption: Any = None) -> bytes:
    data: bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        encryption or serialization.NoEncryption(),
    )
    return data


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read private key"),
        (b"not a key\n", "is not a PEM private key"),
        (
            _pem_private(
                Ed25519PrivateKey.generate(), serialization.BestAvailableEncryption(b"pw")
            ),
            "is encrypted",
        ),
        (
            _pem_private(RSA_KEY),
            "is a RSA key; buildcell signs with Ed25519",
        ),
    ],
    ids=["missing", "garbage", "encrypted", "rsa"],
)
def test_load_private_key_errors(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "k.key"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ProvenanceError, match=message):
        load_private_key(path)


def test_load_public_key_errors(tmp_path: Path) -> None:
    key_path, _ = generate_keypair(tmp_path)
    with pytest.raises(ProvenanceError, match="is not a PEM public key"):
        load_public_key(key_path)
    with pytest.raises(ProvenanceError, match="cannot read public key"):
        load_public_key(tmp_path / "missing.pub")
    rsa_pub = tmp_path / "rsa.pub"
    rsa_pub.write_bytes(
        RSA_KEY.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(ProvenanceError, match="is a RSA key"):
        load_public_key(rsa_pub)


def test_load_private_key_warns_when_others_can_read_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key_path, _ = generate_keypair(tmp_path)
    key_path.chmod(0o644)
    load_private_key(key_path)
    assert "can be read by other users" in caplog.text


# --- statements ------------------------------------------------------------------------------


def test_make_statement_builds_slsa_provenance() -> None:
    statement = statement_for()
    assert validate_statement(statement) == []
    assert statement["_type"] == STATEMENT_TYPE
    assert statement["predicateType"] == PREDICATE_TYPE
    assert statement["subject"][0] == {"name": "dist/x.whl", "digest": {"sha256": sha256(WHEEL)}}
    definition = statement["predicate"]["buildDefinition"]
    assert definition["buildType"] == BUILD_TYPE
    assert definition["externalParameters"]["outDir"] == "dist"
    # "sha256:" prefixes are dropped; empty fields are left out.
    assert definition["resolvedDependencies"][0] == {
        "uri": "oci:/images/base",
        "digest": {"sha256": "b" * 64},
        "name": "rootfs",
    }
    details = statement["predicate"]["runDetails"]
    assert details["builder"] == {"id": BUILDER, "version": {"buildcell": buildcell.__version__}}
    assert details["metadata"] == {
        "invocationId": "20240501-120000-abcd",
        "startedOn": "2024-05-01T12:00:00.250Z",
        "finishedOn": "2024-05-01T12:03:00.250Z",
    }
    assert details["byproducts"] == [{"uri": "events.jsonl", "digest": {"sha256": "f" * 64}}]


def test_make_statement_converts_times_to_utc() -> None:
    plus2 = datetime(2024, 5, 1, 14, 0, 0, tzinfo=UTC).astimezone(timezone(timedelta(hours=2)))
    statement = make_statement(
        subjects=[Subject("a", "0" * 64)],
        external_parameters={},
        internal_parameters={},
        resolved_dependencies=[Dependency(uri="host", name="rootfs")],
        builder_id=BUILDER,
        invocation_id="b",
        started_on=plus2,
        finished_on=plus2,
    )
    assert statement["predicate"]["runDetails"]["metadata"]["startedOn"] == (
        "2024-05-01T14:00:00.000Z"
    )
    assert statement["predicate"]["buildDefinition"]["resolvedDependencies"] == [
        {"uri": "host", "name": "rootfs"}
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"builder_id": "my laptop"}, "runDetails.builder.id: 'my laptop' is not a URI"),
        ({"subjects": []}, "subject: empty"),
        ({"subjects": [Subject("a", "ABC")]}, "subject[0].digest.sha256: 'ABC' is not 64"),
        ({"invocation_id": ""}, "metadata.invocationId: empty"),
        ({"resolved_dependencies": [Dependency(uri="")]}, "at least one of uri, digest"),
    ],
)
def test_make_statement_refuses_an_invalid_statement(change: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {
        "subjects": [Subject("a", "0" * 64)],
        "external_parameters": {},
        "internal_parameters": {},
        "resolved_dependencies": [],
        "builder_id": BUILDER,
        "invocation_id": "b",
        "started_on": STARTED,
        "finished_on": STARTED,
    } | change
    with pytest.raises(ProvenanceError, match=re.escape(message)):
        make_statement(**arguments)


def test_make_statement_caller_bugs_are_not_provenance_errors() -> None:
    arguments: dict[str, Any] = {
        "subjects": [Subject("a", "0" * 64)],
        "external_parameters": {},
        "internal_parameters": {},
        "resolved_dependencies": [],
        "builder_id": BUILDER,
        "invocation_id": "b",
        "started_on": STARTED,
        "finished_on": STARTED,
    }
    with pytest.raises(ValueError, match="timezone-aware"):
        make_statement(**arguments | {"started_on": datetime(2024, 1, 1)})
    with pytest.raises(TypeError, match="PosixPath"):
        make_statement(**arguments | {"external_parameters": {"outDir": Path("dist")}})
    with pytest.raises(ValueError, match="no JSON form"):
        make_statement(**arguments | {"internal_parameters": {"cpus": float("nan")}})


def test_make_statement_refuses_names_that_are_not_unicode() -> None:
    with pytest.raises(ProvenanceError, match="not valid Unicode"):
        make_statement(
            subjects=[Subject("caf\udce9", "0" * 64)],  # a surrogate-escaped file name
            external_parameters={},
            internal_parameters={},
            resolved_dependencies=[],
            builder_id=BUILDER,
            invocation_id="b",
            started_on=STARTED,
            finished_on=STARTED,
        )


def _broken(path: str, value: Any) -> dict[str, Any]:
    """A valid statement with the field at dotted ``path`` set to ``value`` (``...`` deletes)."""
    statement = statement_for()
    *parents, last = path.split(".")
    node: Any = statement
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if value is ...:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return statement


@pytest.mark.parametrize(
    ("statement", "message"),
    [
        (_broken("subject", ...), "subject: missing"),
        (_broken("subject", []), "subject: empty"),
        (_broken("subject", {"name": "a"}), "subject: expected an array, found an object"),
        (_broken("subject.0.name", ""), "subject[0].name: empty"),
        (_broken("subject.0.name", ...), "subject[0].name: missing"),
        (_broken("subject.0.digest", ...), "subject[0].digest: missing"),
        (_broken("subject.0.digest", {"sha512": "ab" * 64}), "a subject needs a sha256 digest"),
        (_broken("subject.0.digest.sha256", "xyz"), "subject[0].digest.sha256: 'xyz' is not 64"),
        (_broken("subject.0.digest.sha256", "A" * 64), "is not 64 lowercase hex digits"),
        (_broken("subject.0.digest.sha256", "a" * 63), "is not 64 lowercase hex digits"),
        (_broken("subject.0.digest.sha256", 7), "expected a non-empty string, found a number"),
        (_broken("subject.0.digest", {}), "subject[0].digest: an empty digest set"),
        (_broken("_type", "https://in-toto.io/Statement/v0.1"), "_type: 'https://in-toto.io/"),
        (_broken("predicateType", ...), "predicateType: missing"),
        (_broken("predicate", ...), "predicate: missing"),
        (_broken("predicate", []), "predicate: expected an object, found an array"),
        (_broken("predicate.buildDefinition", ...), "predicate.buildDefinition: missing"),
        (
            _broken("predicate.buildDefinition.buildType", "buildcell v1"),
            "predicate.buildDefinition.buildType: 'buildcell v1' is not a URI",
        ),
        (
            _broken("predicate.buildDefinition.buildType", "HTTPS://buildcell.dev/x"),
            "must be lowercase",
        ),
        (
            _broken("predicate.buildDefinition.buildType", "https://BuildCell.dev/x"),
            "must be lowercase",
        ),
        (_broken("predicate.buildDefinition.buildType", 1), "buildType: expected a string"),
        (
            _broken("predicate.buildDefinition.externalParameters", ...),
            "predicate.buildDefinition.externalParameters: missing",
        ),
        (
            _broken("predicate.buildDefinition.internalParameters", "x"),
            "internalParameters: expected an object, found a string",
        ),
        (
            _broken("predicate.buildDefinition.resolvedDependencies.0", {"name": "rootfs"}),
            "resolvedDependencies[0]: a resource descriptor needs at least one of uri, digest "
            "and content",
        ),
        (
            _broken("predicate.buildDefinition.resolvedDependencies.0", {"uri": "", "digest": {}}),
            "resolvedDependencies[0].digest: an empty digest set",
        ),
        (
            _broken("predicate.buildDefinition.resolvedDependencies.1.digest.gitCommit", "x"),
            "resolvedDependencies[1].digest.gitCommit: 'x' is not 40 or 64 lowercase hex",
        ),
        (
            _broken("predicate.buildDefinition.resolvedDependencies.0", {"content": "not base64!"}),
            "resolvedDependencies[0].content: not base64",
        ),
        (
            _broken("predicate.buildDefinition.resolvedDependencies.0.annotations", []),
            "annotations: expected an object, found an array",
        ),
        (_broken("predicate.runDetails.builder.id", ...), "runDetails.builder.id: missing"),
        (_broken("predicate.runDetails.builder.id", "local"), "'local' is not a URI"),
        (
            _broken("predicate.runDetails.builder.version.buildcell", 1),
            "builder.version.buildcell: expected a string, found a number",
        ),
        (
            _broken("predicate.runDetails.metadata.startedOn", "2024-05-01 12:00:00"),
            "metadata.startedOn: '2024-05-01 12:00:00' is not an RFC 3339 UTC timestamp",
        ),
        (
            _broken("predicate.runDetails.metadata.finishedOn", "2024-02-30T00:00:00Z"),
            "metadata.finishedOn: '2024-02-30T00:00:00Z' is not an RFC 3339",
        ),
        (
            _broken("predicate.runDetails.metadata.finishedOn", "2024-05-01T12:00:00+02:00"),
            "is not an RFC 3339 UTC timestamp",
        ),
        (_broken("predicate.runDetails.metadata.invocationId", ""), "invocationId: empty"),
        (_broken("predicate.runDetails.metadata.invocationId", 5), "invocationId: expected a"),
        (
            _broken("predicate.runDetails.byproducts", [{}]),
            "runDetails.byproducts[0]: a resource descriptor needs at least one of",
        ),
        (
            _broken("predicate.runDetails.byproducts", ["events.jsonl"]),
            "byproducts[0]: expected an object, found a string",
        ),
    ],
)
def test_validate_statement_reports_broken_fields(statement: dict[str, Any], message: str) -> None:
    problems = validate_statement(statement)
    assert any(message in problem for problem in problems), problems


def test_validate_statement_accepts_what_in_toto_allows() -> None:
    statement = statement_for()
    # Unknown fields are ignored, null is unset, optional parts may be missing.
    statement["extension"] = {"x": 1}
    statement["predicate"]["runDetails"]["metadata"] = None
    del statement["predicate"]["buildDefinition"]["internalParameters"]
    statement["predicate"]["buildDefinition"]["resolvedDependencies"] = [
        {"content": base64.b64encode(b"x").decode()},
        {"digest": {"sha256": "0" * 64, "somecoolhash": "not-hex-but-unknown"}},
    ]
    statement["predicate"]["runDetails"]["byproducts"] = []
    assert validate_statement(statement) == []
    statement["predicate"]["runDetails"]["metadata"] = {"startedOn": "1985-04-12T23:20:50.52Z"}
    assert validate_statement(statement) == []


def test_validate_statement_collects_every_problem() -> None:
    statement = _broken("subject", [])
    statement["predicate"]["runDetails"]["builder"]["id"] = "nope"
    assert len(validate_statement(statement)) == 2
    assert validate_statement([]) == ["the statement is an array, not an object"]  # type: ignore[arg-type]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)


@given(json_values)
def test_validate_statement_never_raises(value: Any) -> None:
    problems = validate_statement(value if isinstance(value, dict) else {"predicate": value})
    assert problems and all(isinstance(p, str) for p in problems)


@given(
    path=st.sampled_from(
        [
            "subject.0",
            "subject.0.digest",
            "predicate.buildDefinition",
            "predicate.buildDefinition.resolvedDependencies.0",
            "predicate.runDetails.builder",
            "predicate.runDetails.metadata",
            "predicate.runDetails.byproducts",
        ]
    ),
    value=json_values,
)
def test_validate_statement_never_raises_on_a_mangled_statement(path: str, value: Any) -> None:
    assert all(isinstance(p, str) for p in validate_statement(_broken(path, value)))


# --- signing ---------------------------------------------------------------------------------


def test_signed_envelope_is_one_line_over_the_canonical_statement(
    signing_key: SigningKey,
) -> None:
    statement = statement_for()
    line = sign_statement(statement, signing_key)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    envelope = json.loads(line)
    assert list(envelope) == ["payloadType", "payload", "signatures"]
    assert envelope["payloadType"] == PAYLOAD_TYPE
    payload = base64.b64decode(envelope["payload"], validate=True)
    assert payload == json.dumps(
        statement, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")
    (signature,) = envelope["signatures"]
    assert signature["keyid"] == signing_key.keyid
    signing_key.public.public_key.verify(
        base64.b64decode(signature["sig"]), pae(PAYLOAD_TYPE, payload)
    )


def test_unsigned_envelope_has_no_signatures() -> None:
    statement = statement_for()
    envelope = json.loads(unsigned_envelope(statement))
    assert envelope["signatures"] == []
    assert envelope["payloadType"] == PAYLOAD_TYPE
    assert json.loads(base64.b64decode(envelope["payload"])) == statement


def test_signing_refuses_an_invalid_statement(signing_key: SigningKey) -> None:
    statement = _broken("subject", [])
    with pytest.raises(ProvenanceError, match="refusing to sign an invalid statement"):
        sign_statement(statement, signing_key)
    with pytest.raises(ProvenanceError, match="invalid statement"):
        unsigned_envelope(statement)


def test_write_provenance_is_atomic_and_world_readable(
    tmp_path: Path, umask: Callable[[int], int]
) -> None:
    umask(0o077)
    path = tmp_path / "provenance.intoto.jsonl"
    path.write_text("old\n")
    write_provenance(path, b'{"new": true}\n')
    assert path.read_bytes() == b'{"new": true}\n'
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["provenance.intoto.jsonl"]


def test_write_provenance_error(tmp_path: Path) -> None:
    with pytest.raises(ProvenanceError, match="cannot write provenance"):
        write_provenance(tmp_path / "missing-dir" / "p.jsonl", b"{}\n")


# --- verifying -------------------------------------------------------------------------------


def test_sign_then_verify_passes_every_check(signed: Signed) -> None:
    report = signed.verify(
        builder_id=BUILDER,
        source_digest=f"sha256:{SOURCE_SHA}",
        spec_digest=SPEC_SHA,
        no_network=True,
    )
    assert [c.name for c in report.checks] == [
        *BASE_CHECKS,
        f"artifact {signed.wheel}",
        f"artifact {signed.tarball}",
        "builder id",
        "source digest",
        "spec digest",
        "no network",
    ]
    assert report.ok, report.failures
    assert all(c.ok and c.detail for c in report.checks)
    assert report.statement == signed.statement
    assert "verifies with key " + signed.key.keyid in detail(report, "signature")
    assert detail(report, f"artifact {signed.wheel}") == (
        f"sha256 {sha256(WHEEL)} is the digest of subject 'dist/x.whl'"
    )
    assert report.to_dict()["ok"] is True


def test_verify_without_expectations_runs_the_base_checks(signed: Signed) -> None:
    report = signed.verify(artifacts=[])
    assert [c.name for c in report.checks] == BASE_CHECKS
    assert report.ok


@pytest.mark.parametrize(
    ("expectations", "name"),
    [
        ({"source_digest": COMMIT}, "source digest"),
        ({"source_digest": SOURCE_SHA.upper()}, "source digest"),
        ({"spec_digest": f"sha256:{SPEC_SHA}"}, "spec digest"),
    ],
)
def test_verify_accepts_digest_forms(
    signed: Signed, expectations: dict[str, Any], name: str
) -> None:
    report = signed.verify(**expectations)
    assert report.ok, report.failures
    assert name in checks(report)


def test_our_envelope_verifies_with_securesystemslib(signed: Signed) -> None:
    envelope = Envelope.from_dict(signed.envelope())
    key = SSlibKey.from_crypto(signed.verifying_key.public_key, keyid=signed.key.keyid)
    assert envelope.payload_type == PAYLOAD_TYPE
    assert envelope.verify([key], 1) == {signed.key.keyid: key}
    assert json.loads(envelope.payload) == signed.statement


def test_envelope_signed_by_securesystemslib_verifies_with_ours(tmp_path: Path) -> None:
    private = Ed25519PrivateKey.generate()
    ours = VerifyingKey(private.public_key())
    public = SSlibKey.from_crypto(private.public_key(), keyid=ours.keyid)
    payload = json.dumps(statement_for(), indent=2).encode()  # not our canonical form
    envelope = Envelope(payload=payload, payload_type=PAYLOAD_TYPE, signatures={})
    envelope.sign(CryptoSigner(private, public))
    path = tmp_path / "sslib.intoto.jsonl"
    path.write_text(json.dumps(envelope.to_dict()))
    report = verify(path, key=ours)
    assert report.ok, report.failures
    assert report.statement == statement_for()


def test_a_signature_without_keyid_is_tried(signed: Signed) -> None:
    signed.rewrite(lambda e: e["signatures"][0].pop("keyid"))
    assert signed.verify().ok


def test_tampered_artifact_fails_only_its_check(signed: Signed) -> None:
    data = bytearray(WHEEL)
    data[10] ^= 0x01
    signed.wheel.write_bytes(bytes(data))
    report = signed.verify()
    assert failed(report) == {f"artifact {signed.wheel}"}
    assert detail(report, f"artifact {signed.wheel}") == (
        f"sha256 {sha256(bytes(data))} is not a subject"
    )
    assert [c.name for c in report.checks][: len(BASE_CHECKS)] == BASE_CHECKS


def test_artifact_is_matched_by_digest_not_by_name(signed: Signed, tmp_path: Path) -> None:
    renamed = tmp_path / "renamed.bin"
    renamed.write_bytes(TARBALL)
    report = signed.verify(artifacts=[renamed])
    assert report.ok
    assert "'dist/x.tar.gz'" in detail(report, f"artifact {renamed}")


def test_changed_statement_with_the_old_signature_fails(signed: Signed) -> None:
    forged = statement_for(subjects=[Subject("dist/x.whl", sha256(b"malware"))])
    signed.rewrite(lambda e: reencode(e, forged))
    malware = signed.wheel.parent / "malware"
    malware.write_bytes(b"malware")
    report = signed.verify(artifacts=[malware])
    assert failed(report) == {"signature"}
    assert "does not verify" in detail(report, "signature")
    # The other checks still ran, and the unauthenticated statement is not handed out.
    assert checks(report)["statement fields"] is True
    assert checks(report)[f"artifact {malware}"] is True
    assert report.statement is None
    assert not report.ok


def test_reserialized_payload_fails_verification(signed: Signed) -> None:
    # The same statement in other bytes: the signature covers the bytes, not the meaning.
    indented = json.dumps(signed.statement, indent=1).encode()
    signed.rewrite(lambda e: e.update(payload=base64.b64encode(indented).decode()))
    report = signed.verify()
    assert failed(report) == {"signature"}
    assert checks(report)["statement fields"] is True


def test_flipped_signature_byte_fails(signed: Signed) -> None:
    def flip(envelope: dict[str, Any]) -> None:
        raw = bytearray(base64.b64decode(envelope["signatures"][0]["sig"]))
        raw[0] ^= 0x80
        envelope["signatures"][0]["sig"] = base64.b64encode(bytes(raw)).decode()

    signed.rewrite(flip)
    report = signed.verify()
    assert failed(report) == {"signature"}
    assert detail(report, "signature") == (
        f"signature 0 does not verify with key {signed.key.keyid} over PAE(payloadType, payload)"
    )


def test_another_key_fails(signed: Signed, other_key: SigningKey) -> None:
    report = verify(signed.path, key=other_key.public, artifacts=[signed.wheel])
    assert failed(report) == {"signature"}
    assert f"signature 0 is by another key ('{signed.key.keyid}')" in detail(report, "signature")


def test_another_key_claiming_our_keyid_fails(
    signed: Signed, other_key: SigningKey, tmp_path: Path
) -> None:
    forged = json.loads(sign_statement(signed.statement, other_key))
    forged["signatures"][0]["keyid"] = signed.key.keyid
    signed.path.write_text(json.dumps(forged))
    report = signed.verify()
    assert failed(report) == {"signature"}
    assert "does not verify" in detail(report, "signature")


def test_one_good_signature_among_others_is_enough(signed: Signed, other_key: SigningKey) -> None:
    other = json.loads(sign_statement(signed.statement, other_key))["signatures"][0]
    signed.rewrite(lambda e: e["signatures"].insert(0, other))
    report = signed.verify()
    assert report.ok
    assert detail(report, "signature").startswith("signature 1 verifies")


def test_wrong_payload_type_fails(signed: Signed) -> None:
    signed.rewrite(lambda e: e.update(payloadType="application/json"))
    report = signed.verify()
    assert failed(report) == {"payload type", "signature"}
    assert detail(report, "payload type") == (
        f"payloadType 'application/json' is not {PAYLOAD_TYPE}"
    )


def test_unsigned_envelope_fails_the_signature_check(signed: Signed) -> None:
    signed.path.write_bytes(unsigned_envelope(signed.statement))
    report = signed.verify(builder_id=BUILDER, no_network=True)
    assert failed(report) == {"signature"}
    assert "no signatures" in detail(report, "signature")
    assert report.statement is None


@pytest.mark.parametrize(
    ("expectations", "name", "message"),
    [
        (
            {"builder_id": "https://ci.example.org/"},
            "builder id",
            f"runDetails.builder.id is '{BUILDER}', expected 'https://ci.example.org/'",
        ),
        (
            {"source_digest": "1" * 64},
            "source digest",
            f"expected {'1' * 64}, predicate.buildDefinition.externalParameters.source.digest "
            f"has sha256='{SOURCE_SHA}', gitCommit='{COMMIT}'",
        ),
        (
            # With the prefix, only the sha256 may match, not the commit.
            {"source_digest": "sha256:" + COMMIT + "a" * 24},
            "source digest",
            "expected aaaa",
        ),
        (
            {"spec_digest": "2" * 64},
            "spec digest",
            f"expected {'2' * 64}, predicate.buildDefinition.externalParameters.spec.digest "
            f"has sha256='{SPEC_SHA}'",
        ),
    ],
)
def test_expectation_mismatches_fail_their_check(
    signed: Signed, expectations: dict[str, Any], name: str, message: str
) -> None:
    report = signed.verify(**expectations)
    assert failed(report) == {name}
    assert message in detail(report, name)


@pytest.mark.parametrize(
    ("statement", "message"),
    [
        (statement_for(allow=["pypi.org:443"]), "step 'fetch' allows network to ['pypi.org:443']"),
        (statement_for(egress=True), "resolvedDependencies[2] records egress to 'pypi.org' port"),
        (
            _broken("predicate.buildDefinition.internalParameters.steps", ...),
            "internalParameters.steps is missing",
        ),
        (
            _broken("predicate.buildDefinition.internalParameters.steps.0.network", "all"),
            "step 'fetch' has a malformed network policy",
        ),
        (
            _broken("predicate.buildDefinition.internalParameters.steps.0.network.allow", "*"),
            "malformed network allowlist '*'",
        ),
    ],
)
def test_no_network_expectation(
    tmp_path: Path, signing_key: SigningKey, statement: dict[str, Any], message: str
) -> None:
    path = tmp_path / "p.jsonl"
    path.write_bytes(sign_statement(statement, signing_key))
    report = verify(path, key=signing_key.public, no_network=True)
    assert failed(report) == {"no network"}
    assert message in detail(report, "no network")


def test_absent_network_means_none(tmp_path: Path, signing_key: SigningKey) -> None:
    statement = _broken("predicate.buildDefinition.internalParameters.steps.0.network", ...)
    path = tmp_path / "p.jsonl"
    path.write_bytes(sign_statement(statement, signing_key))
    assert verify(path, key=signing_key.public, no_network=True).ok


def test_every_check_runs_when_everything_is_wrong(tmp_path: Path, signing_key: SigningKey) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text("not json\n")
    artifact = tmp_path / "a"
    artifact.write_bytes(b"a")
    report = verify(
        path,
        key=signing_key.public,
        artifacts=[artifact],
        builder_id=BUILDER,
        source_digest=COMMIT,
        spec_digest=SPEC_SHA,
        no_network=True,
    )
    assert len(report.checks) == len(BASE_CHECKS) + 5
    assert report.failures == report.checks
    assert detail(report, "envelope").startswith("the file is not JSON")
    assert report.statement is None


@pytest.mark.parametrize(
    ("envelope", "name", "message"),
    [
        (b"[]", "envelope", "the file holds an array"),
        (b'{"payload": "", "signatures": []}', "envelope", "payloadType: Field required"),
        (
            b'{"payloadType": 1, "payload": "", "signatures": []}',
            "envelope",
            "payloadType: Input should be a valid string",
        ),
        (
            b'{"payloadType": "x", "payload": "", "signatures": [{"keyid": "k"}]}',
            "envelope",
            "signatures.0.sig: Field required",
        ),
        (
            b'{"payloadType": "\\ud800", "payload": "", "signatures": []}',
            "envelope",
            "payloadType is not valid Unicode",
        ),
        (b'{"a": 1, "a": 2}', "envelope", "duplicate key 'a'"),
        (b"\xff\xfe{}", "envelope", "not UTF-8"),
        (b"[" * 100_000, "envelope", "nested too deeply"),
        (
            b'{"payloadType": "x", "payload": "%%%", "signatures": []}',
            "payload",
            "the payload is not base64",
        ),
        (
            b'{"payloadType": "x", "payload": "Wz-d!!", "signatures": []}',
            "payload",
            "the payload is not base64",
        ),
        (
            b'{"payloadType": "x", "payload": "W+-d", "signatures": []}',
            "payload",
            "the payload is not base64",
        ),
        (
            b'{"payloadType": "x", "payload": "WzFd", "signatures": []}',
            "payload",
            "the payload is an array",
        ),
        (
            b'{"payloadType": "x", "payload": "eyJhIjpOYU59", "signatures": []}',  # {"a":NaN}
            "payload",
            "NaN is not JSON",
        ),
    ],
)
def test_malformed_envelopes_are_reported(
    tmp_path: Path, signing_key: SigningKey, envelope: bytes, name: str, message: str
) -> None:
    path = tmp_path / "p.jsonl"
    path.write_bytes(envelope)
    report = verify(path, key=signing_key.public)
    assert message in detail(report, name)
    assert not report.ok
    assert [c.name for c in report.checks] == BASE_CHECKS


def test_payload_with_duplicate_keys_is_refused_even_when_signed(
    tmp_path: Path, signing_key: SigningKey
) -> None:
    payload = b'{"_type":"a","_type":"' + STATEMENT_TYPE.encode() + b'"}'
    envelope = {
        "payloadType": PAYLOAD_TYPE,
        "payload": base64.b64encode(payload).decode(),
        "signatures": [
            {
                "keyid": signing_key.keyid,
                "sig": base64.b64encode(signing_key.sign(pae(PAYLOAD_TYPE, payload))).decode(),
            }
        ],
    }
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(envelope))
    report = verify(path, key=signing_key.public)
    assert checks(report)["signature"] is True
    assert "duplicate key '_type'" in detail(report, "payload")
    assert report.statement is None


def test_urlsafe_base64_is_accepted(signed: Signed) -> None:
    # DSSE allows either alphabet; the signature covers the decoded bytes.
    def to_urlsafe(envelope: dict[str, Any]) -> None:
        raw = base64.b64decode(envelope["payload"])
        envelope["payload"] = base64.urlsafe_b64encode(raw).decode()

    signed.rewrite(to_urlsafe)
    assert signed.verify().ok


@pytest.mark.parametrize(
    ("expectations", "message"),
    [
        ({"source_digest": "md5:abc"}, "invalid expected source digest"),
        ({"source_digest": "xyz"}, "expected 40 or 64 hexadecimal digits"),
        ({"source_digest": "sha256:" + COMMIT}, "expected 64 hexadecimal digits"),
        ({"spec_digest": COMMIT}, "invalid expected spec digest"),
    ],
)
def test_malformed_expectations_are_errors(
    signed: Signed, expectations: dict[str, Any], message: str
) -> None:
    with pytest.raises(ProvenanceError, match=message):
        signed.verify(**expectations)


def test_unreadable_files_are_errors(signed: Signed, tmp_path: Path) -> None:
    with pytest.raises(ProvenanceError, match="cannot read provenance"):
        verify(tmp_path / "missing.jsonl", key=signed.verifying_key)
    with pytest.raises(ProvenanceError, match="cannot read artifact"):
        signed.verify(artifacts=[tmp_path / "missing.whl"])
    with pytest.raises(ProvenanceError, match="cannot read artifact"):
        signed.verify(artifacts=[tmp_path])


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2048))
def test_random_bytes_never_verify(tmp_path: Path, signing_key: SigningKey, data: bytes) -> None:
    path = tmp_path / "random.jsonl"
    path.write_bytes(data)
    report = verify(path, key=signing_key.public, builder_id=BUILDER, no_network=True)
    assert not report.ok
    assert report.statement is None


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    envelope=st.fixed_dictionaries(
        {
            "payloadType": st.text(max_size=40) | st.just(PAYLOAD_TYPE),
            "payload": st.binary(max_size=512).map(lambda b: base64.b64encode(b).decode()),
            "signatures": st.lists(
                st.fixed_dictionaries(
                    {
                        "keyid": st.none() | st.text(max_size=10),
                        "sig": st.binary(max_size=80).map(lambda b: base64.b64encode(b).decode()),
                    }
                ),
                max_size=3,
            ),
        }
    )
)
def test_random_envelopes_never_verify(
    tmp_path: Path, signing_key: SigningKey, envelope: dict[str, Any]
) -> None:
    path = tmp_path / "random.jsonl"
    path.write_text(json.dumps(envelope))
    report = verify(path, key=signing_key.public, spec_digest=SPEC_SHA, no_network=True)
    assert not report.ok
    assert checks(report)["signature"] is False


# --- the secret-value guard ------------------------------------------------------------------

BINARY_SECRET = b"hunter2-\x00\xfb\xff-token"  # base64 has '+' and '/' here


@pytest.mark.parametrize(
    ("value", "leaked"),
    [
        (b"s3cr3t-value-123", "s3cr3t-value-123"),
        (BINARY_SECRET, base64.b64encode(BINARY_SECRET).decode()),
        (BINARY_SECRET, base64.b64encode(BINARY_SECRET).decode().rstrip("=")),
        (BINARY_SECRET, base64.urlsafe_b64encode(BINARY_SECRET).decode()),
        (BINARY_SECRET, BINARY_SECRET.hex()),
        (BINARY_SECRET, BINARY_SECRET.hex().upper()),
    ],
    ids=["raw", "base64", "base64-unpadded", "urlsafe-base64", "hex", "HEX"],
)
def test_assert_no_values_catches_encodings(value: bytes, leaked: str) -> None:
    statement = statement_for()
    statement["predicate"]["buildDefinition"]["externalParameters"]["leak"] = (
        f"prefix {leaked} suffix"
    )
    with pytest.raises(ProvenanceError) as info:
        assert_no_values(statement, {"SAFE": b"not there", "API_TOKEN": value})
    assert str(info.value) == "the provenance would contain the value of secret API_TOKEN"
    assert leaked not in str(info.value) + (info.value.hint or "")


def test_assert_no_values_catches_values_json_escapes() -> None:
    value = 'pa"ss\\word\n'
    statement = statement_for()
    statement["predicate"]["buildDefinition"]["externalParameters"]["leak"] = value
    with pytest.raises(ProvenanceError, match=r"secret PW$"):
        assert_no_values(statement, {"PW": value.encode()})


def test_assert_no_values_names_every_leaked_secret() -> None:
    statement = statement_for()
    statement["predicate"]["buildDefinition"]["externalParameters"]["x"] = "aaa-one bbb-two"
    with pytest.raises(ProvenanceError, match=r"value of secrets ONE, TWO$"):
        assert_no_values(statement, {"ONE": b"aaa-one", "TWO": b"bbb-two", "THREE": b"zzz-three"})


def test_assert_no_values_passes_when_absent() -> None:
    statement = statement_for()
    assert_no_values(statement, {"TOKEN": b"an absent secret value", "EMPTY": b""})
    assert_no_values(statement, {})
