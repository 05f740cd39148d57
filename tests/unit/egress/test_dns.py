from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.query
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.update
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from buildcell.egress.dns import DnsAnswer, DnsResponder, SyntheticAddresses, _render
from buildcell.errors import SandboxError

ALLOWED = frozenset({"example.com", "pypi.org", "files.pythonhosted.org"})
HOSTNAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")


@dataclass
class Harness:
    """A responder over ALLOWED, with everything it told the audit and asked the policy."""

    addresses: SyntheticAddresses = field(default_factory=SyntheticAddresses)
    answers: list[DnsAnswer] = field(default_factory=list)
    asked: list[str] = field(default_factory=list)
    allowed: frozenset[str] = ALLOWED
    cls: type[DnsResponder] = DnsResponder

    def __post_init__(self) -> None:
        self.responder = self.cls(self._allows, self.addresses, self.answers.append)

    def _allows(self, name: str) -> bool:
        self.asked.append(name)
        return name in self.allowed

    def ask(self, query: dns.message.Message, transport: str = "udp") -> dns.message.Message:
        reply = self.responder.answer(query.to_wire(), transport)
        assert reply is not None
        response = dns.message.from_wire(reply)
        assert response.id == query.id
        assert response.flags & dns.flags.QR
        return response


def a_address(response: dns.message.Message) -> str:
    assert response.rcode() == dns.rcode.NOERROR
    [rrset] = response.answer
    assert rrset.rdtype == dns.rdatatype.A
    assert rrset.ttl == 60
    [rdata] = rrset
    return str(rdata.to_text())


# --- SyntheticAddresses -------------------------------------------------------------


def test_addresses_are_allocated_in_order_stable_and_reversible() -> None:
    addresses = SyntheticAddresses()
    assert addresses.network == SyntheticAddresses.NETWORK == ipaddress.ip_network("127.77.0.0/16")
    assert addresses.address_for("example.com") == "127.77.0.1"
    assert addresses.address_for("pypi.org") == "127.77.0.2"
    assert addresses.address_for("example.com") == "127.77.0.1"
    assert addresses.name_for("127.77.0.1") == "example.com"
    assert addresses.name_for("127.77.0.2") == "pypi.org"
    assert addresses.name_for("127.77.0.3") is None
    assert addresses.name_for("not an address") is None
    assert addresses.name_for("127.077.0.1") is None


def test_addresses_skip_network_and_broadcast_and_run_out_with_a_clear_error() -> None:
    addresses = SyntheticAddresses(ipaddress.IPv4Network("127.78.0.0/30"))
    assert addresses.address_for("a.test") == "127.78.0.1"
    assert addresses.address_for("b.test") == "127.78.0.2"
    with pytest.raises(SandboxError, match=r"c\.test.*all 2 addresses in 127\.78\.0\.0/30"):
        addresses.address_for("c.test")
    assert addresses.address_for("a.test") == "127.78.0.1"
    assert addresses.name_for("127.78.0.3") is None


@pytest.mark.parametrize("network", ["10.0.0.0/8", "127.1.2.0/31", "127.1.2.3/32"])
def test_addresses_must_be_loopback_hosts(network: str) -> None:
    with pytest.raises(ValueError, match="synthetic address network"):
        SyntheticAddresses(ipaddress.IPv4Network(network))


def test_addresses_are_consistent_under_concurrent_allocation() -> None:
    addresses = SyntheticAddresses()
    names = [f"host{i}.test" for i in range(200)]
    results: list[dict[str, str]] = []

    def allocate() -> None:
        results.append({name: addresses.address_for(name) for name in names})

    threads = [threading.Thread(target=allocate) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r == results[0] for r in results)
    assert len(set(results[0].values())) == len(names)
    assert all(addresses.name_for(a) == n for n, a in results[0].items())


# --- answer: the policy ---------------------------------------------------------------


