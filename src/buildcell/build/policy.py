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
or comparing a number with a string. A policy without rules, an unknown key, an
expression that does not parse, or one that names a field the context does not have
(``spec.egres``, ``s.limits.memroy`` inside ``spec.steps.all(s, ...)``) is refused when
the policy is loaded: inside ``||`` or ``has()`` such a typo would pass unnoticed.

Rule names are lowercase letters, digits, ``.``, ``_`` and ``-``, starting with a letter or
digit, and unique within the policy. ``message`` defaults to ``rule NAME failed``.

The evaluation context
----------------------

Rules see two variables, ``spec`` (the build, as validated from ``buildcell.yaml``) and
``invocation`` (how this build was started). Every value is plain data: strings, integers,
doubles, booleans, lists, maps and ``null``. These are all the fields there are, and every
one is always present (``null`` or empty when unset); only the keys of a step's ``env``
are the spec's own, so any key may be asked for there (``has(s.env.CI)``).

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
import posixpath
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from buildcell import _log
from buildcell._text import show
from buildcell.build.invocation import Invocation
from buildcell.errors import PolicyError

if TYPE_CHECKING:
    from buildcell._yaml import Document, Loc, Site, YamlProblem
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

log = _log.get(__name__)

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
            not parse or that names a field the context does not have). The message is
            one line naming the file and the line.
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
    source = str(path)
    parsed = _Reader(source, _read(text, source)).read()
    environment = _environment()
    context = _context_shape()
    programs = []
    for rule, expr_site in parsed:
        program = _compile(environment, rule.expr, context=context)
        if isinstance(program, _ParseFailure):
            line = expr_site.line
            if expr_site.style == "|" and program.line is not None:
                # A literal block keeps the expression's lines: point at the bad one.
                line += program.line
            if program.unknown_name:
                message, hint = program.problem, _NAMES_HINT
            else:
                message, hint = f"expression does not parse: {program.problem}", _CEL_HINT
            raise PolicyError(_one_line(f"{path}:{line}: rule {rule.name!r}: {message}"), hint=hint)
        programs.append(program)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    rules = tuple(rule for rule, _ in parsed)
    log.debug("loaded policy %s (%s): %d rules", path, digest, len(rules))
    return Policy(path=path, rules=rules, digest=digest, _programs=tuple(programs))


# --- the context ----------------------------------------------------------------------------


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
            "outputs": spec.output_patterns,
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
    values = limits
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
        "limits": {**_limits_context(spec.step_limits(step)), "disk": spec.limits.disk},
        "caches": [{"path": cache.path, "key": cache.key} for cache in step.caches],
    }


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


# --- the names a rule may use ---------------------------------------------------------------
#
# A rule that names a field the context does not have cannot do what its author meant:
# inside `||` or `has()` a typo is absorbed and the rule passes. So every name a rule uses
# is checked when the policy loads, against the shape of what build_context makes for a
# sample build in which every part is present: the context itself is the schema.


@dataclass(frozen=True)
class _Fields:
    """A map with known keys."""

    fields: Mapping[str, _Shape]


@dataclass(frozen=True)
class _Keys:
    """A map whose keys are the build's own (a step's ``env``): any key may be asked for."""

    value: _Shape


@dataclass(frozen=True)
class _List:
    item: _Shape


@dataclass(frozen=True)
class _Scalar:
    """A string, number, boolean or null: no fields."""


_Shape = _Fields | _Keys | _List | _Scalar
#: What the variables a macro binds stand for; ``None`` where the context does not say.
_Scope = Mapping[str, _Shape | None]

#: Maps of the context whose keys come from the spec, not from buildcell.
_FREE_FORM = frozenset({("spec", "steps", "[]", "env")})
#: Names CEL itself defines: types, and the conversion that turns off type checks.
_CEL_NAMES = frozenset(
    {
        "bool",
        "bytes",
        "double",
        "duration",
        "dyn",
        "int",
        "list",
        "map",
        "null_type",
        "string",
        "timestamp",
        "type",
        "uint",
    }
)
#: Macros that bind their first argument to each element of a list (or key of a map).
_MACROS = frozenset({"all", "exists", "exists_one", "map", "filter"})
_PASS_THROUGH = frozenset(
    {
        "expr",
        "conditionalor",
        "conditionaland",
        "relation",
        "addition",
        "multiplication",
        "unary",
        "member",
        "primary",
        "paren_expr",
    }
)
_STRING_KEY_RE = re.compile(r"""[rR]?(["'])([A-Za-z0-9_.-]*)\1""")
_NAMES_HINT = (
    "rules see spec and invocation, with the fields listed in the documentation of "
    "buildcell.build.policy (and in the README, under 'Operator policy')"
)


