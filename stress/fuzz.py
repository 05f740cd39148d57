"""Fuzzing every parser of untrusted input with hypothesis, for the fault/load suite.

``checks(scale)`` runs one property per parser and returns a :class:`Row` for each. A case
*holds* when the parser returns, or raises buildcell's own :class:`~buildcell.errors.Error`
(the clean way to refuse input); anything else is a crash. Some parsers also have an
invariant (nothing written outside an unpack directory, no A record for a name the
allowlist does not allow, allow entries that parse back to themselves); breaking it counts
as a crash too. The first crash is shrunk for a bounded time and reported in ``detail``.

Hypothesis is driven programmatically: each check builds a ``@given`` test function and
calls it. Every check also has a wall-clock budget, so a slow machine cuts the number of
cases (and says so in ``detail``) instead of running the suite past its time.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gzip
import http.server
import json
import logging
import os
import re
import resource
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import strategies as st
from tests.oci_images import (
    DEFAULT_MTIME,
    SparseEntry,
    SparseFormat,
    native_arch,
    sha256_digest,
    tar_bytes,
)

from buildcell.errors import ConfigError, Error, SeccompError

__all__ = ["Row", "checks"]

_REPO = Path(__file__).resolve().parents[1]
_ASSETS = Path("/work/shared/assets")
_SECCOMP_ASSETS = (
    "docker-seccomp-default.json",
    "docker-seccomp-default-old-format.json",
    "docker-seccomp-example.json",
)


@dataclass
class Row:
    area: str  # "fuzz"
    what: str  # e.g. "spec YAML (buildcell.build.spec.parse_spec)"
    tried: int  # how many cases were run
    held: bool  # zero crashes other than our clean errors
    detail: str  # one line: "0 crashes in N cases" or the first crash


def _log(message: str) -> None:
    print(f"fuzz: {message}", file=sys.stderr, flush=True)


def _short(value: object, limit: int = 240) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(text: str) -> str:
    return " ".join(text.split())


class _Violation(AssertionError):
    """An invariant of a parser does not hold (reported like a crash)."""


class _Found(Exception):
    """Raised from one place for every crash, so hypothesis shrinks a single failure."""


class _TooSlow(Exception):
    """One case ran past its time limit (a hang on hostile input is a finding too)."""


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Interrupt the block with :class:`_TooSlow` after ``seconds``.

    Only in the main thread (SIGALRM); elsewhere the block runs unbounded, and only the
    per-check budget, checked between cases, applies.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(_signum: int, _frame: object) -> None:
        raise _TooSlow(f"one case took more than {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --- driving hypothesis -------------------------------------------------------------------


@dataclass
class _Run:
    """What one check saw: cases run, and the smallest crash found (by its repr)."""

    budget: float
    shrink_budget: float
    started: float = field(default_factory=time.monotonic)
    tried: int = 0
    crash: tuple[str, str] | None = None  # (exception text, input repr)
    crash_size: int = 0
    crash_repr: str = ""  # the whole input, kept for stress/findings/
    crash_at: float = 0.0
    out_of_time: bool = False

    def over(self) -> bool:
        now = time.monotonic()
        if self.crash is not None:
            return now - self.crash_at > self.shrink_budget
        if now - self.started > self.budget:
            self.out_of_time = True
            return True
        return False

    def record(self, value: object, error: BaseException) -> None:
        shown = repr(value)
        if self.crash is None or len(shown) <= self.crash_size:  # the shrinker goes simpler
            what = f"{type(error).__name__}: {_one_line(str(error))[:140]}"
            self.crash = (what, _short(value))
            self.crash_size = len(shown)
            self.crash_repr = shown
        if not self.crash_at:
            self.crash_at = time.monotonic()


def _fuzz(
    what: str,
    strategy: st.SearchStrategy[Any],
    target: Callable[[Any], None],
    *,
    cases: int,
    budget: float,
    clean: tuple[type[BaseException], ...] = (Error,),
    case_limit: float = 5.0,
) -> Row:
    """Run ``target`` on ``cases`` values of ``strategy``; ``clean`` exceptions are fine.

    A case that runs longer than ``case_limit`` seconds counts as a crash (``_TooSlow``).
    """
    run = _Run(budget=budget, shrink_budget=max(2.0, budget / 10))
    _log(f"{what}: up to {cases} cases, {budget:.0f} s budget")

    @settings(
        max_examples=cases,
        deadline=None,
        database=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,
        phases=(Phase.generate, Phase.shrink),
        report_multiple_bugs=False,
    )
    @given(strategy)
    def case(value: Any) -> None:
        if run.over():
            return  # out of time: every further case (or shrink attempt) passes at once
        if run.crash is None:
            run.tried += 1
        try:
            with _time_limit(case_limit):
                target(value)
        except clean:
            return
        except Exception as e:
            run.record(value, e)
            raise _Found from e

    try:
        case()
    except _Found:
        pass  # run.crash has the smallest crash seen
    except Exception as e:
        # Flaky (a crash that did not replay) and the like: the recorded crash stands.
        if run.crash is None:
            run.crash = (f"hypothesis: {type(e).__name__}: {_one_line(str(e))[:140]}", "")
    elapsed = time.monotonic() - run.started
    if run.crash is not None:
        exc, shown = run.crash
        detail = f"crash: {exc} on input {shown}" if shown else exc
        _log(f"{what}: {detail} ({elapsed:.1f} s)")
        if run.crash_repr:
            saved = _save_finding(what, f"{exc}\n{run.crash_repr}\n")
            _log(f"{what}: the whole input is in {saved}")
        return Row("fuzz", what, run.tried, False, detail)
    detail = f"0 crashes in {run.tried} cases"
    if run.out_of_time:
        detail += f" (stopped at the {budget:.0f} s budget, {cases} planned)"
    _log(f"{what}: {detail} ({elapsed:.1f} s)")
    return Row("fuzz", what, run.tried, True, detail)


def _save_finding(what: str, text: str) -> Path:
    """Keep a failing input whole (the table shows it shortened) under stress/findings/."""
    slug = re.sub(r"[^a-z0-9]+", "-", what.lower()).strip("-")[:60]
    path = Path(__file__).resolve().parent / "findings" / f"{slug}.txt"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


class _Capture(logging.Handler):
    """Keeps ERROR records of buildcell's loggers; stops them reaching the harness' output."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []
        self._lock2 = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock2:
            self.records.append(record)

    def since(self, start: int, prefix: str) -> list[logging.LogRecord]:
        with self._lock2:
            return [r for r in self.records[start:] if r.name.startswith(prefix)]


@contextlib.contextmanager
def _quiet_buildcell_logs() -> Iterator[_Capture]:
    """Skipped layer entries and unknown syscalls log warnings by design; keep them quiet."""
    logger = logging.getLogger("buildcell")
    capture = _Capture()
    saved = (logger.propagate, logger.level)
    logger.addHandler(capture)
    logger.propagate = False
    logger.setLevel(logging.WARNING)
    try:
        yield capture
    finally:
        logger.removeHandler(capture)
        logger.propagate, level = saved
        logger.setLevel(level)


# --- generic mutation of JSON-like documents ----------------------------------------------

