"""Pinned inputs: fetching against local HTTP servers, the address guard, confined local files,
and the content store.

The servers listen on loopback, which a spec may not fetch from: tests that fetch for real
pass the operator's grant for the server (``fetch_policy=server.policy``).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import logging
import os
import re
import socket
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import buildcell
import buildcell.supply.inputs as inputs_module
from buildcell.errors import ConfigError, InputError
from buildcell.events import EventLog
from buildcell.supply.inputs import (
    ContentStore,
    FetchPolicy,
    InputRefusedError,
    InputRequest,
    ResolvedInput,
    resolve_inputs,
)

BODY = b"hello, pinned world\n" * 1000
DIGEST = hashlib.sha256(BODY).hexdigest()
OTHER_DIGEST = hashlib.sha256(b"something else").hexdigest()

Route = Callable[[BaseHTTPRequestHandler], None]


# --- a local HTTP server --------------------------------------------------------------


@dataclass
class Server:
    base: str
    port: int
    host: str = "127.0.0.1"
    routes: dict[str, Route] = field(default_factory=dict)
    hits: Counter[str] = field(default_factory=Counter)
    headers: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    release: threading.Event = field(default_factory=threading.Event)

    def url(self, path: str) -> str:
        return self.base + path

    @property
    def policy(self) -> FetchPolicy:
        """The operator's grant for this loopback server: without it nothing is fetched."""
        return FetchPolicy.from_strings([f"{self.host}:{self.port}"])

    def serve(self, path: str, body: bytes = BODY, *, content_length: bool = True) -> str:
        def route(h: BaseHTTPRequestHandler) -> None:
            send_body(h, body, content_length=content_length)

        self.routes[path] = route
        return self.url(path)

    def status(self, path: str, code: int) -> str:
        def route(h: BaseHTTPRequestHandler) -> None:
            h.send_response(code)
            h.send_header("Content-Length", "0")
            h.end_headers()

        self.routes[path] = route
        return self.url(path)

    def truncated(self, path: str) -> str:
        """Promise the whole body, send 100 bytes of it, close the connection."""

        def route(h: BaseHTTPRequestHandler) -> None:
            h.send_response(200)
            h.send_header("Content-Length", str(len(BODY)))
            h.end_headers()
            h.wfile.write(BODY[:100])
            h.close_connection = True

        self.routes[path] = route
        return self.url(path)

    def stall(self, path: str, *, sent: int | None) -> str:
        """Stop responding: before the headers (``sent=None``), or after ``sent`` bytes."""

        def route(h: BaseHTTPRequestHandler) -> None:
            if sent is not None:
                h.send_response(200)
                h.send_header("Content-Length", str(len(BODY)))
                h.end_headers()
                h.wfile.write(BODY[:sent])
                h.wfile.flush()
            self.release.wait(10)

        self.routes[path] = route
        return self.url(path)

    def redirect(self, path: str, location: str, code: int = 302) -> str:
        def route(h: BaseHTTPRequestHandler) -> None:
            h.send_response(code)
            h.send_header("Location", location)
            h.send_header("Content-Length", "0")
            h.end_headers()

        self.routes[path] = route
        return self.url(path)


def send_body(h: BaseHTTPRequestHandler, body: bytes, *, content_length: bool = True) -> None:
    h.send_response(200)
    h.send_header("Content-Type", "application/octet-stream")
    if content_length:
        h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that time out or stop reading leave broken pipes; that is the point.
        pass


@contextlib.contextmanager
def _serving(host: str) -> Iterator[Server]:
    """A routed HTTP server on ``host`` (127.0.0.1 or ::1)."""
    state: dict[str, Server] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            srv = state["server"]
            path = self.path.split("?", 1)[0]
            srv.hits[path] += 1
            srv.headers.setdefault(path, []).append(dict(self.headers.items()))
            route = srv.routes.get(path)
            if route is None:
                self.send_error(404)
                return
            route(self)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    class Family(_QuietServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    httpd = Family((host, 0), Handler)
    port = int(httpd.server_address[1])
    shown = f"[{host}]" if ":" in host else host
    srv = Server(base=f"http://{shown}:{port}", port=port, host=shown)
    state["server"] = srv
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield srv
    finally:
        srv.release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture
def server() -> Iterator[Server]:
    with _serving("127.0.0.1") as srv:
        yield srv


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # The tests talk to 127.0.0.1; a proxy from the environment would intercept them.
    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)


@pytest.fixture
def store(tmp_path: Path) -> ContentStore:
    return ContentStore(tmp_path / "cas")


@dataclass
class Events:
    log: EventLog
    records: list[dict[str, Any]]


@pytest.fixture
def events() -> Iterator[Events]:
    log = EventLog(None, build="b1")
    records: list[dict[str, Any]] = []
    log.subscribe(records.append)
    yield Events(log, records)
    log.close()


def store_files(store: ContentStore) -> list[Path]:
    """Every non-directory in the store, temporary files included."""
    return sorted(p for p in store.root.rglob("*") if not p.is_dir() or p.is_symlink())


def assert_empty(store: ContentStore) -> None:
    assert store_files(store) == []


# --- fetching -------------------------------------------------------------------------


def test_fetch_stores_verified_content_at_its_address(
    server: Server, store: ContentStore, events: Events
) -> None:
    url = server.serve("/pkg.tar.gz")
    request = InputRequest(uri=url, sha256=DIGEST.upper(), path="vendor/pkg.tar.gz")

    [first] = resolve_inputs(
        [request], store, fetch_policy=server.policy, events=events.log, step="fetch"
    )

    assert first == ResolvedInput(
        path="vendor/pkg.tar.gz",
        sha256=DIGEST,
        uri=url,
        store_path=store.root / "sha256" / DIGEST[:2] / DIGEST,
        size=len(BODY),
        fetched=True,
    )
    assert first.store_path == store.path_for(DIGEST)
    assert first.store_path.read_bytes() == BODY
    assert stat.S_IMODE(first.store_path.stat().st_mode) == 0o644
    for directory in (store.root, store.root / "sha256", first.store_path.parent):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o711
    assert store_files(store) == [first.store_path]
    sent = server.headers["/pkg.tar.gz"][0]
    assert sent["User-Agent"] == f"buildcell/{buildcell.__version__}"
    assert sent["Accept-Encoding"] == "identity"
    assert sent["Host"] == f"127.0.0.1:{server.port}"

    [second] = resolve_inputs(
        [request], store, fetch_policy=server.policy, events=events.log, step="fetch"
    )
    assert second.fetched is False
    assert second.store_path == first.store_path
    assert second.size == len(BODY)
    assert server.hits["/pkg.tar.gz"] == 1

    assert [(r["event"], r["step"], r["source"]) for r in events.records] == [
        ("input", "fetch", "fetched"),
        ("input", "fetch", "store"),
    ]
    record = events.records[0]
    assert {k: record[k] for k in ("uri", "sha256", "path", "size")} == {
        "uri": url,
        "sha256": DIGEST,
        "path": "vendor/pkg.tar.gz",
        "size": len(BODY),
    }


