"""The provenance statement is a pure function of the build record."""

from __future__ import annotations

import builtins
import os
from pathlib import Path
from typing import Any

import pytest

from buildcell.build.statement import provenance_statement
from buildcell.errors import ProvenanceError
from buildcell.supply.provenance import validate_statement
from buildcell.supply.records import BuildRecord, StepRecord

HEX = "ab" * 32


def _record(**changes: Any) -> BuildRecord:
    record = BuildRecord(
        id="20261207T120000-aaaaaaaa",
        name="hello",
        spec_path="/p/buildcell.yaml",
        spec_digest="sha256:" + HEX,
        status="succeeded",
        exit_code=0,
        started=1_800_000_000.0,
        finished=1_800_000_010.5,
        steps=[
            StepRecord(
                "s",
                status="succeeded",
                limits={"memory": 1 << 30, "pids": 4096, "cpus": None, "disk": None, "timeout": 60.0},
                network=["pkgs.example.org"],
                secrets=["token"],
                egress=[
                    {"destination": "pkgs.example.org:443", "verdict": "allowed", "requests": 2,
                     "bytes_up": 10, "bytes_down": 20},
                    {"destination": "evil.example:80", "verdict": "denied", "requests": 1,
                     "bytes_up": 0, "bytes_down": 0},
                ],
            )
        ],
        outputs=[{"path": "dist/a", "sha256": HEX, "size": 3}],
        inputs=[{"uri": "https://example.org/x", "sha256": HEX, "path": "vendor/x", "size": 1}],
        out_dir="/p/buildcell-out",
        project="acme",
        trust="trusted",
        ref="refs/heads/main",
        cache_scope="trusted",
        invocation={"project": "acme", "trust": "trusted", "ref": "refs/heads/main"},
        source={"uri": "git+file:///p", "digest": {"sha256": HEX}},
        source_date_epoch=1_700_000_000,
        rootfs_dependency={"uri": "host:/usr", "sha256": HEX, "annotations": {"covers": "dpkg"}},
        platform={"buildcell": "0.1.0", "bubblewrap": "bubblewrap 0.8.0", "kernel": "Linux 6",
                  "seccomp": {"name": "builtin", "digest": "sha256:" + HEX}},
        byproducts=[{"uri": "logs/s.log", "sha256": HEX}],
    )  # fmt: skip
    for name, value in changes.items():
        setattr(record, name, value)
    return record


def test_the_statement_comes_from_the_record_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_files(*args: object, **kwargs: object) -> None:
        raise AssertionError("the statement read a file")

    monkeypatch.setattr(builtins, "open", no_files)
    monkeypatch.setattr(os, "open", no_files)
    monkeypatch.setattr(Path, "read_bytes", no_files)
    statement = provenance_statement(_record(), "version: 1\n", builder_id="https://ci.example/b")
    assert validate_statement(statement) == []
    definition = statement["predicate"]["buildDefinition"]
    assert definition["externalParameters"]["spec"] == {
        "path": "buildcell.yaml",
        "digest": {"sha256": HEX},
        "content": "version: 1\n",
    }
    assert definition["externalParameters"]["invocation"]["ref"] == "refs/heads/main"
    internal = definition["internalParameters"]
    assert internal["steps"] == [
        {
            "name": "s",
            "limits": _record().steps[0].limits,
            "network": {"allow": ["pkgs.example.org"]},
            "secrets": ["token"],
        }
    ]
    assert internal["bubblewrapVersion"] == "bubblewrap 0.8.0"
    deps = definition["resolvedDependencies"]
    assert deps[0] == {"uri": "host:/usr", "name": "rootfs", "digest": {"sha256": HEX},
                       "annotations": {"covers": "dpkg"}}  # fmt: skip
    egress = [d for d in deps if d.get("annotations", {}).get("kind") == "egress"]
    assert [(d["annotations"]["host"], d["annotations"]["port"]) for d in egress] == [
        ("pkgs.example.org", 443)
    ]
    metadata = statement["predicate"]["runDetails"]["metadata"]
    assert metadata["startedOn"].startswith("2027-01-15T08:00:00")
    assert metadata["finishedOn"].startswith("2027-01-15T08:00:10")


def test_same_record_same_statement() -> None:
    a = provenance_statement(_record(), "x", builder_id="https://b")
    b = provenance_statement(_record(), "x", builder_id="https://b")
    assert a == b


def test_a_record_without_outputs_has_no_statement() -> None:
    with pytest.raises(ProvenanceError):
        provenance_statement(_record(outputs=[]), "x", builder_id="https://b")