_DEEP = "@@DEEP@@"
# An integer too long for int(): json.dumps cannot write it, so it goes in as text.
_BIGINT = "@@BIGINT@@"
_INTERESTING_STRINGS = (
    "",
    "sha256:" + "0" * 64,
    "sha256:" + "A" * 64,
    "sha512:" + "0" * 128,
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "linux",
    "amd64",
    "arm64",
    "../../etc/passwd",
    "/etc/passwd",
    "blobs/sha256/../../oci-layout",
    "manifest.json",
    "SCMP_ACT_ALLOW",
    "SCMP_ACT_ERRNO",
    "SCMP_ACT_NOTIFY",
    "SCMP_ACT_TRACE",
    "SCMP_ACT_KILL_PROCESS",
    "SCMP_ACT_UNKNOWN",
    "SCMP_CMP_MASKED_EQ",
    "SCMP_CMP_EQ",
    "SCMP_CMP_BOGUS",
    "SCMP_ARCH_X86_64",
    "SCMP_ARCH_X86",
    "SCMP_ARCH_AARCH64",
    "SCMP_ARCH_BOGUS",
    "SCMP_FLAG_LOG",
    "CAP_SYS_ADMIN",
    "no_such_syscall",
    "clone",
    "read",
    "4.8",
    "99.99",
    "0.0",
    "1GiB",
    "-1",
    "5m",
    "0x10",
    "yes",
    "~",
    "a\x00b",
    "\u202e",
    "é" * 70,
    "x" * 300,
)
_INTERESTING_KEYS = (
    "mediaType",
    "digest",
    "size",
    "schemaVersion",
    "manifests",
    "layers",
    "config",
    "platform",
    "annotations",
    "rootfs",
    "diff_ids",
    "Config",
    "Layers",
    "names",
    "name",
    "action",
    "args",
    "includes",
    "excludes",
    "archMap",
    "architectures",
    "errnoRet",
    "defaultErrnoRet",
    "listenerPath",
    "flags",
    "steps",
    "run",
    "limits",
    "network",
    "unknown",
    "",
)
_JSON_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 1, 6, 4095, 65535, 65536, 2**32, 2**63, 2**64, 10**400, _BIGINT]),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(_INTERESTING_STRINGS),
)
_JSON_VALUE = st.recursive(
    _JSON_LEAF,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.one_of(st.sampled_from(_INTERESTING_KEYS), st.text(max_size=6)), inner)
    ),
    max_leaves=8,
)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield from _paths(value, (*prefix, i))


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        doc = doc[part]
    return doc


def _retype(value: Any) -> list[Any]:
    return [str(value)[:50], [value], {"v": value}, None, True, 0, -1, 2**64, 1.5, "", {}, []]


@st.composite
def _mutated_doc(draw: st.DrawFn, base: Any, max_ops: int = 4) -> Any:
    """``base`` after 1..max_ops structural mutations (delete, replace, retype, grow...)."""
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, max_ops))):
        paths = list(_paths(doc))
        path = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(["delete", "replace", "retype", "add", "huge", "deep"]))
        value = _get(doc, path)
        if op == "delete" and path:
            del _get(doc, path[:-1])[path[-1]]
            continue
        if op == "add" and isinstance(value, dict):
            key = draw(st.one_of(st.sampled_from(_INTERESTING_KEYS), st.text(max_size=6)))
            value[key] = draw(_JSON_VALUE)
            continue
        if op == "add" and isinstance(value, list):
            value.insert(draw(st.integers(0, len(value))), draw(_JSON_VALUE))
            continue
        if op == "huge" and isinstance(value, list):
            item = value[0] if value else draw(_JSON_LEAF)
            value[:] = [copy.deepcopy(item) for _ in range(draw(st.sampled_from([64, 1025, 3000])))]
            continue
        if op == "retype":
            new = draw(st.sampled_from(_retype(value)))
        elif op == "deep":
            new = _DEEP
        else:
            new = draw(_JSON_VALUE)
        if path:
            _get(doc, path[:-1])[path[-1]] = new
        else:
            doc = new
    return doc


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


@st.composite
def _mutated_json(draw: st.DrawFn, base: Any) -> bytes:
    """A JSON text (bytes) of a mutated ``base``, sometimes damaged at the byte level."""
    doc = draw(_mutated_doc(base)) if draw(st.integers(0, 9)) else copy.deepcopy(base)
    text = json.dumps(doc, indent=draw(st.sampled_from([None, 1])))
    depth = draw(st.sampled_from([10, 100, 1000, 100_000]))
    text = text.replace(json.dumps(_DEEP), _deep(depth)).replace(json.dumps(_BIGINT), "9" * 5000)
    keys = [m.start() for m in re.finditer(r'"[A-Za-z_]+":', text)]
    if keys and draw(st.integers(0, 5)) == 0:
        # Repeat one key in its own object: {"a": 1} -> {"a": null, "a": 1}.
        at = draw(st.sampled_from(keys))
        key = text[at : text.index(":", at) + 1]
        text = text[:at] + key + "null," + text[at:]
    data = text.encode()
    damage = draw(st.sampled_from(["none"] * 6 + ["truncate", "flip", "insert", "bom", "utf16"]))
    if damage == "truncate" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif damage == "flip" and data:
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
    elif damage == "insert":
        at = draw(st.integers(0, len(data)))
        junk = draw(st.sampled_from([b"\xff", b"\x00", b",", b"]", b"}", b"NaN", b"\xed\xa0\x80"]))
        data = data[:at] + junk + data[at:]
    elif damage == "bom":
        data = b"\xef\xbb\xbf" + data
    elif damage == "utf16":
        data = text.encode("utf-16")
    return data


# --- 1. spec YAML --------------------------------------------------------------------------

_FALLBACK_SPEC = """\
version: 1
name: hello-c
rootfs: host
env: {CFLAGS: "-O2 -Wall -Wextra"}
inputs:
  - file: assets/greeting.txt
    sha256: 29a21b4330687ac21cc39e73311dcbd0b60a3b7f5cffd43a6cc011363259826d
    path: vendor/greeting.txt
limits: {memory: 1GiB, pids: 256, cpus: 2, timeout: 5m}
steps:
  - name: compile
    run: cc $CFLAGS -o build/hello hello.c
    limits: {timeout: 30s}
outputs: ["build/hello", "dist/*.tar"]
archive: hello-c.tar.gz
"""


def _valid_spec() -> str:
    try:
        return (_REPO / "examples" / "hello-c" / "buildcell.yaml").read_text()
    except OSError:
        return _FALLBACK_SPEC


_YAML_SNIPPETS = (
    "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
    "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
    "e: [*d, *d, *d, *d, *d, *d, *d, *d, *d]\n",
    "base: &base {name: x, run: echo}\nsteps:\n  - <<: *base\n  - <<: [*base, *base]\n",
    "steps: &s\n  - name: a\n    run: *s\n",
    "name: a\nname: b\n",
    "version: 1\nversion: 1\n",
    "? [complex, key]\n: value\n",
    "? {a: b}\n: c\n",
    "name: !!python/object/apply:os.system ['true']\n",
    "name: !!binary aGVsbG8=\n",
    "name: !custom x\n",
    "env: !!set {a, b}\n",
    "env: !!omap [a: 1, b: 2]\n",
    "name: !!timestamp 2024-01-01\n",
    "%YAML 1.1\n%TAG ! tag:example.com,2000:\n---\nname: !x y\n",
    "--- 1\n--- 2\n",
    "name: *undefined\n",
    "&a a: *a\n",
    "<<: {name: x}\n",
    "<<: 1\n",
    "env: {<<: [1, 2]}\n",
    "name: '\\ud800'\n",
    'name: "\\ud800"\n',
    "name: \t\n",
    "limits: {timeout: .inf, memory: .nan, cpus: -.inf, pids: 0x7fffffffffffffffffff}\n",
    "limits: {timeout: 1e400, memory: 99999999999999999999PiB, cpus: 1e-400}\n",
    "version: 1.0\n",
    "version: true\n",
    "version: 0o1\n",
    "steps: {}\n",
    "steps: [[[[[[[[[[[[[]]]]]]]]]]]]]\n",
)


