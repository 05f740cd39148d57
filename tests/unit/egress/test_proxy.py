"""The egress service on host loopback sockets: HTTP handling, robustness, resource hygiene.

These drive the real service (the same code that serves a cell's namespace), with its
listeners bound on the host's loopback instead, so that hostile clients can be scripted
precisely. The tests through real cells are in tests/integration/test_network.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.netservers import Served, echo_server, exchange, http_origin, loopback_egress

from buildcell.cell.netns import Listener


@contextlib.contextmanager
def serve(*allow: str, transparent: tuple[int, ...] = (), **kw: Any) -> Iterator[Served]:
    with loopback_egress(*allow, transparent=transparent, **kw) as served:
        yield served
    assert served.service.closed


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _eventually(check: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


# -- requests --------------------------------------------------------------------------


def _both(port: int) -> tuple[str, str]:
    return f"api.test:{port}", f"127.0.0.1:{port}"


def test_forward_request() -> None:
    with http_origin("a") as origin, serve(*_both(origin.port)) as s:
        reply = exchange(
            s.port,
            f"GET http://api.test:{origin.port}/p?q=1 HTTP/1.1\r\nHost: api.test\r\n"
            "Proxy-Connection: keep-alive\r\nConnection: close\r\n\r\n".encode(),
        )
    assert reply.startswith(b"HTTP/1.1 200")
    assert reply.endswith(b"hello from a /p?q=1\n")
    assert origin.hits == ["/p?q=1"]
    (allow,) = s.of("net.allow")
    assert allow["path"] == "/p"


@pytest.mark.parametrize(
    ("request_line", "status", "words"),
    [
        (b"GET /relative HTTP/1.1", b"400", b"absolute http URL"),
        (b"GET https://api.test/ HTTP/1.1", b"400", b"CONNECT"),
        (b"CONNECT api.test HTTP/1.1", b"400", b"HOST:PORT"),
        (b"CONNECT api.test:0 HTTP/1.1", b"400", b"HOST:PORT"),
        (b"CONNECT bad_host!:443 HTTP/1.1", b"400", b"HOST:PORT"),
        (b"GET http://exa mple/ HTTP/1.1", b"400", b""),
        (b"GET http://[::1/ HTTP/1.1", b"400", b""),
    ],
)
def test_bad_requests_get_400(request_line: bytes, status: bytes, words: bytes) -> None:
    with serve("api.test") as s:
        reply = exchange(s.port, request_line + b"\r\nHost: x\r\n\r\n")
    assert reply.split(b" ", 2)[1] == status, reply
    assert words in reply


def test_oversized_head_is_refused() -> None:
    with serve("api.test") as s:
        reply = exchange(
            s.port, b"GET http://api.test/ HTTP/1.1\r\nX: " + b"a" * 200_000 + b"\r\n\r\n"
        )
    assert reply.split(b" ", 2)[1] in (b"431", b"400")


def test_smuggling_with_both_framings_is_refused() -> None:
    with http_origin("a") as origin, serve(*_both(origin.port)) as s:
        reply = exchange(
            s.port,
            f"POST http://api.test:{origin.port}/ HTTP/1.1\r\nHost: a\r\n"
            "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".encode(),
        )
    assert reply.split(b" ", 2)[1] == b"400"
    assert origin.hits == []


def test_denied_request_body_is_not_forwarded_and_explains() -> None:
    with serve("api.test:1") as s:
        reply = exchange(
            s.port,
            b"POST http://other.test:8080/x HTTP/1.1\r\nHost: other.test\r\n"
            b"Content-Length: 5\r\n\r\nhello",
        )
    assert reply.startswith(b"HTTP/1.1 403")
    assert b"--allow other.test:8080" in reply
    (deny,) = s.of("net.deny")
    assert deny["mode"] == "proxy"
    assert deny["method"] == "POST"


def test_unresolvable_name_is_denied_with_a_reason() -> None:
    with serve("nowhere.invalid:80", pinned={}) as s:
        reply = exchange(
            s.port, b"GET http://nowhere.invalid/ HTTP/1.1\r\nHost: nowhere.invalid\r\n\r\n"
        )
    assert reply.startswith(b"HTTP/1.1 403")
    assert b"resolve" in reply


def test_upstream_refusing_gives_502() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    with serve(*_both(closed_port)) as s:
        reply = exchange(
            s.port, f"CONNECT api.test:{closed_port} HTTP/1.1\r\nHost: api.test\r\n\r\n".encode()
        )
    assert reply.startswith(b"HTTP/1.1 502")
    (allow,) = s.of("net.allow")
    assert allow["error"]


def test_half_closed_client_still_gets_its_reply() -> None:
    with echo_server() as port, serve(*_both(port)) as s:
        reply = exchange(
            s.port, f"CONNECT api.test:{port} HTTP/1.1\r\nHost: api.test\r\n\r\nping".encode()
        )
    assert reply.startswith(b"HTTP/1.1 200")
    assert reply.endswith(b"\r\n\r\nping")
    _eventually(lambda: s.of("net.allow"))
    assert s.of("net.allow")[0]["bytes_up"] == 4


def test_transparent_connection_to_a_synthetic_address() -> None:
    # On the host the listener is bound to 127.0.0.1 only, so the "synthetic" address a
    # client reaches is 127.0.0.1; the policy allows it literally to stand in.
    with (
        echo_server() as port,
        serve(f"127.0.0.1:{port}", transparent=(port,)) as s,
        socket.create_connection(("127.0.0.1", s.transparent[port]), timeout=5) as c,
    ):
        c.sendall(b"through")
        c.shutdown(socket.SHUT_WR)
        assert c.recv(100) == b"through"
    _eventually(lambda: s.of("net.allow"))
    assert s.of("net.allow")[0]["mode"] == "transparent"


def test_transparent_connection_to_an_unknown_address_is_denied() -> None:
    with (
        serve("api.test:9", transparent=(9,)) as s,
        socket.create_connection(("127.0.0.1", s.transparent[9]), timeout=5) as c,
    ):
        assert c.recv(100) == b""
    _eventually(lambda: s.of("net.deny"))
    assert s.of("net.deny")[0]["host"] == "127.0.0.1"


# -- robustness ------------------------------------------------------------------------

_METHODS = st.sampled_from([b"GET", b"CONNECT", b"POST", b"HEAD", b"PUT", b"G\x00T", b""])
_TARGETS = st.one_of(
    st.sampled_from(
        [b"http://api.test/", b"api.test:443", b"http://api.test:99999/", b"*", b"//", b"["]
    ),
    st.binary(max_size=64),
)
_HEADERS = st.lists(
    st.tuples(st.binary(min_size=0, max_size=20), st.binary(max_size=40)), max_size=6
)


@st.composite
def _requests(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        return draw(st.binary(max_size=300))
    head = (
        draw(_METHODS)
        + b" "
        + draw(_TARGETS)
        + b" "
        + draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/9", b""]))
    )
    lines = [head] + [k + b": " + v for k, v in draw(_HEADERS)]
    body = draw(st.binary(max_size=100))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


@pytest.fixture(scope="module")
def shared() -> Iterator[Served]:
    with serve("api.test:1") as s:
        yield s


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=_requests())
def test_hostile_requests_never_crash_the_proxy(
    shared: Served, data: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="buildcell.egress"):
        reply = exchange(shared.port, data, timeout=3.0)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert reply == b"" or reply.startswith(b"HTTP/1.1 ")
    # A denied destination, never a connection: api.test:1 has nothing behind it.
    assert all(
        e.get("port") != 1 or e["event"] == "net.deny" or e.get("error") for e in shared.events
    )


def test_service_survives_hostile_input_and_leaks_no_fds(shared: Served) -> None:
    # Counted at rest (only the listeners' tasks): the previous test's connections may
    # still be closing.
    _eventually(lambda: shared.service.connections <= 3, timeout=15.0)
    before = _fds()
    for junk in (b"\x16\x03\x01\x02\x00\x01", b"GET", b"\r\n\r\n" * 1000, os.urandom(4096)):
        exchange(shared.port, junk, timeout=2.0)
    _eventually(lambda: shared.service.connections <= 3, timeout=15.0)
    assert _fds() == before


def test_abandoned_connections_are_reaped() -> None:
    with serve("api.test:1") as s:
        before = _fds()
        socks = [socket.create_connection(("127.0.0.1", s.port)) for _ in range(100)]
        for i, c in enumerate(socks):
            c.sendall(b"GET http://api.test/ HTTP/1.1\r\nHost:" if i % 2 else b"CON")
        _eventually(lambda: s.service.connections >= 100 + 3)
        for c in socks:
            c.close()
        _eventually(lambda: s.service.connections == 3)
        _eventually(lambda: _fds() == before)


def test_a_client_that_never_reads_does_not_stall_others() -> None:
    with http_origin("a") as origin, serve(*_both(origin.port), idle_timeout=2.0) as s:
        stalled = socket.create_connection(("127.0.0.1", s.port))
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.sendall(
            f"CONNECT api.test:{origin.port} HTTP/1.1\r\nHost: a\r\n\r\n"
            f"GET /bytes/{64 << 20} HTTP/1.1\r\nHost: a\r\n\r\n".encode()
        )
        try:
            for i in range(5):
                reply = exchange(
                    s.port,
                    f"GET http://api.test:{origin.port}/n{i} HTTP/1.1\r\nHost: a\r\n"
                    "Connection: close\r\n\r\n".encode(),
                )
                assert reply.endswith(f"/n{i}\n".encode())
            # The stalled tunnel is closed by the idle timeout, not kept forever.
            _eventually(lambda: any(e.get("mode") == "connect" for e in s.of("net.allow")), 10)
        finally:
            stalled.close()
    (tunnel,) = [e for e in s.of("net.allow") if e["mode"] == "connect"]
    assert tunnel["bytes_down"] < 64 << 20
    assert "idle" in tunnel.get("error", "")


def test_two_hundred_concurrent_tunnels() -> None:
    n = 200
    with echo_server() as port, serve(*_both(port)) as s:
        before = _fds()
        clients = []
        for _ in range(n):
            c = socket.create_connection(("127.0.0.1", s.port), timeout=10)
            c.sendall(f"CONNECT api.test:{port} HTTP/1.1\r\nHost: api.test\r\n\r\n".encode())
            clients.append(c)
        for c in clients:
            head = b""
            while b"\r\n\r\n" not in head:
                head += c.recv(1)
            assert head.startswith(b"HTTP/1.1 200")
        assert s.service.connections >= n
        payload = os.urandom(32 * 1024)
        for c in clients:
            c.sendall(payload)
        for c in clients:
            got = bytearray()
            while len(got) < len(payload):
                got += c.recv(65536)
            assert bytes(got) == payload
        for c in clients:
            c.close()
        _eventually(lambda: len(s.of("net.allow")) == n, 20)
        _eventually(lambda: _fds() == before)
    assert all(e["bytes_up"] == len(payload) == e["bytes_down"] for e in s.of("net.allow"))


def test_close_ends_every_connection() -> None:
    with echo_server() as port:
        before = _fds()
        with serve(*_both(port)) as s:
            c = socket.create_connection(("127.0.0.1", s.port), timeout=5)
            c.sendall(f"CONNECT api.test:{port} HTTP/1.1\r\nHost: api.test\r\n\r\n".encode())
            assert c.recv(100).startswith(b"HTTP/1.1 200")
        assert c.recv(100) == b""
        c.close()
        # The echo server's end of the upstream connection closes on its own thread.
        _eventually(lambda: _fds() == before)


# -- regressions -------------------------------------------------------------------------


def test_a_tunnel_open_at_close_still_records_what_it_moved() -> None:
    # Regression: a tunnel still open when the cell ended (the service closing cancels
    # it) was recorded with 0 bytes either way, however much it had moved.
    with echo_server() as port:
        with serve(*_both(port)) as s:
            c = socket.create_connection(("127.0.0.1", s.port), timeout=5)
            c.sendall(f"CONNECT api.test:{port} HTTP/1.1\r\nHost: api.test\r\n\r\n".encode())
            assert c.recv(100).startswith(b"HTTP/1.1 200")
            c.sendall(b"x" * 1000)
            echoed = b""
            while len(echoed) < 1000:
                echoed += c.recv(4096)
        c.close()
    (allow,) = s.of("net.allow")
    assert (allow["bytes_up"], allow["bytes_down"]) == (1000, 1000)


def test_upstream_gets_the_checked_authority_not_the_cells_host_header() -> None:
    with http_origin("a") as origin, serve(*_both(origin.port)) as s:
        reply = exchange(
            s.port,
            f"GET http://api.test:{origin.port}/h HTTP/1.1\r\nHost: evil.example\r\n"
            "Connection: close, X-Secret-Hop\r\nX-Secret-Hop: 1\r\n\r\n".encode(),
        )
    assert reply.startswith(b"HTTP/1.1 200"), reply
    assert origin.hosts == [f"api.test:{origin.port}"]


def test_http10_request_without_host_is_forwarded_not_crashed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with (
        caplog.at_level(logging.ERROR, logger="buildcell.egress"),
        http_origin("a") as origin,
        serve(*_both(origin.port)) as s,
    ):
        reply = exchange(s.port, f"GET http://api.test:{origin.port}/old HTTP/1.0\r\n\r\n".encode())
    assert reply.startswith(b"HTTP/1.1 200"), reply
    assert reply.endswith(b"/old\n")
    assert not caplog.records


def test_early_upstream_response_reaches_the_client() -> None:
    """An upstream that refuses a large body (413) and closes: the client still gets it."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]

    def refuse() -> None:
        conn, _ = listener.accept()
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(4096)
            conn.sendall(
                b"HTTP/1.1 413 Too Large\r\nContent-Length: 3\r\nConnection: close\r\n\r\nbig"
            )
            conn.shutdown(socket.SHUT_WR)
            # A lingering close, as real servers do: drain what is still coming so that
            # the kernel does not answer it with a reset that would destroy the reply.
            conn.settimeout(2)
            with contextlib.suppress(OSError):
                while conn.recv(1 << 20):
                    pass

    thread = threading.Thread(target=refuse, daemon=True)
    thread.start()
    body = b"x" * (4 << 20)
    try:
        with (
            serve(*_both(port)) as s,
            socket.create_connection(("127.0.0.1", s.port), timeout=10) as c,
        ):
            c.sendall(
                f"POST http://api.test:{port}/up HTTP/1.1\r\nHost: a\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
            )
            with contextlib.suppress(OSError):
                c.sendall(body)
            reply = bytearray()
            with contextlib.suppress(OSError):
                while not reply.endswith(b"\r\n\r\nbig") and (chunk := c.recv(65536)):
                    reply += chunk
    finally:
        thread.join(5)
        listener.close()
    assert bytes(reply).startswith(b"HTTP/1.1 413"), bytes(reply[:200])


