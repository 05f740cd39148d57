"""The provenance statement of a build: a pure function of its record.

Everything a statement says was measured while the build ran and kept in its record (the
source's description, the rootfs's digest, each step's effective limits and policy, the
invocation, the platform's versions, the digests of the logs), so the statement can be
made, and checked, from the record alone: nothing here touches the file system.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from buildcell.supply.provenance import Dependency, Subject, make_statement
from buildcell.supply.records import BuildRecord

__all__ = ["provenance_statement"]


def _egress(record: BuildRecord) -> list[Dependency]:
    # What the build actually reached: no digest exists for it, which is the point of
    # recording it (a verifier can refuse builds that had egress: --no-network).
    found = []
    for step in record.steps:
        for row in step.egress:
            host, _, port = str(row["destination"]).rpartition(":")
            if row["verdict"] != "allowed" or not port.isdigit():
                continue
            found.append(
                Dependency(
                    uri=f"egress://{row['destination']}",
                    name=f"egress:{step.name}",
                    annotations={
                        "kind": "egress",
                        "host": host,
                        "port": int(port),
                        "requests": row["requests"],
                        "bytesUp": row["bytes_up"],
                        "bytesDown": row["bytes_down"],
                    },
                )
            )
    return found


def _dependencies(record: BuildRecord) -> list[Dependency]:
    rootfs = record.rootfs_dependency or {"uri": record.rootfs}
    return [
        Dependency(
            uri=rootfs["uri"],
            name="rootfs",
            sha256=rootfs.get("sha256"),
            annotations=rootfs.get("annotations") or {},
        ),
        *(Dependency(uri=i["uri"], sha256=i["sha256"], name=i["path"]) for i in record.inputs),
        *_egress(record),
    ]


def _internal(record: BuildRecord) -> dict[str, Any]:
    """What the platform decided."""
    platform = record.platform or {}
    return {
        "buildcellVersion": platform.get("buildcell"),
        "bubblewrapVersion": platform.get("bubblewrap"),
        "kernel": platform.get("kernel"),
        "seccompProfile": platform.get("seccomp"),
        "rootfs": record.rootfs,
        "sourceDateEpoch": record.source_date_epoch,
        "cacheScope": record.cache_scope,
        "policies": [
            {"digest": p["policy_digest"], "allowed": p["allowed"]}
            for p in (record.policy or {}).get("policies", [])
        ],
        "steps": [
            {
                "name": step.name,
                "limits": step.limits,
                "network": {"allow": list(step.network)},
                "secrets": list(step.secrets),
            }
            for step in record.steps
        ],
    }


def provenance_statement(
    record: BuildRecord, spec_text: str, *, builder_id: str, finished: datetime | None = None
) -> dict[str, Any]:
    """The in-toto Statement (SLSA provenance v1) of the build ``record`` describes.

    Args:
        record: the build's record, with its outputs, inputs, steps and what was measured.
        spec_text: the spec's exact text (its digest is in the record).
        builder_id: ``runDetails.builder.id``.
        finished: ``finishedOn`` (default: ``record.finished``).

    Raises:
        ProvenanceError: the statement would be invalid (no outputs, a bad builder id).
    """
    ended = finished or datetime.fromtimestamp(record.finished or record.started, UTC)
    return make_statement(
        subjects=[Subject(o["path"], o["sha256"]) for o in record.outputs],
        external_parameters={
            "spec": {
                "path": record.spec_path.rpartition("/")[2],
                "digest": {"sha256": record.spec_digest.removeprefix("sha256:")},
                "content": spec_text,
            },
            "source": record.source or {},
            "outDir": record.out_dir,
            # Everything the invoker chose that changes what is built.
            "invocation": record.invocation or {},
        },
        internal_parameters=_internal(record),
        resolved_dependencies=_dependencies(record),
        builder_id=builder_id,
        invocation_id=record.id,
        started_on=datetime.fromtimestamp(record.started, UTC),
        finished_on=ended,
        byproducts=[Dependency(uri=b["uri"], sha256=b["sha256"]) for b in record.byproducts],
    )