@st.composite
def _spec_texts(draw: st.DrawFn, valid: str) -> str:
    # Deep nesting and alias ladders cost up to a second each (PyYAML's recursion limit, the
    # 100 000-node expansion cap), so they are drawn less often than the cheap kinds.
    kinds = ["random"] * 3 + ["chars"] * 3 + ["doc"] * 3 + ["snippet"] * 2 + ["deep", "aliases"]
    kind = draw(st.sampled_from(kinds))
    if kind == "random":
        alphabet = st.one_of(
            st.sampled_from([*"{}[]:-?&*!|>'\"%@`#,\n\t \\", "<<", "---", "..."]),
            st.characters(),
        )
        return "".join(draw(st.lists(alphabet, max_size=80)))
    if kind == "chars":
        text = valid
        for _ in range(draw(st.integers(1, 6))):
            at = draw(st.integers(0, len(text)))
            new = draw(st.sampled_from(["", ":", "-", " ", "\n", "\t", "&x", "*x", "{", "\x00"]))
            cut = draw(st.integers(0, 3))
            text = text[:at] + new + text[at + cut :]
        return text
    if kind == "doc":
        base = yaml.safe_load(valid)
        doc = draw(_mutated_doc(base))
        text = yaml.safe_dump(doc, allow_unicode=draw(st.booleans()))
        text = text.replace(_DEEP, _deep(draw(st.sampled_from([10, 63, 65, 2000]))))
        return text.replace(_BIGINT, "9" * 5000)
    if kind == "snippet":
        snippet = draw(st.sampled_from(_YAML_SNIPPETS))
        where = draw(st.sampled_from(["alone", "before", "after"]))
        if where == "alone":
            return snippet
        return snippet + valid if where == "before" else valid + snippet
    if kind == "deep":
        depth = draw(st.sampled_from([63, 64, 65, 200, 200, 5000]))
        style = draw(st.sampled_from(["flow", "block", "map"]))
        if style == "flow":
            return "steps: " + _deep(depth) + "\n"
        if style == "map":
            return "env: " + "{a: " * depth + "x" + "}" * depth + "\n"
        return "".join("  " * i + "- \n" for i in range(min(depth, 2000)))
    # Aliases: a ladder of `width` copies per level, `levels` deep.
    levels, width = draw(st.integers(1, 8)), draw(st.sampled_from([1, 2, 3, 3, 4, 12]))
    lines = ["x0: &l0 [" + ", ".join(["v"] * width) + "]"]
    for i in range(1, levels + 1):
        lines.append(f"x{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    lines.append(f"extra: *l{levels}")
    return valid + "\n".join(lines) + "\n"


def _check_spec(cases: int, budget: float) -> Row:
    from buildcell.build.spec import parse_spec

    valid = _valid_spec()
    what = f"spec YAML (buildcell.build.spec.parse_spec), {cases} cases"
    try:
        parse_spec(valid, path=Path("buildcell.yaml"))
    except Error as e:
        return Row("fuzz", what, 0, False, f"the valid example spec does not parse: {e}")

    def target(text: str) -> None:
        parse_spec(text, path=Path("buildcell.yaml"))

    return _fuzz(what, _spec_texts(valid), target, cases=cases, budget=budget)


# --- 2. OCI images: manifests and layers ------------------------------------------------------

_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
_OCI_TAR = "application/vnd.oci.image.layer.v1.tar"
_OCI_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
_MTIME = DEFAULT_MTIME


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


_VALID_LAYER = tar_bytes({"etc/os-release": b"ID=fuzz\n", "bin/tool": b"#!/bin/sh\n"})


@dataclass
class _Docs:
    """The documents of a one-layer image, each as a JSON value."""

    layer_blob: bytes
    layer_type: str
    config: Any
    manifest: Any
    index: Any
    platform_index: Any


def _image_docs(layer_tar: bytes, gz: bool) -> _Docs:
    blob = gzip.compress(layer_tar, mtime=0) if gz else layer_tar
    layer_type = _OCI_GZIP if gz else _OCI_TAR
    config = {
        "architecture": native_arch(),
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [sha256_digest(layer_tar)]},
    }
    config_data = _dumps(config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": _OCI_MANIFEST,
        "config": {
            "mediaType": _OCI_CONFIG,
            "digest": sha256_digest(config_data),
            "size": len(config_data),
        },
        "layers": [{"mediaType": layer_type, "digest": sha256_digest(blob), "size": len(blob)}],
    }
    manifest_data = _dumps(manifest)
    descriptor = {"mediaType": _OCI_MANIFEST, "digest": sha256_digest(manifest_data)}
    descriptor["size"] = len(manifest_data)
    platform_index = {
        "schemaVersion": 2,
        "mediaType": _OCI_INDEX,
        "manifests": [
            {**descriptor, "platform": {"os": "linux", "architecture": "s390x"}},
            {**descriptor, "platform": {"os": "linux", "architecture": native_arch()}},
        ],
    }
    index = {"schemaVersion": 2, "manifests": [descriptor]}
    return _Docs(blob, layer_type, config, manifest, index, platform_index)


_BASE_DOCS = _image_docs(_VALID_LAYER, gz=True)
_DOCKER_MANIFEST_BASE = [
    {"Config": "CONFIG.json", "RepoTags": ["fuzz:latest"], "Layers": ["LAYER/layer.tar"]}
]


def _oci_files(
    docs: _Docs,
    *,
    layers: list[bytes] | None = None,
    config: bytes | None = None,
    manifest: bytes | None = None,
    index: bytes | None = None,
    platform_index: bytes | None = None,
    layout: bytes | None = None,
) -> tuple[dict[str, bytes], dict[str, str]]:
    """The files of an OCI layout; each given blob replaces the one derived from ``docs``.

    Digests are chained through whatever was given, so a mutated document still passes
    verification and reaches the parser. Returns the files and the digests one may pin.
    """
    files: dict[str, bytes] = {"oci-layout": layout or b'{"imageLayoutVersion":"1.0.0"}'}

    def add(data: bytes) -> str:
        digest = sha256_digest(data)
        files["blobs/sha256/" + digest.removeprefix("sha256:")] = data
        return digest

    layer_descs = []
    diff_ids = []
    for layer in layers if layers is not None else []:
        blob = gzip.compress(layer, mtime=0) if docs.layer_type == _OCI_GZIP else layer
        layer_descs.append({"mediaType": docs.layer_type, "digest": add(blob), "size": len(blob)})
        diff_ids.append(sha256_digest(layer))
    if layers is None:
        add(docs.layer_blob)
    if config is None:
        doc = copy.deepcopy(docs.config)
        if layers is not None:
            doc["rootfs"]["diff_ids"] = diff_ids
        config = _dumps(doc)
    config_digest = add(config)
    if manifest is None:
        doc = copy.deepcopy(docs.manifest)
        doc["config"]["digest"], doc["config"]["size"] = config_digest, len(config)
        if layers is not None:
            doc["layers"] = layer_descs
        manifest = _dumps(doc)
    manifest_digest = add(manifest)
    pins = {"manifest": manifest_digest, "config": config_digest}
    top = {"mediaType": _OCI_MANIFEST, "digest": manifest_digest, "size": len(manifest)}
    if platform_index is not None:
        pins["index"] = add(platform_index)
        top = {"mediaType": _OCI_INDEX, "digest": pins["index"], "size": len(platform_index)}
    files["index.json"] = (
        index if index is not None else _dumps({"schemaVersion": 2, "manifests": [top]})
    )
    return files, pins


def _docker_files(
    layers: list[bytes], *, config: bytes | None = None, manifest_json: bytes | None = None
) -> tuple[dict[str, bytes], dict[str, str]]:
    """The files of a classic ``docker save`` tarball; the config digest is the pin."""
    files: dict[str, bytes] = {}
    names = []
    for layer in layers:
        name = sha256_digest(layer).removeprefix("sha256:") + "/layer.tar"
        files[name] = layer
        names.append(name)
    if config is None:
        doc = copy.deepcopy(_BASE_DOCS.config)
        doc["rootfs"]["diff_ids"] = [sha256_digest(t) for t in layers]
        config = _dumps(doc)
    config_name = sha256_digest(config).removeprefix("sha256:") + ".json"
    files[config_name] = config
    if manifest_json is None:
        entry = [{"Config": config_name, "RepoTags": ["fuzz:latest"], "Layers": names}]
        manifest_json = _dumps(entry)
    else:
        # The mutated template names placeholders: point them at the real files.
        manifest_json = manifest_json.replace(b"CONFIG.json", config_name.encode())
        manifest_json = manifest_json.replace(b"LAYER/layer.tar", names[0].encode())
    files["manifest.json"] = manifest_json
    return files, {"config": sha256_digest(config)}