def test_fetch_without_content_length(server: Server, store: ContentStore) -> None:
    url = server.serve("/stream", content_length=False)
    assert store.fetch(url, DIGEST, fetch_policy=server.policy).read_bytes() == BODY


def test_fetch_follows_redirect_to_http(server: Server, store: ContentStore) -> None:
    server.serve("/real")
    url = server.redirect("/moved", server.url("/real"), code=301)
    assert store.fetch(url, DIGEST, fetch_policy=server.policy).read_bytes() == BODY
    assert server.hits == Counter({"/moved": 1, "/real": 1})


def test_resolve_inputs_processes_requests_in_order(server: Server, store: ContentStore) -> None:
    other = b"second input"
    requests = [
        InputRequest(server.serve("/one"), DIGEST, "one"),
        InputRequest(server.serve("/two", other), hashlib.sha256(other).hexdigest(), "two"),
    ]
    resolved = resolve_inputs(requests, store, fetch_policy=server.policy)
    assert [r.path for r in resolved] == ["one", "two"]
    assert resolved[1].store_path.read_bytes() == other


def test_digest_mismatch_names_both_digests_and_keeps_nothing(
    server: Server, store: ContentStore
) -> None:
    url = server.serve("/x.tar.gz")
    with pytest.raises(InputError) as info:
        resolve_inputs([InputRequest(url, OTHER_DIGEST, "x")], store, fetch_policy=server.policy)
    assert str(info.value) == f"sha256 mismatch for {url}: expected {OTHER_DIGEST}, got {DIGEST}"
    assert info.value.hint == "if the new content is intended, pin the new digest"
    assert info.value.exit_code == 125
    assert "\n" not in str(info.value)
    assert_empty(store)


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        (lambda s: s.status("/missing", 404), "HTTP 404 Not Found"),
        (lambda s: s.status("/broken", 500), "HTTP 500 Internal Server Error"),
        (lambda s: s.truncated("/short"), "truncated after 100 of"),
        (lambda s: s.stall("/stall", sent=None), "timed out after 0.5 s"),
        (lambda s: s.stall("/stall-body", sent=100), "timed out after 0.5 s"),
        (lambda s: s.redirect("/to-file", "file:///etc/passwd"), "refusing redirect to file:"),
        (lambda s: s.redirect("/to-ftp", "ftp://127.0.0.1/x"), "refusing redirect to ftp:"),
        (lambda s: s.redirect("/loop", "/loop"), "more than 10 redirects"),
        (lambda s: s.redirect("/nowhere", ""), "HTTP 302 without a Location"),
        (lambda s: s.status("/see-other", 300), "HTTP 300"),
        (lambda s: s.status("/no-content", 204), "unexpected HTTP status 204"),
    ],
    ids=[
        "404",
        "500",
        "truncated",
        "timeout",
        "timeout-mid-body",
        "to-file",
        "to-ftp",
        "loop",
        "no-location",
        "300",
        "204",
    ],
)
def test_fetch_failures_are_input_errors_and_leave_nothing(
    server: Server, store: ContentStore, setup: Callable[[Server], str], reason: str
) -> None:
    url = setup(server)
    started = time.monotonic()
    with pytest.raises(InputError) as info:
        store.fetch(url, DIGEST, fetch_policy=server.policy, timeout=0.5)
    assert time.monotonic() - started < 5
    message = str(info.value)
    assert message.startswith(f"cannot fetch {url}: ")
    assert reason in message
    assert "\n" not in message
    assert_empty(store)


def test_connection_refused(store: ContentStore) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x"
    grant = FetchPolicy.from_strings([f"127.0.0.1:{port}"])
    with pytest.raises(InputError, match=r"^cannot fetch http://127\.0\.0\.1:\d+/x: .*refused"):
        store.fetch(url, DIGEST, fetch_policy=grant, timeout=2)
    assert_empty(store)


@pytest.mark.parametrize(
    "uri",
    [
        "ftp://127.0.0.1/x",
        "data:,hello",
        "gopher://127.0.0.1/x",
        "javascript:alert(1)",
        "/abs/path/without/scheme",
        "relative/path",
        "",
        "http://",
        "http://127.0.0.1:99999/x",
        "http://127.0.0.1/x y",
        "http://127.0.0.1/x\n",
        "https://127.0.0.1/caf\u00e9",
    ],
)
def test_bad_uris_are_refused(store: ContentStore, uri: str) -> None:
    with pytest.raises(InputError):
        InputRequest(uri, DIGEST, "x")
    with pytest.raises(InputError):
        store.fetch(uri, DIGEST)
    assert_empty(store)


def test_fetch_refuses_file_uris(store: ContentStore, tmp_path: Path) -> None:
    source = tmp_path / "f"
    source.write_bytes(BODY)
    with pytest.raises(InputError, match="only http and https"):
        store.fetch(source.as_uri(), DIGEST)


def test_content_length_over_the_limit_is_refused_before_downloading(
    server: Server, store: ContentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inputs_module, "MAX_INPUT_SIZE", 1000)
    url = server.serve("/big")
    with pytest.raises(InputError, match=r"Content-Length 20000 exceeds the limit"):
        store.fetch(url, DIGEST, fetch_policy=server.policy)
    assert_empty(store)


def test_body_over_the_limit_without_content_length_is_cut_off(
    server: Server, store: ContentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inputs_module, "MAX_INPUT_SIZE", 1000)
    url = server.serve("/big", content_length=False)
    with pytest.raises(InputError, match="larger than the limit"):
        store.fetch(url, DIGEST, fetch_policy=server.policy)
    assert_empty(store)


def test_progress_reports_bytes_and_total(server: Server, store: ContentStore) -> None:
    body = os.urandom(3 * (1 << 20) + 17)
    url = server.serve("/progress", body)
    calls: list[tuple[int, int | None]] = []
    store.fetch(
        url,
        hashlib.sha256(body).hexdigest(),
        fetch_policy=server.policy,
        progress=lambda d, t: calls.append((d, t)),
    )
    assert calls, "progress was never called"
    assert calls[-1] == (len(body), len(body))
    done = [d for d, _ in calls]
    assert done == sorted(done)