def test_noisy_denials_are_counted_not_all_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    from buildcell.egress import audit, service

    monkeypatch.setattr(service, "MAX_NOISY_EVENTS", 5)
    monkeypatch.setattr(audit, "MAX_ROWS", 3)
    with serve("api.test:1") as s:
        for i in range(12):
            exchange(s.port, f"GET http://h{i}.test/ HTTP/1.1\r\nHost: h\r\n\r\n".encode())
        _eventually(lambda: sum(r.requests for r in s.service.stats.rows()) == 12)
        rows = s.service.stats.rows()
    # The first denial of each row (three destinations and the shared row) is always
    # recorded, marked first; of the other eight, the budget's five.
    denials = s.of("net.deny")
    assert [d["host"] for d in denials if d.get("first")] == [
        "h0.test",
        "h1.test",
        "h2.test",
        "h3.test",
    ]
    assert len(denials) == 4 + 5
    (suppressed,) = s.of("net.suppressed")
    assert suppressed["suppressed"] == 3
    assert len(rows) == 4
    assert sum(r.requests for r in rows) == 12
    assert "(other destinations)" in {r.destination for r in rows}


def test_secret_values_never_reach_egress_events() -> None:
    from buildcell.cell.config import CellConfig
    from buildcell.cell.supervisor import _scrubber
    from buildcell.redact import Secret

    secret = Secret("tok", b"TopSecretValue42")
    scrub = _scrubber(CellConfig(argv=("x",), redact=(secret,)))
    long_path = "/" + "a" * 250 + "TopSecretValue42"
    with serve("api.test:1", scrub=scrub) as s:
        exchange(s.port, b"GET http://TopSecretValue42.evil.test/ HTTP/1.1\r\nHost: h\r\n\r\n")
        exchange(s.port, f"GET http://api.test:1{long_path} HTTP/1.1\r\nHost: h\r\n\r\n".encode())
        exchange(s.port, b"CONNECT topsecretvalue42.test:443 HTTP/1.1\r\nHost: h\r\n\r\n")
    import json

    dumped = json.dumps(s.events).lower()
    assert "topsecretvalue42" not in dumped
    assert "topsecre" not in dumped
    assert len(s.of("net.deny")) + len(s.of("net.allow")) == 3


def test_received_listeners_are_close_on_exec() -> None:
    import array

    from buildcell.cell.netns import NetnsPlan, receive_listeners

    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    inheritable = socket.socket()
    inheritable.set_inheritable(True)
    with parent, child, inheritable:
        child.sendmsg(
            [b"ok"],
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [inheritable.fileno()]))],
        )
        (got,) = receive_listeners(
            parent, NetnsPlan((Listener("proxy", "tcp", "127.0.0.1", 3128),))
        )
        with got:
            assert not got.get_inheritable()