def _snapshot(root: Path, skip: Path) -> dict[str, tuple[Any, ...]]:
    """Everything below ``root`` but ``skip``, without following symlinks."""
    found: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) != skip]
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            info = path.lstat()
            detail: Any = None
            if stat.S_ISLNK(info.st_mode):
                detail = os.readlink(path)
            elif stat.S_ISREG(info.st_mode):
                detail = (path.read_bytes(), info.st_nlink, info.st_mtime_ns)
            found[str(path.relative_to(root))] = (info.st_mode, info.st_uid, detail)
    return found


def _remove(path: Path) -> None:
    """Remove a tree whatever modes its directories got from an image."""
    if not os.path.lexists(path):
        return
    if path.is_dir() and not path.is_symlink():
        with contextlib.suppress(OSError):
            path.chmod(0o700)
        for dirpath, dirnames, _ in os.walk(path):
            for name in dirnames:
                sub = os.path.join(dirpath, name)
                if not os.path.islink(sub):
                    with contextlib.suppress(OSError):
                        os.chmod(sub, 0o700)
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink()


class _Sandbox:
    """A temp tree for unpacking: ``base/outside`` is a sentinel no layer may touch.

    ``base/work/image`` (or ``image.tar``) is the image, ``base/work/cache`` the cache;
    ``rootfs`` ends up at ``base/work/cache/oci/HEX/rootfs``, so ``../`` five times from it
    reaches ``base``.
    """

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="buildcell-fuzz-oci-"))
        self.outside = self.base / "outside"
        (self.outside / "sub").mkdir(parents=True)
        (self.outside / "file").write_bytes(b"precious\n")
        os.symlink("file", self.outside / "link")
        self.work = self.base / "work"
        self.work.mkdir()
        self.cache = self.work / "cache"

    def close(self) -> None:
        _remove(self.base)

    def unpack(self, files: dict[str, bytes], fmt: str, digest: str) -> None:
        """Write the image as ``fmt``, unpack ``digest``, and check the containment.

        Every unpack gets a budget of :data:`_UNPACK_BUDGET` (sparse members declare far
        more than that); whatever it accepts must take no more blocks and bytes on disk
        than it was charged, and a refusal must leave nothing.

        Raises:
            ImageError, ConfigError, StateError: the clean refusals of unpack_image.
            _Violation: something outside the cache changed, a failed unpack left a
                tree behind, more was written than charged, or the rootfs holds what it
                must not (devices, setuid, anything writable by group or others).
        """
        from buildcell.supply.images import UnpackBudget, unpack_image

        for leftover in self.work.iterdir():
            _remove(leftover)
        if fmt == "dir":
            source = self.work / "image"
            for name, data in files.items():
                path = source / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
        else:
            source = self.work / "image.tar"
            source.write_bytes(tar_bytes(files))
        before = _snapshot(self.base, self.cache)
        budget = UnpackBudget(_UNPACK_BUDGET)
        try:
            rootfs = unpack_image(source, digest, cache_dir=self.cache, budget=budget)
        except Error:
            self._check_outside(before)
            oci = self.cache / "oci"
            left = (
                [p.name for p in oci.iterdir() if not p.name.endswith(".lock")]
                if (oci.is_dir())
                else []
            )
            if left:
                raise _Violation(f"a failed unpack left {left} in the cache") from None
            raise
        self._check_outside(before)
        self._check_rootfs(rootfs)
        blocks, sizes = _disk_use(rootfs)
        if max(blocks, sizes) > budget.used or budget.used > budget.limit:
            raise _Violation(
                f"the unpacked tree takes {blocks} bytes of blocks and {sizes} of st_size, "
                f"but was charged {budget.used} of {budget.limit}"
            )

    def _check_outside(self, before: dict[str, tuple[Any, ...]]) -> None:
        after = _snapshot(self.base, self.cache)
        if after != before:
            changed = sorted(set(before.items()) ^ set(after.items()))
            raise _Violation(f"unpacking changed {_short([c[0] for c in changed], 120)}")

    @staticmethod
    def _check_rootfs(rootfs: Path) -> None:
        for dirpath, dirnames, filenames in os.walk(rootfs):
            for name in dirnames + filenames:
                mode = Path(dirpath, name).lstat().st_mode
                if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
                    raise _Violation(f"rootfs holds a device or fifo: {name!r}")
                if not stat.S_ISLNK(mode) and mode & (stat.S_ISUID | stat.S_ISGID):
                    raise _Violation(f"rootfs holds a setuid/setgid entry: {name!r}")
                if not stat.S_ISLNK(mode) and mode & (stat.S_ISVTX | 0o022):
                    raise _Violation(f"rootfs holds a sticky or g/o-writable entry: {name!r}")


#: What one fuzzed image may take; sparse members declare up to terabytes.
_UNPACK_BUDGET = 256 << 20


def _disk_use(root: Path) -> tuple[int, int]:
    """(st_blocks in bytes, st_size) of everything below ``root``, each inode once."""
    blocks = sizes = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            info = os.lstat(os.path.join(dirpath, name))
            if (info.st_dev, info.st_ino) not in seen:
                seen.add((info.st_dev, info.st_ino))
                blocks += info.st_blocks * 512
                sizes += info.st_size
    return blocks, sizes


@st.composite
def _manifest_cases(draw: st.DrawFn) -> tuple[str, str, str, bytes]:
    """(format, which document, which digest to pin, the mutated document)."""
    fmt = draw(st.sampled_from(["dir", "archive", "docker"]))
    if fmt == "docker":
        target = draw(st.sampled_from(["manifest.json", "config"]))
        base = _DOCKER_MANIFEST_BASE if target == "manifest.json" else _BASE_DOCS.config
        return fmt, target, "config", draw(_mutated_json(base))
    target = draw(
        st.sampled_from(["oci-layout", "index.json", "manifest", "config", "platform index"])
    )
    bases = {
        "oci-layout": {"imageLayoutVersion": "1.0.0"},
        "index.json": _BASE_DOCS.index,
        "manifest": _BASE_DOCS.manifest,
        "config": _BASE_DOCS.config,
        "platform index": _BASE_DOCS.platform_index,
    }
    pin = (
        "index"
        if target == "platform index"
        else draw(st.sampled_from(["manifest"] * 4 + ["config"]))
    )
    return fmt, target, pin, draw(_mutated_json(bases[target]))


def _check_oci_manifests(cases: int, budget: float) -> Row:
    what = f"OCI index/manifest/config JSON (buildcell.supply.images.unpack_image), {cases} cases"
    box = _Sandbox()
    try:

        def target(case: tuple[str, str, str, bytes]) -> None:
            fmt, which, pin, data = case
            if fmt == "docker":
                if which == "manifest.json":
                    files, pins = _docker_files([_VALID_LAYER], manifest_json=data)
                else:
                    files, pins = _docker_files([_VALID_LAYER], config=data)
                box.unpack(files, "archive", pins["config"])
                return
            keyword = {
                "oci-layout": "layout",
                "index.json": "index",
                "manifest": "manifest",
                "config": "config",
                "platform index": "platform_index",
            }[which]
            files, pins = _oci_files(_BASE_DOCS, **{keyword: data})
            box.unpack(files, fmt, pins.get(pin, pins["manifest"]))

        return _fuzz(what, _manifest_cases(), target, cases=cases, budget=budget)
    finally:
        box.close()