def test_progress_total_is_none_without_content_length(server: Server, store: ContentStore) -> None:
    url = server.serve("/nolen", content_length=False)
    calls: list[tuple[int, int | None]] = []
    store.fetch(url, DIGEST, fetch_policy=server.policy, progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (len(BODY), None)


def test_keyboard_interrupt_during_download_leaves_no_temp_file(
    server: Server, store: ContentStore
) -> None:
    url = server.serve("/interrupted")
    seen: list[Path] = []

    def interrupt(done: int, total: int | None) -> None:
        # The partial file exists at this point; it must be gone afterwards.
        seen.extend(store_files(store))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.fetch(url, DIGEST, fetch_policy=server.policy, progress=interrupt)
    assert len(seen) == 1 and seen[0].name.startswith(".")
    assert_empty(store)


# --- credentials ----------------------------------------------------------------------


def test_userinfo_is_sent_as_basic_auth_but_never_recorded(
    server: Server, store: ContentStore, events: Events
) -> None:
    server.serve("/private")
    secret_url = server.url("/private").replace("http://", "http://alice:s3cr%40t@")
    [resolved] = resolve_inputs(
        [InputRequest(secret_url, DIGEST, "p")],
        store,
        fetch_policy=server.policy,
        events=events.log,
    )
    expected = "Basic " + base64.b64encode(b"alice:s3cr@t").decode()
    assert server.headers["/private"][0]["Authorization"] == expected
    assert resolved.uri == server.url("/private")
    assert events.records[0]["uri"] == server.url("/private")
    assert "s3cr" not in repr(events.records) and "alice" not in repr(events.records)


def test_credentials_do_not_follow_redirects(server: Server, store: ContentStore) -> None:
    server.serve("/elsewhere")
    url = server.redirect("/hop", server.url("/elsewhere"))
    store.fetch(url.replace("http://", "http://alice:s3cret@"), DIGEST, fetch_policy=server.policy)
    assert "Authorization" in server.headers["/hop"][0]
    assert "Authorization" not in server.headers["/elsewhere"][0]


@pytest.mark.parametrize(
    "setup",
    [
        lambda s: s.status("/private", 404),
        lambda s: s.serve("/private", b"not the pinned bytes"),
        lambda s: s.redirect("/private", "file:///etc/passwd"),
        lambda s: s.redirect("/private", "ftp://bob:hunter2@127.0.0.1/x"),
        lambda s: s.redirect("/private", s.url("/x").replace("//", "//bob:hunter2@")),
    ],
    ids=["404", "mismatch", "bad-redirect", "ftp-redirect-with-userinfo", "redirect-with-userinfo"],
)
def test_userinfo_never_appears_in_errors(
    server: Server, store: ContentStore, setup: Callable[[Server], str]
) -> None:
    url = setup(server)
    secret_url = url.replace("http://", "http://alice:s3cret@")
    with pytest.raises(InputError) as info:
        resolve_inputs([InputRequest(secret_url, DIGEST, "p")], store, fetch_policy=server.policy)
    text = f"{info.value} {info.value.hint}"
    assert url in text
    assert "s3cret" not in text and "alice" not in text and "hunter2" not in text


def test_bad_scheme_error_strips_userinfo() -> None:
    with pytest.raises(InputError) as info:
        InputRequest("ftp://alice:s3cret@127.0.0.1/x", DIGEST, "p")
    assert "s3cret" not in str(info.value)
    assert "ftp://127.0.0.1/x" in str(info.value)


# --- local files ----------------------------------------------------------------------


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A spec's directory, with a file an attacker would like to read next to it."""
    root = tmp_path / "project"
    root.mkdir()
    (tmp_path / "secret").write_bytes(SECRET)
    return root


SECRET = b"host secret: " + os.urandom(16).hex().encode()
SECRET_DIGEST = hashlib.sha256(SECRET).hexdigest()


def local(root: Path, rel: str, digest: str = DIGEST, path: str = "x") -> InputRequest:
    return InputRequest.local(root, rel, sha256=digest, path=path)


def test_local_file_input(tmp_path: Path, store: ContentStore, events: Events) -> None:
    source = tmp_path / "src" / "vendored file.bin"
    source.parent.mkdir()
    source.write_bytes(BODY)
    source.chmod(0o600)
    request = local(tmp_path, "src/vendored file.bin", path="vendor/file.bin")
    assert request.uri == source.as_uri()
    assert (request.root, request.rel) == (tmp_path, "src/vendored file.bin")

    [first] = resolve_inputs([request], store, events=events.log)
    assert first.fetched is True
    assert first.store_path.read_bytes() == BODY
    assert stat.S_IMODE(first.store_path.stat().st_mode) == 0o644
    assert source.read_bytes() == BODY

    [second] = resolve_inputs([request], store, events=events.log)
    assert second.fetched is False
    assert [r["source"] for r in events.records] == ["fetched", "store"]
    assert events.records[0]["uri"] == source.as_uri()


def test_the_label_is_the_lexical_file_uri(tmp_path: Path) -> None:
    assert local(tmp_path, "a/../b c#d").uri == (tmp_path / "b c#d").as_uri()
    assert "%20" in local(tmp_path, "b c#d").uri and "%23" in local(tmp_path, "b c#d").uri
    # The label of a path that leaves the root says where it points; reading refuses it.
    assert local(tmp_path, "/etc/shadow").uri == "file:///etc/shadow"


def test_a_file_uri_without_a_root_is_refused() -> None:
    with pytest.raises(InputError, match="a local file is read only beneath its directory"):
        InputRequest("file:///etc/shadow", DIGEST, "x")


def test_root_and_rel_must_agree_with_the_uri(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not name"):
        InputRequest("file:///etc/shadow", DIGEST, "x", root=tmp_path, rel="f")
    with pytest.raises(ValueError, match="root and rel are for local files"):
        InputRequest("https://example.org/x", DIGEST, "x", root=tmp_path, rel="f")


def test_add_file_directly(tmp_path: Path, store: ContentStore) -> None:
    (tmp_path / "f").write_bytes(BODY)
    assert store.add_file(tmp_path, "f", DIGEST) == store.path_for(DIGEST)
    with pytest.raises(InputError, match=f"expected {OTHER_DIGEST}, got {DIGEST}"):
        store.add_file(tmp_path, "f", OTHER_DIGEST)
    assert store_files(store) == [store.path_for(DIGEST)]
    with pytest.raises(InputRefusedError, match="is absolute"):
        store.add_file(tmp_path, "/etc/passwd", DIGEST)


def test_local_file_mismatch_names_its_own_digest(tmp_path: Path, store: ContentStore) -> None:
    (tmp_path / "f").write_bytes(BODY)
    with pytest.raises(InputError) as info:
        resolve_inputs([local(tmp_path, "f", OTHER_DIGEST)], store)
    assert str(info.value) == (
        f"sha256 mismatch for {(tmp_path / 'f').as_uri()}: expected {OTHER_DIGEST}, got {DIGEST}"
    )
    assert_empty(store)


def test_a_local_file_is_checked_even_when_its_digest_is_stored(
    tmp_path: Path, store: ContentStore
) -> None:
    # The build gets what its directory holds, not whatever the store has under that digest.
    (tmp_path / "good").write_bytes(BODY)
    store.add_file(tmp_path, "good", DIGEST)
    (tmp_path / "other").write_bytes(b"changed")
    with pytest.raises(InputError, match=f"expected {DIGEST}, got"):
        resolve_inputs([local(tmp_path, "other")], store)


def test_symlinks_inside_the_root_are_followed(
    tmp_path: Path, store: ContentStore, resolution: str
) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "f").write_bytes(BODY)
    (tmp_path / "link").symlink_to("real/f")
    (tmp_path / "dir").symlink_to("real")
    (tmp_path / "real" / "up").symlink_to("../real/f")
    for rel in ("link", "dir/f", "real/up", "dir/../real/f", "./real//f"):
        [resolved] = resolve_inputs([local(tmp_path, rel)], store)
        assert resolved.store_path.read_bytes() == BODY


def _absolute_symlink(project: Path) -> str:
    (project / "vendor.tar").symlink_to(project.parent / "secret")
    return "vendor.tar"


def _relative_symlink(project: Path) -> str:
    (project / "vendor.tar").symlink_to("../secret")
    return "vendor.tar"


def _directory_symlink(project: Path) -> str:
    (project / "vendor").symlink_to(project.parent)
    return "vendor/secret"


def _relative_directory_symlink(project: Path) -> str:
    (project / "deep" / "er").mkdir(parents=True)
    (project / "deep" / "er" / "vendor").symlink_to("../../..")
    return "deep/er/vendor/secret"


def _dotdot_after_symlink(project: Path) -> str:
    (project / "a" / "b").mkdir(parents=True)
    (project / "link").symlink_to("a/b")
    # Lexically inside (link/../.. is the project); physically a/b/../../.. is above it.
    return "link/../../../secret"


def _chain_of_symlinks(project: Path) -> str:
    (project / "one").symlink_to("two")
    (project / "two").symlink_to("three/../..")
    (project / "three").mkdir()
    return "one/secret"


def _hard_link(project: Path) -> str:
    os.link(project.parent / "secret", project / "vendor.tar")
    return "vendor.tar"


def _fifo(project: Path) -> str:
    os.mkfifo(project / "vendor.tar")
    return "vendor.tar"


def _directory(project: Path) -> str:
    (project / "vendor.tar").mkdir()
    return "vendor.tar"


def _socket(project: Path) -> str:
    os.mknod(project / "vendor.tar", stat.S_IFSOCK | 0o600)
    return "vendor.tar"


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    ("plant", "reason"),
    [
        (lambda p: "../secret", "leads above the root"),
        (lambda p: str(p.parent / "secret"), "is absolute"),
        (lambda p: "sub/../../secret", "does not exist"),
        (_absolute_symlink, "is a symlink to"),
        (_relative_symlink, "leads above the root"),
        (_directory_symlink, "is a symlink to"),
        (_relative_directory_symlink, "leads above the root"),
        (_dotdot_after_symlink, "leads above the root"),
        (_chain_of_symlinks, "leads above the root"),
        (_hard_link, "is a hard link"),
        (_fifo, "is a fifo, not a regular file"),
        (_directory, "is a directory, not a regular file"),
        (_socket, "is a socket, not a regular file"),
        (lambda p: "missing.tar", "does not exist"),
        (lambda p: "", "the path is empty"),
    ],
    ids=[
        "dotdot",
        "absolute",
        "dotdot-through-missing",
        "absolute-symlink",
        "relative-symlink",
        "directory-symlink",
        "relative-directory-symlink",
        "dotdot-after-symlink",
        "symlink-chain",
        "hard-link",
        "fifo",
        "directory",
        "socket",
        "missing",
        "empty",
    ],
)
def test_local_files_leaving_the_root_or_not_regular_are_refused(
    project: Path,
    store: ContentStore,
    resolution: str,
    plant: Callable[[Path], str],
    reason: str,
) -> None:
    rel = plant(project)
    # Pinned to the secret's real digest, and with that content already in the store: a
    # refusal must not depend on either.
    (project.parent / "stored").write_bytes(SECRET)
    store.add_file(project.parent, "stored", SECRET_DIGEST)
    with pytest.raises(InputRefusedError) as info:
        resolve_inputs([local(project, rel, SECRET_DIGEST)], store)
    message = str(info.value)
    assert message.startswith(f"input file {rel!r} (in {project})")
    assert reason in message
    assert "\n" not in message
    assert info.value.exit_code == 125
    assert SECRET_DIGEST not in f"{message} {info.value.hint}"
    assert SECRET.decode() not in f"{message} {info.value.hint}"


