"""Network policy from the command line and from a spec: flags, steps, summary, provenance.

Also: real clients (git, npm, pip) through the proxy unchanged, rootless, with --disk.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import RootlessCLI, RunCLI, read_events
from tests.netservers import http_origin


def _allow(port: int, name: str = "api.test") -> list[str]:
    return [
        "--allow",
        f"{name}:{port}",
        "--allow",
        f"127.0.0.1:{port}",
        "--add-host",
        f"{name}:127.0.0.1",
    ]


def test_run_allow_prints_the_egress_table(bc: RunCLI, tmp_path: Path) -> None:
    with http_origin("a") as origin:
        res = bc(
            "run",
            "--events",
            str(tmp_path / "ev.jsonl"),
            *_allow(origin.port),
            "--",
            "sh",
            "-c",
            f"curl -sS http://api.test:{origin.port}/one; curl -sS http://nope.test/ -o /dev/null",
            cwd=tmp_path,
        )
    assert res.returncode == 0, res.stderr
    assert res.stdout == "hello from a /one\n"
    lines = res.stderr.splitlines()
    table = [line.split() for line in lines]
    head = table.index(["egress", "verdict", "requests", "sent", "received", "errors"])
    assert [f"api.test:{origin.port}", "allowed", "1"] == table[head + 1][:3]
    assert table[head + 2][:3] == ["nope.test:80", "denied", "1"]
    # Under the table, why it was denied and what would allow it.
    assert lines[head + 3] == (
        "egress denied: nope.test:80 — nope.test:80 is not on the allowlist; "
        "to allow: --allow nope.test:80"
    )
    names = [e["event"] for e in read_events(tmp_path / "ev.jsonl")]
    assert "net.allow" in names and "net.deny" in names


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        ("--allow", "https://pypi.example.org", "a URL is not"),
        ("--allow", "10.0.0.5", "port"),
        ("--allow", "*", "every host"),
        ("--allow", "*.org", "too broad"),
        ("--allow", "host:99999", "port"),
        ("--add-host", "nocolon", "NAME:ADDRESS"),
        ("--add-host", "a.test:not-an-ip", "address"),
    ],
)
def test_bad_network_flags_exit_125_with_one_line(
    bc: RunCLI, tmp_path: Path, flag: str, value: str, words: str
) -> None:
    res = bc("run", flag, value, "--", "true", cwd=tmp_path)
    assert res.returncode == 125
    first = res.stderr.splitlines()[0]
    assert first.startswith("buildcell: error: ")
    assert words.lower() in res.stderr.lower()
    assert res.stdout == ""


def test_spec_step_network_and_provenance(bc: RunCLI, tmp_path: Path) -> None:
    keys = tmp_path / "keys"  # outside the checkout: a key inside one is refused
    tmp_path = tmp_path / "checkout"
    tmp_path.mkdir()
    with http_origin("a") as origin:
        port = origin.port
        (tmp_path / "buildcell.yaml").write_text(
            "version: 1\nname: net\nsteps:\n"
            "  - name: fetch\n"
            f"    run: curl -sS -o page.txt http://api.test:{port}/dep\n"
            "    network:\n"
            f"      allow: ['api.test:{port}', '127.0.0.1:{port}']\n"
            "  - name: offline\n"
            f"    run: cp page.txt out.txt; ! curl -sS --max-time 5 http://api.test:{port}/again\n"
            "outputs: [out.txt]\n"
        )
        assert bc("keygen", "--out", str(keys)).returncode == 0
        res = bc(
            "build",
            "--add-host",
            "api.test:127.0.0.1",
            # A loopback entry in a spec is the operator's to grant.
            "--allow",
            f"127.0.0.1:{port}",
            "--sign-key",
            str(keys / "buildcell.key"),
            "--json",
            cwd=tmp_path,
        )
    assert res.returncode == 0, res.stderr + res.stdout
    assert origin.hits == ["/dep"]
    data = json.loads(res.stdout)
    steps = {s["name"]: s for s in data["steps"]}
    assert [(r["destination"], r["verdict"]) for r in data["egress"]] == [
        (f"api.test:{port}", "allowed")
    ]
    assert [r["destination"] for r in steps["fetch"]["egress"]] == [f"api.test:{port}"]
    assert steps["offline"]["egress"] == []
    assert (tmp_path / "buildcell-out" / "out.txt").read_text() == "hello from a /dep\n"
    envelope = json.loads((tmp_path / "buildcell-out" / "provenance.intoto.jsonl").read_text())
    import base64

    statement = json.loads(base64.b64decode(envelope["payload"]))
    definition = statement["predicate"]["buildDefinition"]
    allow = {s["name"]: s["network"]["allow"] for s in definition["internalParameters"]["steps"]}
    assert allow == {"fetch": [f"api.test:{port}", f"127.0.0.1:{port}"], "offline": []}
    egress = [
        d
        for d in definition["resolvedDependencies"]
        if d.get("annotations", {}).get("kind") == "egress"
    ]
    assert [(d["annotations"]["host"], d["annotations"]["port"]) for d in egress] == [
        ("api.test", port)
    ]
    provenance = tmp_path / "buildcell-out" / "provenance.intoto.jsonl"
    verify = bc(
        "verify",
        "--key",
        str(keys / "buildcell.pub"),
        "--provenance",
        str(provenance),
        "--no-network",
    )
    assert verify.returncode == 1
    assert "step 'fetch' allows network" in verify.stdout
    assert f"records egress to 'api.test' port {port}" in verify.stdout


def test_spec_rejects_a_bad_allow_entry_with_file_and_line(bc: RunCLI, tmp_path: Path) -> None:
    (tmp_path / "buildcell.yaml").write_text(
        "version: 1\nname: net\nsteps:\n  - name: s\n    run: 'true'\n    network:\n"
        "      allow: ['ok.example.org', 'http://bad.example.org/x']\n"
    )
    res = bc("build", cwd=tmp_path)
    assert res.returncode == 125
    line = res.stderr.splitlines()[0]
    assert "buildcell.yaml:7" in line and "steps[0].network.allow[1]" in line


def test_human_build_summary_shows_egress(bc: RunCLI, tmp_path: Path) -> None:
    with http_origin("a") as origin:
        (tmp_path / "buildcell.yaml").write_text(
            "version: 1\nname: net\nsteps:\n  - name: fetch\n"
            f"    run: curl -sS http://api.test:{origin.port}/x; curl -s http://deny.test/ || true\n"
            f"    network: {{allow: ['api.test:{origin.port}', '127.0.0.1:{origin.port}']}}\n"
        )
        res = bc(
            "build", "--add-host", "api.test:127.0.0.1", "--allow", f"127.0.0.1:{origin.port}",
            cwd=tmp_path,
        )  # fmt: skip
    assert res.returncode == 0, res.stderr
    lines = [line.split() for line in res.stdout.splitlines()]
    assert [f"api.test:{origin.port}", "allowed", "1"] in [x[:3] for x in lines]
    assert ["deny.test:80", "denied", "1"] in [x[:3] for x in lines]


def _dumb_git_repo(root: Path) -> Path:
    work = root / "work"
    work.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(work)]
    subprocess.run(["git", "init", "-q", str(work)], check=True)
    (work / "README").write_text("cloned through the proxy\n")
    subprocess.run([*git, "add", "README"], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    bare = root / "served" / "repo.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True)
    subprocess.run(["git", "-C", str(bare), "update-server-info"], check=True)
    return root / "served"


def test_git_and_npm_work_through_the_proxy_unchanged(bc: RunCLI, tmp_path: Path) -> None:
    """Real clients honour the proxy variables: git (dumb http) and npm (a tarball URL)."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    served = _dumb_git_repo(tmp_path)
    npm = shutil.which("npm")
    if npm is not None:
        pkg = tmp_path / "pkg"
        pkg.mkdir()
        (pkg / "package.json").write_text('{"name": "tiny", "version": "1.0.0", "main": "i.js"}')
        (pkg / "i.js").write_text("module.exports = 'tiny via proxy';\n")
        subprocess.run(
            [npm, "pack", "--silent", "--pack-destination", str(served)],
            cwd=pkg,
            check=True,
            capture_output=True,
        )
    import http.server
    import threading
    from functools import partial

    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    script = f"git clone -q http://repo.test:{port}/repo.git r && cat r/README"
    if npm is not None:
        script += (
            f" && npm install --silent --no-audit --no-fund --cache /tmp/npm "
            f"http://repo.test:{port}/tiny-1.0.0.tgz >/dev/null && node -p \"require('tiny')\""
        )
    try:
        res = bc(
            "run",
            *_allow(port, "repo.test"),
            "--",
            "sh",
            "-c",
            script,
            cwd=tmp_path / "work",
            timeout=180,
        )
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0] == "cloned through the proxy"
    if npm is not None:
        assert res.stdout.splitlines()[1] == "tiny via proxy"


