"""Egress figures for `make bench`: proxy throughput and latency, per-cell cost of a policy.

The origin is a small loopback server that answers every request with ``sendfile`` of a
sparse file, so that it is not the bottleneck of either contender. Inside the cell the
client goes through the cell's proxy (a CONNECT tunnel); on the host the same client
talks to the origin directly. Timings come from the clients themselves (curl's
``time_total``; a perf_counter around each connection), so cell start-up is not counted.
"""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

from buildcell.allowlist import EgressPolicy
from buildcell.cell import CellConfig
from buildcell.cell.supervisor import run_cell
from buildcell.state import StateDir

__all__ = ["network_figures", "sendfile_origin"]

_LATENCY_CLIENT = """
import socket, sys, time
port, n, proxy = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "proxy"
times = []
for _ in range(n):
    t = time.perf_counter()
    s = socket.create_connection(("127.0.0.1", 3128 if proxy else port))
    if proxy:
        s.sendall(b"CONNECT origin.bench:%d HTTP/1.1\\r\\nHost: origin.bench\\r\\n\\r\\n" % port)
        head = b""
        while b"\\r\\n\\r\\n" not in head:
            head += s.recv(4096)
    s.sendall(b"GET /small HTTP/1.1\\r\\nHost: origin.bench\\r\\n\\r\\n")
    while s.recv(65536):
        pass
    s.close()
    times.append((time.perf_counter() - t) * 1000)
print(" ".join(f"{x:.4f}" for x in times))
"""


@contextlib.contextmanager
def sendfile_origin(size: int) -> Iterator[int]:
    """An HTTP/1.1 origin on 127.0.0.1: ``/small`` is 16 bytes, anything else ``size``."""
    fd, name = tempfile.mkstemp(prefix="bc-bench-origin-")
    os.ftruncate(fd, size)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(256)
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                head += chunk
            n = 16 if head.startswith(b"GET /small ") else size
            conn.sendall(
                f"HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n".encode()
            )
            if n == 16:
                conn.sendall(b"0123456789abcdef")
                return
            offset = 0
            while offset < n:
                offset += os.sendfile(conn.fileno(), fd, offset, n - offset)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        # close() alone does not wake a thread blocked in accept(); shutdown() does.
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join()
        os.close(fd)
        os.unlink(name)


def _in_cell(state: StateDir, argv: list[str], port: int) -> str:
    out = bytearray()
    result = run_cell(
        CellConfig(
            argv=tuple(argv),
            network=EgressPolicy.from_strings([f"origin.bench:{port}", f"127.0.0.1:{port}"]),
            pinned_hosts=(("origin.bench", "127.0.0.1"),),
        ),
        state=state,
        stdout=out.extend,
        stderr=lambda _: None,
    )
    assert result.exit_code == 0, result
    return out.decode()


def _curl(port: int, *, tunnel: bool) -> list[str]:
    return [
        "curl",
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{time_total}",
        *(["--proxytunnel"] if tunnel else ["--noproxy", "*"]),
        f"http://{'origin.bench' if tunnel else '127.0.0.1'}:{port}/big",
    ]


def _rates(times: list[float], size: int) -> dict[str, float]:
    rates = [size / t / 1e6 for t in times]
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates)}


def network_figures(
    state: StateDir,
    measure: Callable[[dict[str, Callable[[], object]], int], dict[str, list[float]]],
    summary: Callable[[list[float]], dict[str, float]],
    n: int,
) -> list[dict[str, Any]]:
    """The egress figures of the bench, each measured side by side in one loop."""
    import subprocess

    figures: list[dict[str, Any]] = []
    size = int(os.environ.get("BENCH_PROXY_BYTES", str(1 << 30)))
    rounds = int(os.environ.get("BENCH_PROXY_ROUNDS", "5"))

    def plain() -> None:
        run_cell(CellConfig(argv=("/bin/true",)), state=state, stdout=_sink, stderr=_sink)

    def with_policy() -> None:
        run_cell(
            CellConfig(argv=("/bin/true",), network=EgressPolicy.from_strings(["example.test"])),
            state=state,
            stdout=_sink,
            stderr=_sink,
        )

    print(f"per-cell cost of a network policy, {n} rounds ...", flush=True)
    cost = measure({"without": plain, "with": with_policy}, n)
    ours, base = summary(cost["with"]), summary(cost["without"])
    figures.append(
        {
            "figure": "per-cell overhead with a network policy (netns listeners, proxy, DNS)",
            "ours": ours,
            "baseline": base,
            "baseline_name": "the same cell without one",
            "target": f"≤ +3 ms (here {ours['median'] - base['median']:+.2f} ms)",
        }
    )
    with sendfile_origin(size) as port:
        print(f"proxy throughput, {rounds} x {size >> 20} MiB ...", flush=True)
        cell_times: list[float] = []
        host_times: list[float] = []
        for _ in range(rounds):
            cell_times.append(float(_in_cell(state, _curl(port, tunnel=True), port)))
            host = subprocess.run(
                _curl(port, tunnel=False), capture_output=True, text=True, check=True
            )
            host_times.append(float(host.stdout))
        ours, base = _rates(cell_times, size), _rates(host_times, size)
        figures.append(
            {
                "figure": f"download through the egress proxy (CONNECT, {size >> 20} MiB, curl)",
                "ours": ours,
                "baseline": base,
                "baseline_name": "curl on the host, direct from the same loopback origin",
                "target": "≥ 0.8×",
                "unit": "MB/s",
                "ratio": ours["median"] / base["median"],
            }
        )
        print("added latency per connection ...", flush=True)
        conns = 200
        cell_ms = [
            float(x)
            for x in _in_cell(
                state, ["python3", "-c", _LATENCY_CLIENT, str(port), str(conns), "proxy"], port
            ).split()
        ]
        direct = subprocess.run(
            ["python3", "-c", _LATENCY_CLIENT, str(port), str(conns), "direct"],
            capture_output=True,
            text=True,
            check=True,
        )
        host_ms = [float(x) for x in direct.stdout.split()]
        ours, base = summary(cell_ms[10:]), summary(host_ms[10:])
        figures.append(
            {
                "figure": "one connection + request through the proxy (CONNECT), in the cell",
                "ours": ours,
                "baseline": base,
                "baseline_name": "the same client on the host, direct",
                "target": f"(report: +{ours['median'] - base['median']:.2f} ms each)",
            }
        )
    return figures


def _sink(_: bytes) -> None:
    pass