def test_a_wrong_pin_on_a_refused_file_tells_no_digest(
    project: Path, store: ContentStore, resolution: str
) -> None:
    # The oracle: pin anything, read the real digest off the mismatch error.
    rel = _absolute_symlink(project)
    with pytest.raises(InputRefusedError) as info:
        resolve_inputs([local(project, rel, OTHER_DIGEST)], store)
    assert SECRET_DIGEST not in f"{info.value} {info.value.hint}"
    assert "mismatch" not in str(info.value)
    assert_empty(store)


def test_device_is_refused_without_being_opened(store: ContentStore, resolution: str) -> None:
    with pytest.raises(InputRefusedError, match="is a device, not a regular file"):
        resolve_inputs([local(Path("/dev"), "zero")], store)
    assert_empty(store)


def test_magic_links_are_refused(store: ContentStore, resolution: str) -> None:
    # /proc/self/root is a magic link to "/": following it would leave any root.
    with pytest.raises(InputRefusedError, match=r"input file 'root/etc/hostname'"):
        resolve_inputs([local(Path("/proc/self"), "root/etc/hostname")], store)
    assert_empty(store)


def test_a_missing_root_is_refused(tmp_path: Path, store: ContentStore) -> None:
    with pytest.raises(InputRefusedError, match="does not exist"):
        resolve_inputs([local(tmp_path / "nope", "f")], store)


@pytest.mark.parametrize(
    "uri",
    [
        "file:relative/path",
        "file://otherhost/etc/passwd",
        "file:///tmp/x?query",
        "file:///tmp/x#frag",
        "file:///tmp/x%00y",
    ],
)
def test_bad_file_uris(uri: str) -> None:
    with pytest.raises(InputError):
        InputRequest(uri, DIGEST, "x")


