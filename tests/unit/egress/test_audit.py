"""How a denial reads (the live line, the table, ``logs``), and the per-destination rows."""

from __future__ import annotations

from typing import Any

import pytest

from buildcell.egress.audit import Attempt, EgressStats, EgressSummaryRow, denial_line, hint_text


def _denied(host: str = "mirror.example.internal", **kw: Any) -> Attempt:
    fields: dict[str, Any] = {
        "mode": "proxy",
        "host": host,
        "port": 443,
        "allowed": False,
        "reason": f"{host} resolves to 10.0.0.5 (private); a name entry never reaches it",
        "suggestion": f"{host}:443",
        "add_host": f"{host}:10.0.0.5",
    }
    fields.update(kw)
    return Attempt(**fields)


def test_only_the_first_denial_of_a_destination_is_first() -> None:
    stats = EgressStats()
    assert stats.add(_denied())
    assert not stats.add(_denied(reason="a later reason"))
    assert stats.add(_denied("other.example.internal"))
    [mirror, other] = sorted(stats.rows(), key=lambda r: r.destination)
    assert (mirror.requests, other.requests) == (2, 1)
    assert mirror.reason is not None and mirror.reason.startswith(
        "mirror.example.internal resolves"
    )


def test_the_denial_line_says_reason_and_the_pin_to_allow_it() -> None:
    row = EgressStats()
    row.add(_denied())
    data = row.rows()[0].to_dict()
    expected = (
        "egress denied: mirror.example.internal:443 — mirror.example.internal resolves to "
        "10.0.0.5 (private); a name entry never reaches it; to allow: --add-host "
        "mirror.example.internal:10.0.0.5 --allow mirror.example.internal:443"
    )
    assert denial_line(data) == expected
    # The same from the event's fields.
    assert denial_line(_denied().event_fields()) == expected


def test_hints_for_a_step_say_where_the_entry_goes() -> None:
    assert hint_text("pypi.example.org:443", spec=True) == (
        "add pypi.example.org:443 to the step's network.allow"
    )
    assert hint_text("10.0.0.5:443", spec=True) == (
        "add 10.0.0.5:443 to the step's network.allow and grant it with --allow 10.0.0.5:443"
    )
    assert hint_text("pypi.example.org:443") == "--allow pypi.example.org:443"
    assert hint_text(None) is None


def test_a_denial_line_is_safe_for_a_terminal() -> None:
    line = denial_line({"host": "evil\x1b[2J.test", "port": 80, "reason": "x\ny"})
    assert "\x1b" not in line and "\n" not in line


@pytest.mark.parametrize(
    "row",
    [
        5,
        {"destination": "x:1", "verdict": "denied", "requests": "many"},
        {"destination": "x:1", "verdict": "maybe", "requests": 1},
        {"verdict": "denied"},
        {"destination": "x:1", "verdict": "denied", "requests": -1, "bytes_up": 0},
    ],
)
def test_a_damaged_row_is_a_value_error_and_left_out_of_a_record_summary(row: Any) -> None:
    good = EgressSummaryRow("a.example.org:443", True, 1).to_dict()
    with pytest.raises(ValueError, match="egress row"):
        EgressSummaryRow.from_dict(row)
    assert [r.destination for r in EgressStats.from_records([row, good])] == ["a.example.org:443"]


def test_rows_of_a_record_without_reasons_still_read() -> None:
    old = {
        "destination": "a.example.org:80",
        "verdict": "denied",
        "requests": 2,
        "bytes_up": 0,
        "bytes_down": 0,
        "errors": 0,
    }
    [row] = EgressStats.from_records([old, old])
    assert (row.requests, row.reason) == (4, None)
    assert denial_line(row.to_dict()) == "egress denied: a.example.org:80 — no reason recorded"


def test_the_denial_docs_example_is_what_buildcell_prints() -> None:
    """docs/egress.md shows a live denial line: it is the one this code makes."""
    import re
    from pathlib import Path

    from buildcell.allowlist import EgressPolicy, decide

    docs = (Path(__file__).parents[3] / "docs" / "egress.md").read_text()
    [shown] = re.findall(r"^buildcell: \[deps\] (egress denied: .*)$", docs, re.M)
    verdict = decide(
        EgressPolicy.from_strings(["pypi.example.internal:443"]),
        "pypi.example.internal",
        443,
        ["10.20.0.7"],
    )
    fields = {
        "host": "pypi.example.internal",
        "port": 443,
        "reason": verdict.reason,
        "allow_hint": verdict.suggestion,
        "add_host_hint": verdict.add_host,
    }
    assert denial_line(fields, spec=True) == shown


def test_every_allow_list_in_the_egress_docs_is_one_a_spec_may_write() -> None:
    import re
    from pathlib import Path

    import yaml

    from buildcell.allowlist import parse_allow, spec_entry_problem

    docs = (Path(__file__).parents[3] / "docs" / "egress.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", docs, re.S)
    lists = []
    for block in blocks:
        data = yaml.safe_load(block)
        network = data["network"] if "network" in data else data["steps"][0]["network"]
        lists.append(network["allow"])
    assert len(lists) >= 6  # one per client, and the pin's step
    for entries in lists:
        for text in entries:
            assert "example." in text  # placeholders only
            assert spec_entry_problem(parse_allow(text)) is None
