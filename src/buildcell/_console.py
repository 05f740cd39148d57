"""Terminal presentation of builds (only the CLI imports this).

On a TTY: one line per step with a spinner and its elapsed time, the running step's
output streaming above it, each line prefixed with the step's name; then a summary table.
Off a TTY: plain prefixed lines, nothing redrawn.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import IO, Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from buildcell.egress.audit import EgressStats, EgressSummaryRow
from buildcell.pipeline import BuildResult
from buildcell.records import BuildRecord, StepRecord
from buildcell.spec import BuildSpec, StepSpec
from buildcell.units import format_size

__all__ = ["LiveReporter", "PlainReporter", "render_egress", "render_record", "render_records"]


class _LineSplitter:
    """Turns chunks into complete lines per (step, stream); keeps partial lines for later."""

    def __init__(self) -> None:
        self._partial: dict[tuple[str, str], bytes] = {}

    def feed(self, key: tuple[str, str], data: bytes) -> list[str]:
        buf = self._partial.get(key, b"") + data
        *lines, rest = buf.split(b"\n")
        self._partial[key] = rest
        return [ln.decode(errors="replace") for ln in lines]

    def flush(self, key: tuple[str, str]) -> list[str]:
        rest = self._partial.pop(key, b"")
        return [rest.decode(errors="replace")] if rest else []


class PlainReporter:
    """Prefixed lines: ``[step] text``; the step's stdout to ``out``, everything else to err."""

    def __init__(self, out: IO[str] | None = None, err: IO[str] | None = None) -> None:
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self._lines = _LineSplitter()
        self._lock = threading.Lock()

    def build_started(self, build_id: str, spec: BuildSpec) -> None:
        self._say(f"build {build_id}: {spec.name}, {len(spec.steps)} step(s)")

    def message(self, text: str) -> None:
        self._say(text)

    def step_started(self, step: StepSpec) -> None:
        self._say(f"[{step.name}] started")

    def step_output(self, step: StepSpec, stream: str, data: bytes) -> None:
        target = self.out if stream == "stdout" else self.err
        with self._lock:
            for line in self._lines.feed((step.name, stream), data):
                target.write(f"[{step.name}] {line}\n")
            target.flush()

    def step_finished(self, step: StepSpec, record: StepRecord) -> None:
        for stream in ("stdout", "stderr"):
            for line in self._lines.flush((step.name, stream)):
                (self.out if stream == "stdout" else self.err).write(f"[{step.name}] {line}\n")
        verdict = "ok" if record.exit_code == 0 else f"failed (exit {record.exit_code})"
        self._say(f"[{step.name}] {verdict} in {record.duration or 0:.1f}s")

    def _say(self, text: str) -> None:
        with self._lock:
            self.err.write(f"buildcell: {text}\n")
            self.err.flush()


