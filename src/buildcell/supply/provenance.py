"""SLSA provenance for builds: in-toto Statement v1 in a DSSE envelope, signed with Ed25519.

What is signed is the exact payload: the canonical JSON bytes of the statement (sorted keys,
no whitespace, UTF-8), base64-encoded in the envelope. :func:`verify` checks the signature
over ``PAE(payloadType, payload)`` with the payload bytes *as they appear in the envelope*
and only then parses them; nothing is ever re-serialized before it is verified, so a
verifier cannot be fooled by two JSON encodings of "the same" statement.

Verification failures are not exceptions. :func:`verify` runs every check and returns a
:class:`VerifyReport` naming each one and what it compared; :class:`ProvenanceError` is kept
for what makes verification impossible (a missing file, a malformed key, a bad
expectation).

A signed envelope can also be written as a Sigstore bundle v0.3 (:func:`sigstore_bundle`):
the same envelope, byte for byte, with a public-key hint and no transparency log entries
or timestamps, for verifiers that read bundles (``@sigstore/verify``, ``cosign``).

References: DSSE v1 (github.com/secure-systems-lab/dsse, ``protocol.md``, ``envelope.md``),
in-toto Statement v1 (github.com/in-toto/attestation, ``spec/v1``), SLSA provenance v1
(slsa.dev/spec/v1.0/provenance), the Sigstore bundle (github.com/sigstore/protobuf-specs,
``protos/sigstore_bundle.proto``). What ``BUILD_TYPE`` means is in ``docs/build-type.md``;
how other tools verify it, in ``docs/slsa.md``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import os
import re
import stat
import tempfile
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from buildcell import __version__, _log
from buildcell._fs import sha256_file
from buildcell._json import DuplicateKeyError, reject_duplicate_keys
from buildcell._text import show
from buildcell.errors import ProvenanceError

if TYPE_CHECKING:
    # The key code is imported where keys are used: a build without a signing key (and
    # every statement made or checked without one) never loads the cryptography library.
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

__all__ = [
    "BUILD_TYPE",
    "BUNDLE_MEDIA_TYPE",
    "PAYLOAD_TYPE",
    "PREDICATE_TYPE",
    "STATEMENT_TYPE",
    "Check",
    "Dependency",
    "KeyFile",
    "ProvenanceError",
    "SigningKey",
    "Subject",
    "VerifyReport",
    "VerifyingKey",
    "assert_no_values",
    "generate_keypair",
    "keyid",
    "load_private_key",
    "load_public_key",
    "make_statement",
    "pae",
    "sign_statement",
    "sigstore_bundle",
    "unsigned_envelope",
    "validate_statement",
    "verify",
    "write_bundle",
    "write_provenance",
]

logger = _log.get(__name__)

BUILD_TYPE = "https://buildcell.dev/build-types/buildcell/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"

_CHUNK = 1 << 20
_SHOW_MAX = 80


# --- DSSE -------------------------------------------------------------------------------------


def pae(payload_type: str, payload: bytes) -> bytes:
    """The DSSE v1 pre-authentication encoding: what a signature is computed over.

    ``"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body``, lengths in ASCII decimal.

    Raises:
        UnicodeEncodeError: ``payload_type`` cannot be encoded as UTF-8 (lone surrogates).
    """
    encoded_type = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(encoded_type), encoded_type, len(payload), payload)


class _EnvelopeSignature(BaseModel):
    model_config = ConfigDict(frozen=True, strict=True, extra="ignore")

    # DSSE: keyid is an optional, unauthenticated hint.
    keyid: str | None = None
    sig: str


class _Envelope(BaseModel):
    """A DSSE envelope as it is on the wire: the payload stays base64 text until verified."""

    model_config = ConfigDict(frozen=True, strict=True, extra="ignore")

    payload_type: str = Field(alias="payloadType")
    payload: str
    signatures: list[_EnvelopeSignature]

    def to_line(self) -> bytes:
        return self.model_dump_json(by_alias=True, exclude_none=True).encode() + b"\n"


_URLSAFE_TO_STANDARD = str.maketrans("-_", "+/")


def _b64decode(text: str) -> bytes | None:
    """Standard or URL-safe base64 (DSSE allows either), padded; ``None`` if it is neither."""
    if ("-" in text or "_" in text) and ("+" in text or "/" in text):
        return None  # one alphabet or the other, not a mix
    try:
        # validate=True: refuse stray characters rather than skip them, as the
        # urlsafe_b64decode shortcut would.
        standard = text.translate(_URLSAFE_TO_STANDARD).encode("ascii")
        return base64.b64decode(standard, validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return None


# --- keys -------------------------------------------------------------------------------------


def keyid(public_key: Ed25519PublicKey) -> str:
    """``sha256:`` and the hex SHA-256 of the key's DER SubjectPublicKeyInfo."""
    from cryptography.hazmat.primitives import serialization

    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(der).hexdigest()


class VerifyingKey:
    """An Ed25519 public key that checks provenance signatures.

    Args:
        public_key: the key.
    """

    __slots__ = ("keyid", "public_key")

    def __init__(self, public_key: Ed25519PublicKey) -> None:
        self.public_key = public_key
        self.keyid = keyid(public_key)

    def verify(self, signature: bytes, data: bytes) -> bool:
        """Whether ``signature`` is this key's Ed25519 signature of ``data``."""
        from cryptography.exceptions import InvalidSignature

        try:
            self.public_key.verify(signature, data)
        except InvalidSignature:
            return False
        return True

    def __repr__(self) -> str:
        return f"VerifyingKey({self.keyid})"


class SigningKey:
    """An Ed25519 private key that signs provenance; its ``keyid`` is its public key's.

    Args:
        private_key: the key.
    """

    __slots__ = ("_private_key", "keyid", "public")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        self.public = VerifyingKey(private_key.public_key())
        self.keyid = self.public.keyid

    def sign(self, data: bytes) -> bytes:
        """The Ed25519 signature of ``data``."""
        return self._private_key.sign(data)

    def __repr__(self) -> str:
        return f"SigningKey({self.keyid})"


