from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from buildcell.errors import ConfigError
from buildcell.units import format_size, parse_cpus, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("512M", 512 * 1024**2),
        ("512m", 512 * 1024**2),
        ("2GiB", 2 * 1024**3),
        ("2Gi", 2 * 1024**3),
        ("1.5g", int(1.5 * 1024**3)),
        ("1k", 1024),
        ("1kB", 1000),
        ("3MB", 3_000_000),
        ("1T", 1024**4),
        (" 10 M ", 10 * 1024**2),
        (77, 77),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "M", "lots", "-1", "0", "1.5.5G", "10 X", "1e3", True])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="invalid size"):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("90", 90), ("90s", 90), ("5m", 300), ("1h30m", 5400), ("250ms", 0.25), ("1.5s", 1.5),
     ("2h", 7200), (3, 3.0)],
)  # fmt: skip
def test_parse_duration(text: str, expected: float) -> None:
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "s", "5x", "m5", "-3", "0", "1h 30m", "nan", "inf", "5m5"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="invalid duration"):
        parse_duration(text)


def test_parse_cpus() -> None:
    assert parse_cpus("0.5") == 0.5
    assert parse_cpus("2") == 2.0
    for bad in ("0", "-1", "x", "0.001", "inf"):
        with pytest.raises(ConfigError):
            parse_cpus(bad)


def test_format_size() -> None:
    assert format_size(10) == "10 B"
    assert format_size(1536) == "1.5 KiB"
    assert format_size(3 * 1024**3) == "3.0 GiB"


@given(st.text(max_size=20))
def test_parse_size_only_raises_config_error(text: str) -> None:
    with contextlib.suppress(ConfigError):
        assert parse_size(text) > 0


@given(st.text(max_size=20))
def test_parse_duration_only_raises_config_error(text: str) -> None:
    with contextlib.suppress(ConfigError):
        assert parse_duration(text) > 0
