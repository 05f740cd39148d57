"""Egress denials explain themselves, and operator pins reach internal mirrors, exactly.

Through the CLI, in real cells, against an HTTP origin on the host's loopback: ``--add-host
NAME:127.0.0.1`` makes NAME resolve to a non-public address, as an internal mirror's name
does. A denial is printed once per destination as it happens, with its reason and what
would allow it, and the egress table, ``show``, ``show --json`` and ``logs`` say the same.
A pin the operator allowed (``--add-host NAME:ADDRESS --allow NAME``) reaches exactly that
name at that address; every other way to that address stays closed, and says why.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import RunCLI, cli_env, read_events
from tests.netservers import http_origin

LOOPBACK = "resolves to 127.0.0.1 (loopback); a name entry never reaches it"


def _spec(where: Path, run: str, allow: list[str]) -> None:
    where.mkdir(exist_ok=True)
    (where / "buildcell.yaml").write_text(
        "version: 1\nname: egress\nsteps:\n  - name: fetch\n"
        f"    run: {json.dumps(run)}\n"
        f"    network: {{allow: {json.dumps(allow)}}}\n"
    )


def _denials(text: str) -> list[str]:
    return [line for line in text.splitlines() if "egress denied:" in line]


def _retries(url: str, n: int = 3, *curl: str) -> str:
    """A client that retries quietly, as npm and pip do."""
    flags = " ".join(curl)
    return f"for i in $(seq {n}); do curl -sS {flags} {url} || true; done"


def test_a_build_prints_a_denial_once_as_it_happens_and_every_view_says_why(
    bc: RunCLI, state_root: Path, tmp_path: Path
) -> None:
    with http_origin("mirror") as origin:
        port = origin.port
        url = f"http://mirror.test:{port}/simple/"
        # The step allows the name; the operator pins it to loopback but grants nothing.
        _spec(tmp_path / "p", f"{_retries(url)}; sleep 4", [f"mirror.test:{port}"])
        argv = [sys.executable, "-m", "buildcell", "build", "--add-host", "mirror.test:127.0.0.1"]
        proc = subprocess.Popen(
            argv,
            cwd=tmp_path / "p",
            env=cli_env(state_root / "state"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stderr is not None
            early = []
            for line in proc.stderr:
                early.append(line)
                if "egress denied:" in line:
                    break
            # Live: while the step still runs (it sleeps after its retries).
            still_running = proc.poll() is None
            rest_err, out = proc.communicate(timeout=120)[::-1]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert still_running, "the denial was printed only after the step ended"
    assert proc.returncode == 0, rest_err + out
    assert origin.hits == []
    expected = (
        f"[fetch] egress denied: mirror.test:{port} — mirror.test {LOOPBACK}; "
        f"to allow: --add-host mirror.test:127.0.0.1 --allow mirror.test:{port}"
    )
    live = _denials("".join(early) + rest_err)
    assert live == [f"buildcell: {expected}"], "once per destination, not once per retry"

    # The summary's egress table: the row, then why.
    summary = out.splitlines()
    assert [f"mirror.test:{port}", "denied", "3"] in [x.split()[:3] for x in summary]
    assert expected.removeprefix("[fetch] ") in summary

    [build_id] = [p.name for p in (state_root / "state" / "builds").iterdir() if p.is_dir()]
    shown = bc("show", build_id, cwd=tmp_path / "p")
    assert shown.returncode == 0, shown.stderr
    assert expected.removeprefix("[fetch] ") in shown.stdout.splitlines()

    data = json.loads(bc("show", "--json", build_id, cwd=tmp_path / "p").stdout)
    [row] = data["egress"]
    assert row["destination"] == f"mirror.test:{port}"
    assert row["verdict"] == "denied" and row["requests"] == 3
    assert row["reason"] == f"mirror.test {LOOPBACK}"
    assert (row["allow_hint"], row["add_host_hint"]) == (
        f"mirror.test:{port}",
        "mirror.test:127.0.0.1",
    )

    logs = bc("logs", build_id, cwd=tmp_path / "p")
    assert logs.returncode == 0, logs.stderr
    assert _denials(logs.stdout) == [f"[fetch] buildcell: {expected.removeprefix('[fetch] ')}"]
    one = bc("logs", build_id, "--step", "fetch", cwd=tmp_path / "p")
    assert _denials(one.stdout) == []  # the step's own log stays the step's
    assert _denials(one.stderr) == [f"buildcell: {expected.removeprefix('[fetch] ')}"]


def test_run_prints_a_denial_once_with_the_pin_that_would_allow_it(
    bc: RunCLI, tmp_path: Path
) -> None:
    with http_origin("mirror") as origin:
        port = origin.port
        url = f"http://mirror.corp.test:{port}/"
        res = bc(
            "run",
            "--allow", f"*.corp.test:{port}",
            "--add-host", "mirror.corp.test:127.0.0.1",
            "--", "sh", "-c", _retries(url, 4),
            cwd=tmp_path,
        )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert origin.hits == []
    line = (
        f"egress denied: mirror.corp.test:{port} — mirror.corp.test {LOOPBACK}; to allow: "
        f"--add-host mirror.corp.test:127.0.0.1 --allow mirror.corp.test:{port}"
    )
    # Once live, once under the egress table; never "--allow 127.0.0.1".
    assert _denials(res.stderr) == [f"buildcell: {line}", line]
    assert "--allow 127.0.0.1" not in res.stderr
    assert [f"mirror.corp.test:{port}", "denied", "4"] in [
        x.split()[:3] for x in res.stderr.splitlines()
    ]


def test_an_operator_pin_reaches_exactly_its_name_in_a_build(bc: RunCLI, tmp_path: Path) -> None:
    with http_origin("mirror") as origin:
        port = origin.port
        run = (
            f"curl -sSf -o a.txt http://mirror.test:{port}/by-proxy"
            f" && curl -sSf --noproxy '*' -o b.txt http://mirror.test:{port}/direct"
        )
        _spec(tmp_path, run, [f"mirror.test:{port}"])
        res = bc(
            "build", "--add-host", "mirror.test:127.0.0.1", "--allow", f"mirror.test:{port}",
            "--json", cwd=tmp_path,
        )  # fmt: skip
    assert res.returncode == 0, res.stderr + res.stdout
    assert origin.hits == ["/by-proxy", "/direct"]
    # What arrived names the pinned name, whatever the cell sent.
    assert origin.hosts == [f"mirror.test:{port}"] * 2
    data = json.loads(res.stdout)
    assert [(r["destination"], r["verdict"]) for r in data["egress"]] == [
        (f"mirror.test:{port}", "allowed")
    ]
    assert _denials(res.stderr) == []


_SNI = """
import socket, ssl, sys
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
s = socket.create_connection(("mirror.test", int(sys.argv[1])), timeout=10)
try:
    ctx.wrap_socket(s, server_hostname="other.test")
