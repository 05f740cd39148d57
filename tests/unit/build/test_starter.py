from __future__ import annotations

from pathlib import Path

from buildcell.build.starter import starter_spec


def test_starter_spec_kinds(tmp_path: Path) -> None:
    from buildcell.build.spec import parse_spec

    proj = tmp_path / "My Project!"
    proj.mkdir()
    text, kind = starter_spec(proj)
    assert kind == "generic"
    assert parse_spec(text, path=proj / "buildcell.yaml").spec.name == "my-project"
    (proj / "Makefile").write_text("all:\n\tcc x.c\ntest:\n\t./x\n")
    text, kind = starter_spec(proj)
    assert kind == "Makefile"
    spec = parse_spec(text, path=proj / "buildcell.yaml").spec
    assert [s.run for s in spec.steps] == ["make -j2", "make test"]
