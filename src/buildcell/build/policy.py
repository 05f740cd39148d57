"""Operator policy: rules in the Common Expression Language (CEL), checked before a build runs.

The operator, not the build author, decides what builds may do. A policy is a YAML file of
named rules; each rule is a CEL expression (the language of Kubernetes admission policies)
that must evaluate to ``true`` for the build to run::

    version: 1
    rules:
      - name: inputs-pinned
        expr: spec.inputs.all(i, i.sha256 != "")
        message: every input must be pinned by sha256   # optional

Every rule is evaluated, so a denial lists every rule that failed. A rule passes only when
it evaluates to the boolean ``true``. Anything else fails it, closed: ``false``, a result
that is not a boolean, or an evaluation error such as a missing field, a division by zero
or comparing a number with a string. A policy without rules, an unknown key, or an
expression that does not parse is refused when the policy is loaded.

Rule names are lowercase letters, digits, ``.``, ``_`` and ``-``, starting with a letter or
digit, and unique within the policy. ``message`` defaults to ``rule NAME failed``.

The evaluation context
----------------------

Rules see two variables, ``spec`` (the build, as validated from ``buildcell.yaml``) and
``invocation`` (how this build was started). Every value is plain data: strings, integers,
doubles, booleans, lists, maps and ``null``.

``spec``:

- ``spec.name`` (string): the build's name.
- ``spec.rootfs`` (map): ``kind`` is ``"host"``, ``"dir"`` or ``"oci"``; ``path`` is the
  directory or OCI layout as written in the spec (``null`` for ``host``); ``digest`` is the
  OCI manifest digest, ``"sha256:<hex>"`` (``null`` unless ``kind`` is ``"oci"``).
- ``spec.inputs`` (list of maps): ``url`` (string, or ``null`` for a local file), ``file``
  (string, or ``null`` for a URL), ``sha256`` (64 lowercase hex digits), ``path`` (where it
  appears, relative to ``/workspace``).
- ``spec.limits`` (map): the build-wide limits as written, each ``null`` when not set:
  ``memory`` (int, bytes), ``pids`` (int), ``cpus`` (double), ``disk`` (int, bytes),
  ``timeout`` (double, seconds).
- ``spec.outputs`` (list of strings): the output glob patterns.
- ``spec.steps`` (list of maps), in order, each with:

  - ``name`` (string) and ``run`` (string, the shell commands);
  - ``env`` (map of strings): the variables the step's cell gets from the spec, the
    build's ``env`` overridden by the step's own;
  - ``secrets`` (list of strings): the names of the secrets the step declares;
  - ``network.allow`` (list of strings): the step's egress allowlist in canonical form
    (``host``, ``host:port``, ``*.domain``, ``*.domain:port``, ``10.0.0.0/8:443``,
    ``[::1]:8080``; hosts lowercase), empty when the step has no network;
  - ``limits`` (map, as ``spec.limits``): the limits the step actually runs with, the
    build's overridden by the step's own;
  - ``caches`` (list of maps): ``path`` (where the cache appears in the cell) and ``key``.

- ``spec.egress`` (list of strings): every allowlist entry of every step, each once.
- ``spec.secrets`` (list of strings): every secret name any step declares, each once.

``invocation``:

- ``invocation.project`` (string): the project the build belongs to.
- ``invocation.ref`` (string): the source ref being built, such as ``"refs/heads/main"``;
  ``""`` when none was given.
- ``invocation.trust`` (string): ``"trusted"`` or ``"untrusted"``.
- ``invocation.secrets`` (list of strings): the names of the secrets bound with ``--secret``.
- ``invocation.unsafe`` (list of strings): the ``--unsafe-*`` escape hatches in use, without
  the prefix, such as ``"no-seccomp"``.
- ``invocation.pinned_hosts`` (list of strings): ``--add-host`` pins, as ``NAME=ADDRESS``.
- ``invocation.allow`` (list of strings): destinations the invoker granted with ``--allow``
  (non-public ones a spec may then name), canonical form.
- ``invocation.allow_fetch`` (list of strings): non-public destinations granted for the
  host's input fetches with ``--allow-fetch``.
- ``invocation.image_budget`` (int or ``null``): bytes all images of the build may unpack
  to, from the configuration file's ``images.max_size``.
- ``invocation.cache_scope`` (string): whose caches the build reads and writes:
  ``"trusted"``, ``"ref:REF"`` for an untrusted build of a ref, or ``"build"`` for an
  untrusted build without a ref (its caches last for that build only).

Writing rules
-------------

- An unset limit is ``null``. Anything can be compared with ``null`` by ``==`` and ``!=``,
  but ordering ``null`` against a number is an error (which fails the rule): test it
  first, ``s.limits.memory != null && s.limits.memory <= 4294967296``.
- ``cpus`` and ``timeout`` are doubles. ``<`` and ``<=`` accept an integer on the other side,
  but ``==`` does not: write ``s.limits.cpus == 2.0``.
- Allowlist entries may carry a port. To restrict hosts whatever the port, match the whole
  entry: ``spec.egress.all(e, e.matches("^([a-z0-9-]+[.])*corp[.]example(:[0-9]+)?$"))``.
- ``&&`` and ``||`` absorb an error when the other side decides the result, so
  ``!("release-key" in spec.secrets) || invocation.trust == "trusted"`` never looks at
  ``trust`` for builds without that secret.

Examples::

    version: 1
    rules:
      - name: pinned-rootfs
        expr: spec.rootfs.kind != "oci" || spec.rootfs.digest != null
      - name: corporate-egress-only
        expr: >-
          spec.egress.all(e, e.endsWith(".corp.example")
                             || e.startsWith("mirror.corp.example"))
        message: builds may only reach hosts of corp.example
      - name: memory-capped
        expr: spec.steps.all(s, s.limits.memory != null && s.limits.memory <= 4294967296)
        message: every step needs a memory limit of at most 4 GiB
      - name: release-key-on-main-only
        expr: >-
          !("release-key" in spec.secrets)
          || (invocation.trust == "trusted" && invocation.ref == "refs/heads/main")
      - name: no-unsafe
        expr: size(invocation.unsafe) == 0
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import logging
import posixpath
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from buildcell._text import show
from buildcell.errors import PolicyError

if TYPE_CHECKING:
    from buildcell.build.spec import BuildSpec, LimitsSpec, StepSpec

__all__ = [
    "Decision",
    "Invocation",
    "Policy",
    "Rule",
    "RuleResult",
    "build_context",
    "check",
    "evaluate",
    "load_policy",
    "require_allowed",
]

_log = logging.getLogger(__name__)

#: The policy format version this buildcell reads.
POLICY_VERSION = 1
#: Larger policy files are refused before they are parsed.
MAX_POLICY_BYTES = 1 << 20

_RULE_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]*")
_TOP_KEYS = ("version", "rules")
_RULE_KEYS = ("name", "expr", "message")
_CEL_HINT = (
    "CEL syntax: https://github.com/google/cel-spec/blob/master/doc/langdef.md; "
    "quote the expression or write it as a block (expr: |) if YAML reads it differently"
)
_SHOW_MAX = 60
_DETAIL_MAX = 300

_STR_TAG = "tag:yaml.org,2002:str"
_INT_TAG = "tag:yaml.org,2002:int"
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"
# Plain scalars whose text is taken as written where a string is expected.
_TEXT_TAGS = frozenset(
    {
        _STR_TAG,
        _INT_TAG,
        "tag:yaml.org,2002:bool",
        "tag:yaml.org,2002:float",
        "tag:yaml.org,2002:timestamp",
    }
)
_SCALAR_KINDS = {
    "tag:yaml.org,2002:null": "null",
    "tag:yaml.org,2002:bool": "a boolean",
    _INT_TAG: "an integer",
    "tag:yaml.org,2002:float": "a number",
    "tag:yaml.org,2002:timestamp": "a date",
    _STR_TAG: "a string",
}


# --- the policy -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One rule of a policy.

    Attributes:
        name: unique within the policy; what a denial names.
        expr: the CEL expression; the rule passes when it evaluates to ``true``.
        message: what a denial says when the rule fails.
        line: the 1-based line of the rule in the policy file.
    """

    name: str
    expr: str
    message: str
    line: int