def test_a_for_an_allowed_name_is_its_synthetic_address() -> None:
    h = Harness()
    response = h.ask(dns.message.make_query("example.com", "A"))
    address = a_address(response)
    assert address == h.addresses.address_for("example.com")
    assert ipaddress.IPv4Address(address) in SyntheticAddresses.NETWORK
    assert response.flags & dns.flags.AA
    assert response.flags & dns.flags.RA
    assert h.answers == [DnsAnswer("example.com", "A", "NOERROR", True, address, "udp")]


def test_addresses_are_stable_per_name_and_distinct_across_names() -> None:
    h = Harness()
    first = {name: a_address(h.ask(dns.message.make_query(name, "A"))) for name in ALLOWED}
    again = {name: a_address(h.ask(dns.message.make_query(name, "A"))) for name in ALLOWED}
    assert first == again
    assert len(set(first.values())) == len(ALLOWED)
    assert {h.addresses.name_for(a) for a in first.values()} == ALLOWED


@pytest.mark.parametrize("rdtype", ["AAAA", "MX", "TXT", "SRV", "ANY", "HTTPS", "TYPE65280"])
def test_other_types_of_an_allowed_name_are_empty_noerror(rdtype: str) -> None:
    h = Harness()
    response = h.ask(dns.message.make_query("pypi.org", rdtype))
    assert response.rcode() == dns.rcode.NOERROR
    assert response.answer == response.authority == response.additional == []
    assert response.flags & dns.flags.AA
    assert h.answers == [DnsAnswer("pypi.org", rdtype, "NOERROR", True, None, "udp")]
    assert h.addresses.name_for("127.77.0.1") is None


@pytest.mark.parametrize("rdtype", ["A", "AAAA", "TXT"])
def test_a_disallowed_name_is_refused(rdtype: str) -> None:
    h = Harness()
    response = h.ask(dns.message.make_query("exfil.attacker.example", rdtype))
    assert response.rcode() == dns.rcode.REFUSED
    assert response.answer == []
    assert not response.flags & dns.flags.AA
    assert h.asked == ["exfil.attacker.example"]
    assert h.answers == [DnsAnswer("exfil.attacker.example", rdtype, "REFUSED", False, None, "udp")]
    assert h.addresses.name_for("127.77.0.1") is None


def test_names_are_matched_case_insensitively_without_the_trailing_dot() -> None:
    h = Harness()
    shouted = h.ask(dns.message.make_query("ExAmPlE.CoM.", "A"))
    plain = h.ask(dns.message.make_query("example.com", "A"))
    assert a_address(shouted) == a_address(plain)
    # The answer's owner is the name as asked, so 0x20-randomizing clients accept it.
    assert shouted.answer[0].name == dns.name.from_text("ExAmPlE.CoM.")
    assert shouted.answer[0].name.labels == (b"ExAmPlE", b"CoM", b"")
    assert h.asked == ["example.com", "example.com"]
    assert h.answers[0].name == "example.com"


@pytest.mark.parametrize("rdclass", ["CH", "HS", "ANY", "NONE"])
def test_a_class_other_than_in_is_refused_without_asking_the_policy(rdclass: str) -> None:
    h = Harness()
    response = h.ask(dns.message.make_query("example.com", "A", rdclass=rdclass))
    assert response.rcode() == dns.rcode.REFUSED
    assert response.answer == []
    assert h.asked == []
    assert h.answers[0].allowed is False


def test_two_questions_are_refused() -> None:
    h = Harness()
    query = dns.message.make_query("example.com", "A")
    query.find_rrset(
        query.question,
        dns.name.from_text("pypi.org"),
        dns.rdataclass.IN,
        dns.rdatatype.A,
        create=True,
        force_unique=True,
    )
    response = h.ask(query)
    assert response.rcode() == dns.rcode.REFUSED
    assert response.answer == []
    assert h.asked == []
    assert h.answers == [DnsAnswer("example.com", "A", "REFUSED", False, None, "udp")]


