"""An image that takes a while to unpack says how far it is: ``image.unpack`` events from
the cell, printed by ``buildcell run`` (and a build's reporter) as lines on stderr."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.conftest import RunCell
from tests.oci_images import TarEntry, make_host_tools_layout

from buildcell.cell.config import OciRootfs
from buildcell.supply import images
from buildcell.supply.images import unpack_line


def test_a_slow_unpack_reports_each_layer_and_the_end(
    cell: RunCell, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(images, "PROGRESS_AFTER", 0.0)  # every unpack is "slow"
    layers = [[TarEntry("a", "file", b"a" * 4096)], [TarEntry("b", "file", b"b" * 8192)]]
    digest = make_host_tools_layout(tmp_path / "img", layers)
    ran = cell(["/usr/bin/true"], rootfs=OciRootfs(tmp_path / "img", digest))
    assert ran.result.exit_code == 0
    reports = ran.of("image.unpack")
    assert reports[-1]["done"] is True and reports[-1]["digest"] == digest
    steps = [r for r in reports if not r.get("done") and not r.get("partial")]
    # Within a layer too (here after every file), so that a large layer is no silence.
    within = [r for r in reports if r.get("partial")]
    assert within and all(1 <= r["layer"] <= r["layers"] for r in within)
    assert "layer 1/" in unpack_line(within[0]) and ", unpacking, " in unpack_line(within[0])
    assert [r["layer"] for r in steps] == list(range(1, len(steps) + 1))
    assert len(steps) == steps[0]["layers"] >= 2
    lines = [unpack_line(r) for r in reports]
    short = digest.split(":")[1][:12]
    assert lines[0].startswith(f"unpacking image {short}: layer 1/{steps[0]['layers']}, ")
    assert lines[-1].startswith(f"unpacked image {short}: ") and lines[-1].endswith("s")
    # Cached: nothing to report.
    again = cell(["/usr/bin/true"], rootfs=OciRootfs(tmp_path / "img", digest))
    assert again.of("image.unpack") == []


def test_a_fast_unpack_says_nothing(cell: RunCell, tmp_path: Path) -> None:
    digest = make_host_tools_layout(tmp_path / "img", [[TarEntry("a", "file", b"a")]])
    ran = cell(["/usr/bin/true"], rootfs=OciRootfs(tmp_path / "img", digest))
    assert ran.result.exit_code == 0 and ran.of("image.unpack") == []
