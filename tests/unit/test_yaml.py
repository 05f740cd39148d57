"""The one YAML reader: plain data, the site of every value, and what it refuses."""

from __future__ import annotations

import math
import textwrap
from typing import Any

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from buildcell._yaml import (
    MAX_DEPTH,
    Document,
    Loc,
    Site,
    YamlProblem,
    describe,
    field_path,
    read_yaml,
    typed_scalar,
)


class Refused(Exception):
    """The caller's own error type, made from a problem."""

    def __init__(self, problem: YamlProblem) -> None:
        super().__init__(problem.message)
        self.problem = problem


def read(text: str, **options: Any) -> Document:
    return read_yaml(textwrap.dedent(text), Refused, **options)


def refused(text: str, **options: Any) -> YamlProblem:
    with pytest.raises(Refused) as info:
        read(text, **options)
    return info.value.problem


# --- data and sites -------------------------------------------------------------------------


def test_data_and_the_site_of_every_value() -> None:
    doc = read("""\
        name: hello
        limits: {memory: 2GiB, pids: 10}
        steps:
          - name: 'build'
            run: |
              make
        empty:
        """)
    assert doc.data == {
        "name": "hello",
        "limits": {"memory": "2GiB", "pids": 10},
        "steps": [{"name": "build", "run": "make\n"}],
        "empty": None,
    }
    assert doc.sites[()] == Site(1, 1, 1, 1, "map", None, "block")
    assert doc.sites[("name",)] == Site(1, 7, 1, 1, "str", "hello", None)
    assert doc.sites[("limits",)] == Site(2, 9, 2, 1, "map", None, "flow")
    assert doc.sites[("limits", "pids")] == Site(2, 30, 2, 24, "int", "10", None)
    assert doc.sites[("steps", 0)] == Site(4, 5, 4, 5, "map", None, "block")
    assert doc.sites[("steps", 0, "name")] == Site(4, 11, 4, 5, "str", "build", "'")
    assert doc.sites[("steps", 0, "run")] == Site(5, 10, 5, 5, "str", "make\n", "|")
    assert doc.sites[("empty",)].kind == "null"
    assert doc.sites[("empty",)].key_line == 7
    assert set(doc.sites) == {
        (),
        ("name",),
        ("limits",),
        ("limits", "memory"),
        ("limits", "pids"),
        ("steps",),
        ("steps", 0),
        ("steps", 0, "name"),
        ("steps", 0, "run"),
        ("empty",),
    }


def test_site_falls_back_to_the_longest_known_prefix() -> None:
    doc = read("a:\n  b: [1]\n")
    assert doc.site(("a", "b", 0)) == doc.sites[("a", "b", 0)]
    assert doc.site(("a", "b", 5, "x")) == doc.sites[("a", "b")]
    assert doc.site(("nope",)) == doc.sites[()]


def test_plain_tells_whether_yaml_may_have_retyped_a_scalar() -> None:
    doc = read("a: yes\nb: 'yes'\nc: [1]\n")
    assert doc.sites[("a",)].plain
    assert not doc.sites[("b",)].plain
    assert not doc.sites[("c",)].plain


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n"])
def test_an_empty_document(text: str) -> None:
    doc = read(text)
    assert doc.data is None
    assert doc.sites[()].text == ""
    assert doc.sites[()].kind == "null"


def test_null_is_not_the_empty_document() -> None:
    doc = read("~\n")
    assert doc.data is None
    assert doc.sites[()].text == "~"


# --- scalars --------------------------------------------------------------------------------

SCALARS = "a: no\nb: 0x10\nc: 1.5\nd: ~\ne: 2024-01-01\nf: '7'\ng: =\nh: .inf\n"


def test_typed_scalars() -> None:
    doc = read(SCALARS)
    assert doc.data == {
        "a": False,
        "b": 16,
        "c": 1.5,
        "d": None,
        "e": "2024-01-01",  # timestamps stay strings
        "f": "7",
        "g": "=",
        "h": math.inf,
    }
    kinds = {key: doc.sites[(key,)].kind for key in "abcdefgh"}
    assert kinds == {
        "a": "bool",
        "b": "int",
        "c": "float",
        "d": "null",
        "e": "timestamp",
        "f": "str",
        "g": "str",
        "h": "float",
    }


def test_text_scalars_keep_what_was_written_and_what_yaml_would_read() -> None:
    doc = read(SCALARS, scalars="text")
    assert doc.data == {
        "a": "no",
        "b": "0x10",
        "c": "1.5",
        "d": None,
        "e": "2024-01-01",
        "f": "7",
        "g": "=",
        "h": ".inf",
    }
    assert doc.sites[("a",)].kind == "bool"
    assert typed_scalar(doc.sites[("b",)]) == 16
    assert typed_scalar(doc.sites[("a",)]) is False
    assert typed_scalar(doc.sites[("e",)]) == "2024-01-01"


