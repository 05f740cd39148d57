"""Hostile inputs: a pull request's buildcell.yaml names host files and host-side services.

Every test plays the repository. Its spec pins an input that would hand the attacker a host
file (``file:`` through an absolute path, ``..``, symlinks, hard links, special files) or
make the host fetch from its own network (``url:`` to loopback, private or metadata
addresses, spelled every way a resolver accepts, or reached by a name or a redirect). The
real tool, run as CI runs it, must refuse before any step runs: exit 125, one line naming
the input and why, no digest of what it refused, nothing from it in the state directory,
and no request reaching the service. Then the operator grants the destination and the same
fetch works.

A spec's ``network.allow`` is held to the same rule: loopback, private, metadata or overly
broad entries need the operator's ``--allow``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import REPO, RunCLI, root_only
from tests.netservers import Origin, http_origin

from buildcell.allowlist import parse_allow, spec_entry_problem
from buildcell.errors import InputError
from buildcell.supply.inputs import ContentStore, FetchPolicy, InputRefusedError, InputRequest
from buildcell.supply.inputs import resolve_inputs as resolve

GOOD = b"vendored dependency\n"
GOOD_DIGEST = hashlib.sha256(GOOD).hexdigest()
WRONG_DIGEST = "0" * 64


# -- the attacker's project and the host's secret ------------------------------------------


class Host:
    """A host file the attacker wants, outside the project, readable by root only."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(mode=0o700)
        self.dir = directory
        self.token = "host-secret-" + secrets.token_hex(12)
        self.content = f"root:{self.token}:19000:0:99999:7:::\n".encode()
        self.digest = hashlib.sha256(self.content).hexdigest()
        self.path = directory / "shadow"
        self.path.write_bytes(self.content)
        self.path.chmod(0o600)


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path / "host")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    return root


def _spec(project: Path, inputs: list[dict[str, str]], *, network: str = "") -> Path:
    spec = project / "buildcell.yaml"
    items = "".join(f"  - {json.dumps(item)}\n" for item in inputs)
    spec.write_text(
        "version: 1\nname: hostile\n"
        f"inputs:\n{items}"
        "steps:\n"
        "  - name: leak\n"
        "    run: mkdir -p dist && cp -rL vendor dist/ && touch dist/ran\n"
        f"{network}"
        "outputs: ['dist/**']\n"
    )
    return spec