@dataclass(frozen=True)
class Policy:
    """A loaded operator policy.

    Attributes:
        path: the file it was read from, as given.
        rules: the rules, in file order.
        digest: ``sha256:`` and the hex SHA-256 of the file's exact bytes.

    :func:`load_policy` makes policies with their rules compiled; a policy made directly
    has its rules compiled each time it is evaluated.
    """

    path: Path
    rules: tuple[Rule, ...]
    digest: str
    # The compiled CEL programs, one per rule, made by load_policy. A Policy made by hand
    # has none, and evaluate() compiles its rules itself.
    _programs: tuple[Any, ...] = field(default=(), compare=False, repr=False)


def load_policy(path: Path) -> Policy:
    """Read, validate and compile the policy at ``path``.

    Raises:
        PolicyError: the file cannot be read, is not UTF-8 YAML, or is not a valid policy
            (not a mapping, an unknown key, a version other than 1, no rules, a missing,
            invalid or duplicate rule name, an empty expression, an expression that does
            not parse). The message is one line naming the file and the line.
    """
    try:
        with path.open("rb") as f:
            data = f.read(MAX_POLICY_BYTES + 1)
    except OSError as e:
        raise PolicyError(_one_line(f"cannot read policy {path}: {e.strerror or e}")) from e
    if len(data) > MAX_POLICY_BYTES:
        raise PolicyError(_one_line(f"{path}: the policy is larger than 1 MiB"))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise PolicyError(
            _one_line(f"{path}:{line}: not UTF-8 text: byte {data[e.start]:#04x}")
        ) from e
    reader = _Reader(str(path))
    parsed = reader.read(_compose(text, str(path)))
    environment = _environment()
    programs = []
    for rule, expr_node in parsed:
        program = _compile(environment, rule.expr)
        if isinstance(program, _ParseFailure):
            line = expr_node.start_mark.line + 1
            literal = isinstance(expr_node, yaml.ScalarNode) and expr_node.style == "|"
            if literal and program.line is not None:
                # A literal block keeps the expression's lines: point at the bad one.
                line += program.line
            raise PolicyError(
                _one_line(
                    f"{path}:{line}: rule {rule.name!r}: expression does not parse: "
                    f"{program.problem}"
                ),
                hint=_CEL_HINT,
            )
        programs.append(program)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    rules = tuple(rule for rule, _ in parsed)
    _log.debug("loaded policy %s (%s): %d rules", path, digest, len(rules))
    return Policy(path=path, rules=rules, digest=digest, _programs=tuple(programs))


