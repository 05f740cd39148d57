"""``buildcell init``: a commented starter spec, recognizing the kind of project."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["starter_spec"]

_HEADER = """\
# buildcell.yaml — a declarative build, run by `buildcell build`.
# Each step runs with `/bin/sh -e -c` in its own fresh cell: read-only root, no network
# unless the step says `network: {{allow: [HOST, HOST:PORT, "*.DOMAIN"]}}`; /workspace
# holds a copy of this directory and carries over from step to step.
# Editors can validate this file against `buildcell schema`.
version: 1
name: {name}
rootfs: host          # or {{dir: PATH}} or {{oci: PATH, digest: "sha256:..."}}
# env: {{CFLAGS: "-O2"}}
# inputs:             # fetched on the host and verified before any step runs
#   - url: https://example.org/dep-1.0.tar.gz
#     sha256: <64 hex digits>
#     path: vendor/dep-1.0.tar.gz   # read-only inside /workspace
limits: {{memory: 2GiB, pids: 512, cpus: 2, timeout: 30m}}
"""


def _name(directory: Path) -> str:
    raw = "".join(c if c.isalnum() or c in "._-" else "-" for c in directory.name.lower())
    raw = raw.strip("-._") or "project"
    return raw if raw[0].isalnum() else f"p{raw}"


_MAX_READ = 1 << 20  # of a file looked at to recognize the project


def _read(directory: Path, name: str) -> str | None:
    """The start of a regular file of ``directory`` (never through a symlink out of it)."""
    from buildcell import confined

    try:
        with confined.opened_root(directory, what="the project directory") as root:
            fd, _ = confined.open_file(root, name, what=name)
    except confined.UnsafePathError:
        return None
    try:
        return os.read(fd, _MAX_READ).decode(errors="replace")
    finally:
        os.close(fd)


def _has(directory: Path, name: str) -> bool:
    return _read(directory, name) is not None


def _make_targets(text: str) -> set[str]:
    targets = set()
    for line in text.splitlines():
        head, sep, _ = line.partition(":")
        if sep and head and not line.startswith(("\t", " ", "#", ".")) and "=" not in head:
            targets.update(head.split())
    return targets


def starter_spec(directory: Path) -> tuple[str, str]:
    """Return (the spec text, the kind of project recognized)."""
    text = _HEADER.format(name=_name(directory))
    makefile = _read(directory, "Makefile")
    if makefile is not None:
        targets = _make_targets(makefile)
        steps = "steps:\n  - name: build\n    run: make -j2\n"
        for check in ("check", "test"):
            if check in targets:
                steps += f"  - name: {check}\n    run: make {check}\n"
                break
        return text + steps + '# outputs: ["build/*"]\n', "Makefile"
    if _has(directory, "pyproject.toml"):
        steps = (
            "steps:\n"
            "  - name: wheel\n"
            "    # the rootfs must provide pip and the build backend (no network in a cell)\n"
            "    run: python3 -m pip wheel --no-deps --no-build-isolation -w dist .\n"
            'outputs: ["dist/*.whl"]\n'
        )
        return text + steps, "Python (pyproject.toml)"
    if _has(directory, "package.json"):
        steps = (
            "steps:\n"
            "  - name: build\n"
            "    # dependencies: vendored, pinned as inputs, or fetched in a step with\n"
            "    # network: {allow: [YOUR-REGISTRY-HOST]}\n"
            "    run: npm run build --if-present\n"
            '# outputs: ["dist/**"]\n'
        )
        return text + steps, "npm (package.json)"
    steps = (
        "steps:\n"
        "  - name: build\n"
        "    run: |\n"
        "      echo 'replace me with your build commands'\n"
        '# outputs: ["dist/**"]\n'
    )
    return text + steps, "generic"
