"""Verify buildcell's provenance.intoto.jsonl with securesystemslib, offline.

    pip install securesystemslib cryptography
    python sslib_verify.py --key buildcell.pub --provenance provenance.intoto.jsonl [ARTIFACT...]

securesystemslib only tries a signature with a key whose keyid equals the signature's
``keyid``, and the keyid it computes for a key by itself is its own (a hash of its JSON key
format), not buildcell's. So the keyid is passed by hand: buildcell's rule is ``sha256:``
and the hex SHA-256 of the public key's DER SubjectPublicKeyInfo.

Exit 0 and one line "verified ..." when the envelope's signature verifies with the key, its
payload is an in-toto statement of SLSA provenance v1, and each ARTIFACT's sha256 is a
subject's; else exit 1 and one line saying why.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from securesystemslib.dsse import Envelope
from securesystemslib.exceptions import Error, VerificationError
from securesystemslib.signer import SSlibKey

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"


def buildcell_keyid(pem: bytes) -> str:
    """``sha256:`` + hex SHA-256 of the DER SubjectPublicKeyInfo: the keyid buildcell signs with."""
    public = serialization.load_pem_public_key(pem)
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(der).hexdigest()


def verify(key_path: Path, provenance: Path, artifacts: list[Path]) -> str:
    pem = key_path.read_bytes()
    key = SSlibKey.from_crypto(serialization.load_pem_public_key(pem), keyid=buildcell_keyid(pem))
    envelope = Envelope.from_dict(json.loads(provenance.read_bytes()))
    envelope.verify([key], 1)  # raises VerificationError unless a signature by key verifies
    if envelope.payload_type != PAYLOAD_TYPE:
        raise VerificationError(f"payloadType {envelope.payload_type!r} is not {PAYLOAD_TYPE}")
    statement = json.loads(envelope.payload)
    if statement.get("_type") != STATEMENT_TYPE:
        raise VerificationError(f"_type is not {STATEMENT_TYPE}")
    if statement.get("predicateType") != PREDICATE_TYPE:
        raise VerificationError(f"predicateType is not {PREDICATE_TYPE}")
    subjects = {s.get("digest", {}).get("sha256") for s in statement.get("subject", [])}
    for artifact in artifacts:
        digest = hashlib.sha256(artifact.read_bytes()).hexdigest()
        if digest not in subjects:
            raise VerificationError(f"{artifact}: sha256 {digest} is not a subject")
    matched = f", {len(artifacts)} artifact(s) matched" if artifacts else ""
    return f"verified: signed by {key.keyid}, {PREDICATE_TYPE}{matched}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--key", type=Path, required=True, help="buildcell.pub")
    parser.add_argument("--provenance", type=Path, required=True, help="provenance.intoto.jsonl")
    parser.add_argument("artifacts", nargs="*", type=Path)
    args = parser.parse_args(argv)
    try:
        print(verify(args.key, args.provenance, args.artifacts))
    except (Error, ValueError, KeyError, OSError) as e:
        print(f"not verified: {type(e).__name__}: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
