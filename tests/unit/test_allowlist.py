"""The egress allowlist: entry syntax, matching, the address guard, connection verdicts and
what a spec (rather than an operator) may name."""

from __future__ import annotations

import hashlib
import ipaddress
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from buildcell.allowlist import (
    DEFAULT_PORTS,
    SPEC_MIN_PREFIX,
    AllowEntry,
    EgressPolicy,
    decide,
    guarded_reason,
    guarded_reasons,
    normalize_host,
    parse_allow,
    parse_pinned_host,
    spec_entry_problem,
    suggest_allow,
)
from buildcell.errors import ConfigError

# -- accepted forms ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "canonical", "fields"),
    [
        ("pypi.example.org", "pypi.example.org", ("host", "pypi.example.org", None, {80, 443})),
        ("pypi.example.org:443", "pypi.example.org:443", ("host", "pypi.example.org", None, {443})),
        ("PyPI.Example.ORG.:8080", "pypi.example.org:8080", ("host", "pypi.example.org", None, {8080})),
        ("registry", "registry", ("host", "registry", None, {80, 443})),
        ("_acme.my-host.example", "_acme.my-host.example", ("host", "_acme.my-host.example", None, {80, 443})),
        ("x.org:0443", "x.org:443", ("host", "x.org", None, {443})),
        ("x.org:1", "x.org:1", ("host", "x.org", None, {1})),
        ("x.org:65535", "x.org:65535", ("host", "x.org", None, {65535})),
        ("*.example.org", "*.example.org", ("wildcard", "example.org", None, {80, 443})),
        ("*.Example.Org.:8443", "*.example.org:8443", ("wildcard", "example.org", None, {8443})),
        ("*.co.uk", "*.co.uk", ("wildcard", "co.uk", None, {80, 443})),
        ("10.0.0.5:8080", "10.0.0.5:8080", ("network", None, "10.0.0.5/32", {8080})),
        ("127.0.0.1:8000", "127.0.0.1:8000", ("network", None, "127.0.0.1/32", {8000})),
        ("10.0.0.5/32:80", "10.0.0.5:80", ("network", None, "10.0.0.5/32", {80})),
        ("10.0.0.0/8:443", "10.0.0.0/8:443", ("network", None, "10.0.0.0/8", {443})),
        ("10.0.0.0/255.0.0.0:443", "10.0.0.0/8:443", ("network", None, "10.0.0.0/8", {443})),
        ("[::1]:8080", "[::1]:8080", ("network", None, "::1/128", {8080})),
        ("[FD00::/8]:443", "[fd00::/8]:443", ("network", None, "fd00::/8", {443})),
        ("[2001:db8:0::1]:22", "[2001:db8::1]:22", ("network", None, "2001:db8::1/128", {22})),
    ],
)  # fmt: skip
def test_accepted_forms(
    text: str, canonical: str, fields: tuple[str, str | None, str | None, set[int]]
) -> None:
    kind, host, network, ports = fields
    entry = parse_allow(text)
    assert entry.describe() == entry.text == canonical
    assert entry.kind == kind
    assert entry.host == host
    assert entry.network == (None if network is None else ipaddress.ip_network(network))
    assert entry.ports == frozenset(ports)
    assert parse_allow(canonical) == entry


def test_a_name_without_a_port_allows_http_and_https() -> None:
    assert frozenset({80, 443}) == DEFAULT_PORTS
    assert parse_allow("x.org").ports == DEFAULT_PORTS
    assert parse_allow("x.org:80") != parse_allow("x.org")


