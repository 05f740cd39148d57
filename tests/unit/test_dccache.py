"""Dataclass methods compiled once and kept (buildcell._dccache): the same classes as
without it, other packages' kept in buildcell's own directory, and a cache that is not
ours never runs. Each case is its own interpreter,
as the command is."""

from __future__ import annotations

import json
import marshal
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SRC = str(Path(__file__).resolve().parents[2] / "src")

#: Classes of every kind the generated methods take: defaults, factories, frozen, order,
#: keyword-only, slots, InitVar, post-init; what each does is printed as JSON.
PROBE = r"""
import json, sys, types
from pathlib import Path
from buildcell import _dccache
if sys.argv[2] == "cached":
    _dccache.install()
# The classes live in a module of buildcell's, whose file is in the test's directory (its
# kept methods go to that directory's __pycache__), or in another module (argv[3]), whose
# go to argv[4] in place of buildcell's own __pycache__/dataclasses.
name = sys.argv[3] if len(sys.argv) > 3 else "buildcell._dcprobe"
if len(sys.argv) > 4:
    _dccache._OTHERS = Path(sys.argv[4])
module = types.ModuleType(name)
module.__file__ = sys.argv[1]
sys.modules[module.__name__] = module
exec(compile(CLASSES, sys.argv[1], "exec"), module.__dict__)
cache = _dccache._modules.get(module.__name__)
out = module.out
out["new"] = len(cache.new) if cache else 0
out["cached"] = len(cache.codes) if cache else 0
print(json.dumps(out))
"""

CLASSES = r"""
from __future__ import annotations
import dataclasses, inspect
from dataclasses import dataclass, field, InitVar, KW_ONLY

@dataclass(frozen=True, order=True)
class A:
    x: int
    y: str = "y"
    z: tuple[int, ...] = ()

@dataclass
class B:
    a: list[int] = field(default_factory=list)
    _: KW_ONLY
    k: int = 3
    seed: InitVar[int] = 0
    def __post_init__(self, seed: int) -> None:
        self.a.append(seed)

@dataclass(slots=True, eq=False)
class C:
    p: float
    q: dict[str, int] = field(default_factory=dict, repr=False)

out = {}
a = A(1)
try:
    a.x = 2
    out["frozen"] = False
except dataclasses.FrozenInstanceError:
    out["frozen"] = True
out["a"] = [repr(a), a == A(1), a < A(2), hash(a) == hash(A(1))]
b = B(k=5, seed=7)
out["b"] = [repr(b), b.a, B() == B(), B().a is not B().a]
c = C(1.5)
out["c"] = [repr(c), c == C(1.5), hasattr(c, "__dict__")]
for cls in (A, B, C):
    out[cls.__name__ + ".sig"] = str(inspect.signature(cls))
    out[cls.__name__ + ".ann"] = repr(cls.__init__.__annotations__)
"""


def _probe(cache: Path, mode: str, *, write: bool = True) -> dict[str, Any]:
    """Make the classes with the cache installed (or not, ``plain``); ``cache`` is the
    file its methods are kept in."""
    source = cache.parent.parent / "dcprobe.py"
    assert (
        cache
        == source.parent / "__pycache__" / f"dcprobe.{sys.implementation.cache_tag}.dataclasses"
    )
    run = subprocess.run(
        [sys.executable, "-c", f"CLASSES = {CLASSES!r}\n" + PROBE, str(source), mode],
        env=_env(write=write),
        capture_output=True,
        text=True,
        check=True,
    )
    out: dict[str, Any] = json.loads(run.stdout)
    return out


