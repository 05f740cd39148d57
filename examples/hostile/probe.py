"""A hostile build step: tries to take what a CI runner holds and to leave the cell.

Each probe prints CONTAINED or LEAKED. It is run inside a cell by examples/demo.py and by
the security tests; outside a cell most probes would print LEAKED.
"""

import ctypes
import os
import socket
import sys

results = []


def probe(name, attempt):
    try:
        leaked = attempt()
    except OSError as e:
        leaked = None
        detail = e.strerror or str(e)
    else:
        detail = leaked if leaked else "nothing there"
    verdict = "LEAKED" if leaked else "CONTAINED"
    results.append(verdict)
    print(f"  {verdict:9} {name}: {detail}")


def read(path):
    with open(path, "rb") as f:
        return f.read(64).decode(errors="replace").strip() or None


def listdir(path, own=()):
    return ", ".join(sorted(set(os.listdir(path)) - set(own))) or None


def connect(family, addr):
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        s.connect(addr)
    return f"connected to {addr}"


def env_secret():
    found = [k for k in os.environ if "TOKEN" in k or "SECRET" in k or "AWS" in k]
    return ", ".join(found) or None


def unshare():
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return "created a user namespace"


probe("read /root/.ssh", lambda: listdir("/root/.ssh"))
probe("other users' homes in /home", lambda: listdir("/home", own=["builder"]))
probe("read /etc/shadow", lambda: read("/etc/shadow"))
probe("runner credentials in the environment", env_secret)
probe("write to /usr", lambda: open("/usr/pwned", "w") and "wrote /usr/pwned")
probe(
    "see host processes",
    lambda: (
        None
        if len([p for p in os.listdir("/proc") if p.isdigit()]) < 10
        else "many processes visible"
    ),
)
probe("reach the internet (1.1.1.1:443)", lambda: connect(socket.AF_INET, ("1.1.1.1", 443)))
probe(
    "reach cloud metadata (169.254.169.254:80)",
    lambda: connect(socket.AF_INET, ("169.254.169.254", 80)),
)
port = os.environ.get("DEMO_HOST_PORT")
if port:
    probe(
        f"reach a server on the host's loopback (127.0.0.1:{port})",
        lambda: connect(socket.AF_INET, ("127.0.0.1", int(port))),
    )
probe("create a user namespace", unshare)
sys.exit(0 if all(r == "CONTAINED" for r in results) else 1)
