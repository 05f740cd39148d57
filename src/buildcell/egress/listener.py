"""What a cell's network namespace holds for its egress: the sockets bound inside it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["Listener"]


@dataclass(frozen=True)
class Listener:
    """One socket bound inside the cell: ``role`` is ``proxy``, ``dns`` or ``transparent``."""

    role: Literal["proxy", "dns", "transparent"]
    transport: Literal["tcp", "udp"]
    address: str
    port: int
