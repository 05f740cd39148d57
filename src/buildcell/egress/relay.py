"""Copying a tunnel's bytes both ways: zero-copy with ``splice`` through a pipe.

Each direction moves data socket -> pipe -> socket inside the kernel, so bytes never
enter Python; the pipe (up to 1 MiB) is the only buffer, which bounds memory per tunnel
and gives natural back-pressure: a peer that stops reading stops the other side being
read. Where ``splice`` is unavailable the same loop copies through a reused buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import struct
import time
from dataclasses import dataclass, field

__all__ = ["RelayResult", "linger", "relay"]

_CHUNK = 1 << 20
#: Each tunnel direction's only buffer. It lives in the supervisor's memory, not the
#: cell's: small enough that a thousand stalled tunnels stay bounded (~512 MiB).
_PIPE_SIZE = 256 * 1024
_COPY_FIRST = 64 * 1024
_F_SETPIPE_SZ = 1031
_HAVE_SPLICE = hasattr(os, "splice")
_SPLICE_FLAGS = (
    getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2) if _HAVE_SPLICE else 0
)


@dataclass
class RelayResult:
    """Bytes moved each way; ``up`` is from the cell to the destination."""

    up: int = 0
    down: int = 0
    error: str | None = None
    _last: float = field(default_factory=time.monotonic)


async def _wait(loop: asyncio.AbstractEventLoop, sock: socket.socket, *, write: bool) -> None:
    fut: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    if write:
        loop.add_writer(fd, ready)
    else:
        loop.add_reader(fd, ready)
    try:
        await fut
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


async def _send_all(loop: asyncio.AbstractEventLoop, dst: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            sent = dst.send(view)
        except BlockingIOError:
            await _wait(loop, dst, write=True)
            continue
        view = view[sent:]


async def _pump_splice(
    loop: asyncio.AbstractEventLoop,
    src: socket.socket,
    dst: socket.socket,
    result: RelayResult,
    up: bool,
) -> None:
    # Most connections move a few kilobytes: a plain copy costs less for them than
    # setting up pipes. Beyond that, bulk data goes through the kernel.
    if not await _pump_copy(loop, src, dst, result, up, limit=_COPY_FIRST):
        return
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        with contextlib.suppress(OSError):
            fcntl.fcntl(w, _F_SETPIPE_SZ, _PIPE_SIZE)
        while True:
            try:
                n = os.splice(src.fileno(), w, _CHUNK, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                await _wait(loop, src, write=False)
                continue
            if n == 0:
                return
            left = n
            while left:
                try:
                    moved = os.splice(r, dst.fileno(), left, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    await _wait(loop, dst, write=True)
                    continue
                left -= moved
                # Progress is counted as it is made: a slow reader is not "idle".
                _account(result, up, moved)
    finally:
        os.close(r)
        os.close(w)


async def _pump_copy(
    loop: asyncio.AbstractEventLoop,
    src: socket.socket,
    dst: socket.socket,
    result: RelayResult,
    up: bool,
    *,
    limit: int | None = None,
) -> bool:
    """Copy until EOF (False) or, with ``limit``, until that many bytes moved (True)."""
    buf = bytearray(min(limit or _CHUNK, 256 * 1024))
    view = memoryview(buf)
    moved = 0
    while limit is None or moved < limit:
        try:
            n = src.recv_into(buf)
        except BlockingIOError:
            await _wait(loop, src, write=False)
            continue
        if n == 0:
            return False
        await _send_all(loop, dst, bytes(view[:n]))
        _account(result, up, n)
        moved += n
    return True


def _account(result: RelayResult, up: bool, n: int) -> None:
    if up:
        result.up += n
    else:
        result.down += n
    result._last = time.monotonic()


async def _direction(
    loop: asyncio.AbstractEventLoop,
    *,
    src: socket.socket,
    dst: socket.socket,
    pending: bytes,
    result: RelayResult,
    up: bool,
) -> None:
    if pending:
        await _send_all(loop, dst, pending)
        _account(result, up, len(pending))
    pump = _pump_splice if _HAVE_SPLICE else _pump_copy
    await pump(loop, src, dst, result, up)
    # Half-close: the other direction may still have a reply to deliver.
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


async def linger(sock: socket.socket, *, timeout: float = 1.0) -> None:
    """Half-close, then read what the peer is still sending for a moment before the socket
    is closed: closing with unread input sends a reset, which can destroy the last reply
    before the peer reads it."""
    loop = asyncio.get_running_loop()
    budget = 1 << 20
    with contextlib.suppress(OSError, TimeoutError):
        sock.shutdown(socket.SHUT_WR)
        async with asyncio.timeout(timeout):
            while budget > 0:
                data = await loop.sock_recv(sock, 65536)
                if not data:
                    return
                budget -= len(data)


def _abort(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def relay(
    client: socket.socket,
    upstream: socket.socket,
    *,
    client_pending: bytes = b"",
    upstream_pending: bytes = b"",
    idle_timeout: float = 300.0,
    result: RelayResult | None = None,
) -> RelayResult:
    """Copy both ways until both sides finished, one failed, or nothing moved for a while.

    Both sockets must be non-blocking; the caller closes them afterwards. Bytes are
    counted into ``result`` as they move, so a caller that passes its own still knows
    what moved when the relay is cancelled.
    """
    loop = asyncio.get_running_loop()
    if result is None:
        result = RelayResult()
    tasks = [
        asyncio.ensure_future(
            _direction(
                loop, src=client, dst=upstream, pending=client_pending, result=result, up=True
            )
        ),
        asyncio.ensure_future(
            _direction(
                loop, src=upstream, dst=client, pending=upstream_pending, result=result, up=False
            )
        ),
    ]
    try:
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(
                pending, timeout=min(idle_timeout, 5.0), return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                exc = task.exception()
                if exc is not None:
                    # A reset or broken pipe on one side ends the tunnel for both, and the
                    # other side sees a reset too, not a clean end of a truncated stream.
                    result.error = exc.strerror if isinstance(exc, OSError) else repr(exc)
                    _abort(client)
                    _abort(upstream)
                    return result
            if pending and time.monotonic() - result._last > idle_timeout:
                result.error = f"idle for {idle_timeout:g}s"
                return result
        return result
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task