def _env(*, write: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    if not write:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    return dict(env, PYTHONPATH=SRC)


def _same(x: dict[str, Any], y: dict[str, Any]) -> bool:
    def strip(d: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if k not in ("new", "cached")}

    return strip(x) == strip(y)


def test_classes_are_the_same_with_the_cache_cold_and_warm(tmp_path: Path) -> None:
    cache = tmp_path / "__pycache__" / f"dcprobe.{sys.implementation.cache_tag}.dataclasses"
    plain = _probe(cache, "plain")
    assert plain["frozen"] is True and plain["new"] == 0
    cold = _probe(cache, "cached")
    assert cold["new"] > 0 and cache.exists()
    warm = _probe(cache, "cached")
    assert warm["new"] == 0 and warm["cached"] == cold["new"]  # nothing compiled again
    assert _same(plain, cold) and _same(plain, warm), (plain, cold, warm)


def test_like_bytecode_it_is_read_but_not_written_under_dont_write_bytecode(
    tmp_path: Path,
) -> None:
    cache = tmp_path / "__pycache__" / f"dcprobe.{sys.implementation.cache_tag}.dataclasses"
    _probe(cache, "cached", write=False)
    assert not cache.exists()
    cold = _probe(cache, "cached")
    warm = _probe(cache, "cached", write=False)
    assert cold["new"] > 0 and warm["new"] == 0


@pytest.mark.parametrize(
    "how", ["writable by others", "another owner", "garbage", "not a dict", "system error", "fifo"]
)
def test_a_cache_that_is_not_ours_or_is_damaged_is_not_used(tmp_path: Path, how: str) -> None:
    """Code in a cache anyone could have written never runs: each of its entries would
    replace a method of buildcell's classes."""
    cache = tmp_path / "__pycache__" / f"dcprobe.{sys.implementation.cache_tag}.dataclasses"
    _probe(cache, "cached")
    entries = marshal.loads(cache.read_bytes())  # noqa: S302 - the one just written
    flag = tmp_path / "pwned"
    evil = compile(f"open({str(flag)!r}, 'w').close()\ndef __create_fn__(**kw): pass", "x", "exec")
    if how == "writable by others":
        cache.write_bytes(marshal.dumps(dict.fromkeys(entries, evil)))
        os.chmod(cache, 0o666)
    elif how == "another owner":
        if os.geteuid() != 0:
            pytest.skip("needs root to give the file away")
        cache.write_bytes(marshal.dumps(dict.fromkeys(entries, evil)))
        os.chown(cache, 12345, 12345)
    elif how == "garbage":
        cache.write_bytes(os.urandom(4096))
    elif how == "system error":
        # Bytes some damage gives, on which marshal raises SystemError, not ValueError.
        cache.write_bytes(_system_error_blob(cache.read_bytes()))
    elif how == "fifo":
        cache.unlink()
        os.mkfifo(cache, 0o600)  # a start must not wait on it
    else:
        cache.write_bytes(marshal.dumps([evil]))
    again = _probe(cache, "cached")
    assert not flag.exists()
    assert again["frozen"] is True and again["new"] == len(entries)


def _system_error_blob(data: bytes) -> bytes:
    rng = random.Random(1)
    for _ in range(20000):
        damaged = bytearray(data)
        for _ in range(3):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        try:
            marshal.loads(bytes(damaged))  # noqa: S302 - probing our own damaged bytes
        except SystemError:
            return bytes(damaged)
        except Exception:  # noqa: S112 - any other error: try another damage
            continue
    pytest.skip("no damage of this cache makes marshal raise SystemError")


def _probe_other(tmp_path: Path, name: str, mode: str = "cached") -> dict[str, Any]:
    others = tmp_path / "others"
    run = subprocess.run(
        [sys.executable, "-c", f"CLASSES = {CLASSES!r}\n" + PROBE, str(tmp_path / "mod.py"),
         mode, name, str(others)],
        env=_env(write=True),
        capture_output=True,
        text=True,
        check=True,
    )  # fmt: skip
    out: dict[str, Any] = json.loads(run.stdout)
    return out


def test_another_package_s_classes_are_kept_in_buildcell_s_directory_not_theirs(
    tmp_path: Path,
) -> None:
    name = "somelib.models"
    plain = _probe_other(tmp_path, name, "plain")
    cold = _probe_other(tmp_path, name)
    warm = _probe_other(tmp_path, name)
    kept = tmp_path / "others" / f"{name}.{sys.implementation.cache_tag}.dataclasses"
    assert kept.is_file()
    assert not (tmp_path / "__pycache__").exists()  # nothing beside the module's file
    assert cold["new"] > 0 and warm["new"] == 0 and warm["cached"] == cold["new"]
    assert _same(plain, cold) and _same(plain, warm)


@pytest.mark.parametrize("name", ["__main__x/../../evil", "<string>", ".hidden", "a b"])
def test_a_module_whose_name_is_no_plain_file_name_is_not_kept(tmp_path: Path, name: str) -> None:
    out = _probe_other(tmp_path, name)
    assert out["new"] == 0 and out["cached"] == 0
    assert not (tmp_path / "others").exists()


def test_the_command_installs_it() -> None:
    run = subprocess.run(
        [sys.executable, "-c", "import dataclasses, buildcell.cli; "
         "print(getattr(dataclasses._create_fn, '_buildcell_cached', False))"],
        env=dict(os.environ, PYTHONPATH=SRC),
        capture_output=True,
        text=True,
        check=True,
    )  # fmt: skip
    assert run.stdout.strip() == str(sys.version_info[:2] == (3, 11))