# --- the context ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Invocation:
    """How a build was started: what the policy sees as ``invocation``.

    Attributes:
        project: the project the build belongs to.
        ref: the source ref being built (``refs/heads/main``), if known.
        trust: whether the build runs trusted code (``trusted``) or not.
        secrets: the names of the secrets bound for this build.
        unsafe: the ``--unsafe-*`` flags in use, without the prefix (``no-seccomp``),
            and ``seccomp-profile`` when a custom seccomp profile replaces the built-in one.
        pinned_hosts: names pinned to addresses with ``--add-host``, as ``NAME=ADDRESS``.
        allow: destinations granted with ``--allow`` (canonical entries).
        allow_fetch: destinations granted for host-side fetches with ``--allow-fetch``.
        image_budget: bytes all images of the build may unpack to (the operator's
            ``images.max_size``), if set.
    """

    project: str
    ref: str | None = None
    trust: Literal["trusted", "untrusted"] = "untrusted"
    secrets: tuple[str, ...] = ()
    unsafe: tuple[str, ...] = ()
    pinned_hosts: tuple[str, ...] = ()
    allow: tuple[str, ...] = ()
    allow_fetch: tuple[str, ...] = ()
    image_budget: int | None = None

    def to_parameters(self) -> dict[str, Any]:
        """What the invoker chose, as provenance's ``externalParameters.invocation``."""
        return {
            "project": self.project,
            "trust": self.trust,
            "ref": self.ref,
            "secrets": list(self.secrets),
            "pinnedHosts": list(self.pinned_hosts),
            "allow": list(self.allow),
            "allowFetch": list(self.allow_fetch),
            "unsafe": list(self.unsafe),
        }

    def __post_init__(self) -> None:
        if self.trust not in ("trusted", "untrusted"):
            raise ValueError(f"trust must be 'trusted' or 'untrusted', not {self.trust!r}")

    def cache_scope(self) -> str:
        """``trusted``, ``ref:REF`` or ``build``: whose caches this build uses."""
        if self.trust == "trusted":
            return "trusted"
        return f"ref:{self.ref}" if self.ref is not None else "build"