def test_typed_scalar_refuses_what_is_not_a_valid_scalar() -> None:
    doc = read("a: !!int twelve\nb: [1]\n", scalars="text")
    with pytest.raises(ValueError, match="invalid integer 'twelve'"):
        typed_scalar(doc.sites[("a",)])
    with pytest.raises(ValueError, match="not a scalar"):
        typed_scalar(doc.sites[("b",)])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: !!int twelve\n", "invalid integer 'twelve'"),
        ("a: !!float x\n", "invalid number 'x'"),
        ("a: !!bool maybe\n", "invalid boolean 'maybe'"),
    ],
)
def test_invalid_typed_scalars(text: str, message: str) -> None:
    problem = refused(text)
    assert (problem.line, problem.loc, problem.message) == (1, ("a",), message)


def test_describe_and_field_path() -> None:
    assert describe("map") == "a mapping"
    assert describe("seq") == "a list"
    assert describe("null") == "null"
    assert describe("timestamp") == "a date"
    assert field_path(()) == ""
    assert field_path(("steps", 1, "limits", "timeout")) == "steps[1].limits.timeout"
    assert field_path(("env", "A-B")) == "env['A-B']"
    assert field_path(("env", "A\nB")) == "env['A\\nB']"
    assert field_path((0, "a")) == "[0].a"


# --- merge keys -----------------------------------------------------------------------------

MERGE = """\
    base: &base {memory: 1G, timeout: 5m}
    more: &more {timeout: 9m, pids: 3}
    limits:
      <<: [*base, *more]
      timeout: 1m
    """


def test_merge_keys_when_allowed() -> None:
    doc = read(MERGE, merge_keys=True)
    assert isinstance(doc.data, dict)
    # Own keys win, then the first merged mapping that has the key.
    assert doc.data["limits"] == {"timeout": "1m", "memory": "1G", "pids": 3}
    assert list(doc.data["limits"]) == ["timeout", "memory", "pids"]
    # A merged value's site is where it was written.
    assert doc.sites[("limits", "memory")].line == 1
    assert doc.sites[("limits", "pids")].line == 2


def test_merge_keys_are_refused_unless_allowed() -> None:
    problem = refused(MERGE, document="a policy")
    assert (problem.line, problem.loc) == (4, ("limits",))
    assert problem.message == "merge keys ('<<') are not supported in a policy"


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("a: {<<: 1}\n", 1, "a merge key '<<' takes a mapping or a list of mappings"),
        ("a: {<<: [{b: 1}, 2]}\n", 1, "a merge key '<<' takes a mapping or a list of mappings"),
        ("a:\n  <<: {b: 1}\n  <<: {c: 1}\n", 3, "duplicate merge key '<<'"),
        ("a: &a {<<: *a}\n", 1, "an alias refers to a collection that contains it"),
    ],
)
def test_bad_merge_keys(text: str, line: int, message: str) -> None:
    problem = refused(text, merge_keys=True)
    assert (problem.line, problem.message) == (line, message)


# --- what is refused ------------------------------------------------------------------------

REFUSED = [
    pytest.param(
        "a: 1\nb: 2\na: 3\n", 3, ("a",), "duplicate key 'a' (first at line 1)", id="duplicate"
    ),
    pytest.param(
        "x:\n  - {k: 1, k: 2}\n",
        2,
        ("x", 0, "k"),
        "duplicate key 'k' (first at line 2)",
        id="duplicate-nested",
    ),
    pytest.param(
        "1: x\n",
        1,
        (),
        "mapping key '1' is read by YAML as an integer; keys must be strings: put it in quotes",
        id="int-key",
    ),
    pytest.param(
        "a: {on: x}\n", 1, ("a",), "mapping key 'on' is read by YAML as a boolean", id="bool-key"
    ),
    pytest.param("? ~\n: x\n", 1, (), "mapping key '~' is read by YAML as null", id="null-key"),
    pytest.param(
        "? [a]\n: x\n", 1, (), "mapping keys must be strings, not lists or mappings", id="list-key"
    ),
    pytest.param(
        "? {a: b}\n: x\n",
        1,
        (),
        "mapping keys must be strings, not lists or mappings",
        id="map-key",
    ),
    pytest.param(
        "a: !!set {b: null}\n",
        1,
        ("a",),
        "unsupported YAML tag 'tag:yaml.org,2002:set'",
        id="set",
    ),
    pytest.param(
        "a: !!binary aGk=\n",
        1,
        ("a",),
        "unsupported YAML tag 'tag:yaml.org,2002:binary'",
        id="binary",
    ),
    pytest.param(
        "a: !!omap [{b: 1}]\n",
        1,
        ("a",),
        "unsupported YAML tag 'tag:yaml.org,2002:omap'",
        id="omap",
    ),
    pytest.param("a: !custom x\n", 1, ("a",), "unsupported YAML tag '!custom'", id="custom"),
    pytest.param(
        "a: !!python/object/apply:os.system [ls]\n",
        1,
        ("a",),
        "unsupported YAML tag",
        id="python",
    ),
    pytest.param("!x {a: 1}\n", 1, (), "unsupported YAML tag '!x'", id="tagged-mapping"),
    pytest.param(
        'a: "\\ud800"\n',
        1,
        ("a",),
        "a string contains an unpaired surrogate (\\uD800-\\uDFFF)",
        id="surrogate",
    ),
    pytest.param(
        '"\\udfff": x\n', 1, (), "a string contains an unpaired surrogate", id="surrogate-key"
    ),
    pytest.param(
        "a: &a [*a]\n",
        1,
        ("a", 0),
        "an alias refers to a collection that contains it",
        id="alias-cycle",
    ),
    pytest.param("a: *nope\n", 1, (), "invalid YAML: found undefined alias 'nope'", id="alias"),
]