def _build(bc: RunCLI, project: Path, *flags: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    out = project.parent / "out"
    return bc(
        "build", "-f", str(project / "buildcell.yaml"), "--out", str(out), *flags,
        cwd=project.parent, **kw,
    )  # fmt: skip


def _error_line(res: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in res.stderr.splitlines() if line.startswith("buildcell: error: ")]
    assert len(lines) == 1, res.stderr
    return lines[0]


def _files(root: Path) -> Iterator[Path]:
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            yield Path(dirpath) / name


def assert_contained(
    res: subprocess.CompletedProcess[str],
    state_root: Path,
    project: Path,
    *,
    names: str,
    why: str | re.Pattern[str],
    secret: Host | None = None,
) -> str:
    """The build was refused with one line and left no trace of what it was after."""
    assert res.returncode == 125, res.stdout + res.stderr
    line = _error_line(res)
    assert names in line, line
    if isinstance(why, str):
        assert why in line, line
    else:
        assert why.search(line), line
    assert not (project.parent / "out" / "dist" / "ran").exists(), "a step ran"
    if secret is not None:
        shown = res.stdout + res.stderr
        assert secret.digest not in shown, "the refusal told the secret's digest"
        assert secret.token not in shown
        cas = state_root / "state" / "cas" / "sha256" / secret.digest[:2] / secret.digest
        assert not cas.exists()
        for path in (*_files(state_root), *_files(project.parent / "out")):
            if path.is_file() and not path.is_symlink():
                assert secret.token.encode() not in path.read_bytes(), path
    return line


# -- file: inputs --------------------------------------------------------------------------


def _absolute(project: Path, host: Host) -> str:
    return str(host.path)


def _dotdot(project: Path, host: Host) -> str:
    return "../host/shadow"


def _deep_dotdot(project: Path, host: Host) -> str:
    return "../" * 30 + str(host.path).lstrip("/")


def _symlink(project: Path, host: Host) -> str:
    (project / "vendor.tar").symlink_to(host.path)
    return "vendor.tar"


def _relative_symlink(project: Path, host: Host) -> str:
    (project / "vendor.tar").symlink_to("../host/shadow")
    return "vendor.tar"


def _proc_symlink(project: Path, host: Host) -> str:
    (project / "vendor.tar").symlink_to(f"/proc/self/root{host.path}")
    return "vendor.tar"


def _directory_symlink(project: Path, host: Host) -> str:
    (project / "third_party").symlink_to(host.dir)
    return "third_party/shadow"


def _relative_directory_symlink(project: Path, host: Host) -> str:
    (project / "a" / "b").mkdir(parents=True)
    (project / "a" / "b" / "third_party").symlink_to("../../../host")
    return "a/b/third_party/shadow"


def _dotdot_after_symlink(project: Path, host: Host) -> str:
    (project / "a" / "b").mkdir(parents=True)
    (project / "link").symlink_to("a/b")
    # Lexically link/../.. is the project itself; physically it is a/b/../.. and one more.
    return "link/../../../host/shadow"


def _hard_link(project: Path, host: Host) -> str:
    os.link(host.path, project / "vendor.tar")
    return "vendor.tar"


def _fifo(project: Path, host: Host) -> str:
    os.mkfifo(project / "vendor.tar")
    return "vendor.tar"


def _device(project: Path, host: Host) -> str:
    os.mknod(project / "vendor.tar", 0o644 | stat.S_IFCHR, os.makedev(1, 3))
    return "vendor.tar"


FILE_ATTACKS = [
    pytest.param(_absolute, re.compile(r"absolute|must lie inside"), id="absolute"),
    pytest.param(_dotdot, "leads above the root", id="dotdot"),
    pytest.param(_deep_dotdot, "leads above the root", id="deep-dotdot"),
    pytest.param(_symlink, "is a symlink to", id="symlink"),
    pytest.param(_relative_symlink, "leads above the root", id="relative-symlink"),
    pytest.param(_proc_symlink, "is a symlink to '/proc/self/root", id="proc-magic-link"),
    pytest.param(_directory_symlink, "is a symlink to", id="directory-symlink"),
    pytest.param(_relative_directory_symlink, "leads above the root", id="relative-dir-symlink"),
    pytest.param(_dotdot_after_symlink, "leads above the root", id="dotdot-after-symlink"),
    pytest.param(_hard_link, "is a hard link", id="hard-link"),
    pytest.param(_fifo, "is a fifo, not a regular file", id="fifo"),
    pytest.param(_device, "is a device, not a regular file", id="device", marks=root_only),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("pin", ["real", "wrong"])
@pytest.mark.parametrize(("plant", "why"), FILE_ATTACKS)
def test_file_inputs_cannot_read_host_files(
    bc: RunCLI,
    *,
    state_root: Path,
    project: Path,
    host: Host,
    plant: Callable[[Path, Host], str],
    why: str | re.Pattern[str],
    pin: str,
) -> None:
    # Pinned to the real digest the read would succeed and land in the cell; pinned to a
    # wrong one the mismatch error used to print the real digest.
    rel = plant(project, host)
    digest = host.digest if pin == "real" else WRONG_DIGEST
    _spec(project, [{"file": rel, "sha256": digest, "path": "vendor/x"}])
    started = time.monotonic()
    res = _build(bc, project)
    assert time.monotonic() - started < 30, "the refusal blocked"
    # Long values are cut short in messages; their start names the input.
    assert_contained(res, state_root, project, names=rel[:40], why=why, secret=host)


def test_file_input_etc_shadow(bc: RunCLI, state_root: Path, project: Path) -> None:
    shadow = Path("/etc/shadow")
    digest = hashlib.sha256(shadow.read_bytes()).hexdigest() if os.access(shadow, os.R_OK) else ""
    for rel in ("/etc/shadow", "../../../../../../../../../etc/shadow"):
        _spec(project, [{"file": rel, "sha256": WRONG_DIGEST, "path": "vendor/x"}])
        res = _build(bc, project)
        assert_contained(res, state_root, project, names=rel[:40], why=re.compile("root|inside"))
        if digest:
            assert digest not in res.stdout + res.stderr


def test_a_file_inside_the_project_still_works(
    bc: RunCLI, state_root: Path, project: Path, host: Host
) -> None:
    (project / "third_party" / "real").mkdir(parents=True)
    (project / "third_party" / "real" / "dep.txt").write_bytes(GOOD)
    (project / "third_party" / "dep.txt").symlink_to("real/dep.txt")
    _spec(project, [{"file": "third_party/dep.txt", "sha256": GOOD_DIGEST, "path": "vendor/x"}])
    res = _build(bc, project)
    assert res.returncode == 0, res.stderr
    assert (project.parent / "out" / "dist" / "vendor" / "x").read_bytes() == GOOD


@pytest.mark.timeout(120)
def test_a_symlink_swapped_in_while_builds_run(
    bc: RunCLI, state_root: Path, project: Path, host: Host
) -> None:
    # The checkout changes under buildcell (another job, a concurrent process): the name
    # flips between the pinned file and a symlink to the host's secret as fast as it can.
    stop = threading.Event()
    flipper = threading.Thread(target=_flip, args=(project, host, stop), daemon=True)
    _spec(project, [{"file": "vendor.tar", "sha256": GOOD_DIGEST, "path": "vendor/x"}])
    flipper.start()
    try:
        for _ in range(6):
            res = _build(bc, project)
            if res.returncode == 0:
                got = (project.parent / "out" / "dist" / "vendor" / "x").read_bytes()
                assert got == GOOD
            else:
                assert res.returncode == 125, res.stderr
                assert host.digest not in res.stdout + res.stderr
    finally:
        stop.set()
        flipper.join(10)
    for path in _files(state_root):
        if path.is_file() and not path.is_symlink():
            assert host.token.encode() not in path.read_bytes(), path


def _flip(project: Path, host: Host, stop: threading.Event) -> None:
    """Make ``vendor.tar`` the pinned file, then a symlink to the secret, over and over."""
    good, link, target = project / ".good", project / ".link", project / "vendor.tar"
    while not stop.is_set():
        good.write_bytes(GOOD)
        os.rename(good, target)
        link.unlink(missing_ok=True)
        link.symlink_to(host.path)
        os.rename(link, target)
    target.unlink(missing_ok=True)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("swap", ["file", "directory"])
def test_racing_a_symlink_against_resolution(
    tmp_path: Path, project: Path, host: Host, resolution: str, swap: str
) -> None:
    # Check-then-use would lose this race: between a look at the name and the open, the
    # name becomes a symlink to the secret. Resolution is one confined open, so every
    # outcome is the pinned file or a refusal.
    store = ContentStore(tmp_path / "cas")
    stop = threading.Event()
    if swap == "file":
        flipper = threading.Thread(target=_flip, args=(project, host, stop), daemon=True)
        rel = "vendor.tar"
    else:
        flipper = threading.Thread(target=_flip_dir, args=(project, host, stop), daemon=True)
        rel = "third_party/shadow"
    outcomes: dict[str, int] = {"ok": 0, "refused": 0, "mismatch": 0}
    flipper.start()
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            # Pinned to the secret, only a lost race could make this succeed; pinned to the
            # file, it succeeds only with the file's content.
            for digest in (host.digest, GOOD_DIGEST):
                request = InputRequest.local(project, rel, sha256=digest, path="x")
                outcome, detail = _attempt(request, store)
                outcomes[outcome] += 1
                assert host.digest not in detail or outcome == "mismatch"
                if outcome == "ok":
                    assert digest == GOOD_DIGEST
                    assert detail == GOOD.decode()
                if outcome == "mismatch":
                    assert f"got {GOOD_DIGEST}" in detail, detail
    finally:
        stop.set()
        flipper.join(10)
    assert not store.path_for(host.digest).exists()
    assert outcomes["refused"] > 0, outcomes


def _attempt(request: InputRequest, store: ContentStore) -> tuple[str, str]:
    """Resolve once: ("ok", content), ("refused", message) or ("mismatch", message)."""
    try:
        [got] = resolve([request], store)
    except InputRefusedError as e:
        return "refused", f"{e} {e.hint}"
    except InputError as e:
        return "mismatch", str(e)
    return "ok", got.store_path.read_text()


def _flip_dir(project: Path, host: Host, stop: threading.Event) -> None:
    """Make ``third_party`` a directory holding the pinned file, then a symlink to the
    secret's directory, over and over (in between it is briefly missing)."""
    fresh, gone, target = project / ".fresh", project / ".gone", project / "third_party"
    while not stop.is_set():
        fresh.mkdir()
        (fresh / "shadow").write_bytes(GOOD)
        target.unlink(missing_ok=True)
        os.rename(fresh, target)
        os.rename(target, gone)
        target.symlink_to(host.dir)
        (gone / "shadow").unlink()
        gone.rmdir()
    target.unlink(missing_ok=True)


# -- url: inputs ---------------------------------------------------------------------------

SHIM = '''
"""Test resolver: BUILDCELL_TEST_HOSTS maps names to addresses in this process."""
import os
import socket

_real = socket.getaddrinfo
_hosts = {}
for item in filter(None, os.environ.get("BUILDCELL_TEST_HOSTS", "").split(";")):
    name, _, addresses = item.partition("=")
    _hosts[name] = addresses.split(",")


def getaddrinfo(host, port, *args, **kwargs):
    if host not in _hosts:
        return _real(host, port, *args, **kwargs)
    out = []
    for address in _hosts[host]:
        if ":" in address:
            out.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, int(port), 0, 0)))
        else:
            out.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, int(port))))
    return out


socket.getaddrinfo = getaddrinfo
'''


@pytest.fixture
def hosts(tmp_path: Path) -> Callable[[dict[str, list[str]]], dict[str, str]]:
    """The environment that makes the CLI resolve some names as a hostile DNS server would."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SHIM)

    def env(names: dict[str, list[str]]) -> dict[str, str]:
        mapping = ";".join(f"{n}={','.join(a)}" for n, a in names.items())
        return {"PYTHONPATH": f"{shim}:{REPO / 'src'}", "BUILDCELL_TEST_HOSTS": mapping}

    return env


def _url_spec(project: Path, url: str, digest: str = WRONG_DIGEST) -> None:
    _spec(project, [{"url": url, "sha256": digest, "path": "vendor/x"}])


def _served(origin: Origin) -> tuple[bytes, str]:
    body = f"hello from {origin.name} /x\n".encode()
    return body, hashlib.sha256(body).hexdigest()


@pytest.fixture
def origin() -> Iterator[Origin]:
    with http_origin("internal") as served:
        yield served


LOOPBACK_FORMS = [
    "127.0.0.1",
    "localhost",
    "127.1",
    "127.0.1",
    "0x7f000001",
    "0x7f.1",
    "2130706433",
    "0177.0.0.1",
    "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]",
]


@pytest.mark.parametrize("form", LOOPBACK_FORMS)
def test_url_inputs_cannot_reach_host_loopback(
    bc: RunCLI, state_root: Path, project: Path, origin: Origin, form: str
) -> None:
    url = f"http://{form}:{origin.port}/x"
    _, digest = _served(origin)
    _url_spec(project, url, digest)
    res = _build(bc, project)
    line = assert_contained(res, state_root, project, names=url, why="loopback")
    assert "a spec may fetch only from public addresses" in line
    assert "--allow-fetch " in line
    assert origin.hits == [], "the host fetched from its own loopback"


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.0.1", "private"),
        ("100.64.0.1", "carrier-grade NAT"),
        ("169.254.169.254", "cloud metadata"),
        ("[fd00:ec2::254]", "cloud metadata"),
        ("100.100.100.200", "cloud metadata"),
        ("169.254.0.1", "link-local"),
        ("[fe80::1]", "link-local"),
        ("[fd12:3456::1]", "unique local"),
        ("0.0.0.0", "unspecified"),
        ("[::]", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("198.18.0.1", "reserved"),
        ("224.0.0.1", "multicast"),
        ("[::1]", "loopback"),
        ("[64:ff9b::a9fe:a9fe]", "cloud metadata via NAT64"),
    ],
)
def test_url_inputs_cannot_reach_non_public_addresses(
    bc: RunCLI, state_root: Path, project: Path, address: str, reason: str
) -> None:
    url = f"http://{address}/latest/meta-data/iam/security-credentials/"
    _url_spec(project, url)
    started = time.monotonic()
    res = _build(bc, project)
    # Refused before any connection: an unreachable address would time out instead.
    assert time.monotonic() - started < 30
    assert_contained(res, state_root, project, names=url, why=f"{address.strip('[]')} is {reason};")


@pytest.mark.parametrize(
    ("answers", "shown"),
    [
        (["127.0.0.1"], "127.0.0.1"),
        (["93.184.215.14", "127.0.0.1"], "127.0.0.1"),
        (["127.0.0.1", "93.184.215.14"], "127.0.0.1"),
        (["2606:2800:21f:cb07:6820:80da:af6b:8b2c", "::1"], "::1"),
        (["::ffff:127.0.0.1"], "::ffff:127.0.0.1"),
    ],
    ids=["loopback", "public-then-loopback", "loopback-then-public", "v6-mixed", "mapped"],
)
def test_a_public_looking_name_resolving_to_loopback(
    bc: RunCLI,
    *,
    state_root: Path,
    project: Path,
    origin: Origin,
    hosts: Callable[[dict[str, list[str]]], dict[str, str]],
    answers: list[str],
    shown: str,
) -> None:
    url = f"http://downloads.example.org:{origin.port}/x"
    _url_spec(project, url, _served(origin)[1])
    res = _build(bc, project, env=hosts({"downloads.example.org": answers}))
    assert_contained(
        res, state_root, project, names=url,
        why=f"downloads.example.org resolves to {shown}, which is loopback",
    )  # fmt: skip
    assert origin.hits == []


def test_localhost_names(bc: RunCLI, state_root: Path, project: Path, origin: Origin) -> None:
    # Whatever this host's resolver does with these, none of them may reach loopback.
    name = socket.gethostname()
    for host in ("localhost", "LOCALHOST", name, f"{name}.", "localhost.", "x.localhost"):
        try:
            socket.getaddrinfo(host, origin.port)
        except socket.gaierror:
            continue
        url = f"http://{host}:{origin.port}/x"
        _url_spec(project, url, _served(origin)[1])
        res = _build(bc, project)
        assert res.returncode == 125, res.stderr
        assert origin.hits == [], host


# -- what the operator grants --------------------------------------------------------------


def test_an_operator_grant_lets_the_fetch_through(
    bc: RunCLI, project: Path, origin: Origin
) -> None:
    body, digest = _served(origin)
    _url_spec(project, f"http://127.0.0.1:{origin.port}/x", digest)
    res = _build(bc, project, "--allow-fetch", f"127.0.0.1:{origin.port}")
    assert res.returncode == 0, res.stderr
    assert (project.parent / "out" / "dist" / "vendor" / "x").read_bytes() == body
    assert origin.hits == ["/x"]


def test_a_grant_in_the_configuration_file(
    bc: RunCLI, tmp_path: Path, project: Path, origin: Origin
) -> None:
    _, digest = _served(origin)
    config = tmp_path / "config.yaml"
    config.write_text(f"fetch:\n  allow: ['localhost:{origin.port}']\n")
    _url_spec(project, f"http://localhost:{origin.port}/x", digest)
    res = _build(bc, project, env={"BUILDCELL_CONFIG": str(config)})
    assert res.returncode == 0, res.stderr
    assert origin.hits == ["/x"]


def test_a_grant_is_for_that_destination_only(
    bc: RunCLI, state_root: Path, project: Path, origin: Origin
) -> None:
    _url_spec(project, f"http://127.0.0.1:{origin.port}/x", _served(origin)[1])
    for grant in (f"127.0.0.1:{origin.port + 1}", f"127.0.0.2:{origin.port}", "example.org"):
        res = _build(bc, project, "--allow-fetch", grant)
        assert_contained(res, state_root, project, names="127.0.0.1", why="loopback")
    assert origin.hits == []


def test_a_granted_server_cannot_redirect_to_loopback(
    bc: RunCLI, state_root: Path, project: Path
) -> None:
    with _redirector() as (port, location), http_origin("victim") as victim:
        for target in (f"http://127.0.0.1:{victim.port}/x", f"http://[::1]:{victim.port}/x"):
            location.append(target)
            _url_spec(project, f"http://127.0.0.1:{port}/hop")
            res = _build(bc, project, "--allow-fetch", f"127.0.0.1:{port}")
            assert_contained(
                res,
                state_root,
                project,
                names=f"redirected to {target}",
                why="::1 is loopback" if "::1" in target else "127.0.0.1 is loopback",
            )
        assert victim.hits == []


@contextlib.contextmanager
def _redirector() -> Iterator[tuple[int, list[str]]]:
    """A server on 127.0.0.1 redirecting every request to the last URL in the list it yields."""
    import http.server

    state: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", state[-1])
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(httpd.server_address[1]), state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def test_library_grants_reach_the_server_and_nothing_else(tmp_path: Path, origin: Origin) -> None:
    # What --allow-fetch hands the library, end to end against a real loopback server.
    body, digest = _served(origin)
    store = ContentStore(tmp_path / "cas")
    url = f"http://127.0.0.1:{origin.port}/x"
    request = InputRequest(url, digest, "x")
    with pytest.raises(InputRefusedError):
        resolve([request], store)
    assert origin.hits == []
    for grant in (f"127.0.0.1:{origin.port}", f"127.0.0.0/8:{origin.port}"):
        [got] = resolve([request], ContentStore(tmp_path / grant.replace("/", "_")),
                        fetch_policy=FetchPolicy.from_strings([grant]))  # fmt: skip
        assert got.store_path.read_bytes() == body
    assert origin.hits == ["/x", "/x"]


# -- network.allow in a spec ---------------------------------------------------------------

SPEC_CHOSEN = [
    "127.0.0.0/8:{port}",
    "127.0.0.1:{port}",
    "169.254.169.254:80",
    "0.0.0.0/0:22",
    "[::/0]:22",
    "[::1]:{port}",
    "10.0.0.0/8:443",
    "100.64.0.0/10:443",
    "[fd00:ec2::254]:80",
    "8.0.0.0/8:443",
]


@pytest.mark.parametrize("entry", SPEC_CHOSEN)
def test_spec_chosen_private_destinations_are_refused_by_the_guard(entry: str) -> None:
    problem = spec_entry_problem(parse_allow(entry.format(port=8000)))
    assert problem is not None
    assert "operator" in problem or "too broad" in problem


@pytest.mark.parametrize("entry", SPEC_CHOSEN)
def test_spec_chosen_private_destinations_are_refused_end_to_end(
    bc: RunCLI, state_root: Path, project: Path, origin: Origin, entry: str
) -> None:
    text = entry.format(port=origin.port)
    (project / "buildcell.yaml").write_text(
        "version: 1\nname: hostile\nsteps:\n"
        "  - name: probe\n"
        f"    run: curl -sS --max-time 5 http://127.0.0.1:{origin.port}/x > got\n"
        f"    network: {{allow: ['{text}']}}\n"
    )
    res = _build(bc, project)
    assert res.returncode == 125, res.stderr
    line = _error_line(res)
    assert "network.allow" in line and parse_allow(text).describe() in line
    assert "operator" in line or "too broad" in line
    assert origin.hits == []


def test_an_operator_grants_a_spec_chosen_loopback_destination(
    bc: RunCLI, state_root: Path, project: Path, origin: Origin
) -> None:
    # As in CI: the spec names a service on the runner; only the operator's --allow (for
    # the address) makes it reachable.
    entry = f"127.0.0.1:{origin.port}"
    (project / "buildcell.yaml").write_text(
        "version: 1\nname: granted\nsteps:\n"
        "  - name: probe\n"
        f"    run: curl -sS --max-time 5 -o /dev/null http://api.test:{origin.port}/x\n"
        f"    network: {{allow: ['api.test:{origin.port}', '{entry}']}}\n"
    )
    res = _build(bc, project, "--add-host", "api.test:127.0.0.1")
    assert_contained(res, state_root, project, names=entry, why="only an operator may allow")
    assert origin.hits == []
    res = _build(bc, project, "--add-host", "api.test:127.0.0.1", "--allow", entry)
    assert res.returncode == 0, res.stderr
    assert origin.hits == ["/x"]