# -- rejections ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "what", "hint"),
    [
        ("", "it is empty", None),
        ("x.org ", "it contains whitespace", None),
        ("x.org\tfoo", "it contains whitespace", None),
        ("x.org\x00", "control or invisible character", None),
        ("x\u200b.org", "control or invisible character", None),
        ("https://pypi.example.org", "a URL is not an allow entry",
         "write the host, e.g. pypi.example.org or pypi.example.org:443"),
        ("http://x.org", "a URL is not an allow entry", "write the host, e.g. x.org or x.org:80"),
        ("https://X.org:8443/simple/", "a URL is not an allow entry",
         "write the host and port, e.g. x.org:8443"),
        ("https://10.0.0.5/", "a URL is not an allow entry",
         "write the address and port, e.g. 10.0.0.5:443"),
        ("https://[::1]:99/", "a URL is not an allow entry",
         "write the address and port, e.g. [::1]:99"),
        ("https://[::1/", "a URL is not an allow entry", "write HOST, HOST:PORT"),
        ("x.org/simple", "it has a path", "write the host, e.g. x.org or x.org:443"),
        ("x.org:443/simple", "it has a path", "write the host, e.g. x.org:443"),
        ("10.0.0.5:80/x", "it has a path", "write the host, e.g. 10.0.0.5:80"),
        ("user@x.org", "user information ('@')", None),
        ("x.org:", "the port after ':' is empty", None),
        ("x.org:https", "port 'https' is not a number", None),
        ("x.org:+443", "port '+443' is not a number", None),
        ("x.org:\u0663", "is not a number", None),
        ("x.org:0", "port 0 is out of range 1-65535", None),
        ("x.org:65536", "port 65536 is out of range 1-65535", None),
        ("x.org:999999", "is not a number", None),
        (":443", "the host name is empty", None),
        ("x..org", "empty label", None),
        (".x.org", "empty label", None),
        ("x.org..", "empty label", None),
        ("-x.org", "label '-x'", None),
        ("x-.org", "label 'x-'", None),
        ("x!.org", "label 'x!'", None),
        ("a" * 64 + ".org", "longer than 63 characters", None),
        (".".join(["a" * 63] * 4), "longer than 253 characters", None),
        ("127.1:80", "ends in a number", "write an IP address with a port"),
        ("0x7f.1:80", "ends in a number", None),
        ("2130706433:80", "ends in a number", None),
        ("x.0x10", "ends in a number", None),
        ("10.0.0.256:80", "ends in a number", None),
        ("010.0.0.5:80", "ends in a number", None),
        ("*", "a bare '*' would allow every host", "name a domain"),
        ("*:443", "a bare '*' would allow every host", None),
        ("*.", "'*.' needs a domain after it", None),
        ("a*.x.org", "'*' may only be the whole leftmost label", "*.example.org"),
        ("x.*.org", "'*' may only be the whole leftmost label", None),
        ("*.*.org", "'*' may only be the whole leftmost label", None),
        ("**.x.org", "'*' may only be the whole leftmost label", None),
        ("*x.org", "'*' may only be the whole leftmost label", None),
        ("*.com", "*.com is too broad", "name the domain, e.g. *.example.com"),
        ("*.org.:443", "*.org is too broad", None),
        ("10.0.0.5", "an IP entry needs a port", "write 10.0.0.5:PORT"),
        ("10.0.0.0/8", "an IP entry needs a port", "write 10.0.0.0/8:PORT"),
        ("[::1]", "an IP entry needs a port", "write [::1]:PORT"),
        ("[fd00::/8]", "an IP entry needs a port", "write [fd00::/8]:PORT"),
        ("10.0.0.1/8:443", "10.0.0.1/8 has host bits set; the network is 10.0.0.0/8",
         "write 10.0.0.0/8:443"),
        ("10.0.0.1/8", "has host bits set", "write 10.0.0.0/8:PORT"),
        ("[fd00::1/8]:443", "fd00::1/8 has host bits set; the network is fd00::/8",
         "write [fd00::/8]:443"),
        ("10.0.0.0/33:80", "'33' is not a prefix length for 10.0.0.0", None),
        ("::1", "an IPv6 address must be in brackets, with a port", "[fd00::1]:8080"),
        ("fd00::1:443", "must be in brackets", None),
        ("[::1", "'[' is not closed", None),
        ("[::1]8080", "unexpected '8080' after ']'", None),
        ("[10.0.0.5]:80", "brackets hold only an IPv6 address or network",
         "without brackets, 10.0.0.5:80"),
        ("[x.org]:80", "brackets hold only an IPv6 address or network", None),
        ("[]:80", "brackets hold only an IPv6 address or network", None),
        ("[::ffff:10.0.0.5]:80", "an IPv4-mapped address names an IPv4 destination",
         "write the IPv4 form, 10.0.0.5:80"),
        ("[::ffff:10.0.0.0/104]:80", "IPv4-mapped", "10.0.0.0/8:80"),
        ("[fe80::1%eth0]:80", "zone indexes and percent-encoding are not supported", None),
        ("x%2eorg", "zone indexes and percent-encoding", None),
        ("x.org?a=b", "label 'org?a=b'", None),
        ("x" * 2000, "it is too long", None),
    ],
)  # fmt: skip
def test_rejections_name_the_entry_and_what_is_wrong(
    text: str, what: str, hint: str | None
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_allow(text)
    message = info.value.message
    shown = repr(text) if len(text) <= 80 else repr(text[:80]) + "..."
    assert message.startswith(f"invalid allow entry {shown}: ")
    assert what in message
    assert "\n" not in message
    assert info.value.hint  # every rejection says what to write instead
    if hint is not None:
        assert hint in info.value.hint


def test_a_hostile_entry_is_shown_on_one_short_line() -> None:
    with pytest.raises(ConfigError) as info:
        parse_allow("evil\n" + "x" * 500)
    assert "\n" not in info.value.message
    assert len(info.value.message) < 200


def test_the_generic_hint_lists_the_forms() -> None:
    with pytest.raises(ConfigError) as info:
        parse_allow("x.org:abc")
    assert info.value.hint is not None
    assert "HOST:PORT" in info.value.hint
    assert "IP[/PREFIX]:PORT" in info.value.hint


# -- host names ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "normalized"),
    [
        ("Example.ORG", "example.org"),
        ("example.org.", "example.org"),
        ("a_b.example", "a_b.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("Bücher.Example.", "xn--bcher-kva.example"),
        ("ｅｘａｍｐｌｅ．ｏｒｇ", "example.org"),  # noqa: RUF001 - fullwidth forms on purpose
        ("例え.テスト", "xn--r8jz45g.xn--zckzah"),
        ("a" * 63 + ".org", "a" * 63 + ".org"),
        (".".join(["a" * 61] * 4) + ".", ".".join(["a" * 61] * 4)),
        (".".join(["a" * 62] * 4) + ".b.", ".".join(["a" * 62] * 4) + ".b"),  # 253 exactly
        ("x.y1", "x.y1"),
        ("1.x", "1.x"),
    ],
)  # fmt: skip
def test_normalize_host(host: str, normalized: str) -> None:
    assert normalize_host(host) == normalized
    assert normalize_host(normalized) == normalized


@pytest.mark.parametrize(
    ("host", "what"),
    [
        ("", "empty"),
        (".", "empty"),
        ("a..b", "empty label"),
        ("a" * 64, "longer than 63"),
        (".".join(["a" * 63] * 4), "longer than 253"),
        (".".join(["a" * 62] * 4) + ".bc", "longer than 253"),
        ("x" * 5000, "longer than 253"),
        ("10.0.0.5", "ends in a number"),
        ("127.1", "ends in a number"),
        ("0x7f000001", "ends in a number"),
        ("a.0X1F", "ends in a number"),
        ("a:bé", "label"),  # punycode keeps ASCII punctuation: labels are checked after it
        ("a\udcff.org", "not a valid internationalized name"),
        ("a\u00ad\u00ad..org", "not a valid internationalized name"),
        ("x y", "label"),
        ("*.x.org", "label"),
    ],
)  # fmt: skip
def test_normalize_host_rejects(host: str, what: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(what)) as info:
        normalize_host(host)
    assert info.value.message.startswith("invalid host name ")
    assert "\n" not in info.value.message


def test_idna_entries_match_their_unicode_and_ascii_spellings() -> None:
    entry = parse_allow("*.Bücher.example")
    assert entry.describe() == "*.xn--bcher-kva.example"
    assert entry.matches_name("shop.bücher.example")
    assert entry.matches_name("SHOP.XN--BCHER-KVA.EXAMPLE.")
    assert not entry.matches_name("bücher.example")


# -- wildcard and name semantics -----------------------------------------------------------


def test_wildcard_covers_strict_subdomains_only() -> None:
    entry = parse_allow("*.example.org")
    assert not entry.matches_name("example.org")
    assert entry.matches_name("a.example.org")
    assert entry.matches_name("a.b.example.org")
    assert entry.matches_name("A.Example.ORG.")
    assert not entry.matches_name("badexample.org")
    assert not entry.matches_name("example.org.evil")
    assert not entry.matches_name("a.example.org.evil.net")
    assert not entry.matches_name(".example.org")
    assert not entry.matches_name("")


def test_host_entry_matches_only_that_name() -> None:
    entry = parse_allow("api.example.org:8443")
    assert entry.matches_name("API.example.org.")
    assert not entry.matches_name("x.api.example.org")
    assert not entry.matches_name("example.org")
    assert entry.matches("api.example.org", 8443)
    assert not entry.matches("api.example.org", 443)
    assert not entry.matches("not a name", 8443)


def test_literals_match_network_entries_and_names_match_name_entries() -> None:
    network = parse_allow("10.0.0.0/8:443")
    assert not network.matches_name("10.1.2.3")
    assert network.matches("10.1.2.3", 443)
    assert network.matches("[10.1.2.3]", 443)
    assert network.matches("::ffff:10.1.2.3", 443)
    assert not network.matches("10.1.2.3", 80)
    assert not network.matches("11.0.0.1", 443)
    assert not network.matches("example.org", 443)

    v6 = parse_allow("[fd00::/8]:443")
    assert v6.matches("fd12::1", 443)
    assert v6.matches("[fd12::1]", 443)
    assert not v6.matches("fd12::1%eth0", 443)  # no entry can name a zone
    assert not v6.matches("10.0.0.1", 443)

    name = parse_allow("example.org")
    assert not name.matches("93.184.216.34", 443)
    assert not name.matches_name("93.184.216.34")


def test_entries_check_their_own_consistency() -> None:
    entry = parse_allow("x.org:443")
    with pytest.raises(ValueError, match="canonical"):
        AllowEntry("X.org:443", "host", "x.org", None, frozenset({443}))
    with pytest.raises(ValueError, match="normalized"):
        AllowEntry("X.org:443", "host", "X.org", None, frozenset({443}))
    with pytest.raises(ValueError, match="one port"):
        AllowEntry("x.org:80", "host", "x.org", None, frozenset({80, 8080}))
    with pytest.raises(ValueError, match="1-65535"):
        AllowEntry("x.org:0", "host", "x.org", None, frozenset({0}))
    with pytest.raises(ValueError, match="two labels"):
        AllowEntry("*.org", "wildcard", "org", None, DEFAULT_PORTS)
    with pytest.raises(ValueError, match="exactly one port"):
        AllowEntry("10.0.0.5:80", "network", None, ipaddress.ip_network("10.0.0.5"), DEFAULT_PORTS)
    with pytest.raises(ValueError, match="unknown kind"):
        AllowEntry("x.org:443", "url", "x.org", None, frozenset({443}))  # type: ignore[arg-type]
    assert AllowEntry("x.org:443", "host", "x.org", None, frozenset({443})) == entry


# -- properties ----------------------------------------------------------------------------

_label = st.from_regex(r"[a-z0-9_]([a-z0-9_-]{0,20}[a-z0-9_])?", fullmatch=True)
_last_label = st.from_regex(r"[a-z_]([a-z0-9_-]{0,10}[a-z0-9_])?", fullmatch=True)
_names: st.SearchStrategy[str] = st.builds(
    lambda head, last: ".".join([*head, last]), st.lists(_label, max_size=4), _last_label
)
_ports = st.none() | st.integers(1, 65535)


def _spelled(name: str, flips: list[bool], dot: bool) -> str:
    chars = [
        c.upper() if flip else c for c, flip in zip(name, flips + [False] * len(name), strict=False)
    ]
    return "".join(chars) + ("." if dot else "")


@given(_names, _ports, st.booleans(), st.lists(st.booleans()), st.booleans())
def test_names_round_trip(
    name: str, port: int | None, wildcard: bool, flips: list[bool], dot: bool
) -> None:
    if wildcard and "." not in name:
        name = f"{name}.example"
    text = ("*." if wildcard else "") + _spelled(name, flips, dot)
    if port is not None:
        text += f":{port}"
    entry = parse_allow(text)
    assert entry.host == name
    assert entry.kind == ("wildcard" if wildcard else "host")
    assert entry.ports == (DEFAULT_PORTS if port is None else frozenset({port}))
    assert parse_allow(entry.describe()) == entry
    probe = f"x.{name}" if wildcard else name
    assert entry.matches_name(_spelled(probe, flips, dot))
    assert entry.matches(probe, port or 443)


def _unmapped(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return not isinstance(address, ipaddress.IPv6Address) or address.ipv4_mapped is None


_v6 = st.ip_addresses(v=6).filter(_unmapped)


@given(st.ip_addresses(v=4) | _v6, st.integers(0, 128), st.integers(1, 65535))
def test_networks_round_trip(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, prefix: int, port: int
) -> None:
    network = ipaddress.ip_network((address, min(prefix, address.max_prefixlen)), strict=False)
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(
        ipaddress.IPv6Network("::ffff:0:0/96")
    ):
        return
    text = f"[{network}]:{port}" if network.version == 6 else f"{network}:{port}"
    entry = parse_allow(text)
    assert entry.network == network
    assert entry.ports == frozenset({port})
    assert parse_allow(entry.describe()) == entry
    assert entry.matches(str(network.network_address), port)


_entry_alphabet = st.sampled_from([*"abcxz09-_.*:/[]@%fé ", "://", "::", "xn--", "\u3002"])


@given(st.text(max_size=40) | st.lists(_entry_alphabet, max_size=20).map("".join))
def test_random_text_parses_or_raises_config_error(text: str) -> None:
    try:
        entry = parse_allow(text)
    except ConfigError as e:
        message = e.message
    else:
        assert parse_allow(entry.describe()) == entry
        return
    assert message.startswith("invalid allow entry ")
    assert "\n" not in message


@given(
    st.text(max_size=30)
    | _names.map(lambda name: f"{name}.example.com")
    | st.ip_addresses().map(str),
    st.integers(-5, 70000),
    st.lists(st.text(max_size=10) | st.ip_addresses().map(str), max_size=4),
)
def test_decide_never_raises_and_allows_only_with_an_entry_and_address(
    host: str, port: int, addresses: list[str]
) -> None:
    policy = EgressPolicy.from_strings(["*.example.com", "10.0.0.0/8:443", "[::/0]:80"])
    verdict = decide(policy, host, port, addresses)
    assert "\n" not in verdict.reason
    if verdict.allowed:
        assert verdict.entry is not None
        assert verdict.address is not None
        assert verdict.entry.matches(host, port)
        assert ipaddress.ip_address(verdict.address)
    else:
        assert verdict.entry is None
        assert verdict.address is None
        if verdict.suggestion is not None:
            assert parse_allow(verdict.suggestion)


# -- the policy ----------------------------------------------------------------------------


def test_an_empty_policy_allows_nothing() -> None:
    policy = EgressPolicy()
    assert policy.empty
    assert EgressPolicy.from_strings([]).empty
    assert not policy.allows_name("example.org")
    assert policy.match("example.org", 443) is None
    assert policy.literal_entry("10.0.0.1", 443) is None
    assert policy.name_ports() == frozenset()
    assert not decide(policy, "example.org", 443, ["93.184.216.34"]).allowed
    assert not decide(policy, "93.184.216.34", 443, ["93.184.216.34"]).allowed


def test_from_strings_dedupes_by_canonical_form_and_keeps_order() -> None:
    policy = EgressPolicy.from_strings(
        ["b.org", "A.org", "a.org.", "b.org:443", "b.org", "10.0.0.5/32:80", "10.0.0.5:80"]
    )
    assert policy.describe() == ["b.org", "a.org", "b.org:443", "10.0.0.5:80"]
    assert not policy.empty


def test_from_strings_refuses_a_single_string() -> None:
    with pytest.raises(TypeError, match="not one string"):
        EgressPolicy.from_strings("pypi.org")


def test_from_strings_reports_the_bad_entry() -> None:
    with pytest.raises(ConfigError, match=re.escape("invalid allow entry 'https://x.org'")):
        EgressPolicy.from_strings(["pypi.org", "https://x.org"])


def test_allows_name_is_port_agnostic_and_ignores_network_entries() -> None:
    policy = EgressPolicy.from_strings(["api.example.org:8443", "*.cdn.example", "10.0.0.0/8:80"])
    assert policy.allows_name("API.example.org.")
    assert policy.allows_name("a.cdn.example")
    assert not policy.allows_name("cdn.example")
    assert not policy.allows_name("10.0.0.1")
    assert not policy.allows_name("")
    assert not policy.allows_name("a" * 300)


def test_match_returns_the_first_entry_allowing_host_and_port() -> None:
    policy = EgressPolicy.from_strings(
        ["*.example.org:8443", "api.example.org:8443", "api.example.org", "10.0.0.0/8:443",
         "10.0.0.5:443", "[fd00::/8]:443"]
    )  # fmt: skip
    first, _host, default, net8, _net32, v6 = policy.entries
    assert policy.match("api.example.org", 8443) is first
    assert policy.match("API.EXAMPLE.ORG.", 443) is default
    assert policy.match("api.example.org", 22) is None
    assert policy.match("example.org", 8443) is None
    assert policy.match("10.0.0.5", 443) is net8
    assert policy.match("[fd00::1]", 443) is v6
    assert policy.match("fd00::1", 443) is v6
    assert policy.match("fd00::1", 80) is None
    assert policy.match("", 443) is None
    assert policy.match("bad name", 443) is None


def test_literal_entry() -> None:
    policy = EgressPolicy.from_strings(["10.0.0.0/8:443", "[fd00::/8]:443", "pypi.org"])
    net8, v6, _name = policy.entries
    assert policy.literal_entry("10.9.9.9", 443) is net8
    assert policy.literal_entry(ipaddress.IPv4Address("10.9.9.9"), 443) is net8
    assert policy.literal_entry("::ffff:10.9.9.9", 443) is net8
    assert policy.literal_entry(ipaddress.IPv6Address("::ffff:10.9.9.9"), 443) is net8
    assert policy.literal_entry("[fd00::5]", 443) is v6
    assert policy.literal_entry(ipaddress.IPv6Address("fd00::5"), 443) is v6
    assert policy.literal_entry(ipaddress.IPv6Address("fd00::5%eth0"), 443) is None
    assert policy.literal_entry("fd00::5%eth0", 443) is None
    assert policy.literal_entry("10.9.9.9", 80) is None
    assert policy.literal_entry("11.0.0.1", 443) is None
    assert policy.literal_entry("pypi.org", 443) is None
    assert policy.literal_entry("not an address", 443) is None


def test_name_ports_lists_ports_of_name_entries_only() -> None:
    policy = EgressPolicy.from_strings(["pypi.org", "*.example.org:8443", "10.0.0.5:8080"])
    assert policy.name_ports() == frozenset({80, 443, 8443})
    assert EgressPolicy.from_strings(["10.0.0.5:8080"]).name_ports() == frozenset()


def test_digest_is_over_sorted_distinct_canonical_entries() -> None:
    policy = EgressPolicy.from_strings(["b.org", "A.org:443", "[::1]:80"])
    expected = hashlib.sha256(b"[::1]:80\na.org:443\nb.org\n").hexdigest()
    assert policy.digest() == f"sha256:{expected}"
    assert EgressPolicy().digest() == "sha256:" + hashlib.sha256(b"").hexdigest()


def test_digest_ignores_order_and_repeats_but_not_content() -> None:
    one = EgressPolicy.from_strings(["b.org", "a.org", "10.0.0.0/8:443"])
    two = EgressPolicy.from_strings(["10.0.0.0/8:443", "A.org.", "b.org", "a.org"])
    assert one.digest() == two.digest()
    assert EgressPolicy(one.entries + one.entries).digest() == one.digest()
    assert one.digest() != EgressPolicy.from_strings(["b.org", "a.org:443"]).digest()
    assert one.digest() != EgressPolicy.from_strings(["b.org", "a.org"]).digest()


def test_merged_is_a_union_in_order() -> None:
    one = EgressPolicy.from_strings(["a.org", "b.org"])
    two = EgressPolicy.from_strings(["b.org", "c.org", "a.org:443"])
    merged = one.merged(two)
    assert merged.describe() == ["a.org", "b.org", "c.org", "a.org:443"]
    assert one.describe() == ["a.org", "b.org"]  # unchanged
    assert EgressPolicy().merged(one) == one
    assert one.merged(EgressPolicy()) == one


# -- the address guard ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("169.254.169.254", "cloud metadata"),
        ("100.100.100.200", "cloud metadata"),
        ("fd00:ec2::254", "cloud metadata"),
        ("[fd00:ec2::254]", "cloud metadata"),
        ("::ffff:169.254.169.254", "cloud metadata"),
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("172.31.255.255", "private"),
        ("192.168.1.1", "private"),
        ("::ffff:10.0.0.1", "private"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("100.64.0.1", "carrier-grade NAT"),
        ("100.127.255.254", "carrier-grade NAT"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("0.1.2.3", "reserved"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("192.0.2.1", "reserved"),
        ("198.51.100.7", "reserved"),
        ("203.0.113.9", "reserved"),
        ("198.18.0.1", "reserved"),
        ("192.0.0.8", "reserved"),
        ("2001:db8::1", "reserved"),
        ("2001::1", "reserved"),
        ("100::1", "reserved"),
        ("::10.0.0.1", "reserved"),
        ("4000::1", "reserved"),
        ("fc00::1", "unique local"),
        ("fd12:3456::1", "unique local"),
        ("fec0::1", "site-local"),
        ("64:ff9b:1::1", "private"),
        ("64:ff9b::a00:1", "private via NAT64"),
        ("64:ff9b::7f00:1", "loopback via NAT64"),
        ("2002:a00:1::", "private via 6to4"),
        ("2002:a9fe:a9fe::1", "cloud metadata via 6to4"),
    ],
)  # fmt: skip
def test_guarded_reason(address: str, reason: str) -> None:
    assert guarded_reason(address) == reason
    assert guarded_reason(ipaddress.ip_address(address.strip("[]"))) == reason


@pytest.mark.parametrize(
    "address",
    ["8.8.8.8", "93.184.216.34", "1.1.1.1", "100.63.255.255", "100.128.0.0", "172.32.0.1",
     "169.253.255.255", "2001:4860:4860::8888", "2606:4700::1111", "::ffff:8.8.8.8",
     "64:ff9b::808:808", "2002:808:808::1", "[2001:4860:4860::8888]"],
)  # fmt: skip
def test_public_addresses_are_not_guarded(address: str) -> None:
    assert guarded_reason(address) is None


def test_guarded_reason_rejects_non_addresses() -> None:
    with pytest.raises(ConfigError, match=re.escape("not an IP address: 'example.org'")):
        guarded_reason("example.org")


@given(st.ip_addresses(v=4))
def test_ipv4_guard_is_at_least_as_strict_as_the_stdlib(address: ipaddress.IPv4Address) -> None:
    reason = guarded_reason(address)
    if reason is None:
        assert address.is_global
    if address.is_private or address.is_loopback or address.is_link_local:
        assert reason is not None
    mapped = ipaddress.IPv6Address(f"::ffff:{address}")
    assert guarded_reason(mapped) == reason


@given(st.ip_addresses(v=6))
def test_ipv6_guard_is_at_least_as_strict_as_the_stdlib(address: ipaddress.IPv6Address) -> None:
    translated = ("::ffff:0:0/96", "64:ff9b::/96", "2002::/16")
    if any(address in ipaddress.IPv6Network(net) for net in translated):
        return  # these take the reason of the IPv4 address they embed
    reason = guarded_reason(address)
    if reason is None:
        assert address.is_global
        assert address in ipaddress.IPv6Network("2000::/3")
    if address.is_private or address.is_multicast or address.is_link_local:
        assert reason is not None


# -- decisions -----------------------------------------------------------------------------

POLICY = EgressPolicy.from_strings(
    ["api.example.org", "*.example.net:8443", "10.0.0.0/8:443", "[fd00::/8]:443",
     "internal.example.org:8080", "10.9.9.9:8080"]
)  # fmt: skip


def _entry(text: str) -> AllowEntry:
    return next(e for e in POLICY.entries if e.describe() == text)


def test_decide_public_address_of_an_allowed_name() -> None:
    verdict = decide(POLICY, "API.example.org.", 443, ["93.184.216.34", "2606:2800::1"])
    assert verdict.allowed
    assert verdict.entry == _entry("api.example.org")
    assert verdict.address == "93.184.216.34"
    assert verdict.reason == "allowed by api.example.org"
    assert verdict.suggestion is None


def test_decide_wildcard_name() -> None:
    verdict = decide(POLICY, "a.b.example.net", 8443, ["2606:2800::1"])
    assert verdict.allowed
    assert verdict.entry == _entry("*.example.net:8443")
    assert verdict.address == "2606:2800::1"
    apex = decide(POLICY, "example.net", 8443, ["2606:2800::1"])
    assert not apex.allowed
    assert apex.reason == "example.net:8443 is not on the allowlist"
    assert apex.suggestion == "example.net:8443"


def test_decide_name_not_on_the_allowlist_for_that_port() -> None:
    verdict = decide(POLICY, "api.example.org", 8443, ["93.184.216.34"])
    assert not verdict.allowed
    assert verdict.entry is None and verdict.address is None
    assert (
        verdict.reason == "api.example.org:8443 is not on the allowlist (allowed on ports 80, 443)"
    )
    assert verdict.suggestion == "api.example.org:8443"
    one_port = decide(POLICY, "internal.example.org", 443, ["93.184.216.34"])
    assert (
        one_port.reason == "internal.example.org:443 is not on the allowlist (allowed on port 8080)"
    )


def test_decide_name_not_on_the_allowlist_at_all() -> None:
    verdict = decide(POLICY, "Evil.example.com", 443, ["93.184.216.34"])
    assert not verdict.allowed
    assert verdict.reason == "evil.example.com:443 is not on the allowlist"
    assert verdict.suggestion == "evil.example.com:443"


def test_decide_name_that_does_not_resolve() -> None:
    verdict = decide(POLICY, "api.example.org", 443, [])
    assert not verdict.allowed
    assert verdict.reason == "api.example.org does not resolve"
    assert verdict.suggestion is None


def test_decide_skips_guarded_addresses_for_a_public_one() -> None:
    verdict = decide(POLICY, "api.example.org", 80, ["127.0.0.1", "169.254.169.254", "1.1.1.1"])
    assert verdict.allowed
    assert verdict.address == "1.1.1.1"


def test_decide_denies_a_name_resolving_only_to_guarded_addresses() -> None:
    verdict = decide(POLICY, "api.example.org", 80, ["10.1.2.3", "127.0.0.1"])
    assert not verdict.allowed
    assert verdict.reason == (
        "api.example.org resolves to 10.1.2.3 (private); a name entry never reaches it"
    )
    # The pin, never the bare address: that would open every name behind it.
    assert verdict.suggestion == "api.example.org:80"
    assert verdict.add_host == "api.example.org:10.1.2.3"
    assert verdict.hint == "--add-host api.example.org:10.1.2.3 --allow api.example.org:80"


@pytest.mark.parametrize(
    ("address", "shown", "why", "pinned"),
    [
        ("::ffff:127.0.0.1", "::ffff:127.0.0.1", "loopback", "127.0.0.1"),
        ("::1", "::1", "loopback", "::1"),
        ("fe80::1", "fe80::1", "link-local", "fe80::1"),
        ("100.64.0.1", "100.64.0.1", "carrier-grade NAT", "100.64.0.1"),
        ("203.0.113.80", "203.0.113.80", "reserved", "203.0.113.80"),
    ],
)  # fmt: skip
def test_decide_names_the_guard_and_suggests_the_pin(
    address: str, shown: str, why: str, pinned: str
) -> None:
    verdict = decide(POLICY, "api.example.org", 443, [address])
    assert not verdict.allowed
    assert (
        verdict.reason
        == f"api.example.org resolves to {shown} ({why}); a name entry never reaches it"
    )
    assert verdict.suggestion == "api.example.org:443"
    assert verdict.add_host == f"api.example.org:{pinned}"
    name, at = parse_pinned_host(verdict.add_host)
    assert (name, at) == ("api.example.org", pinned)
    # What the hint says, done: the operator pins the name and allows it.
    granted = EgressPolicy.from_strings([verdict.suggestion])
    after = POLICY.with_pins([(name, at)], granted=granted)
    allowed = decide(after, "api.example.org", 443, [address])
    assert allowed.allowed and allowed.pinned
    assert allowed.address == pinned


@pytest.mark.parametrize(
    ("address", "why"),
    [("169.254.169.254", "cloud metadata"), ("0.0.0.0", "unspecified"), ("::", "unspecified"),
     ("224.0.0.1", "multicast"), ("64:ff9b::a9fe:a9fe", "cloud metadata")],
)  # fmt: skip
def test_decide_gives_no_hint_where_no_pin_may_lead(address: str, why: str) -> None:
    verdict = decide(POLICY, "api.example.org", 443, [address])
    assert not verdict.allowed
    assert f"({why}" in verdict.reason
    assert verdict.suggestion is None and verdict.add_host is None and verdict.hint is None
    # Pinned and allowed by the operator all the same, it stays denied.
    granted = EgressPolicy.from_strings(["api.example.org:443"])
    after = POLICY.with_pins([("api.example.org", address)], granted=granted)
    assert after.pins == ()
    assert not decide(after, "api.example.org", 443, [address]).allowed


def test_decide_reaches_a_guarded_address_an_ip_entry_covers() -> None:
    verdict = decide(POLICY, "api.example.org", 443, ["10.1.2.3"])
    assert verdict.allowed
    assert verdict.entry == _entry("api.example.org")
    assert verdict.address == "10.1.2.3"
    mapped = decide(POLICY, "api.example.org", 443, ["::ffff:10.1.2.3"])
    assert mapped.allowed
    assert mapped.address == "10.1.2.3"
    v6 = decide(POLICY, "api.example.org", 443, ["fd00::7"])
    assert v6.allowed
    assert v6.address == "fd00::7"
    # The IP entry covers port 443 only.
    assert not decide(POLICY, "api.example.org", 80, ["10.1.2.3"]).allowed


def test_decide_an_ip_entry_alone_does_not_allow_a_name() -> None:
    verdict = decide(POLICY, "unlisted.example.com", 443, ["10.1.2.3"])
    assert not verdict.allowed
    assert verdict.suggestion == "unlisted.example.com:443"


def test_decide_unusable_resolved_addresses() -> None:
    verdict = decide(POLICY, "api.example.org", 443, ["not-an-address", "fe80::1%eth0"])
    assert not verdict.allowed
    assert verdict.reason == (
        "api.example.org resolves to 'not-an-address', which is not a usable address"
    )
    assert verdict.suggestion is None
    assert decide(POLICY, "api.example.org", 443, ["junk", "8.8.8.8"]).address == "8.8.8.8"


def test_decide_ip_literals_need_an_ip_entry_and_skip_the_guard() -> None:
    verdict = decide(POLICY, "10.9.9.9", 8080, ["10.9.9.9"])
    assert verdict.allowed
    assert verdict.entry == _entry("10.9.9.9:8080")
    assert verdict.address == "10.9.9.9"
    assert decide(POLICY, "10.1.1.1", 443, ["10.1.1.1"]).entry == _entry("10.0.0.0/8:443")
    bracketed = decide(POLICY, "[fd00::1]", 443, ["[fd00::1]"])
    assert bracketed.allowed
    assert bracketed.address == "fd00::1"
    mapped = decide(POLICY, "::ffff:10.1.1.1", 443, ["::ffff:10.1.1.1"])
    assert mapped.allowed
    assert mapped.address == "10.1.1.1"


def test_decide_ip_literal_not_on_the_allowlist() -> None:
    verdict = decide(POLICY, "93.184.216.34", 443, ["93.184.216.34"])
    assert not verdict.allowed
    assert verdict.reason == "93.184.216.34:443 is not on the allowlist"
    assert verdict.suggestion == "93.184.216.34:443"
    v6 = decide(POLICY, "[2606:2800::1]", 8443, [])
    assert v6.reason == "[2606:2800::1]:8443 is not on the allowlist"
    assert v6.suggestion == "[2606:2800::1]:8443"
    # A name entry never allows a literal, even one its name resolves to.
    assert not decide(POLICY, "169.254.169.254", 80, ["169.254.169.254"]).allowed


def test_decide_invalid_host_and_port() -> None:
    bad = decide(POLICY, "bad\nhost", 443, ["1.1.1.1"])
    assert not bad.allowed
    assert bad.reason == "'bad\\nhost' is not a valid host name"
    assert bad.suggestion is None
    assert not decide(POLICY, "127.1", 443, ["127.0.0.1"]).allowed
    assert not decide(POLICY, "fd00::1%eth0", 443, []).allowed
    long = decide(POLICY, "a" * 10_000, 443, [])
    assert len(long.reason) < 200
    for port in (0, -1, 65536):
        verdict = decide(POLICY, "api.example.org", port, ["1.1.1.1"])
        assert not verdict.allowed
        assert verdict.reason == f"port {port} is out of range 1-65535"


def test_decide_refuses_a_single_address_string() -> None:
    with pytest.raises(TypeError, match="not one string"):
        decide(POLICY, "api.example.org", 443, "1.1.1.1")


# -- pins the operator granted --------------------------------------------------------------

MIRROR = EgressPolicy.from_strings(
    ["mirror.example.internal", "other.example.internal:8080", "*.corp.example"]
)


def _pinned(policy: EgressPolicy, *pins: tuple[str, str], granted: list[str]) -> EgressPolicy:
    return policy.with_pins(pins, granted=EgressPolicy.from_strings(granted))


def test_a_granted_pin_reaches_its_private_address_and_says_so() -> None:
    policy = _pinned(
        MIRROR, ("Mirror.Example.Internal.", "10.0.0.5"), granted=["mirror.example.internal"]
    )
    assert [pin.describe() for pin in policy.pins] == ["mirror.example.internal:10.0.0.5"]
    assert policy.pins[0].ports == DEFAULT_PORTS
    for port in (80, 443):
        # The resolver's answer is not consulted: the pin is the address.
        verdict = decide(policy, "MIRROR.example.internal.", port, ["93.184.216.34"])
        assert verdict.allowed and verdict.pinned
        assert verdict.address == "10.0.0.5"
        assert verdict.entry is not None and verdict.entry.describe() == "mirror.example.internal"
        assert verdict.reason == (
            "allowed by mirror.example.internal, pinned to 10.0.0.5 by the operator"
        )
    # The digest identifies the entries; pins are recorded with the invocation.
    assert policy.digest() == MIRROR.digest()


def test_a_pin_to_a_public_address_needs_no_checks() -> None:
    policy = _pinned(
        MIRROR, ("mirror.example.internal", "93.184.216.34"), granted=["mirror.example.internal"]
    )
    verdict = decide(policy, "mirror.example.internal", 443, ["93.184.216.34"])
    assert verdict.allowed and not verdict.pinned


def test_a_pin_nobody_allowed_grants_nothing() -> None:
    # No grant at all, a wildcard, an IP entry, another name, another port: no pin.
    for granted in ([], ["*.example.internal"], ["10.0.0.5:443"], ["other.example.internal"], []):
        policy = _pinned(MIRROR, ("mirror.example.internal", "10.0.0.5"), granted=granted)
        assert policy.pins == ()
        verdict = decide(policy, "mirror.example.internal", 443, ["10.0.0.5"])
        assert not verdict.allowed
        assert (
            verdict.hint
            == "--add-host mirror.example.internal:10.0.0.5 --allow mirror.example.internal:443"
        )
    on_8080 = _pinned(
        MIRROR, ("mirror.example.internal", "10.0.0.5"), granted=["mirror.example.internal:8080"]
    )
    assert not decide(on_8080, "mirror.example.internal", 443, ["10.0.0.5"]).allowed


def test_a_granted_pin_still_needs_the_policy_to_name_it() -> None:
    # The operator's grant does not add a destination to a step that does not name it.
    policy = _pinned(
        MIRROR, ("files.example.internal", "10.0.0.6"), granted=["files.example.internal"]
    )
    verdict = decide(policy, "files.example.internal", 443, ["10.0.0.6"])
    assert not verdict.allowed
    assert verdict.reason == "files.example.internal:443 is not on the allowlist"
    # A wildcard of the policy names it; the exact grant is the operator's.
    policy = _pinned(MIRROR, ("a.corp.example", "10.0.0.7"), granted=["a.corp.example"])
    assert decide(policy, "a.corp.example", 443, []).pinned
    # The port must be allowed by both.
    policy = _pinned(
        MIRROR, ("other.example.internal", "10.0.0.8"), granted=["other.example.internal"]
    )
    assert not decide(policy, "other.example.internal", 8080, ["10.0.0.8"]).allowed
    assert not decide(policy, "other.example.internal", 443, ["10.0.0.8"]).allowed


def test_a_pin_opens_neither_the_bare_address_nor_other_names() -> None:
    policy = _pinned(
        MIRROR.merged(EgressPolicy.from_strings(["*.example.internal"])),
        ("mirror.example.internal", "10.0.0.5"),
        granted=["mirror.example.internal"],
    )
    bare = decide(policy, "10.0.0.5", 443, ["10.0.0.5"])
    assert not bare.allowed
    assert bare.reason == (
        "10.0.0.5:443 is not on the allowlist; the operator pinned mirror.example.internal"
        " to it: connect by that name"
    )
    # Allowing the address would open every name behind it: no hint offers it.
    assert bare.suggestion is None and bare.hint is None
    # An address nobody pinned is still the operator's to allow literally.
    other = decide(policy, "10.0.0.6", 443, ["10.0.0.6"])
    assert other.reason == "10.0.0.6:443 is not on the allowlist"
    assert other.hint == "--allow 10.0.0.6:443"
    # Another name that resolves there (or is pinned there without a grant) is guarded.
    sibling = decide(policy, "admin.example.internal", 443, ["10.0.0.5"])
    assert not sibling.allowed
    assert (
        sibling.hint
        == "--add-host admin.example.internal:10.0.0.5 --allow admin.example.internal:443"
    )
    assert not decide(policy, "x.mirror.example.internal", 443, ["10.0.0.5"]).allowed


def test_with_pins_takes_the_last_pin_of_a_name_and_keeps_entries() -> None:
    policy = _pinned(
        MIRROR,
        ("mirror.example.internal", "10.0.0.5"),
        ("mirror.example.internal", "fd00::5"),
        granted=["mirror.example.internal:443", "mirror.example.internal:8443"],
    )
    (pin,) = policy.pins
    assert (pin.address, pin.ports) == ("fd00::5", frozenset({443, 8443}))
    assert policy.entries == MIRROR.entries
    assert decide(policy, "mirror.example.internal", 443, []).address == "fd00::5"
    with pytest.raises(ConfigError, match="not an IP address"):
        _pinned(MIRROR, ("mirror.example.internal", "nowhere"), granted=["mirror.example.internal"])


def test_merged_keeps_the_first_pin_of_a_name() -> None:
    one = _pinned(
        MIRROR, ("mirror.example.internal", "10.0.0.5"), granted=["mirror.example.internal"]
    )
    two = _pinned(
        MIRROR, ("mirror.example.internal", "10.0.0.9"), granted=["mirror.example.internal"]
    )
    assert [p.address for p in one.merged(two).pins] == ["10.0.0.5"]
    assert one.merged(EgressPolicy()).pins == one.pins


# -- suggestions and pinned hosts ----------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [
        ("API.example.org.", 443, "api.example.org:443"),
        ("api.example.org", 80, "api.example.org:80"),
        ("bücher.example", 8080, "xn--bcher-kva.example:8080"),
        ("10.1.2.3", 8443, "10.1.2.3:8443"),
        ("::1", 8080, "[::1]:8080"),
        ("[FD00::1]", 443, "[fd00::1]:443"),
        ("::ffff:10.0.0.1", 22, "10.0.0.1:22"),
    ],
)  # fmt: skip
def test_suggest_allow(host: str, port: int, expected: str) -> None:
    assert suggest_allow(host, port) == expected
    assert parse_allow(expected).matches(host, port)


def test_suggest_allow_rejects() -> None:
    with pytest.raises(ConfigError, match="invalid host name"):
        suggest_allow("bad host", 443)
    with pytest.raises(ConfigError, match="out of range"):
        suggest_allow("x.org", 0)


def test_parse_pinned_host() -> None:
    assert parse_pinned_host("Registry.Internal.:10.0.0.5") == ("registry.internal", "10.0.0.5")
    assert parse_pinned_host("r.internal:[FD00::5]") == ("r.internal", "fd00::5")
    assert parse_pinned_host("r.internal:fd00::5") == ("r.internal", "fd00::5")
    assert parse_pinned_host("r.internal:::ffff:10.0.0.5") == ("r.internal", "10.0.0.5")


@pytest.mark.parametrize(
    ("text", "what"),
    [
        ("registry.internal", "no ':' before the address"),
        (":10.0.0.5", "the host name is empty"),
        ("127.1:10.0.0.5", "ends in a number"),
        ("r.internal:", "'' is not an IP address"),
        ("r.internal:example.org", "'example.org' is not an IP address"),
        ("r.internal:fe80::1%eth0", "zone indexes are not supported"),
    ],
)
def test_parse_pinned_host_rejects(text: str, what: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_pinned_host(text)
    assert info.value.message.startswith(f"invalid --add-host {text!r}: ")
    assert what in info.value.message
    assert info.value.hint is not None and "NAME:ADDRESS" in info.value.hint


# -- entries a spec wrote ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("127.0.0.0/8:8000", "reaches loopback addresses"),
        ("127.0.0.1:8000", "is a loopback address"),
        ("169.254.169.254:80", "is a cloud metadata address"),
        ("100.100.100.200:80", "is a cloud metadata address"),
        ("[fd00:ec2::254]:80", "is a cloud metadata address"),
        ("169.254.0.0/16:80", "reaches cloud metadata and link-local addresses"),
        ("0.0.0.0/0:22", "reaches cloud metadata, loopback, private and other non-public"),
        ("[::/0]:22", "reaches cloud metadata, loopback, private and other non-public"),
        ("0.0.0.0:80", "is an unspecified address"),
        ("10.0.0.0/8:443", "reaches private addresses"),
        ("10.1.2.0/24:443", "reaches private addresses"),
        ("172.16.0.0/12:443", "reaches private addresses"),
        ("192.168.1.10:443", "is a private address"),
        ("100.64.0.0/10:443", "reaches cloud metadata and carrier-grade NAT addresses"),
        ("100.64.0.0/24:443", "reaches carrier-grade NAT addresses"),
        ("224.0.0.251:5353", "is a multicast address"),
        ("240.0.0.0/4:1", "reaches reserved addresses"),
        ("192.0.2.0/24:80", "reaches reserved addresses"),
        ("[::1]:8080", "is a loopback address"),
        ("[fe80::/64]:22", "reaches link-local addresses"),
        ("[fd00::/8]:443", "reaches cloud metadata and unique local addresses"),
        ("[fec0::1]:443", "is a site-local address"),
        ("[ff02::1]:1", "is a multicast address"),
        ("[2001:db8::/48]:1", "reaches reserved addresses"),
        ("[4000::1]:1", "is a reserved address"),
        ("[64:ff9b::7f00:1]:80", "is a loopback address via NAT64"),
        ("[64:ff9b::a9fe:a9fe]:80", "is a cloud metadata address via NAT64"),
        ("[64:ff9b::a00:0/120]:80", "reaches private via NAT64 addresses"),
        ("[2002:7f00:1::/48]:80", "reaches loopback via 6to4 addresses"),
        ("[2002:a9fe:a9fe::1]:80", "is a cloud metadata address via 6to4"),
        # Mostly public, but overlapping one guarded range is enough.
        ("8.8.8.0/24:53", None),
        ("192.0.0.0/23:80", "reaches reserved addresses"),
        ("100.63.255.0/24:80", None),
    ],
)  # fmt: skip
def test_spec_entries_reaching_guarded_addresses_are_refused(text: str, words: str | None) -> None:
    problem = spec_entry_problem(parse_allow(text))
    if words is None:
        assert problem is None
        return
    assert problem is not None
    assert problem.startswith(parse_allow(text).describe() + " ")
    assert words in problem
    assert "only an operator may allow (--allow or the configuration file)" in problem
    assert "\n" not in problem