@pytest.mark.parametrize(("text", "line", "loc", "message"), REFUSED)
def test_refused(text: str, line: int, loc: Loc, message: str) -> None:
    for scalars in ("typed", "text"):
        problem = refused(text, scalars=scalars, merge_keys=True)
        assert problem.line == line
        assert problem.loc == loc
        assert problem.message.startswith(message), problem.message
        assert not problem.syntax or problem.message.startswith("invalid YAML")


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("a: b: c\n", 1, "invalid YAML: mapping values are not allowed here"),
        ("a: [x\nb: 1\n", 2, "invalid YAML: expected ',' or ']'"),
        ("a: 1\n\tb: 2\n", 2, "invalid YAML:"),
        (
            "a: 1\n---\nb: 2\n",
            2,
            "invalid YAML: expected a single document in the stream at line 1, but found "
            "another document",
        ),
    ],
)
def test_syntax_errors(text: str, line: int, message: str) -> None:
    with pytest.raises(Refused) as info:
        read_yaml(text, Refused)
    problem = info.value.problem
    assert (problem.line, problem.loc, problem.syntax) == (line, (), True)
    assert problem.message.startswith(message), problem.message
    assert isinstance(info.value.__cause__, yaml.YAMLError)


def test_bad_characters_are_not_a_syntax_error() -> None:
    problem = refused("a: 1\nb: \x07\n")
    assert (problem.line, problem.syntax) == (2, False)
    assert problem.message.startswith("invalid YAML: unacceptable character #x0007")


def test_aliases_are_bounded_after_expansion() -> None:
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for n in range(1, 4):
        lines.append(f"{chr(97 + n)}: &{chr(97 + n)} [{', '.join(['*' + chr(96 + n)] * 10)}]")
    text = "\n".join(lines) + "\n"
    read_yaml(text, Refused)  # 12 345 nodes once the aliases are expanded
    problem = refused(text, max_nodes=10_000)
    assert problem.message == "the document expands to more than 10000 YAML nodes (aliases?)"


def test_nesting_is_bounded_with_a_line_and_no_recursion_error() -> None:
    problem = refused("a:\n  b: " + "[" * 100_000)
    assert problem.message == f"nested more than {MAX_DEPTH} levels deep"
    assert problem.line == 2
    read("x: " + "[" * 64 + "]" * 64 + "\n")
    problem = refused("x: " + "[" * 65 + "]" * 65 + "\n")
    assert problem.message == f"nested more than {MAX_DEPTH} levels deep"
    problem = refused("x: [[[1]]]\n", max_depth=2)
    assert problem.message == "nested more than 2 levels deep"


def test_nesting_through_aliases_is_bounded_too() -> None:
    text = "a: &a [[1]]\nb: [[*a]]\n"
    read_yaml(text, Refused, max_depth=5)
    problem = refused(text, max_depth=4)
    assert problem.message == "nested more than 4 levels deep"
    assert problem.loc == ("b", 0, 0, 0, 0)


def test_the_callers_error_is_raised() -> None:
    class Mine(Exception):
        pass

    def error(problem: YamlProblem) -> Exception:
        return Mine(f"f.yaml:{problem.line}: {problem.message}")

    with pytest.raises(Mine, match=r"^f\.yaml:2: duplicate key 'a'"):
        read_yaml("a: 1\na: 2\n", error)


# --- checking keys as they are read --------------------------------------------------------