def test_the_same_question_twice_is_refused() -> None:
    h = Harness()
    wire = bytearray(dns.message.make_query("example.com", "A").to_wire())
    question = bytes(wire[12:])
    wire[4:6] = struct.pack("!H", 2)
    response = dns.message.from_wire(h.responder.answer(bytes(wire) + question, "udp") or b"")
    assert response.rcode() == dns.rcode.REFUSED
    assert response.answer == []


def test_no_question_is_refused() -> None:
    h = Harness()
    query = dns.message.make_query("example.com", "A")
    query.question = []
    response = h.ask(query)
    assert response.rcode() == dns.rcode.REFUSED
    assert h.answers == [DnsAnswer("", "", "REFUSED", False, None, "udp")]


@pytest.mark.parametrize("opcode", [dns.opcode.IQUERY, dns.opcode.STATUS, dns.opcode.NOTIFY, 15])
def test_opcodes_other_than_query_are_not_implemented(opcode: int) -> None:
    h = Harness()
    query = dns.message.make_query("example.com", "A")
    query.set_opcode(opcode)  # type: ignore[arg-type]
    response = h.ask(query)
    assert response.rcode() == dns.rcode.NOTIMP
    assert response.opcode() == opcode
    assert response.answer == []
    assert h.asked == []
    assert h.answers[0].rcode == "NOTIMP"


def test_an_update_is_not_implemented() -> None:
    h = Harness()
    update = dns.update.UpdateMessage("example.com")
    update.add("www", 300, "A", "192.0.2.1")
    response = h.ask(update)
    assert response.rcode() == dns.rcode.NOTIMP
    assert response.opcode() == dns.opcode.UPDATE
    assert h.asked == []


@pytest.mark.parametrize(
    "name",
    [
        # One label that holds a literal dot: printed "example\.com", never "example.com".
        dns.name.Name([b"example.com", b""]),
        dns.name.Name([b"example", b"com\x00", b""]),
        dns.name.Name([b"exa mple", b"com", b""]),
        dns.name.Name([b"\xc3\xa9xample", b"com", b""]),
        dns.name.from_text("-example.com"),
        dns.name.from_text("example-.com"),
        dns.name.from_text("_dmarc.example.com"),
        dns.name.from_text("*.example.com"),
        dns.name.from_text("192.0.2.1"),
        dns.name.root,
    ],
    ids=repr,
)
def test_names_that_are_not_host_names_are_refused_without_asking_the_policy(
    name: dns.name.Name,
) -> None:
    h = Harness()
    response = h.ask(dns.message.make_query(name, "A"))
    assert response.rcode() == dns.rcode.REFUSED
    assert response.answer == []
    assert h.asked == []
    [seen] = h.answers
    assert seen.allowed is False
    assert seen.name != "example.com"


def test_a_message_that_is_a_response_is_dropped() -> None:
    h = Harness()
    query = dns.message.make_query("example.com", "A")
    response = dns.message.make_response(query)
    assert h.responder.answer(response.to_wire(), "udp") is None
    assert h.responder.answer(b"\x00\x01\x80" + b"\xff" * 40, "tcp") is None
    assert h.answers == []


@pytest.mark.parametrize("size", range(12))
def test_a_message_shorter_than_a_header_is_dropped(size: int) -> None:
    h = Harness()
    assert h.responder.answer(dns.message.make_query("x.test", "A").to_wire()[:size], "udp") is None
    assert h.answers == []


@pytest.mark.parametrize(
    "body",
    [
        b"\x03abc",  # name cut short
        b"\x07example\x03com\x00\x00\x01",  # type without class
        b"\xc0\x0c\x00\x01\x00\x01",  # compression pointer to itself
        b"\x07example\x03com\x00\x00\x01\x00\x01trailing",
    ],
)
def test_an_unparseable_body_gets_formerr_with_the_same_id(body: bytes) -> None:
    h = Harness()
    wire = struct.pack("!HHHHHH", 0xBEEF, 0x0100, 1, 0, 0, 0) + body
    reply = h.responder.answer(wire, "udp")
    assert reply is not None
    response = dns.message.from_wire(reply)
    assert response.id == 0xBEEF
    assert response.rcode() == dns.rcode.FORMERR
    assert response.flags & dns.flags.QR
    assert response.flags & dns.flags.RD
    assert response.question == response.answer == []
    assert h.answers == [DnsAnswer("", "", "FORMERR", False, None, "udp")]