def build_context(spec: BuildSpec, invocation: Invocation) -> dict[str, Any]:
    """The variables a policy's rules see, as plain JSON-like data.

    The shape is documented in this module's docstring.
    """
    steps = [_step_context(spec, step) for step in spec.steps]
    return {
        "spec": {
            "name": spec.name,
            "rootfs": _rootfs_context(spec),
            "inputs": [
                {"url": item.url, "file": item.file, "sha256": item.sha256, "path": item.path}
                for item in spec.inputs
            ],
            "limits": _limits_context(spec.limits),
            "outputs": list(spec.outputs),
            "steps": steps,
            "egress": _unique(entry for step in steps for entry in step["network"]["allow"]),
            "secrets": _unique(name for step in steps for name in step["secrets"]),
        },
        "invocation": {
            "project": invocation.project,
            "ref": invocation.ref or "",
            "trust": invocation.trust,
            "secrets": list(invocation.secrets),
            "unsafe": list(invocation.unsafe),
            "pinned_hosts": list(invocation.pinned_hosts),
            "allow": list(invocation.allow),
            "allow_fetch": list(invocation.allow_fetch),
            "image_budget": invocation.image_budget,
            # Whose caches the build reads and writes: trusted, ref:REF, or build (one build).
            "cache_scope": invocation.cache_scope(),
        },
    }


def _rootfs_context(spec: BuildSpec) -> dict[str, str | None]:
    from buildcell.build.spec import DirRootfsSpec, HostRootfsSpec, OciRootfsSpec

    rootfs = spec.rootfs
    # Paths are normalized (``..`` collapsed) so that a prefix rule means what it says.
    if isinstance(rootfs, OciRootfsSpec):
        return {"kind": "oci", "path": posixpath.normpath(rootfs.oci), "digest": rootfs.digest}
    if isinstance(rootfs, DirRootfsSpec):
        return {"kind": "dir", "path": posixpath.normpath(rootfs.dir), "digest": None}
    assert isinstance(rootfs, HostRootfsSpec)
    return {"kind": "host", "path": None, "digest": None}


def _limits_context(limits: LimitsSpec) -> dict[str, int | float | None]:
    values = limits.to_limits()
    # cpus and timeout are always doubles, so a rule compares them one way only.
    return {
        "memory": values.memory,
        "pids": values.pids,
        "cpus": None if values.cpus is None else float(values.cpus),
        "disk": values.disk,
        "timeout": None if values.timeout is None else float(values.timeout),
    }


def _step_context(spec: BuildSpec, step: StepSpec) -> dict[str, Any]:
    return {
        "name": step.name,
        "run": step.run,
        "env": {**spec.env, **step.env},
        "secrets": [use.name for use in step.secrets],
        "network": {"allow": list(step.network.allow) if step.network else []},
        # The disk budget is the build's: a step's own disk value is not enforced, so
        # the policy must not be shown it as if it were.
        "limits": {**_limits_context(spec.step_limits(step)), "disk": spec.limits.to_limits().disk},
        "caches": [{"path": cache.path, "key": cache.key} for cache in step.caches],
    }


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


# --- the decision ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RuleResult:
    """How one rule fared.

    Attributes:
        name: the rule's name.
        passed: whether it evaluated to ``true``.
        message: the rule's message when it failed, ``None`` when it passed.
        error: when the rule could not be evaluated, or gave something other than a
            boolean: what happened, naming the policy file, the rule's line and the rule.
    """

    name: str
    passed: bool
    message: str | None
    error: str | None


@dataclass(frozen=True)
class Decision:
    """The verdict of a policy on one build.

    Attributes:
        allowed: every rule passed (and there was at least one).
        policy_digest: the digest of the policy that decided.
        results: one result per rule, in the policy's order.
    """

    allowed: bool
    policy_digest: str
    results: tuple[RuleResult, ...]

    @property
    def failures(self) -> tuple[RuleResult, ...]:
        """The results of the rules that failed, in the policy's order."""
        return tuple(result for result in self.results if not result.passed)

    def event_fields(self) -> dict[str, Any]:
        """The fields of the ``policy.decision`` event (besides the policy's path)."""
        return {
            "digest": self.policy_digest,
            "allowed": self.allowed,
            "failed": [
                {"rule": r.name, "message": r.message, "error": r.error} for r in self.failures
            ],
        }

    def to_dict(self) -> dict[str, Any]:
        """The decision as JSON-ready data, for ``--json`` output and build records."""
        return {
            "allowed": self.allowed,
            "policy_digest": self.policy_digest,
            "results": [
                {
                    "name": result.name,
                    "passed": result.passed,
                    "message": result.message,
                    "error": result.error,
                }
                for result in self.results
            ],
        }

    def summary(self) -> str:
        """One line: the verdict and, on denial, every failed rule with its reason."""
        if self.allowed:
            count = len(self.results)
            return f"policy allows this build ({count} rule{'' if count == 1 else 's'} passed)"
        if not self.results:
            return "policy denies this build: the policy has no rules"
        reasons = "; ".join(
            f"{result.name} ({result.error or result.message})" for result in self.failures
        )
        return _one_line(f"policy denies this build: {reasons}")