@pytest.mark.parametrize(
    ("text", "least"),
    [
        ("8.8.0.0/16:53", "/24 of IPv4"),
        ("8.8.8.0/23:53", "/24 of IPv4"),
        ("1.0.0.0/8:443", "/24 of IPv4"),
        ("[2606:4700::/32]:443", "/48 of IPv6"),
        ("[2606:4700::/47]:443", "/48 of IPv6"),
    ],
)
def test_spec_entries_broader_than_one_site_are_refused(text: str, least: str) -> None:
    problem = spec_entry_problem(parse_allow(text))
    assert problem is not None
    assert "is too broad for a spec" in problem and least in problem


@pytest.mark.parametrize(
    "text",
    [
        "pypi.org",
        "pypi.org:443",
        "*.example.org",
        "*.example.org:8443",
        # Names are guarded when they resolve, so even these are a spec's to write.
        "localhost",
        "metadata.google.internal:80",
        "8.8.8.8:53",
        "8.8.8.0/24:53",
        "[2606:4700::1111]:443",
        "[2606:4700::/48]:443",
        "[64:ff9b::808:808]:53",
        "[64:ff9b::808:800/120]:53",
        "[2002:808:808::/48]:80",
    ],
)
def test_spec_entries_naming_public_destinations_are_fine(text: str) -> None:
    assert spec_entry_problem(parse_allow(text)) is None