def test_a_signed_query_gets_formerr_since_no_key_is_known() -> None:
    h = Harness()
    query = dns.message.make_query("example.com", "A")
    query.use_tsig({dns.name.from_text("k."): b"0123456789abcdef"}, "k.")
    response = dns.message.from_wire(h.responder.answer(query.to_wire(), "udp") or b"")
    assert response.rcode() == dns.rcode.FORMERR
    assert response.answer == []


def test_edns_is_answered_with_edns_and_plain_without() -> None:
    h = Harness()
    with_edns = h.ask(dns.message.make_query("example.com", "A", use_edns=0, payload=4096))
    assert with_edns.edns == 0
    assert with_edns.payload == 1232
    plain = h.ask(dns.message.make_query("example.com", "A"))
    assert plain.edns == -1
    assert a_address(with_edns) == a_address(plain)


def test_an_unknown_edns_version_gets_badvers() -> None:
    h = Harness()
    response = h.ask(dns.message.make_query("example.com", "A", use_edns=1))
    assert response.rcode() == dns.rcode.BADVERS
    assert response.edns == 0
    assert response.answer == []
    assert h.answers[0].rcode == "BADVERS"
    assert h.answers[0].allowed is False


def test_an_oversized_reply_is_truncated_to_the_question() -> None:
    query = dns.message.make_query("example.com", "A")
    response = dns.message.make_response(query)
    rrset = dns.rrset.RRset(query.question[0].name, dns.rdataclass.IN, dns.rdatatype.A)
    for i in range(100):
        rrset.add(dns.rdata.from_text("IN", "A", f"127.77.0.{i + 1}"), 60)
    response.answer.append(rrset)
    assert len(response.to_wire()) > 512
    wire = _render(response, 512)
    assert len(wire) <= 512
    truncated = dns.message.from_wire(wire)
    assert truncated.flags & dns.flags.TC
    assert truncated.answer == []
    assert truncated.question == query.question


def test_exhausted_addresses_give_servfail_not_an_exception() -> None:
    h = Harness(addresses=SyntheticAddresses(ipaddress.IPv4Network("127.78.0.0/30")))
    for name in ("example.com", "pypi.org"):
        a_address(h.ask(dns.message.make_query(name, "A")))
    response = h.ask(dns.message.make_query("files.pythonhosted.org", "A"))
    assert response.rcode() == dns.rcode.SERVFAIL
    assert response.answer == []
    assert h.answers[-1] == DnsAnswer("files.pythonhosted.org", "A", "SERVFAIL", True, None, "udp")


def test_the_transport_is_recorded_and_must_be_known() -> None:
    h = Harness()
    h.ask(dns.message.make_query("example.com", "A"), "tcp")
    assert h.answers[0].transport == "tcp"
    with pytest.raises(ValueError, match="transport"):
        h.responder.answer(dns.message.make_query("example.com", "A").to_wire(), "quic")


# --- answer: hostile input --------------------------------------------------------------


def check_hostile(wire: bytes) -> None:
    """Whatever ``wire`` is: no exception, one audit event per reply, no address for a refusal."""
    h = Harness()
    reply = h.responder.answer(wire, "udp")
    assert all(HOSTNAME.fullmatch(name) for name in h.asked)
    if reply is None:
        assert h.answers == []
        return
    [seen] = h.answers
    assert reply[:2] == wire[:2]
    response = dns.message.from_wire(reply)
    assert response.flags & dns.flags.QR
    addresses = set()
    for rrset in response.answer:
        assert rrset.rdtype == dns.rdatatype.A
        assert rrset.name.to_text(omit_final_dot=True).lower() in ALLOWED
        for rdata in rrset:
            addresses.add(rdata.to_text())
            assert h.addresses.name_for(rdata.to_text()) in ALLOWED
    assert response.authority == response.additional == []
    if addresses:
        assert seen.allowed
        assert seen.name in ALLOWED
        assert addresses == {seen.address}
    else:
        assert seen.address is None
    if not seen.allowed:
        assert seen.rcode != "NOERROR"


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_never_raise_nor_claim_an_address(wire: bytes) -> None:
    check_hostile(wire)


