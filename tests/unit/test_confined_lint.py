"""Only buildcell.confined opens repository paths: a lint over the modules that handle them.

The modules below take paths or trees a repository controls (a checkout, a spec's inputs
and rootfs, an image, a workspace a cell wrote). In them, every file-system call that
resolves a path by name (``open(path)``, ``Path.read_text``, ``os.stat(path)`` without
``dir_fd``, ``os.walk``, ``shutil.*``, ``Path.resolve``, ...) must be either gone (use
``buildcell.confined``, or a ``*at`` call relative to a directory descriptor) or listed
here with the reason its path is not the repository's. A new such call fails this test
until it is one or the other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "buildcell"

#: Per module: function -> why the paths it opens by name are not the repository's.
ALLOWED: dict[str, dict[str, str]] = {
    "build/spec.py": {
        "_read_spec_file": "the spec's directory, the operator's (-f); the file itself is "
        "opened through confined",
    },
    "build/starter.py": {},
    "supply/inputs.py": {
        "ContentStore._lookup": "the content store, under the state directory",
        "_Staging.commit": "a staging file the store made in its own directory",
        "_Staging.close": "a staging file the store made in its own directory",
        "_make_dir": "the store's fan-out directories",
        "_fsync_dir": "the store's fan-out directories",
        "_discard_entry": "a store entry (lstat, never followed)",
        "ContentStore._seen": "a marker of the store's scope index, in the state directory",
        "ContentStore._remember": "a marker of the store's scope index, in the state directory",
    },
    "supply/outputs.py": {
        "_open_workspace": "the workspace directory buildcell made",
        "_open_out_dir": "the operator's --out (opened with no symlink on any component)",
        "OutputDir._lock": "a lock file in the private state directory (O_NOFOLLOW)",
    },
    "supply/source.py": {
        "_identities": "excluded paths the operator's invocation names (out dir, state dir)",
        "describe_source": "the source directory the operator named",
    },
    "supply/gitread.py": {
        "Repository.open": "the repository found by _discover (opened O_PATH|O_DIRECTORY)",
        "_discover": "the source directory and its ancestors, which the operator named",
        "_ObjectStore._load_packs": "os.listdir of a directory descriptor (objects/pack)",
        "Repository._entry_differs": "DirEntry.is_symlink of a scandir over a descriptor",
    },
    "build/repro.py": {
        "_zip_listing": "ZipFile.open of a member of a zip read from a descriptor; no path is resolved",
        "_open_root": "the two output directories being compared (buildcell's own)",
        "_stage": "a private temporary directory, and diffoscope on the host's /usr",
        "_tree_size": "the private temporary directory of diffoscope's cell",
        "_diffoscope_summary": "the private temporary directory of diffoscope's cell",
        "first_difference": "files the caller passes (outputs buildcell copied)",
        "compare_trees": "shutil.which: diffoscope on the host's PATH",
        "_add_member": "a member opened through a descriptor chain checked above",
        "_atomic_target": "the archive target in buildcell's staging directory",
        "clamp_mtimes": "a tree buildcell made",
    },
    "build/runner.py": {
        "_guard_key": "realpath of the signing key and of the places it must not be",
        "_BuildRun._measure_platform": "DirRootfs.open(), which opens a spec's rootfs confined",
        "_source_dir": "the operator's --source (the CLI refuses symlinks below the working "
        "directory in it)",
        "_StepLog.__init__": "the step log in the record directory (state)",
        "run_build": "the spec's directory as the operator named it",
        "_BuildRun._write_manifest": "the record directory (state)",
        "_BuildRun._provenance": "the record directory's logs (state)",
        "_secrets_in_tree": "the top of a cache copy buildcell made (then by descriptor)",
        "check_reproducible": "the state directory's repro scratch",
    },
    "cell/rootfs.py": {
        "_entry_mount": "the host's own /usr, /bin, /lib* and /etc entries",
        "rootfs_mounts": "the host's own /usr",
        "host_rootfs_digest": "the host's package database",
    },
    "trees.py": {
        "_identity": "excluded paths the operator's invocation names",
        "copy_tree": "the source root the operator named, and buildcell's workspace",
        "remove_tree": "the parent of a tree buildcell made (O_PATH); below, by descriptor",
    },
    "supply/images.py": {
        "_fd_label": "readlink of our own /proc/self/fd (a label for messages)",
        "_open_image": "the operator's --rootfs oci:PATH (a spec's image comes as a descriptor)",
        "_Unpacker.__init__": "the staging root the unpacker made in the image cache",
        "_ensure_dir": "the image cache's directories (state)",
        "_check_dir": "the image cache's directories (state)",
        "_read_marker": "the image cache's markers (state)",
        "_intact_cost": "the image cache's marker and tree (state), stat'ed without following",
        "_lock": "the image cache's lock files (state)",
        "_mark_used": "the image cache's `used` marker (state)",
        "_read_bytes_unpacked": "a file of the image cache (state), read without following",
        "_copy_file": "utime of a descriptor: a layer cache file copied into an image tree",
        "_LayerWriter.__init__": "the layer cache's new directory (state)",
        "_LayerWriter.finish": "the layer cache's layer.json (state)",
        "_read_layer": "the layer cache's layer.json (state), opened without following",
        "_open_cached_layer": "the layer cache's directories (state)",
        "_layer_intact": "the layer cache's files (state), stat'ed without following",
        "_replace_damaged": "the layer cache's directories (state)",
        "_publish_layers": "the layer cache's directories (state)",
        "sweep_images": "the image and layer cache's directories (state)",
        "_sweep_image": "an image cache directory (state)",
        "_marker_layers": "the image cache's markers (state)",
        "_age_mtime": "the image cache's `used` markers (state)",
        "_remove_locked": "the image cache's lock files (state)",
        "_discard_leftovers": "the image cache's temporary trees (state)",
        "_unpack": "the image cache's temporary tree (state)",
    },
}

_PATH_METHODS = {
    "open", "read_text", "read_bytes", "write_text", "write_bytes", "resolve", "iterdir",
    "glob", "rglob", "exists", "is_dir", "is_file", "is_symlink", "lstat", "mkdir", "unlink",
    "rmdir", "rename", "replace", "touch", "chmod", "symlink_to", "readlink", "samefile",
}  # fmt: skip
_OS_PATH = {"realpath", "exists", "isdir", "isfile", "islink", "lexists", "getsize"}
_OS = {
    "open", "stat", "lstat", "listdir", "scandir", "walk", "readlink", "mkdir", "makedirs",
    "unlink", "remove", "rmdir", "rename", "replace", "chmod", "chown", "utime", "symlink",
    "link", "access", "truncate", "mkfifo",
}  # fmt: skip
# Receivers whose methods of these names are not path operations: modules, directory
# entries of an fd's scandir, files, and our own objects (an image opens blobs confined).
_NOT_PATHS = {
    "os", "shutil", "subprocess", "socket", "json", "fcntl", "tarfile", "entry", "it", "f",
    "e", "self", "image",
}  # fmt: skip


def _fd_like(node: ast.expr) -> bool:
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return True
    name = node.id if isinstance(node, ast.Name) else getattr(node, "attr", "")
    return name.endswith("fd") or name.endswith("_fd")


def _kind(call: ast.Call) -> str | None:
    func = call.func
    keywords = {k.arg for k in call.keywords}
    if isinstance(func, ast.Name):
        return "open()" if func.id == "open" else None
    if not isinstance(func, ast.Attribute):
        return None
    base = func.value
    if (
        isinstance(base, ast.Attribute)
        and isinstance(base.value, ast.Name)
        and (base.value.id, base.attr) == ("os", "path")
    ):
        return f"os.path.{func.attr}" if func.attr in _OS_PATH else None
    if isinstance(base, ast.Name) and base.id == "os" and func.attr in _OS:
        if keywords & {"dir_fd", "src_dir_fd"} or (call.args and _fd_like(call.args[0])):
            return None
        if func.attr in ("listdir", "scandir") and not call.args:
            return None
        return f"os.{func.attr}"
    if isinstance(base, ast.Name) and base.id == "shutil":
        return f"shutil.{func.attr}"
    if func.attr in _PATH_METHODS:
        receiver = base.id if isinstance(base, ast.Name) else None
        if receiver in _NOT_PATHS or "follow_symlinks" in keywords:
            return None
        return f".{func.attr}()"
    return None


def _calls(path: Path) -> list[tuple[str, int, str]]:
    found: list[tuple[str, int, str]] = []

    def visit(node: ast.AST, where: tuple[str, ...]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                visit(child, (*where, child.name))
                continue
            if isinstance(child, ast.Call):
                kind = _kind(child)
                if kind is not None:
                    found.append((".".join(where) or "<module>", child.lineno, kind))
            visit(child, where)

    visit(ast.parse(path.read_text()), ())
    return found


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_repository_paths_are_opened_only_through_confined(module: str) -> None:
    allowed = ALLOWED[module]
    unexplained = [
        f"{module}:{line}: {where} calls {kind}"
        for where, line, kind in _calls(SRC / module)
        if where not in allowed
    ]
    assert not unexplained, (
        "these calls resolve a path by name in a module that handles repository content; "
        "open it through buildcell.confined (or relative to a directory descriptor), or "
        "list the function in ALLOWED with the reason its path is not the repository's:\n"
        + "\n".join(unexplained)
    )


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_the_allowlist_has_no_stale_entries(module: str) -> None:
    used = {where for where, _, _ in _calls(SRC / module)}
    stale = sorted(set(ALLOWED[module]) - used)
    assert not stale, f"{module}: no longer opens paths by name, remove from ALLOWED: {stale}"


def test_the_lint_catches_a_path_open(tmp_path: Path) -> None:
    sample = tmp_path / "m.py"
    sample.write_text(
        "import os\nfrom pathlib import Path\n"
        "def f(p):\n    return open(p).read() + Path(p).read_text()\n"
        "def g(d_fd):\n    return os.open('x', 0, dir_fd=d_fd), os.stat(d_fd), os.stat('/x')\n"
    )
    assert [(w, k) for w, _, k in _calls(sample)] == [
        ("f", "open()"),
        ("f", ".read_text()"),
        ("g", "os.stat"),
    ]