def test_spec_min_prefix() -> None:
    assert SPEC_MIN_PREFIX == {4: 24, 6: 48}


def test_guarded_reasons() -> None:
    assert guarded_reasons(ipaddress.ip_network("8.8.8.0/24")) == []
    assert guarded_reasons(ipaddress.ip_network("127.0.0.1/32")) == ["loopback"]
    assert guarded_reasons(ipaddress.ip_network("10.0.0.0/24")) == ["private"]
    assert guarded_reasons(ipaddress.ip_network("169.254.169.0/24")) == [
        "cloud metadata",
        "link-local",
    ]
    assert guarded_reasons(ipaddress.ip_network("2606:4700::/48")) == []
    assert guarded_reasons(ipaddress.ip_network("64:ff9b::7f00:0/120")) == ["loopback via NAT64"]
    assert guarded_reasons(ipaddress.ip_network("::/0"))[:3] == [
        "cloud metadata",
        "loopback",
        "private",
    ]


def _samples(
    network: ipaddress.IPv4Network | ipaddress.IPv6Network, offset: int
) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The first and last address of ``network``, and one in between."""
    cls = ipaddress.IPv4Address if network.version == 4 else ipaddress.IPv6Address
    inside = cls(int(network.network_address) + offset % network.num_addresses)
    return [network.network_address, network.broadcast_address, inside]


@given(
    st.one_of(
        st.tuples(st.ip_addresses(v=4), st.integers(0, 32)),
        st.tuples(st.ip_addresses(v=6), st.integers(0, 128)),
        # Near the interesting places of IPv6: low space, translation prefixes, 2000::/3.
        st.tuples(
            st.sampled_from(["::", "::ffff:0:0", "64:ff9b::", "2002::", "2001::", "fd00::"]).map(
                ipaddress.IPv6Address
            ),
            st.integers(0, 128),
        ),
    ),
    st.integers(min_value=0),
)
def test_a_spec_entry_is_allowed_only_if_its_addresses_are_public(
    base: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int], offset: int
) -> None:
    address, prefix = base
    network = ipaddress.ip_network((address, prefix), strict=False)
    try:
        entry = parse_allow(f"{_network_text(network)}:443")
    except ConfigError:
        return  # IPv4-mapped networks are not entries at all
    problem = spec_entry_problem(entry)
    guarded = [a for a in _samples(network, offset) if guarded_reason(a) is not None]
    if guarded:
        assert problem is not None, (network, guarded)
        assert guarded_reasons(network) != []
    if problem is None:
        assert network.prefixlen >= SPEC_MIN_PREFIX[network.version]
        assert guarded_reasons(network) == []


def _network_text(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
    return f"[{network}]" if network.version == 6 else str(network)
