"""Pinned inputs: fetching against a local HTTP server, local files, and the content store."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
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
import buildcell.inputs as inputs_module
from buildcell.audit import EventLog
from buildcell.errors import InputError
from buildcell.inputs import ContentStore, InputRequest, ResolvedInput, resolve_inputs

BODY = b"hello, pinned world\n" * 1000
DIGEST = hashlib.sha256(BODY).hexdigest()
OTHER_DIGEST = hashlib.sha256(b"something else").hexdigest()

Route = Callable[[BaseHTTPRequestHandler], None]


# --- a local HTTP server --------------------------------------------------------------


@dataclass
class Server:
    base: str
    routes: dict[str, Route] = field(default_factory=dict)
    hits: Counter[str] = field(default_factory=Counter)
    headers: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    release: threading.Event = field(default_factory=threading.Event)

    def url(self, path: str) -> str:
        return self.base + path

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


@pytest.fixture
def server() -> Iterator[Server]:
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

    httpd = _QuietServer(("127.0.0.1", 0), Handler)
    host, port = httpd.server_address[:2]
    srv = Server(base=f"http://{host!s}:{port}")
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

    [first] = resolve_inputs([request], store, events=events.log, step="fetch")

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
    assert server.headers["/pkg.tar.gz"][0]["User-Agent"] == f"buildcell/{buildcell.__version__}"

    [second] = resolve_inputs([request], store, events=events.log, step="fetch")
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
    assert store.fetch(url, DIGEST).read_bytes() == BODY


def test_fetch_follows_redirect_to_http(server: Server, store: ContentStore) -> None:
    server.serve("/real")
    url = server.redirect("/moved", server.url("/real"), code=301)
    assert store.fetch(url, DIGEST).read_bytes() == BODY
    assert server.hits == Counter({"/moved": 1, "/real": 1})


def test_resolve_inputs_processes_requests_in_order(server: Server, store: ContentStore) -> None:
    other = b"second input"
    requests = [
        InputRequest(server.serve("/one"), DIGEST, "one"),
        InputRequest(server.serve("/two", other), hashlib.sha256(other).hexdigest(), "two"),
    ]
    resolved = resolve_inputs(requests, store)
    assert [r.path for r in resolved] == ["one", "two"]
    assert resolved[1].store_path.read_bytes() == other


def test_digest_mismatch_names_both_digests_and_keeps_nothing(
    server: Server, store: ContentStore
) -> None:
    url = server.serve("/x.tar.gz")
    with pytest.raises(InputError) as info:
        resolve_inputs([InputRequest(url, OTHER_DIGEST, "x")], store)
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
        (lambda s: s.redirect("/loop", "/loop"), "HTTP 30"),
    ],
    ids=["404", "500", "truncated", "timeout", "timeout-mid-body", "to-file", "to-ftp", "loop"],
)
def test_fetch_failures_are_input_errors_and_leave_nothing(
    server: Server, store: ContentStore, setup: Callable[[Server], str], reason: str
) -> None:
    url = setup(server)
    started = time.monotonic()
    with pytest.raises(InputError) as info:
        store.fetch(url, DIGEST, timeout=0.5)
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
    with pytest.raises(InputError, match=r"^cannot fetch http://127\.0\.0\.1:\d+/x: .*refused"):
        store.fetch(url, DIGEST, timeout=2)
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
        store.fetch(url, DIGEST)
    assert_empty(store)


def test_body_over_the_limit_without_content_length_is_cut_off(
    server: Server, store: ContentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inputs_module, "MAX_INPUT_SIZE", 1000)
    url = server.serve("/big", content_length=False)
    with pytest.raises(InputError, match="larger than the limit"):
        store.fetch(url, DIGEST)
    assert_empty(store)


def test_progress_reports_bytes_and_total(server: Server, store: ContentStore) -> None:
    body = os.urandom(3 * (1 << 20) + 17)
    url = server.serve("/progress", body)
    calls: list[tuple[int, int | None]] = []
    store.fetch(url, hashlib.sha256(body).hexdigest(), progress=lambda d, t: calls.append((d, t)))
    assert calls, "progress was never called"
    assert calls[-1] == (len(body), len(body))
    done = [d for d, _ in calls]
    assert done == sorted(done)


def test_progress_total_is_none_without_content_length(server: Server, store: ContentStore) -> None:
    url = server.serve("/nolen", content_length=False)
    calls: list[tuple[int, int | None]] = []
    store.fetch(url, DIGEST, progress=lambda d, t: calls.append((d, t)))
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
        store.fetch(url, DIGEST, progress=interrupt)
    assert len(seen) == 1 and seen[0].name.startswith(".")
    assert_empty(store)


# --- credentials ----------------------------------------------------------------------


def test_userinfo_is_sent_as_basic_auth_but_never_recorded(
    server: Server, store: ContentStore, events: Events
) -> None:
    server.serve("/private")
    secret_url = server.url("/private").replace("http://", "http://alice:s3cr%40t@")
    [resolved] = resolve_inputs([InputRequest(secret_url, DIGEST, "p")], store, events=events.log)
    expected = "Basic " + base64.b64encode(b"alice:s3cr@t").decode()
    assert server.headers["/private"][0]["Authorization"] == expected
    assert resolved.uri == server.url("/private")
    assert events.records[0]["uri"] == server.url("/private")
    assert "s3cr" not in repr(events.records) and "alice" not in repr(events.records)


def test_credentials_do_not_follow_redirects(server: Server, store: ContentStore) -> None:
    server.serve("/elsewhere")
    url = server.redirect("/hop", server.url("/elsewhere"))
    store.fetch(url.replace("http://", "http://alice:s3cret@"), DIGEST)
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
        resolve_inputs([InputRequest(secret_url, DIGEST, "p")], store)
    text = f"{info.value} {info.value.hint}"
    assert url in text
    assert "s3cret" not in text and "alice" not in text and "hunter2" not in text


def test_bad_scheme_error_strips_userinfo() -> None:
    with pytest.raises(InputError) as info:
        InputRequest("ftp://alice:s3cret@127.0.0.1/x", DIGEST, "p")
    assert "s3cret" not in str(info.value)
    assert "ftp://127.0.0.1/x" in str(info.value)


# --- local files ----------------------------------------------------------------------


def test_local_file_input(tmp_path: Path, store: ContentStore, events: Events) -> None:
    source = tmp_path / "src" / "vendored file.bin"
    source.parent.mkdir()
    source.write_bytes(BODY)
    source.chmod(0o600)
    request = InputRequest(source.as_uri(), DIGEST, "vendor/file.bin")

    [first] = resolve_inputs([request], store, events=events.log)
    assert first.fetched is True
    assert first.store_path.read_bytes() == BODY
    assert stat.S_IMODE(first.store_path.stat().st_mode) == 0o644
    assert source.read_bytes() == BODY

    [second] = resolve_inputs([request], store, events=events.log)
    assert second.fetched is False
    assert [r["source"] for r in events.records] == ["fetched", "store"]
    assert events.records[0]["uri"] == source.as_uri()


def test_add_file_directly(tmp_path: Path, store: ContentStore) -> None:
    source = tmp_path / "f"
    source.write_bytes(BODY)
    assert store.add_file(source, DIGEST) == store.path_for(DIGEST)
    with pytest.raises(InputError, match=f"expected {OTHER_DIGEST}, got {DIGEST}"):
        store.add_file(source, OTHER_DIGEST)
    assert store_files(store) == [store.path_for(DIGEST)]


def test_local_file_mismatch(tmp_path: Path, store: ContentStore) -> None:
    source = tmp_path / "f"
    source.write_bytes(BODY)
    with pytest.raises(InputError) as info:
        resolve_inputs([InputRequest(source.as_uri(), OTHER_DIGEST, "f")], store)
    assert str(info.value) == (
        f"sha256 mismatch for {source.as_uri()}: expected {OTHER_DIGEST}, got {DIGEST}"
    )
    assert_empty(store)


def test_missing_local_file(tmp_path: Path, store: ContentStore) -> None:
    missing = tmp_path / "nope.tar.gz"
    with pytest.raises(InputError, match=f"input file {missing} does not exist"):
        resolve_inputs([InputRequest(missing.as_uri(), DIGEST, "x")], store)
    assert_empty(store)


def test_directory_is_not_an_input(tmp_path: Path, store: ContentStore) -> None:
    with pytest.raises(InputError, match=f"input {tmp_path} is a directory, not a regular file"):
        resolve_inputs([InputRequest(tmp_path.as_uri(), DIGEST, "x")], store)
    assert_empty(store)


@pytest.mark.timeout(10)
def test_fifo_is_refused_without_blocking(tmp_path: Path, store: ContentStore) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="is a fifo, not a regular file"):
        resolve_inputs([InputRequest(fifo.as_uri(), DIGEST, "x")], store)
    assert_empty(store)


def test_device_is_refused(store: ContentStore) -> None:
    with pytest.raises(InputError, match="is a device, not a regular file"):
        resolve_inputs([InputRequest("file:///dev/zero", DIGEST, "x")], store)
    assert_empty(store)


def test_symlink_to_a_file_is_followed(tmp_path: Path, store: ContentStore) -> None:
    # Local inputs are the user's own files; only the content is trusted, via its digest.
    target = tmp_path / "real"
    target.write_bytes(BODY)
    link = tmp_path / "link"
    link.symlink_to(target)
    [resolved] = resolve_inputs([InputRequest(link.as_uri(), DIGEST, "x")], store)
    assert resolved.store_path.read_bytes() == BODY


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


def test_file_uri_localhost_and_percent_encoding(tmp_path: Path, store: ContentStore) -> None:
    source = tmp_path / "a b#c.txt"
    source.write_bytes(BODY)
    uri = "file://localhost" + source.as_uri().removeprefix("file://")
    assert "%20" in uri and "%23" in uri
    [resolved] = resolve_inputs([InputRequest(uri, DIGEST, "x")], store)
    assert resolved.store_path.read_bytes() == BODY


# --- the store ------------------------------------------------------------------------


def test_corrupt_entry_is_removed_and_fetched_again(
    server: Server, store: ContentStore, caplog: pytest.LogCaptureFixture
) -> None:
    url = server.serve("/pkg")
    request = InputRequest(url, DIGEST, "pkg")
    [first] = resolve_inputs([request], store)
    first.store_path.write_bytes(b"tampered" + BODY[8:])

    with caplog.at_level(logging.WARNING, logger="buildcell.inputs"):
        assert store.lookup(DIGEST) is None
    assert not first.store_path.exists()
    assert "corrupt" in caplog.text

    first.store_path.write_bytes(b"tampered again")
    [again] = resolve_inputs([request], store)
    assert again.fetched is True
    assert again.store_path.read_bytes() == BODY
    assert server.hits["/pkg"] == 2
    assert store.lookup(DIGEST) == again.store_path


def test_lookup_rehashes_on_every_use(
    store: ContentStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "f"
    source.write_bytes(BODY)
    store.add_file(source, DIGEST)
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
            results.append(store.fetch(url, digest))
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