_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
    "contiguous": tarfile.CONTTYPE,
    "sparse": tarfile.GNUTYPE_SPARSE,
    "unknown": b"Z",
}


@dataclass(frozen=True)
class _Member:
    name: str
    kind: str
    linkname: str = ""
    mode: int = 0o644
    data: bytes = b""
    size: int | None = None  # declared size, when it differs from len(data)
    mtime: float = _MTIME
    pax: tuple[tuple[str, str], ...] = ()


def _raw(text: str) -> str:
    """``text`` with lone surrogates as the bytes they would be, for tarfile to write."""
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "surrogateescape")


def _sparse_bytes(entry: SparseEntry) -> bytes:
    try:
        return entry.tobuf()
    except ValueError:  # a number too big for an old GNU header: say it in PAX
        return dataclasses.replace(entry, fmt="pax0.1").tobuf()


def _layer_bytes(members: list[_Member | SparseEntry], fmt: int) -> bytes:
    out = bytearray()
    for m in members:
        if isinstance(m, SparseEntry):
            out += _sparse_bytes(m)
            continue
        info = tarfile.TarInfo(_raw(m.name))
        info.type = _TYPES[m.kind]
        info.mode = m.mode
        info.mtime = m.mtime
        info.linkname = _raw(m.linkname)
        info.size = (len(m.data) if m.size is None else m.size) if m.kind == "file" else 0
        info.uid = info.gid = 4242
        if m.kind in ("char", "block"):
            info.devmajor, info.devminor = 1, 3
        pax = dict(m.pax)
        if "\0" in m.name:
            pax["path"] = info.name
        if "\0" in m.linkname:
            pax["linkpath"] = info.linkname
        info.pax_headers = pax
        try:
            out += info.tobuf(fmt, "utf-8", "surrogateescape")
        except ValueError:
            out += info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        out += m.data
        if m.size is not None and m.size != len(m.data):
            return bytes(out)  # truncated here, as a damaged or hostile layer would be
        out += b"\0" * (-len(m.data) % tarfile.BLOCKSIZE)
    out += b"\0" * (2 * tarfile.BLOCKSIZE)
    return bytes(out)


_SPARSE_FORMATS: tuple[SparseFormat, ...] = ("gnu", "pax0.0", "pax0.1", "pax1.0")


def _sparse_strategy(name: st.SearchStrategy[str]) -> st.SearchStrategy[SparseEntry]:
    """Sparse members in the four GNU formats: honest ones, and the maps and sizes an
    attacker declares (terabytes in a few bytes, overlapping, negative, past the size,
    more data than stored), with long names carried every way."""
    sizes = st.sampled_from([0, 1, 4096, 1 << 20, 600 << 20, 1 << 40, 10**30, -1])
    offsets = st.sampled_from([0, 1, 511, 4096, 1 << 20, 600 << 20, 1 << 40, -4096])
    data = st.sampled_from([b"", b"x", b"data" * 300])
    pieces = st.sampled_from([0, 1, 4, 4096, 1 << 20, 1 << 40, -4])
    hostile_map = st.lists(st.tuples(offsets, pieces), max_size=30)
    records = st.sampled_from(
        [(), (), (("size", "-1"),), (("size", "99999999999"),),
         (("GNU.sparse.name", "../escape"),), (("GNU.sparse.name", "/abs/name"),),
         (("GNU.sparse.realsize", "-5"),), (("GNU.sparse.size", "1e9"),),
         (("path", "n" * 300),), (("GNU.sparse.map", "0,1,x"),)]
    )  # fmt: skip
    long_name = st.sampled_from([None, "gnu", "path", "sparse-name"])
    return st.builds(
        SparseEntry,
        name=st.one_of(name, st.just("d/" + "long" * 40)).map(_raw),
        realsize=sizes,
        chunks=st.lists(st.tuples(offsets, data), max_size=5).map(tuple),
        fmt=st.sampled_from(_SPARSE_FORMATS),
        sparse_map=st.one_of(st.none(), st.none(), hostile_map),
        long_name=long_name,
        mode=st.sampled_from([0o644, 0o4777, 0o666]),
        records=records,
    )


def _member_strategy(outside: Path) -> st.SearchStrategy[_Member | SparseEntry]:
    escape = "../" * 5 + "outside"
    piece = st.sampled_from(
        ["a", "b", "dir", "link", "etc", "bin", "..", ".", "", ".wh.a", ".wh.link",
         ".wh..wh..opq", ".wh..wh.aufs", ".wh.", ".wh..", ".wh...", "x" * 255, "é", "a\x00b"]
    )  # fmt: skip
    hostile = st.sampled_from(
        [str(outside / "pwned"), str(outside / "file"), "/" + escape + "/pwned",
         escape + "/pwned", "../pwned", "link/pwned", "link/sub/pwned", "dir/../../pwned",
         "/", "./", "//", "a/" * 300 + "deep", "n" * 5000, "dir/.wh.link", "link/.wh.file",
         "link/.wh..wh..opq", ".wh.dir", "\ud800", "dir/\udcff"]
    )  # fmt: skip
    name = st.one_of(
        hostile,
        st.builds(
            lambda lead, parts: lead + "/".join(parts),
            st.sampled_from(["", "/", "./", "//"]),
            st.lists(piece, min_size=1, max_size=4),
        ),
        st.text(max_size=20),
    )
    target = st.one_of(
        st.sampled_from(
            ["", "/", "..", escape, escape + "/file", str(outside), str(outside / "file"),
             "../outside/file", "a", "dir", "link", "a/b", "/etc/passwd", "link/file",
             "dir/../a", "\x00", "x" * 5000, "a\x00b"]
        ),
        st.text(max_size=12),
    )  # fmt: skip
    pax = st.lists(
        st.sampled_from(
            [("mtime", "nan"), ("mtime", "1e400"), ("mtime", "-1e30"), ("size", "-1"),
             ("size", "99999999999"), ("size", "x"), ("path", "../escape"),
             ("path", str(outside / "pax")), ("linkpath", escape), ("uid", "x"),
             ("SCHILY.xattr.security.capability", "\x01\x00\x00\x02"),
             ("GNU.sparse.map", "0,1"), ("GNU.sparse.size", "100"),
             ("GNU.sparse.major", "1"), ("GNU.sparse.minor", "0"),
             ("hdrcharset", "BINARY"), ("comment", "x" * 2000)]
        ),
        max_size=2,
    )  # fmt: skip
    plain = st.builds(
        _Member,
        name=name,
        kind=st.sampled_from([*_TYPES, "file", "file", "dir", "symlink", "hardlink"]),
        linkname=target,
        mode=st.sampled_from([0o644, 0o755, 0o4755, 0o2755, 0o1777, 0o000, 0o555, 0o7777]),
        data=st.sampled_from([b"", b"data\n", b"x" * 513]),
        size=st.sampled_from([None, None, None, 0, 1, 10_000, 2**40]),
        mtime=st.sampled_from([_MTIME, 0, -1, 2**33, 1.5]),
        pax=st.lists(pax, max_size=1).map(lambda p: tuple(p[0]) if p else ()),
    )
    # One member in four is sparse: enough to meet the plain ones (links to them,
    # whiteouts of them, the same name again in another layer).
    return st.one_of(plain, plain, plain, _sparse_strategy(name))


@dataclass(frozen=True)
class _LayerCase:
    """An image of hostile layers; its repr lists the members, not the tar bytes."""

    fmt: str
    gz: bool
    members: tuple[tuple[str, ...], ...]  # per layer: "kind name [-> link] [size=N] [pax]"
    layers: list[bytes] = field(repr=False)