def evaluate(policy: Policy, context: Mapping[str, Any]) -> Decision:
    """Evaluate every rule of ``policy`` against ``context``.

    ``context`` maps variable names to plain JSON-like data (dicts, lists, strings, ints,
    floats, booleans, ``None``), as :func:`build_context` makes. A rule that evaluates to
    anything but ``true``, or cannot be evaluated, fails; no CEL error escapes.

    Raises:
        TypeError: ``context`` holds something other than JSON-like data (a bug in the
            caller, not in the policy).
    """
    celpy = _celpy()
    activation: dict[str, Any] = {}
    for name, value in context.items():
        _check_plain(value, name)
        activation[name] = celpy.json_to_cel(value)
    programs: tuple[Any, ...] = policy._programs
    if len(programs) != len(policy.rules):
        environment = _environment()
        programs = tuple(_compile(environment, rule.expr) for rule in policy.rules)
    results = tuple(
        _run(policy, rule, program, activation)
        for rule, program in zip(policy.rules, programs, strict=True)
    )
    allowed = bool(results) and all(result.passed for result in results)
    decision = Decision(allowed=allowed, policy_digest=policy.digest, results=results)
    _log.debug("policy %s: %s", policy.path, decision.summary())
    return decision


def check(policy: Policy, spec: BuildSpec, invocation: Invocation) -> Decision:
    """Evaluate ``policy`` against a build: :func:`evaluate` on :func:`build_context`."""
    return evaluate(policy, build_context(spec, invocation))


def require_allowed(decision: Decision) -> None:
    """Return if ``decision`` allows the build.

    Raises:
        PolicyError: the policy denies it; the message lists every failed rule.
    """
    if decision.allowed:
        return
    raise PolicyError(
        decision.summary(),
        hint="the operator's policy decides what builds may do: change the build to satisfy "
        "these rules, or ask the operator ('buildcell policy check' shows every rule)",
    )


def _run(policy: Policy, rule: Rule, program: Any, activation: dict[str, Any]) -> RuleResult:
    """One rule's result; every way it can go wrong fails it."""
    celpy = _celpy()
    where = f"{policy.path}:{rule.line}: rule {rule.name!r}"
    if isinstance(program, _ParseFailure):  # a Policy made by hand, not by load_policy
        return _failed(rule, f"{where}: expression does not parse: {program.problem}")
    try:
        value = program.evaluate(activation)
    except celpy.CELEvalError as e:
        return _failed(rule, f"{where} raised: {_eval_problem(e, rule.expr)}")
    except Exception as e:
        # A fault inside celpy (a bug, a recursion limit) must deny the build, not crash
        # the gate with a traceback.
        return _failed(rule, f"{where} raised: {type(e).__name__}: {_clip(str(e))}")
    # celpy returns an error as a value when it is not raised through an operator.
    if isinstance(value, celpy.CELEvalError):
        return _failed(rule, f"{where} raised: {_eval_problem(value, rule.expr)}")
    if isinstance(value, bool | celpy.celtypes.BoolType):
        if value:
            return RuleResult(name=rule.name, passed=True, message=None, error=None)
        return RuleResult(name=rule.name, passed=False, message=rule.message, error=None)
    if value is None:
        return _failed(rule, f"{where} returned null, not a boolean")
    shown = _clip(_readable(repr(_plain_value(value))), _SHOW_MAX)
    return _failed(
        rule, f"{where} returned {_cel_type(type(value).__name__)} {shown}, not a boolean"
    )


def _failed(rule: Rule, error: str) -> RuleResult:
    return RuleResult(name=rule.name, passed=False, message=rule.message, error=_one_line(error))


def _check_plain(value: object, where: str) -> None:
    """Refuse context values that are not JSON-like, naming where they are."""
    if value is None or isinstance(value, str | bool | int | float):
        return
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"policy context {where}: key {key!r} is not a string")
            _check_plain(item, f"{where}.{key}")
        return
    raise TypeError(f"policy context {where}: {type(value).__name__} is not JSON-like data")


# --- CEL, behind one boundary ---------------------------------------------------------------


def _celpy() -> Any:
    """The celpy module, imported on first use: it takes ~0.2 s, and most commands never
    need it. celpy's own annotations are partial, so it is used untyped, here only."""
    import celpy  # type: ignore[import-untyped,unused-ignore]  # typed in some releases only

    return celpy


