"""Servers on the host's loopback for the network tests: HTTP origins and a UDP sink."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Origin:
    """An HTTP server on 127.0.0.1; ``hits`` lists the paths it was asked for."""

    name: str
    port: int
    hits: list[str] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _reply(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:
        self.server.origin.hits.append(self.path)
        self.server.origin.hosts.append(self.headers.get("Host", ""))
        if self.path.startswith("/bytes/"):
            n = int(self.path.rsplit("/", 1)[1])
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.end_headers()
            chunk = b"x" * 65536
            while n > 0:
                self.wfile.write(chunk[: min(n, len(chunk))])
                n -= len(chunk)
            return
        self._reply(f"hello from {self.server.origin.name} {self.path}\n".encode())

    do_HEAD = do_GET

    def do_POST(self) -> None:
        self.server.origin.hits.append(self.path)
        length = int(self.headers.get("Content-Length", "0"))
        self._reply(b"echo:" + self.rfile.read(length))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    origin: Origin


@contextlib.contextmanager
def http_origin(name: str) -> Iterator[Origin]:
    server = _Server(("127.0.0.1", 0), _Handler)
    server.origin = Origin(name, server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.origin
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@dataclass
class UdpSink:
    port: int
    received: list[bytes] = field(default_factory=list)


@contextlib.contextmanager
def udp_sink() -> Iterator[UdpSink]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.1)
    sink = UdpSink(sock.getsockname()[1])
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                sink.received.append(sock.recv(65536))

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield sink
    finally:
        stop.set()
        thread.join()
        sock.close()


@contextlib.contextmanager
def echo_server() -> Iterator[int]:
    """A TCP server on 127.0.0.1 that echoes whatever it receives; yields its port."""
    import asyncio

    loop = asyncio.new_event_loop()
    ready = threading.Event()
    port: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def main() -> asyncio.Server:
        server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
        port.append(server.sockets[0].getsockname()[1])
        ready.set()
        return server

    def run() -> None:
        asyncio.set_event_loop(loop)
        server = loop.run_until_complete(main())
        loop.run_forever()
        server.close()
        loop.run_until_complete(server.wait_closed())
        loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ready.wait(10)
    try:
        yield port[0]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


@dataclass
class Served:
    """A running egress service on loopback: its proxy port and what it recorded."""

    service: Any
    port: int
    transparent: dict[int, int]
    events: list[dict[str, Any]] = field(default_factory=list)

    def of(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == name]


def _bound(kind: int = socket.SOCK_STREAM) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind)
    sock.bind(("127.0.0.1", 0))
    if kind == socket.SOCK_STREAM:
        sock.listen(1024)
    sock.setblocking(False)
    return sock


@contextlib.contextmanager
def loopback_egress(*allow: str, transparent: tuple[int, ...] = (), **kw: Any) -> Iterator[Served]:
    """The real egress service with its listeners on the host's loopback instead of a
    cell's namespace, so hostile clients can be scripted precisely. ``transparent`` maps
    each allowed port to the loopback port of its transparent listener."""
    from buildcell.allowlist import EgressPolicy
    from buildcell.cell.netns import Listener
    from buildcell.egress.service import EgressService

    events: list[dict[str, Any]] = []
    lock = threading.Lock()

    def emit(event: str, **fields: Any) -> None:
        with lock:
            events.append({"event": event, **fields})

    proxy = _bound()
    listeners = [(Listener("proxy", "tcp", "127.0.0.1", 3128), proxy)]
    listeners.append((Listener("dns", "udp", "127.0.0.1", 53), _bound(socket.SOCK_DGRAM)))
    listeners.append((Listener("dns", "tcp", "127.0.0.1", 53), _bound()))
    ports = {}
    for port in transparent:
        sock = _bound()
        ports[port] = sock.getsockname()[1]
        listeners.append((Listener("transparent", "tcp", "0.0.0.0", port), sock))
    kw.setdefault("pinned", {"api.test": "127.0.0.1"})
    service = EgressService(EgressPolicy.from_strings(allow), listeners, emit=emit, **kw)
    try:
        yield Served(service, proxy.getsockname()[1], ports, events)
    finally:
        service.close()


def exchange(port: int, data: bytes, *, shut: bool = True, timeout: float = 5.0) -> bytes:
    """Send ``data`` to 127.0.0.1:``port`` and return everything it answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        # The proxy may answer (and stop reading) before a hostile request is all sent.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(data)
        if shut:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_WR)
        out = bytearray()
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := s.recv(65536):
                out += chunk
        return bytes(out)
