"""A cell's egress allowlist: parsing entries, matching destinations, guarding addresses.

An entry (``--allow``, or ``network.allow`` in a spec) names where a cell may connect:

* ``HOST`` or ``HOST:PORT``: one DNS name, on ports 80 and 443, or on PORT;
* ``*.DOMAIN`` or ``*.DOMAIN:PORT``: every strict subdomain of DOMAIN, never DOMAIN itself;
* ``IP:PORT``, ``IP/PREFIX:PORT``, ``[IPv6]:PORT``, ``[IPv6/PREFIX]:PORT``: addresses the
  operator names outright. The port is required.

A name entry is matched against the name the build asked for; the host then resolves it.
An address that is loopback, private, link-local, a cloud metadata service or otherwise not
public is never reached through a name entry alone, only through an IP entry covering it
or a pin the operator granted (below). The build may control the DNS of a name (a wildcard
over a domain that hands out subdomains, a rebinding server), so without this guard an
allowlisted name would be a door into the host's own network.

Who wrote an entry matters. An operator (``--allow``, the configuration file) may name any
address. A spec is written by whoever controls the repository, so before its entries join a
policy they pass :func:`spec_entry_problem`: a spec may name public destinations only.

An internal mirror usually has a name that resolves to a private address. Allowing that
address literally would open every virtual host behind it, so the operator pins the name
instead (``--add-host NAME:ADDRESS`` with ``--allow NAME``): :meth:`EgressPolicy.with_pins`
turns such pins into :class:`PinnedName` grants, which let exactly that name reach exactly
that address. Only the operator's entries grant a pin; the proxy then checks that what
travels there (an HTTP ``Host``, a TLS server name) names the pinned name and no other.

Everything here is pure: no sockets, no lookups. The proxy and the DNS responder resolve
names and ask :func:`decide` and :meth:`EgressPolicy.allows_name`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeAlias
from urllib.parse import urlsplit

from buildcell._text import show
from buildcell.errors import ConfigError

__all__ = [
    "DEFAULT_PORTS",
    "SPEC_MIN_PREFIX",
    "AllowEntry",
    "EgressPolicy",
    "EntryKind",
    "PinnedName",
    "Verdict",
    "decide",
    "guarded_reason",
    "guarded_reasons",
    "normalize_host",
    "parse_allow",
    "parse_pinned_host",
    "spec_entry_problem",
    "suggest_allow",
]

_IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
_IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
EntryKind: TypeAlias = Literal["host", "wildcard", "network"]

#: The ports a name entry without a port allows: plain and TLS HTTP.
DEFAULT_PORTS: frozenset[int] = frozenset({80, 443})

_MAX_NAME = 253
_MAX_LABEL = 63
# Far above any real name; it bounds the IDNA codec's work on names a hostile build sends.
_MAX_INPUT = 1024
_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)", re.ASCII)
# WHATWG's "ends in a number": resolvers and URL parsers read such names as IPv4 numbers
# (127.1, 0x7f.0.0.1, 2130706433), so a name entry must never be one.
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*", re.ASCII)
_PORT = re.compile(r"[0-9]{1,5}", re.ASCII)
_FORMS = "write HOST, HOST:PORT, *.DOMAIN, *.DOMAIN:PORT or IP[/PREFIX]:PORT, e.g. pypi.org:443"

_V4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_6TO4 = ipaddress.IPv6Network("2002::/16")
_GLOBAL_UNICAST_V6 = ipaddress.IPv6Network("2000::/3")
_METADATA: frozenset[_IPAddress] = frozenset(
    {
        ipaddress.IPv4Address("169.254.169.254"),  # AWS, GCP, Azure, OpenStack, Oracle
        ipaddress.IPv4Address("100.100.100.200"),  # Alibaba Cloud
        ipaddress.IPv6Address("fd00:ec2::254"),  # AWS over IPv6
    }
)
# The IANA special-purpose registries, spelled out: ``ipaddress.is_private`` and
# ``is_global`` changed between Python releases, and their answer is not a message.
# The first match wins, so narrower ranges come before the ranges containing them.
_GUARDED_V4: tuple[tuple[ipaddress.IPv4Network, str], ...] = tuple(
    (ipaddress.IPv4Network(net), reason)
    for net, reason in (
        ("0.0.0.0/32", "unspecified"),
        ("0.0.0.0/8", "reserved"),
        ("127.0.0.0/8", "loopback"),
        ("10.0.0.0/8", "private"),
        ("172.16.0.0/12", "private"),
        ("192.168.0.0/16", "private"),
        ("169.254.0.0/16", "link-local"),
        ("100.64.0.0/10", "carrier-grade NAT"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),  # also holds the broadcast address
        ("192.0.0.0/24", "reserved"),  # IETF protocol assignments
        ("192.0.2.0/24", "reserved"),  # documentation
        ("198.51.100.0/24", "reserved"),  # documentation
        ("203.0.113.0/24", "reserved"),  # documentation
        ("198.18.0.0/15", "reserved"),  # benchmarking
        ("192.88.99.0/24", "reserved"),  # the retired 6to4 relay anycast
    )
)
_GUARDED_V6: tuple[tuple[ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.IPv6Network(net), reason)
    for net, reason in (
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("64:ff9b:1::/48", "private"),  # local-use NAT64: translates to local networks
        ("::/8", "reserved"),  # IPv4-compatible and other unassigned low space
        ("100::/64", "reserved"),  # discard-only
        ("2001::/23", "reserved"),  # IETF protocol assignments (Teredo, ORCHID, ...)
        ("2001:db8::/32", "reserved"),  # documentation
        ("3fff::/20", "reserved"),  # documentation
        ("fc00::/7", "unique local"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local"),
        ("ff00::/8", "multicast"),
    )
)


class _Invalid(Exception):
    """What is wrong with a piece of an entry; the public functions add which entry."""

    def __init__(self, what: str, hint: str | None = None) -> None:
        super().__init__(what)
        self.what = what
        self.hint = hint


def _show(text: str) -> str:
    return show(text, 80)


# -- names -----------------------------------------------------------------------------


def _name(host: str) -> str:
    if not host:
        raise _Invalid("the host name is empty")
    if len(host) > _MAX_INPUT:
        raise _Invalid(f"the host name is longer than {_MAX_NAME} characters")
    name = host
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            raise _Invalid("the host name is not a valid internationalized name") from None
    # The codec leaves ASCII labels as they were, so lowercasing comes after it; and
    # punycode passes ASCII punctuation through, so the labels are checked after it too.
    name = name.lower().removesuffix(".")
    if not name:
        raise _Invalid("the host name is empty")
    if len(name) > _MAX_NAME:
        raise _Invalid(f"the host name is longer than {_MAX_NAME} characters")
    labels = name.split(".")
    for label in labels:
        if not label:
            raise _Invalid("the host name has an empty label")
        if len(label) > _MAX_LABEL:
            raise _Invalid(f"label {_show(label)} is longer than {_MAX_LABEL} characters")
        if not _LABEL.fullmatch(label):
            raise _Invalid(
                f"label {_show(label)} may hold only letters, digits, '-' and '_', "
                "and cannot start or end with '-'"
            )
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        raise _Invalid(
            "the host name ends in a number, which resolvers read as an IPv4 address",
            hint="write an IP address with a port, e.g. 10.0.0.5:8080",
        )
    return name


def _try_name(host: str) -> str | None:
    try:
        return _name(host)
    except _Invalid:
        return None


def normalize_host(host: str) -> str:
    """The canonical form of a DNS name, as entries store it and matching compares it.

    Lowercase, without one trailing dot, non-ASCII labels IDNA-encoded (``bücher.example``
    becomes ``xn--bcher-kva.example``). Each label is 1-63 letters, digits, ``-`` (not
    first or last) and ``_``; the whole name is at most 253 characters and does not end
    in a numeric label (``127.1`` is an address in disguise).

    Raises:
        ConfigError: ``host`` is not a valid DNS name.
    """
    try:
        return _name(host)
    except _Invalid as e:
        raise ConfigError(f"invalid host name {_show(host)}: {e.what}", hint=e.hint) from None


# -- addresses -------------------------------------------------------------------------


def _unbracket(text: str) -> str:
    return text[1:-1] if text.startswith("[") and text.endswith("]") else text


def _target(addr: _IPAddress) -> _IPAddress | None:
    """The destination an address really names, for matching; None if it cannot match.

    An IPv4-mapped IPv6 address reaches its IPv4 address, so it is matched as that. Zone
    indexes (``fe80::1%eth0``) never match: no entry can name one.
    """
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.scope_id is not None:
            return None
        if addr.ipv4_mapped is not None:
            return addr.ipv4_mapped
    return addr


def _address(text: str) -> _IPAddress | None:
    """An IP literal (brackets optional) as a destination; None if ``text`` is not one."""
    try:
        addr = ipaddress.ip_address(_unbracket(text))
    except ValueError:
        return None
    return _target(addr)


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _guard(addr: _IPAddress) -> str | None:
    if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id is not None:
        addr = ipaddress.IPv6Address(int(addr))
    if addr in _METADATA:
        return "cloud metadata"
    if isinstance(addr, ipaddress.IPv4Address):
        return next((reason for net, reason in _GUARDED_V4 if addr in net), None)
    if addr in _V4_MAPPED:
        mapped = addr.ipv4_mapped
        assert mapped is not None
        return _guard(mapped)
    # Translation prefixes reach the IPv4 address they embed, wherever a gateway serves them.
    if addr in _NAT64:
        inner = _guard(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
        return None if inner is None else f"{inner} via NAT64"
    if addr in _6TO4:
        embedded = addr.sixtofour
        assert embedded is not None
        inner = _guard(embedded)
        return None if inner is None else f"{inner} via 6to4"
    reason = next((reason for net, reason in _GUARDED_V6 if addr in net), None)
    if reason is None and addr not in _GLOBAL_UNICAST_V6:
        # IANA allocates unicast space only from 2000::/3; the rest is not the internet.
        return "reserved"
    return reason


#: Guard reasons no operator pin grants: no mirror lives there.
_NEVER_PINNED = ("cloud metadata", "unspecified", "multicast")


def _pinnable(address: str | _IPAddress) -> bool:
    """Whether a granted pin may reach ``address`` (a private or loopback mirror may; the
    metadata service, an unspecified or a multicast address never, however reached)."""
    why = guarded_reason(address)
    return why is None or not why.startswith(_NEVER_PINNED)


def guarded_reason(address: str | _IPAddress) -> str | None:
    """Why a name entry must not reach ``address``, or None for a public unicast address.

    One of ``cloud metadata`` (checked first, so 169.254.169.254 says so rather than
    link-local), ``loopback``, ``private``, ``link-local``, ``carrier-grade NAT``,
    ``multicast``, ``unspecified``, ``reserved``, ``unique local`` or ``site-local``. An
    IPv4-mapped address (``::ffff:127.0.0.1``) gets its IPv4 address's reason; NAT64 and
    6to4 addresses embedding a guarded IPv4 address get its reason ``via NAT64``/``via
    6to4``. The guard does not apply to IP entries: an operator who names an address
    means it.

    Raises:
        ConfigError: ``address`` is a string that is not an IP address.
    """
    if not isinstance(address, str):
        return _guard(address)
    try:
        parsed = ipaddress.ip_address(_unbracket(address))
    except ValueError:
        raise ConfigError(f"not an IP address: {_show(address)}") from None
    return _guard(parsed)


# -- entries ---------------------------------------------------------------------------


def _network_text(network: _IPNetwork) -> str:
    whole = network.prefixlen == network.max_prefixlen
    text = str(network.network_address) if whole else str(network)
    return f"[{text}]" if network.version == 6 else text


def _canonical(
    kind: EntryKind, host: str | None, network: _IPNetwork | None, ports: frozenset[int]
) -> str:
    if kind == "network":
        assert network is not None
        return f"{_network_text(network)}:{min(ports)}"
    prefix = "*." if kind == "wildcard" else ""
    suffix = "" if ports == DEFAULT_PORTS else f":{min(ports)}"
    return f"{prefix}{host}{suffix}"


def _entry_problem(entry: AllowEntry) -> str | None:
    if not entry.ports or any(not 1 <= port <= 65535 for port in entry.ports):
        return "ports must be in 1-65535"
    if entry.kind == "network":
        if entry.network is None or entry.host is not None:
            return "a network entry has a network and no host"
        if len(entry.ports) != 1:
            return "a network entry has exactly one port"
    elif entry.kind in ("host", "wildcard"):
        if entry.host is None or entry.network is not None:
            return "a name entry has a host and no network"
        if _try_name(entry.host) != entry.host:
            return "the host is not a normalized name"
        if entry.kind == "wildcard" and "." not in entry.host:
            return "a wildcard covers a domain of at least two labels"
        if len(entry.ports) != 1 and entry.ports != DEFAULT_PORTS:
            return "a name entry has one port, or the default ports"
    else:
        return f"unknown kind {entry.kind!r}"
    if entry.text != _canonical(entry.kind, entry.host, entry.network, entry.ports):
        return "text is not the canonical form of the fields"
    return None


@dataclass(frozen=True)
class AllowEntry:
    """One allowlist entry. Make entries with :func:`parse_allow`.

    Attributes:
        text: the canonical form, which :func:`parse_allow` turns back into this entry.
        kind: ``host`` (one name), ``wildcard`` (strict subdomains of ``host``) or
            ``network`` (addresses in ``network``).
        host: the normalized name, or the domain under a wildcard (without ``*.``).
        network: the addresses of a network entry (a single address is a /32 or /128).
        ports: the ports allowed: one, or 80 and 443 for a name entry without a port.

    Raises:
        ValueError: the fields contradict each other or ``text``.
    """

    text: str
    kind: EntryKind
    host: str | None
    network: _IPNetwork | None
    ports: frozenset[int]

    def __post_init__(self) -> None:
        problem = _entry_problem(self)
        if problem is not None:
            raise ValueError(f"inconsistent AllowEntry {self.text!r}: {problem}")

    def describe(self) -> str:
        """The canonical text of the entry (``pypi.org``, ``*.example.org:8443``, ...)."""
        return self.text

    def matches_name(self, name: str) -> bool:
        """Whether this name entry covers ``name``, on any port; False for an IP entry.

        An invalid name matches nothing.
        """
        normalized = _try_name(name)
        return normalized is not None and self._covers_name(normalized)

    def matches(self, host: str, port: int) -> bool:
        """Whether this entry allows ``host:port``.

        ``host`` is a name, or an IP literal (brackets optional); a literal is matched by
        IP entries only and a name by name entries only. An invalid host matches nothing.
        """
        if port not in self.ports:
            return False
        addr = _address(host)
        if addr is not None:
            return self._covers_address(addr)
        name = _try_name(host)
        return name is not None and self._covers_name(name)

    def _covers_name(self, name: str) -> bool:
        if self.host is None:
            return False
        if self.kind == "host":
            return name == self.host
        return self.kind == "wildcard" and name.endswith("." + self.host)

    def _covers_address(self, addr: _IPAddress) -> bool:
        return self.network is not None and addr in self.network


def _url_hint(text: str) -> str:
    try:
        parts = urlsplit(text)
        host, port = parts.hostname, parts.port
    except ValueError:
        return _FORMS
    if not host:
        return _FORMS
    addr = _address(host)
    default = 80 if parts.scheme.lower() == "http" else 443
    if addr is not None:
        return f"write the address and port, e.g. {_hostport(str(addr), port or default)}"
    name = _try_name(host)
    if name is None:
        return _FORMS
    if port is not None:
        return f"write the host and port, e.g. {name}:{port}"
    return f"write the host, e.g. {name} or {name}:{default}"


def _split_port(text: str) -> tuple[str, bool, str | None]:
    """(destination, whether it was in brackets, port text or None)."""
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise _Invalid("'[' is not closed")
        inner, rest = text[1:close], text[close + 1 :]
        if not rest:
            return inner, True, None
        if not rest.startswith(":"):
            raise _Invalid(f"unexpected {_show(rest)} after ']'")
        return inner, True, rest[1:]
    if text.count(":") > 1:
        raise _Invalid(
            "an IPv6 address must be in brackets, with a port",
            hint="write e.g. [fd00::1]:8080 or [fd00::/8]:443",
        )
    dest, sep, port = text.partition(":")
    return dest, False, port if sep else None


def _port(text: str) -> int:
    if not text:
        raise _Invalid("the port after ':' is empty")
    if not _PORT.fullmatch(text):
        raise _Invalid(f"port {_show(text)} is not a number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise _Invalid(f"port {port} is out of range 1-65535")
    return port


def _literal(dest: str, port_text: str | None) -> _IPNetwork | None:
    """The network an IP (or CIDR) destination names; None if it does not look like one."""
    where = "PORT" if port_text is None else port_text
    try:
        network = ipaddress.ip_network(dest)
    except ValueError:
        if "/" not in dest:
            return None
        try:
            loose = ipaddress.ip_network(dest, strict=False)
        except ValueError:
            address, _, prefix = dest.partition("/")
            if _address(address) is not None:
                raise _Invalid(f"{_show(prefix)} is not a prefix length for {address}") from None
            return None
        raise _Invalid(
            f"{dest} has host bits set; the network is {loose}",
            hint=f"write {_network_text(loose)}:{where}",
        ) from None
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_V4_MAPPED):
        mapped = network.network_address.ipv4_mapped
        assert mapped is not None
        v4 = ipaddress.IPv4Network((mapped, network.prefixlen - 96))
        raise _Invalid(
            "an IPv4-mapped address names an IPv4 destination",
            hint=f"write the IPv4 form, {_network_text(v4)}:{where}",
        )
    return network


def _path_error(host: str, port_text: str | None) -> _Invalid:
    """A URL path after the host; the hint shows the entry without it, when it is one."""
    hint = None
    try:
        entry = _parse(host if not port_text else f"{host}:{port_text}")
    except _Invalid:
        pass
    else:
        hint = f"write the host, e.g. {entry.describe()}"
        if entry.kind == "host" and entry.ports == DEFAULT_PORTS:
            hint += f" or {entry.host}:443"
    return _Invalid("it has a path; an entry names only a host and a port", hint=hint)


def _parse(text: str) -> AllowEntry:
    if not text:
        raise _Invalid("it is empty")
    if len(text) > _MAX_INPUT:
        raise _Invalid("it is too long")
    if any(c.isspace() for c in text):
        raise _Invalid("it contains whitespace", hint="give each entry as a value of its own")
    if not text.isprintable():
        raise _Invalid("it contains a control or invisible character")
    if "://" in text:
        raise _Invalid("a URL is not an allow entry", hint=_url_hint(text))
    if "@" in text:
        raise _Invalid("it contains user information ('@'); an entry names only a host")
    if "%" in text:
        raise _Invalid("it contains '%'; zone indexes and percent-encoding are not supported")
    dest, bracketed, port_text = _split_port(text)
    if port_text is not None and "/" in port_text:
        raise _path_error(text[: len(text) - len(port_text) - 1], port_text.partition("/")[0])

    network = _literal(dest, port_text) if dest else None
    if bracketed and (network is None or network.version != 6):
        hint = None
        if network is not None:
            port = "PORT" if port_text is None else port_text
            hint = f"write an IPv4 entry without brackets, {_network_text(network)}:{port}"
        raise _Invalid("brackets hold only an IPv6 address or network", hint=hint)
    if network is not None:
        if port_text is None:
            raise _Invalid("an IP entry needs a port", hint=f"write {_network_text(network)}:PORT")
        ports = frozenset({_port(port_text)})
        return AllowEntry(
            _canonical("network", None, network, ports), "network", None, network, ports
        )

    if "/" in dest:
        raise _path_error(dest.partition("/")[0], port_text)
    kind: EntryKind = "host"
    if "*" in dest:
        host = _wildcard_domain(dest)
        kind = "wildcard"
    else:
        host = _name(dest)
    ports = DEFAULT_PORTS if port_text is None else frozenset({_port(port_text)})
    return AllowEntry(_canonical(kind, host, None, ports), kind, host, None, ports)


def _wildcard_domain(dest: str) -> str:
    example = "*.example.org"
    if dest == "*":
        raise _Invalid("a bare '*' would allow every host", hint=f"name a domain, e.g. {example}")
    if dest == "*.":
        raise _Invalid("'*.' needs a domain after it", hint=f"e.g. {example}")
    if not dest.startswith("*.") or "*" in dest[2:]:
        raise _Invalid(
            "'*' may only be the whole leftmost label", hint=f"write a wildcard as {example}"
        )
    domain = _name(dest[2:])
    if "." not in domain:
        raise _Invalid(
            f"*.{domain} is too broad: a wildcard must be under a domain of two or more labels",
            hint=f"name the domain, e.g. *.example.{domain}",
        )
    return domain


def parse_allow(text: str) -> AllowEntry:
    """Parse one allowlist entry.

    ``HOST`` (ports 80 and 443), ``HOST:PORT``, ``*.DOMAIN``, ``*.DOMAIN:PORT`` (strict
    subdomains of a domain of two or more labels), ``IP:PORT``, ``IP/PREFIX:PORT``,
    ``[IPv6]:PORT`` or ``[IPv6/PREFIX]:PORT``. Names are normalized as by
    :func:`normalize_host`; the result's :meth:`AllowEntry.describe` parses back to it.

    Raises:
        ConfigError: ``text`` is not an entry; the message names it and what is wrong.
    """
    try:
        return _parse(text)
    except _Invalid as e:
        raise ConfigError(
            f"invalid allow entry {_show(text)}: {e.what}", hint=e.hint or _FORMS
        ) from None


def parse_pinned_host(text: str) -> tuple[str, str]:
    """Parse ``NAME:ADDRESS`` (``--add-host``) into (normalized name, canonical address).

    The address may be IPv4 or IPv6, brackets optional (``registry.internal:[fd00::5]``).

    Raises:
        ConfigError: the name or the address is invalid.
    """
    hint = "write NAME:ADDRESS, e.g. registry.internal:10.0.0.5"
    name_text, sep, address_text = text.partition(":")
    if not sep:
        raise ConfigError(f"invalid --add-host {_show(text)}: no ':' before the address", hint=hint)
    try:
        name = _name(name_text)
    except _Invalid as e:
        raise ConfigError(f"invalid --add-host {_show(text)}: {e.what}", hint=hint) from None
    try:
        address = ipaddress.ip_address(_unbracket(address_text))
    except ValueError:
        raise ConfigError(
            f"invalid --add-host {_show(text)}: {_show(address_text)} is not an IP address",
            hint=hint,
        ) from None
    target = _target(address)
    if target is None:
        raise ConfigError(
            f"invalid --add-host {_show(text)}: zone indexes are not supported", hint=hint
        )
    return name, str(target)


def _unique(entries: Iterable[AllowEntry]) -> tuple[AllowEntry, ...]:
    return tuple(dict.fromkeys(entries))


# -- entries a spec wrote --------------------------------------------------------------

#: The broadest network a spec may name: a /24 of IPv4 or a /48 of IPv6 (one site).
SPEC_MIN_PREFIX: dict[int, int] = {4: 24, 6: 48}

# How a refusal lists what a network reaches: the most telling reason first.
_REASON_ORDER = (
    "cloud metadata",
    "loopback",
    "private",
    "link-local",
    "carrier-grade NAT",
    "unique local",
    "site-local",
    "multicast",
    "reserved",
    "unspecified",
)
_EVERY_V4 = ipaddress.IPv4Network("0.0.0.0/0")


def _guarded_v4_in(network: ipaddress.IPv4Network) -> list[str]:
    if network.num_addresses == 1:
        reason = _guard(network.network_address)
        return [] if reason is None else [reason]
    reasons = ["cloud metadata"] if any(a.version == 4 and a in network for a in _METADATA) else []
    inside = next((r for net, r in _GUARDED_V4 if network.subnet_of(net)), None)
    if inside is not None:
        return [*reasons, inside]
    return reasons + [r for net, r in _GUARDED_V4 if network.overlaps(net)]


def _embedded_v4(network: ipaddress.IPv6Network, shift: int) -> ipaddress.IPv4Network:
    """The IPv4 network a translation prefix embeds in the 32 bits ``shift`` from the right."""
    fixed = max(0, min(32, network.prefixlen - (96 - shift)))
    value = (int(network.network_address) >> shift) & 0xFFFFFFFF
    return ipaddress.IPv4Network((value, fixed), strict=False)


def _guarded_v6_in(network: ipaddress.IPv6Network) -> list[str]:
    # The translation prefixes reach the IPv4 addresses they embed, as in :func:`_guard`.
    if network.subnet_of(_NAT64):
        return [f"{r} via NAT64" for r in _guarded_v4_in(_embedded_v4(network, 0))]
    if network.subnet_of(_6TO4):
        return [f"{r} via 6to4" for r in _guarded_v4_in(_embedded_v4(network, 80))]
    if network.num_addresses == 1:
        reason = _guard(network.network_address)
        return [] if reason is None else [reason]
    reasons = ["cloud metadata"] if any(a.version == 6 and a in network for a in _METADATA) else []
    inside = next((r for net, r in _GUARDED_V6 if network.subnet_of(net)), None)
    if inside is not None:
        return [*reasons, inside]
    reasons += [r for net, r in _GUARDED_V6 if network.overlaps(net)]
    for prefix, via in ((_NAT64, "NAT64"), (_6TO4, "6to4")):
        if network.overlaps(prefix):
            reasons += [f"{r} via {via}" for r in _guarded_v4_in(_EVERY_V4)]
    if not network.subnet_of(_GLOBAL_UNICAST_V6):
        # Outside 2000::/3 every address the tables do not name is reserved (see _guard).
        reasons.append("reserved")
    return reasons


def guarded_reasons(network: _IPNetwork) -> list[str]:
    """Why addresses of ``network`` are guarded: each reason once, most telling first.

    The reasons are those :func:`guarded_reason` gives its addresses (a network inside one
    guarded range gets that range's reason alone). An empty list means every address in
    ``network`` is public unicast.
    """
    found = (
        _guarded_v4_in(network)
        if isinstance(network, ipaddress.IPv4Network)
        else _guarded_v6_in(network)
    )

    def rank(reason: str) -> tuple[bool, int, str]:
        base, via, _ = reason.partition(" via ")
        return bool(via), _REASON_ORDER.index(base), reason

    return sorted(dict.fromkeys(found), key=rank)


def _and(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeio" or word.startswith("un") else f"a {word}"


def spec_entry_problem(entry: AllowEntry) -> str | None:
    """Why a spec may not use ``entry``, or None if it may.

    A spec names public destinations only; everything else is the operator's to grant
    (``--allow`` or the configuration file), whose entries never pass through here:

    * name entries (``HOST``, ``*.DOMAIN``, with or without a port) are fine: the addresses
      a name resolves to are guarded when the cell connects, whoever wrote the entry;
    * a network entry is refused if it covers any guarded address (:func:`guarded_reason`:
      loopback, private, carrier-grade NAT, link-local, cloud metadata, multicast,
      reserved, ...; NAT64 and 6to4 addresses embedding one count too): a CIDR only has
      to overlap a guarded range;
    * a network entry of public addresses is refused if it is broader than a /24 of IPv4
      or a /48 of IPv6 (:data:`SPEC_MIN_PREFIX`): a spec lists the hosts it needs, it
      does not open the internet (``0.0.0.0/0``, ``::/0``) or a provider's whole range.

    Returns:
        One line naming the entry and what is wrong, or None.
    """
    if entry.kind != "network":
        return None
    network = entry.network
    assert network is not None
    reasons = guarded_reasons(network)
    if reasons:
        if network.num_addresses == 1:
            base, via, gateway = reasons[0].partition(" via ")
            what = f"is {_a(base)} address" + (f" via {gateway}" if via else "")
        elif len(reasons) > 3:
            what = f"reaches {', '.join(reasons[:3])} and other non-public addresses"
        else:
            what = f"reaches {_and(reasons)} addresses"
        return (
            f"{entry.text} {what}, which only an operator may allow (--allow or the "
            "configuration file); a spec may name public destinations only"
        )
    least = SPEC_MIN_PREFIX[network.version]
    if network.prefixlen < least:
        return (
            f"{entry.text} is too broad for a spec: it may name at most a /{least} of "
            f"IPv{network.version} addresses (list the hosts the build needs; an operator "
            "may allow a wider range with --allow)"
        )
    return None


# -- the policy ------------------------------------------------------------------------


@dataclass(frozen=True)
class PinnedName:
    """A name the operator pinned to an address and allowed: it may reach that address on
    ``ports`` even when the address is not public (:meth:`EgressPolicy.with_pins`).

    Attributes:
        name: the normalized name.
        address: the canonical address it is pinned to.
        ports: the ports the operator's entries for exactly ``name`` allow.
    """

    name: str
    address: str
    ports: frozenset[int]

    def describe(self) -> str:
        """``NAME:ADDRESS``, as ``--add-host`` takes it."""
        return f"{self.name}:{self.address}"


@dataclass(frozen=True)
class EgressPolicy:
    """A cell's allowlist: the entries, in the order given. Empty allows nothing.

    ``pins`` are the operator's granted pins (:meth:`with_pins`); none by default.
    """

    entries: tuple[AllowEntry, ...] = ()
    pins: tuple[PinnedName, ...] = ()

    @classmethod
    def from_strings(cls, items: Iterable[str]) -> EgressPolicy:
        """Parse entries, dropping repeats (by canonical form) and keeping the order.

        Raises:
            ConfigError: an entry does not parse.
            TypeError: ``items`` is a single string rather than a collection of them.
        """
        if isinstance(items, str):
            raise TypeError("from_strings takes a collection of entries, not one string")
        return cls(_unique(parse_allow(item) for item in items))

    @property
    def empty(self) -> bool:
        """True when there are no entries: the cell may reach nothing."""
        return not self.entries

    def allows_name(self, name: str) -> bool:
        """Whether a name entry covers ``name`` on some port (the DNS responder's question).

        An invalid name is never allowed.
        """
        normalized = _try_name(name)
        return normalized is not None and any(e._covers_name(normalized) for e in self.entries)

    def match(self, host: str, port: int) -> AllowEntry | None:
        """The first entry allowing ``host:port``, before any address is considered.

        An IP literal (brackets optional) is matched against IP entries only, a name
        (normalized first) against name entries only; an invalid host matches nothing.
        """
        if _address(host) is not None:
            return self.literal_entry(host, port)
        name = _try_name(host)
        if name is None:
            return None
        return next((e for e in self.entries if port in e.ports and e._covers_name(name)), None)

    def literal_entry(self, address: str | _IPAddress, port: int) -> AllowEntry | None:
        """The first IP entry covering ``address`` on ``port``; None if none does.

        An IPv4-mapped address is covered by IPv4 entries; an invalid or zoned one by none.
        """
        target = _address(address) if isinstance(address, str) else _target(address)
        if target is None:
            return None
        return next(
            (e for e in self.entries if port in e.ports and e._covers_address(target)), None
        )

    def name_ports(self) -> frozenset[int]:
        """Every port a name entry allows: the proxy listens transparently on each."""
        return frozenset(p for e in self.entries if e.kind != "network" for p in e.ports)

    def describe(self) -> list[str]:
        """The canonical text of each entry, in order."""
        return [e.describe() for e in self.entries]

    def digest(self) -> str:
        """``sha256:<hex>`` identifying the allowlist, whatever the order or repeats.

        The hash is over the distinct canonical entries, sorted, each followed by a newline.
        """
        lines = sorted({e.describe() for e in self.entries})
        data = "".join(f"{line}\n" for line in lines).encode()
        return "sha256:" + hashlib.sha256(data).hexdigest()

    def merged(self, other: EgressPolicy) -> EgressPolicy:
        """Both allowlists: this one's entries, then the other's new ones (and pins: this
        one's, then the other's for names this one does not pin)."""
        names = {pin.name for pin in self.pins}
        pins = (*self.pins, *(pin for pin in other.pins if pin.name not in names))
        return EgressPolicy(_unique((*self.entries, *other.entries)), pins)

    def with_pins(
        self, pinned: Iterable[tuple[str, str]], *, granted: EgressPolicy
    ) -> EgressPolicy:
        """This policy with the operator's pins that the operator also allowed.

        ``pinned`` are ``(name, address)`` pairs (``--add-host``, as
        :func:`parse_pinned_host` gives them; a later pin of a name replaces an earlier
        one). A pin is granted on the ports of ``granted``'s entries for exactly its name
        (``--allow NAME``, ``--allow NAME:PORT``): a wildcard or an IP entry grants none,
        and a pin nobody allowed is left out, so it grants nothing. ``granted`` must hold
        the operator's entries only (for ``run``, its own policy; for a build, ``--allow``
        and the configuration file's ``network.allow``), never a spec's: a repository
        cannot open a private address for itself. The connection still needs this
        policy to allow the name and port.

        Raises:
            ConfigError: a name or address of ``pinned`` is invalid.
        """
        by_name: dict[str, str] = {}
        for name, address in pinned:
            parsed, canonical = parse_pinned_host(f"{name}:{address}")
            by_name.pop(parsed, None)
            by_name[parsed] = canonical
        pins = []
        for name, address in by_name.items():
            if not _pinnable(address):
                continue  # the guard keeps denying it, and says why
            ports = frozenset(
                p for e in granted.entries if e.kind == "host" and e.host == name for p in e.ports
            )
            if ports:
                pins.append(PinnedName(name, address, ports))
        return EgressPolicy(self.entries, tuple(pins))

    def pin_for(self, name: str, port: int) -> PinnedName | None:
        """The granted pin of ``name`` on ``port``, if there is one."""
        normalized = _try_name(name)
        return next((p for p in self.pins if p.name == normalized and port in p.ports), None)


# -- decisions -------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """The decision on one connection attempt.

    Attributes:
        allowed: whether the connection may be made.
        entry: the entry that allowed it: for a name, the name entry (an IP entry may
            also have been needed to reach a guarded address); None when denied.
        address: the address to connect to; None when denied.
        reason: one line: which entry allowed it, or why it was denied.
        suggestion: for a denial, the ``--allow`` value that would permit it, if any.
        add_host: for a denial of a name that resolves to a non-public address, the
            ``--add-host`` value (``NAME:ADDRESS``) that, with ``--allow suggestion``,
            would permit exactly that name there.
        pinned: allowed only because the operator pinned the name to a non-public
            address: what travels there must name it (the proxy checks Host and SNI).
    """

    allowed: bool
    entry: AllowEntry | None
    address: str | None
    reason: str
    suggestion: str | None = None
    add_host: str | None = None
    pinned: bool = False

    @property
    def hint(self) -> str | None:
        """The flags that would permit a denied attempt (``--allow HOST:PORT``, or
        ``--add-host NAME:ADDRESS --allow NAME:PORT``); None if there are none."""
        if self.suggestion is None:
            return None
        pin = f"--add-host {self.add_host} " if self.add_host is not None else ""
        return f"{pin}--allow {self.suggestion}"


def _deny(reason: str, suggestion: str | None = None, add_host: str | None = None) -> Verdict:
    return Verdict(False, None, None, reason, suggestion, add_host)


def _allow(entry: AllowEntry, address: _IPAddress) -> Verdict:
    return Verdict(True, entry, str(address), f"allowed by {entry.describe()}")


def suggest_allow(host: str, port: int) -> str:
    """The ``--allow`` value permitting ``host:port``: always ``HOST:PORT``, IPv6 in brackets.

    Raises:
        ConfigError: ``host`` is neither an IP literal nor a valid name, or the port is
            out of range.
    """
    if not 1 <= port <= 65535:
        raise ConfigError(f"port {port} is out of range 1-65535")
    addr = _address(host)
    if addr is not None:
        return _hostport(str(addr), port)
    return f"{normalize_host(host)}:{port}"


def _decide_literal(policy: EgressPolicy, literal: _IPAddress, port: int) -> Verdict:
    """An IP literal: allowed when an IP entry covers it. Denied, the hint is that entry,
    unless the operator pinned a name to this non-public address: allowing the address
    would open every name behind it (the pinned one's neighbours too), so the way there
    is by the pinned name, and no hint offers the address."""
    entry = policy.literal_entry(literal, port)
    if entry is not None:
        return _allow(entry, literal)
    target = _hostport(str(literal), port)
    pinned = [p.name for p in policy.pins if _address(p.address) == literal]
    if pinned and _guard(literal) is not None:
        return _deny(
            f"{target} is not on the allowlist; the operator pinned "
            f"{', '.join(pinned)} to it: connect by that name"
        )
    return _deny(f"{target} is not on the allowlist", suggest_allow(str(literal), port))


def decide(policy: EgressPolicy, host: str, port: int, addresses: Sequence[str]) -> Verdict:
    """Decide a connection attempt to ``host:port``, once the host side has resolved it.

    ``addresses`` are what ``host`` resolved to, in order (for an IP literal the caller
    passes ``[host]``; it is not consulted). An IP literal is allowed when an IP entry
    covers it; the guard does not apply, since the operator named the address. A name
    needs a name entry for the port, then the first address that is public, or that an
    IP entry covers on the port, is the one to connect to. A name with a granted pin
    (:meth:`EgressPolicy.with_pins`) is taken to its pinned address, whatever
    ``addresses`` say; if that address is not public and no IP entry covers it, the
    verdict is ``pinned``. A name resolving only to non-public addresses is denied with
    the pin that would permit it as the hint (none for cloud metadata). Never raises on
    hostile input: an invalid host or address is denied.

    Raises:
        TypeError: ``addresses`` is a single string rather than a sequence of them.
    """
    if isinstance(addresses, str):
        raise TypeError("decide takes a sequence of addresses, not one string")
    if not 1 <= port <= 65535:
        return _deny(f"port {port} is out of range 1-65535")
    literal = _address(host)
    if literal is not None:
        return _decide_literal(policy, literal, port)

    name = _try_name(host)
    if name is None:
        return _deny(f"{_show(host)} is not a valid host name")
    entry = policy.match(name, port)
    if entry is None:
        ports = sorted({p for e in policy.entries if e._covers_name(name) for p in e.ports})
        plural = "s" if len(ports) > 1 else ""
        others = f" (allowed on port{plural} {', '.join(map(str, ports))})" if ports else ""
        return _deny(f"{name}:{port} is not on the allowlist{others}", suggest_allow(name, port))
    pin = policy.pin_for(name, port)
    if pin is not None:
        addresses = [pin.address]
    if not addresses:
        return _deny(f"{name} does not resolve")

    for text in addresses:
        addr = _address(text)
        if addr is not None and (
            _guard(addr) is None or policy.literal_entry(addr, port) is not None
        ):
            return _allow(entry, addr)
    if pin is not None:
        addr = _address(pin.address)
        assert addr is not None  # with_pins parsed it
        return Verdict(
            True,
            entry,
            str(addr),
            f"allowed by {entry.describe()}, pinned to {addr} by the operator",
            pinned=True,
        )
    first = _address(addresses[0])
    if first is None:
        return _deny(f"{name} resolves to {_show(addresses[0])}, which is not a usable address")
    # Name the address as resolved, and suggest the real target. Spelled out because
    # Python versions disagree on how to print a mapped address (::ffff:7f00:1).
    resolved = ipaddress.ip_address(_unbracket(addresses[0]))
    if isinstance(resolved, ipaddress.IPv6Address) and resolved.ipv4_mapped is not None:
        resolved_text = f"::ffff:{resolved.ipv4_mapped}"
    else:
        resolved_text = str(resolved)
    why = _guard(first)
    reason = f"{name} resolves to {resolved_text} ({why}); a name entry never reaches it"
    if not _pinnable(first):
        # No name needs the metadata service (or an unspecified or multicast address):
        # asking for it is no mistake to help with, and no pin grants it.
        return _deny(reason)
    # The pin, not the address: an address entry would open every name behind it.
    return _deny(reason, suggest_allow(name, port), f"{name}:{first}")