NAMES = [
    "example.com",
    "EXAMPLE.com.",
    "www.example.com",
    "example.com.attacker.test",
    "pypi.org",
    "evil.test",
    "a" * 63 + ".example.com",
]


@st.composite
def mutated_queries(draw: st.DrawFn) -> bytes:
    name = draw(st.sampled_from(NAMES))
    rdtype = draw(st.sampled_from(["A", "AAAA", "MX", "TXT", "ANY", "SOA", "OPT"]))
    edns = draw(st.sampled_from([False, 0, 1]))
    query = dns.message.make_query(name, rdtype, use_edns=edns)
    wire = bytearray(query.to_wire())
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["set", "insert", "delete", "truncate", "append"]))
        at = draw(st.integers(0, max(len(wire) - 1, 0)))
        byte = draw(st.integers(0, 255))
        if op == "set" and wire:
            wire[at] = byte
        elif op == "insert":
            wire.insert(at, byte)
        elif op == "delete" and wire:
            del wire[at]
        elif op == "truncate":
            del wire[at:]
        else:
            wire += draw(st.binary(max_size=40))
    return bytes(wire)


@settings(max_examples=1000, deadline=None)
@given(mutated_queries())
def test_mutated_queries_never_raise_nor_claim_an_address(wire: bytes) -> None:
    check_hostile(wire)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.from_regex(r"[A-Za-z0-9-]{1,20}", fullmatch=True), min_size=1, max_size=4),
    st.sampled_from(sorted(ALLOWED)),
)
def test_only_exactly_an_allowed_name_gets_an_address(labels: list[str], allowed: str) -> None:
    h = Harness()
    for name in (".".join(labels), ".".join([*labels, allowed]), f"{allowed}.{'.'.join(labels)}"):
        reply = h.responder.answer(dns.message.make_query(name, "A").to_wire(), "udp")
        assert reply is not None
        response = dns.message.from_wire(reply)
        if name.lower() in ALLOWED:
            assert a_address(response) == h.addresses.address_for(name.lower())
        else:
            assert response.answer == []
            assert response.rcode() != dns.rcode.NOERROR


# --- serving over real loopback sockets ---------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@dataclass
class Served:
    udp_port: int
    tcp_port: int

    def connect(self) -> socket.socket:
        conn = socket.create_connection(("127.0.0.1", self.tcp_port), timeout=5)
        conn.settimeout(5)
        return conn


