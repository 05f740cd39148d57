"""Dataclass methods compiled once and kept, as Python keeps a module's bytecode.

The ``dataclass`` decorator writes each class's ``__init__``, ``__repr__``, ``__eq__`` (and
more for frozen ones) as source text and compiles it when the class is created: some
40 classes on the way to a cell, about a millisecond each, most of it in ``compile``,
every time the command starts. :func:`install` makes the ``buildcell`` command keep the
compiled code of that text next to the package's bytecode (``__pycache__``), keyed by the
text itself, so a later start executes it without compiling.

The generated functions are the standard library's own, from the same text; nothing
changes but where their code object comes from. The cache is read only when it belongs
to us (or root) and nobody else may write it, as ``__pycache__`` itself; written only
where we may, atomically; its absence or damage means compiling, as before. It is
installed only on the interpreter it was written against (CPython 3.11's
``dataclasses._create_fn``); elsewhere it does nothing.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import marshal
import os
import sys
from pathlib import Path
from types import CodeType
from typing import Any

__all__ = ["install"]

_EXPECTED = ("name", "args", "body", "globals", "locals", "return_type")
#: Entries beyond this (texts of classes since changed) start the cache afresh.
_MAX_ENTRIES = 4096

_codes: dict[str, CodeType] = {}
_new: dict[str, CodeType] = {}


def _path() -> Path:
    tag = sys.implementation.cache_tag or "none"
    return Path(__file__).parent / "__pycache__" / f"_dataclass_methods.{tag}.marshal"


def _load(path: Path) -> dict[str, CodeType]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return {}
    try:
        st = os.fstat(fd)
        if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
            return {}  # someone else's code: compile instead
        with os.fdopen(fd, "rb", closefd=False) as f:
            loaded = marshal.load(f)  # noqa: S302 - ours, as trusted as __pycache__
    except (OSError, EOFError, ValueError, TypeError):
        return {}
    finally:
        os.close(fd)
    if not isinstance(loaded, dict):
        return {}
    return {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, CodeType)}


def _save(path: Path) -> None:
    if not _new:
        return
    merged = {**_load(path), **_codes, **_new}
    if len(merged) > _MAX_ENTRIES:
        merged = {**_codes, **_new}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o644)
        with os.fdopen(fd, "wb") as f:
            marshal.dump(merged, f)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    _new.clear()


def install(path: Path | None = None) -> None:
    """Use (and fill, at exit) the cache for the dataclasses created from now on: the
    package's ``__pycache__`` unless ``path`` names another file. Idempotent."""
    original = getattr(dataclasses, "_create_fn", None)
    if original is None or getattr(original, "_buildcell_cached", False):
        return
    if sys.implementation.name != "cpython" or sys.version_info[:2] != (3, 11):
        return
    if original.__code__.co_varnames[:6] != _EXPECTED:
        return
    where = _path() if path is None else path
    _codes.update(_load(where))
    missing: Any = dataclasses.MISSING

    def _create_fn(
        name: str,
        args: list[str],
        body: list[str],
        *,
        globals: dict[str, Any] | None = None,
        locals: dict[str, Any] | None = None,
        return_type: Any = missing,
    ) -> Any:
        # CPython 3.11's dataclasses._create_fn, with the compiled text kept.
        if locals is None:
            locals = {}
        return_annotation = ""
        if return_type is not missing:
            locals["_return_type"] = return_type
            return_annotation = "->_return_type"
        joined = ",".join(args)
        lines = "\n".join(f"  {b}" for b in body)
        txt = f" def {name}({joined}){return_annotation}:\n{lines}"
        local_vars = ", ".join(locals.keys())
        txt = f"def __create_fn__({local_vars}):\n{txt}\n return {name}"
        code = _codes.get(txt)
        if code is None:
            # As exec(txt) in dataclasses.py would: no __future__ flags of ours.
            code = compile(txt, "<string>", "exec", dont_inherit=True)
            _new[txt] = code
            _codes[txt] = code
        ns: dict[str, Any] = {}
        exec(code, globals, ns)  # noqa: S102 - the standard library's own generated text
        return ns["__create_fn__"](**locals)

    _create_fn._buildcell_cached = True  # type: ignore[attr-defined]
    setattr(dataclasses, "_create_fn", _create_fn)  # noqa: B010 - private to the stdlib
    atexit.register(_save, where)
