"""What the first bytes of a connection say about where it is going.

A name the operator pinned to a non-public address may reach that address, but the server
there often serves other names too (virtual hosts). Before such a connection is relayed,
the proxy reads its first bytes and asks :func:`peek`: a TLS ClientHello must carry the
pinned name as its one server name (SNI), an HTTP request is parsed with h11 and its
``Host`` checked by the proxy, and anything else cannot be checked, so it is refused.

Pure: bytes in, a :class:`Peek` out; nothing here touches a socket.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from buildcell._text import show

__all__ = ["MAX_HELLO", "MAX_HELLO_BYTES", "Peek", "peek", "sni_problem"]

#: The largest ClientHello accepted; real ones are 0.5-2 KiB.
MAX_HELLO = 64 * 1024
#: The most bytes of records read for one ClientHello: more is never needed.
MAX_HELLO_BYTES = 2 * MAX_HELLO

_HANDSHAKE = 0x16
_CLIENT_HELLO = 1
_SERVER_NAME = 0x0000
# Encrypted ClientHello (RFC 9849) and its draft predecessor ESNI: the real server name
# travels encrypted, so the one in the clear proves nothing.
_HIDDEN_NAME = {0xFE0D: "encrypted ClientHello", 0xFFCE: "encrypted server name"}
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


@dataclass(frozen=True)
class Peek:
    """What a connection's first bytes are.

    Attributes:
        kind: ``tls`` (a whole ClientHello was read), ``http`` (the first byte starts a
            request method), or ``other``.
        server_name: the one server name of a ClientHello, as sent; None if it had none.
        problem: why a ClientHello cannot be trusted to name its server (malformed, more
            than one name, a hidden name, ...); None when it can.
    """

    kind: Literal["tls", "http", "other"]
    server_name: str | None = None
    problem: str | None = None


class _Malformed(Exception):
    pass


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.data):
            raise _Malformed("it ends early")
        chunk = self.data[self.at : self.at + n]
        self.at += n
        return chunk

    def number(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def vector(self, size: int) -> _Reader:
        return _Reader(self.take(self.number(size)))

    def rest(self) -> bytes:
        return self.take(self.left)

    @property
    def left(self) -> int:
        return len(self.data) - self.at


def _handshake(data: bytes) -> bytes | None:
    """The handshake bytes carried by the TLS records at the start of ``data``, once they
    hold a whole first handshake message; None while more bytes are needed."""
    body = bytearray()
    at = 0
    while True:
        if len(body) >= 4:
            need = 4 + int.from_bytes(body[1:4], "big")
            if need > MAX_HELLO:
                raise _Malformed(f"it is larger than {MAX_HELLO >> 10} KiB")
            if len(body) >= need:
                return bytes(body[:need])
        if at > MAX_HELLO_BYTES - 5:
            # Tiny records could stretch a small ClientHello over megabytes of headers.
            raise _Malformed(f"it takes more than {MAX_HELLO_BYTES >> 10} KiB of records")
        if len(data) < at + 5:
            return None
        if data[at] != _HANDSHAKE:
            raise _Malformed("a record before it ends is not a handshake record")
        if data[at + 1] != 3:
            raise _Malformed("its record has an unknown version")
        length = int.from_bytes(data[at + 3 : at + 5], "big")
        if not 0 < length <= 1 << 14:
            raise _Malformed("its record length is out of range")
        if len(data) < at + 5 + length:
            return None
        body += data[at + 5 : at + 5 + length]
        at += 5 + length


def _server_names(hello: bytes) -> tuple[str | None, str | None]:
    """(the server name, a problem) of a whole ClientHello handshake message."""
    r = _Reader(hello)
    if r.number(1) != _CLIENT_HELLO:
        raise _Malformed("the first handshake message is not a ClientHello")
    body = r.vector(3)
    body.take(2 + 32)  # legacy_version, random
    body.vector(1)  # legacy_session_id
    suites = body.vector(2)
    if suites.left == 0 or suites.left % 2:
        raise _Malformed("its cipher suites are malformed")
    body.vector(1)  # legacy_compression_methods
    if body.left == 0:
        return None, None  # no extensions at all: no server name
    extensions = body.vector(2)
    if body.left:
        raise _Malformed("bytes follow its extensions")
    seen: set[int] = set()
    name: str | None = None
    problem: str | None = None
    while extensions.left:
        kind = extensions.number(2)
        data = extensions.vector(2)
        if kind in seen:
            raise _Malformed(f"it repeats extension {kind}")
        seen.add(kind)
        if kind in _HIDDEN_NAME and problem is None:
            problem = f"it carries an {_HIDDEN_NAME[kind]}, which hides the real server name"
        if kind != _SERVER_NAME:
            continue
        names = data.vector(2)
        if data.left:
            raise _Malformed("bytes follow its server name list")
        found: list[bytes] = []
        while names.left:
            name_type = names.number(1)
            value = names.vector(2).rest()
            if name_type != 0:
                raise _Malformed(f"it names a server by an unknown name type {name_type}")
            found.append(value)
        if len(found) != 1:
            raise _Malformed(f"it has {len(found)} server names, not one")
        try:
            name = found[0].decode("ascii")
        except UnicodeDecodeError:
            raise _Malformed("its server name is not ASCII") from None
    return name, problem


def peek(data: bytes) -> Peek | None:
    """What ``data``, the first bytes a client sent, are; None while more are needed.

    A TLS connection is judged once its whole ClientHello arrived (it may span several
    records, up to :data:`MAX_HELLO`); an HTTP one by its first byte, since h11 parses the
    request itself. Never raises on hostile input.
    """
    if not data:
        return None
    if data[0] == _HANDSHAKE:
        try:
            hello = _handshake(data)
            if hello is None:
                return None
            name, problem = _server_names(hello)
        except _Malformed as e:
            return Peek("tls", None, f"its ClientHello is malformed: {e}")
        return Peek("tls", name, problem)
    if data[0] in _TOKEN:
        return Peek("http")
    return Peek("other")


def sni_problem(seen: Peek, name: str) -> str | None:
    """Why a ClientHello does not name ``name`` (normalized) as its server; None if it does.

    The server name must be exactly ``name`` up to ASCII case: no trailing dot (RFC 6066
    forbids one, and a server may route ``name.`` to another virtual host), no second
    name, nothing hidden in an encrypted ClientHello.
    """
    if seen.problem is not None:
        return f"the TLS connection cannot be checked: {seen.problem}"
    if seen.server_name is None:
        return "the TLS ClientHello names no server (SNI)"
    if seen.server_name.lower() != name:
        return f"the TLS server name is {show(seen.server_name, 80)}"
    return None
