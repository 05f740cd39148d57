"""Fault/load: the egress proxy under 500 concurrent tunnels and abandoned connections."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO)]

from tests.netservers import echo_server, loopback_egress

__all__ = ["Row", "checks"]


@dataclass
class Row:
    area: str
    what: str
    tried: int
    held: bool
    detail: str


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@contextlib.contextmanager
def _service(port: int) -> Iterator[tuple[Any, int]]:
    allow = (f"api.test:{port}", f"127.0.0.1:{port}")
    with loopback_egress(*allow, idle_timeout=5.0) as served:
        yield served.service, served.port


def _wait(check: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def _tunnels(n: int) -> Row:
    what = f"{n} concurrent CONNECT tunnels, 64 KiB each way"
    with echo_server() as port:
        before_fds, before_rss = _fds(), _rss_kib()
        with _service(port) as (service, proxy_port):
            clients = []
            try:
                for _ in range(n):
                    c = socket.create_connection(("127.0.0.1", proxy_port), timeout=20)
                    c.sendall(f"CONNECT api.test:{port} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
                    clients.append(c)
                for c in clients:
                    head = b""
                    while b"\r\n\r\n" not in head:
                        head += c.recv(1)
                    if not head.startswith(b"HTTP/1.1 200"):
                        return Row("proxy", what, n, False, f"tunnel refused: {head[:40]!r}")
                payload = os.urandom(64 * 1024)
                for c in clients:
                    c.sendall(payload)
                bad = 0
                for c in clients:
                    got = bytearray()
                    while len(got) < len(payload):
                        chunk = c.recv(65536)
                        if not chunk:
                            break
                        got += chunk
                    bad += bytes(got) != payload
                peak = service.connections
                rss = _rss_kib() - before_rss
            finally:
                for c in clients:
                    c.close()
            drained = _wait(lambda: service.connections <= 3, 20)
        leaked = _fds() - before_fds
    held = bad == 0 and drained and leaked <= 0 and peak >= n
    return Row(
        "proxy",
        what,
        n,
        held,
        f"{bad} corrupted, peak {peak} connections, +{rss / 1024:.1f} MiB RSS while open, "
        f"{leaked:+d} fds after",
    )


def _abandoned(n: int) -> Row:
    what = f"{n} abandoned connections (partial heads, half-open tunnels, silent clients)"
    with echo_server() as port:
        before_fds = _fds()
        with _service(port) as (service, proxy_port):
            socks = []
            for i in range(n):
                c = socket.create_connection(("127.0.0.1", proxy_port), timeout=20)
                match i % 3:
                    case 0:
                        c.sendall(b"GET http://api.test/ HTTP/1.1\r\nHost:")
                    case 1:
                        c.sendall(f"CONNECT api.test:{port} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
                    case _:
                        pass
                socks.append(c)
            opened = _wait(lambda: service.connections >= n + 3, 20)
            for c in socks:
                c.close()
            reaped = _wait(lambda: service.connections == 3, 30)
            # The service still serves a valid request afterwards.
            c = socket.create_connection(("127.0.0.1", proxy_port), timeout=10)
            c.sendall(f"CONNECT api.test:{port} HTTP/1.1\r\nHost: a\r\n\r\nok".encode())
            alive = c.recv(200).startswith(b"HTTP/1.1 200")
            c.close()
            _wait(lambda: service.connections == 3, 10)
        leaked = _fds() - before_fds
    return Row(
        "proxy",
        what,
        n,
        opened and reaped and alive and leaked <= 0,
        f"all accepted: {opened}, all reaped: {reaped}, serves afterwards: {alive}, "
        f"{leaked:+d} fds after",
    )


def checks(scale: float) -> list[Row]:
    rows = []
    for fn, n in ((_tunnels, 500), (_abandoned, 500)):
        count = max(10, int(n * scale))
        print(f"stress: proxy {fn.__name__.strip('_')} x{count} ...", file=sys.stderr, flush=True)
        try:
            rows.append(fn(count))
        except Exception as e:  # a crash is a finding, reported as a row
            rows.append(Row("proxy", fn.__name__.strip("_"), count, False, f"crashed: {e!r}"))
    return rows