@dataclass(frozen=True)
class _ParseFailure:
    """Why an expression did not compile; ``line`` is within the expression, if known."""

    problem: str
    line: int | None


def _environment() -> Any:
    celpy = _celpy()
    before = sys.getrecursionlimit()
    environment = celpy.Environment()
    # celpy.Environment() sets the interpreter's recursion limit to 2500, a global side
    # effect. Raising it is what CEL's nesting needs; lowering a limit the process chose is
    # not ours to do.
    if sys.getrecursionlimit() < before:
        sys.setrecursionlimit(before)
    return environment


def _compile(environment: Any, expr: str) -> Any:
    """A celpy program for ``expr``, or the :class:`_ParseFailure` saying why not."""
    celpy = _celpy()
    try:
        return environment.program(environment.compile(expr), functions=_functions())
    except celpy.CELParseError as e:
        return _ParseFailure(_parse_problem(e, expr), e.line)
    except RecursionError:
        return _ParseFailure("the expression is nested too deeply", None)


@functools.cache
def _functions() -> dict[str, Any]:
    """Overrides of celpy's operators where it departs from the CEL spec in a way rules
    depend on: celpy raises on ``1 != null``, so the documented ``x != null && x <= N``
    would fail for every *set* limit. Any value compares with ``null``, as CEL specifies;
    every other comparison, and errors on either side, stay celpy's."""
    celpy = _celpy()
    error_type = celpy.CELEvalError
    bool_type = celpy.celtypes.BoolType
    base = celpy.evaluation.base_functions

    def null_aware(compare: Any, *, equal: bool) -> Any:
        def function(a: Any, b: Any) -> Any:
            if (a is None or b is None) and not (
                isinstance(a, error_type) or isinstance(b, error_type)
            ):
                return bool_type((a is None and b is None) == equal)
            return compare(a, b)

        return function

    return {
        "_==_": null_aware(base["_==_"], equal=True),
        "_!=_": null_aware(base["_!=_"], equal=False),
    }


def _parse_problem(error: Any, expr: str) -> str:
    """A one-line description of a CEL syntax error, from the lark error celpy wraps."""
    from lark.exceptions import UnexpectedCharacters, UnexpectedToken

    cause = error.__context__
    at = ""
    if error.line is not None and error.column is not None:
        multiline = "\n" in expr.strip("\n")
        at = (
            f" at line {error.line}, column {error.column} of the expression"
            if multiline
            else f" at column {error.column}"
        )
    if isinstance(cause, UnexpectedToken):
        if cause.token.type == "$END":
            return "unexpected end of the expression; is something missing at its end?"
        return f"unexpected {_clip(str(cause.token.value), _SHOW_MAX)!r}{at}"
    if isinstance(cause, UnexpectedCharacters):
        return f"unexpected character {cause.char!r}{at}"
    first = str(error.args[0]).strip().splitlines() if error.args else []
    return _clip(first[0] if first else "syntax error")


_CEL_TYPES = {
    "BoolType": "bool",
    "BytesType": "bytes",
    "DoubleType": "double",
    "DurationType": "duration",
    "IntType": "int",
    "ListType": "list",
    "MapType": "map",
    "NoneType": "null",
    "NullType": "null",
    "StringType": "string",
    "TimestampType": "timestamp",
    "TypeType": "type",
    "UintType": "uint",
}
_OPERATORS = {
    "relation_eq": "==",
    "relation_ne": "!=",
    "relation_lt": "<",
    "relation_le": "<=",
    "relation_gt": ">",
    "relation_ge": ">=",
    "relation_in": "in",
    "addition_add": "+",
    "addition_sub": "-",
    "multiplication_mul": "*",
    "multiplication_div": "/",
    "multiplication_mod": "%",
    "unary_not": "!",
    "unary_neg": "-",
}
_TOKEN_RE = re.compile(r"Token\('RULE', '(\w+)'\)")
_CLASS_RE = re.compile(r"<class '(?:[\w.]+\.)?(\w+)'>")
_NESTED_MESSAGE_RE = re.compile(r"""CELEvalError\(\*\((['"])(.*?)\1, """)
_NESTED_TREE_RE = re.compile(r"""tree=(['"])(.*?)\1\)""")


def _cel_type(name: str) -> str:
    return _CEL_TYPES.get(name, name)


