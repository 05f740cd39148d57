"""The cell's network namespace: only ``lo``, plus listening sockets the host serves.

A cell with a network policy gets a namespace of its own in which nothing routes
anywhere. As root, the supervisor thread that starts the cell enters a new namespace of
its own (namespaces belong to threads), brings ``lo`` up, binds the listeners of the
policy (the proxy, the resolver, one transparent listener per allowed port) *inside* it,
starts bubblewrap there and goes back (:func:`thread_netns`). Rootless, the namespace must
belong to a user namespace, which one thread of a process cannot enter: the cell's own
process does the same between fork and exec of bubblewrap and hands the listeners to the
supervisor over a unix socket with ``SCM_RIGHTS`` (:func:`child_setup`). Either way
bubblewrap keeps the namespace (``--share-net``).
The host side serves those sockets from outside: no helper process or binary exists
inside the cell, it works rootless (the namespace then belongs to a user namespace the
same process creates, or to the storage anchor's), and per-cell ports never clash because
each cell has its own namespace.

The sockets keep the namespace alive after the cell's last process is gone; closing
them (teardown) frees it.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import fcntl
import os
import socket
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from buildcell.egress.listener import Listener
from buildcell.errors import SandboxError

__all__ = [
    "DNS_PORT",
    "PROXY_PORT",
    "Listener",
    "NetnsPlan",
    "child_setup",
    "plan_netns",
    "receive_listeners",
    "thread_netns",
]

PROXY_PORT = 3128
DNS_PORT = 53
_LOOPBACK = "127.0.0.1"
_ANY = "0.0.0.0"  # noqa: S104 - the cell's own namespace: only lo exists there

_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1

_libc = ctypes.CDLL(None, use_errno=True)
_unshare = _libc.unshare
_setns = _libc.setns


@dataclass(frozen=True)
class NetnsPlan:
    """What the cell's namespace holds, and whether it needs a user namespace of its own.

    Attributes:
        listeners: the sockets bound inside, in the order they are passed back.
        own_userns: rootless without a storage anchor: the namespace must belong to a
            user namespace created with it (mapping the caller's uid and gid to
            themselves), since an unprivileged process cannot create a network
            namespace otherwise.
        skipped_ports: allowed ports that get no transparent listener because the proxy
            or resolver already uses them.
    """

    listeners: tuple[Listener, ...]
    own_userns: bool = False
    uid: int = 0
    gid: int = 0
    skipped_ports: tuple[int, ...] = ()


def plan_netns(transparent_ports: Iterable[int], *, own_userns: bool) -> NetnsPlan:
    """The listeners of a cell with a network policy (pure)."""
    listeners = [
        Listener("proxy", "tcp", _LOOPBACK, PROXY_PORT),
        Listener("dns", "udp", _LOOPBACK, DNS_PORT),
        Listener("dns", "tcp", _LOOPBACK, DNS_PORT),
    ]
    skipped: list[int] = []
    for port in sorted(set(transparent_ports)):
        if port in (PROXY_PORT, DNS_PORT):
            skipped.append(port)
            continue
        # Bound to every local address: a connection to any synthetic 127.x address the
        # resolver handed out arrives here, and getsockname() says which name it meant.
        listeners.append(Listener("transparent", "tcp", _ANY, port))
    return NetnsPlan(
        tuple(listeners),
        own_userns=own_userns,
        uid=os.getuid(),
        gid=os.getgid(),
        skipped_ports=tuple(skipped),
    )


def _write(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _fill_namespace(listeners: Iterable[Listener], made: list[socket.socket]) -> None:
    """In the current network namespace: ``lo`` up, each listener bound (into ``made``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        req = bytearray(struct.pack("16sH14x", b"lo", 0))
        fcntl.ioctl(s, _SIOCGIFFLAGS, req)
        current = struct.unpack_from("16sH", req)[1]
        fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", current | _IFF_UP))
    for item in listeners:
        kind = socket.SOCK_STREAM if item.transport == "tcp" else socket.SOCK_DGRAM
        sock = socket.socket(socket.AF_INET, kind | socket.SOCK_CLOEXEC)
        made.append(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((item.address, item.port))
        if item.transport == "tcp":
            sock.listen(1024)


@contextlib.contextmanager
def thread_netns(plan: NetnsPlan) -> Iterator[list[socket.socket]]:
    """As root: the calling thread alone enters a new network namespace for the block.

    Namespaces belong to threads, so the rest of the supervisor stays where it is; a
    process the thread starts inside the block (bubblewrap with ``--share-net``) lives in
    the new namespace, without anything of Python having to run between its fork and exec.
    Yields the listeners bound inside, non-blocking, in ``plan.listeners`` order; they are
    the caller's to close unless the block raises.

    Raises:
        SandboxError: the namespace or a listener could not be made.
    """
    assert not plan.own_userns, "a user namespace cannot be entered by one thread"
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    made: list[socket.socket] = []
    try:
        if _unshare(_CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise SandboxError(
                f"cannot set up the cell's network namespace: unshare: {os.strerror(err)}"
            )
        try:
            try:
                _fill_namespace(plan.listeners, made)
            except OSError as e:
                raise SandboxError(
                    f"cannot set up the cell's network namespace: {e.strerror or e}"
                ) from e
            for sock in made:
                sock.setblocking(False)
            yield made
        except BaseException:
            for sock in made:
                sock.close()
            raise
        finally:
            if _setns(home, _CLONE_NEWNET) != 0:
                # The thread would go on in the cell's namespace: nothing may continue.
                err = ctypes.get_errno()
                os.write(2, f"buildcell: cannot leave a network namespace: {err}\n".encode())
                os.abort()
    finally:
        os.close(home)


def child_setup(plan: NetnsPlan, channel: socket.socket) -> Callable[[], None]:
    """The step run in the cell's process before bubblewrap starts (after fork).

    It reports back over ``channel`` either the bound sockets or one line of error, then
    returns; on error it exits the child with 125 so bubblewrap never starts without
    the namespace it was promised.
    """
    listeners = plan.listeners
    own_userns = plan.own_userns
    uid_map = f"{plan.uid} {plan.uid} 1\n".encode()
    gid_map = f"{plan.gid} {plan.gid} 1\n".encode()

    def setup() -> None:
        made: list[socket.socket] = []
        try:
            flags = _CLONE_NEWNET | (_CLONE_NEWUSER if own_userns else 0)
            if _unshare(flags) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"unshare(network namespace): {os.strerror(err)}")
            if own_userns:
                _write("/proc/self/setgroups", b"deny")
                _write("/proc/self/uid_map", uid_map)
                _write("/proc/self/gid_map", gid_map)
            _fill_namespace(listeners, made)
            fds = array.array("i", [s.fileno() for s in made])
            channel.sendmsg([b"ok"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        except BaseException as e:
            # Whatever failed, bubblewrap must not start without the namespace it was
            # promised; the parent reads this line instead of the sockets.
            why = e.strerror if isinstance(e, OSError) and e.strerror else repr(e)
            try:
                channel.send(f"err:{why}".encode(errors="replace")[:400])
            finally:
                os._exit(125)
        finally:
            for sock in made:
                sock.close()

    return setup


def receive_listeners(channel: socket.socket, plan: NetnsPlan) -> list[socket.socket]:
    """The sockets the cell's process bound, in ``plan.listeners`` order.

    Raises:
        SandboxError: the namespace or a listener could not be made.
    """
    count = len(plan.listeners)
    channel.settimeout(10)
    try:
        # MSG_CMSG_CLOEXEC: no later exec of the supervisor ever inherits a listener.
        data, ancdata, _flags, _addr = channel.recvmsg(
            512, socket.CMSG_SPACE(count * array.array("i").itemsize), socket.MSG_CMSG_CLOEXEC
        )
    except OSError as e:
        raise SandboxError(f"cannot receive the cell's network listeners: {e}") from e
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % fds.itemsize
            fds.frombytes(payload[:usable])
    socks = [socket.socket(fileno=fd) for fd in fds]
    if data != b"ok" or len(socks) != count:
        for sock in socks:
            sock.close()
        why = data[4:].decode(errors="replace") if data.startswith(b"err:") else ""
        if not why:
            why = "the cell's process exited before reporting" if not data else repr(data)
        hint = None
        if "Operation not permitted" in why or why.endswith(os.strerror(errno.EPERM)):
            hint = (
                "this host does not let this user create network namespaces: see `buildcell doctor`"
            )
        raise SandboxError(f"cannot set up the cell's network namespace: {why}", hint=hint)
    for sock in socks:
        sock.setblocking(False)
    return socks
