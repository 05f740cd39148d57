"""The host side of a cell's egress: an HTTP forward proxy, CONNECT tunnels, transparent mode.

Requests are parsed with h11 on both sides (never by hand). Every attempt is decided by
the cell's ``EgressPolicy`` *after* the host resolved the name, and the connection goes
to the address that was checked, so a name cannot be re-resolved to somewhere else in
between (no DNS-rebinding window). A denial is answered with 403 and a body naming the
policy and the ``--allow`` that would permit it; every attempt becomes an ``Attempt``, a
denial as soon as it is decided (so the operator hears of it while the build still runs).

A name the operator pinned to a non-public address (a ``pinned`` verdict) reaches that
address only for itself: a forwarded request's ``Host`` must name it, and a tunnel or a
transparent connection must start with a TLS ClientHello whose one server name is it, or
with HTTP requests whose ``Host`` is it (each parsed here, one per connection, and
forwarded with the checked authority); anything else is refused before a byte of it is
relayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11

from buildcell._text import show
from buildcell.allowlist import EgressPolicy, Verdict, decide, normalize_host
from buildcell.egress.audit import Attempt
from buildcell.egress.peek import Peek, peek, sni_problem
from buildcell.egress.relay import RelayResult, linger, relay
from buildcell.errors import ConfigError

__all__ = ["EgressProxy", "Resolver"]

Resolver = Callable[[str, int], Awaitable[list[str]]]

_READ = 64 * 1024
_MAX_HEAD = 64 * 1024
_HEAD_TIMEOUT = 30.0
_CONNECT_TIMEOUT = 10.0
_SEND_TIMEOUT = 300.0
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"upgrade",
        b"expect",
    }
)
# A fatal TLS alert, unrecognized_name (RFC 6066): what a server itself says to a
# ClientHello naming a host it does not serve.
_UNRECOGNIZED_NAME = bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x70])


class _Closed(Exception):
    """The peer went away or broke the protocol; the connection just ends."""


@dataclass
class _Upstream:
    sock: socket.socket
    address: str


class EgressProxy:
    """Serves accepted connections of one cell.

    Args:
        policy: the cell's allowlist.
        resolve: host-side name resolution (``host, port -> addresses``).
        name_for: maps a synthetic address handed out by the cell's resolver to its name.
        record: called once per attempt, when it ends.
        idle_timeout: a tunnel with no traffic either way for this long is closed.
    """

    def __init__(
        self,
        policy: EgressPolicy,
        *,
        resolve: Resolver,
        name_for: Callable[[str], str | None],
        record: Callable[[Attempt], None],
        idle_timeout: float = 300.0,
    ) -> None:
        self.policy = policy
        self._resolve = resolve
        self._name_for = name_for
        self._record = record
        self.idle_timeout = idle_timeout

    # -- decisions -------------------------------------------------------------------

    async def _decide(self, host: str, port: int) -> Verdict:
        try:
            ipaddress.ip_address(host)
            addresses = [host]
        except ValueError:
            if self.policy.match(host, port) is None:
                # Not on the list: no reason to ask any resolver about it.
                return decide(self.policy, host, port, [])
            try:
                async with asyncio.timeout(_CONNECT_TIMEOUT):
                    addresses = await self._resolve(host, port)
            except (OSError, TimeoutError):
                addresses = []
        return decide(self.policy, host, port, addresses)

    async def _open(self, address: str, port: int) -> _Upstream:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(_CONNECT_TIMEOUT):
                await loop.sock_connect(sock, (address, port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            sock.close()
            raise
        return _Upstream(sock, address)

    @staticmethod
    def _apply(attempt: Attempt, verdict: Verdict) -> None:
        attempt.allowed = verdict.allowed
        attempt.address = verdict.address
        attempt.entry = verdict.entry.describe() if verdict.entry is not None else None
        attempt.pinned = verdict.pinned
        if not verdict.allowed:
            attempt.reason = verdict.reason
            attempt.suggestion = verdict.suggestion
            attempt.add_host = verdict.add_host

    def _refuse(self, attempt: Attempt, started: float, problem: str, status: int | None) -> None:
        """Turn an attempt on a pinned destination into a denial, and record it now."""
        address = attempt.address
        attempt.allowed = False
        attempt.address = attempt.entry = None
        attempt.status = status
        attempt.reason = (
            f"{problem}; only {attempt.host} may be reached at {address}, where the "
            "operator pinned it"
        )
        self._finish(attempt, started)

    async def _relay(
        self, client: socket.socket, upstream: socket.socket, attempt: Attempt, pending: bytes = b""
    ) -> None:
        result = RelayResult()
        try:
            await relay(
                client,
                upstream,
                client_pending=pending,
                idle_timeout=self.idle_timeout,
                result=result,
            )
        finally:
            # Also when the tunnel is cancelled (the cell ended with it open): what it
            # moved until then is what the audit records.
            attempt.bytes_up, attempt.bytes_down = result.up, result.down
            attempt.error = result.error

    def _finish(self, attempt: Attempt, started: float) -> None:
        """Record ``attempt`` once: a denial when it is decided, the rest when they end."""
        if attempt.recorded:
            return
        attempt.recorded = True
        attempt.duration_ms = (time.monotonic() - started) * 1000
        self._record(attempt)

    # -- transparent mode ------------------------------------------------------------

    async def serve_transparent(self, client: socket.socket, port: int) -> None:
        """A connection the cell made to a synthetic address (or a literal one) on ``port``."""
        started = time.monotonic()
        local = client.getsockname()[0]
        host = self._name_for(local) or local
        attempt = Attempt("transparent", host, port)
        try:
            verdict = await self._decide(host, port)
            self._apply(attempt, verdict)
            if not verdict.allowed or verdict.address is None:
                return
            if verdict.pinned:
                await self._serve_pinned(client, attempt, started, b"", None)
                return
            try:
                upstream = await self._open(verdict.address, port)
            except (OSError, TimeoutError) as e:
                attempt.error = _why(e)
                return
            with contextlib.closing(upstream.sock):
                await self._relay(client, upstream.sock, attempt)
        finally:
            self._finish(attempt, started)

    # -- the HTTP proxy --------------------------------------------------------------

    async def serve_proxy(self, client: socket.socket) -> None:
        """One client connection to the proxy: requests until it closes, or a tunnel."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD)
        try:
            while True:
                # One deadline for the whole head: a byte now and then does not extend it.
                async with asyncio.timeout(_HEAD_TIMEOUT):
                    event = await _next_event(conn, client, timeout=_HEAD_TIMEOUT)
                if isinstance(event, h11.ConnectionClosed):
                    return
                if not isinstance(event, h11.Request):
                    return
                if event.method == b"CONNECT":
                    await self._connect(conn, client, event)
                    return
                keep = await self._forward(conn, client, event)
                if not keep or conn.our_state is not h11.DONE:
                    return
                try:
                    conn.start_next_cycle()
                except h11.LocalProtocolError:
                    return
        except h11.RemoteProtocolError as e:
            await _send_error(conn, client, e.error_status_hint, f"malformed request: {e}")
        except h11.LocalProtocolError as e:
            # What the client sent cannot be relayed as HTTP/1.1 (h11 refuses to write it).
            await _send_error(conn, client, 400, f"cannot forward this request: {e}")
        except (_Closed, OSError, TimeoutError):
            return

    async def _connect(self, conn: h11.Connection, client: socket.socket, req: h11.Request) -> None:
        started = time.monotonic()
        target = req.target.decode("ascii", "replace")
        parsed = _authority(target)
        if parsed is None:
            await _send_error(conn, client, 400, f"CONNECT needs HOST:PORT, not {target!r}")
            return
        host, port = parsed
        attempt = Attempt("connect", host, port, method="CONNECT")
        try:
            verdict = await self._decide(host, port)
            self._apply(attempt, verdict)
            if not verdict.allowed or verdict.address is None:
                attempt.status = 403
                self._finish(attempt, started)
                await _send_denied(conn, client, verdict, host, port)
                return
            try:
                upstream = await self._open(verdict.address, port)
            except (OSError, TimeoutError) as e:
                attempt.error, attempt.status = _why(e), 502
                await _send_error(conn, client, 502, f"cannot connect to {host}:{port}: {_why(e)}")
                return
            with contextlib.closing(upstream.sock):
                attempt.status = 200
                await _send(
                    conn,
                    client,
                    h11.Response(status_code=200, headers=[], reason=b"Connection Established"),
                )
                pending, _closed = conn.trailing_data
                if verdict.pinned:
                    await self._serve_pinned(client, attempt, started, pending, upstream.sock)
                else:
                    await self._relay(client, upstream.sock, attempt, pending)
        finally:
            self._finish(attempt, started)

    async def _forward(self, conn: h11.Connection, client: socket.socket, req: h11.Request) -> bool:
        """An absolute-URI request; True when the client connection may be reused."""
        started = time.monotonic()
        target = req.target.decode("ascii", "replace")
        try:
            url = urlsplit(target)
        except ValueError:
            await _send_error(conn, client, 400, f"malformed request target {target!r}")
            return False
        if url.scheme != "http" or not url.hostname:
            why = (
                "use CONNECT for https (set HTTPS_PROXY)"
                if url.scheme == "https"
                else "this is a proxy: the request target must be an absolute http URL, "
                f"not {target!r}"
            )
            await _send_error(conn, client, 400, why)
            return False
        try:
            port = url.port or 80
        except ValueError:
            port = 0
        host = _host(url.hostname)
        if host is None or not port:
            await _send_error(conn, client, 400, f"invalid host or port in {target!r}")
            return False
        names = {k.lower() for k, _v in req.headers}
        if b"transfer-encoding" in names and b"content-length" in names:
            # Two framings: the classic request-smuggling set-up (RFC 9112, 6.3).
            await _send_error(conn, client, 400, "both Content-Length and Transfer-Encoding")
            return False
        path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        method = req.method.decode("ascii", "replace")
        attempt = Attempt("proxy", host, port, method=method, path=url.path or "/")
        try:
            verdict = await self._decide(host, port)
            self._apply(attempt, verdict)
            if not verdict.allowed or verdict.address is None:
                attempt.status = 403
                self._finish(attempt, started)
                await _drain_body(conn, client)
                return await _send_denied(conn, client, verdict, host, port)
            problem = _host_problem(req, host, port) if verdict.pinned else None
            if problem is not None:
                self._refuse(attempt, started, problem, 403)
                await _drain_body(conn, client)
                await _send_error(
                    conn, client, 403, f"denied by the cell's network policy: {attempt.reason}"
                )
                return False
            try:
                upstream = await self._open(verdict.address, port)
            except (OSError, TimeoutError) as e:
                attempt.error, attempt.status = _why(e), 502
                await _drain_body(conn, client)
                await _send_error(conn, client, 502, f"cannot connect to {host}:{port}: {_why(e)}")
                return False
            with contextlib.closing(upstream.sock):
                return await self._exchange(
                    conn, client, req, path=path, upstream=upstream.sock, attempt=attempt
                )
        finally:
            self._finish(attempt, started)

    async def _exchange(
        self,
        conn: h11.Connection,
        client: socket.socket,
        req: h11.Request,
        *,
        path: str,
        upstream: socket.socket,
        attempt: Attempt,
        close: bool = False,
    ) -> bool:
        """Forward ``req`` and relay the answer; True when the client connection may be
        reused (never with ``close``: the answer then tells the client so)."""
        up = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_HEAD)
        # The upstream is asked for exactly the checked authority: the cell's own Host
        # header never travels (a shared front end would route by it), nor any header
        # the client's Connection header names as hop-by-hop.
        named = {
            token.strip().lower()
            for k, v in req.headers
            if k.lower() == b"connection"
            for token in v.split(b",")
        }
        headers = [
            (k, v)
            for k, v in req.headers
            if k.lower() not in _HOP_BY_HOP and k.lower() not in named and k.lower() != b"host"
        ]
        authority = _hostport(attempt.host, attempt.port, default=80)
        headers = [(b"host", authority.encode()), *headers, (b"connection", b"close")]

        async def send_up(event: h11.Event) -> None:
            data = up.send(event)
            if data:
                async with asyncio.timeout(self.idle_timeout):
                    await asyncio.get_running_loop().sock_sendall(upstream, data)
                attempt.bytes_up += len(data)

        await send_up(
            h11.Request(
                method=req.method, target=path.encode(), headers=headers, http_version=b"1.1"
            )
        )
        if conn.they_are_waiting_for_100_continue:
            await _send(conn, client, h11.InformationalResponse(status_code=100, headers=[]))
        try:
            while True:
                event = await _next_event(conn, client, timeout=self.idle_timeout)
                if isinstance(event, h11.Data):
                    await send_up(event)
                elif isinstance(event, h11.EndOfMessage):
                    await send_up(h11.EndOfMessage())
                    break
                else:
                    raise _Closed
        except OSError as e:
            # The upstream stopped reading (an early 413, say): still relay its answer.
            attempt.error = f"upstream stopped reading the request: {_why(e)}"
        try:
            while True:
                reply = await _next_event(
                    up, upstream, timeout=self.idle_timeout, count=attempt, inbound=True
                )
                if isinstance(reply, h11.InformationalResponse):
                    continue
                if isinstance(reply, h11.Response):
                    attempt.status = reply.status_code
                    await _send(conn, client, _response(reply, close=close))
                elif isinstance(reply, h11.Data):
                    await _send(conn, client, reply)
                elif isinstance(reply, h11.EndOfMessage):
                    await _send(conn, client, h11.EndOfMessage())
                    return not close and conn.our_state is h11.DONE
                else:
                    raise _Closed
        except h11.RemoteProtocolError as e:
            attempt.error = f"upstream broke HTTP: {e}"
            if conn.our_state is h11.SEND_RESPONSE:
                await _send_error(conn, client, 502, f"the upstream server broke HTTP: {e}")
            return False

    # -- a pinned destination --------------------------------------------------------

    async def _serve_pinned(
        self,
        client: socket.socket,
        attempt: Attempt,
        started: float,
        pending: bytes,
        upstream: socket.socket | None,
    ) -> None:
        """A tunnel or transparent connection to a name pinned to a non-public address:
        relayed only once its first bytes name that name (TLS) or parsed as HTTP.

        ``upstream`` is the connection a tunnel already opened (the caller closes it);
        without one, it is opened here once the client's first bytes pass.
        """
        try:
            async with asyncio.timeout(_HEAD_TIMEOUT):
                head = await _read_head(client, pending)
        except (OSError, TimeoutError) as e:
            attempt.error = f"no request arrived: {_why(e)}"
            return
        if head is None:
            return  # the client left without sending anything
        seen, data = head
        if seen.kind == "http":
            await self._serve_pinned_http(client, attempt, started, data, upstream)
            return
        problem = (
            sni_problem(seen, attempt.host)
            if seen.kind == "tls"
            else "the connection is neither TLS nor HTTP, so what it is for cannot be checked"
        )
        if problem is not None:
            self._refuse(attempt, started, problem, None)
            if seen.kind == "tls":
                await _tls_alert(client)
            return
        opened = await self._open_for(attempt, upstream)
        if opened is None:
            return
        try:
            await self._relay(client, opened, attempt, data)
        finally:
            if opened is not upstream:
                opened.close()

    async def _open_for(
        self, attempt: Attempt, upstream: socket.socket | None
    ) -> socket.socket | None:
        if upstream is not None:
            return upstream
        assert attempt.address is not None
        try:
            return (await self._open(attempt.address, attempt.port)).sock
        except (OSError, TimeoutError) as e:
            attempt.error = _why(e)
            return None

    async def _serve_pinned_http(
        self,
        client: socket.socket,
        attempt: Attempt,
        started: float,
        data: bytes,
        upstream: socket.socket | None,
    ) -> None:
        """One HTTP request (the connection then closes), its target and ``Host`` checked
        against the pinned name, forwarded with the checked authority."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD)
        conn.receive_data(data)
        try:
            async with asyncio.timeout(_HEAD_TIMEOUT):
                req = await _next_event(conn, client, timeout=_HEAD_TIMEOUT)
            if not isinstance(req, h11.Request):
                return
            attempt.method = req.method.decode("ascii", "replace")
            path, problem = _pinned_target(req, attempt.host, attempt.port)
            problem = problem or _host_problem(req, attempt.host, attempt.port)
            if problem is not None:
                self._refuse(attempt, started, problem, 403)
                await _drain_body(conn, client)
                await _send_error(
                    conn, client, 403, f"denied by the cell's network policy: {attempt.reason}"
                )
                return
            attempt.path = path.partition("?")[0]
            names = {k.lower() for k, _v in req.headers}
            if b"transfer-encoding" in names and b"content-length" in names:
                await _send_error(conn, client, 400, "both Content-Length and Transfer-Encoding")
                return
            opened = await self._open_for(attempt, upstream)
            if opened is None:
                attempt.status = 502
                await _drain_body(conn, client)
                await _send_error(conn, client, 502, f"cannot connect to {attempt.host}")
                return
            try:
                await self._exchange(
                    conn, client, req, path=path, upstream=opened, attempt=attempt, close=True
                )
            finally:
                if opened is not upstream:
                    opened.close()
            await linger(client)
        except h11.RemoteProtocolError as e:
            attempt.error = f"malformed request: {e}"
            await _send_error(conn, client, e.error_status_hint, f"malformed request: {e}")
        except h11.LocalProtocolError as e:
            attempt.error = f"cannot forward this request: {e}"
            await _send_error(conn, client, 400, f"cannot forward this request: {e}")
        except (_Closed, OSError, TimeoutError):
            return


def _response(reply: h11.Response, *, close: bool) -> h11.Response:
    """The upstream's response as the client gets it: no hop-by-hop headers, and with
    ``close``, ``Connection: close``."""
    headers = [(k, v) for k, v in reply.headers if k.lower() not in _HOP_BY_HOP]
    if close:
        headers.append((b"connection", b"close"))
    return h11.Response(status_code=reply.status_code, headers=headers, reason=reply.reason)


async def _read_head(client: socket.socket, pending: bytes) -> tuple[Peek, bytes] | None:
    """Read until :func:`peek` can tell what the connection is; None if it closes first."""
    loop = asyncio.get_running_loop()
    data = bytearray(pending)
    while True:
        seen = peek(bytes(data))
        if seen is not None:
            return seen, bytes(data)
        chunk = await loop.sock_recv(client, _READ)
        if not chunk:
            return None
        data += chunk


async def _tls_alert(sock: socket.socket) -> None:
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(5.0):
            await asyncio.get_running_loop().sock_sendall(sock, _UNRECOGNIZED_NAME)
        await linger(sock)


def _host_header(text: str) -> tuple[str, int] | None:
    """``HOST[:PORT]`` of a ``Host`` header (port 80 when absent or empty), normalized."""
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            return None
        host, rest = text[1:close], text[close + 1 :]
        if rest and not rest.startswith(":"):
            return None
        port_text = rest[1:]
    elif text.count(":") > 1:
        return None
    else:
        host, _, port_text = text.partition(":")
    if port_text and not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5):
        return None
    port = int(port_text) if port_text else 80
    name = _host(host) if host else None
    if name is None or not 0 < port < 65536:
        return None
    return name, port


def _host_problem(req: h11.Request, host: str, port: int) -> str | None:
    """Why a request's ``Host`` does not name ``host:port``; None if it does (or, in
    HTTP/1.0, is absent: the forwarded request names the checked authority anyway)."""
    values = [v for k, v in req.headers if k.lower() == b"host"]
    if len(values) > 1:
        return "the request has more than one Host header"
    if not values:
        return None if req.http_version == b"1.0" else "the request has no Host header"
    text = values[0].decode("ascii", "replace")
    named = _host_header(text)
    if named is None:
        return f"its Host header {show(text, 80)} is not HOST[:PORT]"
    if named != (host, port):
        return f"its Host header names {_hostport(named[0], named[1], default=0)}"
    return None


def _pinned_target(req: h11.Request, host: str, port: int) -> tuple[str, str | None]:
    """(the path to forward, why the request target does not fit ``host:port``)."""
    target = req.target.decode("ascii", "replace")
    if req.method == b"CONNECT":
        return "", f"the request is a CONNECT to {show(target, 80)}"
    if target.startswith("/"):
        return target, None
    if target == "*" and req.method == b"OPTIONS":
        return target, None
    try:
        url = urlsplit(target)
        named = (_host(url.hostname or ""), url.port or 80)
    except ValueError:
        return "", f"the request target {show(target, 80)} is not a path or an http URL"
    if url.scheme.lower() != "http":
        return "", f"the request target {show(target, 80)} is not a path or an http URL"
    if named != (host, port):
        return "", f"the request target names {show(target, 80)}"
    return (url.path or "/") + (f"?{url.query}" if url.query else ""), None


# -- h11 plumbing ----------------------------------------------------------------------


async def _next_event(
    conn: h11.Connection,
    sock: socket.socket,
    *,
    timeout: float,
    count: Attempt | None = None,
    inbound: bool = False,
) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
    loop = asyncio.get_running_loop()
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        try:
            async with asyncio.timeout(timeout):
                data = await loop.sock_recv(sock, _READ)
        except (ConnectionError, TimeoutError) as e:
            raise _Closed from e
        if count is not None and inbound:
            count.bytes_down += len(data)
        conn.receive_data(data)


async def _send(conn: h11.Connection, sock: socket.socket, event: h11.Event) -> None:
    data = conn.send(event)
    if data:
        # A client that never reads does not hold the connection forever.
        async with asyncio.timeout(_SEND_TIMEOUT):
            await asyncio.get_running_loop().sock_sendall(sock, data)


async def _drain_body(conn: h11.Connection, sock: socket.socket) -> None:
    """Read (and drop) a request body that will not be forwarded, so a reply can follow."""
    if conn.they_are_waiting_for_100_continue:
        return
    with contextlib.suppress(_Closed):
        while conn.their_state is h11.SEND_BODY:
            event = await _next_event(conn, sock, timeout=5.0)
            if not isinstance(event, h11.Data):
                return


async def _send_error(conn: h11.Connection, sock: socket.socket, status: int, message: str) -> None:
    body = f"buildcell egress: {message}\n".encode()
    with contextlib.suppress(h11.LocalProtocolError, OSError, TimeoutError):
        await _send(
            conn,
            sock,
            h11.Response(
                status_code=status,
                headers=[
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            ),
        )
        await _send(conn, sock, h11.Data(data=body))
        await _send(conn, sock, h11.EndOfMessage())
        await linger(sock)


async def _send_denied(
    conn: h11.Connection, sock: socket.socket, verdict: Verdict, host: str, port: int
) -> bool:
    hint = f"; to permit it: {verdict.hint}" if verdict.hint else ""
    await _send_error(
        conn, sock, 403, f"denied by the cell's network policy: {verdict.reason}{hint}"
    )
    return False


def _authority(target: str) -> tuple[str, int] | None:
    host, sep, port_text = target.rpartition(":")
    if not sep or not port_text.isdigit() or not host:
        return None
    port = int(port_text)
    if not 0 < port < 65536:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    name = _host(host)
    return None if name is None else (name, port)


def _host(text: str) -> str | None:
    """An IP literal in its canonical form, or a normalized DNS name; None if neither."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    try:
        return normalize_host(text)
    except ConfigError:
        return None


def _hostport(host: str, port: int, *, default: int) -> str:
    text = f"[{host}]" if ":" in host else host
    return text if port == default else f"{text}:{port}"


def _why(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__