def _eval_problem(error: Any, expr: str) -> str:
    """What went wrong in an evaluation, in CEL's terms, and the sub-expression it was in."""
    args = error.args
    problem = str(args[0]) if args else type(error).__name__
    # An undeclared variable's message carries a dump of the whole activation.
    problem = problem.split(" (in activation", 1)[0]
    inner = args[2] if len(args) > 2 else None
    detail = inner[0] if isinstance(inner, tuple) and inner and isinstance(inner[0], str) else ""
    nested = _NESTED_MESSAGE_RE.search(detail)
    if nested is not None:
        # all() and exists() report two errors combined, as the text of their reprs: take
        # the first one's message and the sub-expression it names.
        problem = nested[2]
        where = _NESTED_TREE_RE.search(detail, nested.end())
        return _clip(_readable(problem) + (f" in `{_snippet(where[2])}`" if where else ""))
    if detail and not detail.startswith("no such overload:") and detail not in problem:
        problem += f" ({detail})"
    problem = _readable(problem)
    tree = getattr(error, "tree", None)
    meta = getattr(tree, "meta", None)
    start = getattr(meta, "start_pos", None)
    end = getattr(meta, "end_pos", None)
    if isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= len(expr):
        problem += f" in `{_snippet(expr[start:end])}`"
    return _clip(problem, _DETAIL_MAX)


def _readable(problem: str) -> str:
    """celpy's message with CEL's operator and type names instead of Python's."""
    problem = _TOKEN_RE.sub(lambda m: repr(_OPERATORS.get(m[1], m[1])), problem)
    return _CLASS_RE.sub(lambda m: _cel_type(m[1]), problem)


def _snippet(source: str) -> str:
    return _clip(" ".join(source.split()), _SHOW_MAX)


def _plain_value(value: Any) -> Any:
    """A CEL value as plain Python data, to show it to users."""
    if isinstance(value, dict):
        return {_plain_value(k): _plain_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_value(item) for item in value]
    if isinstance(value, str):
        return str(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, bytes):
        return bytes(value)
    return value


# --- reading the YAML -----------------------------------------------------------------------


def _compose(text: str, source: str) -> yaml.Node | None:
    """The YAML node tree of ``text``; PyYAML's failures become one-line errors."""
    from buildcell.build.spec import yaml_error

    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except (yaml.YAMLError, RecursionError) as e:
        line, problem = yaml_error(e, text)
        where = source if line is None else f"{source}:{line}"
        hint = None
        if isinstance(e, yaml.MarkedYAMLError):
            hint = (
                "quote expressions that contain ': ', ' #' or start with a YAML indicator "
                "such as '!', '{', '[', '*' or '&'; or write them as a block (expr: |)"
            )
        raise PolicyError(_one_line(f"{where}: {problem}"), hint=hint) from e


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return _SCALAR_KINDS.get(node.tag, f"a value tagged {node.tag}")


