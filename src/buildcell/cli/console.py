"""Terminal presentation of builds (only the CLI imports this).

On a TTY: one line per step with a spinner and its elapsed time, the running step's
output streaming above it, each line prefixed with the step's name; then a summary table.
Off a TTY: plain prefixed lines, nothing redrawn.
"""

from __future__ import annotations

import json
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from buildcell._text import printable
from buildcell.build.doctor import DoctorReport
from buildcell.build.runner import BuildResult
from buildcell.build.spec import BuildSpec, StepSpec
from buildcell.egress.audit import EgressStats, EgressSummaryRow, denial_line
from buildcell.supply.records import BuildRecord, Listed, StepRecord, UnreadableRecord
from buildcell.units import format_size

__all__ = ["LiveReporter", "PlainReporter", "render_egress", "render_record", "render_records"]


class _LineSplitter:
    """Turns chunks into complete lines per (step, stream); keeps partial lines for later.

    The work is linear in the output however it is chunked: the pieces of a line that has
    not ended are kept as they came and joined once, not joined again with every chunk.
    What is kept of one line is bounded by :attr:`MAX_LINE` bytes: a longer line is given
    out in lines of at most that many bytes, each but its last ending in :attr:`CONTINUED`,
    as soon as they are complete. The cuts fall in the same places however the line came,
    and between characters where it is UTF-8.
    """

    #: The longest line given out whole, in bytes.
    MAX_LINE = 64 * 1024
    #: What ends a piece of a longer line (as a shell marks a line that goes on).
    CONTINUED = " \\"

    def __init__(self) -> None:
        # Per key: the pieces of the line under way, and how many bytes they hold.
        self._partial: dict[tuple[str, str], tuple[list[bytes], int]] = {}

    def feed(self, key: tuple[str, str], data: bytes) -> list[str]:
        pieces, held = self._partial.pop(key, ([], 0))
        *ended, rest = data.split(b"\n")
        lines: list[str] = []
        if ended:
            pieces.append(ended[0])
            ended[0] = b"".join(pieces)
            for line in ended:
                start = self._give_out(line, lines)
                lines.append(line[start:].decode(errors="replace"))
            pieces, held = [], 0
        if rest:
            pieces.append(rest)
            held += len(rest)
            if held > self.MAX_LINE:
                # The line will be cut: join what is held once, and keep what is left.
                joined = b"".join(pieces)
                start = self._give_out(joined, lines)
                pieces, held = [joined[start:]], len(joined) - start
        if pieces:
            self._partial[key] = (pieces, held)
        return lines

    def flush(self, key: tuple[str, str]) -> list[str]:
        pieces, _ = self._partial.pop(key, ([], 0))
        return [b"".join(pieces).decode(errors="replace")] if pieces else []

    def _give_out(self, line: bytes, lines: list[str]) -> int:
        """Append the marked pieces that the start of ``line`` is cut into while more than
        :attr:`MAX_LINE` bytes of it are left; return where the rest starts."""
        start = 0
        while len(line) - start > self.MAX_LINE:
            end = _character_start(line, start + self.MAX_LINE)
            lines.append(line[start:end].decode(errors="replace") + self.CONTINUED)
            start = end
        return start


def _character_start(data: bytes, end: int) -> int:
    """``end``, or where a UTF-8 character that ``data[:end]`` leaves incomplete starts
    (at most three bytes back, so never at or before ``end - 4``).

    Only the bytes before ``end`` are looked at, so the answer does not depend on what
    has arrived after them.
    """
    for at in range(end - 1, max(0, end - 4) - 1, -1):
        byte = data[at]
        if byte < 0x80:
            return end
        if byte >= 0xC0:
            length = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return at if at + length > end else end
    return end


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

    def progress(self, text: str) -> None:
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
        if record.exit_code == 0:
            verdict = "ok"
        else:
            cause = failure_cause(record)
            verdict = f"failed (exit {record.exit_code}{': ' + cause if cause else ''})"
        self._say(f"[{step.name}] {verdict} in {record.duration or 0:.1f}s")

    def _say(self, text: str) -> None:
        with self._lock:
            self.err.write(f"buildcell: {text}\n")
            self.err.flush()