except (ssl.SSLError, OSError) as e:
    print("tls refused:", type(e).__name__)
"""


def _attacks(port: int) -> str:
    """Every way but the pinned name's own toward the pinned address."""
    other = f"-H 'Host: other.test:{port}'"
    return "; ".join(
        [
            f"curl -sS -o /dev/null http://mirror.test:{port}/legit",
            # Another Host header: through the proxy, directly, and inside a tunnel.
            f"curl -sS {other} http://mirror.test:{port}/host-proxy",
            f"curl -sS --noproxy '*' {other} http://mirror.test:{port}/host-direct",
            f"curl -sS -p {other} http://mirror.test:{port}/host-tunnel",
            # CONNECT to the bare address (no_proxy lists 127.0.0.1: force the proxy).
            f"curl -sS -p --noproxy '' http://127.0.0.1:{port}/bare",
            # Another name that resolves to the same address.
            f"curl -sS http://admin.corp.test:{port}/sibling",
            # TLS to the pinned address naming another server.
            f"python3 -c '{_SNI}' {port}",
            "true",
        ]
    )


def test_a_pin_opens_no_other_way_to_its_address(bc: RunCLI, tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    with http_origin("mirror") as origin:
        port = origin.port
        res = bc(
            "run", "--events", str(events),
            "--add-host", "mirror.test:127.0.0.1", "--allow", f"mirror.test:{port}",
            "--add-host", "admin.corp.test:127.0.0.1", "--allow", f"*.corp.test:{port}",
            "--", "sh", "-c", _attacks(port),
            cwd=tmp_path,
        )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert origin.hits == ["/legit"]
    assert "tls refused" in res.stdout
    pinned = "; only mirror.test may be reached at 127.0.0.1, where the operator pinned it"
    denied = [
        (e["host"], e["reason"], e.get("allow_hint"))
        for e in read_events(events)
        if e["event"] == "net.deny"
    ]
    assert sorted(denied) == sorted(
        [
            *[("mirror.test", f"its Host header names other.test:{port}{pinned}", None)] * 3,
            (
                "127.0.0.1",
                f"127.0.0.1:{port} is not on the allowlist; the operator pinned mirror.test "
                "to it: connect by that name",
                None,
            ),
            ("admin.corp.test", f"admin.corp.test {LOOPBACK}", f"admin.corp.test:{port}"),
            ("mirror.test", f"the TLS server name is 'other.test'{pinned}", None),
        ]
    )
    # Live, once per destination; no hint offers the bare address (it would open every
    # name behind it), the sibling's is its own pin.
    live = [line for line in _denials(res.stderr) if line.startswith("buildcell: ")]
    assert [line.split(" — ")[0] for line in live] == [
        f"buildcell: egress denied: {d}:{port}"
        for d in ("mirror.test", "127.0.0.1", "admin.corp.test")
    ]
    assert "--allow 127.0.0.1" not in res.stderr
    assert (
        f"to allow: --add-host admin.corp.test:127.0.0.1 --allow admin.corp.test:{port}"
        in res.stderr
    )


def test_a_spec_cannot_grant_a_pinned_private_address(bc: RunCLI, tmp_path: Path) -> None:
    with http_origin("mirror") as origin:
        port = origin.port
        _spec(tmp_path, f"curl -sS http://127.0.0.1:{port}/x", [f"127.0.0.1:{port}"])
        res = bc("build", "--add-host", "mirror.test:127.0.0.1", cwd=tmp_path)
    assert res.returncode == 125
    [line, *_hint] = res.stderr.splitlines()
    assert line.startswith("buildcell: error: step 'fetch': network.allow:")
    assert origin.hits == []


def test_a_pin_needs_the_operators_own_allow_of_its_name(bc: RunCLI, tmp_path: Path) -> None:
    """The spec's allow names the pinned name; a wildcard of the operator's grants no pin."""
    with http_origin("mirror") as origin:
        port = origin.port
        _spec(
            tmp_path, _retries(f"http://mirror.corp.test:{port}/x", 2), [f"mirror.corp.test:{port}"]
        )
        res = bc(
            "build", "--add-host", "mirror.corp.test:127.0.0.1",
            "--allow", f"*.corp.test:{port}", cwd=tmp_path,
        )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert origin.hits == []
    assert _denials(res.stderr) == [
        f"buildcell: [fetch] egress denied: mirror.corp.test:{port} — mirror.corp.test "
        f"{LOOPBACK}; to allow: --add-host mirror.corp.test:127.0.0.1 --allow "
        f"mirror.corp.test:{port}"
    ]


def test_a_pin_the_spec_does_not_name_is_not_reached(bc: RunCLI, tmp_path: Path) -> None:
    with http_origin("mirror") as origin:
        port = origin.port
        _spec(
            tmp_path,
            _retries(f"http://mirror.test:{port}/x", 2),
            ["pkg.example.org:443"],
        )
        res = bc(
            "build", "--add-host", "mirror.test:127.0.0.1", "--allow", f"mirror.test:{port}",
            cwd=tmp_path,
        )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert origin.hits == []
    assert _denials(res.stderr) == [
        f"buildcell: [fetch] egress denied: mirror.test:{port} — mirror.test:{port} is not on "
        f"the allowlist; to allow: add mirror.test:{port} to the step's network.allow"
    ]


def test_denials_of_two_steps_are_each_told(bc: RunCLI, tmp_path: Path) -> None:
    (tmp_path / "buildcell.yaml").write_text(
        "version: 1\nname: two\nsteps:\n"
        + "".join(
            f"  - name: {name}\n    run: curl -s http://nope.example.org/ || true\n"
            "    network: {allow: ['pkg.example.org:443']}\n"
            for name in ("one", "two")
        )
    )
    started = time.monotonic()
    res = bc("build", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert time.monotonic() - started < 60
    assert [line.split(" — ")[0] for line in _denials(res.stderr)] == [
        "buildcell: [one] egress denied: nope.example.org:80",
        "buildcell: [two] egress denied: nope.example.org:80",
    ]


def test_a_damaged_egress_row_in_a_record_does_not_break_show(
    bc: RunCLI, state_root: Path, tmp_path: Path
) -> None:
    _spec(tmp_path, "curl -s http://nope.example.org/ || true", ["pkg.example.org:443"])
    assert bc("build", cwd=tmp_path).returncode == 0
    [record] = (state_root / "state" / "builds").glob("*/record.json")
    data = json.loads(record.read_text())
    [row] = data["steps"][0]["egress"]
    data["steps"][0]["egress"] = [{**row, "requests": "many"}, {"verdict": "denied"}, row]
    record.write_text(json.dumps(data))
    shown = bc("show", data["id"], cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "egress denied: nope.example.org:80 — nope.example.org:80 is not" in shown.stdout
    as_json = bc("show", "--json", data["id"], cwd=tmp_path)
    assert as_json.returncode == 0, as_json.stderr
    assert [r["destination"] for r in json.loads(as_json.stdout)["egress"]] == [
        "nope.example.org:80"
    ]
