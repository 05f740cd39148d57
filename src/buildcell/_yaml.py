"""Reading YAML with positions: plain data, and where in the file each value came from.

PyYAML's safe loader composes the text into a node tree, which keeps the position of every
node. :func:`read_yaml` turns the tree into dicts, lists and scalars and records, for every
location (a tuple of keys and indexes from the root), a :class:`Site`: its line and
column, its key's, its YAML type and, for a scalar, its text and style. The build spec, the
operator policy and the configuration file are each read by it, with their own options and
their own error type.

Whatever the options, a document is refused when it has a key given twice, a key that is
not a string, a tag other than the plain YAML ones, a string with an unpaired surrogate,
an alias to a collection that contains it, more than ``max_nodes`` nodes once aliases are
expanded, or more than ``max_depth`` levels of nesting.

Scalars are read as YAML 1.1 reads them (PyYAML's safe loader), with one exception:
timestamps stay strings, so ``name: 2024-01-01`` is the string ``"2024-01-01"``. With
``scalars="text"`` every scalar except null is its text as written: ``name: no`` is
``"no"``, ``expr: true`` is ``"true"``; its :attr:`Site.kind` still says what YAML would
have read.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import yaml

from buildcell._text import show

__all__ = [
    "MAX_DEPTH",
    "MAX_NODES",
    "Document",
    "Kind",
    "Loc",
    "Site",
    "YamlProblem",
    "describe",
    "field_path",
    "read_yaml",
    "typed_scalar",
    "yaml_error",
]

#: Default bound on YAML nodes after alias expansion, so a small "billion laughs" stays small.
MAX_NODES = 100_000
#: Default bound on nesting (and merge-key chains).
MAX_DEPTH = 64

#: A location in a document: the keys and list indexes from the root.
Loc = tuple[str | int, ...]

#: The YAML type of a value; ``timestamp`` is a scalar YAML would read as a date.
Kind = Literal["map", "seq", "null", "bool", "int", "float", "str", "timestamp"]

_MERGE_TAG = "tag:yaml.org,2002:merge"
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_SCALAR_TAGS: dict[str, Kind] = {
    "tag:yaml.org,2002:null": "null",
    "tag:yaml.org,2002:bool": "bool",
    "tag:yaml.org,2002:int": "int",
    "tag:yaml.org,2002:float": "float",
    "tag:yaml.org,2002:str": "str",
    "tag:yaml.org,2002:timestamp": "timestamp",
    # `=` (the "value" tag) and a `<<` that is not a key are text.
    "tag:yaml.org,2002:value": "str",
    _MERGE_TAG: "str",
}
_CONSTRUCTORS = {
    "null": "construct_yaml_null",
    "bool": "construct_yaml_bool",
    "int": "construct_yaml_int",
    "float": "construct_yaml_float",
}
_KIND_WORDS = {"null": "null", "bool": "boolean", "int": "integer", "float": "number"}
_KIND_NAMES: dict[Kind, str] = {
    "map": "a mapping",
    "seq": "a list",
    "null": "null",
    "bool": "a boolean",
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "timestamp": "a date",
}
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_SIMPLE_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SHOW_MAX = 60


@dataclass(frozen=True, slots=True)
class Site:
    """Where a value is in the file, and how it was written.

    Attributes:
        line: the 1-based line where the value starts.
        column: the 1-based column where it starts.
        key_line: the line of its key; the value's own for the root and list items.
        key_column: the column of its key, likewise.
        kind: its YAML type, as YAML would read it (also when scalars are kept as text).
        text: a scalar's text as written (unescaped, without quotes); ``None`` for a
            mapping or a list.
        style: a scalar's style: ``None`` (plain), ``"'"``, ``'"'``, ``"|"`` or ``">"``;
            ``"flow"`` or ``"block"`` for a mapping or a list.
    """

    line: int
    column: int
    key_line: int
    key_column: int
    kind: Kind
    text: str | None
    style: str | None

    @property
    def plain(self) -> bool:
        """A scalar written without quotes or block indicator: the one YAML may retype."""
        return self.text is not None and self.style is None


@dataclass(frozen=True, slots=True)
class YamlProblem:
    """Why a document was refused, for the caller to turn into its own error.

    Attributes:
        line: the 1-based line, if known.
        loc: where in the document, as far as known (``()`` for the text as a whole).
        message: what is wrong, one line, without file or line.
        syntax: PyYAML could not parse the text (rather than the document being refused).
    """

    line: int | None
    loc: Loc
    message: str
    syntax: bool = False


@dataclass(frozen=True)
class Document:
    """A document as plain data, and the :class:`Site` of every location in it.

    Attributes:
        data: dicts (in file order), lists and scalars; ``None`` for an empty document.
        sites: the site of every location in ``data``, the root's at ``()``.
    """

    data: object
    sites: Mapping[Loc, Site]

    def site(self, loc: Loc) -> Site:
        """The site of ``loc``, or of its longest prefix that has one."""
        for end in range(len(loc), -1, -1):
            site = self.sites.get(loc[:end])
            if site is not None:
                return site
        raise AssertionError("the root always has a site")


ErrorFactory = Callable[[YamlProblem], Exception]


def read_yaml(
    text: str,
    error: ErrorFactory,
    *,
    scalars: Literal["typed", "text"] = "typed",
    merge_keys: bool = False,
    document: str = "this file",
    max_nodes: int = MAX_NODES,
    max_depth: int = MAX_DEPTH,
    check_key: Callable[[Loc, Site], None] | None = None,
) -> Document:
    """Read one YAML document into plain data with the site of every value.

    Args:
        text: the document.
        error: makes the exception raised for a :class:`YamlProblem`.
        scalars: ``typed`` (YAML 1.1 types, timestamps as strings) or ``text`` (every
            scalar but null as its text).
        merge_keys: allow ``<<`` merge keys; refused otherwise.
        document: what the text is, for messages ("a policy").
        max_nodes: bound on nodes after alias expansion.
        max_depth: bound on nesting and merge chains.
        check_key: called with the location and site of each key just before its value is
            read (in file order; keys merged in with ``<<`` after a mapping's own); it may
            raise the caller's error. A mapping's keys are checked for duplicates and types
            when the mapping is entered, before any of its values.

    Raises:
        Exception: whatever ``error`` makes, for text that is not YAML or a document that
            is refused (see the module's documentation).
    """
    root = _compose(text, error, max_depth)
    if root is None:
        return Document(data=None, sites={(): Site(1, 1, 1, 1, "null", "", None)})
    builder = _Builder(
        error,
        text_scalars=scalars == "text",
        merge_keys=merge_keys,
        document=document,
        max_nodes=max_nodes,
        max_depth=max_depth,
        check_key=check_key,
    )
    data = builder.value(root, (), _position(root), 0)
    return Document(data=data, sites=builder.sites)


def describe(kind: Kind) -> str:
    """How a YAML type is named to users: ``a string``, ``a list``, ``null``..."""
    return _KIND_NAMES[kind]


def typed_scalar(site: Site) -> object:
    """The value YAML 1.1 gives the scalar at ``site`` (timestamps stay strings).

    Raises:
        ValueError: ``site`` is not a scalar, or its text is not a valid value of its kind.
    """
    if site.text is None:
        raise ValueError("not a scalar")
    if site.kind in ("str", "timestamp"):
        return site.text
    node = yaml.ScalarNode(f"tag:yaml.org,2002:{site.kind}", site.text)
    constructor = yaml.constructor.SafeConstructor()
    try:
        return getattr(constructor, _CONSTRUCTORS[site.kind])(node)
    except (yaml.YAMLError, ArithmeticError, LookupError, TypeError, ValueError) as e:
        raise ValueError(f"invalid {_KIND_WORDS[site.kind]} {show(site.text, _SHOW_MAX)}") from e


def field_path(loc: Loc) -> str:
    """``steps[1].limits.timeout`` for ``("steps", 1, "limits", "timeout")``; odd keys quoted."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _SIMPLE_KEY_RE.fullmatch(part):
            out += f".{part}" if out else part
        else:
            out += f"[{show(part, _SHOW_MAX)}]"
    return out


def yaml_error(e: yaml.YAMLError | RecursionError, text: str) -> tuple[int | None, str]:
    """Where in ``text`` (1-based line, if known) PyYAML failed, and ``invalid YAML: ...``."""
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else 1
        problem = e.problem or e.context or "syntax error"
        if e.problem and e.context:
            # PyYAML splits a sentence in two: "while parsing X" + "expected Y, but found Z",
            # or "expected a single document" + "but found another document".
            context = e.context
            if e.context_mark is not None and e.context_mark.line + 1 != line:
                context += f" at line {e.context_mark.line + 1}"
            if context.startswith("while "):
                problem = f"{e.problem} ({context})"
            else:
                problem = f"{context}, {e.problem}"
        return line, f"invalid YAML: {problem}"
    if isinstance(e, yaml.reader.ReaderError):
        char = f"#x{e.character:04x}" if isinstance(e.character, int) else repr(e.character)
        line = text.count("\n", 0, e.position) + 1
        return line, f"invalid YAML: unacceptable character {char}: {e.reason}"
    if isinstance(e, RecursionError):
        return None, "invalid YAML: nested too deeply"
    return None, f"invalid YAML: {e}"


# --- composing ------------------------------------------------------------------------------


class _TooDeepError(Exception):
    def __init__(self, line: int) -> None:
        super().__init__(line)
        self.line = line


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with a bound on nesting, so that composing (which recurses)
    stops with a line number instead of exhausting the interpreter's stack."""

    def __init__(self, text: str, max_depth: int) -> None:
        super().__init__(text)
        self._depth = 0
        self._max_depth = max_depth

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self._depth > self._max_depth:
            event = self.peek_event()  # type: ignore[no-untyped-call]  # untyped in the stubs
            raise _TooDeepError(event.start_mark.line + 1)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _compose(text: str, error: ErrorFactory, max_depth: int) -> yaml.Node | None:
    try:
        loader = _Loader(text, max_depth)  # the reader checks the characters right away
        try:
            return loader.get_single_node()
        finally:
            loader.dispose()
    except _TooDeepError as e:
        raise error(YamlProblem(e.line, (), f"nested more than {max_depth} levels deep")) from e
    except (yaml.YAMLError, RecursionError) as e:
        line, message = yaml_error(e, text)
        syntax = isinstance(e, yaml.MarkedYAMLError)
        raise error(YamlProblem(line, (), message, syntax=syntax)) from e


# --- from nodes to data ---------------------------------------------------------------------


def _position(node: yaml.Node) -> tuple[int, int]:
    return (node.start_mark.line + 1, node.start_mark.column + 1)


def _style(node: yaml.Node) -> str | None:
    if isinstance(node, yaml.ScalarNode):
        return node.style or None
    assert isinstance(node, yaml.CollectionNode)
    return "flow" if node.flow_style else "block"


class _Builder:
    """Turns a node tree into data and records each value's :class:`Site`.

    Aliases are expanded, so every visit of a node counts against ``max_nodes``.
    """

    def __init__(
        self,
        error: ErrorFactory,
        *,
        text_scalars: bool,
        merge_keys: bool,
        document: str,
        max_nodes: int,
        max_depth: int,
        check_key: Callable[[Loc, Site], None] | None,
    ) -> None:
        self.sites: dict[Loc, Site] = {}
        self._error = error
        self._text_scalars = text_scalars
        self._merge_keys = merge_keys
        self._document = document
        self._max_nodes = max_nodes
        self._max_depth = max_depth
        self._check_key = check_key
        self._visited = 0
        self._open: set[int] = set()  # ids of the collections being built: alias cycles
        self._constructor = yaml.constructor.SafeConstructor()

    def _fail(self, node: yaml.Node, loc: Loc, message: str) -> Exception:
        return self._error(YamlProblem(node.start_mark.line + 1, loc, message))

    def _enter(self, node: yaml.Node, loc: Loc, depth: int) -> None:
        self._visited += 1
        if self._visited > self._max_nodes:
            raise self._fail(
                node,
                loc,
                f"the document expands to more than {self._max_nodes} YAML nodes (aliases?)",
            )
        if depth > self._max_depth:
            raise self._fail(node, loc, f"nested more than {self._max_depth} levels deep")
        if id(node) in self._open:
            raise self._fail(node, loc, "an alias refers to a collection that contains it")

    def value(self, node: yaml.Node, loc: Loc, key_at: tuple[int, int], depth: int) -> object:
        self._enter(node, loc, depth)
        kind: Kind
        if isinstance(node, yaml.ScalarNode):
            value, kind = self._scalar(node, loc, as_text=self._text_scalars)
            self.sites[loc] = Site(*_position(node), *key_at, kind, node.value, _style(node))
            return value
        if isinstance(node, yaml.SequenceNode):
            kind = "seq"
            if node.tag != _SEQ_TAG:
                raise self._fail(node, loc, f"unsupported YAML tag {show(node.tag, _SHOW_MAX)}")
        elif isinstance(node, yaml.MappingNode):
            kind = "map"
            if node.tag != _MAP_TAG:
                raise self._fail(node, loc, f"unsupported YAML tag {show(node.tag, _SHOW_MAX)}")
        else:
            raise self._fail(node, loc, "unsupported YAML node")
        self.sites[loc] = Site(*_position(node), *key_at, kind, None, _style(node))
        self._open.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [
                    self.value(item, (*loc, index), _position(item), depth + 1)
                    for index, item in enumerate(node.value)
                ]
            mapping: dict[str, object] = {}
            for key, key_node, value_node in self._entries(node, loc, depth):
                self._checked(key_node, (*loc, key))
                mapping[key] = self.value(value_node, (*loc, key), _position(key_node), depth + 1)
            return mapping
        finally:
            self._open.discard(id(node))

    def _scalar(self, node: yaml.ScalarNode, loc: Loc, *, as_text: bool) -> tuple[object, Kind]:
        kind = _SCALAR_TAGS.get(node.tag)
        if kind is None:
            raise self._fail(node, loc, f"unsupported YAML tag {show(node.tag, _SHOW_MAX)}")
        # "\ud800" escapes make strings that cannot be encoded: in a path, an event or a
        # record they would fail far from here.
        if _SURROGATE_RE.search(node.value):
            raise self._fail(node, loc, "a string contains an unpaired surrogate (\\uD800-\\uDFFF)")
        if kind in ("str", "timestamp") or (as_text and kind != "null"):
            return str(node.value), kind
        try:
            return getattr(self._constructor, _CONSTRUCTORS[kind])(node), kind
        except (yaml.YAMLError, ArithmeticError, LookupError, TypeError, ValueError) as e:
            raise self._fail(
                node, loc, f"invalid {_KIND_WORDS[kind]} {show(node.value, _SHOW_MAX)}"
            ) from e

    def _entries(
        self, node: yaml.MappingNode, loc: Loc, depth: int
    ) -> list[tuple[str, yaml.Node, yaml.Node]]:
        """The entries of a mapping: its own keys, then keys merged in with ``<<`` that it
        does not have itself (the first merged mapping wins, as in PyYAML)."""
        if node.tag != _MAP_TAG:
            raise self._fail(node, loc, f"unsupported YAML tag {show(node.tag, _SHOW_MAX)}")
        own: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        merged: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        merge_seen = False
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag == _MERGE_TAG:
                if not self._merge_keys:
                    raise self._fail(
                        key_node, loc, f"merge keys ('<<') are not supported in {self._document}"
                    )
                if merge_seen:
                    raise self._fail(key_node, loc, "duplicate merge key '<<'")
                merge_seen = True
                for source in self._merge_sources(value_node, loc, depth):
                    for key, k_node, v_node in self._entries(source, loc, depth + 1):
                        merged.setdefault(key, (k_node, v_node))
                continue
            key = self._key(key_node, loc)
            if key in own:
                first = own[key][0].start_mark.line + 1
                raise self._fail(
                    key_node,
                    (*loc, key),
                    f"duplicate key {show(key, _SHOW_MAX)} (first at line {first})",
                )
            own[key] = (key_node, value_node)
        for key, pair in merged.items():
            own.setdefault(key, pair)
        return [(key, k_node, v_node) for key, (k_node, v_node) in own.items()]

    def _checked(self, key_node: yaml.Node, loc: Loc) -> None:
        if self._check_key is not None:
            at = _position(key_node)
            assert isinstance(key_node, yaml.ScalarNode)
            site = Site(*at, *at, "str", key_node.value, _style(key_node))
            self._check_key(loc, site)

    def _merge_sources(self, node: yaml.Node, loc: Loc, depth: int) -> list[yaml.MappingNode]:
        self._enter(node, loc, depth + 1)
        if isinstance(node, yaml.MappingNode):
            return [node]
        if isinstance(node, yaml.SequenceNode) and all(
            isinstance(item, yaml.MappingNode) for item in node.value
        ):
            return list(node.value)
        raise self._fail(node, loc, "a merge key '<<' takes a mapping or a list of mappings")

    def _key(self, node: yaml.Node, loc: Loc) -> str:
        if not isinstance(node, yaml.ScalarNode):
            raise self._fail(node, loc, "mapping keys must be strings, not lists or mappings")
        key, kind = self._scalar(node, loc, as_text=False)
        if not isinstance(key, str):
            raise self._fail(
                node,
                loc,
                f"mapping key {show(node.value, _SHOW_MAX)} is read by YAML as "
                f"{_KIND_NAMES[kind]}; keys must be strings: put it in quotes",
            )
        return key