class QuietReporter(PlainReporter):
    """``build -q``: no progress and no step output; warnings, and the step that failed."""

    def build_started(self, build_id: str, spec: BuildSpec) -> None:
        pass

    def step_started(self, step: StepSpec) -> None:
        pass

    def step_output(self, step: StepSpec, stream: str, data: bytes) -> None:
        pass

    def progress(self, text: str) -> None:
        pass

    def step_finished(self, step: StepSpec, record: StepRecord) -> None:
        if record.exit_code != 0:
            super().step_finished(step, record)


def render_summary_line(record: BuildRecord) -> str:
    """One line for a build: ``NAME ID: STATUS in 1.2s``."""
    duration = f" in {record.duration:.1f}s" if record.duration is not None else ""
    code = f" (exit {record.exit_code})" if record.exit_code not in (0, None) else ""
    return f"{printable(record.name)} {record.id}: {record.status}{duration}{code}"


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
                        + (f"  {escape(cause)}" if (cause := failure_cause(rec)) else "")
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

    def progress(self, text: str) -> None:
        self.message(text)

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


def failure_cause(step: StepRecord) -> str | None:
    """Why a step failed, in words, where a limit or the host ended it (not for a command
    that just exited non-zero): ``timed out after 10m``, ``killed: out of memory (limit
    2.0 GiB)``."""
    limits = step.limits or {}

    def limit(name: str, show: Callable[[Any], str]) -> str:
        value = limits.get(name)
        return f" (limit {show(value)})" if isinstance(value, int | float) else ""

    if step.reason == "timeout":
        value = limits.get("timeout")
        return "timed out" + (f" after {_seconds(value)}" if isinstance(value, int | float) else "")
    if step.reason == "oom":
        return "killed: out of memory" + limit("memory", lambda v: format_size(int(v)))
    if step.reason == "pids":
        return "out of processes: forks were refused" + limit("pids", lambda v: str(int(v)))
    if step.reason == "disk":
        return "out of disk: the workspace is full" + limit("disk", lambda v: format_size(int(v)))
    if step.reason == "signaled" and step.exit_code is not None and step.exit_code > 128:
        try:
            name = signal.Signals(step.exit_code - 128).name
        except ValueError:
            name = f"signal {step.exit_code - 128}"
        return f"killed by {name}"
    if step.reason == "state":
        return "its log could not be written"
    return None