class LiveReporter:
    """rich Live display: step lines with spinners below the streaming output."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True, highlight=False)
        self._steps: list[StepSpec] = []
        self._records: dict[str, StepRecord] = {}
        self._started: dict[str, float] = {}
        self._lines = _LineSplitter()
        self._live = Live(
            console=self.console, refresh_per_second=8, transient=True, get_renderable=self._render
        )

    def __enter__(self) -> LiveReporter:
        self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._live.stop()

    def _render(self) -> Group:
        rows: list[RenderableType] = []
        for step in self._steps:
            rec = self._records.get(step.name)
            if rec is None and step.name in self._started:
                elapsed = time.monotonic() - self._started[step.name]
                rows.append(Spinner("dots", Text(f"{step.name}  {elapsed:5.1f}s")))
            elif rec is not None:
                mark = "[green]✓[/]" if rec.exit_code == 0 else "[red]✗[/]"
                rows.append(
                    Text.from_markup(
                        f"{mark} {escape(step.name)}  {rec.duration or 0:5.1f}s"
                        + ("" if rec.exit_code == 0 else f"  exit {rec.exit_code}")
                    )
                )
            else:
                rows.append(Text(f"· {step.name}", style="dim"))
        return Group(*rows)

    def build_started(self, build_id: str, spec: BuildSpec) -> None:
        self._steps = list(spec.steps)
        self.console.print(f"[bold]build[/] {build_id}: {escape(spec.name)}")

    def message(self, text: str) -> None:
        self.console.print(f"[dim]{escape(text)}[/]")

    def step_started(self, step: StepSpec) -> None:
        self._started[step.name] = time.monotonic()

    def step_output(self, step: StepSpec, stream: str, data: bytes) -> None:
        for line in self._lines.feed((step.name, stream), data):
            self._print_line(step.name, line)

    def _print_line(self, name: str, line: str) -> None:
        self.console.print(Text(f"{name} │ ", style="cyan") + Text(line), soft_wrap=True)

    def step_finished(self, step: StepSpec, record: StepRecord) -> None:
        for stream in ("stdout", "stderr"):
            for line in self._lines.flush((step.name, stream)):
                self._print_line(step.name, line)
        self._records[step.name] = record


def _status_style(status: str) -> str:
    return {"succeeded": "green", "failed": "red", "error": "red", "running": "yellow"}.get(
        status, "dim"
    )


def render_record(
    record: BuildRecord, console: Console, *, result: BuildResult | None = None
) -> None:
    """The summary of one build: steps, outputs with digests, where the record is."""
    style = _status_style(record.status)
    duration = f" in {record.duration:.1f}s" if record.duration is not None else ""
    console.print(
        f"[bold]{escape(record.name)}[/] {record.id}: [{style}]{record.status}[/]{duration}"
        + (f" (exit {record.exit_code})" if record.exit_code not in (0, None) else "")
    )
    if record.error:
        console.print(f"  [red]{escape(record.error)}[/]")
    steps = Table(box=None, show_header=True, header_style="bold", pad_edge=False)
    steps.add_column("step")
    steps.add_column("status")
    steps.add_column("duration", justify="right")
    steps.add_column("exit", justify="right")
    for s in record.steps:
        steps.add_row(
            s.name,
            f"[{_status_style(s.status)}]{s.status}[/]",
            f"{s.duration:.1f}s" if s.duration is not None else "",
            "" if s.exit_code is None else str(s.exit_code),
        )
    console.print(steps)
    if record.outputs:
        outputs = Table(box=None, show_header=True, header_style="bold", pad_edge=False)
        outputs.add_column("output")
        outputs.add_column("size", justify="right")
        outputs.add_column("sha256")
        for o in record.outputs:
            outputs.add_row(escape(o["path"]), str(o["size"]), o["sha256"])
        console.print(outputs)
        if record.out_dir:
            console.print(f"outputs in {escape(record.out_dir)} (manifest: outputs.json)")
    egress = [EgressSummaryRow.from_dict(row) for step in record.steps for row in step.egress]
    render_egress(EgressStats.merge(egress), console)
    if result is not None:
        if result.provenance is not None:
            how = (
                f"signed, key {result.signed_by}"
                if result.signed_by
                else "unsigned: pass --sign-key to sign it"
            )
            console.print(f"provenance: {escape(str(result.provenance))} ({how})")
        console.print(f"[dim]record: {escape(str(result.record_dir))}[/]")


def render_egress(rows: Sequence[EgressSummaryRow | Mapping[str, Any]], console: Console) -> None:
    """The egress table: each destination, how often, how many bytes, allowed or denied."""
    if not rows:
        return
    table = Table(box=None, show_header=True, header_style="bold", pad_edge=False)
    for col, justify in (
        ("egress", "left"),
        ("verdict", "left"),
        ("requests", "right"),
        ("sent", "right"),
        ("received", "right"),
        ("errors", "right"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        data = row.to_dict() if isinstance(row, EgressSummaryRow) else row
        verdict = str(data["verdict"])
        table.add_row(
            escape(str(data["destination"])),
            f"[{'green' if verdict == 'allowed' else 'red'}]{verdict}[/]",
            str(data["requests"]),
            format_size(int(data["bytes_up"])),
            format_size(int(data["bytes_down"])),
            str(data["errors"]) if data["errors"] else "",
        )
    console.print(table)


def render_records(records: list[BuildRecord], console: Console) -> None:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("build", "name", "status", "started", "duration", "steps"):
        table.add_column(col)
    for r in records:
        table.add_row(
            r.id,
            escape(r.name),
            f"[{_status_style(r.status)}]{r.status}[/]",
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.started)),
            f"{r.duration:.1f}s" if r.duration is not None else "",
            f"{sum(s.status == 'succeeded' for s in r.steps)}/{len(r.steps)}",
        )
    console.print(table)