def _sample() -> tuple[BuildSpec, Invocation]:
    """A build in which every part of the context is present and no list is empty."""
    from buildcell.build.spec import BuildSpec

    hex64 = "0" * 64
    spec = BuildSpec.model_validate(
        {
            "version": 1,
            "name": "sample",
            "rootfs": {"oci": "image", "digest": f"sha256:{hex64}"},
            "inputs": [{"url": "https://files.example/a", "sha256": hex64, "path": "a"}],
            "steps": [
                {
                    "name": "step",
                    "run": "true",
                    "env": {"NAME": "value"},
                    "secrets": ["token"],
                    "network": {"allow": ["files.example"]},
                    "caches": [{"path": "/tmp/cache", "key": "cache"}],
                }
            ],
            "outputs": ["out/*"],
        }
    )
    invocation = Invocation(
        project="sample",
        ref="refs/heads/main",
        trust="trusted",
        secrets=("token",),
        unsafe=("no-seccomp",),
        pinned_hosts=("files.example=192.0.2.1",),
        allow=("files.example",),
        allow_fetch=("files.example",),
        image_budget=1,
    )
    return spec, invocation


def _shape_of(value: object, path: tuple[str, ...]) -> _Shape:
    if isinstance(value, dict):
        if path in _FREE_FORM:
            assert value, f"the sample has no entry in {'.'.join(path)}"
            return _Keys(_shape_of(next(iter(value.values())), (*path, "{}")))
        return _Fields({key: _shape_of(item, (*path, key)) for key, item in value.items()})
    if isinstance(value, list):
        assert value, f"the sample has an empty list at {'.'.join(path)}"
        return _List(_shape_of(value[0], (*path, "[]")))
    return _Scalar()


@functools.cache
def _context_shape() -> _Fields:
    """The shape of every context :func:`build_context` makes."""
    shape = _shape_of(build_context(*_sample()), ())
    assert isinstance(shape, _Fields)
    return shape


