"""`make stress`: the fault and load suite (not part of `make test`).

Every check is bounded in count and time and talks only to loopback. Each module under
``stress/`` reports rows: what was tried, how often, whether the property held. The
table goes to stdout and ``stress/results.md``; the exit status is 1 if anything did not
hold. ``STRESS_SCALE`` (default 1.0) scales every count, e.g. 0.1 for a quick look.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "src"), str(HERE.parent)]

MODULES = ("cells", "proxy", "fuzz")


def main() -> int:
    scale = float(os.environ.get("STRESS_SCALE", "1.0"))
    only = [m for m in sys.argv[1:] if m in MODULES] or list(MODULES)
    rows = []
    started = time.monotonic()
    for name in only:
        t = time.monotonic()
        module = importlib.import_module(name)
        found = module.checks(scale)
        rows += found
        print(f"stress: {name} done in {time.monotonic() - t:.0f}s", file=sys.stderr)
    lines = [
        f"Run {datetime.now(UTC).strftime('%Y-%m-%d %H:%M')} UTC, scale {scale:g}, "
        f"{time.monotonic() - started:.0f} s, {os.cpu_count()} CPUs, "
        f"{'root' if os.geteuid() == 0 else 'rootless'}.",
        "",
        "| area | what was tried | cases | held | detail |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.area} | {r.what} | {r.tried} | {'yes' if r.held else '**NO**'} | {r.detail} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    if scale >= 1.0 and set(only) == set(MODULES):
        (HERE / "results.md").write_text(table)
        _update_readme(table)
    return 0 if all(r.held for r in rows) else 1


def _update_readme(table: str) -> None:
    readme = HERE.parent / "README.md"
    text = readme.read_text()
    start, end = "<!-- stress:start -->", "<!-- stress:end -->"
    if start in text and end in text:
        head, _, rest = text.partition(start)
        _, _, tail = rest.partition(end)
        readme.write_text(f"{head}{start}\n{table}{end}{tail}")


if __name__ == "__main__":
    raise SystemExit(main())