class _Reader:
    """Checks a policy's node tree and turns it into rules, keeping each rule's expression
    node (for the lines of parse errors)."""

    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, node: yaml.Node, problem: str, *, hint: str | None = None) -> PolicyError:
        line = node.start_mark.line + 1
        return PolicyError(_one_line(f"{self.source}:{line}: {problem}"), hint=hint)

    def read(self, root: yaml.Node | None) -> list[tuple[Rule, yaml.Node]]:
        if root is None or (isinstance(root, yaml.ScalarNode) and root.value == ""):
            raise PolicyError(
                f"{self.source}:1: empty policy: expected a mapping with version and rules",
                hint=f"start with 'version: {POLICY_VERSION}' and a list of rules",
            )
        top = self.mapping(root, "the policy", _TOP_KEYS, "")
        if "version" not in top:
            raise self.error(
                root,
                "the policy has no 'version'",
                hint=f"add 'version: {POLICY_VERSION}'",
            )
        self.version(top["version"][1])
        if "rules" not in top:
            raise self.error(root, "the policy has no 'rules'", hint=_NO_RULES_HINT)
        rules_node = top["rules"][1]
        if not isinstance(rules_node, yaml.SequenceNode) or rules_node.tag != _SEQ_TAG:
            raise self.error(
                rules_node, f"'rules' must be a list of rules, got {_kind(rules_node)}"
            )
        if not rules_node.value:
            raise self.error(
                rules_node,
                "'rules' is empty: a policy needs at least one rule",
                hint=_NO_RULES_HINT,
            )
        rules: list[tuple[Rule, yaml.Node]] = []
        first_at: dict[str, int] = {}
        for index, node in enumerate(rules_node.value):
            rule, expr_node = self.rule(node, index)
            if rule.name in first_at:
                raise self.error(
                    node,
                    f"duplicate rule name {rule.name!r} (first at line {first_at[rule.name]})",
                    hint="rule names must be unique: a denial names the rules that failed",
                )
            first_at[rule.name] = rule.line
            rules.append((rule, expr_node))
        return rules

    def mapping(
        self, node: yaml.Node, what: str, known: tuple[str, ...], prefix: str
    ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        if not isinstance(node, yaml.MappingNode) or node.tag != _MAP_TAG:
            raise self.error(node, f"{prefix}{what} must be a mapping, got {_kind(node)}")
        entries: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag == _MERGE_TAG:
                raise self.error(
                    key_node, f"{prefix}merge keys ('<<') are not supported in a policy"
                )
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != _STR_TAG:
                raise self.error(key_node, f"{prefix}keys must be strings, got {_kind(key_node)}")
            key = key_node.value
            if key in entries:
                first = entries[key][0].start_mark.line + 1
                raise self.error(key_node, f"{prefix}duplicate key {key!r} (first at line {first})")
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                guess = f"did you mean {close[0]!r}?" if close else f"expected {', '.join(known)}"
                raise self.error(
                    key_node,
                    f"{prefix}unknown key {_show(key)} in {what}; {guess}",
                    hint="a policy is refused when it holds anything buildcell would not enforce",
                )
            entries[key] = (key_node, value_node)
        return entries

    def version(self, node: yaml.Node) -> None:
        if isinstance(node, yaml.ScalarNode) and node.tag == _INT_TAG:
            version = yaml.constructor.SafeConstructor().construct_yaml_int(node)
            if version == POLICY_VERSION:
                return
            raise self.error(
                node,
                f"unsupported policy version {version}; this buildcell reads version "
                f"{POLICY_VERSION}",
            )
        raise self.error(node, f"'version' must be {POLICY_VERSION}, got {_kind(node)}")

    def string(self, node: yaml.Node, what: str, prefix: str) -> str:
        """The text of a scalar, as written: ``name: no`` is the name "no", ``expr: true``
        the expression "true", whatever type YAML would give the plain scalar."""
        if isinstance(node, yaml.ScalarNode) and node.tag in _TEXT_TAGS:
            return str(node.value)
        hint = _CEL_HINT if what == "expr" else None
        raise self.error(node, f"{prefix}'{what}' must be a string, got {_kind(node)}", hint=hint)

    def rule(self, node: yaml.Node, index: int) -> tuple[Rule, yaml.Node]:
        label = f"rules[{index}]: "
        entries = self.mapping(node, "a rule", _RULE_KEYS, label)
        if "name" not in entries:
            raise self.error(node, f"{label}the rule has no 'name'", hint="add 'name: NAME'")
        name = self.string(entries["name"][1], "name", label)
        if _RULE_NAME_RE.fullmatch(name) is None:
            raise self.error(
                entries["name"][1],
                f"{label}invalid rule name {_show(name)}: expected lowercase letters, digits, "
                "'.', '_' or '-', starting with a letter or digit",
            )
        label = f"rule {name!r}: "
        if "expr" not in entries:
            raise self.error(node, f"{label}the rule has no 'expr'", hint=_EXPR_HINT)
        expr_node = entries["expr"][1]
        expr = self.string(expr_node, "expr", label)
        if not expr.strip():
            raise self.error(expr_node, f"{label}'expr' is empty", hint=_EXPR_HINT)
        message = f"rule {name} failed"
        if "message" in entries:
            message_node = entries["message"][1]
            message = " ".join(self.string(message_node, "message", label).split())
            if not message:
                raise self.error(
                    message_node,
                    f"{label}'message' is empty",
                    hint=f"remove it for the default, {f'rule {name} failed'!r}",
                )
        return Rule(name=name, expr=expr, message=message, line=node.start_mark.line + 1), expr_node


_NO_RULES_HINT = (
    "a policy without rules would allow everything; to allow every build on purpose, add "
    'a rule with expr: "true"'
)
_EXPR_HINT = (
    "add a CEL expression that is true for allowed builds, e.g. expr: size(invocation.unsafe) == 0"
)


# --- text -----------------------------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())


def _clip(text: str, limit: int = _DETAIL_MAX) -> str:
    text = _one_line(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _show(value: str) -> str:
    return show(value, _SHOW_MAX)