class _UnknownNameError(Exception):
    def __init__(self, problem: str, line: int | None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.line = line


class _NameCheck:
    """Walks a parsed expression (celpy's lark tree) and raises :class:`_UnknownNameError`
    at the first name the context does not have.

    Each sub-expression gets the :data:`_Shape` of its value where that follows from the
    context (``spec.steps[0].limits``), ``None`` where it does not (a literal, a function's
    result): nothing below an unknown shape is checked.
    """

    def __init__(self, expr: str, context: _Fields) -> None:
        self.expr = expr
        self.roots = context.fields

    def shape(self, tree: Any, scope: _Scope) -> _Shape | None:
        """The shape of the value of ``tree``, having checked every name in it."""
        children = tree.children
        kind = tree.data
        if kind == "ident":
            return self.variable(tree, str(children[0]), scope)
        if kind == "dot_ident":  # `.spec`: the root scope, past any macro variable
            return self.variable(tree, str(children[0]), {})
        if kind == "member_dot":
            target, name = children
            return self.field(tree, target, self.shape(target, scope), str(name))
        if kind == "member_dot_arg":
            return self.method(children[0], str(children[1]), _arguments(children[2:]), scope)
        if kind == "member_index":
            return self.index(tree, scope)
        if kind == "ident_arg":
            self.call(str(children[0]), _arguments(children[1:]), scope)
            return None
        if kind in _PASS_THROUGH and len(children) == 1 and _is_tree(children[0]):
            return self.shape(children[0], scope)
        # Operators, literals, `Type{field: expr}` (whose type name is no variable): the
        # operands are checked, the result has no shape the context gives.
        first = 1 if kind == "member_object" else 0
        for child in children[first:]:
            if _is_tree(child):
                self.shape(child, scope)
        return None

    def index(self, tree: Any, scope: _Scope) -> _Shape | None:
        target, index = tree.children
        shape = self.shape(target, scope)
        self.shape(index, scope)
        if isinstance(shape, _List):
            return shape.item
        key = _string_key(index)
        return None if key is None else self.field(tree, target, shape, key)

    def call(self, name: str, arguments: list[Any], scope: _Scope) -> None:
        if name == "has" and len(arguments) == 1:
            self.has(arguments[0], scope)
            return
        for argument in arguments:
            self.shape(argument, scope)

    def method(self, target: Any, name: str, arguments: list[Any], scope: _Scope) -> _Shape | None:
        shape = self.shape(target, scope)
        variable = _bare_name(arguments[0]) if len(arguments) >= 2 else None
        if name in _MACROS and variable is not None:
            element = _element(shape)
            inner = {**scope, variable: element}
            for argument in arguments[1:]:
                self.shape(argument, inner)
            if name == "filter" and isinstance(shape, _List):
                return shape
            return None
        if name == "reduce" and len(arguments) == 4:  # celpy's reduce(r, i, init, expr)
            accumulator, variable = _bare_name(arguments[0]), _bare_name(arguments[1])
            if accumulator is not None and variable is not None:
                self.shape(arguments[2], scope)
                self.shape(arguments[3], {**scope, accumulator: None, variable: _element(shape)})
                return None
        for argument in arguments:
            self.shape(argument, scope)
        return None

    def has(self, argument: Any, scope: _Scope) -> None:
        """``has(x.f)`` is false for a field that does not exist: that field is checked."""
        tree = argument
        while tree.data in _PASS_THROUGH and len(tree.children) == 1:
            tree = tree.children[0]
            if not _is_tree(tree):
                return
        if tree.data == "member_dot":
            target, name = tree.children
            self.field(tree, target, self.shape(target, scope), str(name))
        else:
            self.shape(argument, scope)

    def variable(self, tree: Any, name: str, scope: _Scope) -> _Shape | None:
        if name in scope:
            return scope[name]
        if name in self.roots:
            return self.roots[name]
        if name in _CEL_NAMES:
            return None
        known = [*self.roots, *scope]
        close = difflib.get_close_matches(name, known, n=1)
        guess = f"did you mean {close[0]!r}?" if close else f"rules see {', '.join(known)}"
        raise self.unknown(tree, f"unknown variable {name!r}; {guess}")

    def field(self, tree: Any, target: Any, shape: _Shape | None, name: str) -> _Shape | None:
        if shape is None:
            return None
        if isinstance(shape, _Keys):
            return shape.value
        owner = self.text(target)
        if isinstance(shape, _List):
            raise self.unknown(tree, f"`{owner}` is a list, it has no field {name!r}")
        if isinstance(shape, _Scalar):
            raise self.unknown(tree, f"`{owner}` is not a map, it has no field {name!r}")
        if name in shape.fields:
            return shape.fields[name]
        close = difflib.get_close_matches(name, list(shape.fields), n=1)
        guess = (
            f"did you mean {close[0]!r}?" if close else f"`{owner}` has {', '.join(shape.fields)}"
        )
        raise self.unknown(tree, f"unknown field {name!r} in `{self.text(tree)}`; {guess}")

    def text(self, tree: Any) -> str:
        meta = tree.meta
        start = getattr(meta, "start_pos", None)
        end = getattr(meta, "end_pos", None)
        if isinstance(start, int) and isinstance(end, int):
            return _snippet(self.expr[start:end])
        return "?"

    def unknown(self, tree: Any, problem: str) -> _UnknownNameError:
        line = getattr(tree.meta, "line", None)
        return _UnknownNameError(problem, line if isinstance(line, int) else None)


def _is_tree(node: object) -> bool:
    from lark import Tree

    return isinstance(node, Tree)


def _arguments(rest: list[Any]) -> list[Any]:
    """The argument expressions of a call, from the children after its name."""
    return [expr for exprlist in rest if _is_tree(exprlist) for expr in exprlist.children]


def _bare_name(expr: Any) -> str | None:
    """``x`` for an expression that is just the identifier ``x`` (a macro's variable)."""
    tree = expr
    while tree.data in _PASS_THROUGH and len(tree.children) == 1 and _is_tree(tree.children[0]):
        tree = tree.children[0]
    return str(tree.children[0]) if tree.data == "ident" else None


def _string_key(expr: Any) -> str | None:
    """The key of ``m["key"]`` when it is a plain string literal."""
    tree = expr
    while tree.data in _PASS_THROUGH and len(tree.children) == 1 and _is_tree(tree.children[0]):
        tree = tree.children[0]
    if tree.data != "literal":
        return None
    match = _STRING_KEY_RE.fullmatch(str(tree.children[0]))
    return match[2] if match else None


def _element(shape: _Shape | None) -> _Shape | None:
    """What a macro's variable is bound to: a list's items, or a map's keys (strings)."""
    if isinstance(shape, _List):
        return shape.item
    if isinstance(shape, _Fields | _Keys):
        return _Scalar()
    return None


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
    log.debug("policy %s: %s", policy.path, decision.summary())
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
    """Why an expression did not compile; ``line`` is within the expression, if known;
    ``unknown_name`` when it parsed but names something the context does not have."""

    problem: str
    line: int | None
    unknown_name: bool = False


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


def _compile(environment: Any, expr: str, *, context: _Fields | None = None) -> Any:
    """A celpy program for ``expr``, or the :class:`_ParseFailure` saying why not; with
    ``context``, every name the expression uses is checked against it."""
    celpy = _celpy()
    try:
        tree = environment.compile(expr)
        if context is not None:
            _NameCheck(expr, context).shape(tree, {})
        return environment.program(tree, functions=_functions())
    except celpy.CELParseError as e:
        return _ParseFailure(_parse_problem(e, expr), e.line)
    except _UnknownNameError as e:
        return _ParseFailure(e.problem, e.line, unknown_name=True)
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

_YAML_HINT = (
    "quote expressions that contain ': ', ' #' or start with a YAML indicator such as '!', "
    "'{', '[', '*' or '&'; or write them as a block (expr: |)"
)
# Scalars whose text is taken as written where a string is expected.
_TEXT_KINDS = frozenset({"str", "int", "bool", "float", "timestamp"})


def _read(text: str, source: str) -> Document:
    """The policy's YAML as plain data, every scalar as its text; unknown keys are refused
    as they are read, before anything below them."""
    # Only when there is a policy: `buildcell run` starts without PyYAML.
    from buildcell._yaml import read_yaml

    def error(problem: YamlProblem) -> PolicyError:
        where = source if problem.line is None else f"{source}:{problem.line}"
        return PolicyError(
            _one_line(f"{where}: {_label(problem.loc)}{problem.message}"),
            hint=_YAML_HINT if problem.syntax else None,
        )

    def check_key(loc: Loc, site: Site) -> None:
        parent, key = loc[:-1], loc[-1]
        known: tuple[str, ...]
        if parent == ():
            known, what = _TOP_KEYS, "the policy"
        elif len(parent) == 2 and _label(parent):
            known, what = _RULE_KEYS, "a rule"
        else:
            return
        if key in known:
            return
        close = difflib.get_close_matches(str(key), known, n=1)
        guess = f"did you mean {close[0]!r}?" if close else f"expected {', '.join(known)}"
        raise PolicyError(
            _one_line(
                f"{source}:{site.line}: {_label(parent)}unknown key {_show(str(key))} in "
                f"{what}; {guess}"
            ),
            hint="a policy is refused when it holds anything buildcell would not enforce",
        )

    return read_yaml(text, error, scalars="text", document="a policy", check_key=check_key)


def _label(loc: Loc) -> str:
    """``rules[2]: `` for a location in the third rule, else nothing."""
    if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
        return f"rules[{loc[1]}]: "
    return ""


class _Reader:
    """Checks a policy's data and turns it into rules, keeping each rule's expression site
    (for the lines of errors in expressions)."""

    def __init__(self, source: str, document: Document) -> None:
        self.source = source
        self.document = document

    def error(self, loc: Loc, problem: str, *, hint: str | None = None) -> PolicyError:
        line = self.document.site(loc).line
        return PolicyError(_one_line(f"{self.source}:{line}: {problem}"), hint=hint)

    def kind(self, loc: Loc) -> str:
        from buildcell._yaml import describe

        return describe(self.document.sites[loc].kind)

    def read(self) -> list[tuple[Rule, Site]]:
        top = self.document.data
        if self.document.sites[()].text == "":
            raise PolicyError(
                f"{self.source}:1: empty policy: expected a mapping with version and rules",
                hint=f"start with 'version: {POLICY_VERSION}' and a list of rules",
            )
        if not isinstance(top, dict):
            raise self.error((), f"the policy must be a mapping, got {self.kind(())}")
        if "version" not in top:
            raise self.error(
                (), "the policy has no 'version'", hint=f"add 'version: {POLICY_VERSION}'"
            )
        self.version()
        if "rules" not in top:
            raise self.error((), "the policy has no 'rules'", hint=_NO_RULES_HINT)
        rules_data = top["rules"]
        if not isinstance(rules_data, list):
            raise self.error(
                ("rules",), f"'rules' must be a list of rules, got {self.kind(('rules',))}"
            )
        if not rules_data:
            raise self.error(
                ("rules",),
                "'rules' is empty: a policy needs at least one rule",
                hint=_NO_RULES_HINT,
            )
        rules: list[tuple[Rule, Site]] = []
        first_at: dict[str, int] = {}
        for index, entries in enumerate(rules_data):
            rule, expr_site = self.rule(index, entries)
            if rule.name in first_at:
                raise self.error(
                    ("rules", index),
                    f"duplicate rule name {rule.name!r} (first at line {first_at[rule.name]})",
                    hint="rule names must be unique: a denial names the rules that failed",
                )
            first_at[rule.name] = rule.line
            rules.append((rule, expr_site))
        return rules

    def version(self) -> None:
        from buildcell._yaml import typed_scalar

        site = self.document.sites[("version",)]
        if site.kind == "int":
            try:
                version = typed_scalar(site)
            except ValueError as e:
                raise self.error(("version",), f"'version' must be {POLICY_VERSION}: {e}") from e
            if version == POLICY_VERSION:
                return
            raise self.error(
                ("version",),
                f"unsupported policy version {version}; this buildcell reads version "
                f"{POLICY_VERSION}",
            )
        raise self.error(
            ("version",), f"'version' must be {POLICY_VERSION}, got {self.kind(('version',))}"
        )

    def string(self, loc: Loc, value: object, label: str) -> str:
        """The text of a scalar, as written: ``name: no`` is the name "no", ``expr: true``
        the expression "true", whatever type YAML would give the plain scalar."""
        if self.document.sites[loc].kind in _TEXT_KINDS:
            assert isinstance(value, str)
            return value
        what = loc[-1]
        hint = _CEL_HINT if what == "expr" else None
        raise self.error(loc, f"{label}'{what}' must be a string, got {self.kind(loc)}", hint=hint)

    def rule(self, index: int, entries: object) -> tuple[Rule, Site]:
        loc: Loc = ("rules", index)
        label = f"rules[{index}]: "
        if not isinstance(entries, dict):
            raise self.error(loc, f"{label}a rule must be a mapping, got {self.kind(loc)}")
        if "name" not in entries:
            raise self.error(loc, f"{label}the rule has no 'name'", hint="add 'name: NAME'")
        name = self.string((*loc, "name"), entries["name"], label)
        if _RULE_NAME_RE.fullmatch(name) is None:
            raise self.error(
                (*loc, "name"),
                f"{label}invalid rule name {_show(name)}: expected lowercase letters, digits, "
                "'.', '_' or '-', starting with a letter or digit",
            )
        label = f"rule {name!r}: "
        if "expr" not in entries:
            raise self.error(loc, f"{label}the rule has no 'expr'", hint=_EXPR_HINT)
        expr = self.string((*loc, "expr"), entries["expr"], label)
        if not expr.strip():
            raise self.error((*loc, "expr"), f"{label}'expr' is empty", hint=_EXPR_HINT)
        message = f"rule {name} failed"
        if "message" in entries:
            message = " ".join(self.string((*loc, "message"), entries["message"], label).split())
            if not message:
                raise self.error(
                    (*loc, "message"),
                    f"{label}'message' is empty",
                    hint=f"remove it for the default, {f'rule {name} failed'!r}",
                )
        line = self.document.sites[loc].line
        rule = Rule(name=name, expr=expr, message=message, line=line)
        return rule, self.document.sites[(*loc, "expr")]


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
