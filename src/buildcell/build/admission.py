"""Admission: what a build or a command is checked against before anything runs.

The operator's policies see every build as a spec and an invocation; ``buildcell run``'s
command is seen as a one-step spec made from the very configuration the cell will run
(:func:`command_spec`), so the library and the command line admit exactly the same way.
An invocation (project, trust, ref, grants) is derived in one place, :func:`invocation_for`.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from buildcell.build.invocation import Invocation

if TYPE_CHECKING:
    from buildcell.build.policy import Decision, Policy
    from buildcell.build.spec import BuildSpec
    from buildcell.cell.config import CellConfig

__all__ = ["Admission", "check_policy", "command_spec", "invocation_for"]


def invocation_for(
    *,
    source: Path,
    project: str | None = None,
    ref: str | None = None,
    trust: Literal["trusted", "untrusted"] = "untrusted",
    secrets: Sequence[str] = (),
    unsafe: Sequence[str] = (),
    pinned_hosts: Sequence[str] = (),
    allow: Sequence[str] = (),
    allow_fetch: Sequence[str] = (),
    image_budget: int | None = None,
) -> Invocation:
    """How a build or command was started. Without ``project``, the project is derived
    from the source directory's name and a digest of its path.

    Raises:
        ConfigError: the project name is invalid.
    """
    from buildcell.supply.records import project_name

    return Invocation(
        project=project_name(project)
        if project
        else project_name(str(source.absolute()), derived=True),
        ref=ref,
        trust=trust,
        secrets=tuple(secrets),
        unsafe=tuple(unsafe),
        pinned_hosts=tuple(pinned_hosts),
        allow=tuple(allow),
        allow_fetch=tuple(allow_fetch),
        image_budget=image_budget,
    )


def command_spec(config: CellConfig) -> BuildSpec:
    """``buildcell run``'s command as the one-step spec a policy sees: its rootfs, limits,
    environment, secrets, network and outputs, as the cell will have them."""
    from buildcell.build.spec import BuildSpec
    from buildcell.cell.config import DirRootfs, OciRootfs

    rootfs: object = "host"
    if isinstance(config.rootfs, DirRootfs):
        rootfs = {"dir": str(config.rootfs.path)}
    elif isinstance(config.rootfs, OciRootfs):
        rootfs = {"oci": str(config.rootfs.path), "digest": config.rootfs.digest}
    step: dict[str, object] = {"name": "run", "run": shlex.join(config.argv), "env": config.env}
    if config.secrets:
        step["secrets"] = [s.delivery.name for s in config.secrets]
    if config.has_network and config.network is not None:
        step["network"] = {"allow": config.network.describe()}
    limits = {k: v for k, v in config.limits.to_dict().items() if v is not None}
    return BuildSpec.model_validate(
        {
            "version": 1,
            "name": "run",
            "rootfs": rootfs,
            "limits": limits,
            "steps": [step],
            "outputs": list(config.outputs),
        }
    )


class Admission:
    """The decisions of every policy on one build, once checked (:func:`check_policy`)."""

    def __init__(self, decisions: Sequence[tuple[Policy, Decision]]) -> None:
        self.decisions = tuple(decisions)

    @property
    def allowed(self) -> bool:
        return all(d.allowed for _, d in self.decisions)

    def to_record(self) -> dict[str, Any] | None:
        """What a build record keeps of it (``None`` when no policy applied)."""
        if not self.decisions:
            return None
        return {
            "allowed": self.allowed,
            "policies": [{"path": str(p.path), **d.to_dict()} for p, d in self.decisions],
        }


def check_policy(
    policies: Sequence[Policy],
    spec: BuildSpec,
    invocation: Invocation,
    *,
    emit: Callable[..., object] | None = None,
    record: Callable[[Admission], None] | None = None,
) -> Admission:
    """Check ``spec`` as ``invocation`` against every policy; all must allow it.

    Each decision is emitted as a ``policy.decision`` event and handed to ``record``
    before a denial is raised, so a denied build leaves its reasons behind.

    Raises:
        PolicyError: a policy denies it (exit 125), naming every rule that failed.
    """
    from buildcell.build.policy import check, require_allowed  # only when policies apply

    admission = Admission([(policy, check(policy, spec, invocation)) for policy in policies])
    if record is not None:
        record(admission)
    if emit is not None:
        for policy, decision in admission.decisions:
            emit("policy.decision", policy=str(policy.path), **decision.event_fields())
    for _, decision in admission.decisions:
        require_allowed(decision)
    return admission
