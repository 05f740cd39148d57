from __future__ import annotations

from pathlib import Path

import pytest

from buildcell.errors import ConfigError
from buildcell.secrets import SecretBinding, parse_binding, resolve_bindings


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("token", SecretBinding("token", env="token")),
        ("token=env:GH_TOKEN", SecretBinding("token", env="GH_TOKEN")),
        ("pypirc=file:/etc/pypirc", SecretBinding("pypirc", file=Path("/etc/pypirc"))),
        ("a.b-c=env:X", SecretBinding("a.b-c", env="X")),
    ],
)
def test_parse_binding(text: str, expected: SecretBinding) -> None:
    assert parse_binding(text) == expected


def test_file_binding_expands_home() -> None:
    binding = parse_binding("k=file:~/.pypirc")
    assert binding.file == Path("~/.pypirc").expanduser()


@pytest.mark.parametrize(
    "text", ["", "1abc", "a b", "t=env:", "t=env:1X", "t=file:", "t=x:y", "t="]
)
def test_parse_binding_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_binding(text)


def test_resolve_reads_values_and_never_shows_them(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"file-value-1234")
    secrets = resolve_bindings(
        [SecretBinding("a", env="V"), SecretBinding("b", file=tmp_path / "f")],
        environ={"V": "env-value-5678"},
    )
    assert [s.name for s in secrets] == ["a", "b"]
    assert secrets[0].reveal() == b"env-value-5678"
    assert secrets[1].reveal() == b"file-value-1234"
    assert "value" not in repr(secrets) and "value" not in str(secrets[0])


def test_resolve_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not set"):
        resolve_bindings([SecretBinding("a", env="NOPE")], environ={})
    with pytest.raises(ConfigError, match="bound twice"):
        resolve_bindings(
            [SecretBinding("a", env="V"), SecretBinding("a", env="V")], environ={"V": "abcdef"}
        )
    with pytest.raises(ConfigError, match="cannot read") as e:
        resolve_bindings([SecretBinding("a", file=tmp_path / "missing")])
    assert "missing" in str(e.value)
    with pytest.raises(ConfigError, match="shorter than 4 bytes") as e2:
        resolve_bindings([SecretBinding("a", env="V")], environ={"V": "xyz"})
    assert "xyz" not in str(e2.value)
