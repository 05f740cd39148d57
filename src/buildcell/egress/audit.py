"""What a cell's egress did: one record per attempt, and the per-destination summary.

Also how a denial reads for a person (:func:`denial_line`, :func:`hint_text`): the live
line printed when a destination is first denied, the egress table and ``buildcell logs``
all say it the same way.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from buildcell._text import printable

__all__ = [
    "MAX_ROWS",
    "Attempt",
    "EgressStats",
    "EgressSummaryRow",
    "denial_line",
    "hint_text",
]

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
        suggestion: for a denial, the ``--allow`` value that would permit it.
        add_host: for a denial, the ``--add-host`` value to go with ``suggestion``.
        pinned: allowed to a non-public address by the operator's pin of its name.
        recorded: set once the attempt has been handed to the audit (a denial is, as soon
            as it is decided; everything else when it ends).
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
    add_host: str | None = None
    pinned: bool = False
    status: int | None = None
    error: str | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    duration_ms: float = 0.0
    recorded: bool = False

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
            "add_host_hint": self.add_host,
            "pinned": self.pinned or None,
            "status": self.status,
            "error": self.error,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "duration_ms": round(self.duration_ms, 3),
        }
        return {k: v for k, v in fields.items() if v is not None}


@dataclass
class EgressSummaryRow:
    """One line of the egress table: a destination and what happened to it.

    A denied row keeps the first denial's ``reason`` and hints (one per destination).
    """

    destination: str
    allowed: bool
    requests: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    errors: int = 0
    reason: str | None = None
    allow_hint: str | None = None
    add_host_hint: str | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EgressSummaryRow:
        """The inverse of ``to_dict`` (rows kept in build records; older rows have no
        reason or hints).

        Raises:
            ValueError: ``data`` is not such a row (a damaged record).
        """

        def text(key: str) -> str | None:
            value = data.get(key)
            return None if value is None else str(value)

        def count(key: str) -> int:
            value = data.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"egress row: {key}: not a count")
            return value

        if not isinstance(data, Mapping) or not isinstance(data.get("destination"), str):
            raise ValueError("egress row: destination: not a string")
        if data.get("verdict") not in ("allowed", "denied"):
            raise ValueError("egress row: verdict: not 'allowed' or 'denied'")
        return cls(
            data["destination"],
            data["verdict"] == "allowed",
            count("requests"),
            count("bytes_up"),
            count("bytes_down"),
            count("errors"),
            text("reason"),
            text("allow_hint"),
            text("add_host_hint"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "destination": self.destination,
            "verdict": "allowed" if self.allowed else "denied",
            "requests": self.requests,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "errors": self.errors,
            "reason": self.reason,
            "allow_hint": self.allow_hint,
            "add_host_hint": self.add_host_hint,
        }

    def _add(self, other: EgressSummaryRow | Attempt) -> None:
        if isinstance(other, Attempt):
            self.requests += 1
            self.errors += other.error is not None
            reason, allow_hint, add_host = other.reason, other.suggestion, other.add_host
        else:
            self.requests += other.requests
            self.errors += other.errors
            reason, allow_hint, add_host = other.reason, other.allow_hint, other.add_host_hint
        self.bytes_up += other.bytes_up
        self.bytes_down += other.bytes_down
        if not self.allowed and self.reason is None and reason is not None:
            self.reason, self.allow_hint, self.add_host_hint = reason, allow_hint, add_host


@dataclass
class EgressStats:
    """Per-destination counters, updated from the egress thread, read after the cell."""

    _rows: dict[tuple[str, bool], EgressSummaryRow] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    dns_queries: int = 0
    dns_refused: int = 0

    def add(self, attempt: Attempt) -> bool:
        """Count ``attempt``; True when it is the first denial of its destination."""
        destination = f"{attempt.host}:{attempt.port}"
        with self._lock:
            if (destination, attempt.allowed) not in self._rows and len(self._rows) >= MAX_ROWS:
                # Bounded memory whatever a build tries: the rest share one row.
                destination = "(other destinations)"
            row = self._rows.get((destination, attempt.allowed))
            first = row is None and not attempt.allowed
            if row is None:
                row = self._rows[(destination, attempt.allowed)] = EgressSummaryRow(
                    destination, attempt.allowed
                )
            row._add(attempt)
            return first

    def add_dns(self, *, refused: bool) -> None:
        with self._lock:
            self.dns_queries += 1
            self.dns_refused += refused

    def rows(self) -> list[EgressSummaryRow]:
        """Allowed destinations first, then denied, each by name."""
        with self._lock:
            return sorted(self._rows.values(), key=lambda r: (not r.allowed, r.destination))

    @staticmethod
    def from_records(rows: Iterable[Any]) -> list[EgressSummaryRow]:
        """Rows kept in a build record (its steps' ``egress``), summed per destination
        (:meth:`merge`). A row that is not one (a damaged record) is left out rather
        than failing what only reads the record."""
        parsed = []
        for row in rows:
            with contextlib.suppress(ValueError):
                parsed.append(EgressSummaryRow.from_dict(row))
        return EgressStats.merge(parsed)

    @staticmethod
    def merge(rows: list[EgressSummaryRow]) -> list[EgressSummaryRow]:
        """Rows of several cells (the steps of a build) summed per destination; a denied
        destination keeps the first reason given for it."""
        merged: dict[tuple[str, bool], EgressSummaryRow] = {}
        for row in rows:
            into = merged.setdefault(
                (row.destination, row.allowed), EgressSummaryRow(row.destination, row.allowed)
            )
            into._add(row)
        return sorted(merged.values(), key=lambda r: (not r.allowed, r.destination))


# -- how a denial reads ----------------------------------------------------------------


def hint_text(
    allow_hint: str | None, add_host_hint: str | None = None, *, spec: bool = False
) -> str | None:
    """What would permit a denied destination, as a person types it; None if nothing.

    For ``run`` (the operator's own allowlist): ``--allow HOST:PORT``, or with a pin
    ``--add-host NAME:ADDRESS --allow NAME:PORT``. For a build step (``spec``) a
    destination joins the step's ``network.allow`` in the spec, and one that is not
    public must also be granted by the operator; a pin is the operator's alone
    (``--add-host`` and ``--allow`` on the command line, the step already names it).
    """
    if allow_hint is None:
        return None
    if add_host_hint is not None:
        return f"--add-host {add_host_hint} --allow {allow_hint}"
    if not spec:
        return f"--allow {allow_hint}"
    from buildcell.allowlist import parse_allow, spec_entry_problem
    from buildcell.errors import ConfigError

    text = f"add {allow_hint} to the step's network.allow"
    try:
        needs_grant = spec_entry_problem(parse_allow(allow_hint)) is not None
    except ConfigError:
        return None
    return f"{text} and grant it with --allow {allow_hint}" if needs_grant else text


def denial_line(fields: Mapping[str, Any], *, spec: bool = False) -> str:
    """``egress denied: HOST:PORT — REASON; to allow: HINT`` for a ``net.deny`` event's
    fields (or a denied row's ``to_dict()``), escaped for a terminal."""
    if "destination" in fields:
        destination = str(fields["destination"])
    else:
        host, port = str(fields.get("host", "")), fields.get("port")
        destination = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    line = f"egress denied: {destination} — {fields.get('reason') or 'no reason recorded'}"
    allow_hint, add_host = fields.get("allow_hint"), fields.get("add_host_hint")
    hint = hint_text(
        None if allow_hint is None else str(allow_hint),
        None if add_host is None else str(add_host),
        spec=spec,
    )
    if hint is not None:
        line += f"; to allow: {hint}"
    return printable(line)