def _describe(m: _Member | SparseEntry) -> str:
    if isinstance(m, SparseEntry):
        return (
            f"sparse/{m.fmt} {m.name[:60]!r} realsize={m.realsize} map={m.map[:6]}"
            + (f" long_name={m.long_name}" if m.long_name else "")
            + (f" records={dict(m.records)}" if m.records else "")
        )
    text = f"{m.kind} {m.name[:60]!r}"
    if m.linkname:
        text += f" -> {m.linkname[:40]!r}"
    if m.size is not None:
        text += f" size={m.size}"
    return text + (f" pax={dict(m.pax)}" if m.pax else "")


@st.composite
def _layer_cases(draw: st.DrawFn, outside: Path) -> _LayerCase:
    """An image format, gzip or not, and layer tars with hostile members."""
    member = _member_strategy(outside)
    layers = []
    shown: list[tuple[str, ...]] = []
    for _ in range(draw(st.integers(1, 3))):
        members = draw(st.lists(member, min_size=0, max_size=8))
        fmt = draw(st.sampled_from([tarfile.PAX_FORMAT] * 3 + [tarfile.GNU_FORMAT]))
        data = _layer_bytes(members, fmt)
        damage = draw(st.sampled_from(["none"] * 8 + ["truncate", "flip", "garbage"]))
        shown.append((*map(_describe, members), *([f"<{damage}>"] if damage != "none" else [])))
        if damage == "truncate":
            data = data[: draw(st.integers(0, len(data) - 1))]
        elif damage == "flip":
            at = draw(st.integers(0, len(data) - 1))
            data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
        elif damage == "garbage":
            data = draw(st.binary(max_size=1200))
        layers.append(data)
    fmt = draw(st.sampled_from(["dir", "archive", "docker"]))
    return _LayerCase(fmt, draw(st.booleans()), tuple(shown), layers)


def _check_oci_layers(cases: int, budget: float) -> Row:
    what = f"OCI layer tars (buildcell.supply.images unpack/_Unpacker), {cases} cases"
    box = _Sandbox()
    try:

        def target(case: _LayerCase) -> None:
            fmt, gz, layers = case.fmt, case.gz, case.layers
            if fmt == "docker":
                stored = [gzip.compress(t, mtime=0) if gz else t for t in layers]
                # diff_ids must be of the uncompressed tars, not of what is stored.
                config = copy.deepcopy(_BASE_DOCS.config)
                config["rootfs"]["diff_ids"] = [sha256_digest(t) for t in layers]
                files, pins = _docker_files(stored, config=_dumps(config))
                box.unpack(files, "archive", pins["config"])
                return
            files, pins = _oci_files(_image_docs(_VALID_LAYER, gz), layers=layers)
            box.unpack(files, fmt, pins["manifest"])

        return _fuzz(what, _layer_cases(box.outside), target, cases=cases, budget=budget)
    finally:
        box.close()


# --- 3. proxy requests -----------------------------------------------------------------------


class _OriginHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        body = b"hello from origin " + self.path.encode(errors="replace") + b"\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_HEAD = do_GET
    do_POST = do_GET