def test_a_nul_byte_in_a_local_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="NUL"):
        local(tmp_path, "a\0b")


# --- the address guard ----------------------------------------------------------------

PUBLIC = "93.184.215.14"  # a public address no test ever connects to


#: One answer of ``socket.getaddrinfo``: an IPv4 or an IPv6 socket address.
_AddrInfo = tuple[
    socket.AddressFamily, socket.SocketKind, int, str, tuple[str, int] | tuple[str, int, int, int]
]


class Resolver:
    """A stand-in for ``socket.getaddrinfo``: some names answer what a test says."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.answers: dict[str, list[list[str]]] = {}
        self.asked: list[str] = []
        self._real = socket.getaddrinfo
        monkeypatch.setattr(socket, "getaddrinfo", self)

    def add(self, name: str, *answers: list[str]) -> None:
        """``name`` answers each list of addresses in turn, then the last one again."""
        self.answers[name] = list(answers)

    def __call__(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in self.answers:
            return self._real(host, port, *args, **kwargs)
        self.asked.append(host)
        queue = self.answers[host]
        addresses = queue.pop(0) if len(queue) > 1 else queue[0]
        result: list[_AddrInfo] = []
        for address in addresses:
            if ":" in address:
                result.append(
                    (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, int(port), 0, 0))
                )
            else:
                result.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, int(port))))
        return result


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> Resolver:
    return Resolver(monkeypatch)


@dataclass
class Connects:
    """Every connection the fetcher tried, by the checked socket addresses it was given."""

    calls: list[list[tuple[int, Any]]] = field(default_factory=list)


@pytest.fixture
def no_connect(monkeypatch: pytest.MonkeyPatch) -> Connects:
    """Record connections instead of making them (every one is refused)."""
    seen = Connects()

    def fake(checked: Any, timeout: Any) -> socket.socket:
        seen.calls.append(list(checked))
        raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")

    monkeypatch.setattr(inputs_module, "_connect", fake)
    return seen


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "localhost",
        "LocalHost",
        "127.1",
        "127.0.1",
        "0x7f000001",
        "0x7f.0.0.1",
        "2130706433",
        "0177.0.0.1",
        "127.000.000.001",
        "[::ffff:127.0.0.1]",
        "[::ffff:7f00:1]",
    ],
)
def test_loopback_in_any_spelling_is_refused_without_a_request(
    server: Server, store: ContentStore, host: str
) -> None:
    server.serve("/x")
    url = f"http://{host}:{server.port}/x"
    try:
        socket.getaddrinfo(host.strip("[]"), server.port)
    except socket.gaierror:
        pytest.skip(f"{host} does not resolve here")
    with pytest.raises(InputRefusedError) as info:
        store.fetch(url, DIGEST)
    message = str(info.value)
    assert message.startswith(f"cannot fetch {url}: ")
    assert "loopback" in message
    assert "a spec may fetch only from public addresses" in message
    assert "--allow-fetch" in message and "\n" not in message
    assert server.hits == Counter()
    assert_empty(store)


def test_the_refusal_says_what_and_how_to_allow_it(server: Server, store: ContentStore) -> None:
    url = f"http://127.0.0.1:{server.port}/x"
    with pytest.raises(InputRefusedError) as info:
        resolve_inputs([InputRequest(url, DIGEST, "x")], store)
    assert str(info.value) == (
        f"cannot fetch {url}: 127.0.0.1 is loopback; a spec may fetch only from public "
        f"addresses (an operator can allow it: --allow-fetch 127.0.0.1:{server.port})"
    )
    assert "fetch: {allow:" in str(info.value.hint)
    assert server.hits == Counter()


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "carrier-grade NAT"),
        ("169.254.169.254", "cloud metadata"),
        ("100.100.100.200", "cloud metadata"),
        ("169.254.1.1", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("0.1.2.3", "reserved"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("224.0.0.1", "multicast"),
        ("192.0.2.1", "reserved"),
        ("[::1]", "loopback"),
        ("[::]", "unspecified"),
        ("[fe80::1]", "link-local"),
        ("[fc00::1]", "unique local"),
        ("[fd00:ec2::254]", "cloud metadata"),
        ("[::ffff:169.254.169.254]", "cloud metadata"),
        ("[64:ff9b::a9fe:a9fe]", "cloud metadata via NAT64"),
        ("[2002:7f00:1::1]", "loopback via 6to4"),
        ("[2001:db8::1]", "reserved"),
    ],
)
def test_guarded_addresses_are_refused_without_connecting(
    store: ContentStore, no_connect: Connects, host: str, reason: str
) -> None:
    url = f"http://{host}/latest/meta-data/"
    with pytest.raises(InputRefusedError, match=f": {re.escape(host.strip('[]'))} is {reason};"):
        store.fetch(url, DIGEST)
    assert no_connect.calls == []


def test_a_public_name_that_resolves_to_loopback_is_refused(
    server: Server, store: ContentStore, resolver: Resolver
) -> None:
    resolver.add("files.example.org", ["127.0.0.1"])
    url = f"http://files.example.org:{server.port}/x"
    with pytest.raises(InputRefusedError) as info:
        store.fetch(url, DIGEST)
    assert "files.example.org resolves to 127.0.0.1, which is loopback" in str(info.value)
    assert f"--allow-fetch files.example.org:{server.port}" in str(info.value)
    assert server.hits == Counter()


def test_one_guarded_address_among_public_ones_is_refused(
    store: ContentStore, resolver: Resolver, no_connect: Connects
) -> None:
    # A rebinding server answers a public address and the one it is after.
    resolver.add("mixed.example.org", [PUBLIC, "127.0.0.1"])
    with pytest.raises(InputRefusedError, match=r"resolves to 127.0.0.1, which is loopback"):
        store.fetch("http://mixed.example.org/x", DIGEST)
    resolver.add("mixed6.example.org", ["2606:2800:21f:cb07:6820:80da:af6b:8b2c", "::1"])
    with pytest.raises(InputRefusedError, match="resolves to ::1, which is loopback"):
        store.fetch("http://mixed6.example.org/x", DIGEST)
    assert no_connect.calls == []


def test_a_public_address_is_connected_to_as_checked(
    store: ContentStore, resolver: Resolver, no_connect: Connects
) -> None:
    resolver.add("files.example.org", [PUBLIC], ["127.0.0.1"])
    with pytest.raises(InputError, match="Connection refused"):
        store.fetch("http://files.example.org/x", DIGEST)
    assert no_connect.calls == [[(socket.AF_INET, (PUBLIC, 80))]]
    assert resolver.asked == ["files.example.org"]


def test_the_connection_goes_to_the_checked_address_not_a_new_lookup(
    server: Server, store: ContentStore, resolver: Resolver
) -> None:
    # The first answer is granted; any later lookup would answer an address nothing
    # listens on. The fetch works only if the connection uses the checked address.
    server.serve("/x")
    resolver.add("pinned.example.org", ["127.0.0.1"], ["127.0.0.2"])
    url = f"http://pinned.example.org:{server.port}/x"
    assert store.fetch(url, DIGEST, fetch_policy=server.policy).read_bytes() == BODY
    assert resolver.asked == ["pinned.example.org"]
    assert server.headers["/x"][0]["Host"] == f"pinned.example.org:{server.port}"


def test_a_name_that_does_not_resolve(store: ContentStore, resolver: Resolver) -> None:
    resolver.add("nothing.example.org", [])
    with pytest.raises(InputRefusedError, match=r"nothing.example.org resolves to no address"):
        store.fetch("http://nothing.example.org/x", DIGEST)
    with pytest.raises(InputError, match=r"cannot resolve no-such-host\.invalid: "):
        store.fetch("http://no-such-host.invalid/x", DIGEST)


# --- redirects ------------------------------------------------------------------------


@pytest.fixture
def second() -> Iterator[Server]:
    with _serving("127.0.0.1") as srv:
        yield srv


def test_a_redirect_to_loopback_is_refused(
    server: Server, second: Server, store: ContentStore
) -> None:
    second.serve("/x")
    target = second.url("/x")
    url = server.redirect("/hop", target)
    with pytest.raises(InputRefusedError) as info:
        store.fetch(url, DIGEST, fetch_policy=server.policy)
    assert str(info.value).startswith(
        f"cannot fetch {url}: redirected to {target}: 127.0.0.1 is loopback; "
    )
    assert f"--allow-fetch 127.0.0.1:{second.port}" in str(info.value)
    assert server.hits == Counter({"/hop": 1})
    assert second.hits == Counter()
    # Granted too, it is followed.
    both = server.policy.merged(second.policy)
    assert store.fetch(url, DIGEST, fetch_policy=both).read_bytes() == BODY
    assert second.hits == Counter({"/x": 1})


def test_a_redirect_to_ipv6_loopback_is_refused(server: Server, store: ContentStore) -> None:
    try:
        ctx = _serving("::1")
        v6 = ctx.__enter__()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    try:
        v6.serve("/x")
        url = server.redirect("/hop", f"http://[::1]:{v6.port}/x")
        with pytest.raises(InputRefusedError, match=r"redirected to http://\[::1\]:\d+/x: ::1 is"):
            store.fetch(url, DIGEST, fetch_policy=server.policy)
        assert v6.hits == Counter()
        grant = server.policy.merged(FetchPolicy.from_strings([f"[::1]:{v6.port}"]))
        assert store.fetch(url, DIGEST, fetch_policy=grant).read_bytes() == BODY
    finally:
        ctx.__exit__(None, None, None)


@pytest.mark.parametrize(
    "location",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:10.0.0.1]/",
        "http://0x7f000001/",
        "https://localhost/",
        "http://rebind.example.org/",
    ],
)
def test_redirects_to_guarded_destinations_are_refused(
    server: Server, store: ContentStore, resolver: Resolver, location: str
) -> None:
    resolver.add("rebind.example.org", ["10.0.0.7"])
    url = server.redirect("/hop", location)
    with pytest.raises(InputRefusedError, match=r"redirected to .*; a spec may fetch only"):
        store.fetch(url, DIGEST, fetch_policy=server.policy)
    assert server.hits == Counter({"/hop": 1})


def test_a_name_grant_covers_what_the_name_resolves_to(
    server: Server, store: ContentStore, resolver: Resolver
) -> None:
    server.serve("/x")
    resolver.add("mirror.internal", ["127.0.0.1"])
    url = f"http://mirror.internal:{server.port}/x"
    grant = FetchPolicy.from_strings([f"mirror.internal:{server.port}"])
    assert store.fetch(url, DIGEST, fetch_policy=grant).read_bytes() == BODY
    # The grant is for that name and port only.
    for other in (
        [f"mirror.internal:{server.port + 1}"],
        ["other.internal"],
        ["*.mirror.internal"],
    ):
        with pytest.raises(InputRefusedError):
            store.fetch(url, OTHER_DIGEST, fetch_policy=FetchPolicy.from_strings(other))


def test_a_wildcard_grant(server: Server, store: ContentStore, resolver: Resolver) -> None:
    server.serve("/x")
    resolver.add("a.mirror.internal", ["127.0.0.1"])
    url = f"http://a.mirror.internal:{server.port}/x"
    grant = FetchPolicy.from_strings([f"*.mirror.internal:{server.port}"])
    assert store.fetch(url, DIGEST, fetch_policy=grant).read_bytes() == BODY


def test_an_address_grant_is_for_its_port(server: Server, store: ContentStore) -> None:
    server.serve("/x")
    url = server.url("/x")
    for grant in ([f"127.0.0.1:{server.port + 1}"], [f"127.0.0.2:{server.port}"]):
        with pytest.raises(InputRefusedError):
            store.fetch(url, DIGEST, fetch_policy=FetchPolicy.from_strings(grant))
    cidr = FetchPolicy.from_strings([f"127.0.0.0/8:{server.port}"])
    assert store.fetch(url, DIGEST, fetch_policy=cidr).read_bytes() == BODY
    assert server.hits == Counter({"/x": 1})


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "localhost", "127.1", "0x7f000001", "[::ffff:127.0.0.1]"]
)
def test_the_suggested_grant_allows_the_fetch(
    server: Server, store: ContentStore, host: str
) -> None:
    server.serve("/x")
    url = f"http://{host}:{server.port}/x"
    with pytest.raises(InputRefusedError) as info:
        store.fetch(url, DIGEST)
    match = re.search(r"--allow-fetch (\S+)\)$", str(info.value))
    assert match is not None
    grant = FetchPolicy.from_strings([match.group(1)])
    assert store.fetch(url, DIGEST, fetch_policy=grant).read_bytes() == BODY


# --- the policy itself ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("grants", "host", "port", "addresses", "expected"),
    [
        ([], "example.org", 443, ["93.184.215.14"], None),
        ([], "example.org", 443, ["2606:2800:21f:cb07:6820:80da:af6b:8b2c"], None),
        ([], "127.0.0.1", 80, ["127.0.0.1"], "127.0.0.1 is loopback;"),
        ([], "::1", 80, ["::1"], "::1 is loopback;"),
        ([], "x.org", 80, ["10.0.0.1"], "x.org resolves to 10.0.0.1, which is private;"),
        ([], "x.org", 80, [], "x.org resolves to no address"),
        ([], "x.org", 80, ["bogus"], "which is not an IP address"),
        (["10.0.0.1:80"], "x.org", 80, ["10.0.0.1"], None),
        (["10.0.0.1:80"], "x.org", 8080, ["10.0.0.1"], "private"),
        (["10.0.0.0/8:80"], "x.org", 80, ["10.0.0.1", "10.9.9.9"], None),
        (["10.0.0.1:80"], "x.org", 80, ["10.0.0.1", "10.0.0.2"], "10.0.0.2, which is private"),
        (["x.org"], "x.org", 80, ["10.0.0.1", "::1"], None),
        (["x.org"], "x.org", 443, ["169.254.169.254"], None),
        (["x.org"], "x.org", 8080, ["10.0.0.1"], "--allow-fetch x.org:8080"),
        (["x.org"], "y.org", 80, ["10.0.0.1"], "--allow-fetch y.org:80"),
        (["*.x.org"], "a.x.org", 80, ["10.0.0.1"], None),
        (["*.x.org"], "x.org", 80, ["10.0.0.1"], "private"),
        (["127.0.0.1:80"], "::ffff:127.0.0.1", 80, ["::ffff:127.0.0.1"], None),
        ([], "::ffff:127.0.0.1", 80, ["::ffff:127.0.0.1"], "--allow-fetch 127.0.0.1:80"),
        (["127.0.0.1:80"], "127.1", 80, ["127.0.0.1"], None),
        ([], "127.1", 80, ["127.0.0.1"], "--allow-fetch 127.0.0.1:80"),
        # An address grant does not make a name grant, nor the reverse.
        (["10.0.0.1:80"], "10.0.0.2", 80, ["10.0.0.2"], "10.0.0.2 is private;"),
    ],
)
def test_fetch_policy_refusal(
    grants: list[str], host: str, port: int, addresses: list[str], expected: str | None
) -> None:
    problem = FetchPolicy.from_strings(grants).refusal(host, port, addresses)
    if expected is None:
        assert problem is None
    else:
        assert problem is not None and expected in problem


def test_fetch_policy_from_strings_and_merged() -> None:
    one = FetchPolicy.from_strings(["mirror.internal:8080", "10.0.0.5:443", "mirror.internal:8080"])
    assert one.describe() == ["mirror.internal:8080", "10.0.0.5:443"]
    two = one.merged(FetchPolicy.from_strings(["[fd00::1]:80", "10.0.0.5:443"]))
    assert two.describe() == ["mirror.internal:8080", "10.0.0.5:443", "[fd00::1]:80"]
    assert FetchPolicy().entries == ()
    with pytest.raises(ConfigError, match="invalid allow entry 'http://x'"):
        FetchPolicy.from_strings(["http://x"])
    with pytest.raises(TypeError):
        FetchPolicy.from_strings("10.0.0.5:443")


# --- TLS ------------------------------------------------------------------------------


@dataclass
class Tls:
    port: int
    ca: Path
    names: list[str | None] = field(default_factory=list)


@pytest.fixture
def tls_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Tls]:
    """An HTTPS server on 127.0.0.1 whose certificate is for mirror.test only."""
    import datetime
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "buildcell test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mirror.test")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(2)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("mirror.test")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    chain = tmp_path / "leaf.pem"
    chain.write_bytes(
        leaf.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(chain)
    names: list[str | None] = []

    def record(sock: Any, name: str | None, ctx: Any) -> None:
        names.append(name)

    context.sni_callback = record

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            send_body(self, BODY)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = _QuietServer(("127.0.0.1", 0), Handler)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()

    def trusting() -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(ca_file))

    monkeypatch.setattr(inputs_module, "_tls_context", trusting)
    try:
        yield Tls(int(httpd.server_address[1]), ca_file, names)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def test_tls_verifies_the_name_while_connecting_to_the_checked_address(
    tls_server: Tls, store: ContentStore, resolver: Resolver
) -> None:
    resolver.add("mirror.test", ["127.0.0.1"], ["127.0.0.2"])
    resolver.add("other.test", ["127.0.0.1"])
    grant = FetchPolicy.from_strings([f"127.0.0.1:{tls_server.port}"])
    url = f"https://mirror.test:{tls_server.port}/x"
    assert store.fetch(url, DIGEST, fetch_policy=grant).read_bytes() == BODY
    assert tls_server.names == ["mirror.test"]
    assert resolver.asked == ["mirror.test"]
    # The same address under a name the certificate is not for: refused by TLS.
    with pytest.raises(InputError, match="TLS certificate verification failed: Hostname mismatch"):
        store.fetch(f"https://other.test:{tls_server.port}/x", OTHER_DIGEST, fetch_policy=grant)
    # And by address, which the certificate does not name either.
    with pytest.raises(InputError, match="TLS certificate verification failed"):
        store.fetch(f"https://127.0.0.1:{tls_server.port}/x", OTHER_DIGEST, fetch_policy=grant)


# --- proxies --------------------------------------------------------------------------


@dataclass
class Proxy:
    port: int
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    """A forward proxy that records what it is asked and answers it itself."""
    state: dict[str, Proxy] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state["p"].requests.append(("GET", self.path, dict(self.headers.items())))
            send_body(self, BODY)

        def do_CONNECT(self) -> None:
            state["p"].requests.append(("CONNECT", self.path, dict(self.headers.items())))
            self.send_error(403)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = _QuietServer(("127.0.0.1", 0), Handler)
    state["p"] = Proxy(int(httpd.server_address[1]))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield state["p"]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def test_a_proxy_gets_public_targets_checked_first(
    proxy: Proxy, store: ContentStore, resolver: Resolver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The proxy is the operator's: on loopback, and still used.
    monkeypatch.setenv("http_proxy", f"http://ops:pw@127.0.0.1:{proxy.port}")
    resolver.add("files.example.org", [PUBLIC])
    url = "http://alice:s3cret@files.example.org/pkg?v=1#frag"
    assert store.fetch(url, DIGEST).read_bytes() == BODY
    [(method, target, headers)] = proxy.requests
    assert (method, target) == ("GET", "http://files.example.org/pkg?v=1")
    assert headers["Host"] == "files.example.org"
    assert headers["Proxy-Authorization"] == "Basic " + base64.b64encode(b"ops:pw").decode()
    assert headers["Authorization"] == "Basic " + base64.b64encode(b"alice:s3cret").decode()
    assert resolver.asked == ["files.example.org"]


def test_a_proxy_never_gets_a_guarded_target(
    proxy: Proxy, store: ContentStore, resolver: Resolver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("http_proxy", f"127.0.0.1:{proxy.port}")
    monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{proxy.port}")
    resolver.add("rebind.example.org", ["10.0.0.7"])
    for url in (
        "http://169.254.169.254/latest/meta-data/",
        "http://127.0.0.1:9/x",
        "http://rebind.example.org/x",
        "https://rebind.example.org/x",
        "https://[::1]/x",
    ):
        with pytest.raises(InputRefusedError):
            store.fetch(url, DIGEST)
    assert proxy.requests == []
    # Granted, the target goes through the proxy like any other.
    grant = FetchPolicy.from_strings(["rebind.example.org"])
    assert store.fetch("http://rebind.example.org/x", DIGEST, fetch_policy=grant)
    assert [r[1] for r in proxy.requests] == ["http://rebind.example.org/x"]


def test_https_through_a_proxy_is_tunnelled_to_the_checked_target(
    proxy: Proxy, store: ContentStore, resolver: Resolver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{proxy.port}")
    resolver.add("files.example.org", [PUBLIC])
    with pytest.raises(InputError, match="403"):
        store.fetch("https://files.example.org/pkg", DIGEST)
    assert [(m, t) for m, t, _ in proxy.requests] == [("CONNECT", "files.example.org:443")]


def test_no_proxy_is_respected(
    server: Server, proxy: Proxy, store: ContentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.serve("/x")
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    assert store.fetch(server.url("/x"), DIGEST, fetch_policy=server.policy)
    assert proxy.requests == []
    assert server.hits == Counter({"/x": 1})


def test_an_unsupported_proxy_is_an_error(
    store: ContentStore, resolver: Resolver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("http_proxy", "socks5://user:pw@127.0.0.1:1080")
    resolver.add("files.example.org", [PUBLIC])
    with pytest.raises(
        InputError, match=r"unsupported http_proxy socks5://127\.0\.0\.1:1080"
    ) as info:
        store.fetch("http://files.example.org/x", DIGEST)
    assert "pw" not in str(info.value)


# --- the store ------------------------------------------------------------------------


def test_corrupt_entry_is_removed_and_fetched_again(
    server: Server, store: ContentStore, caplog: pytest.LogCaptureFixture
) -> None:
    url = server.serve("/pkg")
    request = InputRequest(url, DIGEST, "pkg")
    [first] = resolve_inputs([request], store, fetch_policy=server.policy)
    first.store_path.write_bytes(b"tampered" + BODY[8:])

    with caplog.at_level(logging.WARNING, logger="buildcell.supply.inputs"):
        assert store.lookup(DIGEST) is None
    assert not first.store_path.exists()
    assert "corrupt" in caplog.text

    first.store_path.write_bytes(b"tampered again")
    [again] = resolve_inputs([request], store, fetch_policy=server.policy)
    assert again.fetched is True
    assert again.store_path.read_bytes() == BODY
    assert server.hits["/pkg"] == 2
    assert store.lookup(DIGEST) == again.store_path


def test_lookup_rehashes_on_every_use(
    store: ContentStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "f").write_bytes(BODY)
    store.add_file(tmp_path, "f", DIGEST)
    hashed: list[int] = []
    real = inputs_module._hash_fd

    def counting(fd: int) -> tuple[str, int]:
        hashed.append(fd)
        return real(fd)

    monkeypatch.setattr(inputs_module, "_hash_fd", counting)
    assert store.lookup(DIGEST) == store.path_for(DIGEST)
    assert store.lookup(DIGEST) == store.path_for(DIGEST)
    assert len(hashed) == 2


def test_lookup_of_absent_entry(store: ContentStore) -> None:
    assert store.lookup(DIGEST) is None


def test_symlink_planted_in_the_store_is_never_followed(
    store: ContentStore, tmp_path: Path
) -> None:
    target = tmp_path / "outside"
    target.write_bytes(BODY)
    entry = store.path_for(DIGEST)
    entry.parent.mkdir(parents=True)
    entry.symlink_to(target)
    assert store.lookup(DIGEST) is None
    assert not entry.is_symlink()
    assert target.read_bytes() == BODY


def test_fifo_planted_in_the_store_is_discarded(store: ContentStore) -> None:
    entry = store.path_for(DIGEST)
    entry.parent.mkdir(parents=True)
    os.mkfifo(entry)
    assert store.lookup(DIGEST) is None
    assert not entry.exists()


def test_store_root_is_created_with_mode_0711(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        store = ContentStore(tmp_path / "deep" / "cas")
    finally:
        os.umask(old)
    assert stat.S_IMODE(store.root.stat().st_mode) == 0o711
    assert stat.S_IMODE((store.root / "sha256").stat().st_mode) == 0o711


def test_concurrent_fetches_of_one_digest(server: Server, store: ContentStore) -> None:
    body = os.urandom(4 << 20)
    digest = hashlib.sha256(body).hexdigest()
    url = server.serve("/shared", body)
    barrier = threading.Barrier(2)
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait(5)
            results.append(store.fetch(url, digest, fetch_policy=server.policy))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert results == [store.path_for(digest)] * 2
    assert store_files(store) == [store.path_for(digest)]
    assert store.path_for(digest).read_bytes() == body
    assert server.hits["/shared"] == 2


# --- digest validation ----------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    ["", "abc", DIGEST[:-1], DIGEST + "0", "g" * 64, f" {DIGEST[1:]}", f"{DIGEST[:-1]}\n"],
)
def test_malformed_digests_are_refused(bad: str, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="expected 64 hex digits"):
        InputRequest("https://127.0.0.1/x", bad, "x")
    with pytest.raises(InputError):
        ContentStore(tmp_path / "cas").path_for(bad)


@given(st.text(max_size=70) | st.from_regex(r"[0-9a-fA-F]{64}", fullmatch=True))
def test_digest_validation_accepts_exactly_64_hex(text: str) -> None:
    is_hex = len(text) == 64 and all(c in "0123456789abcdefABCDEF" for c in text)
    if not is_hex:
        with pytest.raises(InputError, match="expected 64 hex digits") as info:
            InputRequest("https://127.0.0.1/x", text, "x")
        assert "\n" not in str(info.value)
        return
    assert InputRequest("https://127.0.0.1/x", text, "x").sha256 == text.lower()


@given(st.text(max_size=70))
def test_path_for_accepts_exactly_64_hex(text: str) -> None:
    store = ContentStore.__new__(ContentStore)
    store.root = Path("/nonexistent/cas")
    try:
        path = store.path_for(text)
    except InputError:
        return
    assert path == Path("/nonexistent/cas/sha256") / text.lower()[:2] / text.lower()