def _seconds(value: float) -> str:
    """A duration as it is written in a spec: 45s, 10m, 1h30m."""
    total = round(value)
    hours, rest = divmod(total, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [f"{hours}h" if hours else "", f"{minutes}m" if minutes else ""]
    parts.append(f"{seconds}s" if seconds or not (hours or minutes) else "")
    return "".join(parts)


def _status_style(status: str) -> str:
    return {"succeeded": "green", "failed": "red", "error": "red", "running": "yellow"}.get(
        status, "dim"
    )


def _render_kept(record: BuildRecord, console: Console) -> None:
    """Where ``build --keep-failed`` kept the failed step's workspace, or what became of it."""
    from buildcell.build.kept import KeptWorkspace

    kept = KeptWorkspace.from_record(record.kept_workspace)
    if kept is None:
        return
    if kept.removed is not None:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(kept.removed))
        console.print(f"[dim]kept workspace of step {escape(kept.step)}: removed {when}[/]")
        return
    until = time.strftime("%Y-%m-%d %H:%M", time.localtime(kept.expires))
    console.print(
        f"kept workspace of step {escape(kept.step)}: {escape(str(kept.path))} (until {until}; "
        f"`buildcell shell {record.id}` opens a shell on it)"
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
        cause = failure_cause(s) if s.status == "failed" else None
        steps.add_row(
            s.name,
            f"[{_status_style(s.status)}]{s.status}[/]"
            + (f" [red]({escape(cause)})[/]" if cause else ""),
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
            outputs.add_row(escape(printable(o["path"])), str(o["size"]), o["sha256"])
        console.print(outputs)
        if record.out_dir:
            console.print(f"outputs in {escape(record.out_dir)} (manifest: outputs.json)")
    egress = EgressStats.from_records(row for step in record.steps for row in step.egress)
    render_egress(egress, console, spec=True)
    if result is None:  # `show`; a build that just ended says it in its last line
        _render_kept(record, console)
    if result is not None:
        if result.provenance is not None:
            how = (
                f"signed, key {result.signed_by}"
                if result.signed_by
                else "unsigned: pass --sign-key to sign it"
            )
            console.print(f"provenance: {escape(str(result.provenance))} ({how})")
        console.print(f"[dim]record: {escape(str(result.record_dir))}[/]")


def render_egress(
    rows: Sequence[EgressSummaryRow | Mapping[str, Any]], console: Console, *, spec: bool = False
) -> None:
    """The egress table: each destination, how often, how many bytes, allowed or denied;
    under it, for each denied destination, why and what would allow it (``spec``: in a
    build's step), one line each (long reasons do not squeeze the table)."""
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
    datas = [row.to_dict() if isinstance(row, EgressSummaryRow) else row for row in rows]
    for data in datas:
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
    for data in datas:
        if data["verdict"] != "allowed":
            console.print(Text(denial_line(data, spec=spec), style="red"), soft_wrap=True)


def render_unreadable(record: UnreadableRecord, console: Console) -> None:
    """A build whose record cannot be read: its id and why."""
    console.print(f"{record.id}: [red]unreadable[/]: {escape(record.reason)}")


def render_records(records: Sequence[tuple[Listed, BuildRecord | None]], console: Console) -> None:
    """The ``ls`` table: one row per build (a ``--check-repro`` twin under its build)."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("build", "name", "status", "started", "duration", "steps"):
        table.add_column(col)
    for r, twin in records:
        if isinstance(r, UnreadableRecord):
            table.add_row(r.id, "", f"[red]unreadable: {escape(r.reason)}[/]", "", "", "")
            continue
        _record_row(table, r, name=escape(printable(r.name)) + _repro_mark(r))
        if twin is not None:
            _record_row(table, twin, name="  [dim]└ its --check-repro rebuild[/]")
    console.print(table)


def _repro_mark(record: BuildRecord) -> str:
    if record.reproducible is None:
        return ""
    return " [green](reproducible)[/]" if record.reproducible else " [red](not reproducible)[/]"


def _record_row(table: Table, r: BuildRecord, *, name: str) -> None:
    if r.kind == "run" and r.command:
        command = printable(shlex.join(r.command))
        name = "[dim]run[/] " + escape(command if len(command) <= 60 else command[:59] + "…")
    table.add_row(
        r.id,
        name,
        f"[{_status_style(r.status)}]{r.status}[/]",
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.started)),
        f"{r.duration:.1f}s" if r.duration is not None else "",
        f"{sum(s.status == 'succeeded' for s in r.steps)}/{len(r.steps)}",
    )


def render_doctor(report: DoctorReport, *, as_json: bool) -> None:
    """Print the report: a table on a terminal, plain lines otherwise, or JSON."""
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, soft_wrap=not sys.stdout.isatty())
    table = Table(title="buildcell doctor", show_lines=False)
    table.add_column("check")
    table.add_column("")
    table.add_column("detail")
    for c in report.checks:
        table.add_row(c.name, "[green]ok[/]" if c.ok else "[red]FAIL[/]", c.detail)
    console.print(table)
    if report.limits:
        limits = Table(title="how limits are enforced")
        limits.add_column("limit")
        limits.add_column("mechanism")
        for name, how in report.limits.items():
            limits.add_row(name, how)
        console.print(limits)
    console.print(
        "[green]cells can be made on this host[/]"
        if report.cell_ok
        else "[red]no cell can be made on this host[/]"
    )