@pytest.mark.parametrize("disk", [None, "64M"])
def test_rootless_egress(bc_rootless: RootlessCLI, disk: str | None) -> None:
    with http_origin("a") as origin:
        port = origin.port
        res = bc_rootless(
            "run",
            *(["--disk", disk] if disk else []),
            *_allow(port),
            "--",
            "sh",
            "-c",
            f"id -u; curl -sS http://api.test:{port}/r; curl -sS --noproxy '*' http://api.test:{port}/t; "
            "curl -s -o /dev/null -w '%{http_code}\\n' http://denied.test/",
        )
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["1000", "hello from a /r", "hello from a /t", "403"]
    assert origin.hits == ["/r", "/t"]


def test_egress_with_a_disk_budget_as_this_user(bc: RunCLI, tmp_path: Path) -> None:
    # With --disk the cell enters the storage anchor's namespaces first; the network
    # namespace must then be made inside the anchor's user namespace (rootless) or as root.
    with http_origin("a") as origin:
        res = bc(
            "run",
            "--disk",
            "32M",
            *_allow(origin.port),
            "--",
            "curl",
            "-sS",
            f"http://api.test:{origin.port}/d",
            cwd=tmp_path,
        )
    assert res.returncode == 0, res.stderr
    assert res.stdout == "hello from a /d\n"


