"""What a cell's egress did: one record per attempt, and the per-destination summary."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["MAX_ROWS", "Attempt", "EgressStats", "EgressSummaryRow"]

#: Distinct destinations counted per cell; further ones are summed in one row.
MAX_ROWS = 500


@dataclass
class Attempt:
    """One connection or request through the egress service, as audited.

    Attributes:
        mode: ``proxy`` (absolute-URI request), ``connect`` (CONNECT tunnel) or
            ``transparent`` (a connection to a synthetic address).
        allowed: whether the policy let it through (a failed connection after an
            allow is still ``allowed`` with ``error`` set).
    """

    mode: Literal["proxy", "connect", "transparent"]
    host: str
    port: int
    allowed: bool = False
    method: str | None = None
    path: str | None = None
    address: str | None = None
    entry: str | None = None
    reason: str | None = None
    suggestion: str | None = None
    status: int | None = None
    error: str | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    duration_ms: float = 0.0

    def event_fields(self) -> dict[str, Any]:
        """The fields of its ``net.allow``/``net.deny`` event (no empty ones)."""
        fields: dict[str, Any] = {
            "mode": self.mode,
            "host": self.host,
            "port": self.port,
            "method": self.method,
            "path": self.path,
            "address": self.address,
            "entry": self.entry,
            "reason": self.reason,
            "allow_hint": self.suggestion,
            "status": self.status,
            "error": self.error,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "duration_ms": round(self.duration_ms, 3),
        }
        return {k: v for k, v in fields.items() if v is not None}


@dataclass
class EgressSummaryRow:
    """One line of the egress table: a destination and what happened to it."""

    destination: str
    allowed: bool
    requests: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    errors: int = 0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EgressSummaryRow:
        """The inverse of ``to_dict`` (rows kept in build records)."""
        return cls(
            str(data["destination"]),
            data["verdict"] == "allowed",
            int(data["requests"]),
            int(data["bytes_up"]),
            int(data["bytes_down"]),
            int(data["errors"]),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "destination": self.destination,
            "verdict": "allowed" if self.allowed else "denied",
            "requests": self.requests,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "errors": self.errors,
        }


@dataclass
class EgressStats:
    """Per-destination counters, updated from the egress thread, read after the cell."""

    _rows: dict[tuple[str, bool], EgressSummaryRow] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    dns_queries: int = 0
    dns_refused: int = 0

    def add(self, attempt: Attempt) -> None:
        destination = f"{attempt.host}:{attempt.port}"
        with self._lock:
            if (destination, attempt.allowed) not in self._rows and len(self._rows) >= MAX_ROWS:
                # Bounded memory whatever a build tries: the rest share one row.
                destination = "(other destinations)"
            row = self._rows.get((destination, attempt.allowed))
            if row is None:
                row = self._rows[(destination, attempt.allowed)] = EgressSummaryRow(
                    destination, attempt.allowed
                )
            row.requests += 1
            row.bytes_up += attempt.bytes_up
            row.bytes_down += attempt.bytes_down
            row.errors += attempt.error is not None

    def add_dns(self, *, refused: bool) -> None:
        with self._lock:
            self.dns_queries += 1
            self.dns_refused += refused

    def rows(self) -> list[EgressSummaryRow]:
        """Allowed destinations first, then denied, each by name."""
        with self._lock:
            return sorted(self._rows.values(), key=lambda r: (not r.allowed, r.destination))

    @staticmethod
    def merge(rows: list[EgressSummaryRow]) -> list[EgressSummaryRow]:
        """Rows of several cells (the steps of a build) summed per destination."""
        merged: dict[tuple[str, bool], EgressSummaryRow] = {}
        for row in rows:
            into = merged.setdefault(
                (row.destination, row.allowed), EgressSummaryRow(row.destination, row.allowed)
            )
            into.requests += row.requests
            into.bytes_up += row.bytes_up
            into.bytes_down += row.bytes_down
            into.errors += row.errors
        return sorted(merged.values(), key=lambda r: (not r.allowed, r.destination))
