"""The DNS responder inside a cell's network namespace: allowed names only, never forwarded.

A cell's namespace has nothing but ``lo``; its resolver is ``127.0.0.1:53``, served from
sockets the host bound inside that namespace. This responder answers ``A`` queries for
names the egress allowlist allows with a *synthetic* loopback address (from
:class:`SyntheticAddresses`), which the host's transparent listeners map back to the name.
Everything else is refused. It knows no upstream resolver and never performs a real
lookup, so DNS can neither reach nor leak anything: the only information a query carries
out of the cell is the audit event it produces.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import re
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from buildcell import _log
from buildcell.egress.relay import linger
from buildcell.errors import SandboxError

__all__ = ["DnsAnswer", "DnsResponder", "SyntheticAddresses"]

logger = _log.get(__name__)

_HEADER = struct.Struct("!HHHHHH")
_LENGTH = struct.Struct("!H")

# The classic limit for a UDP reply without EDNS (RFC 1035 4.2.1).
_UDP_PLAIN_LIMIT = 512
# The payload size we advertise and honour with EDNS: the DNS Flag Day 2020 value, which
# avoids IP fragmentation on any path (moot on loopback, but clients expect it).
_EDNS_PAYLOAD = 1232
_TCP_LIMIT = 65535
_TTL = 60

# One LDH label (RFC 952/1123): letters, digits, inner hyphens, 1..63 octets. Checked on
# the raw label octets, never on the presentation form, so a label holding a literal "."
# (which dnspython would print as "\.") cannot pose as two labels of an allowed name.
_LABEL = re.compile(rb"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


class SyntheticAddresses:
    """Hands out one stable loopback address per allowed name, and maps it back.

    Addresses are allocated in order from the first host address of the network and are
    never reused within a cell, so a connection to one always means the same name. The
    network and broadcast addresses are skipped (65534 addresses for the default /16).
    Safe to call from the DNS thread and the proxy threads at once.

    Args:
        network: where addresses come from; must lie within ``127.0.0.0/8`` so every
            address is local to the cell.

    Raises:
        ValueError: ``network`` is outside ``127.0.0.0/8`` or has no host addresses.
    """

    NETWORK: ClassVar[ipaddress.IPv4Network] = ipaddress.IPv4Network("127.77.0.0/16")

    def __init__(self, network: ipaddress.IPv4Network | None = None) -> None:
        network = self.NETWORK if network is None else network
        if not network.subnet_of(ipaddress.IPv4Network("127.0.0.0/8")):
            raise ValueError(f"synthetic address network {network} is not within 127.0.0.0/8")
        if network.num_addresses < 3:
            raise ValueError(f"synthetic address network {network} has no host addresses")
        self.network = network
        self._first = int(network.network_address) + 1
        self._last = int(network.broadcast_address) - 1
        self._lock = threading.Lock()
        self._by_name: dict[str, str] = {}
        self._by_address: dict[str, str] = {}

    def address_for(self, name: str) -> str:
        """The address of ``name`` (normalized: lowercase, no trailing dot), allocated once.

        Raises:
            SandboxError: every address of the network is taken.
        """
        with self._lock:
            address = self._by_name.get(name)
            if address is not None:
                return address
            candidate = self._first + len(self._by_name)
            if candidate > self._last:
                raise SandboxError(
                    f"cannot give {name!r} a synthetic address: all "
                    f"{self._last - self._first + 1} addresses in {self.network} are taken",
                    hint="the cell resolved more distinct allowed names than one cell supports",
                )
            address = str(ipaddress.IPv4Address(candidate))
            self._by_name[name] = address
            self._by_address[address] = name
            return address

    def name_for(self, address: str) -> str | None:
        """The name ``address`` was allocated to, or ``None`` if it was never handed out."""
        try:
            canonical = str(ipaddress.IPv4Address(address))
        except ValueError:
            return None
        with self._lock:
            return self._by_address.get(canonical)


@dataclass(frozen=True)
class DnsAnswer:
    """What one query produced, as the audit event records it.

    Attributes:
        name: the query name, lowercase without the trailing dot (``""`` if unparseable).
        qtype: the query type as text (``A``, ``AAAA``, ``TYPE65280``; ``""`` if unknown).
        rcode: the response code as text (``NOERROR``, ``REFUSED``, ``FORMERR``, ...).
        allowed: whether the allowlist allowed the name.
        address: the synthetic address answered, if any.
        transport: ``udp`` or ``tcp``.
    """

    name: str
    qtype: str
    rcode: str
    allowed: bool
    address: str | None
    transport: str


class DnsResponder:
    """Answers a cell's DNS queries from the allowlist and synthetic addresses alone.

    Args:
        allows_name: the egress policy's verdict on a normalized host name.
        addresses: where allowed names get their addresses.
        on_answer: called exactly once for every query that is answered (including
            ``FORMERR`` replies), on the thread serving DNS.
    """

    #: Close a TCP connection that sends no complete query (or takes no reply) for this long.
    TCP_IDLE_TIMEOUT: ClassVar[float] = 30.0
    #: Close a TCP connection after this many queries; a client simply reconnects.
    MAX_TCP_QUERIES: ClassVar[int] = 100
    #: Close new TCP connections at once beyond this many open ones.
    MAX_TCP_CONNECTIONS: ClassVar[int] = 64

    def __init__(
        self,
        allows_name: Callable[[str], bool],
        addresses: SyntheticAddresses,
        on_answer: Callable[[DnsAnswer], None],
    ) -> None:
        self._allows_name = allows_name
        self._addresses = addresses
        self._on_answer = on_answer

    def answer(self, wire: bytes, transport: str) -> bytes | None:
        """The reply to one DNS message, or ``None`` if it is to be dropped.

        Messages shorter than a header, and responses (QR set), are dropped: answering
        them could only start a loop. A readable header with an unreadable body gets
        ``FORMERR``. Only one ``IN`` question of opcode ``QUERY`` for an allowed host name
        gets an answer; an ``A`` query gets its synthetic address, any other type an empty
        ``NOERROR`` so clients fall back to ``A``.

        Args:
            wire: the message as received (without the TCP length prefix).
            transport: ``udp`` or ``tcp``; decides the size limit of the reply.

        Raises:
            ValueError: ``transport`` is neither ``udp`` nor ``tcp``.
        """
        if transport not in ("udp", "tcp"):
            raise ValueError(f"unknown DNS transport {transport!r}")
        if len(wire) < _HEADER.size:
            return None
        msg_id, flags, qdcount, _, _, _ = _HEADER.unpack_from(wire)
        if flags & dns.flags.QR:
            return None
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            self._on_answer(DnsAnswer("", "", "FORMERR", False, None, transport))
            return _format_error(msg_id, flags)

        # RA is set although we never recurse: the cell's stub resolvers are configured with
        # us as their recursive server, and some treat a reply without AA or RA as a lame
        # referral (Go's resolver) or warn about it (dig). From the cell's side recursion
        # *is* available, since every name it may use is answered right here.
        response = dns.message.make_response(
            query, recursion_available=True, our_payload=_EDNS_PAYLOAD
        )
        rcode, allowed, address = self._resolve(query, qdcount, response)
        response.set_rcode(rcode)
        reply = _render(response, _reply_limit(query, transport))
        first = query.question[0] if query.question else None
        self._on_answer(
            DnsAnswer(
                name=_audit_name(first.name) if first is not None else "",
                qtype=dns.rdatatype.to_text(first.rdtype) if first is not None else "",
                rcode=dns.rcode.to_text(rcode),
                allowed=allowed,
                address=address,
                transport=transport,
            )
        )
        return reply

    def _resolve(
        self, query: dns.message.Message, qdcount: int, response: dns.message.Message
    ) -> tuple[dns.rcode.Rcode, bool, str | None]:
        """The verdict on ``query`` as (rcode, allowed, address); fills in ``response``."""
        if query.opcode() != dns.opcode.QUERY:
            return dns.rcode.NOTIMP, False, None
        if query.edns > 0:
            # RFC 6891 6.1.3: we speak EDNS version 0 only.
            return dns.rcode.BADVERS, False, None
        # The header's count is checked too, in case the parser ever merges duplicates.
        if qdcount != 1 or len(query.question) != 1:
            return dns.rcode.REFUSED, False, None
        question = query.question[0]
        if question.rdclass != dns.rdataclass.IN:
            return dns.rcode.REFUSED, False, None
        host = _hostname(question.name)
        if host is None or not self._allows_name(host):
            return dns.rcode.REFUSED, False, None

        address = None
        if question.rdtype == dns.rdatatype.A:
            try:
                address = self._addresses.address_for(host)
            except SandboxError as e:
                logger.warning("DNS: %s", e)
                return dns.rcode.SERVFAIL, True, None
            # The owner is the name exactly as asked, so clients that randomize case
            # (DNS 0x20) recognize the answer.
            rrset = dns.rrset.RRset(question.name, dns.rdataclass.IN, dns.rdatatype.A)
            rrset.add(dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.A, address), _TTL)
            response.answer.append(rrset)
        # Any other type gets an empty NOERROR (NODATA), so clients fall back to A. No SOA
        # goes with it: the negative answer is then not cached, which costs nothing when
        # the responder is on the same loopback.
        response.flags |= dns.flags.AA
        return dns.rcode.NOERROR, True, address

    async def serve_udp(self, sock: socket.socket) -> None:
        """Answer datagrams on a bound, non-blocking UDP socket until cancelled.

        The caller owns the socket: it cancels the task, then closes the socket.

        Raises:
            SandboxError: the socket stopped working (closed, or not a UDP socket).
        """
        loop = asyncio.get_running_loop()
        while True:
            try:
                wire, peer = await loop.sock_recvfrom(sock, _TCP_LIMIT)
            except (ConnectionError, InterruptedError):
                # ICMP errors from earlier replies surface here on some kernels; they
                # concern one peer, not the socket.
                continue
            except OSError as e:
                raise SandboxError(f"DNS responder cannot read its UDP socket: {e}") from e
            reply = self.answer(wire, "udp")
            if reply is None:
                continue
            try:
                await loop.sock_sendto(sock, reply, peer)
            except OSError as e:
                # The peer is gone or the buffer is full; a client retries, nobody else cares.
                logger.debug("DNS: cannot send UDP reply to %s: %s", peer, e)

    async def serve_tcp(self, sock: socket.socket) -> None:
        """Serve DNS over TCP (RFC 7766) on a listening, non-blocking socket until cancelled.

        Each connection may pipeline up to :attr:`MAX_TCP_QUERIES` queries and is closed on
        end of file, a malformed length, :attr:`TCP_IDLE_TIMEOUT` of silence, or any socket
        error. On cancellation every connection is closed before this returns. The caller
        owns the listening socket.

        Raises:
            SandboxError: the listening socket stopped working.
        """
        loop = asyncio.get_running_loop()
        open_connections: set[socket.socket] = set()
        try:
            # The task group cancels and awaits every connection when this task is
            # cancelled, and lets a bug in one of them crash the responder loudly.
            async with asyncio.TaskGroup() as group:
                while True:
                    conn = await _accept(loop, sock)
                    if conn is None:
                        continue
                    if len(open_connections) >= self.MAX_TCP_CONNECTIONS:
                        conn.close()
                        continue
                    open_connections.add(conn)
                    conn.setblocking(False)
                    group.create_task(self._serve_connection(loop, conn, open_connections))
        except BaseExceptionGroup as failed:
            # The task group wraps whatever ended it. A lone error (the listener's
            # SandboxError, or a bug in one connection) is re-raised as itself, so callers
            # can catch our Error and a bug's traceback reads plainly.
            if len(failed.exceptions) == 1:
                raise failed.exceptions[0] from None
            raise
        finally:
            # A connection task cancelled before its first step never runs its own
            # ``finally``; its socket is closed here instead.
            for conn in list(open_connections):
                conn.close()
            open_connections.clear()

    async def _serve_connection(
        self,
        loop: asyncio.AbstractEventLoop,
        conn: socket.socket,
        open_connections: set[socket.socket],
    ) -> None:
        try:
            for _ in range(self.MAX_TCP_QUERIES):
                try:
                    async with asyncio.timeout(self.TCP_IDLE_TIMEOUT):
                        wire = await _read_message(loop, conn)
                except (TimeoutError, OSError):
                    return
                if wire is None:
                    return
                reply = self.answer(wire, "tcp")
                if reply is None:
                    # A response sent to a server: the peer is confused or hostile.
                    return
                try:
                    # The timeout also covers a peer that stops reading its replies.
                    async with asyncio.timeout(self.TCP_IDLE_TIMEOUT):
                        await loop.sock_sendall(conn, _LENGTH.pack(len(reply)) + reply)
                except (TimeoutError, OSError):
                    return
            # The budget is spent. Queries already pipelined behind it stay unanswered (the
            # client asks again on a new connection), but they must not turn the close into
            # a reset that destroys replies the client has not read yet.
            await linger(conn)
        finally:
            open_connections.discard(conn)
            conn.close()


def _hostname(name: dns.name.Name) -> str | None:
    """``name`` as a lowercase host name without the trailing dot, or ``None`` if it is not one."""
    labels = [label.lower() for label in name.labels if label]
    if not labels or any(_LABEL.fullmatch(label) is None for label in labels):
        return None
    # An all-numeric last label makes the name read as an IPv4 address ("10.0.0.1."), which
    # an allowlist must never be asked to judge as a host name (RFC 3696 2).
    if labels[-1].isdigit():
        return None
    return b".".join(labels).decode("ascii")


def _audit_name(name: dns.name.Name) -> str:
    """Any query name in presentation form for the audit: escaped, lowercase, no final dot."""
    if name == dns.name.root:
        return ""
    return name.to_text(omit_final_dot=True).lower()


def _reply_limit(query: dns.message.Message, transport: str) -> int:
    if transport == "tcp":
        return _TCP_LIMIT
    if query.edns < 0:
        return _UDP_PLAIN_LIMIT
    # RFC 6891 6.2.5: below 512 means 512; above our own advertised size means ours.
    return min(max(query.payload, _UDP_PLAIN_LIMIT), _EDNS_PAYLOAD)


def _render(response: dns.message.Message, max_size: int) -> bytes:
    """``response`` in wire format within ``max_size``, truncated (TC) if it does not fit."""
    try:
        return response.to_wire(max_size=max_size)
    except dns.exception.TooBig:
        # Keep the question (so the client can match the reply) and drop every record
        # rather than send a partial answer; TC tells the client to ask again over TCP.
        response.answer = []
        response.authority = []
        response.additional = []
        response.flags |= dns.flags.TC
        return response.to_wire(max_size=max_size)


def _format_error(msg_id: int, flags: int) -> bytes:
    """A header-only FORMERR reply to a message whose body could not be parsed."""
    opcode_bits = flags & (0xF << 11)
    reply_flags = dns.flags.QR | dns.flags.RA | opcode_bits | (flags & dns.flags.RD)
    return _HEADER.pack(msg_id, reply_flags | dns.rcode.FORMERR, 0, 0, 0, 0)


async def _accept(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> socket.socket | None:
    """The next connection, or ``None`` after an error that concerns one connection only.

    Not ``loop.sock_accept``: it accepts inside a reader callback and hands the socket over
    through a future, so a cancellation arriving between the two drops a connected socket
    on the floor (an fd leak until garbage collection). Here the wait holds no socket, and
    ``accept`` returns straight to a caller that records the socket before it next yields.
    """
    while True:
        try:
            conn, _ = sock.accept()
        except (BlockingIOError, InterruptedError):
            await _readable(loop, sock)
            continue
        except ConnectionError:
            # The peer gave up before we accepted; the listener is fine.
            return None
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                # Out of descriptors or memory: wait for connections to close instead of
                # spinning on a listener that stays readable.
                logger.warning("DNS: cannot accept a TCP connection: %s", e)
                await asyncio.sleep(0.1)
                return None
            raise SandboxError(f"DNS responder cannot accept on its TCP socket: {e}") from e
        return conn


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    ready: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


async def _read_message(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> bytes | None:
    """One length-prefixed message, or ``None`` at end of file or on a malformed length."""
    prefix = await _read_exactly(loop, conn, _LENGTH.size)
    if prefix is None:
        return None
    (length,) = _LENGTH.unpack(prefix)
    if length < _HEADER.size:
        # Not even a header can follow; the stream cannot be trusted to be in step.
        return None
    return await _read_exactly(loop, conn, length)


async def _read_exactly(
    loop: asyncio.AbstractEventLoop, conn: socket.socket, size: int
) -> bytes | None:
    data = bytearray()
    while len(data) < size:
        chunk = await loop.sock_recv(conn, size - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)
