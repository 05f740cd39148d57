"""Secrets: only the step that asks gets one, nothing prints it, nothing keeps it."""

from __future__ import annotations

import base64
import json
import os
import re
import secrets as random_secrets
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
from tests.conftest import RunCLI, cli_env, derived_project

SECRET = "s3cr3t-" + random_secrets.token_hex(12) + '-"quoted"\\back'


def _spec(directory: Path, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "buildcell.yaml"
    path.write_text(text)
    return path


def _forms(value: str) -> list[bytes]:
    raw = value.encode()
    forms = [
        raw,
        raw.hex().encode(),
        raw.hex().upper().encode(),
        urllib.parse.quote(value, safe="").encode(),
        json.dumps(value)[1:-1].encode(),
    ]
    for k in range(3):
        encoded = base64.b64encode(b"x" * k + raw).decode()
        forms.append(encoded[4 * ((k + 2) // 3) + 2 : -4].encode())
    # UTF-16 as a Windows tool or a JS/Java program would dump it (each byte order; one
    # zero byte short at each end, whichever character comes next).
    forms += [value.encode("utf-16-le")[:-1], value.encode("utf-16-be")[1:]]
    return forms


_ESCAPES = re.compile(rb"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[()][0-9A-Za-z]|.)")


def _as_shown(data: bytes) -> bytes:
    """What a terminal shows of ``data``: escape sequences take no room on screen."""
    return _ESCAPES.sub(b"", data)


def _assert_absent(data: bytes, where: str) -> None:
    shown = _as_shown(data)
    for form in _forms(SECRET):
        assert form not in data, f"a form of the secret leaked into {where}"
        assert form not in shown, f"a form of the secret shows on a terminal from {where}"


PRINTS_EVERYTHING = r"""
version: 1
name: leaky
steps:
  - name: publish
    secrets: [token, {name: token2, env: TOKEN2}]
    run: |
      v=$(cat /run/secrets/token)
      printf 'raw: %s\n' "$v"
      printf 'env: %s\n' "$TOKEN2" >&2
      for p in "" x xx; do printf '%s%s' "$p" "$v" | base64 -w0; echo; done
      for p in "" x xx; do printf '%s%s' "$p" "$v" | base64 -w0 | tr '+/' '-_' | tr -d '='; echo; done
      printf '%s' "$v" | od -An -tx1 | tr -d ' \n'; echo
      printf '%s' "$v" | od -An -tx1 | tr -d ' \n' | tr a-f A-F; echo
      python3 -c 'import sys, urllib.parse, json; v=open("/run/secrets/token").read(); print(urllib.parse.quote(v, safe="")); print(json.dumps({"t": v})); print(urllib.parse.quote_plus(v))'
      printf '%s' "$v" | iconv -t UTF-16LE; echo
      printf '%s' "$v" | iconv -t UTF-16BE; echo
      python3 -c 'import sys; v=open("/run/secrets/token").read(); print("".join(f"\x1b[3{i % 7}m{c}" for i, c in enumerate(v)) + "\x1b[0m")'
      stat -c '%a %U' /run/secrets/token
  - name: snoop
    run: |
      ls -la /run/secrets 2>&1 || true
      env
      cat /proc/1/environ /proc/self/environ 2>/dev/null | tr '\0' '\n' || true
      grep -rs "s3cr3t" /run /tmp /home /workspace /etc /var /dev/shm 2>/dev/null | head -3 || true
      echo snooped
"""


@pytest.fixture
def secret_env() -> dict[str, str]:
    return {"TOKEN_SRC": SECRET, "TOKEN2_SRC": SECRET}


def test_secret_is_redacted_everywhere_and_only_in_its_step(
    bc: RunCLI, tmp_path: Path, state_root: Path, secret_env: dict[str, str]
) -> None:
    spec = _spec(tmp_path / "p", PRINTS_EVERYTHING)
    res = bc(
        "build",
        "-f",
        str(spec),
        "--secret",
        "token=env:TOKEN_SRC",
        "--secret",
        "token2=env:TOKEN2_SRC",
        cwd=tmp_path,
        env=secret_env,
    )
    assert res.returncode == 0, res.stderr
    out = (res.stdout + res.stderr).encode()
    _assert_absent(out, "the terminal")
    assert "[publish] raw: ***" in res.stdout
    assert "[publish] env: ***" in res.stderr
    assert "[publish] 400 builder" in res.stdout
    assert "[snoop] snooped" in res.stdout
    assert "/run/secrets" in res.stdout and "No such file" in res.stdout
    assert "TOKEN2" not in "\n".join(
        ln for ln in res.stdout.splitlines() if ln.startswith("[snoop]")
    )
    build_id = json.loads(bc("ls", "--project", derived_project(tmp_path / "p"), "--json").stdout)[
        0
    ]["id"]
    _assert_absent(
        bc("logs", "--project", derived_project(tmp_path / "p"), build_id).stdout.encode(),
        "the stored logs",
    )
    # Nothing under the state directory or the output directory holds the value.
    for root in (state_root, tmp_path):
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                _assert_absent(path.read_bytes(), str(path))
    events = (state_root / "state" / "builds" / build_id / "events.jsonl").read_text()
    mounts = [json.loads(x) for x in events.splitlines() if '"secret.mount"' in x]
    assert {(m["step"], m["secret"], m["delivery"]) for m in mounts} == {
        ("publish", "token", "file"),
        ("publish", "token2", "file+env"),
    }


def test_output_holding_a_secret_is_not_published(
    bc: RunCLI, tmp_path: Path, secret_env: dict[str, str]
) -> None:
    spec = _spec(
        tmp_path / "p",
        """
version: 1
name: exfil
steps:
  - name: copy
    secrets: [token]
    run: mkdir -p dist && base64 /run/secrets/token > dist/notes.txt && echo ok > dist/fine.txt
outputs: ["dist/*"]
""",
    )
    out = tmp_path / "out"
    res = bc(
        "build",
        "-f",
        str(spec),
        "--out",
        str(out),
        "--secret",
        "token=env:TOKEN_SRC",
        cwd=tmp_path,
        env=secret_env,
    )
    assert res.returncode == 125
    assert "output 'dist/notes.txt' contains the value of secret token" in res.stderr
    assert not out.exists() or list(out.rglob("*")) == []


def test_unbound_secret_stops_before_anything_runs(bc: RunCLI, tmp_path: Path) -> None:
    spec = _spec(
        tmp_path / "p",
        """
version: 1
name: unbound
steps: [{name: s, secrets: [pypirc], run: "touch /workspace/ran"}]
""",
    )
    res = bc("build", "-f", str(spec), cwd=tmp_path)
    assert res.returncode == 125
    assert "needs secret 'pypirc', which is not bound" in res.stderr
    assert "--secret pypirc=" in res.stderr
    assert json.loads(bc("ls", "--project", derived_project(tmp_path / "p"), "--json").stdout) == []


def test_binding_an_undeclared_secret_warns(
    bc: RunCLI, tmp_path: Path, secret_env: dict[str, str]
) -> None:
    spec = _spec(tmp_path / "p", "version: 1\nname: w\nsteps: [{name: s, run: 'true'}]\n")
    res = bc(
        "build", "-f", str(spec), "--secret", "extra=env:TOKEN_SRC", cwd=tmp_path, env=secret_env
    )
    assert res.returncode == 0
    assert "secret 'extra' is bound but no step declares it" in res.stderr


@pytest.mark.parametrize(
    ("binding", "env", "message"),
    [
        ("t=env:MISSING_VAR", {}, "environment variable MISSING_VAR is not set"),
        ("t=file:/nonexistent/secret", {}, "cannot read /nonexistent/secret"),
        ("t=env:SHORT", {"SHORT": "abc"}, "shorter than 4 bytes"),
        ("bad name=env:X", {}, "invalid secret name"),
        ("t=vault:x", {}, "expected env:VAR or file:PATH"),
    ],
)
def test_bad_bindings_are_125(
    bc: RunCLI, tmp_path: Path, binding: str, env: dict[str, str], message: str
) -> None:
    res = bc("run", "--secret", binding, "--", "true", cwd=tmp_path, env=env)
    assert res.returncode == 125
    assert message in res.stderr
    assert "abc" not in res.stderr


def test_run_secret_file_and_redaction(
    bc: RunCLI, tmp_path: Path, secret_env: dict[str, str]
) -> None:
    secret_file = tmp_path / "pypirc"
    secret_file.write_text(SECRET)
    res = bc(
        "run",
        "--secret",
        "pypirc=file:" + str(secret_file),
        "--secret",
        "token=env:TOKEN_SRC",
        "--",
        "sh",
        "-c",
        "cat /run/secrets/pypirc; echo; cat /run/secrets/token | base64; env",
        cwd=tmp_path,
        env=secret_env,
    )
    assert res.returncode == 0, res.stderr
    _assert_absent((res.stdout + res.stderr).encode(), "run's output")
    assert res.stdout.startswith("***")
    assert "TOKEN_SRC" not in res.stdout


def test_secret_values_never_appear_in_any_command_line(
    tmp_path: Path, state_root: Path, secret_env: dict[str, str]
) -> None:
    spec = _spec(
        tmp_path / "p",
        """
version: 1
name: argv
steps: [{name: s, secrets: [{name: token, env: TOKEN}], run: "sleep 2"}]
""",
    )
    env = cli_env(state_root / "state", **secret_env)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "buildcell",
            "build",
            "-f",
            str(spec),
            "--secret",
            "token=env:TOKEN_SRC",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    seen: list[str] = []

    def watch() -> None:
        while proc.poll() is None:
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    try:
                        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                    except OSError:
                        continue
                    if SECRET.encode() in cmdline:
                        seen.append(pid)
            time.sleep(0.05)

    t = threading.Thread(target=watch)
    t.start()
    assert proc.wait(timeout=60) == 0
    t.join()
    assert seen == []


def test_provenance_names_secrets_without_values(
    bc: RunCLI, tmp_path: Path, secret_env: dict[str, str]
) -> None:
    spec = _spec(
        tmp_path / "p",
        """
version: 1
name: prov
steps:
  - {name: s, secrets: [token], run: "mkdir -p d && echo built > d/a"}
outputs: ["d/*"]
""",
    )
    out = tmp_path / "out"
    res = bc(
        "build",
        "-f",
        str(spec),
        "--out",
        str(out),
        "--secret",
        "token=env:TOKEN_SRC",
        cwd=tmp_path,
        env=secret_env,
    )
    assert res.returncode == 0, res.stderr
    envelope = json.loads((out / "provenance.intoto.jsonl").read_text())
    statement = base64.b64decode(envelope["payload"])
    _assert_absent(statement, "the provenance")
    steps = json.loads(statement)["predicate"]["buildDefinition"]["internalParameters"]["steps"]
    assert steps[0]["secrets"] == ["token"]