def _pip_index() -> str:
    """The index pip is configured with here, read at run time (never written in a test)."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", "global.index-url"],
        capture_output=True,
        text=True,
        check=False,
    )
    url = os.environ.get("PIP_INDEX_URL") or (out.stdout.strip() if out.returncode == 0 else "")
    if not url:
        from pip._internal.models.index import PyPI

        url = PyPI.simple_url
    return url


@pytest.mark.registry
@pytest.mark.skipif(
    os.environ.get("BUILDCELL_TEST_REGISTRY") != "1", reason="opt-in: BUILDCELL_TEST_REGISTRY=1"
)
def test_pip_download_through_the_proxy_allowing_only_the_index(bc: RunCLI, tmp_path: Path) -> None:
    import re
    import urllib.request
    from urllib.parse import urlsplit

    index = _pip_index().rstrip("/")
    # The index may serve its files from another host: allow exactly the hosts its page for
    # the package names, read now from the index itself.
    with urllib.request.urlopen(f"{index}/six/", timeout=30) as page:  # noqa: S310
        links = re.findall(r'href="([^"]+)"', page.read().decode())
    hosts = {urlsplit(index).hostname} | {
        urlsplit(link).hostname for link in links if "://" in link
    }
    allow = [a for h in sorted(h for h in hosts if h) for a in ("--allow", h)]
    # On a network that answers with its own (reserved or private) addresses, the guard
    # refuses them to a name: allow them literally, as an operator there would have to.
    import socket

    from buildcell.allowlist import guarded_reason

    for host in sorted(h for h in hosts if h):
        for info in socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM):
            address = str(info[4][0])
            if guarded_reason(address) is not None:
                allow += ["--allow", f"[{address}]:443" if ":" in address else f"{address}:443"]
    res = bc(
        "run",
        *allow,
        "--",
        "python3",
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--index-url",
        index,
        "-d",
        "vendor",
        "six",
        cwd=tmp_path,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "Saved" in res.stdout