@contextlib.contextmanager
def serving(responder: DnsResponder) -> Iterator[Served]:
    """Serve UDP and TCP from an event loop in a thread, as the host does; stop by cancelling."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    for sock in (udp, tcp):
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
    tcp.listen()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    stop: list[Callable[[], None]] = []
    outcome: list[object] = []

    async def main() -> None:
        tasks = [
            asyncio.create_task(responder.serve_udp(udp)),
            asyncio.create_task(responder.serve_tcp(tcp)),
        ]
        done = loop.create_future()
        stop.append(lambda: done.set_result(None))
        started.set()
        await done
        for task in tasks:
            task.cancel()
        outcome.extend(await asyncio.gather(*tasks, return_exceptions=True))

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),))
    thread.start()
    try:
        assert started.wait(5)
        yield Served(udp.getsockname()[1], tcp.getsockname()[1])
    finally:
        if stop:
            loop.call_soon_threadsafe(stop[0])
        thread.join(10)
        assert not thread.is_alive()
        loop.close()
        udp.close()
        tcp.close()
    # Both servers ended by cancellation, not by an error of their own.
    assert len(outcome) == 2
    assert all(isinstance(o, asyncio.CancelledError) for o in outcome), outcome


def send_query(conn: socket.socket, query: dns.message.Message) -> None:
    conn.sendall(query.to_wire(prepend_length=True))


def recv_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        assert chunk, "connection closed before the reply"
        data += chunk
    return data


def recv_reply(conn: socket.socket) -> dns.message.Message:
    (length,) = struct.unpack("!H", recv_exactly(conn, 2))
    return dns.message.from_wire(recv_exactly(conn, length))


def assert_closed_by_peer(conn: socket.socket) -> None:
    # A reset is a close too: the server may close with our unread bytes still queued.
    with contextlib.suppress(ConnectionResetError):
        assert conn.recv(65535) == b""


@pytest.mark.timeout(30)
def test_udp_end_to_end() -> None:
    h = Harness()
    with serving(h.responder) as served:
        allowed = dns.query.udp(
            dns.message.make_query("example.com", "A"), "127.0.0.1", timeout=5, port=served.udp_port
        )
        refused = dns.query.udp(
            dns.message.make_query("evil.test", "A"), "127.0.0.1", timeout=5, port=served.udp_port
        )
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
            raw.settimeout(0.3)
            raw.sendto(b"\x00\x01\x80\x00" + b"\x00" * 8, ("127.0.0.1", served.udp_port))
            with pytest.raises(TimeoutError):
                raw.recv(512)
        # Garbage and dropped packets did not stop the server.
        again = dns.query.udp(
            dns.message.make_query("example.com", "A"), "127.0.0.1", timeout=5, port=served.udp_port
        )
    assert a_address(allowed) == a_address(again) == h.addresses.address_for("example.com")
    assert refused.rcode() == dns.rcode.REFUSED
    assert [a.rcode for a in h.answers] == ["NOERROR", "REFUSED", "NOERROR"]
    assert {a.transport for a in h.answers} == {"udp"}


@pytest.mark.timeout(30)
def test_tcp_end_to_end() -> None:
    h = Harness()
    with serving(h.responder) as served:
        response = dns.query.tcp(
            dns.message.make_query("pypi.org", "A"), "127.0.0.1", timeout=5, port=served.tcp_port
        )
    assert a_address(response) == h.addresses.address_for("pypi.org")
    assert h.answers[0].transport == "tcp"


@pytest.mark.timeout(30)
def test_tcp_pipelined_queries_on_one_connection_are_answered_in_order() -> None:
    h = Harness()
    first = dns.message.make_query("example.com", "A")
    second = dns.message.make_query("evil.test", "A")
    with serving(h.responder) as served, served.connect() as conn:
        conn.sendall(first.to_wire(prepend_length=True) + second.to_wire(prepend_length=True))
        one, two = recv_reply(conn), recv_reply(conn)
    assert (one.id, two.id) == (first.id, second.id)
    assert a_address(one) == h.addresses.address_for("example.com")
    assert two.rcode() == dns.rcode.REFUSED


@pytest.mark.timeout(30)
@pytest.mark.parametrize("prefix", [b"\x00\x00", b"\x00\x05hello", b"\x00\x0b" + b"\x00" * 11])
def test_tcp_malformed_length_closes_the_connection(prefix: bytes) -> None:
    h = Harness()
    with serving(h.responder) as served, served.connect() as conn:
        conn.sendall(prefix)
        assert_closed_by_peer(conn)
    assert h.answers == []


@pytest.mark.timeout(30)
def test_tcp_response_message_closes_the_connection() -> None:
    h = Harness()
    query = dns.message.make_query("example.com", "A")
    with serving(h.responder) as served, served.connect() as conn:
        conn.sendall(dns.message.make_response(query).to_wire(prepend_length=True))
        assert_closed_by_peer(conn)
    assert h.answers == []


@pytest.mark.timeout(30)
def test_tcp_idle_connection_is_closed() -> None:
    class Impatient(DnsResponder):
        TCP_IDLE_TIMEOUT = 0.2

    h = Harness(cls=Impatient)
    with serving(h.responder) as served, served.connect() as conn:
        conn.sendall(b"\x00")  # half a length prefix, then silence
        started = time.monotonic()
        assert_closed_by_peer(conn)
        assert time.monotonic() - started < 4


@pytest.mark.timeout(30)
def _wait_close_wait(conn: socket.socket, timeout: float = 30.0) -> None:
    port = f"{conn.getsockname()[1]:04X}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(table) as f:
                for line in f.readlines()[1:]:
                    fields = line.split()
                    if fields[1].endswith(":" + port) and fields[3] == "08":  # CLOSE_WAIT
                        return
        time.sleep(0.005)
    raise AssertionError("the server never closed its end")


def test_tcp_connection_is_closed_after_its_query_budget() -> None:
    # Queries pipelined past the budget go unanswered, and the replies before it survive.
    # Regression: closing with those queries still unread sent a reset, which destroyed
    # replies the client had not read yet.
    class Thrifty(DnsResponder):
        MAX_TCP_QUERIES = 3

    h = Harness(cls=Thrifty)
    with serving(h.responder) as served, served.connect() as conn:
        queries = [dns.message.make_query("example.com", "A") for _ in range(40)]
        conn.sendall(b"".join(q.to_wire(prepend_length=True) for q in queries))
        # The server has answered and closed before anything is read: wait for its FIN
        # (our end in CLOSE_WAIT), not for a while.
        _wait_close_wait(conn)
        replies = [recv_reply(conn) for _ in range(3)]
        assert conn.recv(65535) == b""  # an orderly end of stream, not a reset
    assert [r.id for r in replies] == [q.id for q in queries[:3]]
    assert len(h.answers) == 3


@pytest.mark.timeout(30)
def test_tcp_connections_beyond_the_limit_are_closed_at_once() -> None:
    class Small(DnsResponder):
        MAX_TCP_CONNECTIONS = 2

    h = Harness(cls=Small)
    with serving(h.responder) as served:
        held = [served.connect() for _ in range(2)]
        try:
            for conn in held:  # a reply proves the server accepted and holds it
                send_query(conn, dns.message.make_query("example.com", "A"))
                recv_reply(conn)
            with served.connect() as extra:
                send_query(extra, dns.message.make_query("example.com", "A"))
                assert_closed_by_peer(extra)
            send_query(held[0], dns.message.make_query("pypi.org", "A"))
            assert a_address(recv_reply(held[0])) == h.addresses.address_for("pypi.org")
        finally:
            for conn in held:
                conn.close()


@pytest.mark.timeout(30)
def test_cancelling_the_server_closes_every_connection() -> None:
    h = Harness()
    before = open_fds()
    clients: list[socket.socket] = []
    try:
        with serving(h.responder) as served:
            for i in range(5):
                conn = served.connect()
                clients.append(conn)
                send_query(conn, dns.message.make_query("example.com", "A"))
                recv_reply(conn)
                if i % 2:
                    conn.sendall(b"\x00\x1d\x12")  # leave the server mid-message
            clients.append(served.connect())  # perhaps not even accepted yet
        for conn in clients[:-1]:
            assert_closed_by_peer(conn)
    finally:
        for conn in clients:
            conn.close()
    assert open_fds() == before


@pytest.mark.timeout(30)
def test_a_listener_that_cannot_accept_is_a_sandbox_error() -> None:
    h = Harness()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as unlistened:
        unlistened.bind(("127.0.0.1", 0))
        unlistened.setblocking(False)
        with pytest.raises(SandboxError, match="cannot accept on its TCP socket"):
            asyncio.run(asyncio.wait_for(h.responder.serve_tcp(unlistened), 5))


@pytest.mark.timeout(30)
def test_a_udp_socket_that_cannot_be_read_is_a_sandbox_error() -> None:
    h = Harness()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as unconnected:
        unconnected.setblocking(False)
        with pytest.raises(SandboxError, match="cannot read its UDP socket"):
            asyncio.run(asyncio.wait_for(h.responder.serve_udp(unconnected), 5))