def test_check_key_sees_each_key_in_file_order_before_its_value() -> None:
    seen: list[tuple[Loc, int]] = []

    def check_key(loc: Loc, site: Site) -> None:
        seen.append((loc, site.line))
        if loc[-1] == "stop":
            raise Refused(YamlProblem(site.line, loc, "stopped"))

    text = "a: 1\nb:\n  - c: 2\n    d: 3\nstop: {e: *x}\n"
    with pytest.raises(Refused, match="stopped"):
        read_yaml(text.replace("*x", "1"), Refused, check_key=check_key)
    assert seen == [
        (("a",), 1),
        (("b",), 2),
        (("b", 0, "c"), 3),
        (("b", 0, "d"), 4),
        (("stop",), 5),
    ]
    # The undefined alias is a syntax error found before any key is read.
    seen.clear()
    with pytest.raises(Refused, match="undefined alias"):
        read_yaml(text, Refused, check_key=check_key)
    assert seen == []


def test_check_key_sees_merged_keys() -> None:
    seen: list[Loc] = []
    read_yaml(
        "m: &m {a: 1, b: 2}\nn: {<<: *m, b: 3}\n",
        Refused,
        merge_keys=True,
        check_key=lambda loc, site: seen.append(loc),
    )
    assert seen == [("m",), ("m", "a"), ("m", "b"), ("n",), ("n", "b"), ("n", "a")]


# --- any text at all ------------------------------------------------------------------------

OPTIONS = st.fixed_dictionaries(
    {
        "scalars": st.sampled_from(["typed", "text"]),
        "merge_keys": st.booleans(),
        "max_nodes": st.sampled_from([50, 100_000]),
        "max_depth": st.sampled_from([3, 64]),
    }
)
YAMLISH = st.text(
    alphabet=st.sampled_from([*"ab:-[]{}&*!<>|'\"#?,\n \t~.01\\u", "\ud800", "\x07"]),
    max_size=60,
)


def _check_document(doc: Document, text: str) -> None:
    assert () in doc.sites
    lines = text.count("\n") + 2
    for loc, site in doc.sites.items():
        assert 1 <= site.line <= lines, (loc, site)
        assert 1 <= site.key_line <= site.line or loc == (), (loc, site)
    _check_locations(doc.data, (), doc)


def _check_locations(value: object, loc: Loc, doc: Document) -> None:
    assert loc in doc.sites, loc
    if isinstance(value, dict):
        assert doc.sites[loc].kind == "map"
        for key, item in value.items():
            assert isinstance(key, str)
            _check_locations(item, (*loc, key), doc)
    elif isinstance(value, list):
        assert doc.sites[loc].kind == "seq"
        for index, item in enumerate(value):
            _check_locations(item, (*loc, index), doc)
    else:
        assert value is None or isinstance(value, str | int | float | bool)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(), YAMLISH), OPTIONS)
@example("a: &a [*a]", {})
@example("{[: ]}", {})
@example("!!binary x", {})
@example("!!int", {})
@example("? - a\n", {})
@example("x: !!float nan\n", {})
@example("a: &a {<<: *a}", {"merge_keys": True})
@example("[" * 2000, {})
def test_any_text_gives_a_document_or_the_callers_error(text: str, options: Any) -> None:
    try:
        doc = read_yaml(text, Refused, **options)
    except Refused as e:
        problem = e.problem
        assert "\n" not in problem.message
        assert problem.line is None or 1 <= problem.line <= text.count("\n") + 2
        return
    _check_document(doc, text)


def _no_nan(value: object) -> bool:
    if isinstance(value, float):
        return not math.isnan(value)
    if isinstance(value, list):
        return all(_no_nan(v) for v in value)
    if isinstance(value, dict):
        return all(_no_nan(v) for v in value.values())
    return True


plain_data = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=25,
)


@given(plain_data, st.booleans())
def test_round_trip_of_typed_data(value: object, flow: bool) -> None:
    text = yaml.safe_dump(value, default_flow_style=flow)
    doc = read_yaml(text, Refused)
    assert doc.data == value
    _check_document(doc, text)


text_data = st.recursive(
    st.none() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=25,
)


@given(text_data)
def test_round_trip_of_text_data(value: object) -> None:
    text = yaml.safe_dump(value)
    doc = read_yaml(text, Refused, scalars="text")
    assert doc.data == value


@given(plain_data)
def test_text_scalars_are_what_typed_scalars_were_read_from(value: object) -> None:
    text = yaml.safe_dump(value)
    typed = read_yaml(text, Refused)
    as_text = read_yaml(text, Refused, scalars="text")
    assert typed.sites == as_text.sites
    for loc, site in typed.sites.items():
        if site.text is not None and site.kind != "null":
            assert typed_scalar(site) == _at(typed.data, loc) or not _no_nan(_at(typed.data, loc))
            assert _at(as_text.data, loc) == site.text


def _at(value: Any, loc: Loc) -> Any:
    for part in loc:
        value = value[part]
    return value