class _OriginServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client (the proxy) that hangs up early is no news here."""


@contextlib.contextmanager
def _origin() -> Iterator[int]:
    server = _OriginServer(("127.0.0.1", 0), _OriginHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _serve(*allow: str, **kw: Any) -> contextlib.AbstractContextManager[Any]:
    """The egress service on loopback sockets (the helper the unit tests use)."""
    from tests.netservers import loopback_egress

    return loopback_egress(*allow, **kw)


def _request_strategy(origin_port: int) -> st.SearchStrategy[bytes]:
    methods = st.one_of(
        st.sampled_from([b"GET", b"POST", b"HEAD", b"CONNECT", b"PUT", b"OPTIONS", b"get", b""]),
        st.binary(max_size=8),
    )
    origin = f"api.test:{origin_port}".encode()
    targets = st.one_of(
        st.sampled_from(
            [b"http://api.test/", b"api.test:443", b"http://api.test:99999/", b"*", b"//",
             b"[", b"http://api.test:1/", b"api.test:1", b"http://" + origin + b"/ok",
             b"http://" + origin + b"/../..%00", origin, b"http://127.0.0.1:1/",
             b"http://[::1]:1/", b"http://169.254.169.254/", b"http://user:pw@api.test:1/",
             b"http://api.test:1/" + b"p" * 9000, b"http://xn--nxasmq6b:1/", b"/relative",
             b"http://api.test:1\r\nX: y/", b"http://%61pi.test:1/"]
        ),
        st.binary(max_size=64),
    )  # fmt: skip
    headers = st.lists(
        st.one_of(
            st.sampled_from(
                [b"Host: api.test", b"Host: " + origin, b"Content-Length: 5",
                 b"Content-Length: -1", b"Content-Length: 99999999999999999999",
                 b"Content-Length: 1, 2", b"Transfer-Encoding: chunked",
                 b"Transfer-Encoding: gzip, chunked", b"Connection: close",
                 b"Connection: keep-alive", b"Proxy-Connection: keep-alive",
                 b"Expect: 100-continue", b"Upgrade: websocket", b" folded", b"\tfolded",
                 b"X: " + b"a" * 70_000, b":", b"Bad Header: x", b"Proxy-Authorization: x"]
            ),
            st.tuples(st.binary(max_size=20), st.binary(max_size=40)).map(
                lambda kv: kv[0] + b": " + kv[1]
            ),
        ),
        max_size=6,
    )  # fmt: skip
    bodies = st.one_of(
        st.binary(max_size=100),
        st.sampled_from([b"5\r\nhello\r\n0\r\n\r\n", b"zz\r\n", b"ffffffffffffffff\r\n", b"0\r\n"]),
    )
    versions = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/9", b"HTTP/1.1x", b""])

    @st.composite
    def requests(draw: st.DrawFn) -> bytes:
        if draw(st.integers(0, 4)) == 0:
            return draw(st.binary(max_size=300))
        head = draw(methods) + b" " + draw(targets) + b" " + draw(versions)
        lines = [head, *draw(headers)]
        eol = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n", b"\r"]))
        one = eol.join(lines) + eol + eol + draw(bodies)
        return one * draw(st.sampled_from([1, 1, 1, 2, 3]))  # sometimes pipelined

    return requests()


def _check_proxy(cases: int, budget: float, capture: _Capture) -> Row:
    from tests.netservers import exchange

    what = f"proxy requests (buildcell.egress.service.EgressService), {cases} cases"
    with _origin() as port, _serve("api.test:1", f"api.test:{port}", f"127.0.0.1:{port}") as s:

        def target(data: bytes) -> None:
            start = len(capture.records)
            exchange(s.port, data, timeout=2.0)
            # Wait for the handler to end, so an error it logs is pinned on this input.
            deadline = time.monotonic() + 1.0
            while s.service.connections > 3 and time.monotonic() < deadline:
                time.sleep(0.002)
            errors = capture.since(start, "buildcell.egress")
            if errors:
                record = errors[0]
                exc = record.exc_info[1] if record.exc_info else None
                shown = f"{type(exc).__name__}: {exc}" if exc else record.getMessage()
                raise _Violation(f"handler error logged: {shown}")

        row = _fuzz(
            what, _request_strategy(port), target, cases=cases, budget=budget, case_limit=10.0
        )
        problems = []
        try:
            reply = exchange(
                s.port,
                f"GET http://api.test:{port}/final HTTP/1.1\r\nHost: api.test\r\n"
                "Connection: close\r\n\r\n".encode(),
                timeout=5.0,
            )
        except OSError as e:
            reply = f"{type(e).__name__}: {e}".encode()
        if not (reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"/final\n")):
            problems.append(f"a valid request afterwards got {_short(reply[:100])}")
        service = s.service
    if not service.closed:
        problems.append("the service was not closed after close()")
    if problems:
        row.held = False
        row.detail = "; ".join([*problems, row.detail])
    return row


# --- 4. DNS queries -----------------------------------------------------------------------------

_DNS_EXACT = frozenset({b"example.com", b"files.pythonhosted.org"})
_DNS_WILDCARD = b".pypi.org"  # *.pypi.org: strict subdomains only
_DNS_ALLOW = ("example.com", "*.pypi.org", "files.pythonhosted.org:443")
_LDH = re.compile(rb"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def _dns_allowed(labels: tuple[bytes, ...]) -> bool:
    """The allowlist above, written out by hand: the oracle for A records."""
    parts = [label.lower() for label in labels if label]
    if not parts or any(_LDH.fullmatch(p) is None for p in parts):
        return False
    host = b".".join(parts)
    return host in _DNS_EXACT or (host.endswith(_DNS_WILDCARD) and host != b"pypi.org")


def _qname(labels: list[bytes], tail: bytes) -> bytes:
    out = bytearray()
    for label in labels:
        out += bytes([min(len(label), 255)]) + label[:255]
    return bytes(out) + tail


@st.composite
def _dns_wires(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 5)) == 0:
        return draw(st.binary(max_size=300))
    label = st.one_of(
        st.sampled_from(
            [b"example", b"com", b"pypi", b"org", b"files", b"pythonhosted", b"EXAMPLE",
             b"Example", b"exa.mple", b"example.com", b"*", b"-a", b"a-", b"xn--nxasmq6b",
             b"0", b"10", b"1", b"a" * 63, b"a" * 64, b"\x00", "é".encode(), b"www", b"_srv"]
        ),
        st.binary(min_size=1, max_size=10),
    )  # fmt: skip
    questions = []
    for _ in range(draw(st.sampled_from([1, 1, 1, 0, 2]))):
        labels = draw(st.lists(label, min_size=0, max_size=5))
        tail = draw(st.sampled_from([b"\x00"] * 6 + [b"\xc0\x0c", b"\xc0\xff", b"\x40", b""]))
        qtype = draw(
            st.one_of(st.sampled_from([1, 28, 5, 255, 16, 33, 65, 41]), st.integers(0, 65535))
        )
        qclass = draw(st.one_of(st.sampled_from([1, 1, 1, 3, 255, 254]), st.integers(0, 65535)))
        questions.append(_qname(labels, tail) + struct.pack("!HH", qtype, qclass))
    additional = []
    if draw(st.booleans()):  # an EDNS OPT record
        payload = draw(st.sampled_from([0, 511, 512, 1232, 4096, 65535]))
        version = draw(st.sampled_from([0, 0, 1, 255]))
        options = draw(st.sampled_from([b"", b"\x00\x0a\x00\x08" + b"\x01" * 8, b"\xff\xff\x00"]))
        additional.append(
            b"\x00" + struct.pack("!HHIH", 41, payload, version << 16, len(options)) + options
        )
        if draw(st.integers(0, 4)) == 0:
            additional.append(additional[0])  # two OPT records
    flags = draw(st.sampled_from([0x0100, 0x0000, 0x0110, 0x2100, 0x7900, 0x0120]))
    if draw(st.integers(0, 9)) == 0:
        flags = draw(st.integers(0, 0xFFFF))
    qdcount = len(questions) if draw(st.integers(0, 5)) else draw(st.integers(0, 65535))
    arcount = len(additional) if draw(st.integers(0, 5)) else draw(st.integers(0, 65535))
    header = struct.pack("!HHHHHH", draw(st.integers(0, 0xFFFF)), flags, qdcount, 0, 0, arcount)
    wire = header + b"".join(questions) + b"".join(additional)
    if draw(st.integers(0, 5)) == 0:
        at = draw(st.integers(0, len(wire) - 1))
        wire = wire[:at] + bytes([draw(st.integers(0, 255))]) + wire[at + 1 :]
    if draw(st.integers(0, 7)) == 0:
        wire = wire[: draw(st.integers(0, len(wire)))]
    return wire


def _check_dns(cases: int, budget: float) -> Row:
    import dns.message
    import dns.rdatatype

    from buildcell.allowlist import EgressPolicy
    from buildcell.egress.dns import DnsResponder, SyntheticAddresses

    what = f"DNS queries (buildcell.egress.dns.DnsResponder.answer), {cases} cases"
    policy = EgressPolicy.from_strings(_DNS_ALLOW)
    responder = DnsResponder(policy.allows_name, SyntheticAddresses(), lambda _answer: None)

    def target(case: tuple[bytes, str]) -> None:
        wire, transport = case
        reply = responder.answer(wire, transport)
        if reply is None:
            return
        try:
            response = dns.message.from_wire(reply)
        except Exception as e:
            raise _Violation(f"unparseable reply {_short(reply, 60)}: {e}") from e
        if reply[:2] != wire[:2]:
            raise _Violation("the reply's id differs from the query's")
        if transport == "udp" and len(reply) > 1232:
            raise _Violation(f"a {len(reply)}-byte UDP reply")
        for section in (response.answer, response.authority, response.additional):
            for rrset in section:
                if rrset.rdtype == dns.rdatatype.A and not _dns_allowed(rrset.name.labels):
                    raise _Violation(f"an A record for {rrset.name.to_text()!r}")

    strategy = st.tuples(_dns_wires(), st.sampled_from(["udp", "tcp"]))
    # Here even our own Error is a crash: answer() must never raise.
    return _fuzz(what, strategy, target, cases=cases, budget=budget, clean=())


# --- 5. seccomp profiles --------------------------------------------------------------------------


def _seccomp_bases() -> list[Any]:
    bases: list[Any] = []
    for name in _SECCOMP_ASSETS:
        with contextlib.suppress(OSError, ValueError):
            bases.append(json.loads((_ASSETS / name).read_text()))
    if not bases:  # the shared assets are absent: a small profile in the same format
        bases.append(
            {
                "defaultAction": "SCMP_ACT_ERRNO",
                "archMap": [{"architecture": "SCMP_ARCH_X86_64", "subArchitectures": []}],
                "syscalls": [
                    {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"},
                    {
                        "names": ["clone"],
                        "action": "SCMP_ACT_ALLOW",
                        "args": [{"index": 0, "value": 2114060288, "op": "SCMP_CMP_MASKED_EQ"}],
                        "excludes": {"caps": ["CAP_SYS_ADMIN"]},
                    },
                ],
            }
        )
    return bases


def _check_seccomp(cases: int, budget: float) -> Row:
    from buildcell.cell.seccomp import compile_bpf, load_profile

    what = f"seccomp profile JSON (load_profile + compile_bpf), {cases} cases"
    bases = _seccomp_bases()
    workdir = Path(tempfile.mkdtemp(prefix="buildcell-fuzz-seccomp-"))
    path = workdir / "profile.json"
    try:

        def target(data: bytes) -> None:
            path.write_bytes(data)
            profile = load_profile(path)
            compile_bpf(profile)

        strategy = st.sampled_from(range(len(bases))).flatmap(lambda i: _mutated_json(bases[i]))
        strategy = st.one_of(strategy, strategy, strategy, st.binary(max_size=200))
        return _fuzz(what, strategy, target, cases=cases, budget=budget, clean=(SeccompError,))
    finally:
        _remove(workdir)


# --- 6. egress allow entries ----------------------------------------------------------------------


@st.composite
def _allow_texts(draw: st.DrawFn) -> str:
    if draw(st.integers(0, 3)) == 0:
        return draw(st.text(max_size=40))
    prefix = draw(st.sampled_from(["", "", "*.", "*", "[", "http://", "user@", "*.*.", "."]))
    label = st.one_of(
        st.sampled_from(
            ["pypi", "org", "example", "com", "a", "A", "xn--nxasmq6b", "xn--", "-a", "a-",
             "_a", "0x7f", "127", "1", "ü", "ß", "\u200b", "℡", "ＡＢ", "a" * 63, "a" * 64,
             "é" * 30, "*", ""]
        ),
        st.text(alphabet="abc019-_.*:[]/%@", max_size=6),
    )  # fmt: skip
    host = st.one_of(
        st.lists(label, min_size=1, max_size=5).map(".".join),
        st.lists(label, min_size=1, max_size=3).map("。".join),
        st.sampled_from(
            ["127.0.0.1", "0x7f.1", "2130706433", "::1", "::ffff:127.0.0.1", "fe80::1%eth0",
             "10.0.0.0/8", "1.2.3.4/33", "1.2.3.4/24", "::1]", "::/0", "0.0.0.0/0",
             "[::1]", "[::1/64]", "64:ff9b::1", "1.2.3", "01.02.03.04", "256.1.1.1",
             "a" * 300, ".".join(["a" * 63] * 5)]
        ),
    )  # fmt: skip
    suffix = draw(
        st.sampled_from(
            ["", "", "]", ":80", ":0", ":65535", ":65536", ":", ":-1", ":80/x", "/path",
             ":443:443", ":٣", ":+1", ": 80", ":00080", ".", ".:443", "]:443"]
        )
    )  # fmt: skip
    return prefix + draw(host) + suffix


def _check_allow(cases: int, budget: float) -> Row:
    from buildcell.allowlist import parse_allow

    what = f"egress allow entries (buildcell.allowlist.parse_allow), {cases} cases"

    def target(text: str) -> None:
        entry = parse_allow(text)
        described = entry.describe()
        try:
            again = parse_allow(described)
        except ConfigError as e:
            raise _Violation(f"{described!r} (its describe()) does not parse: {e}") from None
        if again != entry:
            raise _Violation(f"{described!r} parses back to {again!r}, not {entry!r}")

    return _fuzz(what, _allow_texts(), target, cases=cases, budget=budget, clean=(ConfigError,))


# --- 7. atheris (coverage-guided), if installed ------------------------------------------------

_ATHERIS_DRIVER = r"""
import sys
from pathlib import Path
import atheris
with atheris.instrument_imports():
    from buildcell.allowlist import parse_allow
    from buildcell.build.spec import parse_spec
    from buildcell.errors import ConfigError, Error