def _check_key_name(name: str) -> None:
    if not name or name in {".", ".."} or "/" in name or "\0" in name:
        raise ProvenanceError(
            f"invalid key name {name!r}: expected a plain file name", hint="for example: release"
        )


def _create_exclusive(path: Path, data: bytes, mode: int) -> None:
    """Write a new file at ``path`` with exactly ``mode``; refuse if anything is there."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError as e:
        raise ProvenanceError(
            f"{path} already exists; refusing to overwrite it",
            hint="choose another name or directory, or move the old key away first",
        ) from e
    except OSError as e:
        raise ProvenanceError(f"cannot create {path}: {e.strerror}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # exact, whatever the umask
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        with suppress(OSError):
            path.unlink()
        if isinstance(e, OSError):
            raise ProvenanceError(f"cannot write {path}: {e.strerror}") from e
        raise


def generate_keypair(out_dir: Path, name: str = "buildcell") -> tuple[Path, Path]:
    """Make a new Ed25519 key pair: ``<name>.key`` (PKCS#8 PEM, 0600), ``<name>.pub`` (0644).

    ``out_dir`` is created if needed. Neither file may exist already.

    Returns:
        The paths of the private key and of the public key.

    Raises:
        ProvenanceError: ``name`` is not a plain file name, either file exists, or a file
            cannot be written.
    """
    _check_key_name(name)
    key_path, pub_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ProvenanceError(f"cannot create key directory {out_dir}: {e.strerror}") from e
    if pub_path.exists() or pub_path.is_symlink():
        # Checked first so that a refusal leaves nothing behind; O_EXCL below closes the race.
        raise ProvenanceError(
            f"{pub_path} already exists; refusing to overwrite it",
            hint="choose another name or directory, or move the old key away first",
        )
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private_key = Ed25519PrivateKey.generate()
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _create_exclusive(key_path, private_pem, 0o600)
    try:
        _create_exclusive(pub_path, public_pem, 0o644)
    except BaseException:
        with suppress(OSError):
            key_path.unlink()
        raise
    logger.info("generated Ed25519 key %s in %s", keyid(private_key.public_key()), out_dir)
    return key_path, pub_path


def _read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ProvenanceError(f"cannot read {what} {path}: {e.strerror or e}") from e


def _key_kind(key: object) -> str:
    return type(key).__name__.removeprefix("_").removesuffix("PrivateKey").removesuffix("PublicKey")


def load_private_key(path: Path) -> SigningKey:
    """Read an unencrypted PKCS#8 PEM Ed25519 private key.

    Raises:
        ProvenanceError: the file cannot be read, is not such a key, or is encrypted.
    """
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    data = _read_file(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as e:  # cryptography's way of saying "encrypted, and no password"
        raise ProvenanceError(
            f"private key {path} is encrypted",
            hint="buildcell reads unencrypted keys; keep the key file private (mode 0600)",
        ) from e
    except (ValueError, UnsupportedAlgorithm) as e:
        raise ProvenanceError(
            f"{path} is not a PEM private key",
            hint="make a key pair with 'buildcell keygen'",
        ) from e
    if not isinstance(key, Ed25519PrivateKey):
        raise ProvenanceError(
            f"private key {path} is a {_key_kind(key)} key; buildcell signs with Ed25519 keys",
            hint="make a key pair with 'buildcell keygen'",
        )
    with suppress(OSError):
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            logger.warning("private key %s can be read by other users; chmod 600 it", path)
    return SigningKey(key)


@dataclass(frozen=True)
class KeyFile:
    """A private key that stays on disk until a build has run: the build opens it only after
    its last cell is gone, so no cell ever coexists with the key in the supervisor's memory
    or descriptors.

    Args:
        path: an unencrypted PKCS#8 PEM Ed25519 private key (``buildcell keygen``).
    """

    path: Path

    def check(self) -> os.stat_result:
        """Check, without reading it, that the key can be loaded later.

        Raises:
            ProvenanceError: it does not exist, is not a regular file, cannot be read, or
                has other names (hard links) through which it could be exposed.
        """
        try:
            st = os.stat(self.path)
        except OSError as e:
            raise ProvenanceError(f"cannot use private key {self.path}: {e.strerror}") from e
        if not stat.S_ISREG(st.st_mode):
            raise ProvenanceError(f"private key {self.path} is not a regular file")
        if st.st_nlink > 1:
            raise ProvenanceError(
                f"private key {self.path} has {st.st_nlink} hard links; another name for it "
                "could put it within a build's reach",
                hint="keep one copy of the key, outside every checkout",
            )
        if not os.access(self.path, os.R_OK):
            raise ProvenanceError(f"cannot read private key {self.path}: permission denied")
        return st

    def load(self) -> SigningKey:
        """Read the key (see :func:`load_private_key`)."""
        return load_private_key(self.path)


def load_public_key(path: Path) -> VerifyingKey:
    """Read a PEM SubjectPublicKeyInfo Ed25519 public key.

    Raises:
        ProvenanceError: the file cannot be read or is not such a key.
    """
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    data = _read_file(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as e:
        raise ProvenanceError(
            f"{path} is not a PEM public key",
            hint="pass the .pub file written by 'buildcell keygen'",
        ) from e
    if not isinstance(key, Ed25519PublicKey):
        raise ProvenanceError(
            f"public key {path} is a {_key_kind(key)} key; buildcell verifies Ed25519 signatures"
        )
    return VerifyingKey(key)


# --- making statements ------------------------------------------------------------------------


@dataclass(frozen=True)
class Subject:
    """An artifact the provenance is about: its name (path in the output) and sha256."""

    name: str
    sha256: str


@dataclass(frozen=True)
class Dependency:
    """A ResourceDescriptor of something the build used or produced besides its subjects."""

    uri: str
    sha256: str | None = None
    name: str | None = None
    annotations: Mapping[str, Any] = field(default_factory=dict, hash=False)


def _bare_sha256(digest: str) -> str:
    return digest.removeprefix("sha256:")


def _descriptor(dependency: Dependency) -> dict[str, Any]:
    """A ResourceDescriptor with empty fields left out, as in-toto asks."""
    descriptor: dict[str, Any] = {}
    if dependency.uri:
        descriptor["uri"] = dependency.uri
    if dependency.sha256:
        descriptor["digest"] = {"sha256": _bare_sha256(dependency.sha256)}
    if dependency.name:
        descriptor["name"] = dependency.name
    if dependency.annotations:
        descriptor["annotations"] = _json_value(dependency.annotations, "annotations")
    return descriptor


def _json_value(value: object, where: str) -> Any:
    """A deep copy of ``value`` made of JSON types only (dict, list, str, int, float, ...).

    Raises:
        TypeError: a value has no JSON form or a key is not a string (a caller's bug).
        ValueError: a float is NaN or infinite.
    """
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: {value!r} has no JSON form")
        return value
    if isinstance(value, Mapping):
        copy: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: key {key!r} is not a string")
            copy[key] = _json_value(item, f"{where}.{key}")
        return copy
    if isinstance(value, list | tuple):
        return [_json_value(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise TypeError(f"{where}: {type(value).__name__} {value!r} has no JSON form")


def _rfc3339(moment: datetime, where: str) -> str:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{where} must be timezone-aware, got {moment!r}")
    text = moment.astimezone(UTC).isoformat(timespec="milliseconds")
    return text.removesuffix("+00:00") + "Z"


def _canonical(statement: Mapping[str, Any]) -> bytes:
    """The bytes that are signed: sorted keys, no whitespace, UTF-8.

    Raises:
        ProvenanceError: a string is not valid Unicode (such as a file name that is not
            UTF-8), or a value has no JSON form.
    """
    try:
        text = json.dumps(
            statement, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ProvenanceError(
            "the provenance cannot be encoded as UTF-8 JSON: a name or parameter is not valid "
            "Unicode (for example a file name that is not UTF-8)",
        ) from e
    except (TypeError, ValueError) as e:
        raise ProvenanceError(f"the provenance cannot be encoded as JSON: {e}") from e


def make_statement(
    *,
    subjects: Sequence[Subject],
    external_parameters: Mapping[str, Any],
    internal_parameters: Mapping[str, Any],
    resolved_dependencies: Sequence[Dependency],
    builder_id: str,
    invocation_id: str,
    started_on: datetime,
    finished_on: datetime,
    byproducts: Sequence[Dependency] = (),
) -> dict[str, Any]:
    """An in-toto Statement v1 whose predicate is SLSA provenance v1 of ``BUILD_TYPE``.

    Digests may be given bare or as ``sha256:<hex>``. The result is plain JSON data and has
    passed :func:`validate_statement`.

    Raises:
        ProvenanceError: the statement would be invalid (for example ``builder_id`` is not
            a URI or there are no subjects), or cannot be encoded as UTF-8 JSON.
        TypeError: a parameter holds a value that has no JSON form (a caller's bug).
        ValueError: a parameter holds NaN or infinity, or a time is naive (a caller's bug).
    """
    predicate: dict[str, Any] = {
        "buildDefinition": {
            "buildType": BUILD_TYPE,
            "externalParameters": _json_value(external_parameters, "externalParameters"),
            "internalParameters": _json_value(internal_parameters, "internalParameters"),
            "resolvedDependencies": [_descriptor(d) for d in resolved_dependencies],
        },
        "runDetails": {
            "builder": {"id": builder_id, "version": {"buildcell": __version__}},
            "metadata": {
                "invocationId": invocation_id,
                "startedOn": _rfc3339(started_on, "started_on"),
                "finishedOn": _rfc3339(finished_on, "finished_on"),
            },
            "byproducts": [_descriptor(d) for d in byproducts],
        },
    }
    statement: dict[str, Any] = {
        "_type": STATEMENT_TYPE,
        "subject": [
            {"name": s.name, "digest": {"sha256": _bare_sha256(s.sha256)}} for s in subjects
        ],
        "predicateType": PREDICATE_TYPE,
        "predicate": predicate,
    }
    problems = validate_statement(statement)
    if problems:
        raise ProvenanceError("the provenance statement would be invalid: " + "; ".join(problems))
    _canonical(statement)  # fail now, not when signing, if it cannot be encoded
    return statement


# --- signing and writing ----------------------------------------------------------------------


def _payload(statement: Mapping[str, Any]) -> bytes:
    problems = validate_statement(statement)
    if problems:
        raise ProvenanceError("refusing to sign an invalid statement: " + "; ".join(problems))
    return _canonical(statement)


def sign_statement(statement: Mapping[str, Any], key: SigningKey) -> bytes:
    """The statement in a DSSE envelope signed by ``key``: one line of JSON and a newline.

    Raises:
        ProvenanceError: the statement is invalid or cannot be encoded.
    """
    payload = _payload(statement)
    signature = key.sign(pae(PAYLOAD_TYPE, payload))
    envelope = _Envelope(
        payloadType=PAYLOAD_TYPE,
        payload=base64.b64encode(payload).decode("ascii"),
        signatures=[
            _EnvelopeSignature(keyid=key.keyid, sig=base64.b64encode(signature).decode("ascii"))
        ],
    )
    return envelope.to_line()


def unsigned_envelope(statement: Mapping[str, Any]) -> bytes:
    """The statement in a DSSE envelope without signatures (written when no key is given).

    Raises:
        ProvenanceError: the statement is invalid or cannot be encoded.
    """
    payload = _payload(statement)
    envelope = _Envelope(
        payloadType=PAYLOAD_TYPE,
        payload=base64.b64encode(payload).decode("ascii"),
        signatures=[],
    )
    return envelope.to_line()


def write_provenance(path: Path, envelope: bytes) -> None:
    """Write ``envelope`` to ``path`` atomically (a temporary file renamed over it), mode 0644.

    Raises:
        ProvenanceError: the file cannot be written.
    """
    directory = path.parent
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as e:
        raise ProvenanceError(f"cannot write provenance {path}: {e.strerror}") from e
    tmp = Path(tmp_name)
    try:
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(envelope)
                f.flush()
                os.fchmod(f.fileno(), 0o644)
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with suppress(OSError):
                tmp.unlink()
            raise
    except OSError as e:
        raise ProvenanceError(f"cannot write provenance {path}: {e.strerror}") from e
    # Make the rename durable; not every file system lets a directory be fsynced.
    with suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# --- the Sigstore bundle ----------------------------------------------------------------------


def sigstore_bundle(envelope: bytes, public: VerifyingKey) -> bytes:
    """The signed ``envelope`` as a Sigstore bundle v0.3: one line of JSON and a newline.

    The bundle (``dev.sigstore.bundle.v1.Bundle`` in its proto3 JSON form) carries the
    envelope's payload, payloadType and signature unchanged, and names the key only by a
    hint, ``public``'s keyid, which the protobuf specification requires to equal the
    signature's ``keyid``. It has no transparency log entries (``tlogEntries`` is ``[]``)
    and no timestamps (no ``timestampVerificationData``): a verifier supplies the public key
    itself and asks for neither.

    Args:
        envelope: a DSSE envelope as :func:`sign_statement` makes it.
        public: the key that signed it.

    Raises:
        ProvenanceError: the envelope is not a DSSE envelope, does not have exactly one
            signature (a bundle carries one), or that signature is not ``public``'s valid
            signature over ``PAE(payloadType, payload)``.
    """
    parsed, detail = _parse_envelope(envelope)
    if parsed is None:
        raise ProvenanceError(f"cannot make a Sigstore bundle: {detail}")
    if len(parsed.signatures) != 1:
        raise ProvenanceError(
            f"cannot make a Sigstore bundle: it carries exactly one signature, and the "
            f"envelope has {len(parsed.signatures)}",
            hint="unsigned provenance has no bundle; sign it with --sign-key",
        )
    signature = parsed.signatures[0]
    if signature.keyid not in (None, public.keyid):
        raise ProvenanceError(
            f"cannot make a Sigstore bundle: the envelope is signed by {_show(signature.keyid)}, "
            f"not by {public.keyid}"
        )
    payload = _b64decode(parsed.payload)
    raw = _b64decode(signature.sig)
    if payload is None or raw is None:
        raise ProvenanceError("cannot make a Sigstore bundle: the envelope is not base64")
    # Checked, not assumed: a bundle vouches for its signature to tools that trust the hint.
    if not public.verify(raw, pae(parsed.payload_type, payload)):
        raise ProvenanceError(
            f"cannot make a Sigstore bundle: the envelope's signature does not verify with "
            f"key {public.keyid}"
        )
    bundle = {
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {"publicKey": {"hint": public.keyid}, "tlogEntries": []},
        "dsseEnvelope": {
            # proto3 JSON writes bytes as standard padded base64, as the envelope does.
            "payload": base64.b64encode(payload).decode("ascii"),
            "payloadType": parsed.payload_type,
            "signatures": [{"sig": base64.b64encode(raw).decode("ascii"), "keyid": public.keyid}],
        },
    }
    return json.dumps(bundle, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n"


def write_bundle(path: Path, envelope: bytes, public: VerifyingKey) -> None:
    """Write the Sigstore bundle of ``envelope`` to ``path`` atomically, mode 0644.

    Raises:
        ProvenanceError: no bundle can be made of ``envelope`` (see :func:`sigstore_bundle`)
            or the file cannot be written.
    """
    write_provenance(path, sigstore_bundle(envelope, public))


# --- the secret-value guard -------------------------------------------------------------------


def _encodings(value: bytes) -> set[bytes]:
    """The forms in which ``value`` could show up in canonical JSON."""
    forms = {value, value.hex().encode(), value.hex().upper().encode()}
    # Without padding, so that a padded or unpadded occurrence matches.
    forms.add(base64.b64encode(value).rstrip(b"="))
    forms.add(base64.urlsafe_b64encode(value).rstrip(b"="))
    with suppress(UnicodeDecodeError):
        # How json.dumps(ensure_ascii=False) writes it inside a string: quotes, backslashes
        # and control characters escaped.
        forms.add(json.dumps(value.decode("utf-8"), ensure_ascii=False)[1:-1].encode("utf-8"))
    return forms


def assert_no_values(statement: Mapping[str, Any], values: Mapping[str, bytes]) -> None:
    """Refuse a statement that contains the value of a secret, raw, base64 or hex encoded.

    Args:
        statement: the statement about to be signed or written.
        values: secret name to secret value. Empty values are skipped (they would match
            anything). The values are never included in the error.

    Raises:
        ProvenanceError: a value occurs in the statement's canonical JSON; the message
            names the secrets, not their values.
    """
    data = _canonical(statement)
    leaked = [
        name
        for name, value in values.items()
        if value and any(form in data for form in _encodings(value))
    ]
    if not leaked:
        return
    which = f"secret {leaked[0]}" if len(leaked) == 1 else "secrets " + ", ".join(leaked)
    raise ProvenanceError(
        f"the provenance would contain the value of {which}",
        hint="pass secrets to steps by name; never put their values in the spec, the "
        "environment of a step, or output names",
    )


# --- validating statements --------------------------------------------------------------------

_HEX = re.compile(r"[0-9a-f]+")
_URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_URI_REST = re.compile(r"(?:[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=]|%[0-9A-Fa-f]{2})+")
# [0-9], not \d: \d also matches non-ASCII digits.
_TIMESTAMP = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]+)?Z"
)
_DIGEST_LENGTHS: dict[str, tuple[int, ...]] = {
    "sha256": (64,),
    "sha224": (56,),
    "sha384": (96,),
    "sha512": (128,),
    "sha512_224": (56,),
    "sha512_256": (64,),
    "sha3_224": (56,),
    "sha3_256": (64,),
    "sha3_384": (96,),
    "sha3_512": (128,),
    "sha1": (40,),
    "md5": (32,),
    "gitCommit": (40, 64),
    "gitTree": (40, 64),
    "gitBlob": (40, 64),
    "gitTag": (40, 64),
}


def _show(value: object) -> str:
    return show(value, _SHOW_MAX)


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def _uri_problem(value: str) -> str | None:
    """Why ``value`` is not an absolute, case-normalized URI (RFC 3986), or ``None``."""
    scheme, colon, rest = value.partition(":")
    if not colon or not _URI_SCHEME.fullmatch(scheme) or not _URI_REST.fullmatch(rest):
        return f"{_show(value)} is not a URI"
    authority = rest[2:].split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    if scheme != scheme.lower() or (rest.startswith("//") and authority != authority.lower()):
        return f"{_show(value)}: the scheme and host of a type URI must be lowercase"
    return None


def _timestamp_problem(value: str) -> str | None:
    match = _TIMESTAMP.fullmatch(value)
    if match is not None:
        year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
        try:
            # RFC 3339 allows a leap second (60); datetime does not.
            datetime(year, month, day, hour, minute, min(second, 59), tzinfo=UTC)
        except ValueError:
            pass
        else:
            if second <= 60:
                return None
    return f"{_show(value)} is not an RFC 3339 UTC timestamp (YYYY-MM-DDThh:mm:ss[.fff]Z)"


_KIND_NAMES: dict[type, str] = {str: "a string", dict: "an object", list: "an array"}


class _Problems:
    """Collects "path: problem" messages while walking an untrusted JSON document."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def add(self, path: str, problem: str) -> None:
        self.messages.append(f"{path}: {problem}")

    def field(
        self, obj: Mapping[str, Any], key: str, path: str, kind: type, *, required: bool
    ) -> Any:
        """``obj[key]`` if it has type ``kind``; ``None`` if absent or null (in-toto: unset)."""
        value = obj.get(key)
        where = f"{path}.{key}" if path else key
        if value is None:
            if required:
                self.add(where, "missing")
            return None
        if not isinstance(value, Mapping if kind is dict else kind):
            self.add(where, f"expected {_KIND_NAMES[kind]}, found {_kind(value)}")
            return None
        return value

    def digest(self, value: Mapping[str, Any], path: str) -> None:
        if not value:
            self.add(path, "an empty digest set")
        for algorithm, hexdigest in value.items():
            where = f"{path}.{algorithm}"
            if not algorithm:
                self.add(path, "an empty algorithm name")
            elif not isinstance(hexdigest, str) or not hexdigest:
                self.add(where, f"expected a non-empty string, found {_kind(hexdigest)}")
            elif algorithm in _DIGEST_LENGTHS and (
                not _HEX.fullmatch(hexdigest) or len(hexdigest) not in _DIGEST_LENGTHS[algorithm]
            ):
                lengths = " or ".join(str(n) for n in _DIGEST_LENGTHS[algorithm])
                self.add(where, f"{_show(hexdigest)} is not {lengths} lowercase hex digits")

    def descriptor(self, value: object, path: str, *, subject: bool = False) -> None:
        """A ResourceDescriptor: at least one of uri, digest and content; typed fields."""
        if not isinstance(value, Mapping):
            self.add(path, f"expected an object, found {_kind(value)}")
            return
        uri = self.field(value, "uri", path, str, required=False)
        digest = self.field(value, "digest", path, dict, required=subject)
        content = self.field(value, "content", path, str, required=False)
        name = self.field(value, "name", path, str, required=subject)
        for key in ("downloadLocation", "mediaType"):
            self.field(value, key, path, str, required=False)
        self.field(value, "annotations", path, dict, required=False)
        if digest is not None:
            self.digest(digest, f"{path}.digest")
        if content is not None and _b64decode(content) is None:
            self.add(f"{path}.content", "not base64")
        if subject:
            if name == "":
                self.add(f"{path}.name", "empty")
            if digest is not None and "sha256" not in digest:
                self.add(f"{path}.digest", "a subject needs a sha256 digest")
        elif not (uri or digest or content):
            self.add(path, "a resource descriptor needs at least one of uri, digest and content")

    def descriptors(self, obj: Mapping[str, Any], key: str, path: str) -> None:
        items = self.field(obj, key, path, list, required=False)
        for index, item in enumerate(items or ()):
            self.descriptor(item, f"{path}.{key}[{index}]")

    def type_uri(self, obj: Mapping[str, Any], key: str, path: str) -> None:
        value = self.field(obj, key, path, str, required=True)
        if value is not None:
            problem = _uri_problem(value)
            if problem is not None:
                self.add(f"{path}.{key}", problem)

    def timestamp(self, obj: Mapping[str, Any], key: str, path: str) -> None:
        value = self.field(obj, key, path, str, required=False)
        if value is not None:
            problem = _timestamp_problem(value)
            if problem is not None:
                self.add(f"{path}.{key}", problem)


def _unique_subjects(p: _Problems, subjects: list[Any]) -> None:
    """Two artifacts of one name: a verifier could take either file for it."""
    names: dict[str, int] = {}
    for index, item in enumerate(subjects):
        name = item.get("name") if isinstance(item, Mapping) else None
        if not isinstance(name, str):
            continue
        if name in names:
            p.add(f"subject[{index}].name", f"{_show(name)} is also subject[{names[name]}]'s")
        else:
            names[name] = index


def validate_statement(statement: Mapping[str, Any]) -> list[str]:
    """What is wrong with ``statement`` as an in-toto Statement v1 with SLSA provenance v1.

    Required fields must be present with the right JSON types (null counts as absent);
    ``subject`` is non-empty, each with a non-empty ``name`` and a ``sha256`` digest; every
    ResourceDescriptor has at least one of ``uri``, ``digest`` and ``content`` and well-formed
    digests; ``buildType`` and ``builder.id`` are URIs; timestamps are RFC 3339 UTC;
    ``invocationId``, when given, is a non-empty string; no two subjects share a name.
    Unknown fields are ignored, as in-toto requires.

    Returns:
        One message per problem, each starting with the field's path; ``[]`` when valid.
    """
    p = _Problems()
    document: object = statement  # callers may pass any parsed JSON
    if not isinstance(document, Mapping):
        return [f"the statement is {_kind(document)}, not an object"]
    statement_type = p.field(statement, "_type", "", str, required=True)
    if statement_type is not None and statement_type != STATEMENT_TYPE:
        p.add("_type", f"{_show(statement_type)} is not {STATEMENT_TYPE}")
    predicate_type = p.field(statement, "predicateType", "", str, required=True)
    if predicate_type is not None and predicate_type != PREDICATE_TYPE:
        p.add("predicateType", f"{_show(predicate_type)} is not {PREDICATE_TYPE}")

    subjects = p.field(statement, "subject", "", list, required=True)
    if subjects is not None and not subjects:
        p.add("subject", "empty; a statement is about at least one artifact")
    for index, item in enumerate(subjects or ()):
        p.descriptor(item, f"subject[{index}]", subject=True)
    _unique_subjects(p, subjects or [])

    predicate = p.field(statement, "predicate", "", dict, required=True)
    if predicate is None:
        return p.messages
    definition = p.field(predicate, "buildDefinition", "predicate", dict, required=True)
    if definition is not None:
        path = "predicate.buildDefinition"
        p.type_uri(definition, "buildType", path)
        p.field(definition, "externalParameters", path, dict, required=True)
        p.field(definition, "internalParameters", path, dict, required=False)
        p.descriptors(definition, "resolvedDependencies", path)
    details = p.field(predicate, "runDetails", "predicate", dict, required=True)
    if details is not None:
        path = "predicate.runDetails"
        builder = p.field(details, "builder", path, dict, required=True)
        if builder is not None:
            p.type_uri(builder, "id", f"{path}.builder")
            version = p.field(builder, "version", f"{path}.builder", dict, required=False)
            for component, text in (version or {}).items():
                if not isinstance(text, str):
                    where = f"{path}.builder.version.{component}"
                    p.add(where, f"expected a string, found {_kind(text)}")
            p.descriptors(builder, "builderDependencies", f"{path}.builder")
        metadata = p.field(details, "metadata", path, dict, required=False)
        if metadata is not None:
            invocation = p.field(metadata, "invocationId", f"{path}.metadata", str, required=False)
            if invocation == "":
                p.add(f"{path}.metadata.invocationId", "empty")
            p.timestamp(metadata, "startedOn", f"{path}.metadata")
            p.timestamp(metadata, "finishedOn", f"{path}.metadata")
        p.descriptors(details, "byproducts", path)
    return p.messages


# --- verifying --------------------------------------------------------------------------------


@dataclass
class Check:
    """One verification check: its name, whether it passed, and what was compared."""

    name: str
    ok: bool
    detail: str


@dataclass
class VerifyReport:
    """Every check :func:`verify` ran, and the statement once its signature verified.

    ``statement`` is ``None`` unless the signature check passed: an unauthenticated
    statement is never handed out. Trust it only when ``ok``.
    """

    checks: list[Check]
    statement: dict[str, Any] | None

    @property
    def ok(self) -> bool:
        """Whether there was at least one check and every check passed."""
        return bool(self.checks) and all(check.ok for check in self.checks)

    @property
    def failures(self) -> list[Check]:
        """The checks that failed."""
        return [check for check in self.checks if not check.ok]

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data, for ``--json``."""
        return {
            "ok": self.ok,
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in self.checks],
            "statement": self.statement,
        }


class _Malformed(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _Malformed(f"{name} is not JSON")


def _strict_json(data: bytes) -> Any:
    """Parse UTF-8 JSON, refusing duplicate keys and NaN/Infinity.

    Raises:
        ValueError: it is not such JSON (a message saying why).
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Malformed(f"not UTF-8 (byte {e.start})") from e
    try:
        return json.loads(
            text, object_pairs_hook=reject_duplicate_keys, parse_constant=_reject_constant
        )
    except DuplicateKeyError as e:
        raise _Malformed(str(e)) from e
    except _Malformed:
        raise
    except json.JSONDecodeError as e:
        raise _Malformed(f"not JSON ({e.msg} at line {e.lineno} column {e.colno})") from e
    except RecursionError as e:
        raise _Malformed("not JSON this verifier accepts (nested too deeply)") from e


def _parse_envelope(data: bytes) -> tuple[_Envelope | None, str]:
    try:
        document = _strict_json(data)
    except ValueError as e:
        return None, f"the file is {e}"
    if not isinstance(document, dict):
        return None, f"the file holds {_kind(document)}, not a DSSE envelope object"
    try:
        envelope = _Envelope.model_validate(document)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "envelope"
        return None, f"not a DSSE envelope: {where}: {first['msg']}"
    try:
        envelope.payload_type.encode("utf-8")
    except UnicodeEncodeError:
        return None, "not a DSSE envelope: payloadType is not valid Unicode"
    count = len(envelope.signatures)
    return envelope, f"a DSSE envelope with {count} signature{'s' if count != 1 else ''}"


def _signature_check(envelope: _Envelope | None, payload: bytes | None, key: VerifyingKey) -> Check:
    name = "signature"
    if envelope is None:
        return Check(name, False, "not checked: the file is not a DSSE envelope")
    if payload is None:
        return Check(name, False, "not checked: the payload is not base64")
    if not envelope.signatures:
        return Check(name, False, "the envelope has no signatures (it was written unsigned)")
    message = pae(envelope.payload_type, payload)
    outcomes: list[str] = []
    for index, signature in enumerate(envelope.signatures):
        signer = signature.keyid or ""
        if signer and signer != key.keyid:
            outcomes.append(f"signature {index} is by another key ({_show(signer)})")
            continue
        raw = _b64decode(signature.sig)
        if raw is None:
            outcomes.append(f"signature {index} is not base64")
        elif key.verify(raw, message):
            return Check(
                name,
                True,
                f"signature {index} verifies with key {key.keyid} over "
                f"PAE(payloadType, payload) ({len(payload)} payload bytes)",
            )
        else:
            outcomes.append(
                f"signature {index} does not verify with key {key.keyid} over "
                "PAE(payloadType, payload)"
            )
    return Check(name, False, "; ".join(outcomes))


def _dig(document: Any, *keys: str) -> Any:
    """``document[k1][k2]...``, or ``None`` where an object or key is missing."""
    for key in keys:
        if not isinstance(document, Mapping):
            return None
        document = document.get(key)
    return document


def _expected_digest(value: str, what: str, lengths: tuple[int, ...]) -> tuple[str | None, str]:
    """Split ``sha256:<hex>`` or bare hex into (algorithm or None, lowercase hex).

    Raises:
        ProvenanceError: it is neither.
    """
    algorithm: str | None = None
    text = value.strip()
    if ":" in text:
        algorithm, _, text = text.partition(":")
        if algorithm != "sha256":
            raise ProvenanceError(
                f"invalid expected {what} {_show(value)}: only sha256:<hex> or bare hex is "
                "understood"
            )
        lengths = (64,)
    text = text.lower()
    if not _HEX.fullmatch(text) or len(text) not in lengths:
        digits = " or ".join(str(n) for n in lengths)
        raise ProvenanceError(
            f"invalid expected {what} {_show(value)}: expected {digits} hexadecimal digits, "
            "bare or after 'sha256:'"
        )
    return algorithm, text


def _digest_check(
    name: str, statement: Any, path: tuple[str, ...], expected: str, fields: tuple[str, ...]
) -> Check:
    where = ".".join(path)
    if statement is None:
        return Check(name, False, f"not checked: no statement to compare {expected} with")
    digest = _dig(statement, *path)
    if not isinstance(digest, Mapping):
        return Check(name, False, f"expected {expected}, but the statement has no {where}")
    for algorithm in fields:
        if digest.get(algorithm) == expected:
            return Check(name, True, f"{where}.{algorithm} is {expected}")
    found = ", ".join(f"{a}={_show(digest.get(a))}" for a in fields if a in digest) or "none"
    return Check(name, False, f"expected {expected}, {where} has {found}")


def _invocation_check(statement: Any, name: str, expected: str) -> Check:
    check = f"invocation {name}"
    if statement is None:
        return Check(check, False, "not checked: no statement")
    where = ("predicate", "buildDefinition", "externalParameters", "invocation", name)
    found = _dig(statement, *where)
    ok = found == expected
    detail = f"externalParameters.invocation.{name} is {_show(found)}" + (
        "" if ok else f", expected {_show(expected)}"
    )
    return Check(check, ok, detail)


def _no_network_check(statement: Any) -> Check:
    name = "no network"
    if statement is None:
        return Check(name, False, "not checked: no statement")
    problems: list[str] = []
    steps = _dig(statement, "predicate", "buildDefinition", "internalParameters", "steps")
    if not isinstance(steps, list):
        # Fail closed: without the steps there is no telling what they were allowed.
        problems.append("internalParameters.steps is missing, so the network policy is unknown")
        steps = []
    for index, step in enumerate(steps):
        label = _show(step.get("name")) if isinstance(step, Mapping) else f"[{index}]"
        network = step.get("network") if isinstance(step, Mapping) else None
        if not isinstance(step, Mapping) or not isinstance(network, Mapping | None):
            problems.append(f"step {label} has a malformed network policy")
            continue
        allow = network.get("allow") if network is not None else None
        if allow is None or allow == []:
            continue
        if isinstance(allow, list):
            problems.append(f"step {label} allows network to {_show(allow)}")
        else:
            problems.append(f"step {label} has a malformed network allowlist {_show(allow)}")
    dependencies = _dig(statement, "predicate", "buildDefinition", "resolvedDependencies")
    for index, dependency in enumerate(dependencies if isinstance(dependencies, list) else ()):
        if _dig(dependency, "annotations", "kind") == "egress":
            host = _dig(dependency, "annotations", "host")
            port = _dig(dependency, "annotations", "port")
            problems.append(
                f"resolvedDependencies[{index}] records egress to {_show(host)} port {_show(port)}"
            )
    if problems:
        return Check(name, False, "; ".join(problems))
    return Check(
        name,
        True,
        f"no step allows network ({len(steps)} checked), and no egress is recorded",
    )


def _sha256_file(path: Path) -> str:
    try:
        return sha256_file(path)
    except OSError as e:
        raise ProvenanceError(f"cannot read artifact {path}: {e.strerror or e}") from e


def _artifact_check(path: Path, sha256: str, statement: Any) -> Check:
    name = f"artifact {path}"
    if statement is None:
        return Check(name, False, f"sha256 {sha256} not checked: no statement")
    subjects = statement.get("subject")
    matches = [
        s.get("name")
        for s in (subjects if isinstance(subjects, list) else ())
        if isinstance(s, Mapping) and _dig(s, "digest", "sha256") == sha256
    ]
    if not matches:
        return Check(name, False, f"sha256 {sha256} is not a subject")
    shown = ", ".join(_show(m) for m in matches)
    return Check(name, True, f"sha256 {sha256} is the digest of subject {shown}")


def verify(
    provenance: Path,
    *,
    key: VerifyingKey,
    artifacts: Sequence[Path] = (),
    builder_id: str | None = None,
    source_digest: str | None = None,
    spec_digest: str | None = None,
    no_network: bool = False,
    expect: Mapping[str, str] | None = None,
) -> VerifyReport:
    """Check a provenance file: its envelope, signature and statement, and the expectations.

    Every check runs and is reported, whether or not an earlier one failed: ``envelope``,
    ``payload type``, ``payload``, ``signature`` (over the payload bytes exactly as in the
    envelope), ``statement type``, ``predicate type``, ``statement fields``, one ``artifact
    PATH`` per artifact (its sha256 must be a subject's), and ``builder id``, ``source
    digest``, ``spec digest`` and ``no network`` when asked for.

    Args:
        provenance: the ``.intoto.jsonl`` file holding one DSSE envelope.
        key: the public key that must have signed it.
        artifacts: files that must be subjects of the statement (matched by sha256).
        builder_id: expected ``runDetails.builder.id``.
        source_digest: expected source digest, ``sha256:<hex>`` or bare hex; bare hex may
            also match the git commit.
        spec_digest: expected sha256 of the spec, ``sha256:<hex>`` or bare hex.
        no_network: require that no step was allowed network and no egress was recorded.
        expect: values the invoker must have chosen, by name in
            ``externalParameters.invocation`` (``project``, ``ref``, ``trust``): one check
            ``invocation NAME`` each; a missing value fails it.

    Returns:
        The report; ``report.ok`` says whether everything passed.

    Raises:
        ProvenanceError: the provenance file or an artifact cannot be read, or an expected
            digest is malformed.
    """
    expected_source = (
        _expected_digest(source_digest, "source digest", (40, 64)) if source_digest else None
    )
    expected_spec = _expected_digest(spec_digest, "spec digest", (64,)) if spec_digest else None
    data = _read_file(provenance, "provenance")
    digests = [(path, _sha256_file(path)) for path in artifacts]

    checks, statement, signature_ok = _document_checks(data, key)
    checks.extend(_artifact_check(path, sha256, statement) for path, sha256 in digests)
    if builder_id is not None:
        checks.append(_builder_check(statement, builder_id))
    parameters = ("predicate", "buildDefinition", "externalParameters")
    if expected_source is not None:
        algorithm, hexdigest = expected_source
        fields = ("sha256",) if algorithm else ("sha256", "gitCommit")
        checks.append(
            _digest_check(
                "source digest", statement, (*parameters, "source", "digest"), hexdigest, fields
            )
        )
    if expected_spec is not None:
        checks.append(
            _digest_check(
                "spec digest",
                statement,
                (*parameters, "spec", "digest"),
                expected_spec[1],
                ("sha256",),
            )
        )
    if no_network:
        checks.append(_no_network_check(statement))
    for name, value in (expect or {}).items():
        checks.append(_invocation_check(statement, name, value))

    return VerifyReport(checks=checks, statement=statement if signature_ok else None)


def _document_checks(data: bytes, key: VerifyingKey) -> tuple[list[Check], Any, bool]:
    """The checks of the file itself: envelope, payload, signature, types and fields.

    Returns:
        (the checks, the statement or ``None``, whether the signature verified).
    """
    checks: list[Check] = []
    envelope, detail = _parse_envelope(data)
    checks.append(Check("envelope", envelope is not None, detail))
    if envelope is None:
        checks.append(Check("payload type", False, "not checked: no envelope"))
    elif envelope.payload_type == PAYLOAD_TYPE:
        checks.append(Check("payload type", True, f"payloadType is {PAYLOAD_TYPE}"))
    else:
        shown = _show(envelope.payload_type)
        checks.append(Check("payload type", False, f"payloadType {shown} is not {PAYLOAD_TYPE}"))
    payload = _b64decode(envelope.payload) if envelope is not None else None
    statement, payload_check = _statement_of(envelope, payload)
    checks.append(payload_check)
    signature = _signature_check(envelope, payload, key)
    checks.append(signature)
    for check_name, field_name, expected in (
        ("statement type", "_type", STATEMENT_TYPE),
        ("predicate type", "predicateType", PREDICATE_TYPE),
    ):
        if statement is None:
            checks.append(Check(check_name, False, "not checked: no statement"))
            continue
        found = statement.get(field_name)
        ok = found == expected
        detail = (
            f"{field_name} is {expected}"
            if ok
            else f"{field_name} {_show(found)} is not {expected}"
        )
        checks.append(Check(check_name, ok, detail))
    if statement is None:
        checks.append(Check("statement fields", False, "not checked: no statement"))
    else:
        problems = validate_statement(statement)
        detail = "; ".join(problems) or (
            "a valid in-toto Statement v1 with SLSA provenance v1 predicate"
        )
        checks.append(Check("statement fields", not problems, detail))
    return checks, statement, signature.ok


def _statement_of(envelope: _Envelope | None, payload: bytes | None) -> tuple[Any, Check]:
    if envelope is None:
        return None, Check("payload", False, "not checked: no envelope")
    if payload is None:
        return None, Check("payload", False, "the payload is not base64")
    try:
        document = _strict_json(payload)
    except ValueError as e:
        return None, Check("payload", False, f"the payload is {e}")
    if not isinstance(document, dict):
        return None, Check("payload", False, f"the payload is {_kind(document)}")
    return document, Check("payload", True, f"a JSON object of {len(payload)} bytes")


def _builder_check(statement: Any, builder_id: str) -> Check:
    if statement is None:
        return Check("builder id", False, "not checked: no statement")
    found = _dig(statement, "predicate", "runDetails", "builder", "id")
    ok = found == builder_id
    detail = f"runDetails.builder.id is {_show(found)}" + (
        "" if ok else f", expected {_show(builder_id)}"
    )
    return Check("builder id", ok, detail)
