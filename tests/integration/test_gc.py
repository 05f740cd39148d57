"""`buildcell gc` through the CLI: old records, the inputs only they used, unused images."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, cast

from tests.conftest import RunCLI, root_only
from tests.oci_images import TarEntry, make_host_tools_layout

OLD = time.time() - 90 * 86400


def _gc(bc: RunCLI, cwd: Path, *args: str) -> dict[str, Any]:
    res = bc("gc", "--json", *args, cwd=cwd)
    assert res.returncode == 0, res.stderr
    return cast("dict[str, Any]", json.loads(res.stdout))


def _ids(bc: RunCLI, cwd: Path) -> list[str]:
    res = bc("ls", "--json", cwd=cwd)
    assert res.returncode == 0, res.stderr
    return [r["id"] for r in json.loads(res.stdout)]


def test_gc_keeps_the_newest_records_and_drops_inputs_only_old_ones_used(
    bc: RunCLI, tmp_path: Path, state_root: Path
) -> None:
    proj = tmp_path / "proj"
    proj.mkdir()
    data = b"an input\n"
    (proj / "data.txt").write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    (proj / "buildcell.yaml").write_text(
        "version: 1\nname: gcdemo\n"
        f"inputs: [{{file: data.txt, sha256: {sha}, path: in.txt}}]\n"
        "steps: [{name: s, run: 'cat in.txt'}]\n"
    )
    assert bc("build", cwd=proj).returncode == 0
    for _ in range(2):
        assert bc("run", "--", "true", cwd=proj).returncode == 0
    ids = _ids(bc, proj)
    assert len(ids) == 3
    entry = state_root / "state" / "cas" / "sha256" / sha[:2] / sha
    assert entry.is_file()
    os.utime(entry, (OLD, OLD))  # older than a fetch that may be writing it
    report = _gc(bc, proj, "--records-keep", "1")
    assert sorted(report["records_removed"]) == sorted(ids[1:])
    assert report["cas_removed"] == 1 and not entry.exists(), report
    assert report["freed"] > 0
    assert _ids(bc, proj) == ids[:1]
    time.sleep(1.1)
    human = bc("gc", "--records-max-age", "1s", cwd=proj)
    assert "removed 1 old build record(s)" in human.stdout
    assert _ids(bc, proj) == []


def test_bad_gc_flags_are_one_line_errors(bc: RunCLI, tmp_path: Path) -> None:
    for flag, value, words in [
        ("--records-keep", "many", "invalid --records-keep 'many'"),
        ("--records-max-age", "soon", "invalid --records-max-age 'soon'"),
        ("--images-max-age", "0", "invalid --images-max-age '0'"),
    ]:
        res = bc("gc", flag, value, cwd=tmp_path)
        assert res.returncode == 125, res.stderr
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert words in lines[0] and "Traceback" not in res.stderr, res.stderr


def test_gc_keeps_settings_from_the_configuration_file(bc: RunCLI, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("records: {keep: 1}\n")
    for _ in range(3):
        assert bc("run", "--", "true", cwd=tmp_path).returncode == 0
    res = bc("gc", "--json", cwd=tmp_path, env={"BUILDCELL_CONFIG": str(config)})
    assert res.returncode == 0, res.stderr
    assert len(json.loads(res.stdout)["records_removed"]) == 2
    config.write_text("records: {keep: lots}\n")
    res = bc("gc", cwd=tmp_path, env={"BUILDCELL_CONFIG": str(config)})
    assert res.returncode == 125 and "records.keep" in res.stderr


@root_only
def test_gc_removes_images_unused_for_longer_than_asked(
    bc: RunCLI, tmp_path: Path, state_root: Path
) -> None:
    images = state_root / "images"
    images.mkdir()
    shared = [TarEntry("data/shared", "file", os.urandom(1 << 20))]
    digests = []
    for n in range(2):
        digest = make_host_tools_layout(images / f"i{n}", [shared, [TarEntry(f"own{n}", "file")]])
        res = bc("run", "--rootfs", f"oci:{images / f'i{n}'}@{digest}", "--", "true", cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        digests.append(digest)
    oci = state_root / "state" / "cache" / "oci"
    os.utime(oci / digests[0][7:] / "used", (OLD, OLD))
    for layer in (oci / "layers").iterdir():
        os.utime(layer, (OLD, OLD), follow_symlinks=False)
    report = _gc(bc, tmp_path, "--images-max-age", "24h")
    assert report["images_removed"] == [digests[0]]
    assert report["layers_removed"] == 1  # the shared ones stay: the other image uses them
    assert not (oci / digests[0][7:]).exists() and (oci / digests[1][7:]).is_dir()
    res = bc("gc", "--images-max-age", "24h", cwd=tmp_path)
    assert "removed 0 unused image(s)" not in res.stdout  # nothing to say
    again = bc("run", "--rootfs", f"oci:{images / 'i0'}@{digests[0]}", "--", "true", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