def one(data):
    fdp = atheris.FuzzedDataProvider(data)
    if fdp.ConsumeBool():
        try:
            parse_allow(fdp.ConsumeUnicodeNoSurrogates(64))
        except ConfigError:
            pass
    else:
        try:
            parse_spec(fdp.ConsumeUnicode(4096), path=Path("buildcell.yaml"))
        except Error:
            pass

atheris.Setup(sys.argv, one)
atheris.Fuzz()
"""


_RELAY = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"

#: What libFuzzer saves an input as, by what went wrong with it.
_LIBFUZZER_ARTIFACTS = ("crash", "oom", "timeout", "slow-unit", "leak")
#: libFuzzer's own exit statuses (FuzzerOptions.h); anything else is the target's crash.
_LIBFUZZER_EXITS = {70: "timeout", 71: "out of memory", 72: "interrupted", 77: "crash"}


def _check_atheris(scale: float, budget: float) -> Row:
    what = "atheris coverage-guided (parse_allow + parse_spec)"
    try:
        import atheris  # noqa: F401 -- only whether it is there
    except ImportError:
        return Row("fuzz", what, 0, True, "atheris: not installable here")
    runs = max(500, int(50_000 * scale))
    seconds = max(3, int(budget))
    workdir = Path(tempfile.mkdtemp(prefix="buildcell-fuzz-atheris-"))
    try:
        driver = workdir / "driver.py"
        driver.write_text(_ATHERIS_DRIVER)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
            "HOME": str(workdir),
        }
        argv = [sys.executable, str(driver), f"-runs={runs}", f"-max_total_time={seconds}"]
        argv += [f"-artifact_prefix={workdir}/", "-rss_limit_mb=2048", "-timeout=10"]
        # Through a small relay process: a child of this (by now large) process inherits
        # its peak RSS as its own (``ru_maxrss`` carries the old memory's high-water mark
        # across exec), which libFuzzer's RSS limit would take for the fuzzer's.
        argv = [sys.executable, "-c", _RELAY, *argv]
        _log(f"{what}: up to {runs} runs, {seconds} s")
        try:
            proc = subprocess.run(
                argv,
                cwd=workdir,
                env=env,
                capture_output=True,
                text=True,
                timeout=seconds + 60,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return Row("fuzz", what, 0, False, f"atheris did not finish in {seconds + 60} s")
        done = re.findall(r"Done (\d+) runs", proc.stderr)
        tried = int(done[-1]) if done else 0
        if proc.returncode == 0:
            detail = f"0 crashes in {tried} runs"
            _log(f"{what}: {detail}")
            return Row("fuzz", what, tried, True, detail)
        artifacts = [p for kind in _LIBFUZZER_ARTIFACTS for p in sorted(workdir.glob(f"{kind}-*"))]
        shown = _short(artifacts[0].read_bytes()) if artifacts else "(none saved)"
        lines = [
            ln
            for ln in proc.stderr.splitlines()
            if "Error" in ln or "Exception" in ln or "ERROR: libFuzzer" in ln
        ]
        tail = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("INFO")]
        meaning = _LIBFUZZER_EXITS.get(proc.returncode, "crash")
        why = lines[-1] if lines else f"exit status {proc.returncode}: {(tail or [''])[-1][:120]}"
        detail = _one_line(f"{meaning}: {why[:160]} on input {shown}")
        _log(f"{what}: {detail}")
        return Row("fuzz", what, tried, False, detail)
    finally:
        _remove(workdir)


# --- the suite ------------------------------------------------------------------------------------


def checks(scale: float) -> list[Row]:
    """Fuzz every parser of untrusted input; ``scale`` 1.0 is the full suite.

    Each parser gets ``2000 * scale`` cases (at least 50) and a wall-clock budget that
    keeps the whole suite under about four minutes at scale 1.0 on two CPUs. Never raises:
    a check that cannot run becomes a row that did not hold.
    """
    cases = max(50, int(2000 * scale))
    # Wall-clock seconds per check at scale 1.0, from measured costs on 2 CPUs: unpacking a
    # hostile image takes ~20 ms, a spec with an alias ladder up to ~0.5 s, a DNS query
    # ~5 ms. They add up to ~3.5 minutes; a slower machine runs fewer cases, and says so.
    factor = max(scale, 0.1)

    def budget(seconds: float) -> float:
        return max(3.0, seconds * factor)

    rows: list[Row] = []
    plan: list[tuple[str, Callable[[_Capture], Row]]] = [
        ("spec YAML", lambda _c: _check_spec(cases, budget(40))),
        ("OCI manifests", lambda _c: _check_oci_manifests(cases, budget(30))),
        ("OCI layers", lambda _c: _check_oci_layers(cases, budget(45))),
        ("proxy requests", lambda c: _check_proxy(cases, budget(25), c)),
        ("DNS queries", lambda _c: _check_dns(cases, budget(15))),
        ("seccomp profiles", lambda _c: _check_seccomp(cases, budget(30))),
        ("allow entries", lambda _c: _check_allow(cases, budget(10))),
        ("atheris", lambda _c: _check_atheris(scale, budget(18))),
    ]
    started = time.monotonic()
    with _quiet_buildcell_logs() as capture:
        for name, check in plan:
            try:
                rows.append(check(capture))
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
                _log(f"{name}: the harness' peak RSS so far is {peak} MiB")
            except Exception as e:
                detail = _one_line(f"the check itself failed: {type(e).__name__}: {e}")[:200]
                _log(f"{name}: {detail}")
                rows.append(Row("fuzz", name, 0, False, detail))
    _log(f"done in {time.monotonic() - started:.0f} s")
    return rows
