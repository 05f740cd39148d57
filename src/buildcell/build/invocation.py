"""How a build or a command was started: the invoker's choices.

A policy sees them as ``invocation``; provenance records them as
``externalParameters.invocation``; :func:`buildcell.build.admission.invocation_for`
derives them in one place. A module of its own so that a command without a policy never
loads the policy engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["Invocation"]


@dataclass(frozen=True)
class Invocation:
    """How a build was started: what the policy sees as ``invocation``.

    Attributes:
        project: the project the build belongs to.
        ref: the source ref being built (``refs/heads/main``), if known.
        trust: whether the build runs trusted code (``trusted``) or not.
        secrets: the names of the secrets bound for this build.
        unsafe: the ``--unsafe-*`` flags in use, without the prefix (``no-seccomp``),
            and ``seccomp-profile`` when a custom seccomp profile replaces the built-in one.
        pinned_hosts: names pinned to addresses with ``--add-host``, as ``NAME=ADDRESS``.
        allow: destinations granted with ``--allow`` (canonical entries).
        allow_fetch: destinations granted for host-side fetches with ``--allow-fetch``.
        image_budget: bytes all images of the build may unpack to (the operator's
            ``images.max_size``), if set.
    """

    project: str
    ref: str | None = None
    trust: Literal["trusted", "untrusted"] = "untrusted"
    secrets: tuple[str, ...] = ()
    unsafe: tuple[str, ...] = ()
    pinned_hosts: tuple[str, ...] = ()
    allow: tuple[str, ...] = ()
    allow_fetch: tuple[str, ...] = ()
    image_budget: int | None = None

    def to_parameters(self) -> dict[str, Any]:
        """What the invoker chose, as provenance's ``externalParameters.invocation``."""
        return {
            "project": self.project,
            "trust": self.trust,
            "ref": self.ref,
            "secrets": list(self.secrets),
            "pinnedHosts": list(self.pinned_hosts),
            "allow": list(self.allow),
            "allowFetch": list(self.allow_fetch),
            "unsafe": list(self.unsafe),
        }

    def __post_init__(self) -> None:
        if self.trust not in ("trusted", "untrusted"):
            raise ValueError(f"trust must be 'trusted' or 'untrusted', not {self.trust!r}")

    def cache_scope(self) -> str:
        """``trusted``, ``ref:REF`` or ``build``: whose caches this build uses."""
        if self.trust == "trusted":
            return "trusted"
        return f"ref:{self.ref}" if self.ref is not None else "build"
