"""Dataclass methods compiled once and kept, as Python keeps a module's bytecode.

The ``dataclass`` decorator writes each class's ``__init__``, ``__repr__``, ``__eq__`` (and
more for frozen ones) as source text and compiles it when the class is created: some
40 classes on the way to a cell, about a millisecond each, most of it in ``compile``,
every time the command starts, and as many again in the libraries a build imports
(pydantic, rich). :func:`install` makes the ``buildcell`` command keep the compiled code
of that text, keyed by the text itself, so a later start executes it without compiling:
buildcell's own modules' beside their bytecode (``__pycache__/<module>.<tag>.dataclasses``),
other modules' in buildcell's own ``__pycache__/dataclasses/`` by module name (never in
another package's directory). Each module's is read when its first class is made.

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
import stat
import sys
from pathlib import Path
from types import CodeType
from typing import Any

__all__ = ["install"]

_EXPECTED = ("name", "args", "body", "globals", "locals", "return_type")
#: Entries of one module beyond this (texts of classes since changed) start it afresh.
_MAX_ENTRIES = 512


class _ModuleCache:
    """The kept methods of one module, read when its first class is made."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.codes = _load(path)
        self.new: dict[str, CodeType] = {}

    def save(self) -> None:
        if not self.new or sys.dont_write_bytecode:  # -B: read, as bytecode is, not written
            return
        # What another process wrote meanwhile, and ours (``codes`` holds ``new`` too).
        merged = {**_load(self.path), **self.codes}
        if len(merged) > _MAX_ENTRIES:
            merged = dict(self.codes)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)  # as bytecode's
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(tmp, flags, 0o644)
            with os.fdopen(fd, "wb") as f:
                marshal.dump(merged, f)
            os.replace(tmp, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        self.new.clear()


#: By module name; None for a module whose classes are not kept (no file, an odd name).
_modules: dict[str, _ModuleCache | None] = {}
#: Where other modules' kept methods go: buildcell's own bytecode directory.
_OTHERS = Path(os.path.dirname(os.path.abspath(__file__))) / "__pycache__" / "dataclasses"


def _plain_module_name(name: str) -> bool:
    return bool(name) and name[0] != "." and all(c.isalnum() or c in "._" for c in name)


def _cache_for(module_globals: dict[str, Any] | None) -> _ModuleCache | None:
    if not module_globals:
        return None
    name = module_globals.get("__name__")
    if not isinstance(name, str):
        return None
    if name in _modules:
        return _modules[name]
    source = module_globals.get("__file__")
    cache = None
    ours = name == "buildcell" or name.startswith("buildcell.")
    tag = sys.implementation.cache_tag or "none"
    # Where Python keeps bytecode elsewhere (a pycache prefix), so would we: not done.
    if sys.pycache_prefix is None and isinstance(source, str):
        if ours:
            where = Path(source).parent / "__pycache__" / f"{Path(source).stem}.{tag}.dataclasses"
            cache = _ModuleCache(where)
        elif _plain_module_name(name):
            cache = _ModuleCache(_OTHERS / f"{name}.{tag}.dataclasses")
    _modules[name] = cache
    return cache


def _load(path: Path) -> dict[str, CodeType]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return {}
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return {}  # a fifo or a device: never waited on
        if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
            return {}  # someone else's code: compile instead
        data = os.read(fd, st.st_size + 1)  # whole: marshal.load(file) reads piecemeal
        loaded = marshal.loads(data)  # noqa: S302 - ours, as trusted as __pycache__
    except Exception:  # damaged data raises SystemError too: compile instead
        return {}
    finally:
        os.close(fd)
    if not isinstance(loaded, dict):
        return {}
    return {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, CodeType)}


def _save() -> None:
    for cache in _modules.values():
        if cache is not None:
            cache.save()


def install() -> None:
    """Use (and fill, at exit) the kept methods of the dataclasses created from now on.
    Idempotent."""
    original = getattr(dataclasses, "_create_fn", None)
    if original is None or getattr(original, "_buildcell_cached", False):
        return
    if sys.implementation.name != "cpython" or sys.version_info[:2] != (3, 11):
        return
    if original.__code__.co_varnames[:6] != _EXPECTED:
        return
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
        cache = _cache_for(globals)
        code = cache.codes.get(txt) if cache is not None else None
        if code is None:
            # As exec(txt) in dataclasses.py would: no __future__ flags of ours.
            code = compile(txt, "<string>", "exec", dont_inherit=True)
            if cache is not None:
                cache.new[txt] = code
                cache.codes[txt] = code
        ns: dict[str, Any] = {}
        exec(code, globals, ns)  # noqa: S102 - the standard library's own generated text
        return ns["__create_fn__"](**locals)

    _create_fn._buildcell_cached = True  # type: ignore[attr-defined]
    setattr(dataclasses, "_create_fn", _create_fn)  # noqa: B010 - private to the stdlib
    atexit.register(_save)
